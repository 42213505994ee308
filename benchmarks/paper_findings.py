"""The paper's central privacy findings, scaled down, on images no gileak default was tuned on.

Writes textured 32x32 patches cut from scikit-learn's two bundled photos (china.jpg, flower.jpg — not
used by the `photos` dataset nor for choosing any default) into a folder, then runs

    gileak bench --datasets folder(path=...) --defenses none,precode(position=3),
        precode(position=1),cvb,dp(sigma=1),gc(ratio=0.99) --attacks ig,ignore
        --victims 8 --iterations 2000 --rounds 10

and prints the leaderboard. What the paper reports (Tables I, II, IV; Section III):
IG reconstructs the undefended CNN; PRECODE at position 3 resists IG but Ignore breaks it;
PRECODE and CVB at position 1 hold against Ignore; DP with sigma = 1 and GC with p = 0.99
stop the attack.

The models are trained for 10 federated rounds first: at initialisation a variational
bottleneck's sigma (softplus(0) ~ 0.69) swamps mu, so its latent is nearly pure noise and even
Ignore cannot get through; the paper attacks trained models. The attacks run gileak's default
schedule (cosine decay over the 2,000-iteration cap, lr 0.1, TV 0.05: the strongest at such caps,
docs/attack-strength.md), not the paper's plateau rule (`--profile paper`).

Usage: python benchmarks/paper_findings.py [--iterations 2000] [--rounds 10] [--victims 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFENSES = "none,precode(position=3),precode(position=1),cvb,dp(sigma=1),gc(ratio=0.99)"
ATTACKS = "ig,ignore"


def write_unseen_images(folder: Path, size: int = 32, min_std: float = 0.08) -> int:
    """Square windows of 1/8 of each photo's height, stride half a window, resized to `size`;
    flat windows (pixel std < min_std: sky, smooth petals) are skipped, as SSIM on a flat image
    measures noise rather than content."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    count = 0
    for path, image in zip(bunch.filenames, bunch.images):
        name = Path(path).stem
        (folder / name).mkdir(parents=True, exist_ok=True)
        height, width, _ = image.shape
        window = height // 8
        for y in range(0, height - window + 1, window // 2):
            for x in range(0, width - window + 1, window // 2):
                crop = image[y:y + window, x:x + window]
                if (crop / 255.0).std() < min_std:
                    continue
                Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC).save(folder / name / f"{y}_{x}.png")
                count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("gileak-runs/paper-findings"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    folder = args.out / "unseen-images"
    count = write_unseen_images(folder)
    print(f"{count} unseen 32x32 patches from scikit-learn's china.jpg and flower.jpg in {folder}")
    from gileak.cli import main as gileak

    return gileak([
        "bench", "--datasets", f"folder(path={folder})", "--defenses", DEFENSES, "--rounds", str(args.rounds),
        "--attacks", ATTACKS, "--victims", str(args.victims), "--iterations", str(args.iterations),
        "--device", args.device, "--out", str(args.out / "run"), "--export", str(args.out / "leaderboard.md"),
        "--export", str(args.out / "leaderboard.json"),
    ])


if __name__ == "__main__":
    sys.exit(main())
