import math

import pytest
import torch

from gileak import metrics


def images(n=4, c=3, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_score_perfectly():
    x = images()
    assert metrics.ssim(x, x) == pytest.approx([1.0] * 4)
    assert metrics.mse(x, x) == [0.0] * 4
    assert all(math.isinf(v) for v in metrics.psnr(x, x))


def test_ssim_matches_scikit_image_per_image_and_falls_with_noise():
    from skimage.metrics import structural_similarity

    x = images()
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    noisier = (x + 0.4 * torch.randn_like(x)).clamp(0, 1)
    ours = metrics.ssim(noisy, x)
    theirs = [structural_similarity(o.numpy(), r.numpy(), data_range=1.0, channel_axis=0) for r, o in zip(noisy, x)]
    assert ours == pytest.approx(theirs)
    assert all(a > b for a, b in zip(ours, metrics.ssim(noisier, x)))


def test_ssim_works_on_images_smaller_than_the_default_window():
    x = images(c=1, size=6)
    assert metrics.ssim(x, x) == pytest.approx([1.0] * 4)


def test_psnr_and_mse_agree():
    x = images()
    y = (x + 0.05).clamp(0, 1)
    for m, p in zip(metrics.mse(y, x), metrics.psnr(y, x)):
        assert p == pytest.approx(10 * math.log10(1 / m))


def test_asr_counts_victims_at_or_above_half():
    assert metrics.attack_success_rate([0.2, 0.5, 0.9, 0.49]) == 50.0
    assert math.isnan(metrics.attack_success_rate([]))


def test_summarize_ignores_non_finite_values():
    mean, std = metrics.summarize([1.0, 3.0, math.inf, float("nan")])
    assert (mean, std) == (2.0, 1.0)
    assert all(math.isnan(v) for v in metrics.summarize([math.inf]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.ssim(images(size=8), images(size=16))


def test_lpips_is_reported_unavailable_without_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    available, reason = metrics.lpips_status()
    assert not available
    assert "AlexNet" in reason and str(tmp_path) in reason
    assert metrics.lpips_distances(images(), images()) is None
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.pth")), "must never download"


def test_lpips_computes_when_alexnet_weights_are_present(tmp_path, monkeypatch):
    """The computing path, with a stand-in AlexNet checkpoint at the place torchvision looks.
    The numbers are not the published LPIPS (random AlexNet), but the pipeline is the real one."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "_LPIPS_NETS", {})
    torch.manual_seed(0)
    checkpoint = tmp_path / "hub" / "checkpoints" / metrics.ALEXNET_CHECKPOINT
    checkpoint.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), checkpoint)
    import hashlib  # a stand-in file: let it through the check that only torchvision's weights are used

    monkeypatch.setattr(metrics, "ALEXNET_SHA256_PREFIX", hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:8])
    assert metrics.lpips_status()[0]

    x = images(size=32)
    same = metrics.lpips_distances(x, x)
    slightly = metrics.lpips_distances((x + 0.05 * torch.randn_like(x)).clamp(0, 1), x)
    very = metrics.lpips_distances(torch.rand_like(x), x)
    assert len(same) == 4 and same == pytest.approx([0.0] * 4, abs=1e-6)
    assert all(0 < a < b for a, b in zip(slightly, very))
    grey = metrics.lpips_distances(images(c=1, size=8), images(c=1, size=8, seed=1))
    assert len(grey) == 4 and all(v > 0 for v in grey)


# --- batches: matching reconstructions to originals ----------------------------------------------


def test_pairwise_ssim_agrees_with_ssim():
    from gileak.metrics import pairwise_ssim, ssim

    generator = torch.Generator().manual_seed(0)
    for shape in ((3, 32, 32), (1, 8, 8), (1, 5, 5)):
        originals = torch.rand(4, *shape, generator=generator)
        reconstructions = (originals.flip(0) + 0.2 * torch.randn(4, *shape, generator=generator))
        table = pairwise_ssim(reconstructions, originals)
        assert table.shape == (4, 4)
        for i in range(4):
            expected = ssim(reconstructions[i].expand(4, *shape), originals)
            assert torch.allclose(table[i], torch.tensor(expected, dtype=torch.float64), atol=2e-5), shape


def test_a_shuffled_batch_is_matched_back_exactly():
    from gileak.metrics import match_reconstructions

    generator = torch.Generator().manual_seed(1)
    originals = torch.rand(6, 3, 16, 16, generator=generator)
    shuffle = torch.randperm(6, generator=generator)
    reconstructions = (originals[shuffle] + 0.05 * torch.randn(6, 3, 16, 16, generator=generator)).clamp(0, 1)
    order = match_reconstructions(reconstructions, originals)
    assert torch.equal(shuffle[order], torch.arange(6))
    # Per victim: (N, B, C, H, W) -> (N, B).
    batches = torch.stack([reconstructions, reconstructions.flip(0)])
    orders = match_reconstructions(batches, originals.expand(2, -1, -1, -1, -1))
    assert orders.shape == (2, 6)
    assert torch.equal(orders[0], order) and torch.equal(orders[1], 5 - order)


def test_matching_identical_constant_or_broken_images_does_not_crash():
    from gileak.metrics import match_reconstructions

    same = torch.full((4, 1, 8, 8), 0.5)
    order = match_reconstructions(same, same.clone())
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    broken = torch.rand(3, 1, 8, 8)
    broken[1] = float("nan")
    order = match_reconstructions(broken, torch.rand(3, 1, 8, 8))
    assert sorted(order.tolist()) == [0, 1, 2]
    assert match_reconstructions(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)).tolist() == [0]
    with pytest.raises(ValueError, match="differ in shape"):
        match_reconstructions(torch.rand(3, 1, 8, 8), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        match_reconstructions(torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2))
