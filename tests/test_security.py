"""No code runs from data: hostile files where gileak reads datasets, LPIPS weights and
checkpoints are refused with a clear error, and their payload (which would create a marker file)
never runs. Real-format files still load: CIFAR-10 batches pickled as Python 2 and 3 write them,
a state dict of torchvision's AlexNet."""

from __future__ import annotations

import ast
import builtins
import hashlib
import os
import pickle
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gileak import metrics
from gileak.default_plugins.datasets import CIFAR10, CIFAR10_MD5, MNIST, PneumoniaMNIST
from gileak.errors import DataUnavailableError, RefusedFileError
from gileak.safeload import load_tensors, restricted_unpickle

ROOT = Path(__file__).resolve().parents[1]
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


# --- payloads: each would create `marker` if it ever ran ----------------------------------------


class SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class OpenPayload(SystemPayload):
    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


class ExecPayload(SystemPayload):
    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = [SystemPayload, OpenPayload, ExecPayload]
PAYLOAD_IDS = ["os.system", "builtins.open", "builtins.exec"]


def hostile_batch(payload, protocol=pickle.DEFAULT_PROTOCOL) -> bytes:
    """A CIFAR batch in every other respect, with the payload among its values."""
    batch = {"batch_label": "hostile", "labels": [0, 1], "data": np.zeros((2, 3072), np.uint8), "extra": payload}
    return pickle.dumps(batch, protocol=protocol)


