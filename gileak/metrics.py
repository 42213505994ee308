"""Reconstruction quality, per victim: SSIM (scikit-image, data range 1), PSNR, MSE, LPIPS,
and the attack success rate (share of victims with SSIM >= 0.5, as in the paper)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

#: The paper counts an attack as successful on a victim when SSIM >= 0.5.
ASR_THRESHOLD = 0.5
#: torchvision's AlexNet checkpoint, which lpips builds its network on.
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"
#: torchvision names its checkpoints after the start of their SHA-256: the published weights only.
ALEXNET_SHA256_PREFIX = "7be5be79"


def _pairs(reconstructions: torch.Tensor, originals: torch.Tensor):
    rec = torch.as_tensor(reconstructions).detach().float().cpu()
    ori = torch.as_tensor(originals).detach().float().cpu()
    if rec.shape != ori.shape:
        raise ValueError(f"reconstructions {tuple(rec.shape)} and originals {tuple(ori.shape)} differ in shape")
    return rec.clamp(0, 1), ori.clamp(0, 1)


def ssim(reconstructions: torch.Tensor, originals: torch.Tensor) -> list[float]:
    """Per-image SSIM over (N, C, H, W) images in [0, 1]; the window is 7 or the largest odd size
    that fits (8x8 digits get 7, a 5x5 image gets 5)."""
    from skimage.metrics import structural_similarity

    rec, ori = _pairs(reconstructions, originals)
    side = min(rec.shape[-2:])
    win_size = min(7, side if side % 2 else side - 1)
    values = []
    for r, o in zip(rec.numpy(), ori.numpy()):
        values.append(float(structural_similarity(o, r, data_range=1.0, channel_axis=0, win_size=win_size)))
    return values


def mse(reconstructions: torch.Tensor, originals: torch.Tensor) -> list[float]:
    rec, ori = _pairs(reconstructions, originals)
    return (rec - ori).pow(2).flatten(1).mean(1).tolist()


def psnr(reconstructions: torch.Tensor, originals: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB for data range 1; identical images give +inf."""
    return [10 * math.log10(1.0 / m) if m > 0 else math.inf for m in mse(reconstructions, originals)]


def attack_success_rate(ssim_values: Sequence[float], threshold: float = ASR_THRESHOLD) -> float:
    """Percentage of victims whose reconstruction reaches `threshold` SSIM."""
    if not ssim_values:
        return float("nan")
    return 100.0 * sum(v >= threshold for v in ssim_values) / len(ssim_values)


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """(mean, population std) of the finite values; NaN when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


def alexnet_checkpoint() -> Path:
    """Where torchvision keeps AlexNet's weights (under $TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT


def lpips_status() -> tuple[bool, str]:
    """(available, reason). LPIPS needs the lpips package and torchvision's AlexNet weights;
    we never download them, so offline it is reported as unavailable with the reason. The weights
    are read tensors-only and checked against the network: a file that holds code or the wrong
    tensors makes LPIPS unavailable with that reason."""
    from gileak.errors import RefusedFileError

    if os.environ.get("GILEAK_NO_LPIPS"):
        return False, "LPIPS switched off by GILEAK_NO_LPIPS"
    try:
        import lpips  # noqa: F401
    except ImportError as e:
        return False, f"LPIPS unavailable: the lpips package cannot be imported ({e})"
    checkpoint = alexnet_checkpoint()
    if not checkpoint.is_file():
        return False, (f"LPIPS unavailable: torchvision's AlexNet weights are not at {checkpoint} and are never "
                       "downloaded at run time; put them there to get LPIPS")
    try:
        _lpips_loaded(checkpoint)
    except RefusedFileError as e:
        return False, f"LPIPS unavailable: {e} Put torchvision's AlexNet weights ({ALEXNET_CHECKPOINT}) there to get LPIPS"
    return True, "LPIPS (AlexNet) available"


