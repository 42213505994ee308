"""Base classes of the five component kinds; plugins subclass these and register them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from gileak.errors import ParamsError

if TYPE_CHECKING:  # heavy imports stay out of `gileak --help`
    import torch
    from torch import nn

    from gileak.threat import Target


class _Required:
    """Marks a parameter without a default in `parameter_table` (None is a legitimate default)."""

    def __repr__(self) -> str:
        return "(required)"


REQUIRED = _Required()

NON_FINITE = "must be a finite number, not NaN or infinity"


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, BaseModel):
        return bool(non_finite_fields(value))
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_has_non_finite(v) for v in value)
    return False


def non_finite_fields(params: BaseModel) -> list[str]:
    """Fields of `params` holding a NaN or infinite float (nested in containers too), except
    those declared with `Field(..., allow_inf_nan=True)`."""
    found = []
    for name, info in type(params).model_fields.items():
        if any(getattr(meta, "allow_inf_nan", None) is True for meta in info.metadata):
            continue
        if _has_non_finite(getattr(params, name, None)):
            found.append(name)
    return found


class Component:
    """A named, parameterised piece of a benchmark. Subclasses set `name` and `description`."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Parameter values a `--profile` gives this component where the user's reference does not
    #: set them, e.g. {"paper": {"schedule": "paper"}}: the profile's protocol rather than the
    #: everyday default. They are part of the component's identity like any parameter.
    profile_params: ClassVar[dict[str, dict[str, Any]]] = {}

    class Params(BaseModel):
        # A NaN or infinite parameter never means what the user wanted (dp(sigma=inf) would hang
        # the accountant, a weight of inf turns every loss into NaN). A field that does mean it
        # says so: Field(..., allow_inf_nan=True).
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def __init__(self, **params: Any) -> None:
        allowed = ", ".join(self.Params.model_fields) or "none"
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors()
            )
            raise ParamsError(
                f"Bad parameters for {self.kind} '{self.name}': {problems}. Parameters it takes: {allowed}."
            ) from e
        # Checked again on the validated values, so a plugin whose Params does not derive from
        # this one (or overrides its config) is held to the same rule.
        problems = [f"{field}: {NON_FINITE}" for field in non_finite_fields(self.params)]
        if problems:
            raise ParamsError(f"Bad parameters for {self.kind} '{self.name}': {'; '.join(problems)}. "
                              f"Parameters it takes: {allowed}.")

    @classmethod
    def parameter_table(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) of every parameter, for `gileak list`."""
        rows = []
        for pname, info in cls.Params.model_fields.items():
            annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            default = REQUIRED if info.is_required() else info.default
            rows.append((pname, annotation, default, info.description or ""))
        return rows

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset declares without loading any pixel: shape (C, H, W) and class count, and,
    when known, how many images `load()` puts in each split (the plan checks budgets against
    them: --victims against the attacked client's share, training against an empty test split)."""

    shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] = ()
    train_size: int | None = None
    test_size: int | None = None


