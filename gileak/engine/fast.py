"""The factored fast path of the gradient-matching engine.

For a model made only of layers whose per-sample weight gradient is a product of two factors —
Conv2d and Linear (G = sum_p g_p a_p^T over output positions p, with a_p the unfolded input and
g_p the output gradient) — and of per-sample element-wise or spatial modules in between (ReLU,
Flatten, pooling, the variational bottlenecks' sampling), the N victims' dummy gradients never
need to be formed one by one. One ordinary batched forward of the N dummies, the N victims
being N independent single-image clients, gives every layer's input a; one backward of the sum
of the per-victim losses gives every layer's per-sample output gradient g (the victims do not
interact, so the gradient of the sum w.r.t. victim i's activations is victim i's own). From the
factors, each victim's inner product with its shared gradient and the squared norm of its dummy
gradient are taken per layer, whichever way is cheaper:

* materialised: G_i = g_i U_i^T by a batched matmul, then <G_i, S_i> and ||G_i||^2;
* ghost (Opacus's ghost clipping): ||G_i||^2 = sum_{p,q} (g_p . g_q)(u_p . u_q) from two P x P
  Gram matrices and <G_i, S_i> = sum_p g_p . (S_i u_p), never forming G_i — a large win for layers
  with few output positions (the CNN's last convolution and every Linear on vectors). Where
  the victims' shared gradients of such a layer are of low rank (one image's gradient of a
  layer with P positions has rank <= P), S_i = L_i R_i^T is factored once per attack, checked
  to float precision, and <G_i, S_i> = sum_p (L_i^T g_p) . (R_i^T u_p) never reads S_i again.
  For the Euclidean distance only one-position layers are ghosts, ||G_i − S_i||^2 = |g|^2 |u|^2
  − 2 g.(S_i u) + ||S_i||^2 formed in float64 (the terms nearly cancel near a match), from
  S_i = L_i R_i^T + E_i with a small float32 residual E_i where S_i is of low rank, else from
  S_i in float64 (`_rank_one_euclidean`): two reads of E_i (or S_i) instead of eight passes over
  a materialised G_i.

A convolution's output comes from the library convolution, but its gradient is routed through
its unfolded input (z = W U), so that reaching the image takes one fold per layer.

The cosine (or Euclidean) distance and the total-variation prior follow per victim, and a
second backward of the summed per-victim losses gives every victim's image gradient. Each
victim's loss, and so its image gradient, is exactly what the vmap formulation computes, up to
floating-point summation order.

Where the model is a plain chain — Conv2d, Linear on vectors, ReLU, Flatten, Identity and
empty Slots in Sequentials, e.g. the paper's CNN undefended — `_chain_step` computes the same
thing with every derivative written out instead of taken twice by autograd: a dozen batched
matmuls and library convolutions (forward, transposed and their adjoints) and a few
element-wise passes per step, the col2im of the input gradient done on a CPU as one
index_add_ (col2im's additions in col2im's order, a third of its time).

A victim that holds a batch of M images (`Target.images_per_victim`, a client whose upload is
the gradient of the mean loss over them: `Client.is_mean_gradient`) is the same algebra with
M·P positions: the forward runs the N·M dummies, each image's output gradient is scaled by 1/M,
and a layer's factors are regrouped victim by victim, (N·M, fan, P) -> (N, fan, M·P), so its
dummy gradient is G_i = sum over the victim's images and positions of g u^T. Local updates of
several steps (fedavg, steps > 1) are not a product of factors: the vmap engine runs them.

Anything else — batch norm (couples the victims of a batch), layer norm, attention, a module
called twice, a custom container — is not supported here and `FactoredMatching.build` returns
None, so the caller falls back to the vmap engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gileak.engine.compat import threshold_backward
from gileak.engine.rules import module_rule
from gileak.nets import Slot, aux_loss


def _factored(module: nn.Module) -> bool:
    """A Conv2d or Linear: a layer whose per-sample gradient is formed from factors."""
    rule = module_rule(module)
    return rule is not None and rule.role == "factored"


def _batch_mean_aux(module: nn.Module) -> bool:
    """Its aux_loss averages over the batch, which `FactoredMatching` scales back per victim."""
    rule = module_rule(module)
    return rule is not None and rule.batch_mean_aux


@dataclass
class _Layer:
    """A Conv2d or Linear whose parameters are (partly) matched."""

    name: str
    module: nn.Module
    weight: str | None  # parameter name, when its gradient is wanted
    bias: str | None
    ghost: bool = False  # ghost norm / factored inner product instead of materialising G_i
    unfold: dict | None = None  # F.unfold's arguments for a convolution


def _conv_unfold_args(conv: nn.Conv2d) -> dict | None:
    """F.unfold's arguments reproducing conv's patches, or None when unfold cannot (grouped,
    asymmetric 'same' padding, non-zero padding mode)."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): symmetric only when dilation * (k - 1) is even
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            if any(t % 2 for t in totals):
                return None
            padding = tuple(t // 2 for t in totals)
    else:
        padding = tuple(conv.padding)
    return {"kernel_size": tuple(kernel), "dilation": tuple(dilation), "padding": padding, "stride": tuple(stride)}


def _supported(net: nn.Module) -> bool:
    """Whether every module of the net has a rule (`gileak.engine.rules`) the engine can follow:
    a factored layer it can unfold, or a module holding no parameters or buffers of its own."""
    for module in net.modules():
        rule = module_rule(module)
        if rule is None:
            return False
        if rule.role == "factored":
            if type(module) is nn.Conv2d and _conv_unfold_args(module) is None:
                return False
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            return False
    return True


class FactoredMatching:
    """Per-victim gradient-matching losses and image gradients for a batch of victims.

    `step(images, labels, shared, index)` returns (image gradients (n, C, H, W), total losses
    (n,), per-layer cosines (n, layers) or None) for the victims `index` (all when None);
    `shared` is the tuple of shared gradients in `names` order with a leading victim dim."""

    def __init__(self, target, config, names: list[str], wanted: list[str], groups: dict[str, list[str]],
                 layers: list[_Layer], factored: list[_Layer], aux_scaled: bool) -> None:
        self.target = target
        self.config = config
        self.names = names
        self.wanted = wanted
        self.groups = groups
        self.layers = layers  # the matched ones
        self.factored = factored  # every Conv2d / Linear: each runs with the target's parameters
        self.aux_scaled = aux_scaled
        self.state = {**target.params, **target.frozen}
        self._prepared: tuple | None = None
        # the last step's subset of victims: (the whole layout, index, its gathered layout, squares)
        self._subset: tuple | None = None
        #: The chain step's large per-step tensors (unfolded inputs, per-sample gradients, the
        #: columns folded into input gradients), kept from step to step: writing into the same
        #: memory again is several times faster than into fresh memory (on a 2-core CPU at 128
        #: victims the CNN's 7.5 MB unfolded image took 2 ms fresh and 0.4 ms reused).
        self._buffers: dict = {}
        #: The model as a plain chain of Conv2d / Linear / ReLU / Flatten (see `_chain_ops`),
        #: stepped by `_chain_step` without autograd; None: the autograd path of `step`.
        self.chain: list[tuple] | None = None
        #: Images per victim (M): each victim's dummy gradient averages over M images.
        self.per_victim = target.images_per_victim

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, target, config, names: list[str], wanted: list[str],
              groups: dict[str, list[str]]) -> FactoredMatching | None:
        """The fast path for this target, or None when the model or the distance is not supported."""
        if config.distance not in ("cosine", "euclidean"):
            return None
        if target.client is not None and not target.client.is_mean_gradient():
            return None  # local steps: not a product of per-layer factors
        per_victim = target.images_per_victim
        net = target.net
        if not _supported(net):
            return None
        owners: dict[str, tuple[nn.Module, str, str]] = {}
        modules = dict(net.named_modules())
        for name in target.params:  # every trainable parameter must belong to a factored layer
            prefix, _, leaf = name.rpartition(".")
            module = modules.get(prefix)
            if module is None or not _factored(module) or leaf not in ("weight", "bias"):
                return None
            owners[name] = (module, prefix, leaf)
        factored = [_Layer(name, module, None, None,
                           unfold=_conv_unfold_args(module) if type(module) is nn.Conv2d else None)
                    for name, module in net.named_modules() if _factored(module)]
        by_prefix = {layer.name: layer for layer in factored}
        for name in wanted:
            _, prefix, leaf = owners[name]
            setattr(by_prefix[prefix], leaf, name)
        shapes = cls._dry_run(target, factored)
        if shapes is None:
            return None
        if any(getattr(m, "aux_loss", None) is not None and not _batch_mean_aux(m) for m in net.modules()):
            return None  # a loss term (left by the dry run) the engine cannot split between victims
        layers = [layer for layer in factored if layer.weight is not None or layer.bias is not None]
        for layer in layers:
            positions, fan_in, fan_out = shapes[layer.name]
            # Materialising costs a (fan_out x fan_in) element-wise tail per victim (several
            # passes, memory-bound); the ghost terms cost two P x P Gram matrices.
            positions *= per_victim  # a victim's batch: its images' positions side by side
            if config.distance == "cosine":
                layer.ghost = positions**2 * (fan_in + fan_out) < 8 * fan_in * fan_out
            else:
                layer.ghost = positions == 1 and _euclidean_ghost_fits(target, fan_in, fan_out)
        aux_scaled = any(_batch_mean_aux(m) for m in net.modules())
        chain = _chain_ops(net, factored, shapes, target)
        if chain is not None:  # P = 1 layers as rank-one products, every other one materialised
            for layer in layers:
                positions, fan_in, fan_out = shapes[layer.name]
                layer.ghost = positions == 1 and per_victim == 1 and (
                    config.distance == "cosine" or _euclidean_ghost_fits(target, fan_in, fan_out))
        engine = cls(target, config, names, wanted, groups, layers, factored, aux_scaled)
        engine.chain = chain
        return engine

    @staticmethod
    def _dry_run(target, layers: list[_Layer]) -> dict[str, tuple[int, int, int]] | None:
        """(output positions, fan-in, fan-out) of each layer from one forward of two dummies,
        checking that each runs exactly once and keeps the batch dim first; None otherwise. The
        global RNG (stochastic modules) is left as it was."""
        shapes: dict[str, tuple[int, int, int] | None] = {}
        calls: dict[str, int] = {}
        handles = []

        def hook(layer):
            def record(module, inputs, output):
                calls[layer.name] = calls.get(layer.name, 0) + 1
                a = inputs[0]
                if type(module) is nn.Conv2d:
                    ok = a.dim() == 4 and output.dim() == 4 and a.shape[0] == 2
                    positions = output.shape[2] * output.shape[3]
                    fan_in = module.in_channels * math.prod(module.kernel_size)
                else:
                    ok = a.dim() >= 2 and a.shape[0] == 2
                    positions = math.prod(a.shape[1:-1])
                    fan_in = module.in_features
                shapes[layer.name] = (positions, fan_in, module.weight.shape[0]) if ok else None
            return record

        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook(layer)))
        try:
            devices = [target.device] if target.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                state = {**target.params, **target.frozen}
                functional_call(target.net, state, (torch.zeros((2, *target.input_shape), device=target.device),))
        except Exception:  # noqa: BLE001 — anything odd: the vmap engine handles it
            return None
        finally:
            for handle in handles:
                handle.remove()
        if any(calls.get(layer.name) != 1 or shapes.get(layer.name) is None for layer in layers):
            return None
        return shapes

    # ------------------------------------------------------------------ per-step work
    def _prepare(self, shared: tuple[torch.Tensor, ...]) -> tuple:
        """Each matched parameter's shared gradients as a tuple of tensors with a leading victim
        dim — (S^T (N, fan_in, fan_out),) where the dummy gradient is materialised (transposed,
        so that the image gradient needs no copies); for a ghost layer, cosine: the factors
        (L (N, fan_out, r), R (N, fan_in, r)) with S = L R^T where the victims' shared
        gradients are of low rank r, else (S (N, fan_out, fan_in),), Euclidean:
        `_residual_layout`'s; a bias's (b,) — and each victim's squared shared norm per
        parameter (float64 for the Euclidean ghosts); computed once per attack."""
        if self._prepared is not None and self._prepared[0] is shared:
            return self._prepared[1]
        by_name = dict(zip(self.wanted, shared))
        euclidean = self.config.distance == "euclidean"
        laid_out = {}
        for layer in self.layers:
            if layer.weight is not None:
                s = by_name[layer.weight]
                s = s.reshape(s.shape[0], s.shape[1], -1)
                if not layer.ghost:
                    laid_out[layer.weight] = (s.transpose(1, 2).contiguous(),)
                elif euclidean:  # (L, R, E, constants, rows, columns) or (S in float64, rows, columns)
                    laid_out[layer.weight] = _residual_layout(s)
                else:
                    laid_out[layer.weight] = _low_rank(s) or (s.contiguous(),)
            if layer.bias is not None:
                laid_out[layer.bias] = (by_name[layer.bias].contiguous(),)
        squares = {n: _squares(by_name[n].flatten(1)) for n in self.wanted}
        if euclidean:  # a rank-one layer's ||S||^2 in float64, as its distance is formed
            for layer in self.layers:
                if layer.ghost and layer.weight is not None:
                    squares[layer.weight] = _squares(by_name[layer.weight].double().flatten(1))
        self._prepared = (shared, (laid_out, squares))
        return self._prepared[1]

    def step(self, images: torch.Tensor, labels: torch.Tensor, shared: tuple[torch.Tensor, ...],
             index: torch.Tensor | None = None):
        """Victims' dummies (n, C, H, W), or (n, M, C, H, W) with labels (n, M) for batches."""
        laid_out, squares = self._prepare(shared)
        if index is not None:  # index_select: 1.5-4x as fast as t[index] on a CPU
            images, labels = images.index_select(0, index), labels.index_select(0, index)
            subset = self._subset
            if subset is not None and subset[0] is laid_out and torch.equal(subset[1], index):
                laid_out, squares = subset[2], subset[3]  # the same victims as the last step (L-BFGS: 40% of calls)
            else:
                # the victims' shared gradients gathered into buffers kept between steps (fresh
                # memory for them on every L-BFGS evaluation cost more than the gather)
                whole = laid_out
                laid_out = {n: tuple(torch.index_select(t, 0, index, out=self._buffer(("shared", n, j), t)(
                    (index.numel(), *t.shape[1:]))) for j, t in enumerate(s)) for n, s in laid_out.items()}
                squares = {n: s.index_select(0, index) for n, s in squares.items()}
                self._subset = (whole, index.clone(), laid_out, squares)
        batched = images.shape
        images = images.reshape(-1, *self.target.input_shape)
        labels = labels.reshape(-1)
        if self.chain is not None:
            image_grads, total, cosines = self._chain_step(images.detach(), labels, laid_out, squares)
            return image_grads.view(batched), total, cosines
        image_grads, total, cosines = self._autograd_step(images, labels, laid_out, squares)
        return image_grads.view(batched), total, cosines

    def _autograd_step(self, images: torch.Tensor, labels: torch.Tensor, laid_out: dict, squares: dict):
        """`step` for any supported model: the factors from a forward with hooks and one backward,
        the per-victim terms, and a second backward of their sum to the images."""
        per_victim = self.per_victim
        count = images.shape[0]  # images: the victims' batches one after another
        x = images.detach().requires_grad_(True)

        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.enable_grad():
            for layer in self.factored:
                layer.module.forward = self._forward(layer, captured)  # instance attribute, removed below
            try:
                logits = self.target.net(x)
            finally:
                for layer in self.factored:
                    del layer.module.forward
            # the sum over victims of each victim's loss, the mean over its images
            loss = F.cross_entropy(logits, labels, reduction="sum")
            if per_victim > 1:
                loss = loss / per_victim
            extra = aux_loss(self.target.net)
            if not isinstance(extra, float) or extra:
                loss = loss + (count // per_victim if self.aux_scaled else 1) * extra

            outputs = [captured[layer.name][1] for layer in self.layers]
            output_grads = torch.autograd.grad(loss, outputs, create_graph=True)
            dots: dict[str, torch.Tensor] = {}
            norms: dict[str, torch.Tensor] = {}
            diffs: dict[str, torch.Tensor] = {}
            for layer, g in zip(self.layers, output_grads):
                self._layer_terms(layer, captured[layer.name][0], g, laid_out, squares, dots, norms, diffs)
            total = self._distance(dots, norms, diffs, squares, x)
            (image_grads,) = torch.autograd.grad(total.sum(), x)
        cosines = self._cosines(dots, norms, squares)
        return image_grads, total.detach(), None if cosines is None else cosines.detach()

    # ------------------------------------------------------------------ the plain chain
    def _buffer(self, key, like: torch.Tensor) -> Callable[[tuple[int, ...]], torch.Tensor]:
        """A function giving the reusable buffer `key` of a shape (dtype and device of `like`): the
        first rows of one kept for the most victims asked for so far, so that steps on changing
        subsets of victims (the L-BFGS line searches) reuse it too."""
        def get(shape) -> torch.Tensor:
            shape = tuple(shape)
            buffer = self._buffers.get(key)
            if (buffer is None or tuple(buffer.shape[1:]) != shape[1:] or buffer.shape[0] < shape[0]
                    or buffer.dtype != like.dtype or buffer.device != like.device):
                buffer = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
            return buffer[: shape[0]]
        return get

    def _weights(self, layer: _Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
        prefix = f"{layer.name}." if layer.name else ""
        bias = self.state.get(f"{prefix}bias") if layer.module.bias is not None else None
        return self.state[f"{prefix}weight"], bias

    @torch.no_grad()
    def _chain_step(self, x: torch.Tensor, labels: torch.Tensor, laid_out: dict, squares: dict):
        """`step` for a plain chain (`_chain_ops`), every derivative written out instead of
        taken by autograd, in named steps:

        1. `_chain_forward`: a forward keeping each layer's unfolded input U and each ReLU's output;
        2. `_chain_output_gradients`: every matched layer's output gradient g (backward 1);
        3. `_chain_layer_terms`: per victim and matched parameter <G, S>, ||G||^2 (and ||G − S||^2);
        4. `_chain_distance`: the loss, and its derivative w.r.t. each matched G,
           Gbar = alpha S + beta G (cosine) or 2 (G − S) (Euclidean);
        5. `_chain_factor_bars`: each Gbar pushed to its layer's g and U (gbar = Gbar U,
           Ubar = Gbar^T g);
        6. `_chain_image_gradient`: the gbars carried forward through backward 1's adjoint (the
           ReLU masks, each layer's forward without bias) to the logits' softmax Jacobian, and
           the result back through the forward's adjoint, each layer adding its Ubar, to the images;
        7. `_chain_prior`: the total-variation prior and its gradient."""
        saved, probs = self._chain_forward(x)
        matched_at = [i for i, op in enumerate(self.chain)
                      if op[0] == "layer" and (op[1].weight is not None or op[1].bias is not None)]
        deltas = self._chain_output_gradients(saved, probs, labels, matched_at)
        terms, dots, norms, diffs = self._chain_layer_terms(matched_at, saved, deltas, laid_out, squares)
        reconstruction, alpha, beta = self._chain_distance(dots, norms, diffs, squares)
        gbars, ubars = self._chain_factor_bars(matched_at, terms, deltas, laid_out, alpha, beta)
        image_grads = self._chain_image_gradient(saved, probs, gbars, ubars)
        total = self._chain_prior(x, reconstruction, image_grads)
        return image_grads, total, self._cosines(dots, norms, squares)

    def _chain_forward(self, x: torch.Tensor) -> tuple[list, torch.Tensor]:
        """The forward of the N·M images: what each op keeps for the backward passes — a layer
        (its input shape, its unfolded input U or None), a ReLU its output, a flatten its input
        shape — and the softmax of the logits."""
        saved: list = []
        h = x
        for i, op in enumerate(self.chain):
            if op[0] == "layer":
                layer = op[1]
                weight, bias = self._weights(layer)
                if layer.unfold is not None:
                    patches = _patches(h, layer.unfold, self._buffer(("u", i), h)) if layer.weight is not None else None
                    saved.append((h.shape, patches))
                    h = _conv(h, weight, bias, layer.unfold, patches)
                else:
                    saved.append((h.shape, h))
                    h = F.linear(h, weight, bias)
            elif op[0] == "relu":
                h = torch.relu(h)
                saved.append(h)
            else:
                saved.append(h.shape)
                h = h.flatten(1)
        return saved, torch.softmax(h, 1)

    def _chain_output_gradients(self, saved: list, probs: torch.Tensor, labels: torch.Tensor,
                                matched_at: list[int]) -> dict[int, torch.Tensor]:
        """Backward 1: every matched layer's output gradient g, per image, of the summed loss
        (the victims' losses, each the mean over its M images)."""
        ops = self.chain
        delta = probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)
        if self.per_victim > 1:  # a victim's loss is the mean over its images
            delta = delta / self.per_victim
        deltas: dict[int, torch.Tensor] = {}
        for i in range(len(ops) - 1, matched_at[0] - 1, -1):
            op = ops[i]
            if op[0] == "layer":
                deltas[i] = delta
                if i == matched_at[0]:
                    break
                weight, _ = self._weights(op[1])
                if op[1].unfold is not None:
                    delta = _conv_input_grad(delta, saved[i][0], weight, op[1].unfold, None)
                else:
                    delta = delta @ weight
            elif op[0] == "relu":
                delta = threshold_backward(delta, saved[i], 0)
            else:
                delta = delta.reshape(saved[i])
        return deltas

    def _chain_layer_terms(self, matched_at: list[int], saved: list, deltas: dict, laid_out: dict, squares: dict):
        """Per matched layer, its factors regrouped victim by victim (U (n, fan_in, P), g (n,
        fan_out, P)) and what step 5 reuses (`terms`), and per victim and parameter <G, S>
        (`dots`), ||G||^2 (`norms`) and, Euclidean, ||G − S||^2 (`diffs`): a one-position layer
        as a rank-one product (ghost; Euclidean: `_rank_one_euclidean`), every other one with G
        materialised."""
        euclidean = self.config.distance == "euclidean"
        cosine = not euclidean or bool(self.groups)
        per_victim = self.per_victim
        dots: dict[str, torch.Tensor] = {}
        norms: dict[str, torch.Tensor] = {}
        diffs: dict[str, torch.Tensor] = {}
        terms: dict[int, dict] = {}
        for i in matched_at:
            layer = self.chain[i][1]
            if layer.unfold is not None:
                g = deltas[i].flatten(2)
                u = saved[i][1]
            else:
                g = deltas[i].unsqueeze(2)
                u = saved[i][1].unsqueeze(2)
            g, u = _by_victim(g, per_victim), _by_victim(u, per_victim)
            n = g.shape[0]  # victims
            # now U (n, fan_in, P) and g (n, fan_out, P), a victim's images' positions side by side
            term = terms[i] = {"g": g, "u": u}
            if layer.weight is not None:
                shared = laid_out[layer.weight]
                if layer.ghost and euclidean:  # one position: G = g u^T, S in float64
                    term.update(_rank_one_terms(layer.weight, g, u, shared, squares, cosine, dots, norms, diffs))
                elif layer.ghost:  # one position: G = g u^T
                    g1, u1 = g.squeeze(2), u.squeeze(2)
                    term["gg"], term["uu"] = g1.pow(2).sum(1), u1.pow(2).sum(1)
                    norms[layer.weight] = term["gg"] * term["uu"]
                    if len(shared) == 2:  # <g u^T, L R^T> = (L^T g) . (R^T u)
                        left, right = shared
                        term["from_g"] = (g1.unsqueeze(2) * left).sum(1)  # (n, r)
                        term["from_u"] = (u1.unsqueeze(2) * right).sum(1)
                        dots[layer.weight] = (term["from_g"] * term["from_u"]).sum(1)
                    else:
                        term["su"] = torch.bmm(shared[0], u).squeeze(2)  # S u (n, fan_out)
                        dots[layer.weight] = (term["su"] * g1).sum(1)
                else:
                    out = self._buffer(("grad_t", i), u)((n, u.shape[1], g.shape[1]))
                    grad_t = torch.bmm(u, g.transpose(1, 2), out=out)  # G^T (n, fan_in, fan_out)
                    term["grad_t"] = grad_t
                    flat = grad_t.view(n, -1)
                    if euclidean:  # G − S in G's buffer where G itself is not needed again
                        diff = grad_t.sub_(shared[0]) if not cosine else grad_t - shared[0]
                        term["diff"] = diff
                        diffs[layer.weight] = _squares(diff.view(n, -1))
                    if cosine:
                        norms[layer.weight] = _squares(flat)
                        product = torch.mul(flat, shared[0].view(n, -1), out=self._buffer(("product", i), flat)(flat.shape))
                        dots[layer.weight] = product.sum(1)
            if layer.bias is not None:
                term["gb"] = g.sum(2)
                self._materialised(layer.bias, term["gb"], laid_out[layer.bias][0], euclidean, cosine,
                                   dots, norms, diffs)
        return terms, dots, norms, diffs

    def _chain_distance(self, dots: dict, norms: dict, diffs: dict, squares: dict):
        """(each victim's gradient distance, alpha, beta): for the cosine distance its
        derivative w.r.t. a matched G is alpha S + beta G; for the Euclidean one (alpha and
        beta None) it is 2 (G − S)."""
        if self.config.distance == "euclidean":
            return sum(diffs[name] for name in self.names), None, None
        dot = sum(dots[name] for name in self.names)
        norm_a = sum(norms[name] for name in self.names).sqrt()
        norm_b = sum(squares[name] for name in self.names).sqrt()
        den = norm_a * norm_b + 1e-12
        alpha = -1 / den
        beta = dot * norm_b / (norm_a * den * den)
        return 1 - dot / den, alpha, beta

    def _chain_factor_bars(self, matched_at: list[int], terms: dict, deltas: dict, laid_out: dict, alpha, beta):
        """Each matched G's loss derivative Gbar pushed to its layer's factors: gbar = Gbar U
        (listed image by image, shaped as the layer's output gradient) and Ubar = Gbar^T g —
        or, where it is cheaper to form where it is used, the pair (Gbar^T, g). Overwrites the
        materialised G^T of `terms` with Gbar^T."""
        euclidean = alpha is None
        per_victim = self.per_victim
        matched = set(self.names)
        gbars: dict[int, torch.Tensor] = {}
        ubars: dict[int, torch.Tensor | tuple] = {}  # Ubar, or (A, B, c): Ubar = c A B
        for i in matched_at:
            layer, term = self.chain[i][1], terms[i]
            g, u = term["g"], term["u"]
            gbar = ubar = None
            if layer.weight in matched:
                shared = laid_out[layer.weight]
                if layer.ghost and euclidean:  # 2 (G − S) u and 2 (G − S)^T g, in float64
                    g64, u64 = term["g64"], term["u64"]
                    stg = _shared_transpose_times(g.squeeze(2), g64, shared, term)  # S^T g
                    gbar = (2 * (g64 * term["uu"].unsqueeze(1) - term["su"])).to(g.dtype).unsqueeze(2)
                    ubar = (2 * (u64 * term["gg"].unsqueeze(1) - stg)).to(g.dtype).unsqueeze(2)
                elif layer.ghost:
                    g1, u1 = g.squeeze(2), u.squeeze(2)
                    a, b = alpha.unsqueeze(1), beta.unsqueeze(1)
                    if len(shared) == 2:
                        left, right = shared
                        su = (left * term["from_u"].unsqueeze(1)).sum(2)  # S u = L (R^T u)
                        stg = (right * term["from_g"].unsqueeze(1)).sum(2)  # S^T g = R (L^T g)
                    else:
                        su = term["su"]
                        stg = torch.bmm(g1.unsqueeze(1), shared[0]).squeeze(1)
                    gbar = torch.addcmul(su * a, g1, (b * term["uu"].unsqueeze(1))).unsqueeze(2)
                    ubar = torch.addcmul(stg * a, u1, (b * term["gg"].unsqueeze(1))).unsqueeze(2)
                else:
                    # Euclidean: Gbar^T = 2 (G − S)^T, its 2 applied by the matmuls (exact: a
                    # power of two) instead of a pass over the (n, fan_in, fan_out) difference
                    if euclidean:
                        upstream, scale = term["diff"], 2.0
                    else:
                        upstream, scale = term["grad_t"].mul_(beta.view(-1, 1, 1)).addcmul_(
                            shared[0], alpha.view(-1, 1, 1)), 1.0
                    gbar = _scaled_bmm(upstream.transpose(1, 2), u, scale)  # (n, fan_out, P)
                    if per_victim == 1:
                        ubar = (upstream, g, scale)  # Ubar = Gbar^T g (n, fan_in, P), formed where it is used
                    else:  # formed here, to be listed image by image
                        ubar = _by_image(_scaled_bmm(upstream, g, scale), per_victim)
            if layer.bias in matched:
                sb = laid_out[layer.bias][0]
                if euclidean:
                    bias_bar = 2 * (term["gb"] - sb)
                else:
                    bias_bar = torch.addcmul(sb * alpha.unsqueeze(1), term["gb"], beta.unsqueeze(1))
                # (in place: every gbar above is a fresh tensor)
                gbar = bias_bar.unsqueeze(2).expand_as(g) if gbar is None else gbar.add_(bias_bar.unsqueeze(2))
            if gbar is not None:
                gbars[i] = _by_image(gbar, per_victim).reshape(deltas[i].shape)
            if ubar is not None:
                ubars[i] = ubar
        return gbars, ubars

    def _chain_image_gradient(self, saved: list, probs: torch.Tensor, gbars: dict, ubars: dict) -> torch.Tensor:
        """The gbars carried forward through backward 1's adjoint to the logits, through the
        softmax's (symmetric) Jacobian, then back through the forward to the images, each layer
        adding its Ubar on the way."""
        ops = self.chain
        carry = None
        for i in range(min(gbars), len(ops)) if gbars else ():
            op = ops[i]
            if op[0] == "layer":
                if carry is not None:
                    weight, _ = self._weights(op[1])
                    if op[1].unfold is not None:
                        args = op[1].unfold
                        few = carry.device.type == "cpu" and _columns(carry.shape, weight, args) <= _FEW_COLUMNS
                        carry = _conv(carry, weight, None, args, _unfold(carry, args) if few else None)
                    else:
                        carry = F.linear(carry, weight)
                own = gbars.get(i)
                if own is not None:
                    carry = own if carry is None else carry + own
            elif op[0] == "relu":
                carry = threshold_backward(carry, saved[i], 0)
            else:
                carry = carry.flatten(1)
        bar = probs * (carry - (probs * carry).sum(1, keepdim=True)) if carry is not None else torch.zeros_like(probs)
        if self.per_victim > 1:  # (each image's output gradient was scaled by 1/M)
            bar = bar / self.per_victim
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            if op[0] == "layer":
                layer = op[1]
                weight, _ = self._weights(layer)
                shape = saved[i][0]
                ubar = ubars.get(i)
                if layer.unfold is not None:
                    bar = _conv_input_grad(bar, shape, weight, layer.unfold, ubar, self._buffer(("cols", i), bar))
                else:
                    bar = bar @ weight
                    if ubar is not None:
                        bar = bar.add_((ubar if isinstance(ubar, torch.Tensor) else _scaled_bmm(*ubar)).squeeze(2))
            elif op[0] == "relu":
                bar = threshold_backward(bar, saved[i], 0)
            else:
                bar = bar.reshape(saved[i])
        return bar

    def _chain_prior(self, x: torch.Tensor, reconstruction: torch.Tensor, image_grads: torch.Tensor) -> torch.Tensor:
        """Each victim's total loss: the distance plus the weighted total-variation prior (a
        victim's: the mean over its images), whose gradient is added to `image_grads` in place."""
        config = self.config
        if not config.tv_weight:
            return reconstruction
        per_victim = self.per_victim
        dx = x[..., :, 1:] - x[..., :, :-1]
        dy = x[..., 1:, :] - x[..., :-1, :]
        tv = dx.abs().flatten(1).mean(1) + dy.abs().flatten(1).mean(1)
        if per_victim > 1:
            tv = tv.view(-1, per_victim).mean(1)
        total = reconstruction + config.tv_weight * tv
        sx = dx.sign_().mul_(config.tv_weight / (dx[0].numel() * per_victim))
        sy = dy.sign_().mul_(config.tv_weight / (dy[0].numel() * per_victim))
        image_grads[..., :, 1:] += sx
        image_grads[..., :, :-1] -= sx
        image_grads[..., 1:, :] += sy
        image_grads[..., :-1, :] -= sy
        return total

    def _cosines(self, dots: dict, norms: dict, squares: dict) -> torch.Tensor | None:
        """Per victim and traced layer, the cosine of dummy and shared gradient (None: no trace)."""
        if not self.groups:
            return None
        return torch.stack([  # (a Euclidean one-position layer's ||S||^2 is float64)
            _cosine_from(sum(dots[m] for m in g), sum(norms[m] for m in g),
                         sum(squares[m] for m in g)).to(dots[g[0]].dtype)
            for g in self.groups.values()
        ], dim=1)

    def _forward(self, layer: _Layer, captured: dict) -> Callable:
        """The layer's forward with the target's parameters; a matched layer leaves (its
        unfolded input U (n, fan_in, P), its output z) in `captured`. A matched convolution's
        output is the library convolution's, but its gradient flows through U (z = W U), so
        that the image gradient takes one fold (col2im) per layer instead of a convolution's
        backward plus a fold."""
        module = layer.module
        weight = self.state[f"{layer.name}.weight" if layer.name else "weight"]
        bias = self.state.get(f"{layer.name}.bias" if layer.name else "bias") if module.bias is not None else None
        record = layer.weight is not None or layer.bias is not None

        if type(module) is nn.Linear:
            def linear(a):
                z = F.linear(a, weight, bias)
                if record:
                    captured[layer.name] = (a, z)
                return z
            return linear

        args = dict(layer.unfold)

        def conv(a):
            if not record:
                return F.conv2d(a, weight, bias, args["stride"], args["padding"], args["dilation"])
            u = _patches(a, args)
            z = _ConvThroughPatches.apply(a, u, weight, bias, args)
            captured[layer.name] = (u, z)
            return z
        return conv

    def _layer_terms(self, layer: _Layer, u: torch.Tensor, g: torch.Tensor, laid_out, squares, dots, norms,
                     diffs) -> None:
        """Victim-wise <G, S> and ||G||^2 of the layer's weight and bias gradients from its
        unfolded input U and output gradient g; Euclidean: ||G - S||^2 in `diffs`, formed from
        the materialised G (no cancellation near a match), or for a one-position layer from
        its rank-one factors in float64 (`_rank_one_euclidean`)."""
        count = u.shape[0]
        if layer.unfold is not None:
            g = g.flatten(2)
        else:  # Linear on (n, ..., in): positions are the middle dims
            if u.dim() == 2:
                u, g = u.unsqueeze(2), g.unsqueeze(2)
            else:
                u = u.reshape(count, -1, u.shape[-1]).transpose(1, 2)
                g = g.reshape(count, -1, g.shape[-1]).transpose(1, 2)
        u, g = _by_victim(u, self.per_victim), _by_victim(g, self.per_victim)
        # now U (n, fan_in, P) and g (n, fan_out, P), a victim's images' positions side by side
        euclidean = self.config.distance == "euclidean"
        cosine = not euclidean or bool(self.groups)  # the trace's per-layer cosines need them too
        if layer.weight is not None:
            shared = laid_out[layer.weight]
            if layer.ghost and euclidean:  # one position (`build`): G = g u^T, S in float64
                _rank_one_terms(layer.weight, g, u, shared, squares, cosine, dots, norms, diffs)
            elif layer.ghost:
                if u.shape[2] == 1:  # one position: G = g u^T, ||G||^2 = |g|^2 |u|^2
                    g1, u1 = g.squeeze(2), u.squeeze(2)
                    norms[layer.weight] = g1.pow(2).sum(1) * u1.pow(2).sum(1)
                    if len(shared) == 2:  # <g u^T, L R^T> = (L^T g) . (R^T u)
                        left, right = shared
                        from_g = (g1.unsqueeze(2) * left).sum(1)  # (n, r)
                        from_u = (u1.unsqueeze(2) * right).sum(1)
                        dots[layer.weight] = (from_g * from_u).sum(1)
                    else:
                        dots[layer.weight] = (torch.bmm(g1.unsqueeze(1), shared[0]).squeeze(1) * u1).sum(1)
                else:
                    gram_g = torch.bmm(g.transpose(1, 2), g)
                    gram_u = torch.bmm(u.transpose(1, 2), u)
                    norms[layer.weight] = (gram_g * gram_u).flatten(1).sum(1)
                    if len(shared) == 2:
                        left, right = shared
                        from_g = torch.bmm(g.transpose(1, 2), left)  # (n, P, r)
                        from_u = torch.bmm(u.transpose(1, 2), right)
                        dots[layer.weight] = (from_g * from_u).flatten(1).sum(1)
                    else:
                        dots[layer.weight] = (torch.bmm(shared[0], u) * g).flatten(1).sum(1)
            elif euclidean or self.groups:
                grad = torch.bmm(u, g.transpose(1, 2))  # G^T (n, fan_in, fan_out)
                self._materialised(layer.weight, grad.flatten(1), shared[0].flatten(1), euclidean, cosine,
                                   dots, norms, diffs)
            else:
                dots[layer.weight], norms[layer.weight] = _MaterialisedTerms.apply(u, g, shared[0])
        if layer.bias is not None:
            self._materialised(layer.bias, g.sum(2), laid_out[layer.bias][0], euclidean, cosine, dots, norms, diffs)

    @staticmethod
    def _materialised(name, grad, s, euclidean, cosine, dots, norms, diffs) -> None:
        if euclidean:
            diffs[name] = (grad - s).pow(2).sum(1)
        if cosine:
            norms[name] = grad.pow(2).sum(1)
            dots[name] = (grad * s).sum(1)

    def _distance(self, dots, norms, diffs, squares, x) -> torch.Tensor:
        """Each victim's total loss: the gradient distance plus the weighted TV prior."""
        config = self.config
        if config.distance == "cosine":
            dot = sum(dots[n] for n in self.names)
            norm_a = sum(norms[n] for n in self.names).sqrt()
            norm_b = sum(squares[n] for n in self.names).sqrt()
            reconstruction = 1 - dot / (norm_a * norm_b + 1e-12)
        else:
            reconstruction = sum(diffs[n] for n in self.names)
        if config.tv_weight:
            dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
            dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
            tv = dx + dy
            if self.per_victim > 1:  # a victim's prior: the mean over its images
                tv = tv.view(-1, self.per_victim).mean(1)
            return reconstruction + config.tv_weight * tv
        return reconstruction


class _MaterialisedTerms(torch.autograd.Function):
    """(<G_i, S_i>, ||G_i||^2) per victim with G_i^T = U_i g_i^T, in as few passes over the
    (n, fan_in, fan_out) per-sample gradients as it takes; its backward runs once (the image
    gradient), so it need not be differentiable."""

    @staticmethod
    def forward(ctx, u, g, shared_t):
        grad_t = torch.bmm(u, g.transpose(1, 2))
        n = grad_t.shape[0]
        flat = grad_t.view(n, -1)
        dot = torch.linalg.vecdot(flat, shared_t.reshape(n, -1))
        norm = _squares(flat)
        ctx.save_for_backward(u, g, shared_t, grad_t)
        return dot, norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_dot, grad_norm):
        u, g, shared_t, grad_t = ctx.saved_tensors
        shape = (-1, 1, 1)
        # d/dG^T of a <G, S> + b ||G||^2 = a S^T + 2 b G^T
        upstream = torch.addcmul(shared_t * grad_dot.view(shape), grad_t, (2 * grad_norm).view(shape))
        grad_u = torch.bmm(upstream, g)  # (n, fan_in, P)
        grad_g = torch.bmm(u.transpose(1, 2), upstream).transpose(1, 2)  # (n, fan_out, P)
        return grad_u, grad_g, None