def write_cifar10(root: Path, per_batch: int = 4, hostile: dict[str, bytes] | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name in CIFAR_BATCHES:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": [i % 10 for i in range(per_batch)], "data": data,
                 "filenames": [f"{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes((hostile or {}).get(name) or pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps(SystemPayload(root / "meta-ran")))  # never unpickled
    return folder


def official_md5s(folder: Path, monkeypatch) -> None:
    """Make gileak take the files in `folder` for the official release (their md5 is 'published')."""
    md5s = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in CIFAR_BATCHES}
    monkeypatch.setattr("gileak.default_plugins.datasets.CIFAR10_MD5", md5s)


# --- CIFAR-10 -----------------------------------------------------------------------------------


def test_our_cifar10_md5s_are_torchvisions():
    from torchvision.datasets import CIFAR10 as TorchCIFAR10

    assert CIFAR10_MD5 == dict(TorchCIFAR10.train_list + TorchCIFAR10.test_list)


@pytest.mark.parametrize("official", [False, True], ids=["md5-differs", "md5-matches"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_a_hostile_cifar_batch_is_refused_whether_or_not_its_md5_matches(tmp_path, monkeypatch, payload, official):
    marker = tmp_path / "payload-ran"
    folder = write_cifar10(tmp_path, hostile={"data_batch_2": hostile_batch(payload(marker))})
    if official:
        official_md5s(folder, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataUnavailableError) as error:
            CIFAR10(root=str(tmp_path)).load()
    message = str(error.value)
    assert str(folder / "data_batch_2") in message and "refused" in message
    assert payload.__name__ != "SystemPayload" or "posix.system" in message
    assert "gileak data fetch cifar10" in message and "nothing in it was run" in message
    assert not marker.exists() and not (tmp_path / "meta-ran").exists()
    if official:  # taken for the official release: no warning, and refused all the same
        assert not [w for w in caught if "not the official" in str(w.message)]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_hostile_pickle_is_refused_at_every_protocol(tmp_path, protocol):
    marker = tmp_path / "payload-ran"
    with pytest.raises(Exception, match="posix.system|os.system|nt.system"):
        restricted_unpickle(hostile_batch(SystemPayload(marker), protocol))
    assert not marker.exists()


def test_official_files_load_without_a_warning_and_others_with_one(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="not the official CIFAR-10 release.*data_batch_1.*restricted"):
        unofficial = CIFAR10(root=str(tmp_path)).load()
    official_md5s(folder, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = CIFAR10(root=str(tmp_path)).load()
    assert tuple(splits.train_images.shape) == (20, 3, 32, 32) and tuple(splits.test_images.shape) == (4, 3, 32, 32)
    assert torch.equal(splits.train_images, unofficial.train_images)
    first = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0]
    assert torch.equal(splits.train_images[0], torch.from_numpy(first.reshape(3, 32, 32)).float() / 255)


def _py2_str(raw: bytes) -> bytes:
    """A Python 2 `str` as cPickle writes it (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(raw)]) + raw) if len(raw) < 256 else (b"T" + struct.pack("<i", len(raw)) + raw)


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch byte for byte as Python 2's cPickle and numpy 1 wrote the official files: protocol 2,
    str keys and array bytes as 8-bit strings, numpy.core.multiarray._reconstruct."""
    rows, columns = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
             + b"(K\x01J" + struct.pack("<i", rows) + b"M" + struct.pack("<H", columns) + b"\x86"
             + b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"\x89\x88\x87R"
             + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + _py2_str(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(b"training batch 1 of 5")
            + _py2_str(b"data") + array + _py2_str(b"labels") + label_list + b"u.")


def test_python2_and_bytes_keyed_batches_load(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    folder = write_cifar10(tmp_path, per_batch=3)
    (folder / "data_batch_1").write_bytes(python2_batch(data, [3, 1, 4]))
    bytes_keyed = {b"batch_label": b"x", b"labels": [1, 5, 9], b"data": data, b"filenames": [b"a", b"b", b"c"]}
    (folder / "test_batch").write_bytes(pickle.dumps(bytes_keyed, protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = CIFAR10(root=str(tmp_path)).load()
    expected = torch.from_numpy(data.reshape(3, 3, 32, 32)).float() / 255
    assert torch.equal(splits.train_images[:3], expected) and splits.train_labels[:3].tolist() == [3, 1, 4]
    assert torch.equal(splits.test_images, expected) and splits.test_labels.tolist() == [1, 5, 9]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batches_repickled_at_any_protocol_load(protocol):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = restricted_unpickle(pickle.dumps({"data": data, "labels": [1, 2], "name": b"x"}, protocol=protocol))
    assert np.array_equal(batch["data"], data) and batch["labels"] == [1, 2] and batch["name"] == b"x"


@pytest.mark.parametrize("batch, problem", [
    ([1, 2, 3], "not a dict"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "float32"),
    ({"data": np.array([[0] * 3072] * 2, dtype=object), "labels": [0, 1]}, "object"),
    ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, "3072"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "outside 0-9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "2 images but 1 labels"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "not a list of integers"),
], ids=["list", "float", "object-array", "short-rows", "label-10", "label-count", "string-labels"])
def test_a_pickle_that_is_not_a_cifar_batch_is_a_data_error(tmp_path, batch, problem):
    write_cifar10(tmp_path, hostile={"test_batch": pickle.dumps(batch)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataUnavailableError, match=problem):
            CIFAR10(root=str(tmp_path)).load()


def test_other_codecs_in_a_pickle_are_refused():
    # _codecs.encode is admitted for latin1 alone (how Python 3 pickles bytes at protocols 0-2)
    text = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(Exception, match="codec 'zlib'"):
        restricted_unpickle(text)


def test_the_cli_on_a_hostile_cifar_root_runs_nothing_and_scores_nothing(capsys, tmp_path, monkeypatch):
    """`gileak train` stops with exit 2; `gileak bench` reads data per cell at run time, so the cell
    fails with the reason (exit 1) and its row carries no number."""
    import json

    from gileak.cli import main

    monkeypatch.setenv("GILEAK_NO_LPIPS", "1")
    marker = tmp_path / "payload-ran"
    write_cifar10(tmp_path / "data", hostile={"data_batch_1": hostile_batch(SystemPayload(marker))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--rounds", "1",
                      "--out", str(tmp_path / "train")])
        train_text = " ".join(capsys.readouterr().err.split())
        bench = main(["bench", "--datasets", "cifar10", "--data-root", str(tmp_path / "data"), "--victims", "1",
                      "--iterations", "1", "--out", str(tmp_path / "run")])
        bench_text = " ".join("".join(capsys.readouterr()).split())
    assert train == 2, train_text
    for text in (train_text, bench_text):
        assert "refused" in text and "posix.system" in text and "gileak data fetch cifar10" in text
        assert "Traceback" not in text
    assert bench == 1
    rows = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["status"] for r in rows] == ["failed"] and rows[0]["ssim_mean"] is None
    assert not marker.exists()


# --- the other dataset readers --------------------------------------------------------------------


def test_a_hostile_mnist_cache_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        torch.save(SystemPayload(marker), processed / name)
    with pytest.raises(DataUnavailableError, match="refused.*nothing in it was run"):
        MNIST(root=str(tmp_path)).load()
    assert not marker.exists()


def test_an_mnist_cache_of_the_wrong_shape_is_a_data_error(tmp_path):
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        torch.save({"not": torch.zeros(2)}, processed / name)
    with pytest.raises(DataUnavailableError, match="not torchvision's MNIST cache"):
        MNIST(root=str(tmp_path)).load()
    good = (torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([1, 2, 3]))
    for name in ("training.pt", "test.pt"):
        torch.save(good, processed / name)
    assert MNIST(root=str(tmp_path)).load().train_labels.tolist() == [1, 2, 3]


def test_a_medmnist_file_with_pickled_objects_is_refused(tmp_path):
    # np.savez pickles object arrays; medmnist reads with numpy's default allow_pickle=False.
    marker = tmp_path / "payload-ran"
    labels = np.zeros((2, 1), np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.array([SystemPayload(marker)] * 2, dtype=object),
             train_labels=labels, val_images=np.zeros((2, 28, 28), np.uint8), val_labels=labels,
             test_images=np.zeros((2, 28, 28), np.uint8), test_labels=labels)
    with pytest.raises(DataUnavailableError, match="allow_pickle"):
        PneumoniaMNIST(root=str(tmp_path)).load()
    assert not marker.exists()


# --- tensor files: LPIPS weights and training checkpoints -------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("GILEAK_NO_LPIPS", raising=False)
    checkpoint = tmp_path / "hub" / "checkpoints" / metrics.ALEXNET_CHECKPOINT
    checkpoint.parent.mkdir(parents=True)
    return checkpoint


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _random_alexnet(path):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(state, path)
    return state


def test_lpips_uses_the_alexnet_checkpoint_it_was_given(torch_home, monkeypatch):
    """The numbers are not the published LPIPS (a random AlexNet, let through by pretending its
    digest is the published one), but the pipeline is the real one and the file's weights are the
    ones in the network."""
    import hashlib

    state = _random_alexnet(torch_home)
    monkeypatch.setattr(metrics, "ALEXNET_SHA256_PREFIX", hashlib.sha256(torch_home.read_bytes()).hexdigest()[:8])
    available, reason = metrics.lpips_status()
    assert available, reason
    x = images()
    same, different = metrics.lpips_distances(x, x), metrics.lpips_distances(images(seed=1), x)
    assert same == pytest.approx([0.0] * 3, abs=1e-6) and all(v > 0 for v in different)
    net = metrics._lpips_net("cpu")
    for slice_name, layer in (("slice1", 0), ("slice2", 3), ("slice3", 6), ("slice4", 8), ("slice5", 10)):
        conv = getattr(getattr(net.net, slice_name), str(layer))  # lpips keeps torchvision's layer numbers
        assert torch.equal(conv.weight, state[f"features.{layer}.weight"])
        assert torch.equal(conv.bias, state[f"features.{layer}.bias"])
    shipped = torch.load(metrics._lpips_linear_weights(), map_location="cpu", weights_only=True)
    assert all(torch.equal(net.lins[k].model[1].weight, shipped[f"lin{k}.model.1.weight"]) for k in range(5))
    # the same numbers as lpips' own constructor, which loads this (our own, harmless) file unchecked
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        expected = reference(images(seed=1) * 2 - 1, x * 2 - 1).flatten().tolist()
    assert different == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_hostile_alexnet_checkpoint_is_refused(torch_home, tmp_path, payload, writer):
    marker = tmp_path / "payload-ran"
    if writer == "torch.save":
        torch.save({"features.0.weight": payload(marker)}, torch_home)
    else:
        torch_home.write_bytes(pickle.dumps(payload(marker)))
    available, reason = metrics.lpips_status()
    assert not available
    assert str(torch_home) in reason and "refused" in reason and "nothing in it was run" in reason
    assert "weights_only" not in reason  # torch's advice to load it unsafely is not passed on
    assert metrics.lpips_distances(images(), images()) is None
    assert not marker.exists()


@pytest.mark.parametrize("content, problem", [
    (lambda sd: [sd["features.0.weight"]], "holds a list"),
    (lambda sd: {k: v for k, v in sd.items() if k != "features.3.bias"}, "missing features.3.bias"),
    (lambda sd: {**sd, "features.0.weight": torch.zeros(32, 3, 11, 11)}, r"shape \(32, 3, 11, 11\)"),
    (lambda sd: {**sd, "features.6.bias": torch.full((384,), float("nan"))}, "non-finite"),
    (lambda sd: {**sd, "extra.weight": torch.zeros(1)}, "unexpected extra.weight"),
    (lambda sd: {**sd, "features.8.bias": torch.zeros(256, dtype=torch.long)}, "not a floating-point"),
], ids=["list", "missing-key", "wrong-shape", "nan", "unexpected-key", "integer"])
def test_a_malformed_alexnet_checkpoint_makes_lpips_unavailable(torch_home, content, problem):
    import torchvision

    features = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                if k.startswith("features.")}
    torch.save(content(features), torch_home)
    available, reason = metrics.lpips_status()
    assert not available and "not torchvision's AlexNet state dict" in reason
    assert re.search(problem, reason), reason


def test_alexnet_shaped_weights_that_are_not_torchvisions_make_lpips_unavailable(torch_home):
    """Right keys and shapes, other values: the column would not be the published metric."""
    _random_alexnet(torch_home)
    available, reason = metrics.lpips_status()
    assert not available and "not torchvision's published ones" in reason and "7be5be79" in reason
    assert metrics.lpips_distances(images(), images()) is None


def test_lpips_without_the_checkpoint_keeps_its_offline_reason(torch_home):
    available, reason = metrics.lpips_status()
    assert not available and "are never downloaded" in reason and str(torch_home) in reason


def test_checkpoints_load_tensors_only(tmp_path):
    from gileak.cli.train_cmd import load_checkpoint

    state = {"0.weight": torch.randn(3, 2), "0.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "model_seed0.pt")
    loaded = load_checkpoint(tmp_path / "model_seed0.pt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    marker = tmp_path / "payload-ran"
    torch.save({"0.weight": SystemPayload(marker)}, tmp_path / "model_seed1.pt")
    with pytest.raises(RefusedFileError, match="refused"):
        load_checkpoint(tmp_path / "model_seed1.pt")
    (tmp_path / "model_seed2.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RefusedFileError, match="refused|not a torch file"):
        load_tensors(tmp_path / "model_seed2.pt")
    assert not marker.exists()


# --- the source: no unsafe loader comes back ------------------------------------------------------


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("folder", ["gileak", "plugins", "benchmarks"])
def test_no_unsafe_loader_in_the_source(folder):
    """torch.load only tensors-only, no pickle.load(s) outside the restricted unpickler, np.load never
    with pickles, and no eval/exec, yaml, shelve, marshal or TorchScript loading."""
    forbidden = {"eval", "exec", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "shelve.open",
                 "marshal.loads", "torch.jit.load", "dill.load", "dill.loads", "joblib.load", "torch.hub.load",
                 "torch.hub.load_state_dict_from_url", "load_state_dict_from_url"}
    problems = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for call, name in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            keywords = {k.arg: k.value for k in call.keywords}
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            if name in forbidden:
                problems.append(where)
            elif name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                               and keywords["weights_only"].value is True):
                problems.append(where + " without weights_only=True")
            elif name in ("np.load", "numpy.load") and "allow_pickle" in keywords and not (
                    isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
                problems.append(where + " with allow_pickle")
            elif name in ("pickle.Unpickler", "Unpickler") and path.name != "safeload.py":
                problems.append(where)
    assert not problems, problems


def test_the_restricted_unpickler_admits_only_array_reconstruction():
    from gileak.safeload import _array_globals

    assert {module.split(".")[0] for module, _ in _array_globals()} == {"numpy", "_codecs"}
    # a global numpy has but a batch never needs is refused like any other
    with pytest.raises(Exception, match="numpy.load"):
        restricted_unpickle(b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.")
    assert restricted_unpickle(pickle.dumps({"a": [1, "b", b"c", 2.5, (3,)]})) == {"a": [1, "b", b"c", 2.5, (3,)]}
