"""Approach 10 (SparseFeatureField): training, fused vs reference backends, sampling at two
resolutions from one set of features, both readers, input checks, checkpoints, and the
synthetic shapes it trains on."""

import pytest
import torch

import nfd_fast
from nfd_fast.models.blocks import (cell_centres, grid_coordinates, random_shapes, render_shapes,
                                    shape_occupancy, train_loop)
from nfd_fast.models.sparse_feature import SparseFeatureField, ball_union, points_inside, shape_batch
from nfd_fast.ops import grid_lookup

from conftest import DEVICE, assert_backends_agree_on_a_step

TINY = dict(feature_dim=3, k=5, read_k=3, splat_resolution=7, splat_sigma=0.3, encoder_width=16,
            decoder_width=16, denoiser_features=6, denoiser_width=8, timesteps=10)
KEYS = ("anchors", "points", "occupancy", "queries", "query_occupancy")


def batch(n, dims=2, anchors=7, dense=23, seed=0):
    b = shape_batch(n, dims, anchors, dense, generator=torch.Generator().manual_seed(seed))
    return [b[k] for k in KEYS]


@pytest.mark.parametrize("reader", ["splat", "knn"])
def test_loss_falls(reader):
    torch.manual_seed(0)
    data = batch(6, anchors=9, dense=40)
    model = SparseFeatureField(reader=reader, **TINY)

    def fixed_losses():  # the same batch, timesteps and noise before and after training
        with torch.no_grad():
            return model.losses(*data, generator=torch.Generator().manual_seed(5))

    with nfd_fast.use_backend("torch"):
        before = fixed_losses()
        train_loop(model.parameters(), lambda b: model.losses(*b), lambda s: data, 40, lr=3e-2, progress=False)
        after = fixed_losses()
    assert after["reconstruction"] < 0.75 * before["reconstruction"]
    assert after["diffusion"] < before["diffusion"]