#: Bytes the Euclidean rank-one layout of a one-position layer's shared gradients may take,
#: counted as S in float64 (`_residual_layout`: its float32 residual takes half); a layer over
#: it is materialised.
EUCLIDEAN_GHOST_MEMORY = 1024**3


def _euclidean_ghost_fits(target, fan_in: int, fan_out: int) -> bool:
    """Whether a one-position layer's Euclidean terms come from its rank-one factors: only in a
    model narrower than float64 (float64 gives the cancelling terms no extra digits: a float64
    model's layers are materialised) and where its layout fits EUCLIDEAN_GHOST_MEMORY."""
    narrow = all(p.dtype != torch.float64 for p in target.params.values())
    return narrow and target.num_victims * fan_in * fan_out * 8 <= EUCLIDEAN_GHOST_MEMORY


def _residual_layout(s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A one-position layer's shared gradients S (N, fan_out, fan_in) laid out for the
    Euclidean rank-one terms: where S is of low rank (`_low_rank`: one image's gradient of such
    a layer has rank 1), (L, R, E, constants, rows, columns) with S = L R^T + E exactly to
    float64 rounding — L, R float32 factors, E = S − L R^T formed in float64 and kept in
    float32 (its norm is at most 1e-6 of S's, `_low_rank`'s check, ~1e-8 for one image's
    gradient, so float32 keeps it to ~1e-14 of S) at S's rows and columns that are not all zero
    (`_compacted`: rows and columns index them; L and R are zero at the others, so E is zero
    there) — and per victim the float64 constants (||L R^T||^2, <L R^T, E>, ||E||^2) (N, 3);
    else (S in float64 at those rows and columns, rows, columns)."""
    factors = _low_rank(s)
    kept, rows, columns = _compacted(s)
    if factors is None:
        return kept.double(), rows, columns
    # A zero row (column) of S has zero coefficients (basis entries) in the factors; set
    # exactly so, E is exactly zero outside the kept rows and columns.
    left = torch.where(_is_kept(rows, s.shape[1]).unsqueeze(2), factors[0], 0.0)
    right = torch.where(_is_kept(columns, s.shape[2]).unsqueeze(2), factors[1], 0.0)
    left_kept, right_kept = _picked_rows(left, rows), _picked_rows(right, columns)
    residuals, constants = [], []
    for start in range(0, s.shape[0], 16):  # float64 temporaries 16 victims at a time
        victims = slice(start, start + 16)
        l64, r64 = left_kept[victims].double(), right_kept[victims].double()
        product = torch.bmm(l64, r64.transpose(1, 2))
        residual = (kept[victims].double() - product).float()
        exact = residual.double()
        constants.append(torch.stack([
            (torch.bmm(l64.transpose(1, 2), l64) * torch.bmm(r64.transpose(1, 2), r64)).flatten(1).sum(1),
            (product * exact).flatten(1).sum(1), exact.square().flatten(1).sum(1)], dim=1))
        residuals.append(residual)
    empty = s.new_zeros(0, *kept.shape[1:])
    return (left.contiguous(), right.contiguous(), torch.cat(residuals) if residuals else empty,
            torch.cat(constants) if constants else s.new_zeros(0, 3, dtype=torch.float64), rows, columns)


def _is_kept(index: torch.Tensor, size: int) -> torch.Tensor:
    """`_compacted`'s kept indices (n, a') as a mask (n, size)."""
    return torch.zeros(index.shape[0], size + 1, dtype=torch.bool, device=index.device).scatter_(1, index, True)[:, :size]


def _picked_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (n, a, r) at `_compacted`'s kept indices of its rows (n, a'): zero rows where padded."""
    return F.pad(t, (0, 0, 0, 1)).gather(1, index.unsqueeze(2).expand(-1, -1, t.shape[2]))


