"""DDMI: the coarse-to-fine readouts against a plain transcription of the reference's
forward, the reference's state_dict keys and shapes, CFCDecoder on both backends, the
D2C-VAE, the mixed epsilon prediction, DDIM spacing, training and generation."""
import math

import pytest
import torch
import torch.nn.functional as F

import nfd_fast
from nfd_fast.models.blocks import random_blobs
from nfd_fast.models.ddmi import (D2CVAE, DDMI, DDMIConfig, DiagonalGaussian, ImageReadout,
                                  LatentDiffusion, LatentUNet, ShapeReadout, VideoReadout,
                                  blob_images, crop_coordinates, ddim_timesteps, kl_coefficient,
                                  pixel_centers, reference_schedule)
from nfd_fast.nn import cfc
from nfd_fast.nn.cfc import CFCBlock, CFCDecoder, CFCProgram

from conftest import rel_err

F64 = torch.float64


def randomize_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Random values everywhere (zero-initialised noise weights, biases and fc_1 included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


# ------------------------------------------------------- transcriptions of the reference


def t_styled_conv(P, prefix, x, style, noise, style_dim):
    """StyledConv on [B, in, N] maps: modulate, demodulate, conv, inject noise, fused lrelu."""
    w = P[prefix + ".conv.weight"][0, :, :, 0, 0]
    s = style @ (P[prefix + ".conv.modulation.weight"] / math.sqrt(style_dim)).T + P[prefix + ".conv.modulation.bias"]
    W = w[None] / math.sqrt(w.shape[1]) * s[:, None, :]
    W = W / torch.sqrt((W ** 2).sum(dim=2, keepdim=True) + 1e-8)
    y = torch.einsum("boi,bin->bon", W, x)
    if noise is not None:
        y = y + P[prefix + ".noise.weight"] * noise[:, None, :]
    return F.leaky_relu(y + P[prefix + ".activate.bias"][None, :, None], 0.2) * math.sqrt(2)


def t_image_mlp(P, fields, coords, si, noise):
    """The reference image MLP, written out: si [B], coords [B, N, 2], noise None or 12 [B, N]."""
    B, N, _ = coords.shape
    emb_dim = P["time_mlp.1.weight"].shape[1]
    style_dim = P["time_mlp.1.weight"].shape[0]
    half = emb_dim // 2
    freq = torch.exp(torch.arange(half, dtype=coords.dtype) * -(math.log(10000) / (half - 1)))
    e = torch.cat([torch.sin(si[:, None] * freq), torch.cos(si[:, None] * freq)], dim=1)
    style = F.gelu(e @ P["time_mlp.1.weight"].T + P["time_mlp.1.bias"]) @ P["time_mlp.3.weight"].T + P["time_mlp.3.bias"]
    grid = coords.view(B, N, 1, 2)
    feats = [F.grid_sample(f, grid, padding_mode="border", align_corners=False)[..., 0] for f in fields]
    const = si.view(B, 1, 1).expand(B, 2, N)
    h = None
    for b in range(1, 5):
        x = h if b == 4 else torch.cat(([] if h is None else [h]) + [feats[b - 1], const], dim=1)
        y = x
        for c in range(1, 4):
            n = None if noise is None else noise[3 * (b - 1) + (c - 1)]
            y = t_styled_conv(P, f"net_res{b}.conv{c}", y, style, n, style_dim)
        key = f"net_res{b}.skip.0.weight"
        skip = x if key not in P else torch.einsum("oi,bin->bon", P[key][:, :, 0, 0] / math.sqrt(x.shape[1]), x)
        h = (y + skip) / math.sqrt(2)
    w = P["torgb.conv.weight"][0, :, :, 0, 0]
    s = style @ (P["torgb.conv.modulation.weight"] / math.sqrt(style_dim)).T + P["torgb.conv.modulation.bias"]
    W = w[None] / math.sqrt(w.shape[1]) * s[:, None, :]
    return (torch.einsum("boi,bin->bon", W, h) + P["torgb.bias"][:, :, 0]).transpose(1, 2)


def t_resnet_fc(P, prefix, x):
    net = torch.relu(x) @ P[prefix + ".fc_0.weight"].T + P[prefix + ".fc_0.bias"]
    dx = torch.relu(net) @ P[prefix + ".fc_1.weight"].T + P[prefix + ".fc_1.bias"]
    key = prefix + ".shortcut.weight"
    return (x @ P[key].T if key in P else x) + dx


def t_fc_trunk(P, feats, first_extra, out_slope):
    h = t_resnet_fc(P, "net_res1", feats[0]) + first_extra
    h = t_resnet_fc(P, "net_res2", torch.cat([h, feats[1]], -1))
    h = t_resnet_fc(P, "net_res3", torch.cat([h, feats[2]], -1))
    h = t_resnet_fc(P, "net_res4", h)
    if out_slope is not None:
        h = F.leaky_relu(h, out_slope)
    return h @ P["net_out.weight"].T + P["net_out.bias"]


def t_read(field, gx, gy):
    """grid_sample(field, (gx, gy)) with align_corners True, border: [B, N, C]."""
    grid = torch.stack([gx, gy], -1).unsqueeze(2)
    return F.grid_sample(field, grid, padding_mode="border", align_corners=True)[..., 0].transpose(1, 2)


def t_shape_mlp(P, fields, p):
    u = (p / (1.1 + 1e-5) + 0.5).clamp(0, 1 - 1e-5) * 2 - 1
    feats = [t_read(xy, u[..., 0], u[..., 1]) + t_read(yz, u[..., 1], u[..., 2]) + t_read(xz, u[..., 0], u[..., 2])
             for xy, yz, xz in fields]
    return t_fc_trunk(P, feats, p @ P["net_p.weight"].T + P["net_p.bias"], None)


def t_video_mlp(P, fields, c):
    """The reference's (t, spatial) grids for the time planes."""
    x, y, t = c.unbind(-1)
    feats = [torch.cat([t_read(xy, x, y), t_read(yt, t, y), t_read(xt, t, x)], -1) for xy, yt, xt in fields]
    return t_fc_trunk(P, feats, 0.0, 0.2)


def grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


def assert_matches(module_out, ref_out, inputs, tol):
    weight = torch.randn_like(ref_out)
    assert rel_err(module_out, ref_out) < tol, rel_err(module_out, ref_out)
    for name, a, b in zip(inputs, grads(module_out, list(inputs.values()), weight),
                          grads(ref_out, list(inputs.values()), weight)):
        assert b is not None and a is not None, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


# --------------------------------------------------------------- reference key listings


def reference_image_mlp_shapes():
    shapes = {"time_mlp.1.weight": (256, 64), "time_mlp.1.bias": (256,),
              "time_mlp.3.weight": (256, 256), "time_mlp.3.bias": (256,)}
    for b in range(1, 5):
        for c in range(1, 4):
            IN = 66 if (b, c) == (1, 1) else (322 if b in (2, 3) and c == 1 else 256)
            p = f"net_res{b}.conv{c}"
            shapes.update({p + ".conv.weight": (1, 256, IN, 1, 1), p + ".conv.modulation.weight": (IN, 256),
                           p + ".conv.modulation.bias": (IN,), p + ".noise.weight": (1,),
                           p + ".activate.bias": (256,)})
    shapes.update({"net_res1.skip.0.weight": (256, 66, 1, 1), "net_res2.skip.0.weight": (256, 322, 1, 1),
                   "net_res3.skip.0.weight": (256, 322, 1, 1), "torgb.bias": (1, 3, 1, 1),
                   "torgb.conv.weight": (1, 3, 256, 1, 1), "torgb.conv.modulation.weight": (256, 256),
                   "torgb.conv.modulation.bias": (256,)})
    return shapes


def reference_vae_decoder_shapes(blocks_per_level: int = 3):
    def resblock(p, cin, cout):
        d = {p + ".norm1.weight": (cin,), p + ".norm1.bias": (cin,), p + ".conv1.weight": (cout, cin, 3, 3),
             p + ".conv1.bias": (cout,), p + ".norm2.weight": (cout,), p + ".norm2.bias": (cout,),
             p + ".conv2.weight": (cout, cout, 3, 3), p + ".conv2.bias": (cout,)}
        if cin != cout:
            d.update({p + ".nin_shortcut.weight": (cout, cin, 1, 1), p + ".nin_shortcut.bias": (cout,)})
        return d

    s = {"post_quant_conv.weight": (128, 64, 1, 1), "post_quant_conv.bias": (128,),
         "decoder.conv_in.weight": (512, 128, 3, 3), "decoder.conv_in.bias": (512,),
         "decoder.mid.attn_1.norm.weight": (512,), "decoder.mid.attn_1.norm.bias": (512,),
         "decoder.norm_out.weight": (128,), "decoder.norm_out.bias": (128,),
         "decoder.conv_out.weight": (64, 128, 3, 3), "decoder.conv_out.bias": (64,)}
    s.update(resblock("decoder.mid.block_1", 512, 512))
    s.update(resblock("decoder.mid.block_2", 512, 512))
    for m in ("q", "k", "v", "proj_out"):
        s.update({f"decoder.mid.attn_1.{m}.weight": (512, 512, 1, 1), f"decoder.mid.attn_1.{m}.bias": (512,)})
    for level, cin, cout in ((2, 512, 512), (1, 512, 256), (0, 256, 128)):
        for j in range(blocks_per_level):
            s.update(resblock(f"decoder.up.{level}.block.{j}", cin if j == 0 else cout, cout))
        if level > 0:
            s.update({f"decoder.up.{level}.hdbf.0.weight": (64, cout, 1, 1), f"decoder.up.{level}.hdbf.0.bias": (64,),
                      f"decoder.up.{level}.upsample.conv.weight": (cout, cout, 3, 3),
                      f"decoder.up.{level}.upsample.conv.bias": (cout,)})
    return s


def shapes_of(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_image_readout_has_the_reference_keys_and_shapes():
    sd = ImageReadout().state_dict()
    assert shapes_of(sd) == reference_image_mlp_shapes()
    assert len(sd) == 71 and sum(v.numel() for v in sd.values()) == 1_880_021


@pytest.mark.parametrize("num_res_blocks, tensors, params", [(2, 118, 33.66e6), (3, 142, 39.86e6)])
def test_vae_decoder_has_the_reference_keys_and_shapes(num_res_blocks, tensors, params):
    sd = D2CVAE(num_res_blocks=num_res_blocks).state_dict()
    decoder = {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert shapes_of(decoder) == reference_vae_decoder_shapes(num_res_blocks + 1)
    assert len(decoder) == tensors
    assert abs(sum(v.numel() for v in decoder.values()) - params) < 0.01e6
    # the encoder: conv 512 -> 256, quant_conv 1x1 256 -> 128 (mean and log-variance, 64 each)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (256, 512, 3, 3)
    assert tuple(sd["quant_conv.weight"].shape) == (128, 256, 1, 1)


def test_synthetic_reference_checkpoint_loads_unchanged():
    g = torch.Generator().manual_seed(0)
    mlp = {k: torch.randn(s, generator=g) for k, s in reference_image_mlp_shapes().items()}
    decoder = {k: torch.randn(s, generator=g) for k, s in reference_vae_decoder_shapes().items()}
    model = DDMI(DDMIConfig(model_channels=32, channel_mult=(1,), attention_levels=()))
    encoder = {k: torch.randn(v.shape, generator=g) for k, v in model.vae.state_dict().items() if k not in decoder}
    model.load_reference({"mlp": mlp, "vaemodel": {**encoder, **decoder}, "diffusion": {}})
    for k, v in mlp.items():
        assert torch.equal(model.readout.state_dict()[k], v), k
    for k, v in decoder.items():
        assert torch.equal(model.vae.state_dict()[k], v), k
    missing, unexpected = model.vae.load_state_dict(decoder, strict=False)
    assert not unexpected and all(k.startswith(("encoder.", "quant_conv.")) for k in missing)
    with pytest.raises(KeyError, match="'vaemodel'"):
        model.load_reference({"mlp": mlp})


# ---------------------------------------------------------------------------- readouts


def small_image_readout(dtype=F64, field_channels=5, hidden=24):
    torch.manual_seed(1)
    return randomize_(ImageReadout(field_channels=field_channels, hidden=hidden, style_dim=12,
                                   embed_dim=8)).to(dtype)


def image_inputs(B=2, C=5, N=13, dtype=F64, sizes=(3, 6, 11)):
    fields = [torch.randn(B, C, s, s + 2, dtype=dtype, requires_grad=True) for s in sizes]
    coords = (torch.rand(B, N, 2, dtype=dtype) * 2.2 - 1.1).requires_grad_()  # some outside: border
    return fields, coords


@pytest.mark.parametrize("path", ["reference_forward", "cfc_forward"])
def test_image_readout_matches_the_reference_forward(path):
    r = small_image_readout()
    fields, coords = image_inputs()
    si = torch.tensor([0.5, 1.0], dtype=F64)
    noise = [torch.randn(2, 13, dtype=F64) for _ in range(12)]
    P = dict(r.named_parameters())
    for n in (noise, None):
        out = getattr(r, path)(fields, coords, si, noise=False if n is None else n)
        ref = t_image_mlp(P, fields, coords, si, n)
        names = ["net_res2.conv1.conv.weight", "time_mlp.1.weight", "net_res3.skip.0.weight", "torgb.bias"]
        names += ["net_res4.conv3.noise.weight"] if n is not None else []
        assert_matches(out, ref, {"fields": fields[0], "fields2": fields[2], "coords": coords,
                                  **{k: P[k] for k in names}}, 1e-10)


def test_image_readout_on_a_pixel_grid_at_reference_sizes():
    """The reference's coordinate grid (pixel centres, x along the width) and sizes, float32."""
    torch.manual_seed(2)
    r = randomize_(ImageReadout(), 0.05)
    fields = [torch.randn(1, 64, s, s) for s in (3, 5, 7)]
    coords = pixel_centers(5, 7).unsqueeze(0)
    assert torch.allclose(coords[0, :7, 0], torch.linspace(-6 / 7, 6 / 7, 7)) and (coords[0, :7, 1] == -0.8).all()
    out = r(fields, coords, 0.75, noise=False)
    with torch.no_grad():
        ref = t_image_mlp({k: v.double() for k, v in r.named_parameters()}, [f.double() for f in fields],
                          coords.double(), torch.tensor([0.75], dtype=F64), None)
    assert out.shape == (1, 35, 3) and rel_err(out, ref) < 1e-5
    assert rel_err(r.cfc_forward(fields, coords, 0.75, noise=False), ref) < 1e-5


def test_image_readout_noise_statistics():
    """Fresh noise per call and layer; the CFC path's draws have the reference's statistics."""
    r = small_image_readout(torch.float32)
    fields, _ = image_inputs(B=1, dtype=torch.float32)
    coords = torch.full((1, 4000, 2), 0.3)  # one point repeated: outputs differ by noise only
    with torch.no_grad():
        plain = r.reference_forward(fields, coords, 1.0, noise=True)[0]
        fused = r.cfc_forward(fields, coords, 1.0, noise=True, generator=torch.Generator().manual_seed(3))[0]
        quiet = r.reference_forward(fields, coords[:, :1], 1.0, noise=False)[0, 0]
    assert plain.std(0).min() > 0.01 and not torch.equal(plain[0], plain[1])
    spread = plain.std(0)
    assert ((plain.mean(0) - fused.mean(0)).abs() < 5 * spread / math.sqrt(4000) * 1.5).all()
    assert ((plain.std(0) / fused.std(0)) - 1).abs().max() < 0.1
    with torch.no_grad():  # a generator draws the noise: both backends read the same draws
        a = r(fields, coords[:, :50], 1.0, generator=torch.Generator().manual_seed(4))
        with nfd_fast.use_backend("torch"):
            b = r(fields, coords[:, :50], 1.0, generator=torch.Generator().manual_seed(4))
        c = r.cfc_forward(fields, coords[:, :50], 1.0, generator=torch.Generator().manual_seed(4))
    assert rel_err(a, b) < 1e-6 and rel_err(c, b) < 1e-6 and a.std(1).min() > 0.01
    for m in r.modules():  # noise weights at zero: noise on reads as noise off
        if hasattr(m, "noise"):
            torch.nn.init.zeros_(m.noise.weight)
    with torch.no_grad():
        assert torch.allclose(r.cfc_forward(fields, coords[:, :3], 1.0, noise=True)[0], quiet.expand(3, 3), atol=1e-5)


def shape_inputs(B=2, C=6, N=17, dtype=F64):
    fields = [[torch.randn(B, C, r, r, dtype=dtype, requires_grad=True) for _ in range(3)] for r in (3, 5, 8)]
    points = ((torch.rand(B, N, 3, dtype=dtype) - 0.5) * 1.2).requires_grad_()  # a few beyond the padding
    return fields, points


def video_inputs(B=2, C=4, N=17, T=3, dtype=F64):
    fields = [[torch.randn(B, C, r, r + 1, dtype=dtype, requires_grad=True),
               torch.randn(B, C, T, r, dtype=dtype, requires_grad=True),
               torch.randn(B, C, T, r + 1, dtype=dtype, requires_grad=True)] for r in (3, 5, 8)]
    coords = (torch.rand(B, N, 3, dtype=dtype) * 2 - 1).requires_grad_()
    return fields, coords


@pytest.mark.parametrize("path", ["reference_forward", "cfc_forward"])
def test_shape_and_video_readouts_match_the_reference_forward(path):
    torch.manual_seed(4)
    s = randomize_(ShapeReadout(field_channels=6, hidden=20)).double()
    fields, points = shape_inputs()
    P = dict(s.named_parameters())
    out = getattr(s, path)(fields, points)
    assert out.shape == (2, 17, 1)
    assert_matches(out, t_shape_mlp(P, fields, points),
                   {"coarse_yz": fields[0][1], "fine_xz": fields[2][2], "points": points,
                    "net_p": P["net_p.weight"], "short": P["net_res2.shortcut.weight"]}, 1e-10)
    v = randomize_(VideoReadout(field_channels=4, hidden=20)).double()
    fields, coords = video_inputs()
    P = dict(v.named_parameters())
    out = getattr(v, path)(fields, coords)
    assert out.shape == (2, 17, 3)
    assert_matches(out, t_video_mlp(P, fields, coords),
                   {"yt": fields[0][1], "xt": fields[1][2], "coords": coords,
                    "fc_0": P["net_res4.fc_0.weight"], "out": P["net_out.weight"]}, 1e-10)


def test_video_time_planes_are_read_transposed_as_the_reference_reads_them():
    """A yt plane that varies only along its width axis gives features that depend on t only."""
    v = VideoReadout(field_channels=1, hidden=4)
    ramp = torch.linspace(0, 1, 5).view(1, 1, 1, 5).expand(1, 1, 3, 5)
    zeros = torch.zeros(1, 1, 4, 4)
    coords = torch.tensor([[[0.2, -0.9, 0.5], [0.7, 0.9, 0.5], [0.2, -0.9, -1.0]]])
    feats = v.decoder.lookup(coords, [[zeros, ramp, torch.zeros(1, 1, 3, 4)]])[0]
    assert torch.allclose(feats[0, :, 1], torch.tensor([0.75, 0.75, 0.0]))


def test_readout_state_dicts_of_the_fc_readouts():
    s, v = ShapeReadout(), VideoReadout()
    assert tuple(s.state_dict()["net_p.weight"].shape) == (256, 3)
    assert tuple(s.state_dict()["net_res1.fc_0.weight"].shape) == (64, 64)
    assert tuple(s.state_dict()["net_res2.fc_0.weight"].shape) == (256, 320)
    assert tuple(s.state_dict()["net_out.weight"].shape) == (1, 256)
    assert tuple(v.state_dict()["net_res1.fc_0.weight"].shape) == (192, 192)
    assert tuple(v.state_dict()["net_res3.shortcut.weight"].shape) == (256, 448)
    assert "net_res4.shortcut.weight" not in v.state_dict()


# ------------------------------------------------------------- CFCDecoder on both backends


@pytest.fixture
def fused_mlp_calls(monkeypatch):
    """Counts the decoder's fused_mlp calls."""
    calls = []
    original = cfc.fused_mlp

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(cfc, "fused_mlp", spy)
    return calls


@pytest.fixture
def cfc_op_calls(monkeypatch):
    """Counts the decoder's calls of the fused readout op."""
    calls = []
    original = cfc.cfc_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(cfc, "cfc_decode", spy)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cfc_decoder_equals_the_plain_readouts(backend, fused_mlp_calls, cfc_op_calls):
    """Backend "triton": one fused cfc_decode call per readout (its kernel runs under the
    interpreter on CPU). The CFC path on backend "torch": grid_lookup, and one fused_mlp
    call per block (tiny widths fit it)."""
    torch.manual_seed(5)
    r = small_image_readout(torch.float32, field_channels=4, hidden=16)
    fields, coords = image_inputs(C=4, N=9, dtype=torch.float32, sizes=(3, 5, 7))
    si = torch.tensor([0.5, 2.0])
    P = dict(r.named_parameters())
    ref = r.reference_forward(fields, coords, si, noise=False)
    with nfd_fast.use_backend(backend):
        out = r(fields, coords, si, noise=False) if backend == "triton" else r.cfc_forward(fields, coords, si, noise=False)
    assert_matches(out, ref, {"coarse": fields[0], "fine": fields[2], "coords": coords,
                              "w": P["net_res2.conv1.conv.weight"], "mod": P["net_res1.conv2.conv.modulation.weight"],
                              "b": P["net_res3.conv3.activate.bias"], "skip": P["net_res1.skip.0.weight"],
                              "time": P["time_mlp.3.weight"]}, 2e-5)
    s = randomize_(ShapeReadout(field_channels=3, hidden=8)).float()
    sf, points = shape_inputs(C=3, N=7, dtype=torch.float32)
    ref = s.reference_forward(sf, points)
    with nfd_fast.use_backend(backend):
        out = s(sf, points) if backend == "triton" else s.cfc_forward(sf, points)
    assert_matches(out, ref, {"xy": sf[0][0], "points": points, "fc": s.net_res2.fc_1.weight}, 2e-5)
    if backend == "triton":
        assert len(cfc_op_calls) == 2 and not fused_mlp_calls
    else:  # each block of both readouts: one fused_mlp call
        assert len(fused_mlp_calls) == 8 and not cfc_op_calls


def test_fused_readouts_with_noise_and_concatenated_planes(cfc_op_calls):
    """Backend "triton" with what the test above leaves out: the image readout's noise
    injection (given noise) and the video readout's concatenated planes and leaky output."""
    torch.manual_seed(7)
    r = small_image_readout(torch.float32, field_channels=3, hidden=19)
    fields, coords = image_inputs(C=3, N=11, dtype=torch.float32, sizes=(3, 5, 7))
    noise = [torch.randn(2, 11) for _ in range(12)]
    P = dict(r.named_parameters())
    ref = r.reference_forward(fields, coords, 0.8, noise=noise)
    with nfd_fast.use_backend("triton"):
        out = r(fields, coords, 0.8, noise=noise)
    assert_matches(out, ref, {"mid": fields[1], "coords": coords, "nw": P["net_res2.conv2.noise.weight"],
                              "rgb": P["torgb.conv.weight"]}, 2e-5)
    v = randomize_(VideoReadout(field_channels=3, hidden=12)).float()
    vf, vc = video_inputs(C=3, N=9, dtype=torch.float32)
    ref = v.reference_forward(vf, vc)
    with nfd_fast.use_backend("triton"):
        out = v(vf, vc)
    assert_matches(out, ref, {"xt": vf[2][2], "coords": vc, "fc": v.net_res1.fc_0.weight}, 2e-5)
    assert len(cfc_op_calls) == 2


def test_readouts_train_one_step_equal_on_both_backends(monkeypatch):
    """One training step of each readout (loss and every parameter's gradient) on the fused
    forward and backward against the reference: the image readout with noise, the shape
    readout's point layer, the video readout's concatenated planes and leaky output."""
    from conftest import assert_backends_agree_on_a_step

    from nfd_fast.ops import cfc as cfc_ops

    backwards = []
    inner = cfc_ops.kernel_backward
    monkeypatch.setattr(cfc_ops, "kernel_backward",
                        lambda *a, **k: backwards.append(1) or inner(*a, **k))
    torch.manual_seed(8)
    fields, coords = image_inputs(C=3, N=11, dtype=torch.float32, sizes=(3, 5, 7))
    noise = [torch.randn(2, 11) for _ in range(12)]
    weight = torch.randn(2, 11, 3)
    r = small_image_readout(torch.float32, field_channels=3, hidden=19)
    assert_backends_agree_on_a_step(r, lambda m: (m(fields, coords, 0.8, noise=noise) * weight).sum())
    s = randomize_(ShapeReadout(field_channels=3, hidden=8)).float()
    sf, points = shape_inputs(C=3, N=7, dtype=torch.float32)
    assert_backends_agree_on_a_step(s, lambda m: m(sf, points).square().mean())
    v = randomize_(VideoReadout(field_channels=3, hidden=12)).float()
    vf, vc = video_inputs(C=3, N=9, dtype=torch.float32)
    assert_backends_agree_on_a_step(v, lambda m: m(vf, vc).square().mean())
    assert len(backwards) == 3


def test_cfc_decoder_float16_on_the_kernels():
    r = small_image_readout(torch.float32, field_channels=4, hidden=16)
    fields, coords = image_inputs(C=4, N=9, dtype=torch.float32, sizes=(3, 5, 7))
    ref = r.reference_forward(fields, coords, 0.7, noise=False)
    weight = torch.randn_like(ref)
    ref_grads = grads(ref, [fields[1], coords], weight)
    half_fields = [f.detach().half().requires_grad_() for f in fields]
    half_coords = coords.detach().half().requires_grad_()
    with nfd_fast.use_backend("triton"):
        out = r.half()(half_fields, half_coords, 0.7, noise=False)
        out_grads = grads(out.float(), [half_fields[1], half_coords], weight)
    assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2
    assert all(g.dtype == torch.float16 and rel_err(g, e) < 3e-2 for g, e in zip(out_grads, ref_grads))


def test_cfc_decoder_wide_blocks_use_the_layer_path(fused_mlp_calls):
    """Widths beyond fused_mlp's (out > cfc.FUSED_MLP_MAX_OUT) still give the same numbers."""
    torch.manual_seed(6)
    dec = CFCDecoder([(0, 1)], block="styled")
    B, N, W = 2, 5, cfc.FUSED_MLP_MAX_OUT + 3
    coords = torch.rand(B, N, 2, dtype=F64) * 2 - 1
    fields = [torch.randn(B, 70, 3, 3, dtype=F64)]
    w = [torch.randn(B, W, 71, dtype=F64) / 8, torch.randn(W, W, dtype=F64) / 23]
    blk = CFCBlock(w, [None, torch.randn(B, W, dtype=F64)], torch.randn(W, 71, dtype=F64) / 8, scale=0,
                   extra=torch.randn(B, 1, dtype=F64))
    w_out = torch.randn(3, W, dtype=F64)
    out = dec(coords, fields, CFCProgram([blk], w_out))
    x = torch.cat([F.grid_sample(fields[0], coords.view(B, N, 1, 2), padding_mode="border",
                                 align_corners=False)[..., 0].transpose(1, 2), blk.extra[:, None].expand(B, N, 1)], -1)
    y = math.sqrt(2) * F.leaky_relu(x @ w[0].transpose(1, 2), 0.2)
    y = math.sqrt(2) * F.leaky_relu(y @ w[1].T + blk.biases[1][:, None], 0.2)
    h = (y + x @ blk.skip.T) / math.sqrt(2)
    assert rel_err(out, h @ w_out.T) < 1e-12 and not fused_mlp_calls


# ---------------------------------------------------------------------- latent diffusion


def tiny_diffusion(channels=3):
    torch.manual_seed(7)
    unet = LatentUNet(channels, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), norm_groups=4)
    randomize_(unet, 0.2)
    return LatentDiffusion(unet)


def test_schedule_and_ddim_spacing_follow_the_reference():
    s = reference_schedule()
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=F64) ** 2
    assert s.num_timesteps == 1000 and rel_err(s.betas, betas) < 1e-6
    assert rel_err(s.alphas_cumprod, torch.cumprod(1 - betas, 0)) < 1e-5
    times = ddim_timesteps(1000, 50)
    assert times.tolist() == list(range(999, 0, -20)) + [-1]
    assert ddim_timesteps(1000, 200)[:3].tolist() == [999, 994, 989] and ddim_timesteps(1000, 200)[-1] == -1
    assert ddim_timesteps(1000, 3).tolist() == [999, 665, 332, -1]
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        ddim_timesteps(1000, 0)


def test_mixed_epsilon_prediction():
    d = tiny_diffusion()
    assert tuple(d.mixing_logit.shape) == (1, 3, 1, 1) and (d.mixing_logit == -6).all()
    with torch.no_grad():
        d.mixing_logit.copy_(torch.tensor([-1.0, 0.3, 2.0]).view(1, 3, 1, 1))
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 900])
    abar = d.schedule.alphas_cumprod[t].view(2, 1, 1, 1)
    mix = 1 / (1 + torch.exp(-d.mixing_logit))
    expected = (1 - mix) * torch.sqrt(1 - abar) * x + mix * d.model(x, t)
    torch.testing.assert_close(d.eps(x, t), expected)
    # the training loss: MSE between that prediction at q_sample(z0, t, noise) and the noise
    z0 = torch.randn(2, 3, 4, 4)
    loss = d.loss(z0, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    abar = d.schedule.alphas_cumprod[t].view(2, 1, 1, 1)
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(loss, ((d.eps(x_t, t) - noise) ** 2).mean())


def test_ddim_sampling_matches_a_plain_loop():
    d = tiny_diffusion()
    x_T = torch.randn(2, 3, 4, 4)
    out = d.sample(x_T.shape, steps=4, x_T=x_T.clone())
    x = x_T.clone()
    ac = d.schedule.alphas_cumprod.double()
    times = [999, 749, 499, 249, -1]
    with torch.no_grad():
        for t, prev in zip(times[:-1], times[1:]):
            eps = d.eps(x, torch.full((2,), t)).double()
            a_t, a_p = ac[t], (ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=F64))
            x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = (a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps).float()
    assert rel_err(out, x) < 1e-5


