"""The PyTorch entry points outside its public API that gileak uses, each resolved once here with
a fallback where a PyTorch lacks it. All are present in torch 2.11 (Python 3.12, what the GPU
machines run) and 2.14 (checked by tests/test_compat.py and benchmarks/gpu_check.sh)."""

from __future__ import annotations

import torch
from torch import nn

#: name -> what uses it, and what happens without it.
PRIVATE = {
    "torch._fused_adam_": "per-victim Adam in one kernel call (schedule.py); without: the unfused update",
    "torch.ops.aten.threshold_backward": "ReLU's backward in the chain step (fast.py); without: torch.where",
    "torch.nn.modules.dropout._DropoutNd": "finding dropout in training mode (lbfgs.py); without: the public "
                                           "dropout classes",
}

try:
    from torch.nn.modules.dropout import _DropoutNd

    DROPOUT: tuple[type, ...] = (_DropoutNd,)
except ImportError:  # pragma: no cover - every torch gileak supports has it
    DROPOUT = tuple(getattr(nn, name) for name in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                                                   "FeatureAlphaDropout") if hasattr(nn, name))

_threshold_backward = getattr(torch.ops.aten, "threshold_backward", None) if hasattr(torch, "ops") else None


def threshold_backward(grad: torch.Tensor, output: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's backward: `grad` where `output` > threshold, else 0 (one ATen kernel where there)."""
    if _threshold_backward is not None:
        return _threshold_backward(grad, output, threshold)
    return torch.where(output > threshold, grad, torch.zeros_like(grad))


def missing() -> list[str]:
    """The private entry points this PyTorch lacks (each then runs on its fallback)."""
    present = {
        "torch._fused_adam_": hasattr(torch, "_fused_adam_"),
        "torch.ops.aten.threshold_backward": _threshold_backward is not None,
        "torch.nn.modules.dropout._DropoutNd": hasattr(torch.nn.modules.dropout, "_DropoutNd"),
    }
    return [name for name, here in present.items() if not here]