def _compacted(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matrices m (N, a, b) without their all-zero rows and columns: (M (N, a', b'), rows
    (N, a'), columns (N, b')), M_i = m_i[rows_i][:, columns_i] — each victim's kept rows and
    columns in order, then (a victim that keeps fewer than the most) the index a (or b), of an
    appended zero, with zero entries. Products with M give those with m exactly (the terms
    left out are zeros; a NaN is kept). A one-position layer's shared gradient (and so its
    residual E) is zero in the row of every output whose ReLU was off and the column of every
    input that was zero: the CNN's last convolution keeps a third of its 64 x 800 per victim."""
    n, a, b = m.shape

    def kept(mask: torch.Tensor, size: int) -> torch.Tensor:  # (N, size) -> each row's kept indices, padded
        count = int(mask.sum(1).max()) if n else 0
        order = torch.where(mask, torch.arange(size, device=m.device), size)
        return order.sort(dim=1).values[:, :count].contiguous()

    nonzero = m != 0
    rows, columns = kept(nonzero.any(2), a), kept(nonzero.any(1), b)
    padded = F.pad(m, (0, 1, 0, 1))  # the appended zero row and column
    picked = padded.gather(1, rows.unsqueeze(2).expand(-1, -1, b + 1))
    return picked.gather(2, columns.unsqueeze(1).expand(-1, rows.shape[1], -1)).contiguous(), rows, columns


