"""Data plumbing shared by training and attacks: where downloadable datasets live on disk,
fitting images to a model's input, the federated partition, each client's train/validation
split, and the victims."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from gileak.errors import UserInputError

#: Environment variable naming the directory of downloadable datasets (MNIST, CIFAR-10, MedMNIST).
DATA_ROOT_ENV = "GILEAK_DATA"


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The directory datasets are read from and fetched into, first that applies: `override`
    (a `--data-root` flag, a spec's `data_root`, a dataset's `root=` parameter), the environment
    variable GILEAK_DATA, then the per-user cache `$XDG_CACHE_HOME/gileak` (`~/.cache/gileak`).
    It is handed unchanged, as `root`, to torchvision's and medmnist's own dataset classes, so a
    directory you already keep for them works as it is."""
    if override is not None and str(override) != "":
        return user_path(override, "the data root")
    from_env = os.environ.get(DATA_ROOT_ENV, "")
    if from_env:
        return user_path(from_env, DATA_ROOT_ENV)
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = user_path(cache, "XDG_CACHE_HOME") if cache else Path.home() / ".cache"
    return base / "gileak"


def user_path(text: str | os.PathLike, what: str) -> Path:
    """A path the user wrote, with ~ expanded; one that cannot name a file (a NUL byte, an unknown
    ~user) is the user's to fix (UserInputError), not a traceback."""
    try:
        path = Path(text).expanduser()
        os.fsencode(path)  # a surrogate that stands for no byte cannot reach the file system either
    except (ValueError, RuntimeError, UnicodeError) as e:
        raise UserInputError(f"{what}: {str(text)!r} is not a usable path ({e}).") from e
    if "\x00" in str(path):
        raise UserInputError(f"{what}: {str(text)!r} is not a usable path (it holds a NUL byte).")
    return path


def fit_images(images: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Bring (N, C, H, W) images in [0, 1] to `shape` = (C, H, W): drop an alpha channel,
    grey↔RGB, and an anti-aliased bilinear resize. Already-fitting images come back as they are."""
    channels, height, width = (int(s) for s in shape)
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.dim() == 3:  # (N, H, W) grey
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 4:  # RGBA: the alpha channel is not part of the picture
        images = images[:, :3]
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype)[: images.shape[1]]
            images = (images * (weights / weights.sum()).view(1, -1, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    if tuple(images.shape[-2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False,
                               antialias=True)
    return images.clamp(0, 1).contiguous()


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[torch.Tensor]:
    """IID partition: a seeded shuffle of all indices cut into `num_clients` near-equal parts."""
    if num_clients < 1:
        raise UserInputError(f"the number of clients must be at least 1, got {num_clients}")
    if num_samples < num_clients:
        raise UserInputError(f"{num_samples} training images cannot be shared among {num_clients} clients")
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randperm(num_samples, generator=generator).tensor_split(num_clients))


def client_split(indices, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of one client; the validation part is floor(n * val_fraction)."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    generator = torch.Generator().manual_seed(seed)
    shuffled = indices[torch.randperm(len(indices), generator=generator)]
    num_val = int(len(indices) * val_fraction)
    return shuffled[num_val:], shuffled[:num_val]


def pick_victims(train_indices, count: int, seed: int) -> torch.Tensor:
    """`count` distinct images from a client's training split, chosen by `seed` (the paper
    attacks images the client trains on)."""
    train_indices = torch.as_tensor(train_indices, dtype=torch.long).flatten()
    if count < 1:
        raise UserInputError(f"--victims must be at least 1, got {count}")
    if count > len(train_indices):
        raise UserInputError(
            f"--victims {count} asks for more images than the attacked client's training split holds "
            f"({len(train_indices)}). Use --victims {len(train_indices)} or fewer, or a larger dataset."
        )
    generator = torch.Generator().manual_seed(seed + 7919)
    return train_indices[torch.randperm(len(train_indices), generator=generator)[:count]]


def stratified_test_count(class_size: int, test_fraction: float) -> int:
    """Test images `train_test_split` takes from a class of `class_size`: its rounded share,
    but at least one and never all when the class has two or more. Datasets use it to declare
    their split sizes without reading a pixel."""
    n_test = int(round(class_size * test_fraction))
    if class_size > 1:
        n_test = min(max(n_test, 1), class_size - 1)
    return n_test


def train_test_split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float, seed: int):
    """A seeded, stratified split: each class gives the same share to the test set."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = stratified_test_count(len(idx), test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = torch.cat(train).sort().values
    test_idx = torch.cat(test).sort().values
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
