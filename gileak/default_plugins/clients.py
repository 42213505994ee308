"""Built-in clients: what a federated client uploads — one step's gradient on a batch (the
paper's threat model at batch=1), or the weight change of several local SGD steps (FedAvg) —
each optionally seen only through secure aggregation of several clients."""

from __future__ import annotations

from pydantic import Field, model_validator

from gileak import Client, hookimpl

#: Local steps the attacker's simulation unrolls at most: each step's graph is kept for the
#: image gradient, so memory grows with it (and 10**9 steps is a typo, not a protocol).
MAX_STEPS = 1000

_AGGREGATE = Field(1, ge=1, description="clients whose uploads the server sees only averaged (secure aggregation); "
                   "the attack must recover all of their images")


class GradientClient(Client):
    """One training step's gradient of the mean loss over a batch (FedSGD)."""

    name = "gradient"
    description = ("One step's gradient of the mean loss over `batch` images (FedSGD); batch=1 is the paper's "
                   "threat model.")

    class Params(Client.Params):
        batch: int = Field(1, ge=1, description="images the client's step averages over")
        aggregate: int = _AGGREGATE

    def images_per_client(self) -> int:
        return self.params.batch

    def is_single_image_gradient(self) -> bool:
        return self.params.batch == 1 and self.params.aggregate == 1

    def is_mean_gradient(self) -> bool:
        return True

    def upload(self, net, defense, images, labels, generator=None):
        from gileak.uploads import batch_gradient

        return batch_gradient(net, defense, images, labels, generator)

    def simulate(self, net, params, frozen, images, labels, wanted):
        from gileak.uploads import simulate_batch_gradient

        return simulate_batch_gradient(net, params, frozen, images, labels, wanted)

    def simulate_victim(self, net, params, frozen, images, labels, wanted):
        from gileak.uploads import simulate_batch_gradient

        return simulate_batch_gradient(net, params, frozen, images, labels, wanted, clients=self.params.aggregate)


class FedAvgClient(Client):
    """Several local SGD steps; the upload is the weight change."""

    name = "fedavg"
    description = ("FedAvg: `steps` local SGD steps of rate `lr` on mini-batches of `batch` from the client's "
                   "`data` images; uploads the weight change.")

    class Params(Client.Params):
        batch: int = Field(8, ge=1, description="images per local step")
        steps: int = Field(1, ge=1, le=MAX_STEPS, description="local SGD steps")
        lr: float = Field(0.01, gt=0, allow_inf_nan=False, description="local learning rate")
        data: int | None = Field(None, ge=1, description="images the client holds, trained on in order and again "
                                 "from the first when they run out; none = batch x steps (each image once)")
        aggregate: int = _AGGREGATE

        @model_validator(mode="after")
        def _data_fits_the_steps(self):
            if self.data is not None and self.data < self.batch:
                raise ValueError(f"data={self.data} cannot fill one batch of {self.batch}")
            if self.data is not None and self.data > self.batch * self.steps:
                raise ValueError(f"data={self.data} is more than the {self.batch * self.steps} images that "
                                 f"{self.steps} step(s) of batch {self.batch} train on: the rest would never "
                                 "reach the upload")
            return self

    def images_per_client(self) -> int:
        p = self.params
        return p.data if p.data is not None else p.batch * p.steps

    def labels_per_upload(self) -> int:
        return self.clients_per_upload() * self.params.steps * self.params.batch

    def is_mean_gradient(self) -> bool:
        return self.params.steps == 1  # then data == batch: one step's gradient, times -lr

    def upload(self, net, defense, images, labels, generator=None):
        from gileak.uploads import local_update

        p = self.params
        return local_update(net, defense, images, labels, steps=p.steps, batch=p.batch, lr=p.lr, generator=generator)

    def to_gradient(self, upload):
        from gileak.uploads import update_as_gradient

        return update_as_gradient(upload, lr=self.params.lr, steps=self.params.steps)

    def simulate(self, net, params, frozen, images, labels, wanted):
        from gileak.uploads import simulate_local_update

        p = self.params
        update = simulate_local_update(net, params, frozen, images, labels, steps=p.steps, batch=p.batch, lr=p.lr,
                                       label_logits=False)
        return self.to_gradient({name: update[name] for name in wanted})


@hookimpl
def register_clients(register):
    for client in (GradientClient, FedAvgClient):
        register(client)
