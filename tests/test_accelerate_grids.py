"""accelerate() on factorized-grid models written as public code writes them (K-Planes,
ConvONet / DDMI tri-planes, DDMI's image decoder, EG3D-style mean, dense volumes): every
F.grid_sample pipeline becomes one grid_lookup call on the same parameters; outputs,
gradients and training unchanged; what does not fit is left alone with the reason."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfd_fast.accelerate import accelerate

from conftest import DEVICE, rel_err
from test_accelerate_capture import HotPathCounter, assert_same_model, assert_same_training


# --- K-Planes (its grid_sample_wrapper / interpolate_ms_features, verbatim in spirit) ----
def grid_sample_wrapper(grid, coords, align_corners=True):
    grid_dim = coords.shape[-1]
    if grid.dim() == grid_dim + 1:
        grid = grid.unsqueeze(0)  # no batch dimension present, need to add it
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)
    if grid_dim == 2 or grid_dim == 3:
        grid_sampler = F.grid_sample
    else:
        raise NotImplementedError(f"Grid-sample was called with {grid_dim}D data but is only "
                                  f"implemented for 2 and 3D data.")
    coords = coords.view([coords.shape[0]] + [1] * (grid_dim - 1) + list(coords.shape[1:]))
    B, feature_dim = grid.shape[:2]
    n = coords.shape[-2]
    interp = grid_sampler(grid, coords, align_corners=align_corners, mode="bilinear", padding_mode="border")
    interp = interp.view(B, feature_dim, n).transpose(-1, -2)  # [B, n, feature_dim]
    interp = interp.squeeze()  # [B?, n, feature_dim?]
    return interp


def interpolate_ms_features(pts, ms_grids, grid_dimensions, concat_features, num_levels):
    coo_combs = list(itertools.combinations(range(pts.shape[-1]), grid_dimensions))
    if num_levels is None:
        num_levels = len(ms_grids)
    multi_scale_interp = [] if concat_features else 0.0
    for scale_id, grid in enumerate(ms_grids[:num_levels]):
        interp_space = 1.0
        for ci, coo_comb in enumerate(coo_combs):
            feature_dim = grid[ci].shape[1]  # shape of grid[ci]: 1, out_dim, *reso
            interp_out_plane = grid_sample_wrapper(grid[ci], pts[..., coo_comb]).view(-1, feature_dim)
            interp_space = interp_space * interp_out_plane  # product reduce
        if concat_features:
            multi_scale_interp.append(interp_space)
        else:
            multi_scale_interp = multi_scale_interp + interp_space
    if concat_features:
        multi_scale_interp = torch.cat(multi_scale_interp, dim=-1)
    return multi_scale_interp


class KPlanesField(nn.Module):
    """4-D (space + time) K-Planes: six planes, product, two scales concatenated, small MLP."""

    def __init__(self, channels=4, resolution=(6, 5, 7, 3), multiscale=(1, 2)):
        super().__init__()
        self.aabb = nn.Parameter(torch.tensor([[-1.5, -1.2, -1.0], [1.5, 1.2, 1.0]]), requires_grad=False)
        self.grids = nn.ModuleList()
        for res in multiscale:
            reso = [r * res for r in resolution[:3]] + [resolution[3]]
            planes = nn.ParameterList()
            for comb in itertools.combinations(range(4), 2):
                shape = [1, channels] + [reso[c] for c in comb[::-1]]
                low, high = (0.9, 1.1) if 3 in comb else (0.1, 0.5)  # time planes near 1
                planes.append(nn.Parameter(torch.empty(shape).uniform_(low, high)))
            self.grids.append(planes)
        self.sigma_net = nn.Sequential(nn.Linear(channels * len(multiscale), 16), nn.ReLU(),
                                       nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, pts, timestamps=None):
        pts = (pts - self.aabb[0]) * (2.0 / (self.aabb[1] - self.aabb[0])) - 1.0
        if timestamps is not None:
            timestamps = timestamps[:, None].expand(-1, pts.shape[1])[..., None]  # [n_rays, n_samples, 1]
            pts = torch.cat((pts, timestamps), dim=-1)
        n_rays, n_samples = pts.shape[:2]
        pts = pts.reshape(-1, pts.shape[-1])
        features = interpolate_ms_features(pts, ms_grids=self.grids, grid_dimensions=2,
                                           concat_features=True, num_levels=None)
        return self.sigma_net(features).view(n_rays, n_samples, -1)


# --- ConvONet / DDMI 3-D style tri-plane occupancy: normalize_coordinate, sum of planes
class TriplaneOccupancy(nn.Module):
    def __init__(self, c_dim=6, reso=9, hidden=16, padding=0.1):
        super().__init__()
        self.padding = padding
        self.planes = nn.ParameterDict({k: nn.Parameter(torch.randn(1, c_dim, reso, reso) * 0.5)
                                        for k in ("xz", "xy", "yz")})
        self.fc_p = nn.Linear(3, hidden)
        self.fc_c = nn.Linear(c_dim, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(2)])
        self.fc_out = nn.Linear(hidden, 1)

    def normalize_coordinate(self, p, plane):
        if plane == "xz":
            xy = p[:, :, [0, 2]]
        elif plane == "xy":
            xy = p[:, :, [0, 1]]
        else:
            xy = p[:, :, [1, 2]]
        return xy / (1 + self.padding + 10e-6) + 0.5  # range (0, 1)

    def sample_plane_feature(self, p, c, plane):
        xy = self.normalize_coordinate(p.clone(), plane=plane)
        xy = xy[:, :, None].float()
        vgrid = 2.0 * xy - 1.0  # normalize to (-1, 1)
        return F.grid_sample(c, vgrid, padding_mode="border", align_corners=True, mode="bilinear").squeeze(-1)

    def forward(self, p):
        B = p.shape[0]
        c = 0
        for plane in ("xz", "xy", "yz"):
            c += self.sample_plane_feature(p, self.planes[plane].expand(B, -1, -1, -1), plane)
        c = c.transpose(1, 2)
        net = self.fc_p(p) + self.fc_c(c)
        for blk in self.blocks:
            net = blk(F.relu(net))
        return self.fc_out(F.relu(net)).squeeze(-1)


# --- DDMI-style image decoder: per-sample fields at three scales from a latent, each read
#     with grid_sample on a [B, 2, H, W] coordinate map and fed at another depth
class DDMIImageDecoder(nn.Module):
    def __init__(self, latent_ch=3, ch=4, hidden=16):
        super().__init__()
        self.to_coarse = nn.Conv2d(latent_ch, ch, 1)
        self.to_mid = nn.ConvTranspose2d(latent_ch, ch, 2, stride=2)
        self.to_fine = nn.ConvTranspose2d(latent_ch, ch, 4, stride=4)
        self.net_res1 = nn.Conv2d(ch, hidden, 1)
        self.net_res2 = nn.Conv2d(hidden + ch, hidden, 1)
        self.net_res3 = nn.Conv2d(hidden + ch, hidden, 1)
        self.torgb = nn.Conv2d(hidden, 3, 1)

    def sample(self, field, coords):
        return F.grid_sample(field, coords.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)

    def forward(self, z, coords):
        fields = [self.to_coarse(z), self.to_mid(z), self.to_fine(z)]
        h = F.silu(self.net_res1(self.sample(fields[0], coords)))
        h = F.silu(self.net_res2(torch.cat([h, self.sample(fields[1], coords)], 1)))
        h = F.silu(self.net_res3(torch.cat([h, self.sample(fields[2], coords)], 1)))
        return self.torgb(h)


def ddmi_coords(b, h, w):
    """DDMI's pixel-centre coordinates, [B, 2, H, W] (x along the width)."""
    ys = torch.linspace(-(h - 1) / h, (h - 1) / h, h)
    xs = torch.linspace(-(w - 1) / w, (w - 1) / w, w)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0).expand(b, -1, -1, -1).clone()