def test_fused_and_reference_backends_agree_on_a_training_step():
    torch.manual_seed(0)
    data = [t.to(DEVICE) for t in batch(2, anchors=5, dense=9, seed=1)]
    model = SparseFeatureField(**TINY).to(DEVICE)
    assert_backends_agree_on_a_step(
        model, lambda m: m.training_step(*data, generator=torch.Generator(DEVICE).manual_seed(2)), loss_tol=1e-4, grad_tol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_sampling_at_two_resolutions_from_one_set_of_features(dims):
    torch.manual_seed(0)
    anchors = batch(3, dims=dims, anchors=6, seed=2)[0]
    model = SparseFeatureField(dims=dims, **TINY).eval()
    with nfd_fast.use_backend("torch"):
        f = model.sample_features(anchors, steps=4, generator=torch.Generator().manual_seed(0))
        coarse = model.decode(grid_coordinates((3,) * dims), anchors, f)
        fine = model.decode(grid_coordinates((5,) * dims), anchors, f)
        direct = model.sample(anchors, grid_coordinates((3,) * dims), steps=4)
    assert f.shape == (3, 6, 3) and coarse.shape == (3, 3 ** dims) and fine.shape == (3, 5 ** dims)
    assert torch.isfinite(fine).all() and torch.isfinite(direct).all()
    # the 3^D grid is every other point of the 5^D one: the same field
    every_other = fine.view(3, *(5,) * dims)[(slice(None),) + (slice(None, None, 2),) * dims]
    torch.testing.assert_close(every_other.reshape(3, -1), coarse, atol=1e-5, rtol=1e-5)


def test_readers_against_their_definitions():
    torch.manual_seed(0)
    model = SparseFeatureField(**TINY)
    anchors, f = torch.rand(2, 5, 2) * 2 - 1, torch.randn(2, 5, 3)
    table = torch.cat([f, anchors], -1)
    # splat: every node holds the Gaussian-weighted mean of the anchors' rows
    grid = model.splat(anchors, table)
    R, s = TINY["splat_resolution"], TINY["splat_sigma"]
    i, j = 4, 2  # a node: row i is y, column j is x
    xy = torch.tensor([2 * j / (R - 1) - 1, 2 * i / (R - 1) - 1])
    w = torch.exp(-((anchors - xy) ** 2).sum(-1) / (2 * s * s))  # [2, 5]
    expected = (w.unsqueeze(-1) * table).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(grid[:, :5, i, j], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid[:, 5, i, j], (w.sum(1).log() / 20).clamp_min(-1), atol=1e-5, rtol=1e-5)
    # knn with one neighbour: the nearest anchor's features and position exactly
    knn = SparseFeatureField(**{**TINY, "reader": "knn", "read_k": 1})
    q = torch.rand(2, 11, 2) * 2 - 1
    read_f, read_a, dist = knn.read(q, anchors, f)
    near = torch.cdist(q, anchors).argmin(-1)
    torch.testing.assert_close(read_f, f.gather(1, near.unsqueeze(-1).expand(-1, -1, 3)))
    torch.testing.assert_close(read_a, anchors.gather(1, near.unsqueeze(-1).expand(-1, -1, 2)))
    torch.testing.assert_close(dist.squeeze(-1), (q - read_a).norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_wrong_shapes_raise_and_checkpoints_round_trip(tmp_path):
    a, p, o, q, qo = batch(2, anchors=5, dense=9)
    model = SparseFeatureField(**TINY)
    with pytest.raises(ValueError, match="anchors"):
        model.losses(a[..., :1], p, o, q, qo)
    with pytest.raises(ValueError, match="points"):
        model.losses(a, p[:1], o, q, qo)
    with pytest.raises(ValueError, match="occupancy"):
        model.losses(a, p, o[:, :4], q, qo)
    with pytest.raises(TypeError, match="occupancy"):
        model.encode(a, p, o.float())
    with pytest.raises(ValueError, match="query_occupancy"):
        model.losses(a, p, o, q, qo[:, :3])
    with pytest.raises(ValueError, match="queries"):
        model.decode(torch.rand(4, 3), a, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="features"):
        model.decode(torch.rand(4, 2), a, torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="reader"):
        SparseFeatureField(reader="nearest")
    model.save(tmp_path / "m.pt")
    back = SparseFeatureField.load(tmp_path / "m.pt")
    with nfd_fast.use_backend("torch"):
        torch.testing.assert_close(model.reconstruct(a, p, o, q), back.reconstruct(a, p, o, q))
    assert back.config == model.config


def test_synthetic_shapes_and_baseline():
    g = torch.Generator().manual_seed(3)
    params = random_shapes(4, 2, generator=g)
    params["box"][0] = torch.tensor([True, False, False])
    coords = torch.rand(300, 2, generator=g) * 2 - 1
    c, r = params["centre"][0], params["radius"][0]
    inside_box = ((coords - c[0]).abs().amax(-1) < r[0])
    inside_discs = ((coords.unsqueeze(1) - c[1:]).norm(dim=-1) < r[1:]).any(-1)
    assert torch.equal(shape_occupancy(params, coords)[0], inside_box | inside_discs)
    image = render_shapes(params, coords)[0, :, 0]
    level = params["background"][0, 0] + params["intensity"][0, 0] * inside_box \
        + (params["intensity"][0, 1:] * ((coords.unsqueeze(1) - c[1:]).norm(dim=-1) < r[1:])).sum(-1)
    torch.testing.assert_close(image, level.clamp(0, 1))
    pts = points_inside(params, 9, generator=g)
    assert pts.shape == (4, 9, 2) and shape_occupancy(params, pts).all()
    union = ball_union(pts, coords, 0.2)
    assert torch.equal(union, (torch.cdist(coords, pts) < 0.2).any(-1))
    # cell centres: what F.interpolate and align_corners=False lookups read at
    field = torch.randn(2, 5, 3)
    read = grid_lookup(cell_centres((5, 3)).unsqueeze(0), [[field]], [(0, 1)], align_corners=False)[0]
    torch.testing.assert_close(read, field.permute(1, 2, 0).reshape(15, 2), atol=1e-5, rtol=1e-5)
