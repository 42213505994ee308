"""Built-in attacks: Inverting Gradients as the paper configures it, the paper's "Ignore"
attack, the L-BFGS family (DLG, iDLG, CPL) and the analytic attack on a biased FC layer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from gileak import Attack, hookimpl
from gileak.errors import NotApplicableError, ParamsError


def _labels(target, mode: str, attack: str):
    """The labels an attack works with, listed image by image: the ones the threat model
    grants, or recovered analytically from each victim's upload in gradient units — one
    image's label (iDLG), or the multiset of a batch's labels (`recover_label_counts`, repeats
    included), handed to the victim's dummies in sorted order."""
    if mode == "recover":
        from gileak.engine.labels import recover_label_counts, recover_labels, resize_label_multisets

        shared = target.shared_in_gradient_units()
        try:
            if target.images_per_victim == 1 and (target.client is None or target.client.labels_per_upload() == 1):
                return recover_labels(target.net, shared, target.input_shape)
            counted = target.client.labels_per_upload()
            found = recover_label_counts(target.net, shared, target.input_shape, counted,
                                         pixel_range=target.pixel_range)
            return resize_label_multisets(found, target.images_per_victim).reshape(-1)
        except ValueError as e:
            raise NotApplicableError(f"{attack} cannot recover labels: {e}") from e
    if target.labels is None:
        raise NotApplicableError(f"{attack} needs the victims' labels and the threat model did not grant them; "
                                 "use labels=recover")
    return target.labels


def _layer_names(value: Any) -> Any:
    """"8.body.0.decoder+10" or ["8.body.0.decoder", 10] -> ("8.body.0.decoder", "10")."""
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ValueError("give layer names, e.g. exclude=10 or exclude=8.body.0.decoder+10")
    if isinstance(value, (int, str)):
        value = str(value).split("+")
    if isinstance(value, (list, tuple)):
        names = tuple(part.strip() for v in value for part in str(v).split("+"))
        if any(not name for name in names):
            raise ValueError("an empty layer name: join names with a single '+', e.g. 8.body.0.decoder+10")
        if len(set(names)) != len(names):
            raise ValueError(f"a layer is named twice: {'+'.join(names)}")
        return names
    return value


#: Layer names joined by '+' (paper Table I: the gradients an attack leaves out).
LayerNames = Annotated[tuple[str, ...], BeforeValidator(_layer_names)]
EXCLUDE_HELP = ("layers whose gradients are not matched, joined by '+': module names as `gileak inspect` prints "
                "them (e.g. 10, or 8.body.0.decoder: every parameter below it) or parameter names (10.bias)")


def _excluded(net, names: tuple[str, ...], attack: str) -> set[str]:
    """The trainable parameters `names` cover: a parameter by its name, a module by every
    trainable parameter below it. An unknown name is a ParamsError listing the layers there are."""
    trainable = [name for name, param in net.named_parameters() if param.requires_grad]
    owners = {name: module for name, module in net.named_modules()
              if name and any(p.requires_grad for p in module.parameters())}
    covered: set[str] = set()
    unknown = []
    for name in names:
        if name in owners:
            covered.update(n for n in trainable if n.startswith(name + "."))
        elif name in trainable:
            covered.add(name)
        else:
            unknown.append(name)
    if unknown:
        import difflib

        layers = [name for name, module in owners.items()
                  if any(p.requires_grad for p in module.parameters(recurse=False))]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, layers + trainable, n=1)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ParamsError(
            f"{attack}: exclude names no layer of this model: {', '.join(hints)}. Its layers with parameters, "
            f"as `gileak inspect` prints them: {', '.join(layers)} (a parameter name such as {trainable[0]}, "
            "or a container of layers, works too).")
    return covered


def _kept(net, input_shape, ignore_stochastic: bool, exclude: tuple[str, ...],
          attack: str) -> tuple[tuple[str, ...] | None, str]:
    """The gradients matched: all, or — ignoring stochastic gradients (paper Eq. 4) — only those
    of the layers that run before the decoder of the first stochastic module that runs, found
    by tracing the forward pass; minus the `exclude`d layers (paper Table I)."""
    trainable = [name for name, param in net.named_parameters() if param.requires_grad]
    kept: list[str] | None = None
    note = ""
    if ignore_stochastic:
        from gileak.nets import first_stochastic_cut

        cut = first_stochastic_cut(net, input_shape)
        if cut is None:
            note = f"{attack}: the model has no stochastic module, so nothing was cut"
        elif not cut:
            raise NotApplicableError(f"{attack}: the first stochastic module's decoder is the first layer; "
                                     "there is no gradient left to match")
        else:
            kept = cut
    if exclude:
        dropped = _excluded(net, exclude, attack)
        kept = [name for name in (kept if kept is not None else trainable) if name not in dropped]
        if not kept:
            after_cut = " after the cut before the stochastic decoder" if ignore_stochastic else ""
            raise ParamsError(f"{attack}: exclude={'+'.join(exclude)} leaves no gradient to match{after_cut}")
    if kept is None:
        return None, f"{note}; all gradients were matched" if note else ""
    excluded = f" (excluded: {', '.join(exclude)})" if exclude else ""
    matched = f"{attack}: matched {len(kept)} of {len(trainable)} parameter gradients{excluded}"
    return tuple(kept), f"{note}; {matched}" if note else matched


