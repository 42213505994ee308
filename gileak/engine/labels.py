"""Analytic label recovery from the classifier's shared gradient: one victim's label (iDLG, Zhao
et al. 2020), and the multiset of a batch's labels (Wainakh et al. 2022, and a bias rule)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gileak.nets import batch_statistics_only, forward_order


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


def _classifier_gradient(net: nn.Module, shared_gradient: dict[str, torch.Tensor], input_shape):
    """(layer, weight gradient (N, C, d), bias gradient (N, C) or None), checked."""
    prefix, layer = classifier_layer(net, input_shape)
    weight = f"{prefix}.weight" if prefix else "weight"
    bias = f"{prefix}.bias" if prefix else "bias"
    if weight not in shared_gradient:
        raise ValueError(f"the shared gradient has no entry for the classifier's weight {weight!r}")
    weight_gradient = shared_gradient[weight]
    if weight_gradient.dim() != 3 or weight_gradient.shape[1:] != layer.weight.shape:
        raise ValueError(f"the classifier's weight gradient should be stacked over victims, (N, "
                         f"{', '.join(map(str, layer.weight.shape))}); got {tuple(weight_gradient.shape)}")
    bias_gradient = shared_gradient.get(bias) if layer.bias is not None else None
    for tensor in (weight_gradient, bias_gradient):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError("the classifier's shared gradient is not finite; no labels can be read from it")
    return layer, weight_gradient.detach(), None if bias_gradient is None else bias_gradient.detach()


def _apportion(estimate: torch.Tensor, evidence: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Integer counts (N, C) summing to `batch_size` from real-valued count estimates (N, C).

    Every class with negative `evidence` is in the batch for certain and gets one label first
    (the `batch_size` most negative, should noise make more of them negative); the remaining
    labels go one at a time to the class whose estimate exceeds its count the most. When every
    estimate is within ½ of its true count and they sum to `batch_size`, this returns exactly
    the true counts: a class below its true count always has a larger excess than one at it."""
    certain = evidence < 0
    ranked = torch.where(certain, evidence, torch.full_like(evidence, math.inf)).argsort(dim=1).argsort(dim=1)
    counts = (certain & (ranked < batch_size)).long()
    for _ in range(batch_size):
        missing = batch_size - counts.sum(dim=1)
        if not (missing > 0).any():
            break
        choice = (estimate - counts).argmax(dim=1)
        counts[torch.arange(len(counts)), choice] += (missing > 0).long()
    return counts


