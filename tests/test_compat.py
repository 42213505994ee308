"""gileak.engine.compat: the private PyTorch entry points are all there in this torch (gileak's
GPU machines run 2.11, this one 2.14), and each fallback computes what the entry point does."""

import numpy as np
import torch
from test_attacks import tiny_mlp_target

from gileak.engine import choice, compat, lbfgs
from gileak.engine.lbfgs import LBFGSConfig, lbfgs_matching


def test_every_private_entry_point_is_in_this_torch():
    assert compat.missing() == [], f"torch {torch.__version__} lacks {compat.missing()} (see gileak/engine/compat.py)"
    assert set(compat.PRIVATE) >= {"torch._fused_adam_", "torch.ops.aten.threshold_backward"}


def test_the_relu_backward_fallback_equals_the_kernel(monkeypatch):
    grad, output = torch.randn(4, 7), torch.relu(torch.randn(4, 7))
    kernel = compat.threshold_backward(grad, output, 0)
    monkeypatch.setattr(compat, "_threshold_backward", None)
    assert torch.equal(compat.threshold_backward(grad, output, 0), kernel)


def test_numpy_combines_scalars_with_numbers_as_torch_does():
    """The batched L-BFGS's line search runs on NumPy scalars that must round as torch's 0-d
    tensors: NumPy 2's promotion (NEP 50), which pyproject asks for."""
    assert lbfgs.WEAK_PYTHON_SCALARS, np.__version__


def test_with_numpy_1s_promotion_the_lbfgs_runs_the_reference_loop(monkeypatch):
    target, _ = tiny_mlp_target()
    config = LBFGSConfig(minmax=False)
    reference = lbfgs_matching(target, LBFGSConfig(minmax=False, vectorized=False), seeds=[0, 1], max_iterations=4,
                               labels=target.labels)
    monkeypatch.setattr(lbfgs, "WEAK_PYTHON_SCALARS", False)
    with choice._watching() as seen:
        fallback = lbfgs_matching(target, config, seeds=[0, 1], max_iterations=4, labels=target.labels)
    assert seen == ["loop"] and torch.equal(fallback.images, reference.images)


def test_dropout_is_found_by_the_class_compat_names():
    assert all(isinstance(module, compat.DROPOUT) for module in (torch.nn.Dropout(), torch.nn.Dropout2d()))
    assert not isinstance(torch.nn.ReLU(), compat.DROPOUT)