def _check_subsets(attack: str, build, input_shape, ignore_stochastic: bool, exclude: tuple[str, ...]) -> None:
    """Plan-time check of exclude= (and its composition with the cut) on the defended model
    `build()` gives: an unknown name or nothing left to match is a ParamsError before anything runs."""
    if not exclude:
        return
    try:
        _kept(build(), input_shape, ignore_stochastic, exclude, attack)
    except NotApplicableError:
        pass  # not the user's to fix: the run reports the row as not applicable, with the reason


LabelMode = Literal["known", "recover"]
#: The paper's iteration cap (Section V-B); IG's patiences are given relative to it.
PAPER_ITERATIONS = 20_000
#: Learning-rate schedules of `ig` and `ignore` (docs/attack-strength.md compares them).
Schedule = Literal["paper", "plateau", "step", "cosine"]
#: The fixed patiences of schedule=plateau.
FIXED_PLATEAU, FIXED_STOP = 100, 1000
#: The paper's protocol (V-B), which `--profile paper` selects: the defaults below are the
#: strongest at every cap under the paper's 20,000 (docs/attack-strength.md).
PAPER_PROTOCOL = {"schedule": "paper", "lr": 1.0, "tv": 0.01}


class _IGParams(Attack.Params):
    schedule: Schedule = Field("cosine", description="learning-rate schedule: cosine (decay to 0 over the cap; the "
                               "strongest at small caps), paper (lr x0.1 after a plateau of 2% of the cap, stop "
                               "after 20% without a better loss: the paper's 400 and 4,000 of 20,000; --profile "
                               "paper's), plateau (the same rule with fixed patiences, 100 and 1,000) or step "
                               "(Inverting Gradients' own: lr x0.1 at 3/8, 5/8 and 7/8 of the cap)")
    lr: float = Field(0.1, gt=0, description="Adam's initial learning rate (paper: 1, --profile paper's)")
    tv: float = Field(0.05, ge=0, description="weight of the total-variation prior (paper: 0.01, --profile paper's)")
    signed: bool = Field(True, description="step on the sign of the image gradient (authors' code)")
    plateau: int | None = Field(None, ge=1, description="schedule paper or plateau: iterations without improvement "
                                "before lr x 0.1; none = 2% of the cap, at least 10 (paper) or 100 (plateau)")
    stop_patience: int | None = Field(None, ge=1, description="stop a victim after this many iterations without "
                                      "improvement; none = 20% of the cap, at least 50 (paper), 1,000 (plateau), "
                                      "never (step, cosine)")
    min_loss: float = Field(1e-5, ge=0, description="stop a victim once its loss is below this")
    labels: LabelMode = Field("known", description="known (threat model of V-B) or recover (iDLG)")

    @model_validator(mode="after")
    def _plateau_needs_a_plateau_schedule(self):
        if self.plateau is not None and self.schedule not in ("paper", "plateau"):
            raise ValueError(f"plateau={self.plateau} applies to schedule=paper or schedule=plateau; "
                             f"schedule={self.schedule} sets the learning rate by the iteration's place in the cap")
        return self