def _picked(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v (n, a) at `_compacted`'s kept indices (n, a'): the appended zero where padded."""
    return F.pad(v, (0, 1)).gather(1, index)


def _placed(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of `_picked`: values (n, a') at their indices of (n, size), zeros elsewhere
    (the kept indices are distinct; padding lands on the appended entry, dropped)."""
    return values.new_zeros(values.shape[0], size + 1).scatter(1, index, values)[:, :size]


def _rank_one_euclidean(g: torch.Tensor, u: torch.Tensor, shared: tuple[torch.Tensor, ...],
                        s_squared: torch.Tensor) -> dict:
    """A one-position layer's ||G − S||^2 per victim, G = g u^T (g (n, fan_out), u (n, fan_in)),
    without forming G. The terms nearly cancel where G nears S, so they are formed in float64:
    with S = L R^T + E (`_residual_layout`), ||g u^T − L R^T||^2 = |g|^2 |u|^2 − 2 (L^T g).(R^T u)
    + ||L R^T||^2 from the small factors, − 2 (g.(E u) − <L R^T, E>) + ||E||^2 with E u in
    float32 (E is small: its rounding is ~1e-13 of S's); or, S not of low rank, |g|^2 |u|^2 −
    2 g.(S u) + ||S||^2 from S in float64 (`s_squared`). E (or S) without its zero rows and
    columns (`_compacted`): one or two reads of a third of it (the CNN) instead of the
    materialised path's eight passes over G, and a distance closer to the exact one than
    float32's G − S (relative error ~1e-12 against ~1e-6 at ||G − S|| = 0.1 ||S||). Returns
    the float64 g, u, |g|^2, |u|^2, S u, g.(S u), g at E's kept rows and the distance
    (differentiable: the autograd path takes its gradient)."""
    g64, u64 = g.double(), u.double()
    gg, uu = g64.square().sum(1), u64.square().sum(1)
    *head, rows, columns = shared
    g_kept, u_kept = _picked(g, rows), _picked(u, columns)
    if len(head) == 1:
        su_kept = torch.bmm(head[0], u_kept.double().unsqueeze(2)).squeeze(2)  # S u at the kept rows
        dot = (g_kept.double() * su_kept).sum(1)
        distance = gg * uu - 2 * dot + s_squared
        return {"g64": g64, "u64": u64, "gg": gg, "uu": uu, "su": _placed(su_kept, rows, g.shape[1]), "dot": dot,
                "g_kept": g_kept, "distance": distance.clamp(min=0)}
    left, right, residual, constants = head
    from_g = torch.bmm(g64.unsqueeze(1), left.double()).squeeze(1)  # L^T g (n, r)
    from_u = torch.bmm(u64.unsqueeze(1), right.double()).squeeze(1)  # R^T u
    eu = torch.bmm(residual, u_kept.unsqueeze(2)).squeeze(2).double()  # E u at the kept rows
    factored = (from_g * from_u).sum(1)  # <g u^T, L R^T>
    small = (g_kept.double() * eu).sum(1)  # <g u^T, E>
    distance = (gg * uu - 2 * factored + constants[:, 0]) - 2 * (small - constants[:, 1]) + constants[:, 2]
    su = torch.bmm(left.double(), from_u.unsqueeze(2)).squeeze(2) + _placed(eu, rows, g.shape[1])  # L (R^T u) + E u
    return {"g64": g64, "u64": u64, "gg": gg, "uu": uu, "su": su, "dot": factored + small, "from_g": from_g,
            "g_kept": g_kept, "distance": distance.clamp(min=0)}


