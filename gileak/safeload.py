"""Reading files that a user or a download put on disk, without running anything they contain:
tensor files through torch's weights-only loader, CIFAR-10's pickles through a restricted unpickler."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from gileak.errors import RefusedFileError


def _torch_refusal(error: BaseException) -> str:
    """What torch's weights-only loader met, without its advice to load the file unsafely."""
    import re

    text = str(error)
    found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, flags=re.IGNORECASE)
    if found:
        return f"it names {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"pickle opcode {found.group(1)}, which tensor files do not use"
    found = re.search(r"Unsupported class ([\w.]+)", text)
    return f"it names {found.group(1)}" if found else "it names a type that is not a tensor or a plain container"


def load_tensors(path: str | Path) -> Any:
    """torch.load(path, weights_only=True) onto the CPU: tensors, numbers, strings and plain
    containers only. A file that names any other global (a class, os.system) or is not a torch file
    raises RefusedFileError saying so; its contents are never run."""
    import warnings

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it does not expect
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RefusedFileError(f"{path} was refused: it holds something other than tensors "
                               f"({_torch_refusal(e)}); nothing in it was run.") from None
    except OSError as e:
        raise RefusedFileError(f"{path} cannot be read: {e.strerror or e}.") from None
    except Exception as e:  # a truncated or foreign file fails anywhere in torch's reader
        detail = " ".join(str(e).split())[:200]
        detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise RefusedFileError(f"{path} is not a torch file that can be read ({detail}).") from None


# --- CIFAR-10's pickles -------------------------------------------------------------------------


class RefusedPickleError(Exception):
    """A pickle named a global outside the admitted set; nothing it named was called."""


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode`, as a Python 3 pickle at protocol 0-2 writes bytes, for the one codec
    such pickles use; another codec is refused rather than looked up."""
    import codecs

    if encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise RefusedPickleError(f"_codecs.encode with the codec {encoding!r}")
    return codecs.latin_1_encode(text)[0]


def _array_globals() -> dict[tuple[str, str], Any]:
    """Every global a pickled numpy array may name: its reconstruction under numpy 1's and
    numpy 2's module names (protocol 5 rebuilds it from a buffer), ndarray and dtype."""
    import numpy

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): numpy.ndarray, ("numpy", "dtype"): numpy.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes and what the pickle opcodes build without naming a global:
    dicts, lists, tuples, strings, bytes, numbers. Any other global (os.system, builtins.eval,
    any class) raises RefusedPickleError before it is called; persistent ids are refused too."""

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._allowed = _array_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedPickleError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickleError(f"a persistent id ({type(pid).__name__})")


def restricted_unpickle(data: bytes) -> Any:
    """Unpickle `data` with ArrayUnpickler; Python 2 strings are decoded as latin1, as torchvision
    reads CIFAR-10 (numpy's Python 2 arrays need it)."""
    return ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