def _grid_samples(model, *args):
    with HotPathCounter() as counter:
        model(*args)
    return counter.counts["grid_sample"]


def _check_grid_model(model, args, coords_index, planes, combine, scales, backend="torch"):
    """Accelerate, then compare with the original: the pipeline found, no grid_sample left,
    outputs and gradients (parameters, coordinates) equal. Returns (model, reference,
    report, model's args, reference's args); the coordinates require grad from the
    example on, so that every later call reuses the one capture."""
    torch.manual_seed(10)
    model = model.to(DEVICE)
    reference = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    ours, theirs = list(args), list(args)
    ours[coords_index] = args[coords_index].clone().requires_grad_()
    theirs[coords_index] = args[coords_index].clone().requires_grad_()
    accelerate(model, tuple(ours), backend=backend)
    report = model.acceleration_report
    (pipeline,) = report.grids
    (call,) = pipeline["calls"]
    assert (call["planes"], call["combine"], len(call["fields"])) == (planes, combine, scales), str(report)
    assert [id(p) for p in model.parameters()] == params
    assert _grid_samples(reference, *theirs) == pipeline["grid_samples"] > 0
    assert _grid_samples(model, *ours) == 0
    assert_same_model(model, reference, lambda m: m(*(theirs if m is reference else ours)),
                      [(ours[coords_index], theirs[coords_index])])
    assert report.captures == 1
    return model, reference, report, ours, theirs


