"""Built-in datasets that work offline: they ship inside scikit-learn and scikit-image, or are
the user's own images. `info()` declares shape and classes without touching any pixel."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pydantic import Field

from gileak import Dataset, hookimpl
from gileak.base import DatasetInfo, Splits
from gileak.errors import DataUnavailableError

#: Test share of the built-in datasets; the split is fixed (seed 0) so every run tests on the same images.
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _split(images, labels, class_names) -> Splits:
    from gileak.data import train_test_split

    train_x, train_y, test_x, test_y = train_test_split(images, labels, TEST_FRACTION, seed=0)
    return Splits(train_x, train_y, test_x, test_y, tuple(class_names))


class Digits(Dataset):
    """scikit-learn's 1,797 handwritten digits, 8x8 grey, 10 classes."""

    name = "digits"
    description = "scikit-learn's handwritten digits: 1,797 8x8 grey images, 10 classes (offline)."

    def info(self) -> DatasetInfo:
        return DatasetInfo((1, 8, 8), 10, tuple(str(i) for i in range(10)))

    def load(self, seed: int = 0) -> Splits:
        import torch
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(bunch.target, dtype=torch.long)
        return _split(images, labels, self.info().class_names)


class LFW(Dataset):
    """scikit-image's lfw_subset: 100 faces and 100 non-face patches, 25x25 grey."""

    name = "lfw"
    description = "scikit-image's lfw_subset: 200 25x25 grey images, faces vs non-faces (offline)."

    def info(self) -> DatasetInfo:
        return DatasetInfo((1, 25, 25), 2, ("face", "non-face"))

    def load(self, seed: int = 0) -> Splits:
        import torch
        from skimage.data import lfw_subset

        images = torch.tensor(lfw_subset(), dtype=torch.float32).unsqueeze(1).clamp(0, 1)
        labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
        return _split(images, labels, self.info().class_names)


#: scikit-image's bundled colour photos (no download needed); each is one class of `photos`.
PHOTO_SOURCES = (
    "astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
    "immunohistochemistry", "stereo_motorcycle", "logo", "colorwheel",
)


def _photo(name: str):
    import numpy as np
    import skimage.data

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[-1] == 4:  # composite onto white, as a viewer shows it
        alpha = image[..., 3:4] / 255.0
        image = image[..., :3] * alpha + 255.0 * (1 - alpha)
    return image.astype(np.float32) / 255.0


@cache
def _photo_patches(size: int, grid: int, min_std: float):
    """Square windows of side min(H, W) / grid, stride half a window, over every photo;
    near-flat windows (std < min_std: empty sky, white background) are left out."""
    import torch

    from gileak.data import fit_images

    all_images, all_labels = [], []
    for label, name in enumerate(PHOTO_SOURCES):
        photo = torch.from_numpy(_photo(name)).permute(2, 0, 1)
        _, height, width = photo.shape
        window = min(height, width) // grid
        stride = max(window // 2, 1)
        windows = photo.unfold(1, window, stride).unfold(2, window, stride)  # C, nh, nw, w, w
        windows = windows.permute(1, 2, 0, 3, 4).reshape(-1, 3, window, window)
        keep = windows.flatten(1).std(1) >= min_std
        patches = fit_images(windows[keep], (3, size, size))
        all_images.append(patches)
        all_labels.append(torch.full((len(patches),), label, dtype=torch.long))
    return torch.cat(all_images), torch.cat(all_labels)


class Photos(Dataset):
    """CIFAR-like 32x32 RGB patches cut from scikit-image's colour sample photos."""

    name = "photos"
    description = ("CIFAR-like 32x32 RGB patches cut from scikit-image's 10 colour sample photos, "
                   "labelled by photo (offline).")

    class Params(Dataset.Params):
        grid: int = Field(8, ge=2, le=32, description="windows per short side of a photo (more = smaller, more patches)")

    def info(self) -> DatasetInfo:
        return DatasetInfo((3, 32, 32), len(PHOTO_SOURCES), PHOTO_SOURCES)

    def load(self, seed: int = 0) -> Splits:
        images, labels = _photo_patches(32, self.params.grid, 0.03)
        return _split(images.clone(), labels.clone(), PHOTO_SOURCES)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_layout(path: str) -> tuple[list[str], list[list[Path]]]:
    """(class names, image files per class) of an ImageFolder tree or a flat folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataUnavailableError(f"folder(path={path}): no such directory.")
    if not root.is_dir():
        raise DataUnavailableError(f"folder(path={path}): not a directory; give the folder that holds the images.")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d.name, _list_images(d)) for d in subdirs]
    classes = [(name, files) for name, files in classes if files]
    if classes:
        return [name for name, _ in classes], [files for _, files in classes]
    files = _list_images(root)
    if not files:
        raise DataUnavailableError(
            f"folder(path={path}): found no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its sub-folders."
        )
    return [root.name or "images"], [files]


class Folder(Dataset):
    """Your own images: an ImageFolder tree (one sub-folder per class) or a flat folder (one class)."""

    name = "folder"
    description = "Your own images: an ImageFolder tree (a sub-folder per class) or a flat folder of images."

    class Params(Dataset.Params):
        path: str = Field(description="the folder that holds the images")
        size: int = Field(32, ge=4, le=1024, description="images are centre-cropped square and resized to this")
        channels: int = Field(3, description="1 (grey) or 3 (RGB)")
        test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of each class held out for testing")

    def info(self) -> DatasetInfo:
        if self.params.channels not in (1, 3):
            raise DataUnavailableError(f"folder: channels must be 1 or 3, got {self.params.channels}.")
        names, _ = _folder_layout(self.params.path)
        return DatasetInfo((self.params.channels, self.params.size, self.params.size), len(names), tuple(names))

    def load(self, seed: int = 0) -> Splits:
        import numpy as np
        import torch
        from PIL import Image, ImageOps, UnidentifiedImageError

        from gileak.data import train_test_split

        info = self.info()
        names, files_per_class = _folder_layout(self.params.path)
        size, mode = self.params.size, ("L" if self.params.channels == 1 else "RGB")
        images, labels = [], []
        for label, files in enumerate(files_per_class):
            for file in files:
                try:
                    with Image.open(file) as image:
                        image = ImageOps.exif_transpose(image)
                        if image.mode in ("RGBA", "LA", "P"):
                            image = image.convert("RGBA")
                            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                            image = Image.alpha_composite(background, image)
                        image = ImageOps.fit(image.convert(mode), (size, size), Image.Resampling.BICUBIC)
                except (UnidentifiedImageError, OSError) as e:
                    raise DataUnavailableError(f"folder: cannot read {file}: {e}") from e
                array = np.asarray(image, dtype=np.float32) / 255.0
                images.append(torch.from_numpy(array.reshape(size, size, -1)).permute(2, 0, 1))
                labels.append(label)
        images_t, labels_t = torch.stack(images), torch.tensor(labels, dtype=torch.long)
        if self.params.test_fraction == 0 or len(images) < 2:
            empty = images_t[:0]
            return Splits(images_t, labels_t, empty, labels_t[:0], info.class_names)
        train_x, train_y, test_x, test_y = train_test_split(images_t, labels_t, self.params.test_fraction, seed=0)
        return Splits(train_x, train_y, test_x, test_y, info.class_names)


@hookimpl
def register_datasets(register):
    for dataset in (Photos, Digits, LFW, Folder):
        register(dataset)
