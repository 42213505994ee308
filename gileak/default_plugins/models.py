"""Built-in models: the paper's CNN (Fig. 4), ResNet-18 and ViT (Table V), and MLP (Supplementary)."""

from __future__ import annotations

from typing import ClassVar, Literal

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


def _halve(size: int) -> int:
    """Spatial size after a 3x3 convolution with stride 2 and padding 1."""
    return (size - 1) // 2 + 1


def _norm2d(kind: str, channels: int):
    from torch import nn

    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(2, channels)


def _basic_block(in_channels: int, out_channels: int, stride: int, norm: str):
    """ResNet's BasicBlock: two 3x3 convolutions with a residual connection (projected by a
    1x1 convolution when the shape changes)."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
            self.norm1 = _norm2d(norm, out_channels)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
            self.norm2 = _norm2d(norm, out_channels)
            self.relu = nn.ReLU()
            self.shortcut = nn.Sequential()
            if stride != 1 or in_channels != out_channels:
                self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                              _norm2d(norm, out_channels))

        def forward(self, x):
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.norm2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    return BasicBlock()


class ResNet18(Model):
    """CIFAR-style ResNet-18: 3x3 stem convolution (no max-pool), four stages of two BasicBlocks
    (64, 128, 256, 512 channels; stages 2-4 halve the size), global average pool, linear
    classifier. Position 1 is after the stem, positions 2-5 after each stage.

    Batch norm in training mode normalises with the batch's statistics, which for one image are
    taken over its H x W positions, so a victim's single-image step is well defined. The victim
    step and the attack's dummy step (`gileak.threat.client_loss` with
    `update_running_stats=False`) both use batch statistics and leave the running statistics
    alone; federated training updates them as usual."""

    name = "resnet18"
    description = "ResNet-18, CIFAR-style (3x3 stem, no max-pool, 4 x 2 BasicBlocks), batch norm; positions 1-5."
    input_size: ClassVar[tuple[int, int]] = (32, 32)

    class Params(Model.Params):
        width: int = Field(64, ge=2, description="channels of the stem and first stage (doubled per stage)")
        norm: Literal["batch", "group"] = Field(
            "batch", description="batch norm, or group norm of 2 groups (as the paper authors' code builds it)"
        )

    def build(self, input_shape, num_classes):
        from torch import nn

        from gileak.nets import Slot

        in_channels, height, width = input_shape
        channels, norm = self.params.width, self.params.norm
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), _norm2d(norm, channels), nn.ReLU(),
            Slot(1, (channels, height, width)),
        ]
        stage_in = channels
        for stage in range(4):
            out_channels, stride = channels * 2**stage, 1 if stage == 0 else 2
            if stride == 2:
                height, width = _halve(height), _halve(width)
            layers += [_basic_block(stage_in, out_channels, stride, norm),
                       _basic_block(out_channels, out_channels, 1, norm),
                       Slot(stage + 2, (out_channels, height, width))]
            stage_in = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(stage_in, num_classes)]
        return nn.Sequential(*layers)


def _vision_transformer(input_shape, num_classes, patch: int, dim: int, depth: int, heads: int, mlp_dim: int):
    import torch
    from torch import nn

    from gileak.nets import Slot

    channels, height, width = input_shape
    tokens = (height // patch) * (width // patch) + 1

    class PatchEmbedding(nn.Module):
        """Non-overlapping patches projected to `dim`, a class token in front, learned positions."""

        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2d(channels, dim, patch, stride=patch)
            self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

        def forward(self, images):
            patches = self.projection(images).flatten(2).transpose(1, 2)
            class_token = self.class_token.expand(patches.shape[0], -1, -1)
            return torch.cat([class_token, patches], dim=1) + self.position

    class SelfAttention(nn.Module):
        """Multi-head self-attention written with matmuls, so that it runs under vmap and
        twice-differentiated functional calls like any other layer."""

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, x):
            batch, count, _ = x.shape
            q, k, v = self.qkv(x).reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            weights = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
            return self.out((weights @ v).transpose(1, 2).reshape(batch, count, dim))

    class Block(nn.Module):
        """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attention = SelfAttention()
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

        def forward(self, x):
            x = x + self.attention(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ClassToken(nn.Module):
        def forward(self, x):
            return x[:, 0]

    layers: list[nn.Module] = [PatchEmbedding()]
    for position in range(1, depth + 1):
        layers += [Block(), Slot(position, (tokens, dim), kind="tokens")]
    layers += [nn.LayerNorm(dim), ClassToken(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*layers)


class ViT(Model):
    """The paper's small Vision Transformer (Sec. VI-C): 4x4 patches, 4 pre-norm blocks of
    hidden size 256 with 16 heads and a GELU MLP, a class token and learned position embedding,
    a linear head on the class token. Positions 1-4 are after each block, with tokens (P, 256),
    P = patches + 1 (65 at 32x32); the CVB sees them as P channels of 16 x 16."""

    name = "vit"
    description = "The paper's small ViT: patch 4, 4 pre-norm blocks, hidden 256, 16 heads, GELU MLP; positions 1-4."
    input_size: ClassVar[tuple[int, int]] = (32, 32)

    class Params(Model.Params):
        patch: int = Field(4, ge=1, description="patch side (input height and width must be multiples of it)")
        dim: int = Field(256, ge=1, description="hidden size F (a square, 16 x 16, for the CVB's token path)")
        depth: int = Field(4, ge=1, description="transformer blocks, one position after each")
        heads: int = Field(16, ge=1, description="attention heads (must divide dim)")
        mlp_dim: int = Field(1024, ge=1, description="hidden width of each block's MLP (4 x dim, as in ViT)")

    def build(self, input_shape, num_classes):
        from gileak.errors import ParamsError, UserInputError

        p = self.params
        if p.dim % p.heads:
            raise ParamsError(f"vit: heads={p.heads} must divide dim={p.dim}.")
        _, height, width = input_shape
        if height % p.patch or width % p.patch:
            raise UserInputError(f"vit: input {height}x{width} is not a multiple of the patch size {p.patch}.")
        return _vision_transformer(input_shape, num_classes, p.patch, p.dim, p.depth, p.heads, p.mlp_dim)


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
    for model in (CNN, ResNet18, ViT, MLP):
        register(model)