def _rank_one_terms(name: str, g: torch.Tensor, u: torch.Tensor, shared: tuple[torch.Tensor, ...], squares: dict,
                    cosine: bool, dots: dict, norms: dict, diffs: dict) -> dict:
    """A one-position layer's Euclidean terms (`_rank_one_euclidean`, g (n, fan_out, 1), u
    (n, fan_in, 1)) into `diffs` — and `norms`, `dots` where cosines are wanted too (a trace) —
    in the factors' dtype; returns `_rank_one_euclidean`'s float64 terms."""
    terms = _rank_one_euclidean(g.squeeze(2), u.squeeze(2), shared, squares[name])
    diffs[name] = terms["distance"].to(g.dtype)
    if cosine:
        norms[name] = (terms["gg"] * terms["uu"]).to(g.dtype)
        dots[name] = terms["dot"].to(g.dtype)
    return terms


def _shared_transpose_times(g: torch.Tensor, g64: torch.Tensor, shared: tuple[torch.Tensor, ...],
                            term: dict) -> torch.Tensor:
    """S^T g (n, fan_in) in float64 for `_rank_one_euclidean`'s layouts: R (L^T g) + E^T g, or
    from S in float64 (E, S: their kept rows and columns)."""
    *head, _, columns = shared
    size = term["u64"].shape[1]
    if len(head) == 1:
        return _placed(torch.bmm(term["g_kept"].double().unsqueeze(1), head[0]).squeeze(1), columns, size)
    left, right, residual, _ = head
    return (torch.bmm(right.double(), term["from_g"].unsqueeze(2)).squeeze(2)
            + _placed(torch.bmm(term["g_kept"].unsqueeze(1), residual).squeeze(1).double(), columns, size))