class InvertingGradients(Attack):
    """Cosine distance + total-variation prior, signed Adam with a per-victim learning-rate schedule."""

    name = "ig"
    description = ("Inverting Gradients: cosine distance + TV prior, signed Adam; cosine lr schedule "
                   "(--profile paper: the paper's plateau schedule, V-B).")
    handles_clients = True

    class Params(_IGParams):
        ignore_stochastic: bool = Field(False, description="match only gradients before the first stochastic decoder")
        exclude: LayerNames = Field((), description=EXCLUDE_HELP)

    #: `--profile paper` runs the paper's protocol (V-B) unless the user's reference says otherwise.
    profile_params = {"paper": PAPER_PROTOCOL}
    ignore_stochastic_always = False

    def _ignores(self) -> bool:
        return self.ignore_stochastic_always or getattr(self.params, "ignore_stochastic", False)

    def check(self, build, input_shape) -> None:
        _check_subsets(self.name, build, input_shape, self._ignores(), self.params.exclude)

    def config(self, keep=None, trace: bool = False, max_iterations: int = PAPER_ITERATIONS):
        """The engine's settings for a cap of `max_iterations`. schedule=paper is the paper's rule
        (plateau 400, stop after 4,000 flat iterations, cap 20,000), its patiences keeping their
        share of a smaller cap unless given explicitly."""
        from gileak.engine import MatchingConfig

        p = self.params
        kind, plateau, stop = "plateau", 400, 10**9
        if p.schedule == "paper":
            scale = max_iterations / PAPER_ITERATIONS
            plateau = p.plateau or max(10, round(400 * scale))
            stop = p.stop_patience or max(50, round(4000 * scale))
        elif p.schedule == "plateau":
            plateau, stop = p.plateau or FIXED_PLATEAU, p.stop_patience or FIXED_STOP
        else:
            kind, stop = p.schedule, p.stop_patience or stop
        return MatchingConfig(distance="cosine", tv_weight=p.tv, lr=p.lr, signed=p.signed, schedule=kind,
                              plateau_patience=plateau, stop_patience=stop, min_loss=p.min_loss,
                              keep=keep, trace=trace)

    def schedule_text(self, max_iterations: int) -> str:
        """The schedule at a cap, in words (for --dry-run)."""
        config = self.config(max_iterations=max_iterations)
        stop = "" if config.stop_patience >= max_iterations else \
            f", stop after {config.stop_patience:,} iterations without a better loss"
        if config.schedule == "plateau":
            how = f"x0.1 after {config.plateau_patience:,} iterations without a better loss"
        elif config.schedule == "step":
            how = "x0.1 at iterations " + ", ".join(f"{int(max_iterations // d):,}" for d in (2.667, 1.6, 1.142))
        else:
            how = "cosine-decayed to 0 over the cap"
        return f"schedule={self.params.schedule}: Adam lr {config.lr:g} {how}{stop}; TV {config.tv_weight:g}"

    def attack(self, target, *, seeds, max_iterations, progress=None):
        from gileak.engine import gradient_matching

        labels = _labels(target, self.params.labels, self.name)
        keep, note = _kept(target.net, target.input_shape, self._ignores(), self.params.exclude, self.name)
        result = gradient_matching(target, self.config(keep, target.trace, max_iterations), seeds=seeds,
                                   max_iterations=max_iterations, labels=labels, progress=progress)
        result.note = note
        result.labels_known = self.params.labels == "known"
        return result


class Ignore(InvertingGradients):
    """IG that omits the gradients of the first stochastic module's decoder and every later
    layer (paper Section III-B, Eq. 4)."""

    name = "ignore"
    description = "The paper's Ignore attack: IG matching only the gradients before the first stochastic decoder."
    ignore_stochastic_always = True

    class Params(_IGParams):
        exclude: LayerNames = Field((), description=EXCLUDE_HELP + "; composes with the cut")


class DLG(Attack):
    """Deep Leakage from Gradients (Zhu et al. 2019): Euclidean distance, L-BFGS, dummy labels."""

    name = "dlg"
    description = "DLG: Euclidean gradient distance, L-BFGS, dummy labels optimised with the image."
    handles_clients = True

    class Params(Attack.Params):
        lr: float = Field(1.0, gt=0, description="L-BFGS learning rate")
        line_search: int = Field(25, ge=0, description="strong-Wolfe line search: trial evaluations per iteration at most "
                                 "(0: one trial, kept or not: torch's LBFGS(max_iter=1) default, which stalls)")
        labels: Literal["optimise", "known", "recover"] = Field(
            "optimise", description="optimise dummy labels (DLG), known, or recover (iDLG)")
        ignore_stochastic: bool = Field(False, description="match only gradients before the first stochastic decoder")
        exclude: LayerNames = Field((), description=EXCLUDE_HELP)

    label_weight = 0.0

    def check(self, build, input_shape) -> None:
        _check_subsets(self.name, build, input_shape, self.params.ignore_stochastic, self.params.exclude)

    def lbfgs_config(self, keep):
        from gileak.engine.lbfgs import LBFGSConfig

        return LBFGSConfig(lr=self.params.lr, keep=keep, optimise_labels=self.params.labels == "optimise",
                           label_weight=self.label_weight, line_search_evals=self.params.line_search)

    def attack(self, target, *, seeds, max_iterations, progress=None):
        from gileak.engine.lbfgs import lbfgs_matching

        labels = None if self.params.labels == "optimise" else _labels(target, self.params.labels, self.name)
        keep, note = _kept(target.net, target.input_shape, self.params.ignore_stochastic, self.params.exclude,
                           self.name)
        result = lbfgs_matching(target, self.lbfgs_config(keep), seeds=seeds, max_iterations=max_iterations,
                                labels=labels, progress=progress)
        result.note = note
        result.labels_known = self.params.labels == "known"
        return result


