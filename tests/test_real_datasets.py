"""The paper's datasets (MNIST, CIFAR-10, MedMNIST) read through torchvision's and medmnist's own
classes. Each test writes a few images in the library's real on-disk format into a temporary
data root (idx files, pickled CIFAR batches, MedMNIST .npz) and loads them through gileak; no
loader is mocked."""

from __future__ import annotations

import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gileak.cli import main
from gileak.data import data_root, fit_images
from gileak.default_plugins.datasets import (
    CIFAR10,
    CIFAR10_CLASSES,
    MNIST,
    BloodMNIST,
    DermaMNIST,
    PneumoniaMNIST,
    RetinaMNIST,
)
from gileak.errors import DataUnavailableError, ParamsError

MEDMNIST = {"pneumoniamnist": PneumoniaMNIST, "dermamnist": DermaMNIST, "retinamnist": RetinaMNIST,
            "bloodmnist": BloodMNIST}


# --- writers of each library's real on-disk format ----------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte idx file as on yann.lecun.com: magic 0x0000 08 <ndim>, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed, as torchvision reads them)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays["train"], arrays["t10k"]


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> np.ndarray:
    """root/cifar-10-batches-py/: five training batches, a test batch and batches.meta, pickled
    dicts with 'data' (N, 3072) uint8 rows (R plane, G plane, B plane) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {"batch_label": f"{name} of a tiny test copy", "labels": [i % 10 for i in range(n)],
                 "data": data, "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        first = data if first is None else first
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, f)
    return first


def write_medmnist(root: Path, flag: str, channels: int, classes: int, size: int = 28,
                   counts=(12, 4, 6)) -> dict[str, np.ndarray]:
    """root/<flag>.npz (root/<flag>_<size>.npz beyond 28) with the six arrays medmnist reads:
    {train,val,test}_images (N, H, W[, 3]) uint8 and {train,val,test}_labels (N, 1) uint8."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        shape = (n, size, size) if channels == 1 else (n, size, size, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8).reshape(n, 1)
    suffix = "" if size == 28 else f"_{size}"
    np.savez_compressed(root / f"{flag}{suffix}.npz", **arrays)
    return arrays


def _check_splits(splits, info, n_train, n_test):
    assert tuple(splits.train_images.shape) == (n_train, *info.shape)
    assert tuple(splits.test_images.shape) == (n_test, *info.shape)
    for images in (splits.train_images, splits.test_images):
        assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    for labels in (splits.train_labels, splits.test_labels):
        assert labels.dtype == torch.long and labels.dim() == 1
        assert int(labels.min()) >= 0 and int(labels.max()) < info.num_classes
    assert splits.class_names == info.class_names and len(info.class_names) == info.num_classes


# --- MNIST --------------------------------------------------------------------------------------


def test_mnist_reads_torchvisions_raw_idx_files(tmp_path):
    (train_x, train_y), (test_x, test_y) = write_mnist(tmp_path, n_train=30, n_test=10)
    dataset = MNIST(root=str(tmp_path))
    info = dataset.info()
    assert info.shape == (1, 28, 28) and info.num_classes == 10
    splits = dataset.load(seed=0)
    _check_splits(splits, info, 30, 10)
    assert torch.equal(splits.train_labels, torch.as_tensor(train_y, dtype=torch.long))
    assert torch.equal(splits.test_labels, torch.as_tensor(test_y, dtype=torch.long))
    assert torch.allclose(splits.train_images[:, 0], torch.as_tensor(train_x, dtype=torch.float32) / 255)
    assert torch.bincount(splits.train_labels, minlength=10).tolist() == [3] * 10


def test_grey_mnist_feeds_a_three_channel_model(tmp_path):
    write_mnist(tmp_path)
    splits = MNIST(root=str(tmp_path)).load()
    fitted = fit_images(splits.train_images, (3, 32, 32))
    assert tuple(fitted.shape) == (30, 3, 32, 32) and fitted.min() >= 0 and fitted.max() <= 1
    assert torch.equal(fitted[:, 0], fitted[:, 2])  # grey copied into each channel
    from gileak.default_plugins.models import CNN

    net = CNN().build((3, 32, 32), 10)
    assert tuple(net(fitted[:2]).shape) == (2, 10)


# --- CIFAR-10 -----------------------------------------------------------------------------------