def _by_victim(t: torch.Tensor, per_victim: int) -> torch.Tensor:
    """A layer factor (n·M, fan, P) listed image by image as (n, fan, M·P): each victim's
    images' positions side by side (a copy; as it is when M = 1)."""
    if per_victim == 1:
        return t
    images, fan, positions = t.shape
    return t.reshape(images // per_victim, per_victim, fan, positions).transpose(1, 2).reshape(
        images // per_victim, fan, per_victim * positions)


def _by_image(t: torch.Tensor, per_victim: int) -> torch.Tensor:
    """The inverse of `_by_victim`: (n, fan, M·P) -> (n·M, fan, P)."""
    if per_victim == 1:
        return t
    victims, fan, positions = t.shape
    return t.reshape(victims, fan, per_victim, positions // per_victim).transpose(1, 2).reshape(
        victims * per_victim, fan, positions // per_victim)


def _low_rank(s: torch.Tensor, residual: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factors (L (N, m, r), R (N, k, r)) with S_i = L_i R_i^T to a relative (Frobenius) error
    below `residual` for every victim, when such an r is small enough for the factors to be
    cheaper than S; None otherwise. One image's gradient of a layer with P output positions
    has rank <= P (the CNN's last convolution and its classifier: 1) unless a defense adds
    noise. Found by Gram-Schmidt with pivoting on the longer side's vectors (a few passes over
    S, where an eigendecomposition per victim would cost more than the attack's first
    iterations), and checked on S itself, so a factorisation is only used where it is exact to
    float precision."""
    n, m, k = s.shape
    max_rank = (m * k) // (4 * (m + k))
    if max_rank < 1:
        return None
    wide = m <= k
    rows = s if wide else s.transpose(1, 2)  # (n, short, long): a basis of the long side's space
    total = s.flatten(1).norm(dim=1)
    remainder = rows  # rows - C span^T for the factors so far (replaced, never written in place)
    basis: list[torch.Tensor] = []
    alongs: list[torch.Tensor] = []
    victims = torch.arange(n, device=s.device)
    while True:
        if bool((remainder.flatten(1).norm(dim=1) <= residual * total).all()):
            break
        if len(basis) == max_rank:
            return None
        vector = remainder[victims, remainder.norm(dim=2).argmax(1)]  # the largest remaining row
        for previous in basis:  # re-orthogonalise (modified Gram-Schmidt)
            vector = vector - (vector * previous).sum(1, keepdim=True) * previous
        vector = vector / vector.norm(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
        basis.append(vector)
        along = (remainder * vector.unsqueeze(1)).sum(2, keepdim=True)  # (element-wise: a batched
        remainder = torch.addcmul(remainder, along, vector.unsqueeze(1), value=-1)  # matrix-vector product is slow on CPU)
        alongs.append(along)
    # The residual checked is S minus the factors' product as computed: rows = C span^T + remainder.
    if not basis:  # every shared gradient is zero
        basis.append(torch.zeros_like(rows[:, 0]))
        alongs.append(torch.zeros_like(rows[:, :, :1]))
    span = torch.stack(basis, dim=2)  # (n, long, r), orthonormal columns
    coefficients = torch.cat(alongs, dim=2)  # (n, short, r)
    return (coefficients, span) if wide else (span, coefficients)


def _patches(a: torch.Tensor, args: dict, buffer: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """F.unfold(a, **args) — (n, C k_h k_w, P) — by a strided copy (a slice when the kernel
    covers the input once), with a fold (col2im) as its backward; without autograd (`buffer`
    given) the copy goes into buffer(shape)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = args["kernel_size"], args["dilation"], args["padding"], args["stride"]
    n, _, height, width = a.shape
    if ph == 0 and pw == 0:
        out_h = (height - dh * (kh - 1) - 1) // sh + 1
        out_w = (width - dw * (kw - 1) - 1) // sw + 1
        if out_h == 1 and out_w == 1:
            return a[:, :, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw].reshape(n, -1, 1)
    if buffer is not None and not torch.is_grad_enabled():
        return _unfold(a, args, buffer)
    return _Unfold.apply(a, args)


class _Unfold(torch.autograd.Function):
    """F.unfold with a faster forward on CPU (Tensor.unfold views and one copy where dilation
    is 1) and F.fold as its backward; twice differentiable through `_Fold`."""

    @staticmethod
    def forward(ctx, a, args):
        ctx.args = args
        ctx.size = a.shape[-2:]
        return _unfold(a, args)

    @staticmethod
    def backward(ctx, grad):
        return _Fold.apply(grad, ctx.size, ctx.args), None


class _Fold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cols, size, args):
        ctx.args = args
        return F.fold(cols, tuple(size), **args)

    @staticmethod
    def backward(ctx, grad):
        return _Unfold.apply(grad, ctx.args), None, None


def _unfold(a: torch.Tensor, args: dict, buffer: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """F.unfold(a, **args) on a CPU as a copy into `buffer(shape)` where given: by strided
    windows where output rows are long, else (short rows, e.g. the CNN's second layer's 5, or
    a dilation) one index_select of every column from the flattened (padded) input, whose
    copy is not per row (conv 2 at 100 victims: 0.4 against 0.6 ms; the image's 14-position
    rows copy faster by windows)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = args["kernel_size"], args["dilation"], args["padding"], args["stride"]
    if a.device.type != "cpu":
        return F.unfold(a, **args)
    n, channels, height, width = a.shape
    out_h, out_w = _output_size(height, width, args)
    shape = (n, channels * kh * kw, out_h * out_w)
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    if out_w < 8 or dh != 1 or dw != 1:
        flat, index = a.reshape(n * channels, -1), _fold_index(height, width, args)
        if buffer is None:
            return flat.index_select(1, index).view(shape)
        out = buffer(shape)
        torch.index_select(flat, 1, index, out=out.view(n * channels, -1))
        return out
    windows = a.unfold(2, kh, sh).unfold(3, kw, sw)  # (n, C, H_out, W_out, kh, kw), a view
    columns = windows.permute(0, 1, 4, 5, 2, 3)
    if buffer is None:
        return columns.reshape(shape)
    out = buffer(shape)
    out.view(columns.shape).copy_(columns)
    return out


class _ConvThroughPatches(torch.autograd.Function):
    """z = conv2d(a, W, b), computed by the library convolution, whose gradient is taken as
    that of z = W U + b w.r.t. the unfolded input U (none w.r.t. a: it reaches a through U).
    The backward is differentiable (for the second backward to the image)."""

    @staticmethod
    def forward(ctx, a, u, weight, bias, args):
        ctx.save_for_backward(weight)
        return F.conv2d(a, weight, bias, args["stride"], args["padding"], args["dilation"])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        n, out_channels = grad.shape[:2]
        matrix = weight.reshape(out_channels, -1)
        grad = grad.reshape(n, out_channels, -1)
        if grad.shape[2] == 1:  # one position: a single matmul over the victims
            grad_u = (grad.squeeze(2) @ matrix).unsqueeze(2)
        else:
            grad_u = torch.matmul(matrix.t(), grad)
        return None, grad_u, None, None, None


def _chain_ops(net: nn.Module, factored: list[_Layer], shapes: dict, target) -> list[tuple] | None:
    """The model as a flat list of ("layer", _Layer), ("relu",), ("flatten",) ops, when it is
    nothing but Conv2d / Linear (on vectors) / ReLU / Flatten / Identity in Sequentials and empty
    Slots, and that list reproduces the model's output; None otherwise (the autograd path)."""
    by_module = {id(layer.module): layer for layer in factored}
    ops: list[tuple] = []

    def walk(module: nn.Module) -> bool:
        kind = type(module)
        if kind is nn.Sequential:
            return all(walk(child) for child in module)
        if kind is Slot:
            return walk(module.body)
        if _factored(module):
            if id(module) not in by_module:
                return False
            ops.append(("layer", by_module[id(module)]))
            return True
        if kind is nn.ReLU:
            ops.append(("relu",))
            return True
        if kind is nn.Flatten:
            if module.start_dim != 1 or module.end_dim != -1:
                return False
            ops.append(("flatten",))
            return True
        return kind is nn.Identity

    if not walk(net) or not any(op[0] == "layer" and (op[1].weight or op[1].bias) for op in ops):
        return None
    if len({id(op[1]) for op in ops if op[0] == "layer"}) != len(factored):
        return None
    state = {**target.params, **target.frozen}
    try:
        with torch.no_grad():
            x = torch.rand((2, *target.input_shape), generator=torch.Generator().manual_seed(0)).to(target.device)
            expected = functional_call(net, state, (x,))
            h = x
            for op in ops:
                if op[0] == "layer":
                    layer = op[1]
                    prefix = f"{layer.name}." if layer.name else ""
                    weight = state[f"{prefix}weight"]
                    bias = state.get(f"{prefix}bias") if layer.module.bias is not None else None
                    if layer.unfold is not None:
                        if h.dim() != 4:
                            return None
                        args = layer.unfold
                        h = F.conv2d(h, weight, bias, args["stride"], args["padding"], args["dilation"])
                    else:
                        if h.dim() != 2:
                            return None
                        h = F.linear(h, weight, bias)
                elif op[0] == "relu":
                    h = torch.relu(h)
                else:
                    h = h.flatten(1)
    except Exception:  # noqa: BLE001 — anything odd: the autograd path handles it
        return None
    if h.dim() != 2 or h.shape != expected.shape or not torch.allclose(h, expected, rtol=1e-4, atol=1e-5):
        return None
    return ops


def _covers(args: dict, size) -> bool:
    """Whether the kernel covers an input of spatial `size` exactly once (one output position,
    no padding, no dilation): the convolution is then a Linear on the flattened input."""
    return (args["padding"] == (0, 0) and args["dilation"] == (1, 1) and tuple(size) == args["kernel_size"])


#: Up to this many unfolded-input elements (victims x fan-in x positions) a convolution's
#: input gradient or forward on a CPU goes through the unfolded input and one matmul rather
#: than the library's (transposed) convolution, whose set-up dominates for a few victims (the
#: CNN's conv 2, one victim: transposed 186 against 58 us, forward 117 against 60 us; from
#: about 16 victims the library is faster).
_FEW_COLUMNS = 2**17


def _output_size(height: int, width: int, args: dict) -> tuple[int, int]:
    """The output rows and columns of a convolution (`args`: F.unfold's) of a height x width input."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = args["kernel_size"], args["dilation"], args["padding"], args["stride"]
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _columns(shape, weight: torch.Tensor, args: dict) -> int:
    """Elements of the unfolded input of a convolution of input `shape`: n x fan-in x positions."""
    rows, columns = _output_size(shape[2], shape[3], args)
    return shape[0] * weight[0].numel() * rows * columns


def _conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: dict,
          patches: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(h, weight, bias); on a CPU, where h's unfolded patches (n, fan_in, P) are at hand,
    as W U + b: one matmul, 2-6x as fast as oneDNN's convolution for a few victims (whose
    weight reorder and set-up dominate: ~100 us a call for the CNN's layers) and as fast or
    faster for 128 (conv 2: 0.42 against 0.66 ms)."""
    if _covers(args, h.shape[-2:]):
        return F.linear(h.flatten(1), weight.flatten(1), bias).view(h.shape[0], -1, 1, 1)
    if patches is not None and h.device.type == "cpu":
        rows, columns = _output_size(h.shape[2], h.shape[3], args)
        out = torch.matmul(weight.flatten(1), patches)
        if bias is not None:
            out = out.add_(bias.view(1, -1, 1))
        return out.view(h.shape[0], weight.shape[0], rows, columns)
    return F.conv2d(h, weight, bias, args["stride"], args["padding"], args["dilation"])


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale x the batched product a b, the scale applied by the matmul itself (alpha)."""
    if scale == 1.0:
        return torch.bmm(a, b)
    return torch.baddbmm(a.new_empty(a.shape[0], a.shape[1], b.shape[2]), a, b, beta=0, alpha=scale)


def _conv_input_grad(grad: torch.Tensor, shape: torch.Size, weight: torch.Tensor, args: dict,
                     cols: torch.Tensor | tuple[torch.Tensor, torch.Tensor, float] | None,
                     buffer: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """The gradient w.r.t. a convolution's input of shape `shape` from its output gradient
    `grad`, plus the fold of `cols` (n, fan_in, P), a gradient w.r.t. its unfolded input, or of
    the batched product c A B where `cols` is (A, B, c). Where A B is formed here anyway, or the input
    has few channels (an image: the library's transposed convolution is slow there, ~3 ms for
    the CNN's first layer at 128 victims on a 2-core CPU), as one fold of W^T grad + A B, formed
    in `buffer` where given; else by the library's transposed convolution (plus the fold of
    `cols`)."""
    if _covers(args, shape[-2:]):
        out = grad.flatten(1) @ weight.flatten(1)
        if cols is not None:
            out = out.add_((_scaled_bmm(*cols) if isinstance(cols, tuple) else cols).flatten(1))
        return out.view(shape)
    few = grad.device.type == "cpu" and _columns(shape, weight, args) <= _FEW_COLUMNS
    if isinstance(cols, tuple) or weight.shape[1] < 8 or few:
        # (torch.matmul of a matrix and a batch would transpose and copy: a batched matmul of W^T expanded)
        weight_t, flat = weight.flatten(1).t().expand(grad.shape[0], -1, -1), grad.flatten(2)
        if buffer is None:
            unfolded = torch.bmm(weight_t, flat)
        else:
            unfolded = torch.bmm(weight_t, flat, out=buffer((flat.shape[0], weight_t.shape[1], flat.shape[2])))
        if isinstance(cols, tuple):
            unfolded = unfolded.baddbmm_(cols[0], cols[1], alpha=cols[2])
        elif cols is not None:
            unfolded = unfolded.add_(cols)
        return _fold(unfolded, shape, args)
    out = _transposed_conv(grad, shape, weight, args)
    if cols is not None:
        out = out.add_(_fold(cols, shape, args))
    return out


def _transposed_conv(grad: torch.Tensor, shape: torch.Size, weight: torch.Tensor, args: dict) -> torch.Tensor:
    """The convolution's input gradient, conv2d_input(shape, weight, grad): as a transposed
    convolution, which needs no input tensor (conv2d_input hands the library an expanded one
    that it copies whole, ~0.6 ms a call for the CNN's second layer at 128 victims)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = args["kernel_size"], args["dilation"], args["padding"], args["stride"]
    rows = (grad.shape[2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1
    columns = (grad.shape[3] - 1) * sw - 2 * pw + dw * (kw - 1) + 1
    return F.conv_transpose2d(grad, weight, None, (sh, sw), (ph, pw), (shape[2] - rows, shape[3] - columns), 1, (dh, dw))


#: Per (input height, width, F.unfold args): where each column of an unfolded input lands in
#: the (padded) input, flattened — the index `_fold` adds the columns to on a CPU.
_FOLD_INDEX: dict = {}


def _fold_index(height: int, width: int, args: dict) -> torch.Tensor:
    """For an input of spatial size height x width (padded by args' padding), the flat padded
    position of every (kernel offset, output position) column of F.unfold, kernel offsets
    outermost as F.unfold lists them: (k_h k_w P,) int64."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = args["kernel_size"], args["dilation"], args["padding"], args["stride"]
    key = (height, width, kh, kw, dh, dw, ph, pw, sh, sw)
    index = _FOLD_INDEX.get(key)
    if index is None:
        padded_w = width + 2 * pw
        out_h, out_w = _output_size(height, width, args)
        rows = (torch.arange(kh) * dh).view(kh, 1, 1, 1) + (torch.arange(out_h) * sh).view(1, 1, out_h, 1)
        columns = (torch.arange(kw) * dw).view(1, kw, 1, 1) + (torch.arange(out_w) * sw).view(1, 1, 1, out_w)
        index = _FOLD_INDEX[key] = (rows * padded_w + columns).reshape(-1)
    return index


def _fold(cols: torch.Tensor, shape: torch.Size, args: dict) -> torch.Tensor:
    """F.fold(cols, shape[-2:], **args) (col2im). On a CPU by one index_add_ of every column
    into the flattened (padded) input of each (image, channel): the same additions in the same
    order as PyTorch's col2im (kernel offsets in turn, from zero: bit for bit its result), at
    a third to a quarter of its time or of strided adds per kernel offset (the CNN at 100
    victims, 2 threads: its image 0.7 against 1.8 ms, its second layer's input 0.5 against
    1.8). On a GPU the library's (index_add_ there adds atomically, in no fixed order)."""
    (kh, kw), (dh, dw), (ph, pw) = args["kernel_size"], args["dilation"], args["padding"]
    n, channels, height, width = shape
    if ph == 0 and pw == 0 and cols.shape[2] == 1 and height == dh * (kh - 1) + 1 and width == dw * (kw - 1) + 1:
        if dh == 1 and dw == 1:  # the kernel covers the input once
            return cols.reshape(shape)
    if cols.device.type != "cpu":
        return F.fold(cols, (height, width), **args)
    padded = (height + 2 * ph, width + 2 * pw)
    out = cols.new_zeros(n * channels, padded[0] * padded[1])
    out.index_add_(1, _fold_index(height, width, args), cols.reshape(n * channels, -1))
    out = out.view(n, channels, *padded)
    if ph or pw:
        out = out[:, :, ph : ph + height, pw : pw + width]
    return out


def _squares(flat: torch.Tensor) -> torch.Tensor:
    """Row-wise sums of squares of a (n, k) tensor, in one pass (a batched matrix-vector
    product, the obvious alternative, is several times slower on CPU)."""
    return torch.linalg.vector_norm(flat, dim=1).square()


def _cosine_from(dot: torch.Tensor, norm_sq: torch.Tensor, shared_sq: torch.Tensor) -> torch.Tensor:
    return dot / (norm_sq.sqrt() * shared_sq.sqrt() + 1e-12)
