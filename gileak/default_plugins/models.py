"""Built-in models: the paper's CNN (Fig. 4)."""

from __future__ import annotations

from typing import ClassVar

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


@hookimpl
def register_models(register):
    register(CNN)
