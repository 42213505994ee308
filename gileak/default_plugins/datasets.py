"""Built-in datasets. Offline ones ship inside scikit-learn and scikit-image, or are the user's own
images; the paper's datasets (MNIST, CIFAR-10, four MedMNIST sets) are read from a data root by
torchvision's and medmnist's own dataset classes (CIFAR-10's pickles by gileak's restricted
unpickler, in torchvision's layout) and fetched by their own download code (`gileak data fetch
NAME`). `info()` declares shape and classes without touching any pixel."""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from gileak import Dataset, hookimpl
from gileak.base import DatasetInfo, Splits
from gileak.errors import DataUnavailableError, UserInputError

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
        return DatasetInfo((1, 8, 8), 10, tuple(str(i) for i in range(10)), train_size=1438, test_size=359)

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
        return DatasetInfo((1, 25, 25), 2, ("face", "non-face"), train_size=160, test_size=40)

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


#: (train, test) images of `photos(grid=g)`, as `load()` makes them (tests/test_data.py checks
#: some against a real load): declared so that a plan checks its budgets without cutting patches.
PHOTO_SPLIT_SIZES = {
    2: (88, 23), 3: (244, 61), 4: (482, 120), 5: (794, 196), 6: (1187, 294), 7: (1652, 414), 8: (2176, 545),
    9: (2804, 701), 10: (3461, 865), 11: (4289, 1071), 12: (5137, 1285), 13: (6015, 1504), 14: (7070, 1766),
    15: (8017, 2003), 16: (9341, 2335), 17: (10898, 2726), 18: (11942, 2983), 19: (13533, 3383),
    20: (14945, 3737), 21: (16454, 4113), 22: (18466, 4618), 23: (20078, 5018), 24: (22125, 5531),
    25: (22399, 5600), 26: (26623, 6656), 27: (28269, 7066), 28: (30192, 7549), 29: (32836, 8209),
    30: (33371, 8342), 31: (38591, 9646), 32: (41047, 10260),
}


class Photos(Dataset):
    """CIFAR-like 32x32 RGB patches cut from scikit-image's colour sample photos."""

    name = "photos"
    description = ("CIFAR-like 32x32 RGB patches cut from scikit-image's 10 colour sample photos, "
                   "labelled by photo (offline).")

    class Params(Dataset.Params):
        grid: int = Field(8, ge=2, le=32, description="windows per short side of a photo (more = smaller, more patches)")

    def info(self) -> DatasetInfo:
        train_size, test_size = PHOTO_SPLIT_SIZES.get(self.params.grid, (None, None))
        return DatasetInfo((3, 32, 32), len(PHOTO_SOURCES), PHOTO_SOURCES, train_size=train_size, test_size=test_size)

    def load(self, seed: int = 0) -> Splits:
        images, labels = _photo_patches(32, self.params.grid, 0.03)
        return _split(images.clone(), labels.clone(), PHOTO_SOURCES)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_layout(path: str) -> tuple[list[str], list[list[Path]], bool]:
    """(class names, image files per class, whether it is a tree) of an ImageFolder tree or a
    flat folder."""
    from gileak.data import user_path

    root = user_path(path, f"folder(path={path})")
    if not root.exists():
        raise DataUnavailableError(f"folder(path={path}): no such directory.")
    if not root.is_dir():
        raise DataUnavailableError(f"folder(path={path}): not a directory; give the folder that holds the images.")
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = [(d.name, _list_images(d)) for d in subdirs]
        classes = [(name, files) for name, files in classes if files]
        if classes:
            return [name for name, _ in classes], [files for _, files in classes], True
        files = _list_images(root)
    except OSError as e:  # an unreadable folder or sub-folder is the user's to fix, not a traceback
        raise DataUnavailableError(f"folder(path={path}): cannot list {e.filename or root}: {e.strerror or e}.") from e
    if not files:
        raise DataUnavailableError(
            f"folder(path={path}): found no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its sub-folders."
        )
    return [root.name or "images"], [files], False