def test_kplanes_field():
    pts, times = torch.rand(3, 5, 3) * 2.4 - 1.2, torch.rand(3) * 2 - 1
    model, reference, report, ours, theirs = _check_grid_model(
        KPlanesField(), (pts, times), 0, [list(c) for c in itertools.combinations(range(4), 2)], "product", 2)
    assert report.grids[0]["calls"][0]["fields"][1] == [f"grids.1.{i}" for i in range(6)]
    assert [r["layers"] for r in report.replaced] == [["sigma_net.0", "sigma_net.2", "sigma_net.4"]]
    target = torch.rand(3, 5, 4)
    assert_same_training(model, reference,
                         lambda m: ((m(*(theirs if m is reference else ours)) - target) ** 2).mean())
    more = torch.rand(4, 7, 3) * 2 - 1, torch.rand(4) * 2 - 1  # other sizes: captured again,
    assert rel_err(model(*more), reference(*more)) < 1e-4      # with dynamic sizes
    assert _grid_samples(model, *more) == 0 and report.captures == 2
    assert not [name for name, _ in report.left_alone if name.startswith("captured graph")]


def test_triplane_occupancy():
    p = torch.rand(2, 13, 3) - 0.5
    model, reference, report, ours, theirs = _check_grid_model(
        TriplaneOccupancy(), (p,), 0, [[0, 1], [0, 2], [1, 2]], "sum", 1)
    assert sorted(report.grids[0]["calls"][0]["fields"][0]) == ["planes.xy", "planes.xz", "planes.yz"]
    occupied = (torch.rand(2, 13) > 0.5).float()
    assert_same_training(model, reference, lambda m: F.binary_cross_entropy_with_logits(
        m(*(theirs if m is reference else ours)), occupied))


def test_ddmi_image_decoder_three_scales():
    z, coords = torch.randn(2, 3, 2, 2), ddmi_coords(2, 5, 6)
    model, reference, report, ours, theirs = _check_grid_model(
        DDMIImageDecoder(), (z, coords), 0, [[0, 1]], "sum", 3)  # the latent's gradient too
    assert all(s[0].startswith("per-sample") for s in report.grids[0]["calls"][0]["fields"])
    target = torch.rand(2, 3, 5, 6)
    assert_same_training(model, reference,
                         lambda m: ((m(*(theirs if m is reference else ours)) - target) ** 2).mean())


# --- the other combines and options, in small models -------------------------------------
class PlanesMeanZeros(nn.Module):
    """EG3D-style: three planes, zeros padding, align_corners False, stack(...).mean(1)."""

    def __init__(self, c=5, res=(7, 6)):
        super().__init__()
        self.planes = nn.Parameter(torch.randn(3, c, *res))
        self.decoder = nn.Sequential(nn.Linear(c, 12), nn.Softplus(), nn.Linear(12, 2))

    def forward(self, xyz):
        grids = [xyz[..., [0, 1]], xyz[..., [1, 2]], xyz[..., [2, 0]]]
        feats = [F.grid_sample(self.planes[i:i + 1].expand(xyz.shape[0], -1, -1, -1), g.unsqueeze(1),
                               mode="bilinear", padding_mode="zeros", align_corners=False)
                 for i, g in enumerate(grids)]  # [B, C, 1, N]
        feats = torch.stack([f.squeeze(2).permute(0, 2, 1) for f in feats], dim=1).mean(1)
        return self.decoder(feats)


class DenseVolumeConcat(nn.Module):
    """A dense 3-D grid (trilinear) and a tri-plane concatenated (NeRF-style), per point."""

    def __init__(self, c=3):
        super().__init__()
        self.volume = nn.Parameter(torch.randn(1, c, 4, 5, 6))
        self.xy = nn.Parameter(torch.randn(1, c, 5, 4))
        self.yz = nn.Parameter(torch.randn(1, c, 6, 5))

    def forward(self, x):  # x [N, 3]
        g = x.view(1, -1, 1, 1, 3)
        vol = F.grid_sample(self.volume, g, align_corners=True, padding_mode="border").view(3, -1).t()
        xy = F.grid_sample(self.xy, x[None, :, None, :2], align_corners=True).view(3, -1).t()
        yz = F.grid_sample(self.yz, x[None, :, None, 1:], align_corners=True).view(3, -1).t()
        return torch.cat([vol, torch.cat([xy, yz], -1)], -1)


