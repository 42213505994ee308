"""Built-in models: the paper's CNN (Fig. 4)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from gileak import Model, hookimpl


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class CNN(Model):
    """Three 5x5 stride-2 convolutions (16, 32, 64 channels, no padding), ReLU, one linear classifier."""

    name = "cnn"
    description = "The paper's CNN (Fig. 4): 3 conv 5x5/2 (16, 32, 64) + ReLU, linear classifier; positions 1-3."
    input_size: ClassVar[tuple[int, int]] = (32, 32)
    channels: ClassVar[tuple[int, ...]] = (16, 32, 64)

    def build(self, input_shape, num_classes):
        from torch import nn

        from gileak.nets import Slot

        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        for position, out_channels in enumerate(self.channels, start=1):
            height, width = _conv_out(height, 5, 2), _conv_out(width, 5, 2)
            if height < 1 or width < 1:
                from gileak.errors import UserInputError

                raise UserInputError(f"Input {input_shape} is too small for the CNN's three 5x5 stride-2 convolutions.")
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=5, stride=2),
                nn.ReLU(),
                Slot(position, (out_channels, height, width)),
            ]
            in_channels = out_channels
        layers += [nn.Flatten(), nn.Linear(in_channels * height * width, num_classes)]
        return nn.Sequential(*layers)


def _batchnorm1d(features: int):
    """BatchNorm1d that, for a batch of ONE sample in training mode (a victim's single-image
    step, and every victim of the vectorized attack), normalises with its running statistics
    instead of failing: one sample has no batch variance. Larger batches behave as usual."""
    import torch.nn.functional as F
    from torch import nn

    class BatchNorm1dOneSample(nn.BatchNorm1d):
        def forward(self, x):
            if self.training and x.shape[0] == 1:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                    training=False, eps=self.eps)
            return super().forward(x)

    return BatchNorm1dOneSample(features)


class MLP(Model):
    """Four fully connected layers of 1024 with batch norm and ReLU, then the classifier
    (paper Supplementary); positions 1-4 after each hidden layer."""

    name = "mlp"
    description = "The paper's MLP: 4 x (Linear 1024 + BatchNorm + ReLU) + classifier; bias=false drops every bias."

    class Params(Model.Params):
        bias: bool = Field(True, description="biases in every Linear layer (false: none, as in the Supplementary)")
        width: int = Field(1024, ge=1, description="hidden width")

    def build(self, input_shape, num_classes):
        import math

        from torch import nn

        from gileak.nets import Slot

        width, features = self.params.width, math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for position in range(1, 5):
            layers += [nn.Linear(features, width, bias=self.params.bias), _batchnorm1d(width), nn.ReLU(),
                       Slot(position, (width,), kind="vector")]
            features = width
        layers.append(nn.Linear(width, num_classes, bias=self.params.bias))
        return nn.Sequential(*layers)


@hookimpl
def register_models(register):
    register(CNN)
    register(MLP)