#: Outputs of the classifier a flat folder's images are attacked with (the paper's 10 classes).
FLAT_FOLDER_CLASSES = 10


def _no_test_split(images: int, test_fraction: float) -> bool:
    return test_fraction == 0 or images < 2


def _folder_split_sizes(class_sizes: list[int], test_fraction: float) -> tuple[int, int]:
    """(train, test) images `Folder.load` makes of classes of these sizes, counted from file names."""
    from gileak.data import stratified_test_count

    if _no_test_split(sum(class_sizes), test_fraction):
        return sum(class_sizes), 0
    test = sum(stratified_test_count(n, test_fraction) for n in class_sizes)
    return sum(class_sizes) - test, test


_file_hashes: dict[tuple[str, int, int, int], str] = {}


def _manifest_digest(root: Path, files: list[Path]) -> str:
    """sha256 over (relative name, size, sha256 of the content) of `files`. A file's hash is kept
    for this process while its size, mtime and inode stay the same, so repeated identity checks
    of one run hash each image once."""
    import hashlib

    manifest = hashlib.sha256()
    for file in files:
        try:
            stat = file.stat()
            key = (str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if key not in _file_hashes:
                content = hashlib.sha256()
                with file.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        content.update(block)
                _file_hashes[key] = content.hexdigest()
        except OSError as e:
            raise DataUnavailableError(f"folder: cannot read {file}: {e.strerror}") from e
        name = file.relative_to(root).as_posix()
        manifest.update(f"{len(name)}:{name}:{stat.st_size}:{_file_hashes[key]}\n".encode())
    return manifest.hexdigest()


class Folder(Dataset):
    """Your own images: an ImageFolder tree (one sub-folder per class) or a flat folder, whose
    images are class 0 of a `classes`-way classifier (10 by default, as in the paper): with one
    output the cross-entropy and its gradient are zero and there would be nothing to attack."""

    name = "folder"
    description = ("Your own images: an ImageFolder tree (a sub-folder per class) or a flat folder of images "
                   "(class 0 of a `classes`-way classifier).")

    class Params(Dataset.Params):
        path: str = Field(description="the folder that holds the images")
        size: int = Field(32, ge=4, le=1024, description="images are centre-cropped square and resized to this")
        channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB)")
        test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of each class held out for testing")
        classes: int | None = Field(
            None, ge=2, le=100_000, description="outputs of the classifier: a flat folder's images are class 0 of "
            f"`classes` (default {FLAT_FOLDER_CLASSES}); a tree has one class per sub-folder (default), and a "
            "larger value adds classes no image has")

        @field_validator("channels", mode="before")
        @classmethod
        def _channels_from_text(cls, value):
            return int(value) if isinstance(value, str) and value.strip() in ("1", "3") else value

    def _layout(self) -> tuple[list[str], list[list[Path]]]:
        """Class names (padded to `classes`) and the image files of each class that has some."""
        names, files, tree = _folder_layout(self.params.path)
        classes = self.params.classes
        if classes is None:
            classes = len(names) if tree else FLAT_FOLDER_CLASSES
        if classes < len(names):
            raise UserInputError(
                f"folder(path={self.params.path}): classes={classes}, but the folder has {len(names)} class "
                f"sub-folders; give classes={len(names)} or more, or leave it out.")
        if classes < 2:
            raise UserInputError(
                f"folder(path={self.params.path}): one class sub-folder ({names[0]}) makes a one-class task, whose "
                "cross-entropy and gradient are zero: there would be nothing to attack. Add sub-folders, or give "
                "classes=N (N >= 2) to attack its images as class 0 of an N-way classifier.")
        padding = [f"class {i}" for i in range(len(names), classes)]
        return names + padding, files

    def info(self) -> DatasetInfo:
        names, files_per_class = self._layout()
        train_size, test_size = _folder_split_sizes([len(files) for files in files_per_class],
                                                    self.params.test_fraction)
        return DatasetInfo((self.params.channels, self.params.size, self.params.size), len(names), tuple(names),
                           train_size=train_size, test_size=test_size)

    def identity(self) -> dict[str, str]:
        """The folder as it is on disk: its resolved path and a digest of every image it uses
        (relative name, size, content hash), so the same name in another directory, or images
        changed in place, are other data."""
        from gileak.data import user_path

        root = user_path(self.params.path, f"folder(path={self.params.path})").resolve()
        _, files_per_class, _ = _folder_layout(str(root))
        return {"path": str(root), "files": _manifest_digest(root, [f for files in files_per_class for f in files])}

    def load(self, seed: int = 0) -> Splits:
        import numpy as np
        import torch
        from PIL import Image, ImageOps, UnidentifiedImageError

        from gileak.data import train_test_split

        info = self.info()
        _, files_per_class = self._layout()
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
        if _no_test_split(len(images), self.params.test_fraction):
            empty = images_t[:0]
            return Splits(images_t, labels_t, empty, labels_t[:0], info.class_names)
        train_x, train_y, test_x, test_y = train_test_split(images_t, labels_t, self.params.test_fraction, seed=0)
        return Splits(train_x, train_y, test_x, test_y, info.class_names)