class IDLG(DLG):
    """Improved DLG (Zhao et al. 2020): labels recovered analytically first, then DLG."""

    name = "idlg"
    description = "iDLG: labels recovered from the classifier's gradient, then DLG (Euclidean, L-BFGS)."

    class Params(Attack.Params):
        lr: float = Field(1.0, gt=0, description="L-BFGS learning rate")
        line_search: int = Field(25, ge=0, description="strong-Wolfe line search: trial evaluations per iteration at most "
                                 "(0: one trial, kept or not: torch's LBFGS(max_iter=1) default, which stalls)")
        labels: LabelMode = Field("recover", description="recover (iDLG) or known")
        ignore_stochastic: bool = Field(False, description="match only gradients before the first stochastic decoder")
        exclude: LayerNames = Field((), description=EXCLUDE_HELP)


class CPL(DLG):
    """Wei et al. 2020 (CPL): DLG plus a label-based regulariser, ||softmax(F(x')) − y||²."""

    name = "cpl"
    description = "CPL: L-BFGS gradient matching + label regulariser ||softmax(F(x')) - y||^2 (Wei et al.)."

    class Params(Attack.Params):
        lr: float = Field(1.0, gt=0, description="L-BFGS learning rate")
        line_search: int = Field(25, ge=0, description="strong-Wolfe line search: trial evaluations per iteration at most "
                                 "(0: one trial, kept or not: torch's LBFGS(max_iter=1) default, which stalls)")
        label_weight: float = Field(0.01, ge=0, description="weight of the label-based regulariser")
        labels: LabelMode = Field("recover", description="recover (from the gradient) or known")
        ignore_stochastic: bool = Field(False, description="match only gradients before the first stochastic decoder")
        exclude: LayerNames = Field((), description=EXCLUDE_HELP)

    def lbfgs_config(self, keep):
        from gileak.engine.lbfgs import LBFGSConfig

        return LBFGSConfig(lr=self.params.lr, keep=keep, label_weight=self.params.label_weight,
                           line_search_evals=self.params.line_search)


class Analytic(Attack):
    """Closed form (paper Supplementary): for a fully connected layer y = Wx + b,
    dL/dW_i = dL/db_i · x^T, so x = dL/dW_i / dL/db_i for any row i with dL/db_i ≠ 0."""

    name = "analytic"
    description = "Analytic: the input of the first biased FC layer in closed form, x = (dL/db_i)^-1 dL/dW_i."

    def attack(self, target, *, seeds, max_iterations, progress=None):
        import math

        import torch
        from torch import nn

        from gileak.base import Reconstruction
        from gileak.nets import forward_order

        if target.client is not None and not target.client.is_single_image_gradient():
            raise NotApplicableError("analytic solves one image from one gradient step; a batch, a local update "
                                     "or an aggregate mixes several images in every row of the gradient")
        modules = dict(target.net.named_modules())
        order = forward_order(target.net, target.input_shape)
        layer_name = None
        for name in order:
            prefix = name.rsplit(".", 1)[0] if "." in name else ""
            module = modules.get(prefix)
            if isinstance(module, nn.Linear) and module.bias is not None and module.bias.requires_grad:
                layer_name = prefix
                break
        if layer_name is None:
            raise NotApplicableError("analytic needs a fully connected layer with a bias; this model has none "
                                     "(e.g. after `nobias`)")
        first = order[0].rsplit(".", 1)[0] if "." in order[0] else ""
        layer = modules[layer_name]
        if first != layer_name or layer.in_features != math.prod(target.input_shape):
            raise NotApplicableError(
                f"analytic recovers the input of the first biased FC layer ('{layer_name}'), but layers run "
                "before it, so its input is a feature vector, not the image; it applies to models whose first "
                "layer is fully connected (e.g. an MLP)")
        weight = target.shared_gradient[f"{layer_name}.weight"]  # (N, out, in)
        bias = target.shared_gradient[f"{layer_name}.bias"]  # (N, out)
        row = bias.abs().argmax(dim=1)
        picked_bias = bias.gather(1, row.view(-1, 1))
        if bool((picked_bias == 0).any()):
            raise NotApplicableError("analytic: a victim's bias gradient is all zero, so its input cannot be solved")
        picked_weight = weight[torch.arange(weight.shape[0]), row]
        images = (picked_weight / picked_bias).view(-1, *target.input_shape)
        if progress is not None:
            progress(max_iterations)
        return Reconstruction(images=images.detach().cpu(), iterations=[1] * len(images),
                              final_loss=[0.0] * len(images), note="closed form: one division per victim")


@hookimpl
def register_attacks(register):
    for attack in (InvertingGradients, Ignore, DLG, IDLG, CPL, Analytic):
        register(attack)