def _file_identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _lpips_template() -> torch.nn.Module:
    """lpips' AlexNet LPIPS with nothing loaded: no pretrained backbone (torchvision would
    torch.load it with weights_only off) and no linear layers (lpips would load them itself)."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of lpips' `pretrained=` argument
        return lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)


def _lpips_linear_weights() -> Path:
    """The linear layers lpips ships (calibrated on human judgements), where lpips itself looks."""
    import inspect

    import lpips

    return Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / "alex.pth"


def _checked(loaded, expected: dict[str, torch.Tensor], path: Path, what: str, ignored: tuple[str, ...] = ()):
    """`loaded` as a state dict with exactly `expected`'s keys and shapes, finite floats; else why not."""
    from collections.abc import Mapping

    from gileak.errors import RefusedFileError

    def refuse(problem: str):
        raise RefusedFileError(f"{path} is not {what}: {problem}.")

    if not isinstance(loaded, Mapping):
        refuse(f"it holds a {type(loaded).__name__}, not a state dict")
    keys = {key for key in loaded if not (isinstance(key, str) and key.startswith(ignored))}
    missing, unexpected = sorted(set(expected) - keys), sorted(map(str, keys - set(expected)))
    if missing or unexpected:
        refuse("; ".join(part for part in (
            f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "",
        ) if part))
    for key, reference in expected.items():
        value = loaded[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            refuse(f"{key} is not a floating-point tensor")
        if value.shape != reference.shape:
            refuse(f"{key} has shape {tuple(value.shape)}, not {tuple(reference.shape)}")
        if not torch.isfinite(value).all():
            refuse(f"{key} holds non-finite values")
    return {key: loaded[key].float() for key in expected}


_LPIPS_LOADED: dict[tuple, torch.nn.Module] = {}


def _lpips_loaded(checkpoint: Path) -> torch.nn.Module:
    """lpips' AlexNet LPIPS on the CPU with the backbone from torchvision's AlexNet checkpoint and
    the linear layers from the lpips package, each read tensors-only and checked key by key and
    shape by shape. Raises RefusedFileError; cached per file (path, size, modification time)."""
    from gileak.safeload import load_tensors

    identity = _file_identity(checkpoint)
    if identity not in _LPIPS_LOADED:
        net = _lpips_template()
        template = net.state_dict()
        # lpips cuts AlexNet's `features` into slices that keep torchvision's layer numbers:
        # net.slice2.3.weight is features.3.weight.
        backbone_keys = {key: "features." + key.split(".", 2)[2] for key in template if key.startswith("net.")}
        backbone = _checked(load_tensors(checkpoint), {theirs: template[ours] for ours, theirs in backbone_keys.items()},
                            checkpoint, "torchvision's AlexNet state dict", ignored=("classifier.",))
        linear_file = _lpips_linear_weights()
        linear_keys = [key for key in template if key.startswith("lin") and not key.startswith("lins.")]
        linear = _checked(load_tensors(linear_file), {key: template[key] for key in linear_keys}, linear_file,
                          "lpips' linear layers for AlexNet")
        state = dict(template)
        state.update({ours: backbone[theirs] for ours, theirs in backbone_keys.items()})
        for key, value in linear.items():  # lpips registers each linear layer twice: lin0 and lins.0
            state[key] = value
            state["lins." + key[len("lin"):]] = value
        net.load_state_dict(state, strict=True)
        _check_digest(checkpoint)
        _LPIPS_LOADED.clear()  # one checkpoint at a time: a replaced file's network is not kept
        _LPIPS_LOADED[identity] = net.eval()
    return _LPIPS_LOADED[identity]


def _check_digest(checkpoint: Path) -> None:
    """Weights of the right shapes but other values (another training run, a random network)
    would give numbers that are not the published LPIPS: only torchvision's file is used."""
    import hashlib

    from gileak.errors import RefusedFileError

    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(ALEXNET_SHA256_PREFIX):
        raise RefusedFileError(
            f"{checkpoint} holds AlexNet-shaped weights, but not torchvision's published ones (its SHA-256 starts "
            f"{digest.hexdigest()[:8]}, not {ALEXNET_SHA256_PREFIX}), so its LPIPS would not be the published metric.")


_LPIPS_NETS: dict[tuple, torch.nn.Module] = {}


def _lpips_net(device: str) -> torch.nn.Module:
    import copy

    checkpoint = alexnet_checkpoint()
    net = _lpips_loaded(checkpoint)
    if torch.device(device).type == "cpu":
        return net
    key = (device, _file_identity(checkpoint))
    if key not in _LPIPS_NETS:
        _LPIPS_NETS.clear()
        _LPIPS_NETS[key] = copy.deepcopy(net).to(device)
    return _LPIPS_NETS[key]


def lpips_distances(reconstructions: torch.Tensor, originals: torch.Tensor, device: str = "cpu") -> list[float] | None:
    """Per-image LPIPS (AlexNet), None when unavailable. Grey images are repeated to 3 channels
    and images smaller than 32 px upsampled, since AlexNet's features need some room."""
    available, _ = lpips_status()
    if not available:
        return None
    rec, ori = _pairs(reconstructions, originals)
    if rec.shape[1] == 1:
        rec, ori = rec.expand(-1, 3, -1, -1), ori.expand(-1, 3, -1, -1)
    if min(rec.shape[-2:]) < 32:
        size = (max(32, rec.shape[-2]), max(32, rec.shape[-1]))
        rec = torch.nn.functional.interpolate(rec, size=size, mode="bilinear", align_corners=False)
        ori = torch.nn.functional.interpolate(ori, size=size, mode="bilinear", align_corners=False)
    from gileak.errors import RefusedFileError

    try:
        net = _lpips_net(device)
    except (RefusedFileError, OSError):  # the file changed or went since lpips_status() checked it
        return None
    with torch.no_grad():
        distance = net(rec.to(device) * 2 - 1, ori.to(device) * 2 - 1)
    return distance.flatten().cpu().tolist()


def pairwise_ssim(reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """SSIM of every reconstruction against every original of one batch, (B_rec, B_orig), with
    the settings of `ssim` (images clamped to [0, 1], data range 1, the same window, uniform
    filter, sample covariance, mean over channels), computed in one vectorised pass in float64
    (scikit-image computes float32 images in float32: the two agree to about 1e-6)."""
    rec = torch.as_tensor(reconstructions).detach().double().cpu().clamp(0, 1)
    ori = torch.as_tensor(originals).detach().double().cpu().clamp(0, 1)
    if rec.dim() != 4 or ori.dim() != 4 or rec.shape[1:] != ori.shape[1:]:
        raise ValueError(f"reconstructions {tuple(rec.shape)} and originals {tuple(ori.shape)} should be "
                         "(B, C, H, W) images of one shape")
    side = min(rec.shape[-2:])
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        raise ValueError(f"images of {tuple(rec.shape[-2:])} pixels are too small for SSIM's window")
    samples = window * window
    covariance_norm = samples / (samples - 1)
    c1, c2 = 0.01**2, 0.03**2

    def local_mean(images: torch.Tensor) -> torch.Tensor:
        # The mean over each window that lies inside the image: scikit-image's uniform filter
        # with its border (where the filter would reflect) cropped away.
        flat = images.reshape(-1, 1, *images.shape[-2:])
        return torch.nn.functional.avg_pool2d(flat, window, stride=1).view(*images.shape[:-2], -1)

    mu_r, mu_o = local_mean(rec), local_mean(ori)  # (B, C, P)
    var_r = covariance_norm * (local_mean(rec * rec) - mu_r**2)
    var_o = covariance_norm * (local_mean(ori * ori) - mu_o**2)
    products = rec.unsqueeze(1) * ori.unsqueeze(0)  # (B_rec, B_orig, C, H, W)
    mu_pairs = mu_r.unsqueeze(1) * mu_o.unsqueeze(0)
    cov = covariance_norm * (local_mean(products) - mu_pairs)
    numerator = (2 * mu_pairs + c1) * (2 * cov + c2)
    denominator = (mu_r.unsqueeze(1) ** 2 + mu_o.unsqueeze(0) ** 2 + c1) * (var_r.unsqueeze(1) + var_o.unsqueeze(0) + c2)
    return (numerator / denominator).mean(dim=-1).mean(dim=-1)


def match_reconstructions(reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """Which reconstruction of a batch goes with which original: `order` with
    reconstructions[order][i] paired to originals[i], the assignment that maximises the total
    SSIM (scipy's linear_sum_assignment on −SSIM). An attack on a batch returns its images in
    no particular order, so per-image metrics need this pairing first.

    This is an evaluation step and uses the ground truth; the attack never sees it (it chooses
    its reconstructions by its own loss). Images (B, C, H, W) give (B,); a batch per victim,
    (N, B, C, H, W), gives (N, B). A non-finite SSIM (a NaN reconstruction) counts as the worst
    possible match, so it is paired with whatever original is left."""
    from scipy.optimize import linear_sum_assignment

    rec, ori = torch.as_tensor(reconstructions), torch.as_tensor(originals)
    if rec.shape != ori.shape:
        raise ValueError(f"reconstructions {tuple(rec.shape)} and originals {tuple(ori.shape)} differ in shape")
    if rec.dim() == 5:
        if len(rec) == 0:
            return torch.zeros(0, rec.shape[1], dtype=torch.long)
        return torch.stack([match_reconstructions(r, o) for r, o in zip(rec, ori)])
    if rec.dim() != 4:
        raise ValueError(f"expected a batch (B, C, H, W) or batches per victim (N, B, C, H, W), got {tuple(rec.shape)}")
    if len(rec) == 0:
        return torch.zeros(0, dtype=torch.long)
    similarity = pairwise_ssim(rec, ori)
    similarity = torch.where(torch.isfinite(similarity), similarity, torch.full_like(similarity, -2.0))
    rec_index, ori_index = linear_sum_assignment((-similarity).numpy())
    order = torch.empty(len(ori_index), dtype=torch.long)
    order[torch.as_tensor(ori_index)] = torch.as_tensor(rec_index)
    return order
