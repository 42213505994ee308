"""Built-in attacks: Inverting Gradients (Geiping et al.) as the paper configures it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gileak import Attack, hookimpl
from gileak.errors import NotApplicableError


class InvertingGradients(Attack):
    """Cosine gradient distance + total-variation prior, Adam with a plateau schedule."""

    name = "ig"
    description = "Inverting Gradients: cosine distance + TV prior, signed Adam, plateau schedule (paper V-B)."

    class Params(Attack.Params):
        lr: float = Field(1.0, gt=0, description="Adam's initial learning rate (paper: 1)")
        tv: float = Field(0.01, ge=0, description="weight of the total-variation prior")
        signed: bool = Field(True, description="step on the sign of the image gradient (authors' code)")
        plateau: int = Field(400, ge=1, description="iterations without improvement before lr x 0.1")
        stop_patience: int = Field(4000, ge=1, description="stop a victim after this many iterations without improvement")
        min_loss: float = Field(1e-5, ge=0, description="stop a victim once its loss is below this")
        labels: Literal["known"] = Field("known", description="labels the server knows (threat model of V-B)")

    def config(self):
        from gileak.engine import MatchingConfig

        p = self.params
        return MatchingConfig(distance="cosine", tv_weight=p.tv, lr=p.lr, signed=p.signed,
                              plateau_patience=p.plateau, stop_patience=p.stop_patience, min_loss=p.min_loss)

    def attack(self, target, *, seeds, max_iterations, progress=None):
        from gileak.engine import gradient_matching

        if target.labels is None:
            raise NotApplicableError("ig needs the victims' labels and the threat model did not grant them")
        return gradient_matching(target, self.config(), seeds=seeds, max_iterations=max_iterations,
                                 labels=target.labels, progress=progress)


@hookimpl
def register_attacks(register):
    register(InvertingGradients)