# --- downloadable datasets, read from a data root ---------------------------------------------


class DownloadableDataset(Dataset):
    """A dataset whose files live under a data root (see `gileak.data.data_root`) and are read by
    its library's own class. `files()` lists what must exist, `fetch()` downloads with the
    library's own code; `info()` checks that the files exist (no pixel is read) so that a missing
    dataset stops a benchmark before any work."""

    #: Where the files come from, for `gileak data list` and error messages.
    source: ClassVar[str] = ""
    shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    class_names: ClassVar[tuple[str, ...]] = ()
    #: Training and test images of the official split (plan checks and cost estimates without the files).
    train_size: ClassVar[int] = 0
    test_size: ClassVar[int] = 0

    class Params(Dataset.Params):
        root: str | None = Field(
            None, description="data directory for this dataset alone; default: --data-root, else $GILEAK_DATA, "
                              "else ~/.cache/gileak")

    def root(self) -> Path:
        from gileak.data import data_root

        return data_root(self.params.root)

    def files(self) -> list[Path]:
        """The files the library's class reads, under `root()`."""
        raise NotImplementedError

    def missing(self) -> list[Path]:
        return [path for path in self.files() if not path.is_file()]

    def present(self) -> bool:
        return not self.missing()

    def check(self) -> None:
        """Raise DataUnavailableError, saying where gileak looked and how to get the files."""
        missing = self.missing()
        if not missing:
            return
        root = self.root()
        shown = ", ".join(str(path.relative_to(root)) for path in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        where = "" if root.is_dir() else " (the directory does not exist)"
        raise DataUnavailableError(
            f"{self.name}: its files are not in the data directory {root}{where}: missing {shown}{more}. "
            f"Get them with `gileak data fetch {self.name} --data-root {root}` (downloads from {self.source}), "
            f"or copy the files you already have there, or point --data-root (or the GILEAK_DATA environment "
            f"variable) at the directory that holds them."
        )

    def info(self) -> DatasetInfo:
        self.check()
        return self.declared_info()

    def declared_info(self) -> DatasetInfo:
        """Shape, classes and training-set size as declared, whether or not the files are there."""
        return DatasetInfo(self.shape, len(self.class_names), self.class_names, train_size=self.train_size or None,
                           test_size=self.test_size or None)

    def fetch(self) -> None:
        """Download into `root()` with the library's own download code."""
        raise NotImplementedError

    def _open(self, factory, what: str):
        """Run the library's loader; its own 'not found' or 'corrupted' errors become ours."""
        import pickle
        import zipfile

        self.check()
        try:
            return factory()
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
                zipfile.BadZipFile) as e:
            raise DataUnavailableError(
                f"{self.name}: {what} in {self.root()} could not be read: {str(e).strip()} "
                f"Fetch a fresh copy with `gileak data fetch {self.name} --data-root {self.root()}`."
            ) from e


