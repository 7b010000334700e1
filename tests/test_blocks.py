"""The models' shared building blocks, each against a plain reference."""
import math

import pytest
import torch

from nfd_fast.diffusion import NoiseSchedule
from nfd_fast.models.blocks import (LatentDenoiser, RunningStandardiser, SetEncoder, chamfer_distance,
                                    diffusion_loss, gather_observations, grid_coordinates, iou,
                                    knn_interpolate, mse, observation_mask, psnr, random_blobs,
                                    render_blobs, scattered_linear_interpolation, timestep_embedding,
                                    train_loop)
from nfd_fast.ops import grid_lookup


def test_grid_coordinates_follow_grid_sample_order():
    # reading a field at pixel (i, j)'s coordinate gives field[:, i, j] (align_corners=True)
    field = torch.randn(3, 5, 7)
    coords = grid_coordinates((5, 7))
    read = grid_lookup(coords.unsqueeze(0), [[field]], [(0, 1)], align_corners=True)[0]
    torch.testing.assert_close(read, field.permute(1, 2, 0).reshape(35, 3), atol=1e-5, rtol=1e-5)
    assert grid_coordinates((2, 3, 4)).shape == (24, 3)


def test_observation_mask_counts_and_ranges():
    g = torch.Generator().manual_seed(0)
    m = observation_mask(50, 200, (0.01, 0.5), generator=g)
    counts = m.sum(1)
    assert counts.min() >= 2 and counts.max() <= 100 and counts.float().std() > 5
    assert (observation_mask(4, 10, 0.3, generator=g).sum(1) == 3).all()
    with pytest.raises(ValueError, match="ratio"):
        observation_mask(2, 10, (0.5, 0.2))


def test_gather_observations_packs_observed_entries_in_order():
    mask = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    values = torch.randn(2, 5, 3)
    coords = torch.randn(5, 2)
    c, v, m = gather_observations(mask, coords, values)
    assert m.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(v[0], values[0, [1, 2, 4]])
    torch.testing.assert_close(c[1, 0], coords[0])
    assert (v[1, 1:] == 0).all()
    with pytest.raises(ValueError, match="tensors\\[0\\]"):
        gather_observations(mask, torch.randn(2, 4, 3))


def test_knn_interpolate_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    q, p, f = torch.rand(2, 7, 2, generator=g), torch.rand(2, 9, 2, generator=g), torch.randn(2, 9, 3, generator=g)
    mask = torch.rand(2, 9, generator=g) > 0.3
    out, near = knn_interpolate(q, p, f, mask, k=3)
    for b in range(2):
        pts, fts = p[b][mask[b]], f[b][mask[b]]
        for i in range(7):
            d2 = ((pts - q[b, i]) ** 2).sum(-1)
            d2, idx = d2.sort()
            w = 1 / (d2[:3] + 1e-6)
            torch.testing.assert_close(out[b, i], (w[:, None] * fts[idx[:3]]).sum(0) / w.sum())
            torch.testing.assert_close(near[b, i], d2[0].sqrt())
    with pytest.raises(ValueError, match="points"):
        knn_interpolate(q, p[:, :, :1], f)


def test_set_encoder_ignores_padding_and_order():
    torch.manual_seed(0)
    enc = SetEncoder(2, 3, 5, width=16, features=8)
    c, v = torch.randn(2, 6, 2), torch.randn(2, 6, 3)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = enc(c, v, mask)
    # garbage (even NaN) in masked entries and a permutation of the set change nothing
    c2, v2 = c.clone(), v.clone()
    c2[1, 3:], v2[1, 3:] = float("nan"), 1e6
    perm = torch.tensor([2, 0, 1, 5, 4, 3])
    torch.testing.assert_close(enc(c2[:, perm], v2[:, perm], mask[:, perm]), out)
    # against the plain formula: rho([mean phi, max phi, log(1 + n)])
    h = enc.phi(torch.cat([c[1, :3], v[1, :3]], -1))
    ref = enc.rho(torch.cat([h.mean(0), h.amax(0), torch.tensor([math.log(4.0)])]))
    torch.testing.assert_close(out[1], ref, atol=1e-5, rtol=1e-5)
    empty = enc(c, v, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.isfinite(empty).all()
    with pytest.raises(ValueError, match="values"):
        enc(c, v[:, :5], mask)
    with pytest.raises(TypeError, match="mask"):
        enc(c, v, mask.float())


def test_timestep_embedding_and_denoiser():
    emb = timestep_embedding(torch.tensor([0, 7]), 6)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))
    assert timestep_embedding(torch.tensor([3]), 5).shape == (1, 5)
    den = LatentDenoiser(6, 16, cond_dim=4)
    z, t, cond = torch.randn(3, 6), torch.tensor([1, 5, 9]), torch.randn(3, 4)
    assert not torch.allclose(den(z, t, cond), den(z, t, None))
    torch.testing.assert_close(den(z, t, torch.zeros(3, 4)),
                               den.mlp(z + den.time(timestep_embedding(t, 6)) + den.cond.bias))


def test_diffusion_loss_is_the_epsilon_mse():
    sched = NoiseSchedule("cosine", 20)
    den = LatentDenoiser(4, 8)
    z0 = torch.randn(5, 4)
    loss = diffusion_loss(den, z0, sched, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 20, (5,), generator=g)
    noise = torch.randn(5, 4, generator=g)
    a = sched.alphas_cumprod[t].unsqueeze(-1)
    ref = ((den(a.sqrt() * z0 + (1 - a).sqrt() * noise, t) - noise) ** 2).mean()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)


def test_standardiser_tracks_the_latents():
    s = RunningStandardiser(3, momentum=1.0)
    z = torch.randn(64, 3) * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor([1.0, -1.0, 0.0])
    s.update(z)
    torch.testing.assert_close(s.standardise(z).mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.unstandardise(s.standardise(z)), z)


def test_train_loop_fits_a_line():
    w = torch.nn.Parameter(torch.zeros(1))
    x = torch.randn(64)
    hist = train_loop([w], lambda b: {"fit": ((w * b - 3 * b) ** 2).mean()}, lambda s: x, 60,
                      lr=0.3, progress=False)
    assert len(hist["loss"]) == 60 and hist["fit"][-1] < hist["fit"][0] / 100
    assert abs(w.item() - 3) < 0.1


def test_metrics():
    a, b = torch.zeros(4), torch.full((4,), 0.1)
    assert mse(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(20.0)
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert chamfer_distance(pts, pts + torch.tensor([0.0, 0.5])) == pytest.approx(1.0)
    assert iou(torch.tensor([True, True, False]), torch.tensor([True, False, True])) == pytest.approx(1 / 3)


def test_blobs_and_the_linear_baseline():
    params = random_blobs(3, channels=2, moving=True, generator=torch.Generator().manual_seed(0))
    coords = grid_coordinates((9, 9))
    img = render_blobs(params, coords)
    assert img.shape == (3, 81, 2) and 0 <= img.min() and img.max() <= 1 and img.std() > 0.02
    moved = render_blobs(params, torch.cat([coords, torch.full((81, 1), 0.5)], -1))
    assert (moved - img).abs().max() > 0.01
    # a linear function is reproduced exactly inside the hull of its observations
    lin = (coords @ torch.tensor([[0.3], [-0.2]]) + 0.5).expand(2, 81, 1)
    mask = torch.zeros(2, 81, dtype=torch.bool)
    mask[:, [0, 8, 72, 80, 40]] = True
    out = scattered_linear_interpolation(coords.expand(2, 81, 2), lin, mask, coords)
    torch.testing.assert_close(out, lin, atol=1e-5, rtol=1e-5)
