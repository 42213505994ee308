"""Analytic label recovery from one victim's shared gradient (iDLG, Zhao et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from gileak.nets import forward_order


def classifier_layer(net: nn.Module, input_shape) -> tuple[str, nn.Linear]:
    """The last fully connected layer that runs in the forward pass (the classifier)."""
    modules = dict(net.named_modules())
    for name in reversed(forward_order(net, input_shape)):
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        module = modules.get(prefix)
        if isinstance(module, nn.Linear):
            return prefix, module
    raise ValueError("the model has no fully connected layer to recover labels from")


def recover_labels(net: nn.Module, shared_gradient: dict[str, torch.Tensor], input_shape) -> torch.Tensor:
    """Each victim's label from its gradient of the classifier, batch size 1.

    The gradient of cross-entropy w.r.t. the logits is softmax − one-hot: negative only at the
    true class. With a bias that is the bias gradient itself; without one, row i of the weight
    gradient is (p_i − y_i)·features, whose sum has that sign when the features are
    non-negative (after ReLU) — the iDLG argument."""
    prefix, layer = classifier_layer(net, input_shape)
    weight = f"{prefix}.weight" if prefix else "weight"
    bias = f"{prefix}.bias" if prefix else "bias"
    if bias in shared_gradient:
        scores = shared_gradient[bias]
    else:
        scores = shared_gradient[weight].flatten(2).sum(-1)
    return scores.argmin(dim=-1)