def _uint8_to_float(images):
    import torch

    images = torch.as_tensor(images)
    return images.to(torch.float32).div_(255.0)


def _tensors_only_mnist():
    """torchvision's MNIST whose old cache (MNIST/processed/*.pt, a pickle) is read tensors-only
    whatever torchvision's version: older ones torch.load it with weights_only off."""
    from torchvision.datasets import MNIST as TorchMNIST

    class MNIST(TorchMNIST):  # torchvision finds its folders by the class's name: MNIST/raw
        def _load_legacy_data(self):
            import torch

            from gileak.safeload import load_tensors

            path = Path(self.processed_folder) / (self.training_file if self.train else self.test_file)
            loaded = load_tensors(path)
            if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2
                    and all(isinstance(t, torch.Tensor) for t in loaded) and loaded[0].dim() == 3
                    and loaded[1].dim() == 1 and len(loaded[0]) == len(loaded[1])):
                raise ValueError(f"{path} is not torchvision's MNIST cache (a pair of image and label tensors).")
            return loaded

    return MNIST


class MNIST(DownloadableDataset):
    """MNIST through torchvision.datasets.MNIST: root/MNIST/raw/ holding the four idx files."""

    name = "mnist"
    description = ("MNIST handwritten digits, 28x28 grey, 10 classes, official 60,000/10,000 split; read by "
                   "torchvision from <data root>/MNIST/raw (`gileak data fetch mnist`).")
    source = "torchvision's MNIST mirrors, with its download code"
    shape = (1, 28, 28)
    class_names = tuple(str(i) for i in range(10))
    train_size = 60_000
    test_size = 10_000
    RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def files(self) -> list[Path]:
        return [self.root() / "MNIST" / "raw" / name for name in self.RAW_FILES]

    def missing(self) -> list[Path]:
        processed = self.root() / "MNIST" / "processed"  # torchvision still reads its old cache format
        if (processed / "training.pt").is_file() and (processed / "test.pt").is_file():
            return []
        return super().missing()

    def load(self, seed: int = 0) -> Splits:
        import torch

        root = str(self.root())
        reader = _tensors_only_mnist()
        train = self._open(lambda: reader(root, train=True, download=False), "the training files")
        test = self._open(lambda: reader(root, train=False, download=False), "the test files")
        return Splits(_uint8_to_float(train.data).unsqueeze(1), torch.as_tensor(train.targets, dtype=torch.long),
                      _uint8_to_float(test.data).unsqueeze(1), torch.as_tensor(test.targets, dtype=torch.long),
                      self.class_names)

    def fetch(self) -> None:
        self.root().mkdir(parents=True, exist_ok=True)
        reader = _tensors_only_mnist()
        for train in (True, False):
            reader(str(self.root()), train=train, download=True)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: md5 of each batch of the official release, as torchvision lists them (tests check they agree).
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _cifar10_batch(entry) -> tuple:
    """(uint8 rows of 3072, int64 labels) of one unpickled batch, or why it is not a batch."""
    import numpy as np

    if not isinstance(entry, dict):
        raise ValueError(f"it holds a {type(entry).__name__}, not a dict")
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shown = f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"its 'data' is {shown}, not uint8 rows of 3072 values")
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        labels = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(label) is int for label in labels):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    else:
        raise ValueError("its 'labels' are not a list of integers")
    if len(labels) != len(data):
        raise ValueError(f"it has {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"its labels run from {labels.min()} to {labels.max()}, outside 0-9")
    return data, labels


class CIFAR10(DownloadableDataset):
    """CIFAR-10 in torchvision's layout, root/cifar-10-batches-py/ (python pickles), read by gileak's
    restricted unpickler: every batch, official or not, so that no file can run code."""

    name = "cifar10"
    description = ("CIFAR-10, 32x32 RGB, 10 classes, official 50,000/10,000 split; read from "
                   "<data root>/cifar-10-batches-py, as torchvision lays it out, by a restricted "
                   "unpickler (`gileak data fetch cifar10`).")
    source = "www.cs.toronto.edu, with torchvision's download code"
    shape = (3, 32, 32)
    class_names = CIFAR10_CLASSES
    train_size = 50_000
    test_size = 10_000
    FOLDER = "cifar-10-batches-py"
    TRAIN = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
    TEST = ("test_batch",)
    #: batches.meta only names the classes (declared above); it is expected, as torchvision lays
    #: the folder out, but never unpickled.
    FILES = (*TRAIN, *TEST, "batches.meta")

    def files(self) -> list[Path]:
        return [self.root() / self.FOLDER / name for name in self.FILES]

    def _refetch(self) -> str:
        return (f"Delete {self.root() / self.FOLDER} and fetch a fresh copy with "
                f"`gileak data fetch cifar10 --data-root {self.root()}`.")

    def _read_batches(self, names) -> tuple[list, list[str]]:
        """Each batch's raw bytes, hashed and unpickled from the same bytes (no file can change
        between the check and the read), with the names whose md5 is not the official one."""
        import hashlib

        from gileak.safeload import RefusedPickleError, restricted_unpickle

        batches, unofficial = [], []
        for name in names:
            path = self.root() / self.FOLDER / name
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise DataUnavailableError(f"cifar10: cannot read {path}: {e.strerror or e}. {self._refetch()}") from e
            if hashlib.md5(raw, usedforsecurity=False).hexdigest() != CIFAR10_MD5.get(name):
                unofficial.append(name)
            try:
                entry = restricted_unpickle(raw)
            except RefusedPickleError as e:
                raise DataUnavailableError(
                    f"cifar10: {path} was refused: it asks to load {e}, which a CIFAR-10 batch never holds "
                    f"(only numpy arrays, lists, strings and numbers), so it is not a CIFAR-10 batch and may be "
                    f"an attempt to run code; nothing in it was run. {self._refetch()}") from None
            except Exception as e:  # a truncated or hostile file fails anywhere in the unpickler or numpy
                detail = " ".join(str(e).split()) or type(e).__name__
                raise DataUnavailableError(f"cifar10: {path} could not be read as a pickled CIFAR-10 batch "
                                           f"({detail}). {self._refetch()}") from None
            try:
                batches.append(_cifar10_batch(entry))
            except ValueError as e:
                raise DataUnavailableError(f"cifar10: {path} is not a CIFAR-10 batch: {e}. {self._refetch()}") from None
        return batches, unofficial

    def load(self, seed: int = 0) -> Splits:
        import numpy as np
        import torch

        self.check()
        train, unofficial = self._read_batches(self.TRAIN)
        test, unofficial_test = self._read_batches(self.TEST)
        unofficial += unofficial_test
        if unofficial:
            warnings.warn(
                f"cifar10: the files in {self.root() / self.FOLDER} are not the official CIFAR-10 release "
                f"(md5 not the published one: {', '.join(unofficial)}); read anyway, by the restricted unpickler "
                f"that admits only numpy arrays, lists, strings and numbers.", stacklevel=2)

        def split(batches):
            images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
            labels = np.concatenate([labels for _, labels in batches])
            return _uint8_to_float(images), torch.from_numpy(labels)

        return Splits(*split(train), *split(test), self.class_names)

    def fetch(self) -> None:
        # torchvision's download code alone: CIFAR10(download=True) would also unpickle the batches.
        from torchvision.datasets import CIFAR10 as TorchCIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        self.root().mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(TorchCIFAR10.url, str(self.root()), filename=TorchCIFAR10.filename,
                                     md5=TorchCIFAR10.tgz_md5)


MEDMNIST_SIZES = (28, 64, 128, 224)


class _MedMNIST(DownloadableDataset):
    """A 2D MedMNIST set through the medmnist package's own class: root/<flag>.npz (28x28) or
    root/<flag>_<size>.npz; official train and test splits (val is not used)."""

    flag: ClassVar[str] = ""
    python_class: ClassVar[str] = ""
    source = "Zenodo, with medmnist's download code"

    class Params(DownloadableDataset.Params):
        size: int = Field(28, description="image side: 28, 64, 128 or 224 (one .npz file each)")

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.params.size not in MEDMNIST_SIZES:
            from gileak.errors import ParamsError

            raise ParamsError(f"{self.name}: size must be one of {', '.join(map(str, MEDMNIST_SIZES))}, "
                              f"got {self.params.size}.")

    def _file_name(self) -> str:
        suffix = "" if self.params.size == 28 else f"_{self.params.size}"
        return f"{self.flag}{suffix}.npz"

    def files(self) -> list[Path]:
        return [self.root() / self._file_name()]

    def info(self) -> DatasetInfo:
        self.check()
        return self.declared_info()

    def declared_info(self) -> DatasetInfo:
        channels, size = self.shape[0], self.params.size
        return DatasetInfo((channels, size, size), len(self.class_names), self.class_names,
                           train_size=self.train_size or None, test_size=self.test_size or None)

    def _medmnist_class(self):
        import medmnist

        return getattr(medmnist, self.python_class)

    def load(self, seed: int = 0) -> Splits:
        import torch

        cls = self._medmnist_class()
        root = str(self.root())
        splits = []
        for split in ("train", "test"):
            dataset = self._open(lambda s=split: cls(split=s, download=False, root=root, size=self.params.size),
                                 f"the {split} split of {self._file_name()}")
            images = _uint8_to_float(dataset.imgs)
            images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(dataset.labels.reshape(len(dataset.labels), -1)[:, 0], dtype=torch.long)
            splits += [images, labels]
        return Splits(*splits, self.class_names)

    def fetch(self) -> None:
        cls = self._medmnist_class()
        self.root().mkdir(parents=True, exist_ok=True)  # medmnist wants an existing root
        cls(split="train", download=True, root=str(self.root()), size=self.params.size)


def _medmnist(cls_name: str, flag: str, channels: int, classes: tuple[str, ...], what: str,
              counts: str) -> type[_MedMNIST]:
    grey = "grey" if channels == 1 else "RGB"
    return type(cls_name, (_MedMNIST,), {
        "__doc__": f"{cls_name} through medmnist.{cls_name}: {what}.",
        "__module__": __name__,
        "name": flag,
        "flag": flag,
        "python_class": cls_name,
        "description": (f"{cls_name} (MedMNIST v2): {what}, {grey}, {len(classes)} classes, official "
                        f"{counts} train/test split; read by medmnist from <data root>/{flag}.npz "
                        f"(`gileak data fetch {flag}`)."),
        "shape": (channels, 28, 28),
        "class_names": classes,
        "train_size": int(counts.split("/")[0].replace(",", "")),
        "test_size": int(counts.split("/")[1].replace(",", "")),
    })


#: Shape and classes as medmnist.INFO gives them (tests/test_real_datasets.py checks this).
PneumoniaMNIST = _medmnist("PneumoniaMNIST", "pneumoniamnist", 1, ("normal", "pneumonia"),
                           "paediatric chest X-rays", "4,708/624")
DermaMNIST = _medmnist("DermaMNIST", "dermamnist", 3, (
    "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
    "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"),
    "dermatoscopic images of pigmented skin lesions", "7,007/2,005")
RetinaMNIST = _medmnist("RetinaMNIST", "retinamnist", 3, ("0", "1", "2", "3", "4"),
                        "retinal fundus images graded for diabetic retinopathy (ordinal grades 0-4)", "1,080/400")
BloodMNIST = _medmnist("BloodMNIST", "bloodmnist", 3, (
    "basophil", "eosinophil", "erythroblast",
    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
    "neutrophil", "platelet"), "blood cell microscopy", "11,959/3,421")

DOWNLOADABLE = (MNIST, CIFAR10, PneumoniaMNIST, DermaMNIST, RetinaMNIST, BloodMNIST)


@hookimpl
def register_datasets(register):
    for dataset in (Photos, Digits, LFW, Folder, *DOWNLOADABLE):
        register(dataset)