class SharedCoordsPerSampleFields(nn.Module):
    """Per-sample planes from a latent, all read at one shared set of coordinates."""

    def __init__(self, latent=4, c=3, res=5):
        super().__init__()
        self.to_planes = nn.Linear(latent, 2 * c * res * res)
        self.c, self.res = c, res

    def forward(self, z, coords):  # z [B, latent], coords [N, 2]
        planes = self.to_planes(z).view(z.shape[0], 2, self.c, self.res, self.res)
        grid = coords[None, :, None, :].expand(z.shape[0], -1, -1, -1)
        a = F.grid_sample(planes[:, 0], grid, align_corners=True, padding_mode="border")
        b = F.grid_sample(planes[:, 1], grid.flip(-1), align_corners=True, padding_mode="border")
        return (a * b).squeeze(-1).transpose(1, 2)


@pytest.mark.parametrize("make, args, planes, combine", [
    (PlanesMeanZeros, lambda: (torch.rand(2, 9, 3) * 2.4 - 1.2,), [[0, 1], [1, 2], [2, 0]], "mean"),
    (SharedCoordsPerSampleFields, lambda: (torch.randn(3, 4), torch.rand(7, 2) * 2 - 1), [[0, 1], [1, 0]], "product"),
])
def test_other_combines_and_options(make, args, planes, combine):
    torch.manual_seed(11)
    a = args()
    _check_grid_model(make(), a, len(a) - 1, planes, combine, 1)


def test_volume_and_concatenated_planes():
    torch.manual_seed(12)
    model = DenseVolumeConcat()
    reference = copy.deepcopy(model)
    x = torch.rand(11, 3) * 2 - 1
    accelerate(model, x, backend="torch")
    calls = [c for g in model.acceleration_report.grids for c in g["calls"]]
    assert sorted((c["planes"], c["combine"]) for c in calls) == [([[0, 1], [1, 2]], "concat"), ([[0, 1, 2]], "sum")]
    assert _grid_samples(model, x) == 0
    assert_same_model(model, reference, lambda m: m(x))


def test_unsupported_reads_are_left_alone_with_the_reason():
    class Nearest(nn.Module):
        def __init__(self):
            super().__init__()
            self.plane = nn.Parameter(torch.randn(1, 2, 4, 4))

        def forward(self, x):
            a = F.grid_sample(self.plane, x[None, :, None], mode="nearest", align_corners=True)
            b = F.grid_sample(self.plane, x[None, :, None], padding_mode="reflection", align_corners=True)
            return a + b

    model = Nearest()
    x = torch.rand(5, 2) * 2 - 1
    accelerate(model, x, backend="torch")
    reasons = [why for _, why in model.acceleration_report.left_alone]
    assert any("mode 'nearest'" in r for r in reasons) and any("'reflection'" in r for r in reasons)
    assert model.acceleration_report.grids == []
    assert rel_err(model(x), deaccelerate_copy(model)(x)) == 0


def test_fx_capture_says_where_grid_pipelines_are_matched():
    model = accelerate(TriplaneOccupancy(), capture="fx", backend="torch")
    report = model.acceleration_report
    assert report.mode == "fx" and report.grids == []
    assert any(name == "grid_sample calls" and "capture='dynamo'" in why for name, why in report.left_alone)
    p = torch.rand(2, 5, 3) - 0.5
    assert rel_err(model(p), deaccelerate_copy(model)(p)) < 1e-5


def deaccelerate_copy(model):
    from nfd_fast.accelerate import deaccelerate

    return deaccelerate(copy.deepcopy(model))


def test_triplane_with_the_kernels():
    """The same pipeline through the Triton grid_lookup and fused_mlp (interpreter on CPU)."""
    p = torch.rand(2, 5, 3) - 0.5
    _check_grid_model(TriplaneOccupancy(c_dim=2, reso=4, hidden=8), (p,), 0, [[0, 1], [0, 2], [1, 2]], "sum", 1,
                      backend="triton")