@dataclass
class Splits:
    """Images in [0, 1] as float tensors (N, C, H, W) and integer labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...] = field(default_factory=tuple)


class Dataset(Component):
    """A source of labelled images. `info()` must not load pixels; `load()` does."""

    kind: ClassVar[str] = "dataset"

    def info(self) -> DatasetInfo:
        raise NotImplementedError

    def declared_info(self) -> DatasetInfo:
        """Shape and classes as the dataset declares them, whether or not its files are on disk
        (`gileak inspect`, cost estimates). Default: `info()`; a dataset whose `info()` checks
        files overrides this."""
        return self.info()

    def load(self, seed: int = 0) -> Splits:
        """Return train and test splits, pixels in [0, 1], at the dataset's native size."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the data is, where the parameters alone do not say it (a folder's resolved path and
        the digest of its files): part of the results store's key, so results are reused only
        for the same data. Keys override parameters of the same name. Default: nothing beyond
        the parameters (data that ships inside a library)."""
        return {}


class Model(Component):
    """An architecture. `build` returns a module holding one `Slot` per insertion position."""

    kind: ClassVar[str] = "model"
    #: Spatial size the model wants its input at; None keeps the dataset's size.
    input_size: ClassVar[tuple[int, int] | None] = None

    def input_shape(self, dataset_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (C, H, W) this model is built for, given the dataset's native shape."""
        channels, height, width = dataset_shape
        if self.input_size is not None:
            height, width = self.input_size
        return (channels, height, width)

    def build(self, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        raise NotImplementedError


class Defense(Component):
    """A defense may transform the model, add a loss term (through its modules' `aux_loss`),
    and transform what the client uploads."""

    kind: ClassVar[str] = "defense"

    def apply(self, net: nn.Module) -> None:
        """Transform the model in place (insert modules into slots, drop biases)."""

    def transform_gradient(
        self, gradient: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Change one client's gradient before it is shared (pruning, quantisation, noise).
        In federated training the same transform applies to each client's model update."""
        return gradient

    def dp_sgd(self) -> tuple[float, float] | None:
        """(clip, noise multiplier) when local training must be DP-SGD; None otherwise."""
        return None


class Client(Component):
    """How a victim produces what the server sees. A victim is one attacked upload: the images
    of `clients_per_upload()` clients (secure aggregation averages their uploads), each holding
    `images_per_client()` images. Images and labels are listed victim by victim and, within a
    victim, client by client: client k of a victim holds rows k·M … k·M + M − 1 of its images.

    A client produces an upload (`upload`) and tells the attacker how to simulate it from
    dummies (`simulate`), differentiably and under `torch.func.vmap` over victims. Both work in
    the upload's own units; `to_gradient` maps an upload to gradient units (what gradient-only
    tools such as label recovery read, and what the attacks match)."""

    kind: ClassVar[str] = "client"

    def images_per_client(self) -> int:
        """How many images one client holds (and the upload depends on)."""
        raise NotImplementedError

    def clients_per_upload(self) -> int:
        """How many clients' uploads the server sees averaged into one (secure aggregation)."""
        return int(getattr(self.params, "aggregate", 1))

    def images_per_victim(self) -> int:
        """Images behind one upload the server sees: every one of them is to be reconstructed."""
        return self.clients_per_upload() * self.images_per_client()

    def labels_per_upload(self) -> int:
        """How many labels the upload in gradient units averages over, repeats included (a
        local step that revisits an image counts it again); label-count recovery reads this many."""
        return self.images_per_victim()

    def is_single_image_gradient(self) -> bool:
        """Whether this is the paper's threat model: one training step's gradient on one image,
        seen alone. Attacks that do not declare `handles_clients` run only here."""
        return False

    def is_mean_gradient(self) -> bool:
        """Whether the simulated upload, in gradient units, is the gradient of the client loss's
        mean over the victim's images at the server's weights (no local steps): the factored
        engines then apply, with the victim's images as one batch."""
        return False

    def upload(self, net: nn.Module, defense: Defense, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """What ONE client uploads after training on its `images_per_client()` images (M, C, H, W)
        and labels (M,), the defense included (`gileak.uploads` has the building blocks)."""
        raise NotImplementedError

    def victim_upload(self, net: nn.Module, defense: Defense, images: torch.Tensor, labels: torch.Tensor,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """What the server sees of one victim: the mean of its clients' uploads (each client
        applying its own defense), from the victim's `images_per_victim()` images."""
        from gileak.uploads import aggregate

        per_client = self.images_per_client()
        if self.clients_per_upload() == 1:  # exactly the client's upload, not a mean of one
            return self.upload(net, defense, images, labels, generator)
        return aggregate([self.upload(net, defense, images[k * per_client : (k + 1) * per_client],
                                      labels[k * per_client : (k + 1) * per_client], generator)
                          for k in range(self.clients_per_upload())])

    def to_gradient(self, upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The upload in gradient units (a linear map, so it applies to stacked uploads too)."""
        return upload

    def simulate(self, net: nn.Module, params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                 images: torch.Tensor, labels: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        """The attacker's simulation of ONE client's upload in gradient units, from dummies:
        images (M, C, H, W), labels (M,) class indices or (M, classes) probabilities; `params`
        the server's trainable weights, `frozen` the rest and the buffers (`threat.trainable_state`).
        Returns the entries `wanted`. Must be differentiable in the dummies and run under
        `torch.func.vmap` over victims. Defenses that act on the upload (noise, pruning) are not
        simulated: the attacker does not know their randomness; the model's own modules are."""
        raise NotImplementedError

    def simulate_victim(self, net: nn.Module, params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                        images: torch.Tensor, labels: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        """The simulation of one victim: the mean over its clients of `simulate`."""
        per_client = self.images_per_client()
        clients = self.clients_per_upload()
        if clients == 1:
            return self.simulate(net, params, frozen, images, labels, wanted)
        simulated = [self.simulate(net, params, frozen, images[k * per_client : (k + 1) * per_client],
                                   labels[k * per_client : (k + 1) * per_client], wanted) for k in range(clients)]
        return {name: sum(s[name] for s in simulated) / clients for name in wanted}


@dataclass
class GradientTrace:
    """Per-iteration cosine similarity of dummy and shared gradient, per layer (paper Figs. 5-6):
    `cosine[t, i, l]` for iteration t, victim i, layer `layers[l]`; NaN once a victim stopped."""

    layers: list[str]
    cosine: torch.Tensor


@dataclass
class Reconstruction:
    """An attack's output: images in [0, 1] (N·M, C, H, W), listed as the target lists them
    (victim by victim, M = `target.images_per_victim` each; (N, C, H, W) when M = 1), and
    per-victim bookkeeping. `labels` (N·M,) are the labels the attack ended with; set
    `labels_known` when they are the ones the threat model granted (nothing leaked to score)."""

    images: torch.Tensor
    iterations: list[int]
    final_loss: list[float]
    labels: torch.Tensor | None = None
    trace: GradientTrace | None = None
    note: str = ""
    labels_known: bool = False


class Attack(Component):
    """Rebuilds victims' images from what the server sees (a `Target`), all victims at once."""

    kind: ClassVar[str] = "attack"
    #: Whether the attack reconstructs victims that hold several images or upload a local update
    #: (any client but the paper's gradient(batch=1)). An attack that leaves it False is reported
    #: "not applicable" there instead of matching a single image against a batch's upload.
    handles_clients: ClassVar[bool] = False

    def attack(self, target: Target, *, seeds: list[int], max_iterations: int, progress=None) -> Reconstruction:
        """Reconstruct every victim of `target`. Victim i's randomness comes from seeds[i] only,
        so attacking it alone gives the same result. `progress(iterations_done)` may be called."""
        raise NotImplementedError

    def check(self, build: Callable[[], nn.Module], input_shape: tuple[int, int, int]) -> None:
        """Optional, at plan time: called for each defended model the attack will meet; `build()`
        returns it (built untrained on the dataset's declared shape, nothing loaded; only when
        called). Raise ParamsError when the attack's parameters cannot fit it (e.g. they name a
        layer it lacks), so the run stops before any work. Whatever cannot run on the model is
        left to `attack`."""


KINDS: dict[str, type[Component]] = {
    "attack": Attack,
    "defense": Defense,
    "model": Model,
    "dataset": Dataset,
    "client": Client,
}