def test_diagonal_gaussian_and_kl_weight():
    moments = torch.randn(3, 4, 5, 5) * 3
    moments[:, 2:] += torch.tensor([-40.0, 25.0]).view(1, 2, 1, 1)  # outside the clamp
    post = DiagonalGaussian(moments)
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20
    q = torch.distributions.Normal(post.mean, post.std)
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    assert rel_err(post.kl(), expected) < 1e-5
    assert kl_coefficient(0, 100) == pytest.approx(1e-4)
    assert kl_coefficient(45, 100, maximum=0.1) == pytest.approx(1e-4 + 0.5 * (0.1 - 1e-4))
    assert kl_coefficient(90, 100) == kl_coefficient(100, 100) == pytest.approx(0.5)


# ------------------------------------------------------------------ the model, end to end


def synthetic_images(n, size, generator):
    return blob_images(random_blobs(n, channels=3, generator=generator), size)


def test_vae_shapes_and_fields_at_three_scales():
    m = DDMI(DDMIConfig.tiny(16))
    post = m.vae.encode(torch.randn(2, 3, 16, 16))
    assert post.mean.shape == (2, 4, 4, 4)
    fields = m.vae.decode(post.mean)
    assert [tuple(f.shape) for f in fields] == [(2, 8, 4, 4), (2, 8, 8, 8), (2, 8, 16, 16)]


