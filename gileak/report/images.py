"""Per-victim images of a result, kept in the run directory as an `.npz` of 8-bit arrays so the
HTML report can show and caption each victim later, from the directory alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Version of the `.npz` layout below; a file with another one is not read.
FORMAT = 1


@dataclass
class VictimImages:
    """Originals and reconstructions, (N, C, H, W) uint8, in the victims' stored order."""

    originals: np.ndarray
    reconstructions: np.ndarray
    victims: np.ndarray
    cell: str
    attack: str


def _to_uint8(images) -> np.ndarray:
    """Images in [0, 1] (a tensor or array; NaN shown black) as 8-bit; 8-bit ones as they are."""
    array = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.dtype == np.uint8:
        return array
    array = np.nan_to_num(array.astype(np.float32), nan=0.0)
    return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)


def save_victim_images(originals, reconstructions, path: str | Path, *, cell: str, attack: str,
                       victims: list[int]) -> Path:
    """Write `path` (.npz, compressed, no pickled objects): the images as 8-bit arrays, the
    victims' indices, and the result's store key, so a reader can tell the file belongs to it.
    Written to a temporary name first: a killed run leaves no half-written file under `path`."""
    originals, reconstructions = _to_uint8(originals), _to_uint8(reconstructions)
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(f"originals {originals.shape} and reconstructions {reconstructions.shape} must be the "
                         "same (N, C, H, W)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, format=np.int64(FORMAT), originals=originals, reconstructions=reconstructions,
                            victims=np.asarray(victims, dtype=np.int64), cell=np.str_(cell), attack=np.str_(attack))
    os.replace(tmp, path)
    return path


class UnreadableImages(ValueError):
    """A victim-images file that is missing pieces, malformed, or not ours."""


def load_victim_images(path: str | Path) -> VictimImages:
    """Read a file written by `save_victim_images`. Never unpickles: a file holding Python
    objects is refused. Raises UnreadableImages with the reason for anything else amiss."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            missing = {"format", "originals", "reconstructions", "victims", "cell", "attack"} - names
            if missing:
                raise UnreadableImages(f"it lacks {', '.join(sorted(missing))}")
            if int(data["format"]) != FORMAT:
                raise UnreadableImages(f"it has layout {int(data['format'])}; this gileak reads {FORMAT}")
            images = VictimImages(data["originals"], data["reconstructions"], data["victims"],
                                  str(data["cell"]), str(data["attack"]))
    except UnreadableImages:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise UnreadableImages(f"{type(e).__name__}: {e}") from e
    shape = images.originals.shape
    if (images.originals.dtype != np.uint8 or images.reconstructions.dtype != np.uint8
            or images.originals.ndim != 4 or images.reconstructions.shape != shape
            or shape[1] not in (1, 3) or images.victims.shape != (shape[0],)):
        raise UnreadableImages("its arrays are not two matching (N, 1|3, H, W) uint8 stacks with N victim indices")
    return images