def test_cifar10_reads_the_pickled_batches(tmp_path):
    first = write_cifar10(tmp_path, per_batch=20, n_test=20)
    dataset = CIFAR10(root=str(tmp_path))
    info = dataset.info()
    assert info.shape == (3, 32, 32) and info.class_names == CIFAR10_CLASSES
    with pytest.warns(UserWarning, match="not the official CIFAR-10 release"):
        splits = dataset.load(seed=0)
    _check_splits(splits, info, 100, 20)
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    expected = torch.as_tensor(first[0].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.allclose(splits.train_images[0], expected)
    assert torch.bincount(splits.train_labels, minlength=10).tolist() == [10] * 10
    assert torch.bincount(splits.test_labels, minlength=10).tolist() == [2] * 10


def test_rgb_cifar10_feeds_a_one_channel_model(tmp_path):
    write_cifar10(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = CIFAR10(root=str(tmp_path)).load()
    fitted = fit_images(splits.test_images, (1, 28, 28))
    assert tuple(fitted.shape) == (20, 1, 28, 28) and fitted.min() >= 0 and fitted.max() <= 1


def test_a_corrupt_cifar_batch_is_a_data_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataUnavailableError, match="gileak data fetch cifar10"):
            CIFAR10(root=str(tmp_path)).load()


# --- MedMNIST -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", sorted(MEDMNIST))
def test_declared_shape_and_classes_match_medmnist_info(flag):
    from medmnist import INFO

    shape, names = MEDMNIST[flag].shape, MEDMNIST[flag].class_names
    assert shape == (INFO[flag]["n_channels"], 28, 28)
    assert names == tuple(INFO[flag]["label"][str(i)] for i in range(len(INFO[flag]["label"])))
    assert MEDMNIST[flag].python_class == INFO[flag]["python_class"]


@pytest.mark.parametrize("flag", sorted(MEDMNIST))
def test_medmnist_reads_the_npz_train_and_test_splits(tmp_path, flag):
    cls = MEDMNIST[flag]
    channels, classes = cls.shape[0], len(cls.class_names)
    arrays = write_medmnist(tmp_path, flag, channels, classes, counts=(12, 4, 6))
    dataset = cls(root=str(tmp_path))
    info = dataset.info()
    assert info.shape == (channels, 28, 28) and info.num_classes == classes
    splits = dataset.load(seed=0)
    _check_splits(splits, info, 12, 6)  # val (4 images) is not used
    assert torch.equal(splits.train_labels, torch.as_tensor(arrays["train_labels"][:, 0], dtype=torch.long))
    first = torch.as_tensor(arrays["test_images"][0], dtype=torch.float32) / 255
    first = first.unsqueeze(0) if channels == 1 else first.permute(2, 0, 1)
    assert torch.allclose(splits.test_images[0], first)
    other = 3 if channels == 1 else 1
    assert fit_images(splits.train_images, (other, 32, 32)).shape == (12, other, 32, 32)


def test_medmnist_size_picks_the_sized_file(tmp_path):
    write_medmnist(tmp_path, "bloodmnist", 3, 8, size=64)
    with pytest.raises(DataUnavailableError, match="bloodmnist.npz"):
        BloodMNIST(root=str(tmp_path)).info()
    dataset = BloodMNIST(root=str(tmp_path), size=64)
    assert dataset.info().shape == (3, 64, 64)
    assert tuple(dataset.load().train_images.shape) == (12, 3, 64, 64)
    with pytest.raises(ParamsError, match="28, 64, 128, 224"):
        BloodMNIST(size=32)


# --- the data root and missing files --------------------------------------------------------------


def test_data_root_order_flag_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("GILEAK_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "gileak"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_root() == Path.home() / ".cache" / "gileak"
    monkeypatch.setenv("GILEAK_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert MNIST().root() == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert MNIST(root=str(tmp_path / "param")).root() == tmp_path / "param"


@pytest.mark.parametrize("cls", [MNIST, CIFAR10, *MEDMNIST.values()], ids=lambda c: c.name)
def test_missing_files_name_the_directory_and_the_fetch_command(tmp_path, cls):
    with pytest.raises(DataUnavailableError) as caught:
        cls(root=str(tmp_path)).info()
    message = str(caught.value)
    assert str(tmp_path) in message and f"gileak data fetch {cls.name}" in message


def test_the_runner_hands_the_spec_data_root_to_datasets(tmp_path):
    from gileak.runner import plan
    from gileak.spec import build_spec

    write_mnist(tmp_path / "a")
    spec_file = tmp_path / "bench.toml"
    spec_file.write_text(f'datasets = "mnist"\ndata_root = "{tmp_path / "a"}"\n')
    the_plan = plan(build_spec(spec_file))
    dataset = the_plan.cells[0].dataset
    assert dataset.component.root() == tmp_path / "a" and dataset.label == "mnist"
    with pytest.raises(DataUnavailableError, match=str(tmp_path / "b")):  # the flag overrides the file
        plan(build_spec(spec_file, data_root=tmp_path / "b"))
    # a dataset's own root= wins over the spec's
    own = plan(build_spec(datasets=f"mnist(root={tmp_path / 'a'})", data_root=tmp_path / "b"))
    assert own.cells[0].dataset.component.root() == tmp_path / "a"


# --- the command line -------------------------------------------------------------------------------


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_on_an_empty_data_root_exits_2_without_a_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--datasets", "cifar10", "--data-root", tmp_path, "--out", tmp_path / "run")
    assert code == 2
    text = " ".join(err.split())
    assert "gileak data fetch cifar10" in text and "Traceback" not in out + err
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_bench_end_to_end_on_a_tiny_cifar10(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GILEAK_NO_LPIPS", "1")
    write_cifar10(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run(capsys, "bench", "--datasets", "cifar10", "--data-root", tmp_path / "data",
                             "--victims", 1, "--iterations", 2, "--out", tmp_path / "run")
    assert code == 0, err
    # The printed table's width depends on the terminal; the run directory's record does not.
    import json

    rows = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [(r["dataset"], r["status"]) for r in rows] == [("cifar10", "ok")]
    assert "leaderboard" in out


def test_train_takes_data_root(capsys, tmp_path, monkeypatch):
    write_medmnist(tmp_path / "data", "pneumoniamnist", 1, 2, counts=(40, 4, 10))
    code, out, err = run(capsys, "train", "--dataset", "pneumoniamnist", "--data-root", tmp_path / "data",
                         "--rounds", 1, "--clients", 2, "--out", tmp_path / "train", "--json")
    assert code == 0, err
    assert '"dataset": "pneumoniamnist"' in out
    code, _, err = run(capsys, "train", "--dataset", "pneumoniamnist", "--data-root", tmp_path / "none",
                       "--rounds", 1)
    assert code == 2 and "gileak data fetch pneumoniamnist" in " ".join(err.split())


def test_data_list_shows_where_and_whether(capsys, tmp_path):
    import json

    write_mnist(tmp_path)
    code, out, _ = run(capsys, "data", "list", "--data-root", tmp_path, "--json")
    assert code == 0
    listing = json.loads(out)
    assert listing["data_root"] == str(tmp_path)
    present = {row["name"]: row["present"] for row in listing["datasets"]}
    assert present == {"mnist": True, "cifar10": False, "pneumoniamnist": False, "dermamnist": False,
                       "retinamnist": False, "bloodmnist": False}
    code, out, _ = run(capsys, "data", "list", "--data-root", tmp_path)
    assert code == 0 and "cifar-10-batches-py" in out and "gileak data fetch" in out


def test_data_fetch_offline_says_so_plainly(capsys, tmp_path):
    """No network here: the download fails, and gileak says why in one paragraph (exit 1)."""
    code, out, err = run(capsys, "data", "fetch", "mnist", "--data-root", tmp_path)
    text = " ".join(err.split())
    assert "Traceback" not in out + err
    if code == 0:  # a machine with network access really downloaded it
        assert MNIST(root=str(tmp_path)).present()
        return
    assert code == 1 and "Could not download mnist" in text and str(tmp_path) in text


def test_data_fetch_of_something_already_there_or_not_downloadable(capsys, tmp_path):
    write_mnist(tmp_path)
    code, _, err = run(capsys, "data", "fetch", "mnist", "--data-root", tmp_path)
    assert code == 0 and "already in" in err
    assert run(capsys, "data", "fetch", "digits")[0] == 2
    code, _, err = run(capsys, "data", "fetch", "mnsit")
    assert code == 2 and "Did you mean" in err