def test_training_losses_fall_and_generation_at_two_resolutions(tmp_path):
    g = torch.Generator().manual_seed(9)
    images = synthetic_images(6, 8, g)
    torch.manual_seed(9)
    m = DDMI(DDMIConfig.tiny(8))
    opt = torch.optim.Adam(list(m.vae.parameters()) + list(m.readout.parameters()), lr=3e-3)
    l1 = []
    for step in range(40):
        loss, parts = m.vae_loss(images, step, 40, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        l1.append(parts["l1"].item())
    assert sum(l1[-5:]) < 0.5 * sum(l1[:5]), l1
    # the latent model, from an even mixing (logit 0) so that 40 steps show learning; the
    # loss is judged on fixed (t, noise) draws
    m.diffusion.mixing_logit.data.zero_()
    opt = torch.optim.Adam(m.diffusion.parameters(), lr=1e-2)
    batch = images.repeat(4, 1, 1, 1)
    held = images.repeat(16, 1, 1, 1)
    before = m.diffusion_loss(held, generator=torch.Generator().manual_seed(0)).item()
    for _ in range(40):
        loss = m.diffusion_loss(batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = m.diffusion_loss(held, generator=torch.Generator().manual_seed(0)).item()
    assert after < 0.85 * before, (before, after)
    small, large = m.generate(2, [8, 24], steps=3, generator=g)
    assert small.shape == (2, 3, 8, 8) and large.shape == (2, 3, 24, 24)
    assert torch.isfinite(small).all() and torch.isfinite(large).all()
    m.save(tmp_path / "ddmi.pt")
    again = DDMI.load(tmp_path / "ddmi.pt")
    torch.testing.assert_close(again.reconstruct(images[:2], 12), m.reconstruct(images[:2], 12))


def test_vae_loss_on_a_crop_of_a_finer_rendering():
    """The reference's targets beyond si = 1: a crop of a finer image's pixel centres."""
    coords = crop_coordinates(12, 8, 3, 1)
    assert coords.shape == (64, 2)
    torch.testing.assert_close(coords[0], torch.tensor([-11 / 12 + 2 / 12, -11 / 12 + 6 / 12]))
    torch.testing.assert_close(coords[9], torch.tensor([-11 / 12 + 4 / 12, -11 / 12 + 8 / 12]))
    with pytest.raises(ValueError, match="top, left: a 8\\^2 crop must lie inside 12\\^2"):
        crop_coordinates(12, 8, 5, 0)
    m = DDMI(DDMIConfig.tiny(8))
    images = synthetic_images(2, 8, torch.Generator().manual_seed(12))
    values = torch.rand(2, 64, 3) * 2 - 1
    target = (coords.expand(2, -1, -1), values, 8 / 12)
    loss, parts = m.vae_loss(images, 5, 10, generator=torch.Generator().manual_seed(13), noise=False, target=target)
    post = m.vae.encode(images)
    pred = m.readout(m.vae.decode(post.sample(torch.Generator().manual_seed(13))), coords.expand(2, -1, -1),
                     8 / 12, noise=False)
    expected = (pred - values).abs().sum((1, 2)).mean() + kl_coefficient(5, 10, 1e-4, 0.01) * post.kl().mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="target: values"):
        m.vae_loss(images, target=(coords.expand(2, -1, -1), values[:, :5], 1.0))


def test_backends_agree_on_the_first_training_step():
    images = synthetic_images(2, 8, torch.Generator().manual_seed(10))
    torch.manual_seed(10)
    m = DDMI(DDMIConfig.tiny(8))
    randomize_(m.readout, 0.2)
    results = []
    for name in ("torch", "triton"):
        m.zero_grad()
        with nfd_fast.use_backend(name):
            loss, _ = m.vae_loss(images, generator=torch.Generator().manual_seed(11), noise=False)
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) < 1e-5 and len(g0) == len(g1) > 0
    # attention's key bias has an exactly-zero gradient: judge each against the largest
    scale = max(g.abs().max() for g in g0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    r = ImageReadout(field_channels=4, hidden=8, style_dim=8, embed_dim=8)
    fields = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    coords = torch.rand(2, 5, 2)
    with pytest.raises(ValueError, match="fields: expected 3 scales"):
        r(fields[:2], coords, 1.0)
    with pytest.raises(ValueError, match=r"fields\[1\]: expected \[B=2, C=4, H, W\]"):
        r([fields[0], torch.randn(2, 5, 3, 3), fields[2]], coords, 1.0)
    with pytest.raises(ValueError, match=r"coords: expected \[B, N, 2\]"):
        r(fields, torch.rand(2, 5, 3), 1.0)
    with pytest.raises(ValueError, match=r"scale: expected a number or a tensor \[B=2\]"):
        r(fields, coords, torch.ones(3))
    with pytest.raises(ValueError, match="noise: expected True, False or 12 tensors"):
        r.cfc_forward(fields, coords, 1.0, noise=[torch.randn(2, 5)] * 11)
    with pytest.raises(ValueError, match=r"fields\[0\]: expected 3 plane"):
        ShapeReadout(field_channels=4, hidden=8)([[f] for f in fields], torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="block must be one of"):
        CFCDecoder([(0, 1)], block="dense")
    dec = CFCDecoder([(0, 1)], block="resnet_fc")
    blk = CFCBlock([torch.randn(4, 4), torch.randn(4, 4)], [None, None], scale=3)
    with pytest.raises(ValueError, match=r"program.blocks\[0\].scale: 3 is not one of the 1 scales"):
        dec(coords, [fields[0]], CFCProgram([blk], torch.randn(3, 4)))
    blk.scale = 0
    with pytest.raises(ValueError, match="points: the program has a point layer"):
        dec(coords, [fields[0]], CFCProgram([blk], torch.randn(3, 4), point_weight=torch.randn(4, 2)))
    with pytest.raises(ValueError, match=r"program.blocks\[0\].weights\[0\]: expected \[out, in\] or \[B=2"):
        dec(coords, [fields[0]], CFCProgram([CFCBlock([torch.randn(3, 4, 4)] * 2, [None] * 2, scale=0)],
                                            torch.randn(3, 4)))
    m = DDMI(DDMIConfig.tiny(8))
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, 8, 8\]"):
        m.vae_loss(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, H, W\] with H and W divisible by 4"):
        m.vae.encode(torch.randn(1, 3, 10, 10))
    with pytest.raises(ValueError, match=r"z: expected \[B, 4, h, w\]"):
        m.vae.decode(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match=r"x_t: expected \[B, 4, h, w\]"):
        m.diffusion.eps(torch.randn(1, 3, 2, 2), torch.zeros(1, dtype=torch.long))


def test_nan_in_gives_nan_out():
    r = small_image_readout(torch.float32, field_channels=4, hidden=8)
    fields, coords = image_inputs(C=4, N=4, dtype=torch.float32)
    fields[1] = fields[1].detach().clone()
    fields[1][:, :, :, :] = float("nan")
    with torch.no_grad():
        assert torch.isnan(r.cfc_forward(fields, coords, 1.0, noise=False)).all()
        assert torch.isnan(r.reference_forward(fields, coords, 1.0, noise=False)).all()