def _labels_from_counts(counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, C) counts -> (N, B) sorted labels: class c repeated counts[c] times."""
    ends = counts.cumsum(dim=1)
    positions = torch.arange(batch_size, device=counts.device).expand(len(counts), -1).contiguous()
    return torch.searchsorted(ends, positions, right=True)


def _dummy_statistics(net: nn.Module, layer: nn.Linear, input_shape, dummies: int, pixel_range) -> tuple:
    """(mean sum of the classifier's input features, mean softmax (C,)) of the model on `dummies`
    images drawn uniformly from the pixel range with a fixed seed: what a server that knows the
    model can estimate without any client data. The global random stream (which stochastic
    modules draw from) and batch-norm running statistics are left as they were."""
    captured = {}

    def record(_module, inputs, output):
        captured["features"], captured["logits"] = inputs[0].detach(), output.detach()

    low, high = pixel_range
    device = layer.weight.device
    images = torch.rand((dummies, *input_shape), generator=torch.Generator().manual_seed(0)) * (high - low) + low
    handle = layer.register_forward_hook(record)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), batch_statistics_only(net):
            net(images.to(device))
    finally:
        handle.remove()
    features = captured["features"].flatten(1)
    return features.sum(dim=1).mean(), captured["logits"].softmax(dim=-1).mean(dim=0)


def recover_label_counts(net: nn.Module, shared_gradient: dict[str, torch.Tensor], input_shape, batch_size: int,
                         *, method: str = "auto", estimate: str = "model", dummies: int = 64,
                         pixel_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """The multiset of each victim's `batch_size` labels, sorted, (N, B), from its gradient of
    the batch's mean loss (stacked over victims as `threat.shared_gradients` stacks them).

    With cross-entropy, the classifier's bias gradient is ∇b_c = (P_c − n_c)/B, where n_c
    counts label c in the batch and P_c = Σ_j softmax_c(x_j) sums the batch's predictions;
    row c of the weight gradient is (1/B) Σ_j (p_jc − [y_j = c]) h_j over the classifier's
    inputs h_j. Both methods first give one label to every class whose gradient is negative
    (only classes in the batch can have one) and hand out the rest by a count estimate:

    - method "bias" (needs the classifier's bias): n_c ≈ P̂_c − B·∇b_c. `estimate="model"`
      takes P̂ = B·softmax(W h̄ + b) at the batch's mean embedding h̄ recovered from the
      gradient by least squares (h̄ = Σ_c ∇b_c ∇W_c / Σ_c ∇b_c², the class-wise-embedding
      idea of iLRG, Ma et al. 2023, reduced to one embedding); `estimate="simple"` takes the
      uniform P̂_c = B/C (the "bias-corrected" rule of the breaching framework).
    - method "llg" (Wainakh et al. 2022, "User-level label leakage from gradients in federated
      learning"; needs no bias, assumes non-negative classifier inputs, e.g. after ReLU): the
      row sums g_c = Σ_k ∇W_ck ≈ (S/B)(P_c − n_c) for a feature sum S common to the batch, so
      each label of class c lowers g_c by an "impact" m = S/B. `estimate="model"` takes S and
      P̂/B from the model on dummy images in `pixel_range` (the white-box LLG+ idea);
      `estimate="simple"` is LLG's impact from the gradient alone, m = (1 + 1/C)·Σ_{g<0}|g|/B,
      with no offset.

    `method="auto"` uses "bias" when the classifier has one in the gradient, else "llg".

    Exact, for any labels with repeats, when the estimate of each P_c is within ½ of the truth
    (and, for llg, the batch's feature sums agree with S): so at initialisation, where
    predictions are nearly uniform and similar across inputs (the regime these methods are
    published for). As training makes predictions confident and input-dependent, counts become
    approximate. A fedavg upload Δθ is read through `uploads.update_as_gradient` with
    batch_size = steps × batch; an aggregate of K uploads with batch_size = K × B."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if method not in ("auto", "bias", "llg"):
        raise ValueError(f"unknown label-count method {method!r}; use auto, bias or llg")
    if estimate not in ("model", "simple"):
        raise ValueError(f"unknown estimate {estimate!r}; use model or simple")
    layer, weight_gradient, bias_gradient = _classifier_gradient(net, shared_gradient, input_shape)
    if method == "auto":
        method = "bias" if bias_gradient is not None else "llg"
    if method == "bias" and bias_gradient is None:
        raise ValueError("method 'bias' needs the classifier's bias gradient, and this classifier has no bias; "
                         "use method 'llg'")
    classes = weight_gradient.shape[1]
    batch = float(batch_size)

    if method == "bias":
        evidence = bias_gradient
        predicted = torch.full_like(bias_gradient, batch / classes)
        if estimate == "model":
            squared = bias_gradient.pow(2).sum(dim=1, keepdim=True)
            embedding = torch.einsum("nc,ncd->nd", bias_gradient, weight_gradient) / squared.clamp_min(1e-30)
            logits = torch.nn.functional.linear(embedding, layer.weight.detach(), layer.bias.detach())
            predicted = torch.where(squared > 0, batch * logits.softmax(dim=1), predicted)
        count_estimate = predicted - batch * bias_gradient
    else:
        evidence = weight_gradient.flatten(2).sum(dim=2)
        if estimate == "model":
            feature_sum, mean_softmax = _dummy_statistics(net, layer, input_shape, dummies, pixel_range)
            if not (torch.isfinite(feature_sum) and feature_sum > 0):
                raise ValueError("the classifier's inputs on dummy images sum to zero (dead features): the llg "
                                 "impact cannot be estimated from the model; use estimate='simple'")
            count_estimate = batch * mean_softmax.to(evidence) - evidence * (batch / feature_sum)
        else:
            negative = (-evidence).clamp_min(0).sum(dim=1, keepdim=True)
            impact = (1 + 1 / classes) * negative / batch
            # No negative row at all (a pruned or zero gradient): nothing to scale by, so all
            # classes look alike and the counts fall back to a uniform spread.
            count_estimate = torch.where(impact > 0, -evidence / impact.clamp_min(1e-30),
                                         torch.full_like(evidence, batch / classes))
    counts = _apportion(count_estimate, evidence, batch_size)
    return _labels_from_counts(counts, batch_size)


def label_accuracy(recovered: torch.Tensor, true: torch.Tensor) -> list[float]:
    """Per victim, the share of its batch's labels recovered, compared as multisets (order does
    not matter): Σ_c min(recovered count of c, true count of c) / B. Labels (N, B) or (B,)."""
    recovered, true = torch.as_tensor(recovered), torch.as_tensor(true)
    if recovered.dim() == 1 and true.dim() == 1:
        recovered, true = recovered.unsqueeze(0), true.unsqueeze(0)
    if recovered.shape != true.shape or recovered.dim() != 2:
        raise ValueError(f"recovered labels {tuple(recovered.shape)} and true labels {tuple(true.shape)} "
                         "should both be (victims, batch)")
    if recovered.shape[1] == 0:
        raise ValueError("a batch has at least one label")
    if len(true) == 0:
        return []
    classes = int(max(recovered.max(), true.max())) + 1
    if min(int(recovered.min()), int(true.min())) < 0:
        raise ValueError("labels are class indices, never negative")
    offsets = torch.arange(len(true)).unsqueeze(1) * classes
    recovered_counts = torch.bincount((recovered.long().cpu() + offsets).flatten(), minlength=len(true) * classes)
    true_counts = torch.bincount((true.long().cpu() + offsets).flatten(), minlength=len(true) * classes)
    matched = torch.minimum(recovered_counts, true_counts).view(len(true), classes).sum(dim=1)
    return (matched.double() / true.shape[1]).tolist()


def label_blind_accuracy(true: torch.Tensor, num_classes: int) -> list[float]:
    """Per victim, the expected `label_accuracy` of a guess made without the gradient: knowing
    only the batch size B and the C classes, spread the B labels evenly — ⌊B/C⌋ of every class
    and one more to r = B mod C classes drawn at random. For true counts n_c this is exactly
    (Σ_c min(⌊B/C⌋, n_c) + (r/C)·#{c : n_c > ⌊B/C⌋}) / B: the baseline a label-recovery
    accuracy must beat (1/C at B = 1; most of a large batch on balanced classes). Labels
    (N, B) or (B,)."""
    true = torch.as_tensor(true).long().cpu()
    if true.dim() == 1:
        true = true.unsqueeze(0)
    if true.dim() != 2 or true.shape[1] == 0:
        raise ValueError(f"true labels should be (victims, batch) with a batch of at least one, got {tuple(true.shape)}")
    if len(true) == 0:
        return []
    if int(true.min()) < 0 or int(true.max()) >= num_classes:
        raise ValueError(f"labels must be class indices below {num_classes}")
    batch = true.shape[1]
    each, extra = divmod(batch, num_classes)
    offsets = torch.arange(len(true)).unsqueeze(1) * num_classes
    counts = torch.bincount((true + offsets).flatten(), minlength=len(true) * num_classes).view(len(true), num_classes)
    matched = counts.clamp(max=each).sum(dim=1).double() + (counts > each).sum(dim=1).double() * (extra / num_classes)
    return (matched / batch).tolist()


def resize_label_multisets(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Each row's multiset of labels (N, L) scaled to `size` labels, sorted (N, size): class c
    gets its share L_c·size/L, rounded by largest remainder (ties to the smaller class). A local
    update's gradient counts each image once per step that trains on it, so its L labels are
    the client's `size` images' labels, some counted more often; as they are when L = size."""
    labels = torch.as_tensor(labels).long()
    if labels.dim() != 2 or labels.shape[1] == 0:
        raise ValueError(f"labels should be (victims, L) with L >= 1, got {tuple(labels.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if labels.shape[1] == size:
        return labels
    classes = int(labels.max()) + 1 if labels.numel() else 1
    offsets = torch.arange(len(labels), device=labels.device).unsqueeze(1) * classes
    counts = torch.bincount((labels + offsets).flatten(), minlength=len(labels) * classes).view(len(labels), classes)
    share = counts.double() * (size / labels.shape[1])
    resized = share.floor().long()
    remainder = share - resized
    for _ in range(size):
        missing = size - resized.sum(dim=1)
        if not (missing > 0).any():
            break
        choice = remainder.argmax(dim=1)
        rows = torch.arange(len(labels), device=labels.device)
        resized[rows, choice] += (missing > 0).long()
        remainder[rows, choice] = -1.0
    return _labels_from_counts(resized, size)
