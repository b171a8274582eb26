"""Tests for dcl.py: networks, PatchNCE, data, training step, and the command line.

    python -m pytest -q

Everything runs on the CPU at tiny sizes (ngf 8, 32-pixel crops, S = 16,
E = 16), so the whole file takes about two minutes on two cores. Parameter counts
and state-dict keys at the official sizes are checked on the meta device.
Section numbers (§N) refer to the banners of dcl.py, F-numbers to its
faithfulness notes. Where each expected value comes from, the test's docstring
says: a known answer derived there by hand; a slow, obviously correct reference
written in this file (a loop over rows, a hand-written instance norm, the
official batch-1 construction); the official code's constants (parameter counts,
key names, layer indices, defaults), written out by hand rather than read off
dcl.py; or a property (shapes, which networks a loss's gradient reaches).
"""
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcl

REPO = Path(dcl.__file__).resolve().parent
# One thread per process: on two cores, two processes (pytest and a child, or a
# training run elsewhere) each spinning two OpenMP threads run several times slower.
torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--load_size", "36", "--crop_size", "32", "--ngf", "8", "--ndf", "8", "--netF_nc", "16",
        "--num_patches", "16", "--num_threads", "0", "--device", "cpu", "--print_freq", "1",
        "--display_freq", "1"]
LOSS_NAMES = {"cut": {"D_real", "D_fake", "G_GAN", "NCE", "NCE_Y", "G"},
              "fastcut": {"D_real", "D_fake", "G_GAN", "NCE", "G"},
              "dcl": {"D_A", "G_A", "NCE1", "idt_A", "D_B", "G_B", "NCE2", "idt_B", "G"},
              "simdcl": {"D_A", "G_A", "NCE1", "idt_A", "D_B", "G_B", "NCE2", "idt_B", "G", "Sim"},
              "cyclegan": {"D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B", "G"},
              "negcut": {"D_real", "D_fake", "G_GAN", "NCE", "NCE_Y", "G", "N"},
              "fastnegcut": {"D_real", "D_fake", "G_GAN", "NCE", "G", "N"},
              "hnegsrc": {"D_real", "D_fake", "G_GAN", "HDCE", "HDCE_Y", "SRC", "G"}}
ONE_SIDED = ["cut", "fastcut", "negcut", "fastnegcut"]
TWO_SIDED = ["dcl", "simdcl", "cyclegan"]

# -----------------------------------------------------------------------------
# fixtures and helpers
# -----------------------------------------------------------------------------

def write_image(path: Path, size=(40, 40), mode="RGB", seed=0):
    """A smooth gradient plus noise (so crops and flips change it), in any PIL mode."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 30, (h, w, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    img = img.quantize(16) if mode == "P" else img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_dataset(root: Path) -> Path:
    """4 trainA (RGB, L, RGBA, P; mixed sizes), 3 trainB, testA with a JPEG,
    a 37x29 image in a subfolder, and 2 testB."""
    for i, (mode, size) in enumerate([("RGB", (40, 40)), ("L", (48, 36)), ("RGBA", (40, 40)),
                                      ("P", (36, 44))]):
        write_image(root / "trainA" / f"{i}.png", size, mode, seed=i)
    for i in range(3):
        write_image(root / "trainB" / f"{i}.png", (40, 40), "RGB", seed=10 + i)
    write_image(root / "testA" / "0.jpg", (40, 40), "RGB", seed=20)
    write_image(root / "testA" / "1.png", (44, 36), "L", seed=21)
    write_image(root / "testA" / "sub" / "2.png", (37, 29), "RGB", seed=22)
    for i in range(2):
        write_image(root / "testB" / f"{i}.png", (40, 40), "RGB", seed=30 + i)
    return root


def cli(*args, timeout=120):
    """python dcl.py ARGS in the repository, as a user would type it."""
    return subprocess.run([sys.executable, "dcl.py", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def main_in_process(capsys, *args):
    """dcl.main(ARGS) in this process: (exit status, stdout, stderr)."""
    try:
        code = dcl.main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_cfg(**overrides):
    flags = dict(dataroot="unused", load_size=36, crop_size=32, ngf=8, ndf=8, netF_nc=16,
                 num_patches=16, num_threads=0, device="cpu")
    return dcl.resolve_config({**flags, **overrides})[0]


def read_log(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def train_in_process(capsys, *args):
    """dcl.main(["train", ARGS]) in this process: (exit status, stdout, stderr).
    train installs its own SIGINT/SIGTERM handlers; pytest's are put back after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main_in_process(capsys, "train", *args)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def spy_on_step(opts, name, record):
    """Call record() right before opts[name].step() runs."""
    step = opts[name].step
    opts[name].step = lambda *a, **k: (record(), step(*a, **k))[1]


def translated_by_hand(G, image):
    """What translate must write for `image`: reflect-pad to a multiple of 4,
    G, crop back, (y + 1)/2·255 truncated to uint8 (official tensor2im, F8)."""
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32))
    x = (x.permute(2, 0, 1) / 255.0 - 0.5) / 0.5
    h, w = x.shape[1:]
    with torch.no_grad():
        padded = torch.nn.functional.pad(x[None], (0, -w % 4, 0, -h % 4), mode="reflect")
        y = G(padded)[0, :, :h, :w]
    return ((y.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) / 2 * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """runs(mode) -> (completed process, run folder) of `train --max_steps 2`, trained once."""
    cache, root = {}, tmp_path_factory.mktemp("runs")

    def get(mode):
        if mode not in cache:
            proc = cli("train", "--mode", mode, "--max_steps", 2, "--dataroot", data, *TINY,
                       "--checkpoints_dir", root, "--name", mode)
            assert proc.returncode == 0, proc.stderr
            cache[mode] = proc, root / mode
        return cache[mode]
    return get

# -----------------------------------------------------------------------------
# networks (§1-§4, §6, §9)
# -----------------------------------------------------------------------------

def count_parameters(net):
    return sum(p.numel() for p in net.parameters())


def weight_and_bias(key, shape):
    return {f"{key}.weight": shape, f"{key}.bias": shape[:1]}


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_parameter_counts_at_official_sizes():
    """§2-§4: G, D and H have the official code's parameter counts, written out here."""
    with torch.device("meta"):
        G, D = dcl.Generator(64), dcl.Discriminator(64)
        H5 = dcl.ProjectionHead(G.tap_channels((0, 4, 8, 12, 16)), 256)
        H4 = dcl.ProjectionHead(G.tap_channels((4, 8, 12, 16)), 256)
    assert [count_parameters(net) for net in (G, D, H5, H4)] == \
        [11_378_179, 2_764_737, 560_384, 493_568]


def test_state_dict_keys_are_official():
    """§2-§4: the keys and shapes of G (52 entries), D (13) and H are the
    official ones, written out here by hand from the official CUT code's layer lists."""
    with torch.device("meta"):
        G, D = dcl.Generator(64), dcl.Discriminator(64)
        H = dcl.ProjectionHead(G.tap_channels((0, 4, 8, 12, 16)), 256)
    g = {"model.7.filt": (128, 1, 3, 3), "model.11.filt": (256, 1, 3, 3),
         "model.21.filt": (256, 1, 4, 4), "model.25.filt": (128, 1, 4, 4)}
    for i, shape in {1: (64, 3, 7, 7), 4: (128, 64, 3, 3), 8: (256, 128, 3, 3),
                     22: (128, 256, 3, 3), 26: (64, 128, 3, 3), 30: (3, 64, 7, 7)}.items():
        g.update(weight_and_bias(f"model.{i}", shape))
    for block in range(12, 21):
        for conv in (1, 5):
            g.update(weight_and_bias(f"model.{block}.conv_block.{conv}", (256, 256, 3, 3)))
    d = {"model.2.filt": (64, 1, 3, 3), "model.6.filt": (128, 1, 3, 3),
         "model.10.filt": (256, 1, 3, 3)}
    for i, (o, c) in {
        0: (64, 3),
        3: (128, 64),
        7: (256, 128),
        11: (512, 256),
        14: (1, 512),
    }.items():
        d.update(weight_and_bias(f"model.{i}", (o, c, 4, 4)))
    h = {}
    for l, c in enumerate((3, 128, 256, 256, 256)):
        h.update(
            {**weight_and_bias(f"mlp_{l}.0", (256, c)), **weight_and_bias(f"mlp_{l}.2", (256, 256))}
        )
    assert (len(g), len(d)) == (52, 13)
    assert shapes(G) == g and shapes(D) == d and shapes(H) == h


def test_shapes_at_256():
    """§2-§3: at 256x256, G gives 3x256x256 in [-1, 1], D a 1x30x30 score map,
    and the taps 0,4,8,12,16 are 3x262², 2ngf x256², 4ngf x128², 4ngf x64², 4ngf x64²."""
    torch.manual_seed(0)
    ngf = 8
    G, D = dcl.init_weights(dcl.Generator(ngf)), dcl.init_weights(dcl.Discriminator(8))
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        y, scores, taps = G(x), D(x), G.encode(x, (0, 4, 8, 12, 16))
    assert y.shape == (1, 3, 256, 256) and y.min() >= -1 and y.max() <= 1
    assert scores.shape == (1, 1, 30, 30)
    assert [t.shape[1:] for t in taps] == [
        (3, 262, 262),
        (2 * ngf, 256, 256),
        (4 * ngf, 128, 128),
        (4 * ngf, 64, 64),
        (4 * ngf, 64, 64),
    ]


def test_encode_is_a_prefix_run_that_stops_early():
    """§2: G.encode returns exactly the outputs of the listed layers of G.model,
    and never runs a layer after the last listed one (official encode_only)."""
    torch.manual_seed(0)
    G = dcl.init_weights(dcl.Generator(8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = (0, 4, 8, 12, 16)
    expected, h = [], x
    for index in range(17):
        h = G.model[index](h)
        if index in ids:
            expected.append(h)

    def forbidden(*_):
        raise AssertionError("encode ran a layer after the last tapped one")
    G.model[17].register_forward_hook(forbidden)
    got = G.encode(x, ids)
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, expected))
    G.model[9].register_forward_hook(forbidden)
    assert len(G.encode(x, (4, 8))) == 2                     # stops at 8: layer 9 never runs


def test_downsample_and_upsample():
    """§1: the blur kernels are [1,2,1]⊗[1,2,1]/16 and 4·[1,3,3,1]⊗[1,3,3,1]/64,
    stored as persistent `filt` buffers; Downsample halves an even size,
    Upsample doubles; both map a constant image to the same constant (the
    upsample kernel's two phases each sum to 1, and replication padding keeps
    the border constant too)."""
    down, up = dcl.Downsample(2), dcl.Upsample(2)
    a, b = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(down.filt, torch.outer(a, a).div(16).expand(2, 1, 3, 3))
    assert torch.allclose(up.filt, torch.outer(b, b).mul(4 / 64).expand(2, 1, 4, 4))
    assert "filt" in down.state_dict() and "filt" in up.state_dict()
    assert down(torch.rand(1, 2, 8, 6)).shape == (1, 2, 4, 3)
    assert up(torch.rand(1, 2, 5, 7)).shape == (1, 2, 10, 14)
    const = torch.full((1, 2, 6, 8), 0.3)
    assert torch.allclose(up(const), torch.full((1, 2, 12, 16), 0.3), atol=1e-6)
    assert torch.allclose(down(const), torch.full((1, 2, 3, 4), 0.3), atol=1e-6)


def test_init_is_xavier_gain_002():
    """§1, §14: build_networks gives every conv and linear weight
    std = 0.02·√(2/(fan_in+fan_out)) and zero biases. A resblock conv at ngf 64
    has fan_in = fan_out = 256·9 = 2304, so std = 0.02·√(2/4608) ≈ 4.167e-4;
    H's mlp_4.2 (256x256) has std = 0.02·√(2/512) = 1.25e-3. "An untrained G
    outputs an almost uniform grey": on a random 64x64 image every output pixel
    lies within 0.2 of grey (0) and their std is below 0.05 (measured: 0.09, 0.026)."""
    nets = dcl.build_networks(dcl.resolve_config({"dataroot": "unused"})[0], "cpu")
    conv = nets["G"].model[12].conv_block[1].weight
    assert conv.std().item() == pytest.approx(0.02 * math.sqrt(2 / 4608), rel=0.05)
    assert nets["H"].mlp_4[2].weight.std().item() == pytest.approx(1.25e-3, rel=0.05)
    with torch.no_grad():                                     # "an almost uniform grey"
        y = nets["G"](torch.rand(1, 3, 64, 64) * 2 - 1)
    assert y.abs().max() < 0.2 and y.std() < 0.05
    for net in nets.values():
        for name, p in net.named_parameters():
            assert not name.endswith("bias") or not p.any(), name


def receptive_width(net_output, x) -> int:
    """Width in input pixels of what the centre of a map depends on."""
    h, w = net_output.shape[2:]
    x.grad = None
    net_output[0, 0, h // 2, w // 2].backward()
    columns = (x.grad[0].abs().sum((0, 1)) > 0).nonzero()
    return int(columns.max() - columns.min() + 1)


def test_receptive_fields(monkeypatch):
    """§2, §3: the taps 0, 4, 8, 12, 16 see 1, 9, 15, 35 and 99 pixels (the DCLGAN
    paper's numbers), the antialiased D 84x84 and the stride-2 D 70x70. Measured
    as the support of the gradient of one centre output, with instance norm
    replaced by the identity (it makes every output depend on the whole image)
    and all weights positive (so nothing cancels and every ReLU passes)."""
    monkeypatch.setattr(dcl, "norm", lambda channels: torch.nn.Identity())
    G, D, D70 = dcl.Generator(4), dcl.Discriminator(4), dcl.Discriminator(4, antialias=False)
    for net in (G, D, D70):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.constant_(m.weight, 0.01)
                torch.nn.init.zeros_(m.bias)
    x = torch.ones(1, 3, 192, 192, requires_grad=True)
    assert [receptive_width(G.encode(x, (tap,))[0], x) for tap in (0, 4, 8, 12, 16)] == \
        [1, 9, 15, 35, 99]
    assert (receptive_width(D(x), x), receptive_width(D70(x), x)) == (84, 70)


def test_eps_normalisation_is_within_one_percent_at_init():
    """§4, F13: DCLGAN computes cosines; we take dot products of x/(‖x‖ + 1e-7).
    The claim "within 1% at initialisation": with the xavier(0.02) init, H's raw
    outputs on the taps 4 and 8 of a fresh G have norms near 3e-5, so the rows
    have norm ≈ 0.996 and a dot product is ≥ 0.99 of the cosine; deeper taps are
    already at ≥ 0.9999."""
    torch.manual_seed(0)
    cfg = dcl.resolve_config({"dataroot": "x", "mode": "dcl", "ngf": 64})[0]
    nets = dcl.build_networks(cfg, "cpu")
    with torch.no_grad():
        feats = nets["G_ab"].encode(torch.rand(1, 3, 64, 64) * 2 - 1, cfg.layer_ids)
        rows, _ = nets["H_a"](feats, 64)
    norms = [z.norm(dim=1) for z in rows]
    assert all(n.min() ** 2 >= 0.99 and n.max() <= 1.0 for n in norms)
    assert norms[0].max() < 0.999 and norms[3].min() > 0.9999  # the eps matters at 4, not at 16


@pytest.mark.parametrize("mode", ["dcl", "simdcl"])
def test_eps_normalisation_changes_the_first_gradients_only(mode):
    """§4, F13: DCLGAN's loss takes cosines of z/(‖z‖ + 1e-7); we take their dot
    products. At initialisation H's outputs are tiny, so the eps matters: at
    step 1 some row norm is below 0.995 and the heads' gradients differ from the
    cosine version's by more than 5%, G's by more than 1% (measured here 14-29%
    and 4-11%). Adam's first step moves every bias of H by about ±lr (DCLGAN's
    heads 1e-3, SimDCL's 2e-4), so ‖z‖ ≳ lr·√E ≫ 1e-7 with E = 256: from step 2
    every row norm is ≥ 0.99996 and the gradients agree to 2e-4."""
    cfg = tiny_cfg(mode=mode, netF_nc=256, load_size=64, crop_size=64)
    torch.manual_seed(0)
    nets = dcl.build_networks(cfg, "cpu")
    opts = dcl.build_optimizers(nets, cfg)
    real_a, real_b = (torch.rand(1, 3, 64, 64) * 2 - 1 for _ in "ab")
    dot_product = dcl.patch_nce_loss

    def cosine(q, k, *args, **kw):
        return dot_product(q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True),
                           *args, **kw)

    def gradients(loss):                                      # one step on a copy of the nets
        trial = copy.deepcopy(nets)
        for name in ("D_a", "D_b"):
            trial[name].requires_grad_(True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dcl, "patch_nce_loss", loss)
            torch.manual_seed(1)
            dcl.MODES[mode].step(trial, dcl.build_optimizers(trial, cfg), real_a, real_b, cfg)
        return {k: torch.cat([p.grad.flatten() for p in v.parameters()])
                for k, v in trial.items() if k in ("G_ab", "G_ba", "H_a", "H_b")}
    for step in (1, 2):
        with torch.no_grad():
            rows, _ = nets["H_a"](nets["G_ab"].encode(real_a, cfg.layer_ids), 16)
        smallest = min(r.norm(dim=1).min().item() for r in rows)
        ours, official = gradients(dot_product), gradients(cosine)
        error = {k: ((ours[k] - official[k]).norm() / official[k].norm()).item() for k in ours}
        if step == 1:
            assert smallest < 0.995, smallest
            assert (
                min(error["H_a"], error["H_b"]) > 0.05 and min(error["G_ab"], error["G_ba"]) > 0.01
            )
        else:
            assert smallest >= 0.99996 and max(error.values()) < 2e-4, (smallest, error)
        torch.manual_seed(1)
        dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)


def test_official_state_dict_loads_strictly(tmp_path):
    """§2: a G state dict saved as an official latest_net_G.pth loads into a new
    Generator with strict=True and gives the same outputs."""
    torch.manual_seed(0)
    G = dcl.init_weights(dcl.Generator(8))
    torch.save(G.state_dict(), tmp_path / "latest_net_G.pth")
    G2 = dcl.Generator(8)
    G2.load_state_dict(torch.load(tmp_path / "latest_net_G.pth", weights_only=True), strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(G(x), G2(x))


def test_two_generator_parameter_counts_at_official_sizes():
    """§2, §3, §6, §14: on the meta device, the non-antialiased G (both flags off)
    has the antialiased G's 11,378,179 parameters, the stride-2 D 2,764,737,
    a MappingHead 10,688 (conv 4·64·9 + 64 = 2,368, two linears
    2·(64·64 + 64) = 8,320). build_networks at official sizes (ngf = ndf = 64,
    E = 256) trains 2·11,378,179 + 2·2,764,737 = 28,285,832 parameters for
    CycleGAN (the pools hold buffers only), + 2·493,568 = 29,272,968 for
    DCLGAN, + 4·10,688 = 29,315,720 for SimDCL (the official code's counts)."""
    totals = {}
    with torch.device("meta"):
        G, D, M = dcl.Generator(64, False, False), dcl.Discriminator(64, False), dcl.MappingHead()
        for mode in TWO_SIDED:
            nets = dcl.build_networks(
                dcl.resolve_config({"mode": mode, "dataroot": "x"})[0], "meta"
            )
            assert list(nets) == list(dcl.MODES[mode].networks)
            totals[mode] = sum(count_parameters(net) for net in nets.values())
    assert [count_parameters(net) for net in (G, D, M)] == [11_378_179, 2_764_737, 10_688]
    assert totals == {"cyclegan": 28_285_832, "dcl": 29_272_968, "simdcl": 29_315_720}


def test_upstream_cyclegan_state_dict_keys():
    """§2-§3: with both antialias flags off, G has upstream CycleGAN's 48 keys
    (upstream CycleGAN's layer list): model.1 (conv7 3→64), model.4 and model.7 (stride-2
    conv3 64→128, 128→256), model.10..18.conv_block.{1,5}, the transposed
    convs model.19 and model.22 (weights stored in×out×3×3: 256x128 and
    128x64, biases of the output width), model.26 (conv7 64→3), and no `filt`
    buffer. The stride-2 D has model.{0,2,5,8,11} (10 keys, upstream CycleGAN).
    Written out here, not read off the code."""
    with torch.device("meta"):
        G, D = dcl.Generator(64, False, False), dcl.Discriminator(64, False)
    g = {"model.19.weight": (256, 128, 3, 3), "model.19.bias": (128,),
         "model.22.weight": (128, 64, 3, 3), "model.22.bias": (64,)}
    for i, shape in {1: (64, 3, 7, 7), 4: (128, 64, 3, 3), 7: (256, 128, 3, 3),
                     26: (3, 64, 7, 7)}.items():
        g.update(weight_and_bias(f"model.{i}", shape))
    for block in range(10, 19):
        for conv in (1, 5):
            g.update(weight_and_bias(f"model.{block}.conv_block.{conv}", (256, 256, 3, 3)))
    d = {}
    for i, (o, c) in {0: (64, 3), 2: (128, 64), 5: (256, 128), 8: (512, 256), 11: (1, 512)}.items():
        d.update(weight_and_bias(f"model.{i}", (o, c, 4, 4)))
    assert (len(g), len(d), len(G.model), len(D.model)) == (48, 10, 28, 12)
    assert shapes(G) == g and shapes(D) == d


def test_non_antialiased_shapes():
    """§2-§3: the non-antialiased G maps 64x64 to 3x64x64 (two stride-2 convs
    64 → 32 → 16, two transposed convs with output_padding 1 back to 64); the
    stride-2 D (ndf 8) maps 256x256 to a 1x30x30 score map: k4 s2 p1 gives
    256 → 128 → 64 → 32, then k4 s1 p1 gives 31 and 30 (derived here by hand)."""
    torch.manual_seed(0)
    G = dcl.init_weights(dcl.Generator(8, False, False), "normal")
    D = dcl.init_weights(dcl.Discriminator(8, False), "normal")
    with torch.no_grad():
        y = G(torch.rand(2, 3, 64, 64) * 2 - 1)
        scores = D(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert y.shape == (2, 3, 64, 64) and y.min() >= -1 and y.max() <= 1
    assert scores.shape == (1, 1, 30, 30)


def test_translate_official_cyclegan_generator(data, tmp_path, capsys):
    """§17: a random non-antialiased G saved as CycleGAN's latest_net_G_A.pth
    loads strictly under `translate --mode cyclegan` (which builds the 28-entry
    G), and the PNG for a 37x29 image equals G(x) computed here."""
    torch.manual_seed(0)
    G = dcl.init_weights(dcl.Generator(8, False, False), "normal").eval()
    torch.save(G.state_dict(), tmp_path / "latest_net_G_A.pth")
    image = data / "testA" / "sub" / "2.png"
    translate_in_process(capsys, tmp_path / "latest_net_G_A.pth", image, tmp_path / "out",
                         "--mode", "cyclegan")
    expected = translated_by_hand(G, image)
    assert expected.shape == (29, 37, 3) and expected.std() > 1      # not a flat grey image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "2.png")), expected)

# -----------------------------------------------------------------------------
# projection head (§4)
# -----------------------------------------------------------------------------

def test_projection_head():
    """§4: rows are unit vectors, (n·S)xE, image-major; S is clamped to H·W;
    given ids are reused; one id set per layer is shared by the batch, and row
    b·S+i is image b's feature at position ids[i] (row-major: y = id // W, x = id % W).
    PyTorch's default Linear init here: after xavier gain 0.02 the raw outputs
    have norms near 1e-4, and the official eps (x/(‖x‖ + 1e-7)) leaves rows of
    norm ≈ 0.9997, as in the official code."""
    torch.manual_seed(0)
    H = dcl.ProjectionHead([4, 4], 16)
    big, small = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 3, 3)
    (z_big, z_small), (ids_big, ids_small) = H([big, small], 16)
    assert z_big.shape == (2 * 16, 16) and z_small.shape == (2 * 9, 16)
    assert torch.allclose(z_big.norm(dim=1), torch.ones(32), atol=1e-5)
    assert sorted(ids_small.tolist()) == list(range(9))
    rows = torch.stack([big[b][:, ids_big // 6, ids_big % 6].T for b in range(2)]).flatten(0, 1)
    z = H.mlp_0(rows)
    assert torch.allclose(z_big, z / (z.norm(dim=1, keepdim=True) + 1e-7), atol=1e-6)
    (again, _), ids_again = H([big, small], 16, [ids_big, ids_small])
    assert torch.equal(ids_again[0], ids_big) and torch.equal(again, z_big)
    (twins, _), _ = H([big[:1].expand(2, -1, -1, -1), small], 16)
    assert torch.equal(twins[:16], twins[16:])               # same positions for both images

# -----------------------------------------------------------------------------
# image pool (§9)
# -----------------------------------------------------------------------------

def test_image_pool_fills_then_swaps_at_random():
    """§9: capacity 3. The first 3 fakes are stored in slots 0..2 and returned
    unchanged (count 1, 2, 3). Once full, each returned image is either the new
    one (pool unchanged) or exactly one stored image, whose slot then holds the
    new one (upstream CycleGAN's image pool); with the torch RNG seeded, both happen within 20
    draws, and the count stays 3."""
    pool = dcl.ImagePool(3, 4)
    torch.manual_seed(0)
    for i in range(3):
        fake = torch.rand(1, 3, 4, 4)
        assert torch.equal(pool(fake), fake) and pool.count == i + 1
        assert torch.equal(pool.images[i], fake[0])
    passed = swapped = 0
    for _ in range(20):
        before, new = pool.images.clone(), torch.rand(1, 3, 4, 4)
        out = pool(new)
        if torch.equal(out, new):
            assert torch.equal(pool.images, before)
            passed += 1
        else:
            [slot] = [s for s in range(3) if torch.equal(out[0], before[s])]
            before[slot] = new[0]
            assert torch.equal(pool.images, before)
            swapped += 1
    assert passed and swapped and pool.count == 3


def test_image_pool_of_capacity_0_passes_fakes_through():
    """§9: with capacity 0 (--pool_size 0, upstream's "no pool") the pool
    returns its input, detached, whatever the RNG draws."""
    pool = dcl.ImagePool(0, 4)
    torch.manual_seed(0)
    fakes = torch.rand(4, 3, 4, 4, requires_grad=True)
    out = pool(fakes)
    assert torch.equal(out, fakes) and not out.requires_grad and pool.count == 0


def test_image_pool_state_round_trips(tmp_path):
    """§9, §16: the pool's images and its count travel through state_dict /
    load_state_dict (count as extra state), also via torch.save and
    torch.load(weights_only=True), as in checkpoints."""
    pool = dcl.ImagePool(3, 4)
    pool(torch.rand(2, 3, 4, 4))
    torch.save(pool.state_dict(), tmp_path / "pool.pt")
    for state in (pool.state_dict(), torch.load(tmp_path / "pool.pt", weights_only=True)):
        other = dcl.ImagePool(3, 4)
        other.load_state_dict(state, strict=True)
        assert other.count == 2 and torch.equal(other.images, pool.images)
        assert other.images[:2].any() and not other.images[2].any()

# -----------------------------------------------------------------------------
# losses (§3, §4, §6)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, p, real, expected", [
    ("lsgan", 0.5, True, 0.25), ("lsgan", 0.5, False, 0.25), ("lsgan", 1.0, True, 0.0),
    ("hinge", 0.5, True, 0.5), ("hinge", 0.5, False, 1.5), ("hinge", 2.0, True, 0.0)])
def test_gan_loss_known_answers(mode, p, real, expected):
    """§3: on a constant map p, lsgan real = (p−1)², fake = p²; hinge real =
    relu(1−p), fake = relu(1+p). p = 0.5: lsgan 0.25 both; hinge 0.5 and 1.5;
    lsgan real at p = 1 and hinge real at p = 2 are 0."""
    assert dcl.gan_loss(torch.full((2, 1, 30, 30), p), real, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("tau", [0.07, 1.0, 10.0])
def test_patch_nce_known_answer(tau):
    """§4: q = k = three orthonormal vectors (n = 1). Row i has l_pos = 1, l_neg
    = 0 off the diagonal and −10 on it (filled before dividing by τ), so
    ℓ = −log(e^(1/τ) / (e^(1/τ) + e^(−10/τ) + 2)) = log(1 + (2 + e^(−10/τ))·e^(−1/τ)):
    1.24975e-6 at τ = 0.07, 0.551454 at τ = 1, 1.145033 at τ = 10 (where the
    −10 matters: −inf would give 1.0993). dcl.py computes in fp32, where
    1 + 1.25e-6 carries ~1.2e-7 of rounding, hence the absolute tolerance."""
    q = torch.eye(3)
    expected = math.log1p((2 + math.exp(-10 / tau)) * math.exp(-1 / tau))
    loss = dcl.patch_nce_loss(q, q.clone(), 1, tau)
    assert loss.shape == (3,)
    assert loss.double().numpy() == pytest.approx([expected] * 3, rel=1e-4, abs=1.2e-7)


def slow_patch_nce(q, k, n, tau):
    """The official semantics, one row at a time (the official CUT code, models/patchnce.py)."""
    S, losses = q.shape[0] // n, []
    for b in range(n):
        for i in range(S):
            qi = q[b * S + i]
            logits = [qi @ k[b * S + i]]
            logits += [torch.tensor(-10.0) if j == i else qi @ k[b * S + j] for j in range(S)]
            logits = torch.stack(logits) / tau
            losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses)


def test_patch_nce_equals_slow_loop_and_uses_same_image_negatives():
    """§4: patch_nce_loss equals a literal loop over images and patches (to
    1e-6), and image 0's losses do not depend on image 1's keys."""
    torch.manual_seed(0)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)          # noqa: E731
    q, k = unit(torch.randn(15, 8)), unit(torch.randn(15, 8))
    fast = dcl.patch_nce_loss(q, k, 3, 0.07)
    assert torch.allclose(fast, slow_patch_nce(q, k, 3, 0.07), atol=1e-6, rtol=1e-6)
    k2 = k.clone()
    k2[5:10] = unit(torch.randn(5, 8))
    changed = dcl.patch_nce_loss(q, k2, 3, 0.07)
    assert torch.equal(changed[:5], fast[:5]) and not torch.equal(changed[5:10], fast[5:10])


def test_keys_get_no_gradient():
    """§4: the keys are detached (F2); the gradient enters through the queries only."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_()
    dcl.patch_nce_loss(q, k, 2).sum().backward()
    assert k.grad is None or not k.grad.any()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_nce_between_known_answer_with_a_constant_head():
    """§4: if H maps every patch to one unit vector u, each row has l_pos = 1,
    S−1 negatives at 1 and the −10 diagonal: ℓ = log(S + e^(−11/τ)) ≈ log S.
    At 32 px with S = 100 the taps 12 and 16 have only 8·8 = 64 positions, so
    NCE = λ·(3·log 100 + 2·log 64)/5 (mean over patches, then layers, λ inside)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(num_patches=100, lambda_NCE=2.0)
    G = dcl.init_weights(dcl.Generator(8))
    H = dcl.ProjectionHead(G.tap_channels(cfg.layer_ids), 16)
    for l in range(5):
        torch.nn.init.zeros_(getattr(H, f"mlp_{l}")[2].weight)
        torch.nn.init.ones_(getattr(H, f"mlp_{l}")[2].bias)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    loss = dcl.nce_between(x, y, G, H, cfg).loss.item()
    assert loss == pytest.approx(2.0 * (3 * math.log(100) + 2 * math.log(64)) / 5, rel=1e-5)


def test_nce_between_flip_back():
    """§4: flip_back flips the query maps back along the width. G's stride-1
    layers are flip-equivariant when every conv kernel is left-right symmetric,
    so for the taps 0 and 4 (before any stride-2 blur, which shifts by half a
    pixel) NCE(src, flip(out), flip_back) = NCE(src, out) under equal patch ids."""
    torch.manual_seed(0)
    cfg = tiny_cfg(nce_layers="0,4")
    G = dcl.Generator(8)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.1)
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    H = dcl.init_weights(dcl.ProjectionHead(G.tap_channels(cfg.layer_ids), 16))
    src, out = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(G.encode(out, (0, 4)), G.encode(out.flip(3), (0, 4))):
        assert torch.allclose(a, b.flip(3), atol=1e-5)      # the property relied on
    losses = []
    for output, flip_back in ((out.flip(3), True), (out, False), (out.flip(3), False)):
        torch.manual_seed(1)
        losses.append(dcl.nce_between(src, output, G, H, cfg, flip_back=flip_back).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[2] != pytest.approx(losses[1], rel=1e-2)   # without flip_back it differs


def test_whole_batch_negatives():
    """§4: groups = 1 views an (n·S)xE batch as one pool (DCLGAN's loss,
    F11): it equals the slow loop run as one image of n·S = 15 patches,
    i.e. every query's negatives are all 15 keys but its own (−10 there). Each
    row then has 10 more positive terms in its denominator than with
    same-image negatives, so its loss is strictly larger. Through nce_between,
    DCLGAN's switch changes nothing at batch 1 (torch.equal, same patch ids)
    and changes the loss at batch 2."""
    torch.manual_seed(0)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)          # noqa: E731
    q, k = unit(torch.randn(15, 8)), unit(torch.randn(15, 8))
    pooled = dcl.patch_nce_loss(q, k, 1, 0.07)
    assert pooled.shape == (15,)
    assert torch.allclose(pooled, slow_patch_nce(q, k, 1, 0.07), atol=1e-6, rtol=1e-6)
    assert (pooled > dcl.patch_nce_loss(q, k, 3, 0.07)).all()
    whole = tiny_cfg(mode="dcl")
    same = tiny_cfg(mode="dcl", nce_includes_all_negatives_from_minibatch=False)
    assert whole.nce_includes_all_negatives_from_minibatch
    G = dcl.init_weights(dcl.Generator(8))
    H = dcl.init_weights(dcl.ProjectionHead(G.tap_channels(whole.layer_ids), 16))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    losses = {}
    for n in (1, 2):
        for name, cfg in (("whole", whole), ("same", same)):
            torch.manual_seed(1)
            with torch.no_grad():
                losses[name, n] = dcl.nce_between(x[:n], y[:n], G, H, cfg).loss
    assert torch.equal(losses["whole", 1], losses["same", 1])
    assert losses["whole", 2] > losses["same", 2]


def literal_similarity(keys_a, queries_a, keys_b, queries_b, heads):
    """The official batch-1 SimDCL construction (the official DCLGAN code, F14): each
    set's L layers are copied by slice assignment into a 1xLxSxE tensor, one
    mapping head per set, mean|v_ra − v_fa| + mean|v_fb − v_rb|."""
    def stack(feats):
        out = torch.zeros(1, len(feats), *feats[0].shape)
        for l, f in enumerate(feats):
            out[0, l] = f
        return out
    v_ra, v_fa = heads["M_ra"](stack(keys_a)), heads["M_fa"](stack(queries_a))
    v_fb, v_rb = heads["M_fb"](stack(queries_b)), heads["M_rb"](stack(keys_b))
    return (v_ra - v_fa).abs().mean() + (v_fb - v_rb).abs().mean()


def test_similarity_loss_equals_the_official_batch_1_construction():
    """§6: similarity_loss at batch 1 equals the literal official construction
    (L = 4, S = E = 16); at batch 4 it equals the mean of the four per-image
    values (the L1 mean over n×64 is the mean of per-image means); and its
    gradient reaches all four mapping heads and every feature set, the keys
    included (nothing detached, F14)."""
    torch.manual_seed(0)
    L, S, E, n = 4, 16, 16, 4
    heads = {name: dcl.MappingHead(L) for name in ("M_ra", "M_fb", "M_rb", "M_fa")}
    unit = lambda t: t / t.norm(dim=1, keepdim=True)          # noqa: E731
    sets = [[unit(torch.randn(n * S, E)).requires_grad_() for _ in range(L)] for _ in range(4)]
    per_image = []
    for b in range(n):
        one = [[f[b * S:(b + 1) * S] for f in feats] for feats in sets]
        per_image.append(literal_similarity(*one, heads))
        assert dcl.similarity_loss(*one, heads, 1).item() == pytest.approx(
            per_image[-1].item(), abs=1e-7
        )
    assert len({round(v.item(), 6) for v in per_image}) == n       # four different images
    loss = dcl.similarity_loss(*sets, heads, n)
    assert loss.item() == pytest.approx(torch.stack(per_image).mean().item(), rel=1e-6)
    loss.backward()
    for feats in sets:                                        # keys_a, queries_a, keys_b, queries_b
        assert all(f.grad is not None and f.grad.any() for f in feats)
    for name, head in heads.items():
        assert all(p.grad is not None and p.grad.any() for p in head.parameters()), name

# -----------------------------------------------------------------------------
# the training step (§3, §5, §6, §9)
# -----------------------------------------------------------------------------

def test_cut_step_gradient_routing():
    """§5: L_D reaches D only (fake_b detached); L_G reaches G (first and last
    conv) and every MLP of H, and leaves D's gradients as the D step left them;
    after the step every parameter tensor of G, D and H has changed."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    nets, seen = dcl.build_networks(cfg, "cpu"), {}
    opts = dcl.build_optimizers(nets, cfg)
    def grads(net):
        return [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    def spy(name, record):
        step = opts[name].step
        opts[name].step = lambda *a, **k: (record(), step(*a, **k))[1]
    spy("D", lambda: seen.update(D_at_D=grads(nets["D"]), G_at_D=grads(nets["G"]),
                                 H_at_D=grads(nets["H"])))
    spy("G", lambda: seen.update(D_at_G=grads(nets["D"]), G=dict(nets["G"].named_parameters()),
                                 H=dict(nets["H"].named_parameters())))
    before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
    dcl.cut_step(
        nets, opts, torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, cfg
    )
    assert all(g is None for g in seen["G_at_D"] + seen["H_at_D"])
    assert all(g is not None and g.any() for g in seen["D_at_D"])
    assert all(torch.equal(a, b) for a, b in zip(seen["D_at_D"], seen["D_at_G"]))
    for name in ("model.1.weight", "model.30.weight"):
        assert seen["G"][name].grad is not None and seen["G"][name].grad.any()
    for l in range(5):
        for name in (f"mlp_{l}.0.weight", f"mlp_{l}.2.weight"):
            assert seen["H"][name].grad is not None and seen["H"][name].grad.any(), name
    for k, net in nets.items():
        for (name, p), old in zip(net.named_parameters(), before[k]):
            assert not torch.equal(p, old), f"{k}.{name} did not change"


@pytest.mark.parametrize("mode", ONE_SIDED)
def test_cut_step_losses(mode):
    """§5, §7: the CUT-lineage steps return the official loss names (NCE_Y only with the identity
    pass), finite and detached, and G = G_GAN + 0.5·(NCE + NCE_Y) for CUT (the
    code averages the two NCE terms) or G_GAN + NCE for FastCUT."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode)
    nets = dcl.build_networks(cfg, "cpu")
    losses = dcl.MODES[mode].step(nets, dcl.build_optimizers(nets, cfg), torch.rand(1, 3, 32, 32),
                          torch.rand(1, 3, 32, 32), cfg)
    assert set(losses) == LOSS_NAMES[mode]
    assert all(torch.isfinite(v) and not v.requires_grad for v in losses.values())
    nce = 0.5 * (losses["NCE"] + losses["NCE_Y"]) if "NCE_Y" in losses else losses["NCE"]
    assert losses["G"].item() == pytest.approx((losses["G_GAN"] + nce).item(), rel=1e-6)


def gradients(nets):
    """{net name: [a copy of each parameter's .grad, or None]}."""
    return {name: [None if p.grad is None else p.grad.clone() for p in net.parameters()]
            for name, net in nets.items()}


@pytest.mark.parametrize("mode", ["dcl", "simdcl"])
def test_dual_step_gradient_routing(mode):
    """§6: dual_step's D step (fakes detached) gives G_ab, G_ba, H_a, H_b (and
    SimDCL's M heads) no gradient and D_a and D_b gradients, non-zero except
    for the last conv's bias b: with hinge, ∂L_D/∂b = 0.5·(−1 + 1) = 0 exactly
    while every score lies in (−1, 1), as at init. The G step leaves the D
    gradients as the D step left them (D frozen); at the G step every
    parameter of the generators and heads has a non-zero gradient; after the
    step every trained parameter has changed (but that bias)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode)
    nets, seen = dcl.build_networks(cfg, "cpu"), {}
    opts = dcl.build_optimizers(nets, cfg)
    spy_on_step(opts, "D", lambda: seen.update(at_D=gradients(nets)))
    spy_on_step(opts, "G", lambda: seen.update(at_G=gradients(nets)))
    before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
    dcl.dual_step(
        nets, opts, torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, cfg
    )
    others = [k for k in nets if k[0] != "D"]
    heads = ["M_ra", "M_fb", "M_rb", "M_fa"] if mode == "simdcl" else []
    assert others == ["G_ab", "G_ba", "H_a", "H_b"] + heads
    for name in ("D_a", "D_b"):
        *rest, last_bias = seen["at_D"][name]
        assert all(g is not None and g.any() for g in rest) and not last_bias.any(), name
        assert all(torch.equal(a, b) for a, b in zip(seen["at_D"][name], seen["at_G"][name])), name
    for name in others:
        assert all(g is None for g in seen["at_D"][name]), name
        assert all(g is not None and g.any() for g in seen["at_G"][name]), name
    for k, net in nets.items():
        for (name, p), old in zip(net.named_parameters(), before[k]):
            assert torch.equal(p, old) == (k[0] == "D" and name == "model.14.bias"), f"{k}.{name}"


def test_dual_nce_pairing_rule():
    """§6: NCE1 = nce_between(real_a, fake_b, G_ab, H_a, G_query=G_ba, H_query=H_b): keys
    H_a(G_ab.encode(real_a)), detached; queries H_b(G_ba.encode(fake_b)). So
    NCE1 alone (fake_b a fixed image) gives H_a and G_ab no gradient and every
    parameter of H_b a non-zero one, and reaches G_ba's encoder: H_a learns
    only from NCE2's queries (the pairing rule of the official DCLGAN code)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode="dcl")
    nets = dcl.build_networks(cfg, "cpu")
    real_a, fake_b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    dcl.nce_between(real_a, fake_b, nets["G_ab"], nets["H_a"], cfg, G_query=nets["G_ba"],
                    H_query=nets["H_b"]).loss.backward()
    grads = gradients(nets)
    assert all(g is None or not g.any() for name in ("G_ab", "H_a") for g in grads[name])
    assert all(g is not None and g.any() for g in grads["H_b"])
    assert nets["G_ba"].model[1].weight.grad.any()           # the first conv of the query encoder


@pytest.mark.parametrize("mode", TWO_SIDED)
def test_two_generator_step_losses(mode):
    """§6, §9: dual_step and cyclegan_step return the official loss names, finite,
    detached scalars, and G is the documented combination of the returned terms:
    DCLGAN/SimDCL G = 0.5·(G_A + G_B) + 0.5·(NCE1 + NCE2) + 0.5·(idt_A + idt_B)
    (+ Sim); CycleGAN G = G_A + G_B + cycle_A + cycle_B + idt_A + idt_B.
    Terms recomputed here from the nets before the step: every D_* term (the
    first pool call returns the fake itself), idt_A = λ_IDT·(λ_B)·mean|G_ab(real_b) − real_b|
    (1· for DCLGAN/SimDCL, 0.5·10 for CycleGAN), idt_B likewise, and for
    CycleGAN, whose G step comes first, G_A = mean((D_b(G_ab(real_a)) − 1)²),
    G_B and cycle_A = 10·mean|G_ba(G_ab(real_a)) − real_a|, cycle_B."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode)
    nets = dcl.build_networks(cfg, "cpu")
    real_a, real_b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    G_ab, G_ba, D_a, D_b = (nets[k] for k in ("G_ab", "G_ba", "D_a", "D_b"))
    l1 = lambda x, y: (x - y).abs().mean()                    # noqa: E731
    idt = 5.0 if mode == "cyclegan" else 1.0
    with torch.no_grad():
        fake_b, fake_a = G_ab(real_a), G_ba(real_b)
        expected = dict(idt_A=idt * l1(G_ab(real_b), real_b), idt_B=idt * l1(G_ba(real_a), real_a))
        if mode == "cyclegan":
            expected.update(
                D_A=0.5 * ((D_b(real_b) - 1) ** 2 + D_b(fake_b) ** 2).mean(),
                D_B=0.5 * ((D_a(real_a) - 1) ** 2 + D_a(fake_a) ** 2).mean(),
                G_A=((D_b(fake_b) - 1) ** 2).mean(),
                G_B=((D_a(fake_a) - 1) ** 2).mean(),
                cycle_A=10 * l1(G_ba(fake_b), real_a),
                cycle_B=10 * l1(G_ab(fake_a), real_b),
            )
        else:
            expected.update(
                D_A=0.5 * ((1 - D_b(real_b)).relu().mean() + (1 + D_b(fake_b)).relu().mean()),
                D_B=0.5 * ((1 - D_a(real_a)).relu().mean() + (1 + D_a(fake_a)).relu().mean()),
            )
    losses = dcl.MODES[mode].step(nets, dcl.build_optimizers(nets, cfg), real_a, real_b, cfg)
    assert set(losses) == LOSS_NAMES[mode]
    assert all(v.shape == () and torch.isfinite(v) and not v.requires_grad for v in losses.values())
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5), name
    if mode == "cyclegan":
        combination = sum(losses[k] for k in ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B"))
    else:
        combination = (
            0.5 * (losses["G_A"] + losses["G_B"])
            + 0.5 * (losses["NCE1"] + losses["NCE2"])
            + 0.5 * (losses["idt_A"] + losses["idt_B"])
            + losses.get("Sim", 0.0)
        )
    assert losses["G"].item() == pytest.approx(float(combination), rel=1e-6)
    assert mode != "simdcl" or losses["Sim"] > 0


class ScaleByW(torch.nn.Module):
    """x·w with one trainable scalar w = 1: an identity generator that backward
    and Adam can still work on. Like Generator, it returns (y, taps) when asked
    for taps; it has no layers to tap."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, taps=None):
        return x * self.w if taps is None else (x * self.w, [])


def test_cyclegan_identity_generators_give_zero_cycle_and_identity():
    """§9: with G_ab = G_ba = identity (x·1), rec_a = real_a, rec_b = real_b,
    idt_b = real_b, idt_a = real_a, so cycle_A, cycle_B, idt_A and idt_B are
    exactly 0 and G = G_A + G_B; the adversarial term still moves w."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode="cyclegan")
    nets = dcl.build_networks(cfg, "cpu")
    nets.update(G_ab=ScaleByW(), G_ba=ScaleByW())
    losses = dcl.cyclegan_step(
        nets,
        dcl.build_optimizers(nets, cfg),
        torch.rand(1, 3, 32, 32) * 2 - 1,
        torch.rand(1, 3, 32, 32) * 2 - 1,
        cfg,
    )
    assert [losses[k].item() for k in ("cycle_A", "cycle_B", "idt_A", "idt_B")] == [0.0] * 4
    assert losses["G"].item() == pytest.approx((losses["G_A"] + losses["G_B"]).item(), rel=1e-6)
    assert nets["G_ab"].w.item() != 1.0 and nets["G_ba"].w.item() != 1.0


def test_cyclegan_step_gradient_routing():
    """§9: cyclegan_step's G step runs with D_a and D_b frozen (its docstring;
    upstream CycleGAN: requires_grad False), so D has no gradient when Adam
    steps G, also on a run's first step, while every generator parameter has
    a non-zero one; the D step (pooled fakes, detached) leaves the generators'
    gradients as the G step left them and gives every D parameter a non-zero
    gradient (lsgan: no cancelling bias term)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode="cyclegan")
    nets, seen = dcl.build_networks(cfg, "cpu"), {}
    opts = dcl.build_optimizers(nets, cfg)
    spy_on_step(opts, "G", lambda: seen.update(at_G=gradients(nets)))
    spy_on_step(opts, "D", lambda: seen.update(at_D=gradients(nets)))
    dcl.cyclegan_step(
        nets, opts, torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, cfg
    )
    for name in ("G_ab", "G_ba"):
        assert all(g is not None and g.any() for g in seen["at_G"][name]), name
        assert all(torch.equal(a, b) for a, b in zip(seen["at_G"][name], seen["at_D"][name])), name
    assert all(g is not None and g.any() for name in ("D_a", "D_b") for g in seen["at_D"][name])
    assert all(g is None for name in ("D_a", "D_b") for g in seen["at_G"][name])

# -----------------------------------------------------------------------------
# config and schedule (§11, §12, §14, §15)
# -----------------------------------------------------------------------------

def test_mode_presets_and_precedence():
    """§11, §12: presets set λ_NCE, nce_idt, flip and epochs; flags beat presets; the
    demo settings apply only without --dataroot; other defaults are official.
    §14: one Adam(2e-4, (0.5, 0.999)) each for G, D and H."""
    cut, _ = dcl.resolve_config({"mode": "cut", "dataroot": "x"})
    fast, _ = dcl.resolve_config({"mode": "fastcut", "dataroot": "x"})
    assert (cut.lambda_NCE, cut.nce_idt, cut.flip_equivariance, cut.n_epochs, cut.n_epochs_decay) \
        == (1.0, True, False, 200, 200)
    assert (fast.lambda_NCE, fast.nce_idt, fast.flip_equivariance, fast.n_epochs,
            fast.n_epochs_decay) == (10.0, False, True, 150, 50)
    assert (cut.nce_T, cut.num_patches, cut.netF_nc, cut.layer_ids, cut.lr, cut.beta1, cut.beta2,
            cut.gan_mode, cut.load_size, cut.crop_size, cut.ngf) == \
        (0.07, 256, 256, (0, 4, 8, 12, 16), 2e-4, 0.5, 0.999, "lsgan", 286, 256, 64)
    flagged, source = dcl.resolve_config({"mode": "fastcut", "lambda_NCE": 3.0, "dataroot": "x"})
    assert flagged.lambda_NCE == 3.0 and source["lambda_NCE"] == "flag"
    demo, _ = dcl.resolve_config({"mode": "cut", "ngf": 8})
    assert (demo.load_size, demo.crop_size, demo.ngf) == (72, 64, 8)
    assert Path(demo.dataroot) == dcl.BUNDLED_DATA
    opts = dcl.build_optimizers(dcl.build_networks(tiny_cfg(), "cpu"), tiny_cfg())
    assert set(opts) == {"G", "D", "H"}
    for opt in opts.values():
        assert isinstance(opt, torch.optim.Adam)
        assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == \
            (2e-4, (0.5, 0.999), 0)


def test_two_generator_presets_and_networks():
    """§11 (the official DCLGAN and upstream CycleGAN defaults; F11, F12, F14):
    DCLGAN taps 4,8,12,16 with hinge, λ_NCE 2, λ_IDT 1, whole-batch negatives, no
    pool, heads at lr 1e-3 and beta1 0.9, 200 + 200 epochs. SimDCL: the same but λ_NCE 1 (the
    effective weight: the official λ_NCE 2 is never applied), λ_SIM 10, heads
    at --lr and --beta1. CycleGAN: lsgan, λ_IDT 0.5, λ_A = λ_B = 10, a pool of
    50, normal init, both antialias flags off, 100 + 100 epochs with crops in
    the decay epochs. None of them runs CUT's identity NCE. MODES lists each
    mode's nets, and build_networks builds them: CycleGAN's G has the 28
    upstream entries, N(0, 0.02²) weights (a 32x32x3x3 resblock conv at ngf 8:
    9,216 draws, std within 5% of 0.02) and pools of 50 crop-size images."""
    d, s, c = (dcl.resolve_config({"mode": m, "dataroot": "x"})[0] for m in TWO_SIDED)
    common = lambda cfg: (  # noqa: E731
        cfg.layer_ids, cfg.gan_mode, cfg.nce_includes_all_negatives_from_minibatch, cfg.nce_idt,
        cfg.lambda_IDT, cfg.pool_size, cfg.init_type, cfg.no_antialias, cfg.no_antialias_up,
        cfg.n_epochs, cfg.n_epochs_decay)
    assert common(d) == common(s) == ((4, 8, 12, 16), "hinge", True, False, 1.0, 0, "xavier",
                                      False, False, 200, 200)
    assert (d.lambda_NCE, d.lambda_SIM, d.lr_H, d.beta1_H) == (2.0, 0.0, 1e-3, 0.9)
    assert (s.lambda_NCE, s.lambda_SIM, s.lr_H, s.beta1_H) == (1.0, 10.0, 0.0, -1.0)
    assert (
        c.gan_mode,
        c.lambda_IDT,
        c.lambda_A,
        c.lambda_B,
        c.pool_size,
        c.init_type,
        c.no_antialias,
        c.no_antialias_up,
        c.n_epochs,
        c.n_epochs_decay,
        c.crop_in_decay,
        c.nce_idt,
        c.lambda_SIM,
    ) == ("lsgan", 0.5, 10.0, 10.0, 50, "normal", True, True, 100, 100, True, False, 0.0)
    assert not d.crop_in_decay and not s.crop_in_decay
    assert {m: dcl.MODES[m].networks for m in ONE_SIDED + TWO_SIDED} == {
        "cut": ("G", "D", "H"), "fastcut": ("G", "D", "H"),
        "negcut": ("G", "D", "H", "N", "H_ema"), "fastnegcut": ("G", "D", "H", "N", "H_ema"),
        "dcl": ("G_ab", "G_ba", "D_a", "D_b", "H_a", "H_b"),
        "simdcl": ("G_ab", "G_ba", "D_a", "D_b", "H_a", "H_b", "M_ra", "M_fb", "M_rb", "M_fa"),
        "cyclegan": ("G_ab", "G_ba", "D_a", "D_b", "pool_a", "pool_b")}
    torch.manual_seed(0)
    nets = dcl.build_networks(tiny_cfg(mode="cyclegan"), "cpu")
    assert (len(nets["G_ab"].model), len(nets["D_a"].model)) == (28, 12)
    assert nets["G_ab"].model[12].conv_block[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert nets["pool_a"].images.shape == (50, 3, 32, 32) and nets["pool_b"].count == 0
    nets = dcl.build_networks(tiny_cfg(mode="simdcl"), "cpu")
    assert (len(nets["G_ab"].model), len(nets["D_a"].model), nets["H_a"].n_layers) == (32, 15, 4)
    assert all(isinstance(nets[k], dcl.MappingHead) for k in ("M_ra", "M_fb", "M_rb", "M_fa"))


@pytest.mark.parametrize("mode", TWO_SIDED)
def test_two_generator_optimizers(mode):
    """§14 (the official optimisers): one Adam per family, no weight decay: G over G_ab ∪
    G_ba and D over D_a ∪ D_b, both (2e-4, (0.5, 0.999)); H over H_a ∪ H_b at
    Adam's defaults (1e-3, (0.9, 0.999)) for DCLGAN (F12), over H_a ∪ H_b and
    the four mapping heads at (2e-4, (0.5, 0.999)) for SimDCL; CycleGAN has
    no H. Every parameter of every net is in exactly one optimiser, that of
    its family; the pools have no parameters, and their buffers are in none."""
    cfg = tiny_cfg(mode=mode)
    nets = dcl.build_networks(cfg, "cpu")
    opts = dcl.build_optimizers(nets, cfg)
    expected = {"G": (2e-4, (0.5, 0.999)), "D": (2e-4, (0.5, 0.999))}
    if mode != "cyclegan":
        expected["H"] = (1e-3, (0.9, 0.999)) if mode == "dcl" else (2e-4, (0.5, 0.999))
    assert {k: (o.defaults["lr"], o.defaults["betas"]) for k, o in opts.items()} == expected
    for opt in opts.values():
        assert isinstance(opt, torch.optim.Adam) and len(opt.param_groups) == 1
        assert opt.defaults["weight_decay"] == 0
        assert opt.param_groups[0]["initial_lr"] == opt.param_groups[0]["lr"] == opt.defaults["lr"]
    family = {"G_ab": "G", "G_ba": "G", "D_a": "D", "D_b": "D", "H_a": "H", "H_b": "H",
              "M_ra": "H", "M_fb": "H", "M_rb": "H", "M_fa": "H", "pool_a": None, "pool_b": None}
    owners = {}
    for name, opt in opts.items():
        for p in opt.param_groups[0]["params"]:
            owners.setdefault(id(p), []).append(name)
    for name, net in nets.items():
        assert all(owners.get(id(p)) == [family[name]] for p in net.parameters()), name
    assert sum(len(o.param_groups[0]["params"]) for o in opts.values()) == \
        sum(len(list(net.parameters())) for net in nets.values())
    for name in ("pool_a", "pool_b")[:2 if mode == "cyclegan" else 0]:
        assert not list(nets[name].parameters()) and id(nets[name].images) not in owners


def test_lr_multiplier_known_answers():
    """§15: 1 − max(0, e − 200)/201 for 200 + 200 epochs: 1 for epochs 1..200,
    1 − 1/201 at 201, and 1/201 (never 0) at 400."""
    cfg = dcl.resolve_config({"dataroot": "x", "n_epochs": 200, "n_epochs_decay": 200})[0]
    assert dcl.lr_multiplier(1, cfg) == 1.0 and dcl.lr_multiplier(200, cfg) == 1.0
    assert dcl.lr_multiplier(201, cfg) == pytest.approx(1 - 1 / 201)
    assert dcl.lr_multiplier(400, cfg) == pytest.approx(1 / 201)


def expected_resize(path, size):
    """A plain PIL bicubic resize to size², mapped to [−1, 1] (the official transform)."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def test_no_crop_in_decay_epochs(data):
    """§13: the sampler switches cropping off after n_epochs (F6) unless
    --crop_in_decay; a no-crop item is a plain bicubic resize to crop_size."""
    cfg = tiny_cfg(dataroot=str(data), n_epochs=2, n_epochs_decay=2, no_flip=True)
    assert [dcl.EpochSampler(4, cfg, e).no_crop for e in (1, 2, 3, 4)] == [False, False, True, True]
    keep = tiny_cfg(dataroot=str(data), n_epochs=2, n_epochs_decay=2, crop_in_decay=True)
    assert not any(dcl.EpochSampler(4, keep, e).no_crop for e in (1, 2, 3, 4))
    key = next(iter(dcl.EpochSampler(4, cfg, 3)))
    assert key[2] is True
    real_a, real_b, skipped = dcl.UnpairedDataset(cfg)[key]
    assert skipped == ""
    assert torch.allclose(real_a, expected_resize(sorted((data / "trainA").iterdir())[key[1]], 32),
                          atol=1e-6)
    assert any(torch.allclose(real_b, expected_resize(p, 32), atol=1e-6)
               for p in (data / "trainB").iterdir())


def test_item_seeds_distinct_across_epochs():
    """§13: every (seed, epoch, position) gets its own item seed, so no item of
    epoch 2 repeats the B draw, crop and flip of an item of epoch 1 (a linear
    seed formula once made position p + 7919 of one epoch equal position p of
    the next)."""
    cfg = dcl.resolve_config({"dataroot": "x"})[0]
    seeds = [{key[0] for key in dcl.EpochSampler(8000, cfg, epoch)} for epoch in (1, 2)]
    assert len(seeds[0]) == len(seeds[1]) == 8000 and not seeds[0] & seeds[1]

# -----------------------------------------------------------------------------
# data (§13)
# -----------------------------------------------------------------------------

def test_find_images(tmp_path):
    """§13: find_images walks subfolders, matches extensions in any case, skips other files."""
    names = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.BMP", "e.tif", "f.webp", "g.Png"]
    for name in names + ["notes.txt", "sub/readme.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert dcl.find_images(tmp_path) == sorted(tmp_path / n for n in names)


def test_dataset_modes_lengths_and_reproducibility(data):
    """§13: L, RGBA and P images load as 3-channel tensors in [−1, 1]; the length
    is max(|A|, |B|) = 4; an item is a function of its key; with
    --serial_batches item i pairs B[i mod |B|] (i = 3 -> B[0])."""
    cfg = tiny_cfg(dataroot=str(data))
    dataset = dcl.UnpairedDataset(cfg)
    assert len(dataset) == 4
    for index in range(4):                                    # RGB, L, RGBA, P
        a, b, _ = dataset[(index + 7, index, False)]
        assert a.shape == b.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1
    gray, _, _ = dataset[(1, 1, True)]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    first, again = dataset[(123, 2, False)], dataset[(123, 2, False)]
    assert all(torch.equal(x, y) for x, y in zip(first[:2], again[:2]))
    serial = dcl.UnpairedDataset(tiny_cfg(dataroot=str(data), serial_batches=True, no_flip=True))
    _, b, _ = serial[(5, 3, True)]
    assert torch.allclose(b, expected_resize(data / "trainB" / "0.png", 32), atol=1e-6)

# -----------------------------------------------------------------------------
# command line: train and translate (§15-§17)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_train_then_translate(mode, runs, data, tmp_path, capsys):
    """§15-§17: `train --max_steps 2` writes a checkpoint, two log rows with the
    mode's losses, samples and config.json; `translate` writes one PNG per
    input, at the input's size and relative path (subfolders kept). Training
    runs as a separate process; translate in this one, through dcl.main (the
    same code path as the command line, without another 4 s of imports)."""
    proc, run_dir = runs(mode)
    assert proc.returncode == 0, proc.stderr
    rows = read_log(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(LOSS_NAMES[mode] <= set(r) and ("NCE_Y" in r) == (mode in ("cut", "negcut"))
               for r in rows)
    assert json.loads((run_dir / "config.json").read_text())["mode"] == mode
    assert (run_dir / "ckpt_latest.pt").is_file()
    assert Image.open(run_dir / "samples" / "latest.png").size[0] > 32
    out = tmp_path / "out"
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", run_dir / "ckpt_latest.pt",
                                   "--input", data / "testA", "--output", out, "--device", "cpu")
    assert code == 0, err
    inputs = sorted(
        p.relative_to(data / "testA") for p in (data / "testA").rglob("*") if p.is_file()
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == \
        sorted(p.with_suffix(".png") for p in inputs) and len(inputs) == 3
    for rel in inputs:
        assert (
            Image.open(out / rel.with_suffix(".png")).size == Image.open(data / "testA" / rel).size
        )


def test_resume_gives_identical_losses_and_weights(data, tmp_path):
    """§16: 4 steps in one run equal 2 steps, then --continue_train to 4
    (FastCUT: patch ids, the flip coin and mid-epoch data all resume)."""
    flags = ["train", "--mode", "fastcut", "--dataroot", data, *TINY, "--deterministic",
             "--seed", 1, "--checkpoints_dir", tmp_path]
    assert cli(*flags, "--name", "A", "--max_steps", 4).returncode == 0
    assert cli(*flags, "--name", "B", "--max_steps", 2).returncode == 0
    proc = cli(*flags, "--name", "B", "--max_steps", 4, "--continue_train")
    assert proc.returncode == 0, proc.stderr
    a, b = read_log(tmp_path / "A"), read_log(tmp_path / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a[2:], b[2:]):
        assert {k: row_a[k] for k in LOSS_NAMES["fastcut"]} == {
            k: row_b[k] for k in LOSS_NAMES["fastcut"]
        }
    nets_a, nets_b = (torch.load(tmp_path / n / "ckpt_latest.pt", weights_only=True)["nets"]
                      for n in "AB")
    for net in ("G", "D", "H"):
        assert all(torch.equal(nets_a[net][k], nets_b[net][k]) for k in nets_a[net])


def test_resume_at_max_steps_trains_nothing(runs, tmp_path):
    """§15: --max_steps counts steps in all, so continuing a run that already
    reached it (step 2, max_steps 2) trains no further step, and the closing
    advice names --max_steps, the flag that would train longer."""
    _, run_dir = runs("cut")
    shutil.copytree(run_dir, tmp_path / "cut")
    proc = cli("train", "--name", "cut", "--checkpoints_dir", tmp_path, "--continue_train",
               "--device", "cpu", "--num_threads", 0)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(tmp_path / "cut" / "ckpt_latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(read_log(tmp_path / "cut")) == 2
    assert "--max_steps" in proc.stdout.splitlines()[-1]


def translate_in_process(capsys, checkpoint, source, output, *extra):
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", checkpoint, "--input",
                                   source, "--output", output, "--device", "cpu", *extra)
    assert code == 0, err


@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_checkpoint_round_trip(mode, runs, data, tmp_path, capsys):
    """§16-§17: the checkpoint loads with weights_only=True; translate's output
    for a 37x29 image equals G(x) computed here (G_ab in two-generator modes,
    built from the stored config, so CycleGAN's is the non-antialiased G):
    reflect-pad to 40x32, G, crop back, (y + 1)/2·255 truncated to uint8."""
    _, run_dir = runs(mode)
    ckpt = torch.load(run_dir / "ckpt_latest.pt", weights_only=True)
    G = dcl.make_generator(dcl.TrainConfig(**ckpt["config"]))
    G.load_state_dict(ckpt["nets"]["G" if "G" in ckpt["nets"] else "G_ab"])
    image = data / "testA" / "sub" / "2.png"
    translate_in_process(capsys, run_dir / "ckpt_latest.pt", image, tmp_path)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "2.png")), translated_by_hand(G, image))


@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_translate_official_state_dict(mode, runs, data, tmp_path, capsys):
    """§17: G's weights (G_ab's in two-generator modes) saved as an official
    latest_net_G.pth (latest_net_G_A.pth) translate to byte-identical PNGs
    given --mode, also with the keys of the DataParallel wrapper that the
    official code saves on the CPU (module.model.1.weight, ...); without --mode,
    exit 2 naming --mode."""
    _, run_dir = runs(mode)
    nets = torch.load(run_dir / "ckpt_latest.pt", weights_only=True)["nets"]
    one_sided = "G" in nets
    official = tmp_path / ("latest_net_G.pth" if one_sided else "latest_net_G_A.pth")
    torch.save(nets["G" if one_sided else "G_ab"], official)
    translate_in_process(capsys, run_dir / "ckpt_latest.pt", data / "testA", tmp_path / "ours")
    translate_in_process(capsys, official, data / "testA", tmp_path / "theirs", "--mode", mode)
    ours = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours").rglob("*.png"))
    assert len(ours) == 3
    wrapped = tmp_path / "1_net_G.pth"
    torch.save({"module." + k: v for k, v in torch.load(official).items()}, wrapped)
    translate_in_process(capsys, wrapped, data / "testA", tmp_path / "wrapped", "--mode", mode)
    for rel in ours:
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "theirs" / rel).read_bytes()
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "wrapped" / rel).read_bytes()
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", official, "--input",
                                   data / "testA", "--output", tmp_path / "x", "--device", "cpu")
    assert code == 2 and "--mode" in err


def test_translate_btoa_uses_g_ba(runs, data, tmp_path, capsys):
    """§17: --direction BtoA on a DCLGAN checkpoint translates with G_ba: on
    testB its PNGs differ from the AtoB ones (G_ab), and the one for 0.png
    equals G_ba(x) computed here from the checkpoint."""
    _, run_dir = runs("dcl")
    checkpoint = run_dir / "ckpt_latest.pt"
    translate_in_process(capsys, checkpoint, data / "testB", tmp_path / "ab")
    translate_in_process(capsys, checkpoint, data / "testB", tmp_path / "ba", "--direction", "BtoA")
    names = sorted(p.name for p in (tmp_path / "ba").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["0.png", "1.png"]
    read = lambda path: np.asarray(Image.open(path))         # noqa: E731
    assert all(
        not np.array_equal(read(tmp_path / "ab" / n), read(tmp_path / "ba" / n)) for n in names
    )
    ckpt = torch.load(checkpoint, weights_only=True)
    G_ba = dcl.make_generator(dcl.TrainConfig(**ckpt["config"]))
    G_ba.load_state_dict(ckpt["nets"]["G_ba"])
    expected = translated_by_hand(G_ba, data / "testB" / "0.png")
    assert np.array_equal(read(tmp_path / "ba" / "0.png"), expected)


def whole_and_resumed(capsys, tmp_path, mode, *flags):
    """Train run A for 4 steps, run B for 2 then --continue_train to 4, in
    process; assert identical log rows 3-4; return both final checkpoints."""
    flags = ["--mode", mode, *TINY, "--seed", 1, "--checkpoints_dir", tmp_path, *flags]
    for name, extra in (("A", ["--max_steps", 4]), ("B", ["--max_steps", 2]),
                        ("B", ["--max_steps", 4, "--continue_train"])):
        code, _, err = train_in_process(capsys, *flags, "--name", name, *extra)
        assert code == 0, err
    a, b = read_log(tmp_path / "A"), read_log(tmp_path / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a[2:], b[2:]):
        assert {k: row_a[k] for k in LOSS_NAMES[mode]} == {k: row_b[k] for k in LOSS_NAMES[mode]}
    return [torch.load(tmp_path / n / "ckpt_latest.pt", weights_only=True) for n in "AB"]


def test_resume_cyclegan_restores_the_image_pools(data, tmp_path, capsys):
    """§16: CycleGAN, 4 steps in one run equal 2 steps, then --continue_train
    to 4: identical log rows 3-4 and identical nets, the pools' images and
    counts included. --pool_size 1 makes the pools full after step 1, so from
    step 2 on D sees a random mix of the restored pool and new fakes (torch
    RNG). In-process (no --deterministic: it would switch torch's global
    deterministic mode on for the rest of the session; the CPU kernels used
    here are deterministic anyway)."""
    ckpt_a, ckpt_b = whole_and_resumed(capsys, tmp_path, "cyclegan", "--dataroot", data,
                                       "--pool_size", 1)
    nets_a, nets_b = ckpt_a["nets"], ckpt_b["nets"]
    assert [nets[p]["_extra_state"] for nets in (nets_a, nets_b) for p in ("pool_a", "pool_b")] == [
        1
    ] * 4
    for net in dcl.MODES["cyclegan"].networks:
        assert nets_a[net].keys() == nets_b[net].keys()
        assert all(
            torch.equal(nets_a[net][k], nets_b[net][k]) for k in nets_a[net] if k != "_extra_state"
        )


def test_translate_never_overwrites_its_own_output(runs, data, tmp_path, capsys):
    """§17: translate writes one PNG per input (F8): x.jpg and x.png in one
    folder become x.jpg.png and x.png.png instead of overwriting one x.png."""
    _, run_dir = runs("cut")
    shutil.copy(data / "testA" / "0.jpg", tmp_path / "x.jpg")
    shutil.copy(data / "trainB" / "0.png", tmp_path / "x.png")
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", run_dir / "ckpt_latest.pt",
                                   "--input", tmp_path, "--output", tmp_path / "out", "--device",
                                   "cpu")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.jpg.png", "x.png.png"]

# -----------------------------------------------------------------------------
# command line: errors, --help, size (§12, §21)
# -----------------------------------------------------------------------------

def bad_input(case, tmp_path, data, runs):
    """(argv, a string the error line must contain) for each failure case."""
    train = ["train", *TINY, "--max_steps", 1, "--checkpoints_dir", tmp_path / "ck"]
    ckpt = runs("cut")[1] / "ckpt_latest.pt" if case == "btoa" else tmp_path / "none.pt"
    translate = ["translate", "--checkpoint", ckpt, "--device", "cpu"]
    if case == "missing_dataroot":
        return train + ["--dataroot", tmp_path / "nowhere"], "nowhere"
    if case == "trainA_missing":
        shutil.copytree(data / "trainB", tmp_path / "d" / "trainB")
        return train + ["--dataroot", tmp_path / "d"], "trainA"
    if case == "trainB_empty":
        shutil.copytree(data / "trainA", tmp_path / "d" / "trainA")
        (tmp_path / "d" / "trainB").mkdir()
        (tmp_path / "d" / "trainB" / "notes.txt").write_text("not an image")
        return train + ["--dataroot", tmp_path / "d"], ".png"
    if case == "unknown_mode":
        return train + ["--dataroot", data, "--mode", "bogus"], "--mode"
    if case == "crop_larger_than_load":
        return train + ["--dataroot", data, "--load_size", 32, "--crop_size", 36], "--crop_size"
    if case == "not_a_checkpoint":
        (tmp_path / "none.pt").write_text("hello, I am text")
        return translate + ["--input", data / "testA", "--output", tmp_path / "o"], "none.pt"
    if case == "btoa":
        return translate + ["--input", data / "testA", "--output", tmp_path / "o",
                            "--direction", "BtoA"], "BtoA"
    if case == "output_is_input":
        return translate + ["--input", data / "testA", "--output", data / "testA"], "--output"
    if case == "simdcl_too_few_positions":                  # 32 px: taps 12 and 16 have 8·8 = 64
        return (
            train + ["--dataroot", data, "--mode", "simdcl", "--num_patches", 256],
            "--num_patches",
        )
    if case == "similarity_without_heads":                  # only SimDCL builds the mapping heads
        return train + ["--dataroot", data, "--mode", "dcl", "--lambda_SIM", 10], "--mode simdcl"
    if case == "crop_too_small":                            # D's last norm would see 1x1 maps
        return train + ["--dataroot", data, "--load_size", 20, "--crop_size", 20], "at least 24"
    if case == "bench_no_steps":
        return ["bench", "--mode", "cut", "--steps", 0], "--steps"
    if case == "resume_with_other_world":                  # stopped mid-epoch in 2 processes
        run = shutil.copytree(runs("cut")[1], tmp_path / "ck" / "cut")
        ckpt = torch.load(run / "ckpt_latest.pt", weights_only=True)
        torch.save({**ckpt, "world": 2}, run / "ckpt_latest.pt")
        return train + ["--name", "cut", "--continue_train"], "2 process"
    (tmp_path / "empty").mkdir()
    return translate + ["--input", tmp_path / "empty", "--output", tmp_path / "o"], "empty"


@pytest.mark.parametrize("case", ["missing_dataroot", "trainA_missing", "trainB_empty",
                                  "unknown_mode", "crop_larger_than_load", "not_a_checkpoint",
                                  "btoa", "output_is_input", "simdcl_too_few_positions",
                                  "similarity_without_heads",
                                  "crop_too_small", "bench_no_steps", "resume_with_other_world",
                                  "empty_input"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, data, runs, capsys):
    """§21: every mistake in the command, data or files exits with status 2 and
    one stderr line "error: ..." naming the path or flag, without a traceback.
    Run in-process through dcl.main (the same code path as the command line;
    all of these fail before training starts) to keep the suite fast.
    --lambda_SIM outside SimDCL is refused (DCLGAN builds no mapping heads; before,
    the flag was silently ignored). SimDCL stacks S patches of every tapped layer;
    at 32 px the taps 12 and 16 have 8·8 = 64 positions, so S = 256 is refused
    before any run folder exists.
    A run stopped mid-epoch in 2 processes resumes only in 2: the shards of the
    rest of its epoch depend on the process count."""
    argv, needle = bad_input(case, tmp_path, data, runs)
    code, _, err = main_in_process(capsys, *argv)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    if case == "simdcl_too_few_positions":
        assert "64" in err and not (tmp_path / "ck").exists()
    if case == "trainB_empty":
        assert "trainB" in err


def test_existing_run_is_refused_untouched(runs, data, tmp_path, capsys):
    """§15: train with the name of a run that has ckpt_latest.pt, without
    --continue_train, exits 2 and leaves the checkpoint byte for byte."""
    _, run_dir = runs("cut")
    shutil.copytree(run_dir, tmp_path / "cut")
    before = (tmp_path / "cut" / "ckpt_latest.pt").read_bytes()
    code, _, err = main_in_process(capsys, "train", "--name", "cut", "--checkpoints_dir", tmp_path,
                                   "--dataroot", data, *TINY, "--max_steps", 1)
    assert code == 2 and err.startswith("error:") and "--continue_train" in err
    assert (tmp_path / "cut" / "ckpt_latest.pt").read_bytes() == before


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_domain_stops_training(workers, runs, data, tmp_path):
    """§13, §15: when every trainA file is garbage, each read is skipped for
    another until ten in a row fail; then the run stops with an error as its
    last line, naming the folder and a file, after nothing but warnings,
    exit 2, no traceback, and the run's
    checkpoint, log and samples are left as they were (config.json and env.txt
    record each start, by design). With a worker process the error crosses the
    process boundary as a traceback; only its last line is shown."""
    _, run_dir = runs("cut")
    shutil.copytree(run_dir, tmp_path / "cut")
    shutil.copytree(data, tmp_path / "bad")
    corrupt = sorted((tmp_path / "bad" / "trainA").iterdir())
    for path in corrupt:
        path.write_bytes(b"\x89PNG garbage, not an image")
    kept = {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*")
            if p.is_file() and p.name not in ("config.json", "env.txt")}
    proc = cli("train", "--name", "cut", "--checkpoints_dir", tmp_path, "--continue_train",
               "--dataroot", tmp_path / "bad", "--max_steps", 8, "--device", "cpu",
               "--num_threads", workers)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: 10 unreadable images"), proc.stderr
    assert all(line.startswith("warning: skipping") for line in lines[:-1])
    assert "Traceback" not in proc.stderr and str(tmp_path / "bad" / "trainA") in lines[-1]
    assert any(str(path) in lines[-1] for path in corrupt)
    assert all(p.read_bytes() == content for p, content in kept.items())


def test_corrupt_image_is_skipped(data, tmp_path, capsys):
    """§13: one corrupt file among good ones is skipped with one warning naming
    it, replaced by another image of its domain, and training finishes (exit 0).
    With --serial_batches and 4 A images, 4 steps read every A file once, so the
    bad one is met."""
    shutil.copytree(data, tmp_path / "d")
    (tmp_path / "d" / "trainA" / "1.png").write_bytes(b"truncated")
    code, out, err = train_in_process(capsys, "--dataroot", tmp_path / "d", *TINY, "--max_steps", 4,
                                      "--serial_batches", "--checkpoints_dir", tmp_path / "ck")
    assert code == 0, err
    assert (
        "warning: skipping unreadable image" in err
        and str(tmp_path / "d" / "trainA" / "1.png") in err
    )
    assert err.count("warning: skipping unreadable image") == 1


def test_help_lists_every_config_field(capsys):
    """§21: `train --help` has one flag per TrainConfig field."""
    code, out, _ = main_in_process(capsys, "train", "--help")
    assert code == 0
    flags = set(re.findall(r"(?m)^\s+--(\w+)", out))
    assert {f.name for f in dataclasses.fields(dcl.TrainConfig)} <= flags


def line_kinds(text: str) -> list:
    """Each line of a Python source as "code", "doc" (inside a docstring),
    "comment" (a comment alone) or "blank"; a code line with a trailing comment
    is code."""
    import io
    import tokenize
    lines = text.splitlines()
    kinds = ["blank" if not line.strip() else "code" for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        first, last = tok.start[0] - 1, tok.end[0] - 1
        if tok.type == tokenize.COMMENT and lines[first].strip().startswith("#"):
            kinds[first] = "comment"
        elif (tok.type == tokenize.STRING and tok.string.startswith('"""')
              and not lines[first][:tok.start[1]].strip()):
            for row in range(first, last + 1):
                kinds[row] = "doc" if lines[row].strip() else "blank"
    return kinds


def section_shares(text: str) -> dict:
    """{banner title: explanation share}, a section being the lines from one
    `# N. Title` banner (after a rule line) to the next; the share is
    (docstring + comment lines) / (those + code lines)."""
    lines, kinds = text.splitlines(), line_kinds(text)
    counts, title = {}, "0. module top"
    for i, line in enumerate(lines):
        match = re.match(r"#\s+(\d+\.\s.*)", line)
        if match and i and set(lines[i - 1].strip()) <= set("#-= "):
            title = match.group(1).strip()
        counts.setdefault(title, Counter())[kinds[i]] += 1
    return {t: (c["doc"] + c["comment"]) / (c["doc"] + c["comment"] + c["code"])
            for t, c in counts.items()}


def test_line_budget_and_tutorial_shape():
    """The size rule: dcl.py holds at most 1,650 code lines and 3,000 lines in
    all, no line longer than 100 characters, and no reference to a document the
    repository does not ship; nor has test_dcl.py. It reads as a tutorial:
    sections 1-11 (Part I, the methods) before 12-21 (Part II), each Part I section at least 45%
    explanation, the file at least 35%; the module docstring lists a reading
    path for every method, and every note F1-F24 it defines."""
    text = Path(dcl.__file__).read_text()
    kinds = line_kinds(text)
    assert kinds.count("code") <= 1650 and len(kinds) <= 3000
    assert max(len(line) for line in text.splitlines()) <= 100
    unshipped = r"methods[.]md|\bQ\d{1,2}\b|task[ ]spec"
    assert not re.search(unshipped, text)
    tests = Path(__file__).read_text()                        # this file follows the same rules
    assert max(len(line) for line in tests.splitlines()) <= 100 and not re.search(unshipped, tests)
    shares = section_shares(text)
    numbers = [int(t.split(".")[0]) for t in shares]
    assert numbers == list(range(22))
    part_one = {t: v for t, v in shares.items() if 1 <= int(t.split(".")[0]) <= 11}
    assert all(v >= 0.45 for v in part_one.values()), part_one
    explained = sum(kinds.count(k) for k in ("doc", "comment"))
    assert explained / (explained + kinds.count("code")) >= 0.35
    assert (
        text.index("PART I.") < text.index("# 1. ") < text.index("PART II.") < text.index("# 12. ")
    )
    paths = dcl.__doc__.split("Reading paths")[1].split("Letters")[0]
    assert all(re.search(rf"^  {name}\s", paths, re.M) for name in
               ("CUT", "FastCUT", "NEGCUT", "FastNEGCUT", "DCLGAN", "SimDCL", "Hneg-SRC",
                "QS-Attn", "CycleGAN"))
    assert all(f"  F{i} " in dcl.__doc__ for i in range(1, 25))


# -----------------------------------------------------------------------------
# NEGCUT: the negative generator N, the momentum head H_ema, the loss, the step (§7)
# -----------------------------------------------------------------------------

def unit_rows(t):
    return t / t.norm(dim=-1, keepdim=True)


def test_negative_generator_parameters_and_keys():
    """§7 (the official NEGCUT code's N): N has one MLP per tapped layer, Linear(E + 64 → E),
    ReLU, Linear(E → E), keys mlp_{l}.0 (E×(E+64)) and mlp_{l}.2 (E×E). At E = 256 and
    5 layers: 5·(320·256 + 256 + 256·256 + 256) = 5·147,968 = 739,840 parameters.
    NEGCUT at official sizes trains G + D + H + N = 11,378,179 + 2,764,737 + 560,384
    + 739,840 = 15,443,140 parameters; H_ema holds another 560,384, all frozen."""
    expected = {}
    for l in range(5):
        expected.update({**weight_and_bias(f"mlp_{l}.0", (256, 320)),
                         **weight_and_bias(f"mlp_{l}.2", (256, 256))})
    with torch.device("meta"):
        N = dcl.NegativeGenerator(5, 256)
        nets = dcl.build_networks(
            dcl.resolve_config({"mode": "negcut", "dataroot": "x"})[0], "meta"
        )
    assert shapes(N) == expected and count_parameters(N) == 739_840
    assert list(nets) == ["G", "D", "H", "N", "H_ema"] and shapes(nets["N"]) == expected
    trained = sum(p.numel() for net in nets.values() for p in net.parameters() if p.requires_grad)
    assert trained == 15_443_140 and count_parameters(nets["H_ema"]) == 560_384
    assert not any(p.requires_grad for p in nets["H_ema"].parameters())


def test_negative_generator_output():
    """§7 (the official NEGCUT code's N): for L lists of n×E means, N returns L tensors
    (n·256)×E of unit rows, image-major: row b·256 + j = unit(MLP_l([v_b; z_bj])), with
    z ~ N(0, I₆₄) drawn as one n×256×64 tensor per layer (reproduced here, one image
    at a time, from the same seed). The noise is fresh on every call (two calls
    differ), and image b's negatives depend on its own mean only: changing v_1 leaves
    image 0's rows as they were under the same seed and changes image 1's. (PyTorch's
    default init: raw norms near 1, so the 1e-7 eps leaves unit rows to 1e-6.)"""
    torch.manual_seed(0)
    N = dcl.NegativeGenerator(2, 16)
    means = [torch.randn(2, 16), torch.randn(2, 16)]
    torch.manual_seed(1)
    out = N(means)
    torch.manual_seed(1)
    for l, v in enumerate(means):
        z = torch.randn(2, 256, 64)
        for b in range(2):
            y = getattr(N, f"mlp_{l}")(torch.cat([v[b].expand(256, -1), z[b]], dim=1))
            assert torch.allclose(
                out[l][b * 256 : (b + 1) * 256], y / (y.norm(dim=1, keepdim=True) + 1e-7), atol=1e-6
            )
    assert [o.shape for o in out] == [(512, 16)] * 2
    assert all(torch.allclose(o.norm(dim=1), torch.ones(512), atol=1e-6) for o in out)
    assert not torch.equal(N(means)[0], N(means)[0])          # fresh noise per call
    changed = [means[0].clone(), means[1]]
    changed[0][1] += 1.0
    torch.manual_seed(1)
    again = N(changed)
    assert torch.equal(again[0][:256], out[0][:256]) and not torch.equal(
        again[0][256:], out[0][256:]
    )
    assert torch.equal(again[1], out[1])


def test_mean_embedding_equals_a_slow_reference():
    """§7 (the official NEGCUT code): mean_embedding sends every position of each
    map (not a sample) through MLP_l, unit-normalises each E-vector (x/(‖x‖ + 1e-7)),
    and averages over the positions without renormalising: a loop over the positions
    agrees to 1e-6, and the mean of differing unit vectors is shorter than 1."""
    torch.manual_seed(0)
    H = dcl.ProjectionHead([3, 4], 8)
    feats = [torch.randn(2, 3, 5, 4), torch.randn(2, 4, 3, 3)]
    got = dcl.mean_embedding(H, feats)
    assert [g.shape for g in got] == [(2, 8), (2, 8)]
    for l, f in enumerate(feats):
        for b in range(2):
            total = torch.zeros(8)
            for y in range(f.shape[2]):
                for x in range(f.shape[3]):
                    z = getattr(H, f"mlp_{l}")(f[b, :, y, x])
                    total += z / (z.norm() + 1e-7)
            mean = total / (f.shape[2] * f.shape[3])
            assert torch.allclose(got[l][b], mean, atol=1e-6) and mean.norm() < 0.99


def slow_negcut_nce(q, k, negatives, n, tau):
    """NEGCUT's loss one row at a time (the official NEGCUT code, models/losses.py):
    query i of image b against its positive key, then image b's 256 generated
    negatives; no diagonal, class 0."""
    S, losses = q.shape[0] // n, []
    for b in range(n):
        for i in range(S):
            qi = q[b * S + i]
            logits = (
                torch.cat([(qi @ k[b * S + i])[None], negatives[b * 256 : (b + 1) * 256] @ qi])
                / tau
            )
            losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses)


def test_patch_nce_with_generated_negatives_equals_slow_loop():
    """§4, §7 (the official NEGCUT code): with `negatives`, each query of image b is compared with
    its positive key and image b's own 256 negatives only, with no diagonal mask:
    equal to a loop over 2 images × 5 patches to 1e-6. Image 0's losses do not depend
    on image 1's negatives. The keys get no gradient, the negatives do (in G's step
    that is the path into G's encoder on the source image)."""
    torch.manual_seed(0)
    q = unit_rows(torch.randn(10, 8)).requires_grad_()
    k = unit_rows(torch.randn(10, 8)).requires_grad_()
    negs = unit_rows(torch.randn(512, 8)).requires_grad_()
    loss = dcl.patch_nce_loss(q, k, 2, 0.07, negatives=negs)
    assert loss.shape == (10,)
    assert torch.allclose(loss, slow_negcut_nce(q, k, negs, 2, 0.07), atol=1e-6, rtol=1e-6)
    other = negs.detach().clone()
    other[256:] = unit_rows(torch.randn(256, 8))
    changed = dcl.patch_nce_loss(q, k, 2, 0.07, negatives=other)
    assert torch.equal(changed[:5], loss[:5]) and not torch.equal(changed[5:], loss[5:])
    loss.sum().backward()
    assert k.grad is None and q.grad.any() and negs.grad.any()


def test_diversity_loss():
    """§7 (the official NEGCUT code): L_div = (1/L)·Σ_l λ_MS·(−mean|N_l[:, :128] − N_l[:, 128:]|)
    with N_l viewed n×256×E. Negatives made of 128 rows repeated twice per image give
    exactly 0; for random ones (n = 2, E = 8, L = 2, λ_MS = 0.7) it equals
    −0.7·(m_0 + m_1)/2 with m_l the mean over the 2×128×8 absolute differences."""
    torch.manual_seed(0)
    half = unit_rows(torch.randn(2, 128, 8))
    twins = torch.cat([half, half], dim=1).flatten(0, 1)      # (2·256)×8, halves identical
    assert dcl.diversity_loss([twins, twins], 2, 1.0).item() == 0.0
    negs = [unit_rows(torch.randn(512, 8)) for _ in range(2)]
    m = [(n.view(2, 256, 8)[:, :128] - n.view(2, 256, 8)[:, 128:]).abs().mean() for n in negs]
    assert dcl.diversity_loss(negs, 2, 0.7).item() == pytest.approx(
        -0.7 * (m[0] + m[1]).item() / 2, rel=1e-6
    )


def negcut_step_and_its_branches(nets, opts, real_a, real_b, cfg):
    """One negcut_step (seed 7), and its N step's two NCE branches recomputed by
    hand from copies of the nets made before it, with the same seed (between the
    seed and the N step negcut_step draws nothing: no flip coin, no randomness in
    D): (step losses, the PatchNCE result of real_a -> fake_b, of real_b -> idt_b)."""
    copies = copy.deepcopy(nets)
    torch.manual_seed(7)
    losses = dcl.negcut_step(nets, opts, real_a, real_b, cfg)
    torch.manual_seed(7)
    G, H, n = copies["G"], copies["H"], real_a.shape[0]
    with torch.no_grad():
        y = G(torch.cat([real_a, real_b]))
        negatives = dcl.generated_negatives(copies)
        main = dcl.nce_between(real_a, y[:n], G, H, cfg, make_negatives=negatives)
        identity = dcl.nce_between(real_b, y[n:], G, H, cfg, make_negatives=negatives)
    return losses, main, identity


def test_negcut_makes_num_patches_negatives(monkeypatch):
    """§7 (F16): N makes --num_patches negatives per image and layer, as the
    official code does (noise n×num_patches×64), and L_div splits them into halves
    of num_patches/2. At --num_patches 10 and batch 2, one negcut_step's N loss equals
    −0.5·(NCE + NCE_Y) + L_div computed here from copies of the nets with the same
    seed, with a loop over the 10 negatives of each image for L_div; an odd
    --num_patches (the official code crashes on it) is refused with one line."""
    cfg = tiny_cfg(mode="negcut", num_patches=10)
    torch.manual_seed(0)
    nets = dcl.build_networks(cfg, "cpu")
    assert nets["N"].count == 10
    opts = dcl.build_optimizers(nets, cfg)
    real_a, real_b = (torch.rand(2, 3, 32, 32) * 2 - 1 for _ in "ab")
    losses, nce, last = negcut_step_and_its_branches(nets, opts, real_a, real_b, cfg)
    assert [n.shape for n in last.negatives] == [(20, 16)] * 5
    terms = []
    for negs in last.negatives:                            # (2·10)×16, image-major
        diffs = [
            (negs[b * 10 + j] - negs[b * 10 + 5 + j]).abs() for b in range(2) for j in range(5)
        ]
        terms.append(-torch.stack(diffs).mean())
    expected = -0.5 * (nce.loss + last.loss) + torch.stack(terms).mean()
    assert losses["N"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(dcl.UserError, match="num_patches 9"):
        tiny_cfg(mode="fastnegcut", num_patches=9)


def negcut_setup(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_cfg(mode="negcut")
    nets = dcl.build_networks(cfg, "cpu")
    return cfg, nets, dcl.build_optimizers(nets, cfg), torch.rand(1, 3, 32, 32) * 2 - 1, \
        torch.rand(1, 3, 32, 32) * 2 - 1


def test_negcut_n_step_objective():
    """§7 (F16): negcut_step's logged N loss is
        L_N = −0.5·(NCE(real_a→fake_b) + NCE(real_b→idt_b)) + L_div(negatives of the
    identity branch, the last one computed), each NCE with N's negatives; recomputed
    here from copies of the nets made before the step, with the same seed (between the
    seed and the N step negcut_step draws nothing: NEGCUT has no flip coin and D no
    randomness), to 1e-6. L_div of the first branch's negatives would differ."""
    cfg, nets, opts, real_a, real_b = negcut_setup()
    losses, first, last = negcut_step_and_its_branches(nets, opts, real_a, real_b, cfg)

    def div(negatives):                                       # L_div at λ_MS 1, E = 16, K = 16
        halves = [n.view(1, 16, 16) for n in negatives]
        return -torch.stack([(h[:, :8] - h[:, 8:]).abs().mean() for h in halves]).mean()
    expected = -0.5 * (first.loss + last.loss) + div(last.negatives)
    assert losses["N"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert div(first.negatives).item() != pytest.approx(div(last.negatives).item(), rel=1e-4)


def test_negcut_sign_test():
    """§7: the min-max game has the right signs. On a fixed image x,
    with a fixed seed before every evaluation (equal patch ids and noise),
    NCE(x → G(x)) with N's negatives rises after one Adam step of N (the preset's
    Adam(2e-4, (0.5, 0.999))) on L_N = −NCE + L_div computed with negatives_only=True, and
    falls after one Adam step of G and H on that NCE (N frozen, negatives not
    detached). Measured with these seeds: 3.86 → 7.06 → 0.98, far beyond noise."""
    cfg, nets, opts, real_a, _ = negcut_setup()
    G, H = nets["G"], nets["H"]

    def nce(**kw):
        torch.manual_seed(100)
        return dcl.nce_between(real_a, G(real_a), G, H, cfg,
                               make_negatives=dcl.generated_negatives(nets), **kw)
    with torch.no_grad():
        start = nce().loss.item()
    torch.manual_seed(100)
    ascent = nce(negatives_only=True)
    (-ascent.loss + dcl.diversity_loss(ascent.negatives, 1, cfg.lambda_MS_neg)).backward()
    opts["N"].step()
    with torch.no_grad():
        harder = nce().loss.item()
    nets["N"].requires_grad_(False)
    nce().loss.backward()
    opts["G"].step()
    opts["H"].step()
    with torch.no_grad():
        easier = nce().loss.item()
    assert harder > start + 1 and easier < harder - 1, (start, harder, easier)


def test_negcut_step_gradient_routing():
    """§7 (F16): at N's Adam step inside negcut_step, every parameter
    of N has a gradient and G, H and H_ema none (N's inputs ran without gradient);
    at G's step N's gradients are still those of the N step (frozen: nothing added),
    H_ema has none (requires_grad False), and G's first conv and every MLP of H have
    non-zero ones. H_ema is in no optimiser; the optimisers are G, D, H and N."""
    cfg, nets, opts, real_a, real_b = negcut_setup()
    seen = {}
    spy_on_step(opts, "N", lambda: seen.update(at_N=gradients(nets)))
    spy_on_step(opts, "G", lambda: seen.update(at_G=gradients(nets)))
    dcl.negcut_step(nets, opts, real_a, real_b, cfg)
    assert all(g is not None and g.any() for g in seen["at_N"]["N"])
    assert all(g is None for name in ("G", "H", "H_ema") for g in seen["at_N"][name])
    assert all(torch.equal(a, b) for a, b in zip(seen["at_N"]["N"], seen["at_G"]["N"]))
    assert all(g is None for g in seen["at_G"]["H_ema"])
    assert seen["at_G"]["G"][0].any() and all(g is not None and g.any() for g in seen["at_G"]["H"])
    assert set(opts) == {"G", "D", "H", "N"}
    owned = {id(p) for o in opts.values() for p in o.param_groups[0]["params"]}
    assert not any(id(p) in owned or p.requires_grad for p in nets["H_ema"].parameters())


def test_negcut_gradient_reaches_the_key_encoder():
    """§4, §7 (the official NEGCUT code): in G's step the negatives are not detached, so the
    NCE reaches the encoder on the *source* image through H_ema's mean embedding and
    N (both frozen), the only key-side path. With a separate key encoder G_key (a copy
    of G; the query side uses G), NCE(real_a → fake_b) with negcut gives G_key's first
    conv a non-zero gradient; in N's own step (negatives_only=True) and without negcut (CUT:
    keys detached) G_key gets none. H_ema and the frozen N get none either way."""
    cfg, nets, _, real_a, real_b = negcut_setup()
    nets["N"].requires_grad_(False)                           # as during G's step
    G_key, G, H = copy.deepcopy(nets["G"]), nets["G"], nets["H"]
    fake_b = G(real_b).detach()
    first_conv = {}
    for case, kw in (("negcut", dict(make_negatives=dcl.generated_negatives(nets))), ("cut", {})):
        G_key.zero_grad(set_to_none=True)
        dcl.nce_between(real_a, fake_b, G_key, H, cfg, G_query=G, **kw).loss.backward()
        first_conv[case] = G_key.model[1].weight.grad
    assert all(p.grad is None for p in nets["N"].parameters())
    nets["N"].requires_grad_(True)
    G_key.zero_grad(set_to_none=True)
    ascent = dcl.nce_between(real_a, fake_b, G_key, H, cfg, G_query=G,
                             make_negatives=dcl.generated_negatives(nets), negatives_only=True)
    (-ascent.loss + dcl.diversity_loss(ascent.negatives, 1, 1.0)).backward()
    assert first_conv["negcut"] is not None and first_conv["negcut"].any()
    assert first_conv["cut"] is None and G_key.model[1].weight.grad is None
    assert all(p.grad is None for p in nets["H_ema"].parameters())


def test_negcut_ema_update():
    """§7 (F16): H_ema starts from its own random init
    (not a copy of H), and after one negcut_step every parameter of H_ema equals
    0.9·(its value before) + 0.1·(H's value after H's Adam step), to 1e-6."""
    cfg, nets, opts, real_a, real_b = negcut_setup()
    H, H_ema = nets["H"], nets["H_ema"]
    assert not any(torch.equal(a, b) for a, b in zip(H.parameters(), H_ema.parameters()) if a.any())
    old = [p.detach().clone() for p in H_ema.parameters()]
    dcl.negcut_step(nets, opts, real_a, real_b, cfg)
    for before, after, h in zip(old, H_ema.parameters(), H.parameters()):
        assert torch.allclose(after, 0.9 * before + 0.1 * h, atol=1e-6)
        assert not torch.equal(after, before) or not h.any()


def test_negcut_presets_and_optimizers():
    """§11, §14 (the official NEGCUT defaults; F16): NEGCUT = CUT's settings (λ_NCE 1, identity NCE,
    no flip, 200 + 200 epochs) with λ_MS 1; FastNEGCUT = FastCUT's (λ_NCE 10, flip,
    no identity, 150 + 50) with λ_MS 1; both lsgan, taps 0,4,8,12,16, S 256, τ 0.07,
    no pool. N's Adam runs at --lr and --beta1: (2e-4, (0.5, 0.999)), like G, D, H."""
    neg, fast = (
        dcl.resolve_config({"mode": m, "dataroot": "x"})[0] for m in ("negcut", "fastnegcut")
    )
    key = lambda c: (c.lambda_NCE, c.nce_idt, c.flip_equivariance, c.lambda_MS_neg,  # noqa: E731
                     c.n_epochs, c.n_epochs_decay)
    assert key(neg) == (1.0, True, False, 1.0, 200, 200)
    assert key(fast) == (10.0, False, True, 1.0, 150, 50)
    for c in (neg, fast):
        assert (c.gan_mode, c.layer_ids, c.num_patches, c.nce_T, c.pool_size, c.lambda_GAN) == \
            ("lsgan", (0, 4, 8, 12, 16), 256, 0.07, 0, 1.0)
    assert dcl.resolve_config({"dataroot": "x"})[0].lambda_MS_neg == 0.0
    cfg = tiny_cfg(mode="fastnegcut")
    opts = dcl.build_optimizers(dcl.build_networks(cfg, "cpu"), cfg)
    assert {k: (o.defaults["lr"], o.defaults["betas"]) for k, o in opts.items()} == \
        {k: (2e-4, (0.5, 0.999)) for k in ("G", "D", "H", "N")}


def test_resume_negcut(data, tmp_path, capsys):
    """§16: NEGCUT, 4 steps in one run equal 2 steps, then --continue_train to 4:
    identical log rows 3-4 (N included) and identical weights of every net, N and
    H_ema included (the noise z comes from the restored torch RNG). In-process, as
    for CycleGAN."""
    ckpt_a, ckpt_b = whole_and_resumed(capsys, tmp_path, "negcut", "--dataroot", data,
                                       "--display_freq", 100)
    nets_a, nets_b = ckpt_a["nets"], ckpt_b["nets"]
    assert set(nets_a) == set(dcl.MODES["negcut"].networks) and set(ckpt_a["optimizers"]) == {
        "G",
        "D",
        "H",
        "N",
    }
    for net in dcl.MODES["negcut"].networks:
        assert all(torch.equal(nets_a[net][k], nets_b[net][k]) for k in nets_a[net]), net


def test_negcut_without_nce(data, tmp_path, capsys):
    """§7: `--mode negcut --lambda_NCE 0` leaves N nothing to do (no NCE term, so no
    negatives). It must not crash: either it trains (exit 0) or it refuses in one
    line naming --lambda_NCE (exit 2)."""
    code, _, err = train_in_process(capsys, "--mode", "negcut", "--lambda_NCE", 0, "--dataroot",
                                    data, *TINY, "--max_steps", 1, "--display_freq", 100,
                                    "--checkpoints_dir", tmp_path)
    assert code == 0 or (code == 2 and err.count("\n") == 1 and "--lambda_NCE" in err), err


# -----------------------------------------------------------------------------
# perceptual loss (§10)
# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_vgg16():
    """One VGG16 with random weights, built by the torchvision function dcl.py
    imports (building one initialises all 138M parameters, the classifier
    included: about 1.3 s on this CPU, so it is built once)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return dcl.vgg16(weights=None)


@pytest.fixture
def fast_vgg(monkeypatch, random_vgg16):
    """dcl.vgg16 hands out a copy of random_vgg16, so each Perceptual costs a
    20 ms copy of `features` instead of a full VGG16 build. It must be asked for
    weights=None: torchvision would download anything else."""
    def vgg16(weights="not given"):
        assert weights is None
        return types.SimpleNamespace(features=copy.deepcopy(random_vgg16.features))
    monkeypatch.setattr(dcl, "vgg16", vgg16)


def perceptual_by_hand(features, a, b, weights):
    """Σ w_l·mean|φ_l(a) − φ_l(b)| over {layer index: w_l}, running each image through
    `features` on its own, after (x + 1)/2 and the ImageNet mean and std."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def taps(x):
        x, out = ((x + 1) / 2 - mean) / std, {}
        for index, layer in enumerate(features):
            x = layer(x)
            out[index] = x.clone()
        return out
    taps_a, taps_b = taps(a), taps(b)
    return sum(w * (taps_a[i] - taps_b[i]).abs().mean() for i, w in weights.items())


def test_perceptual_loss_with_random_weights(fast_vgg, random_vgg16):
    """§10: Perceptual("random") keeps torchvision's VGG16 features[:23]
    (the same layer types and shapes, 7,635,264 parameters: the 14,714,688 of
    `features` minus three 512→512 convs of 2,359,808 after relu4_3), with ReLUs at
    relu1_2 = 3, relu2_2 = 8, relu3_3 = 15, relu4_3 = 22 and weights 1/16, 1/8, 1/4, 1.
    It is frozen (requires_grad False; .train() leaves every module in eval mode) and
    not in its state dict beyond `features`. The loss is 0 for identical images and
    positive otherwise; it equals Σ w_l·mean|φ_l(a) − φ_l(b)| computed layer by layer
    here (content=True: relu4_3 alone, weight 1) to 1e-5; its gradient reaches the
    output image, not VGG, and is zero for the target image (detached inside)."""
    vgg = dcl.Perceptual("random")
    reference = random_vgg16.features[:23]
    assert [type(m) for m in vgg.features] == [type(m) for m in reference]
    assert shapes(vgg.features) == shapes(reference) and count_parameters(vgg) == 7_635_264
    assert dcl.VGG_LAYERS == {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
    assert dcl.VGG_WEIGHTS == {
        "relu1_2": 1 / 16,
        "relu2_2": 1 / 8,
        "relu3_3": 1 / 4,
        "relu4_3": 1.0,
    }
    assert all(isinstance(vgg.features[i], torch.nn.ReLU) for i in (3, 8, 15, 22))
    assert set(vgg.state_dict()) == {f"features.{k}" for k in reference.state_dict()}
    vgg.train()
    assert not any(m.training for m in vgg.modules()) and not any(
        p.requires_grad for p in vgg.parameters()
    )
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert vgg(a, a.clone()).item() == 0.0 and vgg(a, a.clone(), content=True).item() == 0.0
    by_layer = {i: w for i, w in zip((3, 8, 15, 22), (1 / 16, 1 / 8, 1 / 4, 1.0))}
    with torch.no_grad():
        full, content = perceptual_by_hand(vgg.features, a, b, by_layer), \
            perceptual_by_hand(vgg.features, a, b, {22: 1.0})
        assert vgg(a, b).item() == pytest.approx(full.item(), rel=1e-5)
        assert vgg(a, b, content=True).item() == pytest.approx(content.item(), rel=1e-5)
    a.requires_grad_(), b.requires_grad_()
    loss = vgg(a, b)
    assert loss > 0
    loss.backward()
    assert a.grad.any() and not b.grad.any() and all(p.grad is None for p in vgg.parameters())


def test_perceptual_loads_torchvision_weights(fast_vgg, random_vgg16, tmp_path, monkeypatch):
    """§10: a state dict in torchvision's format (features.N and classifier.N keys, saved
    as vgg16-397923af.pth; the classifier is shrunk here to keep the file small, its
    keys are dropped anyway) and a features-only one ("0.weight", ...) both load: the
    kept convs equal the saved tensors, and the convs after relu4_3 in the file are
    ignored. A file with other keys is a UserError naming the missing keys. With no
    path, the file is read from torch.hub.get_dir()/checkpoints, i.e.
    $TORCH_HOME/hub/checkpoints, torchvision's cache."""
    torch.manual_seed(3)
    features = {
        f"features.{k}": torch.randn_like(v) for k, v in random_vgg16.features.state_dict().items()
    }
    classifier = {
        f"classifier.{i}.{p}": torch.randn(4, 2) for i in (0, 3, 6) for p in ("weight", "bias")
    }
    full, bare = tmp_path / dcl.VGG_FILE, tmp_path / "features_only.pth"
    torch.save({**features, **classifier}, full)
    torch.save({k.removeprefix("features."): v for k, v in features.items()}, bare)
    for path in (full, bare):
        state = dcl.Perceptual(str(path)).features.state_dict()
        assert len(state) == 20 and all(
            torch.equal(v, features[f"features.{k}"]) for k, v in state.items()
        )
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(
        dcl.UserError, match=r"wrong\.pth \(VGG16\) does not fit .*missing \['0\.bias'"
    ):
        dcl.Perceptual(str(tmp_path / "wrong.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(full, tmp_path / "home" / "hub" / "checkpoints" / dcl.VGG_FILE)
    assert torch.equal(dcl.Perceptual("").features[0].weight, features["features.0.weight"])


@pytest.mark.parametrize("given", ["", "missing.pth"])
def test_missing_vgg_weights_fail_before_training(
    given, fast_vgg, data, tmp_path, capsys, monkeypatch
):
    """§10, §14: `train --lambda_perc 1` without the weights file (none in an empty
    TORCH_HOME's cache, or a --vgg_weights path that does not exist) exits 2 with one
    error line naming vgg16-397923af.pth, the path looked at and --vgg_weights, before
    any step: no run folder is made."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    looked_at = (
        tmp_path / given if given else tmp_path / "home" / "hub" / "checkpoints" / dcl.VGG_FILE
    )
    code, _, err = train_in_process(
        capsys,
        "--dataroot",
        data,
        *TINY,
        "--max_steps",
        1,
        "--lambda_perc",
        1,
        "--vgg_weights",
        str(looked_at) if given else "",
        "--checkpoints_dir",
        tmp_path / "ck",
    )
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert dcl.VGG_FILE in err and str(looked_at) in err and "--vgg_weights" in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("mode", ["cut", "dcl", "cyclegan"])
def test_train_with_perceptual_loss(mode, fast_vgg, data, tmp_path, capsys):
    """§10, §15: `train --lambda_perc 1 --lambda_perc_content 0.5 --vgg_weights random
    --max_steps 2` exits 0 with a finite, positive perc in every log row; VGG is
    neither in the checkpoint's nets nor an optimiser family of its own."""
    code, _, err = train_in_process(capsys, "--mode", mode, "--dataroot", data, *TINY,
                                    "--max_steps", 2, "--lambda_perc", 1, "--lambda_perc_content",
                                    0.5, "--vgg_weights", "random", "--display_freq", 100,
                                    "--checkpoints_dir", tmp_path, "--name", "r")
    assert code == 0, err
    rows = read_log(tmp_path / "r")
    assert len(rows) == 2 and all(math.isfinite(r["perc"]) and r["perc"] > 0 for r in rows)
    ckpt = torch.load(tmp_path / "r" / "ckpt_latest.pt", weights_only=True)
    assert set(ckpt["nets"]) == set(dcl.MODES[mode].networks)
    assert set(ckpt["optimizers"]) == ({"G", "D"} if mode == "cyclegan" else {"G", "D", "H"})
    assert (ckpt["config"]["lambda_perc"], ckpt["config"]["lambda_perc_content"]) == (1.0, 0.5)


@pytest.mark.parametrize("mode", ["cut", "dcl", "cyclegan"])
def test_perceptual_step_leaves_vgg_frozen(mode, fast_vgg):
    """§10: with the perceptual terms on, VGG is in no optimiser, has no gradient when
    Adam steps G, stays in eval mode, and its parameters are unchanged by the step,
    while the step's perc term is positive."""
    cfg = tiny_cfg(mode=mode, lambda_perc=1.0, lambda_perc_content=0.5, vgg_weights="random")
    torch.manual_seed(0)
    nets = dcl.build_networks(cfg, "cpu")
    opts, seen = dcl.build_optimizers(nets, cfg), {}
    vgg, before = nets["vgg"], [p.clone() for p in nets["vgg"].parameters()]
    owned = {id(p) for o in opts.values() for p in o.param_groups[0]["params"]}
    assert not any(id(p) in owned for p in vgg.parameters())
    spy_on_step(opts, "G", lambda: seen.update(vgg=gradients({"vgg": vgg})["vgg"]))
    real_a, real_b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    losses = dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)
    assert losses["perc"] > 0 and all(g is None for g in seen["vgg"]) and not vgg.training
    assert all(torch.equal(p, old) for p, old in zip(vgg.parameters(), before))


class RecordingVGG(torch.nn.Module):
    """A stand-in for Perceptual: records each call and returns mean|output − target|,
    × 10 for content calls, so every pair's share of the total can be read off."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, output, target, content=False):
        self.calls.append((output, target, content))
        return (10.0 if content else 1.0) * (output - target).abs().mean()


def test_perceptual_terms_known_answer():
    """§10: perceptual_terms = λ_perc·Σ_sets mean_pairs L_perc + λ_content·mean_pairs L_content.
    With constant images 0, 0.2, 0.5, 0.9, the stub's L_perc is |difference| and
    L_content 10·|difference|: sets [[(0, 0.2), (0.5, 0.9)], [(0, 0.9)], []] and
    content pairs [(0, 0.5), (0.2, 0.9)] at λ_perc 2, λ_content 0.5 give
    2·((0.2 + 0.4)/2 + 0.9) + 0.5·(5 + 7)/2 = 2.4 + 3 = 5.4. With λ_perc 0 only the
    content part is left (3.0); without a vgg in the nets the result is None."""
    a, b, c, d = (torch.full((1, 3, 4, 4), v) for v in (0.0, 0.2, 0.5, 0.9))
    sets, content = [[(a, b), (c, d)], [(a, d)], []], [(a, c), (b, d)]
    cfg = tiny_cfg(lambda_perc=2.0, lambda_perc_content=0.5)
    assert dcl.perceptual_terms(
        {"vgg": RecordingVGG()}, cfg, sets, content
    ).item() == pytest.approx(5.4)
    only_content = dataclasses.replace(cfg, lambda_perc=0.0)
    assert dcl.perceptual_terms({"vgg": RecordingVGG()}, only_content, sets, content).item() == \
        pytest.approx(3.0)
    assert dcl.perceptual_terms({}, cfg, sets, content) is None


@pytest.mark.parametrize("mode", ["cut", "dcl", "cyclegan"])
def test_perceptual_pairs_of_each_step(mode):
    """§10: where the perceptual terms apply, and with which weight
    (λ_perc 2, λ_content 0.5; two-sided modes average the directions with 0.5):
      CUT       2·L(idt_b, real_b) + 0.5·C(fake_b, real_a)
      DCLGAN    2·½[L(idt_b, real_b) + L(idt_a, real_a)]
                + 0.5·½[C(fake_b, real_a) + C(fake_a, real_b)]
      CycleGAN  the same plus 2·½[L(rec_a, real_a) + L(rec_b, real_b)]
    The stub records each call: the targets are the real images, the outputs carry
    gradient and equal the generators' outputs computed here before the step (to
    1e-5), and the step's perc equals the weighted sum of the recorded values."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode, lambda_perc=2.0, lambda_perc_content=0.5)
    nets = dcl.build_networks(
        dataclasses.replace(cfg, lambda_perc=0.0, lambda_perc_content=0.0), "cpu"
    )
    opts = dcl.build_optimizers(nets, cfg)
    nets["vgg"] = vgg = RecordingVGG()
    real = {"real_a": torch.rand(1, 3, 32, 32) * 2 - 1, "real_b": torch.rand(1, 3, 32, 32) * 2 - 1}
    with torch.no_grad():
        if mode == "cut":
            out = {"idt_b": nets["G"](real["real_b"]), "fake_b": nets["G"](real["real_a"])}
            expected = [("idt_b", "real_b", False, 2.0), ("fake_b", "real_a", True, 0.5)]
        else:
            G_ab, G_ba = nets["G_ab"], nets["G_ba"]
            out = {"idt_b": G_ab(real["real_b"]), "idt_a": G_ba(real["real_a"]),
                   "fake_b": G_ab(real["real_a"]), "fake_a": G_ba(real["real_b"])}
            expected = [("idt_b", "real_b", False, 1.0), ("idt_a", "real_a", False, 1.0)]
            if mode == "cyclegan":
                out.update(rec_a=G_ba(out["fake_b"]), rec_b=G_ab(out["fake_a"]))
                expected += [("rec_a", "real_a", False, 1.0), ("rec_b", "real_b", False, 1.0)]
            expected += [("fake_b", "real_a", True, 0.25), ("fake_a", "real_b", True, 0.25)]
    losses = dcl.MODES[mode].step(nets, opts, real["real_a"], real["real_b"], cfg)
    assert len(vgg.calls) == len(expected)
    total = 0.0
    for (output, target, content), (out_name, target_name, is_content, weight) in zip(
        vgg.calls, expected
    ):
        assert torch.equal(target, real[target_name]) and content == is_content, out_name
        assert output.requires_grad and torch.allclose(output, out[out_name], atol=1e-5), out_name
        total += weight * (10.0 if content else 1.0) * (output - target).abs().mean().item()
    assert losses["perc"].item() == pytest.approx(total, rel=1e-5)


def test_perceptual_identity_pair_follows_the_flip():
    """§5, §10: on a flipped step (FastCUT's coin, here with the identity term on)
    G's input is [flip(real_a); flip(real_b)], so the identity output G(flip(real_b))
    is compared with flip(real_b), as the content pair is with flip(real_a); an
    unflipped target would punish the flip itself. Both kinds of step occur
    within the 8 seeded steps (asserted)."""
    cfg = tiny_cfg(mode="cut", flip_equivariance=True, lambda_perc=1.0)
    torch.manual_seed(0)
    nets = dcl.build_networks(dataclasses.replace(cfg, lambda_perc=0.0), "cpu")
    opts = dcl.build_optimizers(nets, cfg)
    real_a, real_b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    seen = set()
    for step in range(8):
        nets["vgg"] = vgg = RecordingVGG()
        dcl.cut_step(nets, opts, real_a, real_b, cfg)
        (_, identity_target, _), = vgg.calls
        flipped = torch.equal(identity_target, real_b.flip(3))
        assert flipped or torch.equal(identity_target, real_b)
        seen.add(flipped)
    assert seen == {True, False}


@pytest.mark.parametrize("mode, extra", [("fastcut", []), ("dcl", ["--lambda_IDT", 0])])
def test_perceptual_loss_without_target_images(mode, extra, fast_vgg, data, tmp_path, capsys):
    """§10, §12 (the perceptual term applies only where a target image
    exists): FastCUT has no identity image, nor has DCLGAN with --lambda_IDT 0, so
    --lambda_perc alone has no pair to apply to. Training must not crash: either it
    runs (exit 0, perc 0 in the log) or it refuses in one line naming --lambda_perc
    (exit 2) before any run folder exists."""
    code, _, err = train_in_process(capsys, "--mode", mode, "--dataroot", data, *TINY, *extra,
                                    "--max_steps", 1, "--lambda_perc", 1, "--vgg_weights",
                                    "random", "--display_freq", 100, "--checkpoints_dir", tmp_path,
                                    "--name", "r")
    if code == 0:
        assert [r["perc"] for r in read_log(tmp_path / "r")] == [0.0]
    else:
        assert code == 2 and err.count("\n") == 1 and "--lambda_perc" in err, err
        assert not (tmp_path / "r").exists()


# -----------------------------------------------------------------------------
# hard negatives: --nce_hard_beta (§4)
# -----------------------------------------------------------------------------

def hard_nce_by_hand(q, k, n, tau, beta, fixed_weights=None, detach=True):
    """Robinson et al.'s weighting one row at a time, in float64: the N real
    negatives s_j = q_i·k_j (j ≠ i, same image) get w_j = exp(β·s_j)/mean_m exp(β·s_m),
        ℓ_i = −log(e^(s⁺/τ) / (e^(s⁺/τ) + Σ_j w_j·e^(s_j/τ) + e^(−10/τ)))
    with the masked diagonal's e^(−10/τ) of the official loss kept, unweighted. With
    fixed_weights (a list of the rows' w) those are used as constants; detach=False
    leaves the weights in the graph (the wrong variant). Returns the losses and
    the weights."""
    q, k = q.double(), k.double()
    S, losses, weights = q.shape[0] // n, [], []
    for b in range(n):
        for i in range(S):
            qi, row = q[b * S + i], b * S + i
            s = torch.stack([qi @ k[b * S + j] for j in range(S) if j != i])
            scores = beta * (s.detach() if detach else s)
            w = (
                torch.exp(scores) / torch.exp(scores).mean()
                if fixed_weights is None
                else fixed_weights[row]
            )
            pos = torch.exp(qi @ k[row] / tau)
            losses.append(
                -torch.log(pos / (pos + (w * torch.exp(s / tau)).sum() + math.exp(-10 / tau)))
            )
            weights.append(w)
    return torch.stack(losses), weights


def test_hard_negatives_beta_0_and_the_limit():
    """§4: β = 0 is the official loss bit for bit (torch.equal). As β grows the weights
    shift to harder negatives, so ℓ rises monotonically (d/dβ of Σ_j w_j·e^(s_j/τ) is
    N·Cov_β(s, e^(s/τ)) ≥ 0) from the plain loss (β = 0) towards the hardest-negative
    limit ℓ = −log(e^(s⁺/τ) / (e^(s⁺/τ) + N·e^(s_max/τ))) (e^(−10/τ) is 7e-63 at τ = 0.07).
    Same-image negatives: 2 images × 6 patches, N = S − 1 = 5; with whole-batch
    negatives (groups = 1) N = n·S − 1 = 11 and s_max runs over all of them. Every
    row's two largest negatives differ by more than 0.008 here (asserted), so at
    β = 3000 the others weigh less than e^(−24) and the limit holds to 1e-4 (measured:
    1.2e-5, from the fp32 rounding of the scores β·s ≈ 3000; at β = 100 it is 7e-3)."""
    torch.manual_seed(0)
    q, k = unit_rows(torch.randn(12, 8)), unit_rows(torch.randn(12, 8))
    for n_images, N in ((2, 5), (1, 11)):
        plain = dcl.patch_nce_loss(q, k, n_images, 0.07)
        assert torch.equal(dcl.patch_nce_loss(q, k, n_images, 0.07, hard_beta=0.0), plain)
        S = 12 // n_images
        s = (q.view(n_images, S, 8) @ k.view(n_images, S, 8).transpose(1, 2)).double()
        pos = s.diagonal(dim1=1, dim2=2).flatten()
        negs = s.masked_select(~torch.eye(S, dtype=torch.bool)).view(12, N)
        top2 = negs.topk(2, dim=1).values
        assert (top2[:, 0] - top2[:, 1] > 0.008).all()
        limit = -torch.log(
            torch.exp(pos / 0.07) / (torch.exp(pos / 0.07) + N * torch.exp(top2[:, 0] / 0.07))
        )
        losses = [plain] + [
            dcl.patch_nce_loss(q, k, n_images, 0.07, hard_beta=b) for b in (1.0, 10.0, 100.0)
        ]
        for lower, higher in zip(losses, losses[1:]):
            assert (higher >= lower - 1e-5).all() and (higher > lower).any()
        assert (losses[-1] <= limit.float() + 1e-5).all()
        hardest = dcl.patch_nce_loss(q, k, n_images, 0.07, hard_beta=3000.0)
        assert torch.allclose(hardest.double(), limit, rtol=1e-4)


def test_hard_negative_weights_average_to_1(monkeypatch):
    """§4: the weights enter as log w_j added to negative j's logit, so the logits
    handed to cross_entropy (captured here) give w_j = exp(hard − plain): they average
    to exactly 1 over each row's N real negatives (mean_j w_j = 1), the positive and
    the masked diagonal columns are unweighted, and w_j equals exp(β·s_j)/mean_m
    exp(β·s_m) recomputed here, to 1e-5 (β = 5, τ = 0.07, 2 images × 5 patches). The
    loss equals the one-row-at-a-time formula of hard_nce_by_hand to 1e-5. At τ = 10,
    where the diagonal's e^(−10/τ) = 0.37 is not negligible, the loss still equals that
    formula, which keeps the diagonal term unweighted as the official loss does (the
    docstring's formula leaves that term out; at τ = 0.07 it is 7e-63)."""
    torch.manual_seed(0)
    q, k = unit_rows(torch.randn(10, 8)), unit_rows(torch.randn(10, 8))
    captured, cross_entropy = [], torch.nn.functional.cross_entropy
    monkeypatch.setattr(dcl.F, "cross_entropy", lambda logits, *a, **kw: (
        captured.append(logits.detach().double()), cross_entropy(logits, *a, **kw))[1])
    plain, hard = dcl.patch_nce_loss(q, k, 2, 0.07), dcl.patch_nce_loss(
        q, k, 2, 0.07, hard_beta=5.0
    )
    by_hand, weights = hard_nce_by_hand(q, k, 2, 0.07, 5.0)
    log_w = captured[1] - captured[0]                          # (n·S)×(1 + S)
    diagonal = torch.eye(5, dtype=torch.bool).repeat(2, 1)    # row b·5 + i: column 1 + i
    assert log_w[:, 0].abs().max() < 1e-9 and log_w[:, 1:][diagonal].abs().max() < 1e-9
    w = log_w[:, 1:][~diagonal].exp().view(10, 4)
    assert torch.allclose(w.mean(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(w, torch.stack(weights), rtol=1e-4)
    assert torch.allclose(hard.double(), by_hand, rtol=1e-5)
    assert not torch.allclose(hard, plain, rtol=1e-3)
    at_tau_10 = dcl.patch_nce_loss(q, k, 2, 10.0, hard_beta=5.0)
    assert torch.allclose(at_tau_10.double(), hard_nce_by_hand(q, k, 2, 10.0, 5.0)[0], rtol=1e-5)


def test_hard_negative_weights_are_detached():
    """§4: the weights are constants for backward: the gradient of the β = 5 loss with
    respect to the queries equals that of hard_nce_by_hand with the weights computed
    beforehand and passed in as fixed numbers (to 1e-5), and differs from the
    gradient obtained when the weights are differentiated too."""
    torch.manual_seed(0)
    q0, k = unit_rows(torch.randn(10, 8)), unit_rows(torch.randn(10, 8))
    _, fixed = hard_nce_by_hand(q0, k, 2, 0.07, 5.0)
    grads = []
    for fn in (lambda q: dcl.patch_nce_loss(q, k, 2, 0.07, hard_beta=5.0).double(),
               lambda q: hard_nce_by_hand(q, k, 2, 0.07, 5.0, fixed_weights=fixed)[0],
               lambda q: hard_nce_by_hand(q, k, 2, 0.07, 5.0, detach=False)[0]):
        q = q0.clone().requires_grad_()
        fn(q).sum().backward()
        grads.append(q.grad.double())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grads[0], grads[2], rtol=1e-2)


@pytest.mark.parametrize("mode", ["cut", "dcl"])
def test_train_with_hard_negatives(mode, runs, data, tmp_path, capsys):
    """§4, §15: `train --nce_hard_beta 1 --max_steps 2` runs (exit 0, finite losses, β
    stored in the config). For CUT, step 1 starts from the same nets, data and patch
    ids as the runs fixture's plain run (equal D_real), and its NCE terms are at
    least the plain ones: with w_j increasing in s_j and mean 1, Σ_j w_j·e^(s_j/τ) ≥
    Σ_j e^(s_j/τ) (Chebyshev's sum inequality), row by row."""
    code, _, err = train_in_process(capsys, "--mode", mode, "--dataroot", data, *TINY,
                                    "--max_steps", 2, "--nce_hard_beta", 1, "--checkpoints_dir",
                                    tmp_path, "--name", mode)
    assert code == 0, err
    rows = read_log(tmp_path / mode)
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in LOSS_NAMES[mode])
    assert json.loads((tmp_path / mode / "config.json").read_text())["nce_hard_beta"] == 1.0
    if mode == "cut":
        plain = read_log(runs("cut")[1])[0]
        assert rows[0]["D_real"] == pytest.approx(plain["D_real"], rel=1e-6)
        assert rows[0]["NCE"] > plain["NCE"] and rows[0]["NCE_Y"] > plain["NCE_Y"]


# -----------------------------------------------------------------------------
# hardening: signals, kill -9, NaN, bad input, checkpoints (§15-§17, §21)
# -----------------------------------------------------------------------------

def start_training(root: Path, name: str, data: Path, *extra):
    """A long tiny `train` in a child process of its own session (so a signal can
    go to its whole process group); stdout goes to root/name.out, never a pipe
    that a chatty run could fill."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.out", "w") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "dcl.py",
                "train",
                "--dataroot",
                str(data),
                *map(str, TINY),
                "--display_freq",
                "1000",
                "--max_steps",
                "100000",
                "--checkpoints_dir",
                str(root),
                "--name",
                name,
                *map(str, extra),
            ],
            cwd=REPO,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(condition, procs, timeout=60.0, pause=0.01):
    """Poll condition() until it holds; fail if a child ends first or time runs out."""
    end = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), "a training process ended early"
        assert time.monotonic() < end, "timed out"
        time.sleep(pause)


def log_rows(run_dir: Path) -> int:
    path = run_dir / "log.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_sigint_and_sigterm_save_and_resume(data, tmp_path, capsys):
    """§15: Ctrl-C or SIGTERM finishes the current step, saves and exits with 128 +
    signal (130, 143), printing "stopped by signal N at step K" and a resume command
    with --continue_train; ckpt_latest.pt then loads with weights_only=True and
    holds step K, the last logged step. Running the printed command (in-process,
    plus --max_steps K+1 and --num_threads 0, both changeable on resume) trains
    exactly one more step. SIGINT goes to the whole process group, as a terminal's
    Ctrl-C does, with a data-loading worker (--num_threads 1) that receives it too;
    SIGTERM goes to the main process only, as `kill` sends it. Both runs start
    together, so their start-up (importing torch) overlaps."""
    cases = {signal.SIGINT: 1, signal.SIGTERM: 0}
    procs = {sig: start_training(tmp_path, sig.name, data, "--num_threads", workers)
             for sig, workers in cases.items()}
    try:
        for sig, proc in procs.items():
            wait_until(lambda: log_rows(tmp_path / sig.name) >= 3, [proc])
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)                      # the whole group, as Ctrl-C
            else:
                proc.send_signal(sig)
        for proc in procs.values():
            proc.wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for sig, proc in procs.items():
        run_dir, out = tmp_path / sig.name, (tmp_path / f"{sig.name}.out").read_text()
        assert proc.returncode == 128 + sig, out[-2000:]
        assert "Traceback" not in out
        step = int(re.search(rf"stopped by signal {int(sig)} at step (\d+)", out).group(1))
        assert read_log(run_dir)[-1]["step"] == step >= 3
        assert torch.load(run_dir / "ckpt_latest.pt", weights_only=True)["step"] == step
        command = shlex.split(out.strip().splitlines()[-1])
        assert command[:3] == ["python", "dcl.py", "train"] and "--continue_train" in command
        code, _, err = train_in_process(
            capsys, *command[3:], "--max_steps", step + 1, "--num_threads", 0
        )
        assert code == 0, err
        assert [r["step"] for r in read_log(run_dir)][-2:] == [step, step + 1]
        assert torch.load(run_dir / "ckpt_latest.pt", weights_only=True)["step"] == step + 1


def test_resume_without_dataroot_names_the_stored_data(runs, tmp_path, capsys):
    """§15: continuing a run without --dataroot (as the printed resume command does)
    trains on the stored dataroot: the data line counts its 4 A and 3 B images (the
    bundled set has 300 and 260), and nothing printed claims the bundled set or
    demo settings."""
    shutil.copytree(runs("cut")[1], tmp_path / "cut")
    code, out, err = train_in_process(capsys, "--name", "cut", "--checkpoints_dir", tmp_path,
                                      "--continue_train", "--max_steps", 3)
    assert code == 0, err
    assert "data: 4 A, 3 B images" in out
    assert "bundled" not in out and "(demo)" not in out


def test_kill_9_during_checkpoint_writes(data, tmp_path, capsys):
    """§16 (atomic_save: write ckpt_latest.pt.tmp, fsync, rename): with
    --save_latest_freq 1 a checkpoint is written after every step. Three runs are
    killed with SIGKILL at different moments once their first checkpoint exists
    (the one of step 0, written before the first step, §15 phase 6):
    the instant a write is seen in progress (a ckpt_latest.pt.tmp exists, or
    ckpt_latest.pt itself shrank, as a write in place would make it), and 0.15 s and
    0.4 s later. Each ckpt_latest.pt then loads with torch.load(weights_only=True)
    and holds step 0 or a step the log reached (a leftover .tmp is allowed), and the run
    killed inside a write continues with --continue_train for one more step."""
    def latest(name):
        return tmp_path / name / "ckpt_latest.pt"
    largest = [0]

    def writing(since):
        try:
            size = latest("in_write").stat().st_size
        except FileNotFoundError:
            size = 0
        largest[0] = max(largest[0], size)
        return latest("in_write").with_suffix(".pt.tmp").exists() or size < largest[0]
    triggers = {"in_write": writing,
                "later": lambda since: time.monotonic() - since > 0.15,
                "latest": lambda since: time.monotonic() - since > 0.4}
    procs = {name: start_training(tmp_path, name, data, "--save_latest_freq", 1, "--print_freq", 1)
             for name in triggers}
    first_seen, deadline = {}, time.monotonic() + 90
    try:
        while any(p.poll() is None for p in procs.values()):
            for name, proc in procs.items():
                if proc.poll() is None and name not in first_seen and latest(name).exists():
                    first_seen[name] = time.monotonic()
                if proc.poll() is None and name in first_seen and triggers[name](first_seen[name]):
                    proc.kill()
                    proc.wait(timeout=10)
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.001)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for name, proc in procs.items():
        assert proc.returncode == -signal.SIGKILL, (tmp_path / f"{name}.out").read_text()[-2000:]
        ckpt = torch.load(latest(name), weights_only=True)
        assert ckpt["format"] == dcl.CHECKPOINT_FORMAT
        logged = read_log(tmp_path / name) if (tmp_path / name / "log.jsonl").exists() else []
        assert ckpt["step"] in [0] + [row["step"] for row in logged]
    step = torch.load(latest("in_write"), weights_only=True)["step"]
    code, _, err = train_in_process(capsys, "--name", "in_write", "--checkpoints_dir", tmp_path,
                                    "--continue_train", "--max_steps", step + 1)
    assert code == 0, err
    assert torch.load(latest("in_write"), weights_only=True)["step"] == step + 1
    assert not latest("in_write").with_suffix(".pt.tmp").exists()


@pytest.mark.parametrize("nan_step", [3, 2])
def test_nan_loss_stops_before_any_checkpoint_of_it(nan_step, data, tmp_path, capsys, monkeypatch):
    """§15 (report checks the losses before every checkpoint write): gan_loss is made
    to return NaN from step nan_step on (a CUT step calls it 3 times: D real, D fake,
    G). With --print_freq 100 and --save_latest_freq 2 the losses are read only at
    the checkpoint steps 2 and 4. NaN at step 3: the step-2 checkpoint is written,
    then at step 4 the run stops with exit 2 and one line "loss D_real became nan in
    steps 3-4 (epoch 1); the last checkpoint was kept", and ckpt_latest.pt still holds
    step 2 with finite weights. NaN at step 2: it stops at step 2 ("steps 1-2") and
    the checkpoint is the one of step 0, written before the first step. The log
    never holds a NaN row."""
    calls, gan_loss = [0], dcl.gan_loss

    def poisoned(*args):
        calls[0] += 1
        return gan_loss(*args) * (math.nan if calls[0] > 3 * (nan_step - 1) else 1.0)
    monkeypatch.setattr(dcl, "gan_loss", poisoned)
    code, _, err = train_in_process(capsys, "--dataroot", data, *TINY, "--max_steps", 8,
                                    "--print_freq", 100, "--save_latest_freq", 2, "--display_freq",
                                    100, "--checkpoints_dir", tmp_path, "--name", "r")
    first = 3 if nan_step == 3 else 1
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"loss D_real became nan in steps {first}-{first + 1} (epoch 1)" in err
    assert "the last checkpoint was kept" in err and "--lr" in err
    rows = read_log(tmp_path / "r")
    assert all(math.isfinite(v) for r in rows for v in r.values())
    if nan_step == 3:
        ckpt = torch.load(tmp_path / "r" / "ckpt_latest.pt", weights_only=True)
        assert ckpt["step"] == 2 and [r["step"] for r in rows] == [2]
        assert all(v.isfinite().all() for net in ckpt["nets"].values() for v in net.values())
    else:
        ckpt = torch.load(tmp_path / "r" / "ckpt_latest.pt", weights_only=True)
        assert ckpt["step"] == 0 and rows == []


@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_checkpoint_contents_load_weights_only(mode, runs):
    """§16: every mode's ckpt_latest.pt loads with torch.load(weights_only=True) (tensors
    and plain values only) and holds exactly format, version, mode, config, nets,
    optimizers, step, epoch, epoch_step, world (processes), rng, and the last and
    best test scores (None without --eval_freq): after `--max_steps 2` on 4 items,
    step 2 of epoch 1; nets are the mode's networks, the optimisers its families,
    the config a complete TrainConfig, torch's RNG state (CUDA's too where there is one)."""
    ckpt = torch.load(runs(mode)[1] / "ckpt_latest.pt", weights_only=True)
    assert set(ckpt) == {
        "format",
        "version",
        "mode",
        "config",
        "nets",
        "optimizers",
        "step",
        "epoch",
        "epoch_step",
        "world",
        "rng",
        "last",
        "best",
    }
    assert ckpt["last"] is None and ckpt["best"] is None
    assert (
        ckpt["format"],
        ckpt["version"],
        ckpt["mode"],
        ckpt["step"],
        ckpt["epoch"],
        ckpt["epoch_step"],
    ) == ("dcl.py checkpoint", 1, mode, 2, 1, 2)
    assert set(ckpt["nets"]) == set(dcl.MODES[mode].networks)
    families = {
        "cyclegan": {"G", "D"},
        "negcut": {"G", "D", "H", "N"},
        "fastnegcut": {"G", "D", "H", "N"},
    }
    assert set(ckpt["optimizers"]) == families.get(mode, {"G", "D", "H"})
    assert dataclasses.asdict(dcl.TrainConfig(**ckpt["config"])) == ckpt["config"]
    assert "torch" in ckpt["rng"]


def bad_input_more(case, tmp_path, data, runs):
    """(argv, strings the error line must contain) for more failure cases; files
    made here exist before the snapshot that must not change."""
    source = runs("cut")[1] / "ckpt_latest.pt"
    image = ["--input", data / "testA" / "sub" / "2.png", "--output", tmp_path / "out"]
    translate = ["translate", *image, "--device", "cpu", "--checkpoint"]
    train = [
        "train",
        "--dataroot",
        data,
        *TINY,
        "--max_steps",
        1,
        "--checkpoints_dir",
        tmp_path / "ck",
    ]
    if case == "truncated_checkpoint":
        raw = source.read_bytes()
        (tmp_path / "half.pt").write_bytes(raw[:len(raw) // 2])
        return translate + [tmp_path / "half.pt"], ["half.pt", "not a readable checkpoint"]
    if case == "version_99":
        ckpt = torch.load(source, weights_only=True)
        torch.save({**ckpt, "version": 99}, tmp_path / "v99.pt")
        return translate + [tmp_path / "v99.pt"], ["v99.pt", "version 99", "version 1"]
    if case == "output_is_a_file":
        (tmp_path / "out").write_bytes(b"an existing file")
        return translate + [source], ["cannot write", str(tmp_path / "out")]
    if case == "translate_on_cuda":
        return ["translate", *image, "--device", "cuda", "--checkpoint", source], [
            "--device cuda",
            "CUDA",
        ]
    if case == "train_on_cuda":
        return train + ["--device", "cuda"], ["--device cuda", "CUDA is not available"]
    if case == "layers_not_ascending":
        return train + ["--nce_layers", "4,2"], ["--nce_layers 4,2", "ascending"]
    if case == "unknown_gan_mode":
        return train + ["--gan_mode", "foo"], ["--gan_mode", "'foo'"]
    shutil.copytree(runs("cut")[1], tmp_path / "ck" / "cut")  # ngf_changed_on_resume
    return ["train", "--name", "cut", "--checkpoints_dir", tmp_path / "ck", "--continue_train",
            "--ngf", 16], ["--ngf cannot change", "stored: 8"]


def file_tree(root: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("case", ["truncated_checkpoint", "version_99", "output_is_a_file",
                                  "translate_on_cuda", "train_on_cuda", "layers_not_ascending",
                                  "unknown_gan_mode", "ngf_changed_on_resume"])
def test_more_bad_input_changes_no_file(case, tmp_path, data, runs, capsys):
    """§15-§17, §21: a checkpoint cut in half, a checkpoint of version 99, a translate
    --output that is an existing file, --device cuda on a machine without CUDA (train
    and translate), --nce_layers 4,2, --gan_mode foo, and --ngf 16 when continuing a
    run trained with ngf 8: each exits 2 with one line "error: ..." naming the file
    or flag, no traceback, and leaves every file and folder as it was (no output
    folder, no run folder, the run's checkpoint and log byte for byte)."""
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, needles = bad_input_more(case, tmp_path, data, runs)
    before = file_tree(tmp_path)
    code, _, err = main_in_process(capsys, *argv)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert all(needle in err for needle in needles) and "Traceback" not in err, err
    assert file_tree(tmp_path) == before


def test_translate_out_of_memory_names_resize(runs, data, tmp_path, capsys, monkeypatch):
    """§17: an out-of-memory error inside G (torch.OutOfMemoryError, raised here by a
    patched Generator.forward) exits 2 with one line naming the image and --resize,
    and writes nothing."""
    def out_of_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(dcl.Generator, "forward", out_of_memory)
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", runs("cut")[1] /
                                   "ckpt_latest.pt", "--input", data / "testA" / "sub" / "2.png",
                                   "--output", tmp_path / "out", "--device", "cpu")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert "2.png" in err and "--resize" in err and "memory" in err
    assert not (tmp_path / "out").exists()


def test_printed_resume_command_survives_spaces(data, tmp_path, capsys):
    """§15: the closing line's command can be pasted into a shell: for a run named
    "first try" under "my runs/", shlex.split of the printed command gives back the
    name and the checkpoints folder exactly."""
    code, out, err = train_in_process(
        capsys,
        "--dataroot",
        data,
        *TINY,
        "--max_steps",
        1,
        "--display_freq",
        100,
        "--checkpoints_dir",
        tmp_path / "my runs",
        "--name",
        "first try",
    )
    assert code == 0, err
    argv = shlex.split(out.strip().splitlines()[-1].partition("To train longer: ")[2])
    assert argv[argv.index("--name") + 1] == "first try"
    assert argv[argv.index("--checkpoints_dir") + 1] == str(tmp_path / "my runs")


# -----------------------------------------------------------------------------
# every gradient right: instance norm at batch size 1 (F20)
# -----------------------------------------------------------------------------

def reference_instance_norm(self, x):
    """Instance norm written out: per image and channel, the mean and the biased
    variance over H and W, eps 1e-5, computed in fp32 at least and returned in x's
    dtype (torch's kernel also accumulates bf16 in fp32). Elementwise ops and
    reductions only, whose backward is right for any memory layout of the gradient."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = x32.mean(dim=(2, 3), keepdim=True)
    var = (x32 - mean).square().mean(dim=(2, 3), keepdim=True)
    return ((x32 - mean) / torch.sqrt(var + self.eps)).to(x.dtype)


def test_instance_norm_gradient_is_right_for_a_channels_last_gradient(monkeypatch):
    """§1, §4, §7 (F20), the bare repro: at batch size 1, a gradient with channels-last
    strides sent into instance norm. torch 2.13/2.14's CPU kernel gets this wrong
    (relative error about 1.4; right at batch 2 or with a contiguous gradient);
    dcl.py's InstanceNorm gives the float64 reference gradient to 1e-12 whether or
    not torch is fixed, and so do the two paths that send such gradients: the
    projection head's patch sampler and NEGCUT's mean embedding, each fed by it."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 4, 4, 8, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last strides
    layer = dcl.norm(8)
    head = dcl.ProjectionHead([8], 6).double()
    ids = [torch.randperm(16)[:5]]
    weights = torch.randn(5, 6, dtype=torch.float64)

    def gradients():
        bare, = torch.autograd.grad(layer(x), x, g)
        sampled, = torch.autograd.grad((head([layer(x)], 5, ids)[0][0] * weights).sum(), x)
        mean, = torch.autograd.grad((dcl.mean_embedding(head, [layer(x)])[0] * weights[0]).sum(), x)
        return bare, sampled, mean
    got = gradients()
    monkeypatch.setattr(dcl.InstanceNorm, "forward", reference_instance_norm)
    expected = gradients()
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()


def step_gradients(mode, batch, fast, autocast=True, instance_norm=None, monkeypatch=None,
                   **overrides):
    """One step of `mode` from fixed weights, images and RNG state, run as train()
    runs it (--fast on: channels_last weights and inputs, fused Adam, bf16 autocast
    unless autocast=False), with lr 0 so that every loss of the step sees the same
    weights whatever the gradients; returns each trained network's gradient, flat."""
    cfg = tiny_cfg(mode=mode, fast=fast, lr=0.0, **overrides)
    on = dcl.fast_path(cfg, "cpu")
    torch.manual_seed(0)
    nets = dcl.build_networks(cfg, "cpu")
    opts = dcl.build_optimizers(nets, cfg, fused=on)
    layout = torch.channels_last if on else torch.contiguous_format
    real_a, real_b = (torch.rand(batch, 3, 32, 32).mul(2).sub(1).contiguous(memory_format=layout)
                      for _ in "ab")
    with monkeypatch.context() as patch:
        if instance_norm is not None:
            patch.setattr(dcl.InstanceNorm, "forward", instance_norm)
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16, enabled=on and autocast):
            dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)
    return {
        name: torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])
        for name, net in nets.items()
        if any(p.grad is not None for p in net.parameters())
    }


@pytest.mark.parametrize("fast", ["off", "on"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_step_gradients_equal_those_of_a_reference_instance_norm(mode, batch, fast, monkeypatch):
    """§1, §5-§9 (F20): in every mode, at batch 1 and 2, with --fast off and on, one
    step gives every trained network the gradient of the same step with every
    instance norm replaced by the written-out reference above.
    - fp32 arithmetic (--fast off; and --fast on's layout, channels_last weights
      and inputs with fused Adam, autocast off): relative L2 error at most 2e-3
      per network. Measured: at most 7e-4 (rounding through some 30 layers). The
      bug this catches: at batch 1 the old sampler gave G a relative error of
      0.9-1.9 in every contrastive mode (cosine 0.57 in CUT, −0.46 in SimDCL),
      and channels_last convolutions do the same to CycleGAN's generators.
    - bf16 autocast (--fast on): cosine at least 0.7 and relative error at most
      0.7. Measured: cosine 0.81-0.94 for the generators, ≥ 0.95 for the rest; at
      initialisation the generators' gradients are this sensitive to rounding
      (perturbing the input by 0.4%, bf16's step, already costs cosine 0.98 in
      fp32). So this check catches gross errors; the fp32 one is the sharp one."""
    pairs = [(False, "fp32")] + ([(True, "bf16")] if fast == "on" else [])
    for autocast, arithmetic in pairs:
        got = step_gradients(mode, batch, fast, autocast, None, monkeypatch)
        want = step_gradients(mode, batch, fast, autocast, reference_instance_norm, monkeypatch)
        assert set(got) == set(want) and len(got) >= 3
        for name in want:
            error = ((got[name] - want[name]).norm() / want[name].norm()).item()
            cosine = torch.nn.functional.cosine_similarity(got[name], want[name], 0).item()
            if arithmetic == "fp32":
                assert error <= 2e-3, (name, error)
            else:
                assert cosine >= 0.7 and error <= 0.7, (name, cosine, error)


# -----------------------------------------------------------------------------
# PatchNCE's successors: Hneg-SRC and QS-Attn (§8)
# -----------------------------------------------------------------------------

def slow_hdce(q, k, n, tau, gamma):
    """Hneg-SRC's loss one query at a time, in float64, written from the official
    code (models/hDCE.py, models/SRC.py): for image b and query i, with
    z = unit(k), c_j = z_i·z_j (c_i = −10), the weights
    ω_j = softmax_j(c_j/γ) / max_j softmax_j(c_j/γ); t_j = ω_j·q_i·k_j (t_i = −10);
    ℓ_i = −s_ii/τ + log Σ_j exp(t_j/τ), and the logged value
    CE_i = −log(e^(s_ii/τ) / (e^(s_ii/τ) + Σ_j e^(t_j/τ)))."""
    q, k = q.double(), k.double()
    S, decoupled, logged, minus_ten = q.shape[0] // n, [], [], torch.tensor(-10.0).double()
    for b in range(n):
        rows = range(b * S, (b + 1) * S)
        z = [k[j] / (k[j].norm() + 1e-7) for j in rows]
        for i, row in enumerate(rows):
            c = torch.stack([minus_ten if j == i else z[i] @ z[j] for j in range(S)])
            w = torch.softmax(c / gamma, 0)
            w = w / w.max()
            t = torch.stack([minus_ten if j == i else w[j] * (q[row] @ k[col])
                             for j, col in enumerate(rows)])
            pos = q[row] @ k[row]
            decoupled.append(-pos / tau + torch.logsumexp(t / tau, 0))
            logged.append(-torch.log_softmax(torch.cat([pos[None], t]) / tau, 0)[0])
    return torch.stack(decoupled), torch.stack(logged)


def test_hdce_equals_a_loop_over_queries():
    """§8: hdce_loss's value equals the loop's logged cross-entropy (weighted
    negatives, as the official code logs it), and its gradient with respect to
    the queries equals the gradient of the loop's decoupled ℓ_i (the positive not
    in the sum), to 1e-5 relative (values: plus 2e-7 absolute, the fp32 rounding
    of log(1 + x) for the rows near 5e-4); the value is not ℓ_i itself; the keys
    get no gradient. 2 images × 6 patches, τ = 0.07, γ = 0.5."""
    torch.manual_seed(0)
    q0, k0 = unit_rows(torch.randn(12, 8)), unit_rows(torch.randn(12, 8))
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss = dcl.hdce_loss(q, k, 2, 0.07, 0.5)
    loss.sum().backward()
    q_ref = q0.double().requires_grad_()
    decoupled, logged = slow_hdce(q_ref, k0, 2, 0.07, 0.5)
    decoupled.sum().backward()
    assert loss.shape == (12,) and torch.allclose(loss.double(), logged, rtol=1e-5, atol=2e-7)
    assert torch.allclose(q.grad.double(), q_ref.grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss.double(), decoupled, rtol=1e-2)
    assert k.grad is None or not k.grad.any()


def test_hdce_known_answers():
    """§8, by hand. q = k = three orthonormal vectors (one image): every z_i·z_j
    and q_i·k_j is 0 off the diagonal, so the off-diagonal weights are equal and
    each is its row's maximum: ω = 1. Then ℓ_i = −1/τ + log(2 + e^(−10/τ)), and the
    logged value is PatchNCE's known answer log(1 + (2 + e^(−10/τ))·e^(−1/τ)):
    at τ = 1, ℓ_i = −0.306830 (its gradient is what hdce_loss returns; checked
    through the returned value's grad: d/dq_i of ℓ_i) and the value 0.551454.
    As γ → ∞ every weight tends to 1, so the logged value tends to PatchNCE's:
    at γ = 1e6 on random unit vectors they agree to 1e-5."""
    q = torch.eye(3)
    tau = 1.0
    value = dcl.hdce_loss(q, q.clone(), 1, tau, 0.3)
    expected = math.log1p((2 + math.exp(-10 / tau)) * math.exp(-1 / tau))
    assert value.tolist() == pytest.approx([expected] * 3, rel=1e-5) and expected == \
        pytest.approx(0.551454, abs=1e-6)
    decoupled, _ = slow_hdce(q, q.clone(), 1, tau, 0.3)
    assert decoupled.tolist() == pytest.approx([-1 + math.log(2 + math.exp(-10))] * 3, rel=1e-9)
    assert -1 + math.log(2 + math.exp(-10)) == pytest.approx(-0.306830, abs=1e-6)
    torch.manual_seed(0)
    a, b = unit_rows(torch.randn(10, 8)), unit_rows(torch.randn(10, 8))
    assert torch.allclose(dcl.hdce_loss(a, b, 2, 0.07, 1e6), dcl.patch_nce_loss(a, b, 2, 0.07),
                          rtol=1e-5)


def slow_relation(q, k, n):
    """L_SRC written out per image and per row in float64: P_k(i) = e^(z_k·z_i) /
    Σ_j e^(z_k·z_j) over the unit keys z, Q_k likewise over the unit queries w,
    JSD(Q_k ‖ P_k) = ½·Σ_i [Q_k(i)·log(Q_k(i)/M(i)) + P_k(i)·log(P_k(i)/M(i))] with
    M = ½(P_k + Q_k), summed over k and the images."""
    q, k = q.double(), k.double()
    S, total = q.shape[0] // n, 0.0
    for b in range(n):
        z = [k[j] / (k[j].norm() + 1e-7) for j in range(b * S, (b + 1) * S)]
        w = [q[j] / (q[j].norm() + 1e-7) for j in range(b * S, (b + 1) * S)]
        for row in range(S):
            P = torch.softmax(torch.stack([z[row] @ zi for zi in z]), 0)
            Q = torch.softmax(torch.stack([w[row] @ wi for wi in w]), 0)
            M = 0.5 * (P + Q)
            total = total + 0.5 * ((Q * (Q / M).log()).sum() + (P * (P / M).log()).sum())
    return total


def test_relation_loss_equals_a_loop_and_a_known_answer():
    """§8: relation_loss equals the row-by-row JSD of slow_relation (2 images × 6
    patches) to 1e-5; it is 0 when the output's patches relate as the input's do
    (q = k); its gradient reaches the queries, not the keys (z detached). By hand:
    keys = 3 orthonormal vectors, so P_k = (e, 1, 1)/(e + 2) in some order, and
    three identical queries, so Q_k = (1, 1, 1)/3: with a = e/(e + 2), c =
    1/(e + 2), m_1 = (a + 1/3)/2, m_2 = (c + 1/3)/2, each row's JSD is
    ½·[⅓·log(⅓/m_1) + a·log(a/m_1) + 2·(⅓·log(⅓/m_2) + c·log(c/m_2))] and L_SRC is 3 of
    them: 0.090083 (a = 0.5761, c = 0.2119, one row 0.030028)."""
    torch.manual_seed(0)
    q0, k0 = unit_rows(torch.randn(12, 8)), unit_rows(torch.randn(12, 8))
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss = dcl.relation_loss(q, k, 2)
    assert loss.item() == pytest.approx(slow_relation(q0, k0, 2).item(), rel=1e-5)
    loss.backward()
    assert q.grad.any() and (k.grad is None or not k.grad.any())
    assert dcl.relation_loss(k0, k0.clone(), 2).item() == pytest.approx(0.0, abs=1e-6)
    a, c = math.e / (math.e + 2), 1 / (math.e + 2)
    m1, m2 = (a + 1 / 3) / 2, (c + 1 / 3) / 2
    row = 0.5 * (1 / 3 * math.log(1 / 3 / m1) + a * math.log(a / m1)
                 + 2 * (1 / 3 * math.log(1 / 3 / m2) + c * math.log(c / m2)))
    same = torch.tensor([[1.0, 0.0, 0.0]]).repeat(3, 1)
    assert dcl.relation_loss(same, torch.eye(3), 1).item() == pytest.approx(3 * row, rel=1e-5)
    assert 3 * row == pytest.approx(0.090083, abs=1e-6)


def slow_query_selection(flat, S):
    """QS-Attn's selection one row at a time: for image b, row i of
    A = softmax_row(F·Fᵀ) (F = the positions' C-vectors), its entropy
    H_i = −Σ_j A_ij·log A_ij, and the S rows of lowest entropy, in that order."""
    out = []
    for f in flat.double().transpose(1, 2):                   # (h·w)×C per image
        rows = [torch.softmax(torch.stack([f[i] @ f[j] for j in range(len(f))]), 0)
                for i in range(len(f))]
        entropy = [-(r * r.log()).sum().item() for r in rows]
        order = sorted(range(len(f)), key=lambda i: entropy[i])[:S]
        out.append(torch.stack([rows[i] for i in order]))
    return torch.stack(out)


def test_query_selection_equals_a_loop_and_picks_the_distinctive_position():
    """§8: query_selected_rows equals the row-by-row loop (2 images, 8 channels,
    3×4 positions, S = 5) to 1e-5; its rows sum to 1. By hand: positions
    f_0 = (5, 0) and f_1 = f_2 = f_3 = (0, 1): row 0 has scores (25, 0, 0, 0),
    almost one-hot (entropy ~1e-9), rows 1-3 have (0, 1, 1, 1), entropy
    log(1 + 3e) − 3e/(1 + 3e) ≈ 1.34, so S = 1 selects row 0 and the sample
    v = A_QS·F is f_0. Through ProjectionHead(select="qsattn") only the deepest
    taps (the smallest maps) are selected this way; the others get random ids."""
    torch.manual_seed(0)
    flat = torch.randn(2, 8, 12)
    got = dcl.query_selected_rows(flat, 5)
    assert got.shape == (2, 5, 12)
    assert torch.allclose(got.double(), slow_query_selection(flat, 5), atol=1e-5)
    assert torch.allclose(got.sum(2), torch.ones(2, 5), atol=1e-5)
    hand = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])[None]  # 1×C×4
    rows = dcl.query_selected_rows(hand, 1)
    assert rows[0, 0].argmax() == 0 and rows[0, 0, 0] > 0.999999
    assert torch.allclose(torch.bmm(hand, rows.transpose(1, 2))[0, :, 0], hand[0, :, 0], atol=1e-5)
    H = dcl.ProjectionHead([4, 4, 4], 6)
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)]
    _, plans = H(feats, 5, select="qsattn")
    assert not plans[0].is_floating_point() and plans[1].shape == plans[2].shape == (1, 5, 16)


def test_query_selection_reaches_the_source_encoder():
    """§8 (F22): the attention rows are not detached (official), so with
    --patch_select qsattn the queries' loss reaches the encoder of the source
    image through them: with a separate key encoder G_key (a copy of G),
    NCE(real_a → fake_b) gives G_key's first conv a gradient; with random ids it
    gives none (the keys are detached)."""
    torch.manual_seed(0)
    grads = {}
    for select in ("random", "qsattn"):
        cfg = tiny_cfg(patch_select=select)
        nets = dcl.build_networks(cfg, "cpu")
        G_key = copy.deepcopy(nets["G"])
        real_a, fake_b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
        dcl.nce_between(real_a, fake_b, G_key, nets["H"], cfg, G_query=nets["G"]).loss.backward()
        grads[select] = G_key.model[1].weight.grad
    assert grads["random"] is None and grads["qsattn"] is not None and grads["qsattn"].any()


def test_hnegsrc_preset_schedule_and_step():
    """§8, §11: --mode hnegsrc is the official README's horse2zebra recipe: CUT with
    the identity term, nce_loss hdce, λ_HDCE 0.1 (our lambda_NCE; --lambda_HDCE is
    its alias), λ_SRC 0.05, the curriculum γ 50 → 10, 200 + 200 epochs. γ by hand:
    50 + (10 − 50)·e/400 gives 49.9 at epoch 1 and 10 at epoch 400; with
    --step_gamma_epoch 200 it is 1 from epoch 201; without the curriculum it stays
    --HDCE_gamma. One step logs HDCE, HDCE_Y and SRC, and G = G_GAN + 0.5·(HDCE +
    HDCE_Y) + SRC (the hDCE values are the logged cross-entropies, whose
    gradients are the decoupled losses'; their sum is what L_G adds up)."""
    cfg = dcl.resolve_config({"mode": "hnegsrc", "dataroot": "x"})[0]
    assert (cfg.nce_idt, cfg.nce_loss, cfg.lambda_NCE, cfg.lambda_SRC, cfg.use_curriculum,
            cfg.HDCE_gamma, cfg.HDCE_gamma_min, cfg.n_epochs, cfg.n_epochs_decay) == \
        (True, "hdce", 0.1, 0.05, True, 50.0, 10.0, 200, 200)
    assert dcl.hdce_gamma(cfg, 1) == pytest.approx(49.9) and dcl.hdce_gamma(cfg, 400) == 10.0
    stepped = dataclasses.replace(cfg, step_gamma_epoch=200)
    assert dcl.hdce_gamma(stepped, 200) == pytest.approx(30.0) and dcl.hdce_gamma(stepped, 201) == 1
    assert dcl.hdce_gamma(dataclasses.replace(cfg, use_curriculum=False), 300) == 50.0
    flags = {"mode": "cut", "dataroot": "x"}
    assert dcl.resolve_config({**flags, "lambda_NCE": 0.3})[0].lambda_NCE == 0.3
    torch.manual_seed(0)
    tiny = tiny_cfg(mode="hnegsrc")
    nets = dcl.build_networks(tiny, "cpu")
    losses = dcl.cut_step(nets, dcl.build_optimizers(nets, tiny), torch.rand(1, 3, 32, 32) * 2 - 1,
                          torch.rand(1, 3, 32, 32) * 2 - 1, tiny, epoch=3)
    assert set(losses) == LOSS_NAMES["hnegsrc"] and losses["SRC"] > 0
    total = losses["G_GAN"] + 0.5 * (losses["HDCE"] + losses["HDCE_Y"]) + losses["SRC"]
    assert losses["G"].item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("mode, extra, names", [
    ("cut", ["--patch_select", "qsattn"], {"NCE", "NCE_Y"}),
    ("dcl", ["--nce_loss", "hdce", "--lambda_SRC", 0.05], {"NCE1", "NCE2", "SRC"}),
    ("simdcl", ["--patch_select", "qsattn", "--lambda_SRC", 0.1], {"Sim", "SRC"}),
    ("negcut", ["--lambda_SRC", 0.1, "--patch_select", "qsattn"], {"N", "SRC"})])
def test_train_with_the_successors_switches(mode, extra, names, data, tmp_path, capsys):
    """§8, §15: each switch trains 2 steps in a mode it applies to (exit 0, finite
    losses, the SRC term logged where it is on) and translates: a PNG per input."""
    code, _, err = train_in_process(capsys, "--mode", mode, "--dataroot", data, *TINY, *extra,
                                    "--max_steps", 2, "--display_freq", 100,
                                    "--checkpoints_dir", tmp_path, "--name", "r")
    assert code == 0, err
    rows = read_log(tmp_path / "r")
    assert len(rows) == 2 and all(names <= set(r) for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r.values())
    translate_in_process(capsys, tmp_path / "r" / "ckpt_latest.pt", data / "testB", tmp_path / "o")
    assert len(list((tmp_path / "o").glob("*.png"))) == 2


@pytest.mark.parametrize("flags, needle", [
    ({"mode": "cyclegan", "patch_select": "qsattn"}, "--patch_select qsattn"),
    ({"mode": "cut", "lambda_NCE": 0.0, "lambda_SRC": 1.0}, "--lambda_SRC"),
    ({"mode": "negcut", "nce_loss": "hdce"}, "--nce_loss hdce"),
    ({"mode": "cut", "nce_loss": "hdce", "nce_hard_beta": 1.0}, "--nce_hard_beta")])
def test_successors_refuse_modes_they_do_not_fit(flags, needle):
    """§12: the switches are refused, in one line naming them, where there is no
    contrastive loss to change (CycleGAN, λ_NCE 0), and hDCE where the negatives
    are NEGCUT's or already weighted by --nce_hard_beta."""
    with pytest.raises(dcl.UserError, match=re.escape(needle)):
        dcl.resolve_config({"dataroot": "x", **flags})


@pytest.mark.parametrize("mode", ["cut", "dcl"])
def test_query_selection_gradients_equal_a_reference_instance_norm(mode, monkeypatch):
    """§1, §8 (F20): with --patch_select qsattn (whose attention rows send their
    own gradients into the taps) one step at batch 1 gives every trained network
    the gradient of the same step with the written-out instance norm, to 2e-3."""
    got = step_gradients(mode, 1, "off", False, None, monkeypatch, patch_select="qsattn")
    want = step_gradients(mode, 1, "off", False, reference_instance_norm, monkeypatch,
                          patch_select="qsattn")
    for name in want:
        assert ((got[name] - want[name]).norm() / want[name].norm()).item() <= 2e-3, name


# -----------------------------------------------------------------------------
# speed, bench and multi-process training (§2, §13-§15, §19, §20)
# -----------------------------------------------------------------------------

def torchrun(*args, cwd=REPO, timeout=180):
    """torchrun --standalone --nproc_per_node 2 ARGS (as python -m, the same entry
    point; --standalone rendezvouses on a free local port); gloo on the CPU."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["cut", "negcut", "simdcl", "cyclegan"])
def test_fast_path_matches_the_exact_step(mode):
    """§14 (F18): one step with --fast on (bf16 autocast around the step, channels_last
    inputs, fused Adam), called as train() and bench() call it, gives every loss of
    the --fast off step from the same weights, images and RNG state within 2e-2
    relative: fp32 losses (bf16 rounding only: the fast step differs somewhere, so
    bf16 did run). D_fake = mean(D(fake)²) is ~1e-8 at init (D's last conv has
    weights of std 0.02), so it gets an absolute floor of 1e-3 instead. Under
    --fast every 4-d weight is channels_last, also after Adam's step (under --fast
    off none is), and every optimiser is fused."""
    results = {}
    for fast in ("off", "on"):
        cfg = tiny_cfg(mode=mode, fast=fast)
        on = dcl.fast_path(cfg, "cpu")
        torch.manual_seed(0)
        nets = dcl.build_networks(cfg, "cpu")
        opts = dcl.build_optimizers(nets, cfg, fused=on)
        layout = torch.channels_last if on else torch.contiguous_format
        real_a, real_b = (torch.rand(1, 3, 32, 32).mul(2).sub(1).contiguous(memory_format=layout)
                          for _ in "ab")
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16, enabled=on):
            results[fast] = dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)
        nhwc = [p.is_contiguous(memory_format=torch.channels_last)
                for net in nets.values() for p in net.parameters() if p.dim() == 4]
        assert all(nhwc) if on else not any(nhwc)
        assert all(bool(opt.param_groups[0]["fused"]) == on for opt in opts.values()), fast
    exact, fast = results["off"], results["on"]
    assert set(exact) == set(fast) == LOSS_NAMES[mode]
    assert all(v.dtype == torch.float32 for v in fast.values())
    for name in exact:
        assert fast[name].item() == pytest.approx(exact[name].item(), rel=2e-2, abs=1e-3), name
    assert any(fast[name].item() != exact[name].item() for name in exact)


def test_fast_path_auto_on_and_off():
    """§14: --fast auto is on for a CUDA device only (read off the device type, so
    no GPU is needed to ask), on and off override it on either device."""
    devices = ("cpu", "cuda", torch.device("cuda", 0))
    table = {
        fast: [dcl.fast_path(tiny_cfg(fast=fast), d) for d in devices]
        for fast in ("auto", "on", "off")
    }
    assert table == {"auto": [False, True, True], "on": [True] * 3, "off": [False] * 3}


@pytest.mark.parametrize("ids", [(0, 4, 8, 12, 16), (0, 4, 9)])
def test_generator_taps_are_the_encoder_activations(ids):
    """§2 (F9): G(cat([a, b]), ids) returns G(cat([a, b])) and the activations after
    the listed layers; their first n rows are G.encode(a, ids), the rest
    G.encode(b, ids). Not always bit for bit on the CPU: a conv over 3 images may
    block its sums differently from one over 1, and instance norm then divides
    the pre-norm activations (std ~1e-3 at init) by their std, so by tap 16 the
    difference grows to ~1.5e-6 of the map's largest value; allowed: 1e-5 of it.
    Layer 9 (an instance norm) is followed by an in-place ReLU: encode stops
    before it, so the forward pass must keep that last tap from being overwritten."""
    torch.manual_seed(0)
    G = dcl.build_networks(tiny_cfg(), "cpu")["G"]
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        y, taps = G(torch.cat([a, b]), ids)
        assert torch.equal(y, G(torch.cat([a, b]))) and len(taps) == len(ids)
        expected = [torch.cat(pair) for pair in zip(G.encode(a, ids), G.encode(b, ids))]
    for tap, want in zip(taps, expected):
        assert tap.shape == want.shape
        assert torch.allclose(tap, want, rtol=0, atol=1e-5 * want.abs().max().item())


def step_with_keys(mode, keys):
    """One `mode` step (seed 0, batches of 2) with each nce_between call's feat_k
    replaced by keys(feat_k): (losses, every net's gradients at G's Adam step,
    calls of G.encode and of nce_between)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode)
    nets = dcl.build_networks(cfg, "cpu")
    opts = dcl.build_optimizers(nets, cfg)
    seen, calls, nce, encode = {}, {"encode": 0, "nce": 0}, dcl.nce_between, dcl.Generator.encode
    signature = inspect.signature(nce)

    def patched_nce(*args, **kwargs):                         # the steps pass feat_k by keyword
        bound = signature.bind(*args, **kwargs)
        bound.arguments["feat_k"] = keys(bound.arguments.get("feat_k"))
        calls["nce"] += 1
        return nce(*bound.args, **bound.kwargs)

    def counted_encode(self, *args):
        calls["encode"] += 1
        return encode(self, *args)
    spy_on_step(opts, "G", lambda: seen.update(gradients(nets)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dcl, "nce_between", patched_nce)
        patch.setattr(dcl.Generator, "encode", counted_encode)
        losses = dcl.MODES[mode].step(nets, opts, torch.rand(2, 3, 32, 32) * 2 - 1,
                                 torch.rand(2, 3, 32, 32) * 2 - 1, cfg)
    return losses, seen, calls


@pytest.mark.parametrize("mode", ["cut", "negcut", "simdcl"])
def test_reused_keys_equal_a_second_encoder_pass(mode):
    """§2, §5-§7 (F9): the NCE keys reused from the translation pass (cut_forward's
    G(x, taps), dual_step's translate_both) give the losses (within 1e-4) and the
    gradients at G's Adam step of the same step with feat_k dropped, i.e. with keys
    from a second G_key.encode(source) pass (NEGCUT: also in N's step; SimDCL: the
    keys also feed the similarity loss). Batched and single-image convolutions round
    differently (see the taps test), and the biases of the convs before an instance
    norm have a true gradient of 0 and carry only that noise, so each gradient is
    compared against its net's largest one: within 1e-5 of it. With reuse, G.encode
    runs once per nce_between call (the queries), without it twice. Both comparisons
    can fail: keys mirrored left-right (a wrong flip_back) change every NCE term by
    over 1%, and detached keys change G's gradients by over 1e-3 of their largest
    (NEGCUT: through H_ema and N; SimDCL: through the similarity loss), but not
    CUT's, whose keys carry no gradient."""
    reused, grads, calls = step_with_keys(mode, lambda feat_k: feat_k)
    encoded, grads_2, calls_2 = step_with_keys(mode, lambda feat_k: None)
    mirrored, _, _ = step_with_keys(mode, lambda feat_k: [f.flip(3) for f in feat_k])
    _, grads_detached, _ = step_with_keys(mode, lambda feat_k: [f.detach() for f in feat_k])
    assert calls["nce"] == calls_2["nce"] >= 2
    assert calls["encode"] == calls["nce"] and calls_2["encode"] == 2 * calls_2["nce"]
    for name in reused:
        assert reused[name].item() == pytest.approx(encoded[name].item(), rel=1e-4, abs=1e-6), name
    nce = [k for k in reused if "NCE" in k]
    assert all(mirrored[k].item() != pytest.approx(reused[k].item(), rel=1e-2) for k in nce), nce

    def worst(other):  # max |Δgrad| / max |grad| over G's nets
        return max(max((a - b).abs().max() for a, b in zip(grads[net], other[net]))
                   / max(g.abs().max() for g in grads[net]) for net in grads if net[0] == "G")

    assert all(
        (a is None) == (b is None) for net in grads for a, b in zip(grads[net], grads_2[net])
    )
    scale = {net: max((g.abs().max().item() for g in grads_2[net] if g is not None), default=0.0)
             for net in grads_2}
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5 * scale[net])
               for net in grads for a, b in zip(grads[net], grads_2[net]) if a is not None)
    assert (worst(grads_detached) > 1e-3) == (mode != "cut")


def reference_epoch_keys(n_items, seed, epoch, batch_size):
    """The single-process sampler before torchrun support, written out: item seeds
    are a 62-bit blake2b hash of (seed, epoch, position), items a seeded permutation,
    cut to whole batches."""
    h = (
        lambda *key: int.from_bytes(
            hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little"  # noqa: E731
        )
        >> 2
    )
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(h(seed, epoch)))
    return [
        (h(seed, epoch, p), int(order[p]), False) for p in range(n_items - n_items % batch_size)
    ]


def test_epoch_sampler_shards_one_permutation():
    """§13 (F19): with 2 processes and batch 2 on 11 items (2 whole batches each),
    process r gets positions r, r + 2, ... of the world-1 permutation, item seeds
    included: the two are disjoint, equally long and together the first 8 keys of
    world 1; world 1 (the default) is unchanged from the single-process sampler;
    start_batch 1 under world 2 continues mid-epoch where each process left off."""
    cfg = tiny_cfg(batch_size=2, seed=3)
    one = list(dcl.EpochSampler(11, cfg, 2))
    assert one == list(dcl.EpochSampler(11, cfg, 2, 0, 0, 1)) == reference_epoch_keys(11, 3, 2, 2)
    shards = [list(dcl.EpochSampler(11, cfg, 2, 0, rank, 2)) for rank in (0, 1)]
    assert (
        [len(s) for s in shards]
        == [len(dcl.EpochSampler(11, cfg, 2, 0, r, 2)) for r in (0, 1)]
        == [4, 4]
    )
    assert shards[0] == one[0:8:2] and shards[1] == one[1:8:2]
    assert not {k[0] for k in shards[0]} & {k[0] for k in shards[1]}
    for rank in (0, 1):
        resumed = dcl.EpochSampler(11, cfg, 2, 1, rank, 2)
        assert len(resumed) == 2 and list(resumed) == shards[rank][2:]


DISTRIBUTED_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
import dcl
torch.set_num_threads(1)
rank, world, device = dcl.setup_distributed(torch.device("cpu"))
flat = lambda tensors: torch.cat([t.detach().flatten() for t in tensors])


def gathered(v):
    out = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(out, v)
    return out


result = dict(world=world, backend=dist.get_backend(), device=str(device))
for mode in ("cut", "dcl"):
    cfg = dcl.resolve_config(dict(mode=mode, dataroot="x", load_size=36, crop_size=32, ngf=8, ndf=8,
                                  netF_nc=16, num_patches=16, device="cpu"))[0]
    for averaged in (True, False):
        torch.manual_seed(0)                                  # the same initial weights everywhere
        nets = dcl.build_networks(cfg, device)
        opts = dcl.build_optimizers(nets, cfg)
        params, d_grads = [p for net in nets.values() for p in net.parameters()], []
        before = flat(params)
        if averaged:                                          # as train() does under torchrun
            for opt in opts.values():
                opt.register_step_pre_hook(dcl.average_gradients)
        # Registered after average_gradients: it records the gradients Adam uses.
        opts["D"].register_step_pre_hook(
            lambda opt, *_: d_grads.append(flat(p.grad for p in opt.param_groups[0]["params"])))
        torch.manual_seed(100 + rank)                         # own images, patch ids
        real_a, real_b = (torch.rand(1, 3, 32, 32) * 2 - 1 for _ in "ab")
        dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)
        after, d = gathered(flat(params)), gathered(d_grads[0])
        result[f"{mode} {'averaged' if averaged else 'alone'}"] = dict(
            same_init=all(torch.equal(b, before) for b in gathered(before)),
            same_after=torch.equal(*after), moved=not torch.equal(after[rank], before),
            same_d_grads=torch.equal(*d))
        if averaged:
            d_averaged = d_grads[0]
        else:
            result[f"{mode} D grad is the mean"] = torch.equal(d_averaged, (d[0] + d[1]) / 2)
with open(f"{sys.argv[2]}.{rank}", "w") as f:
    json.dump(result, f)
dist.barrier()          # gloo can abort a process that tears down while its peer still works
dist.destroy_process_group()
"""


def ranks(script, *args, cwd):
    """Run `python SCRIPT ARGS` as ranks 0 and 1 with the environment torchrun gives
    its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: a free
    port), without its agent's 3 s start-up: [(exit status, stderr)] by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=cwd, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
        return [(p.returncode, error) for p, error in zip(procs, errors)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_average_gradients_keeps_the_processes_identical(tmp_path):
    """§20 (F19): in two processes started as torchrun starts them, setup_distributed
    joins a gloo group on the CPU; nets built from one seed start identical; with
    average_gradients as every optimiser's step pre-hook (as train() registers it),
    one cut_step and one dual_step on each process's own random images leave both
    processes with identical weights, changed by the step, and D's Adam sees
    exactly the mean of the processes' own D gradients. Without the hook the same
    steps leave the processes' weights (and D gradients) different."""
    script = tmp_path / "ranks.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    for rank, (code, err) in enumerate(ranks(script, REPO, tmp_path / "result", cwd=tmp_path)):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert (result["world"], result["backend"], result["device"]) == (2, "gloo", "cpu")
        for mode in ("cut", "dcl"):
            averaged, alone = result[f"{mode} averaged"], result[f"{mode} alone"]
            assert averaged == dict(
                same_init=True, same_after=True, moved=True, same_d_grads=True
            ), mode
            assert alone == dict(
                same_init=True, same_after=False, moved=True, same_d_grads=False
            ), mode
            assert result[f"{mode} D grad is the mean"], mode


def test_torchrun_train_writes_once_and_resumes_in_one_process(data, tmp_path, capsys):
    """§20 (F19): `torchrun --nproc_per_node 2 dcl.py train --mode cut --max_steps 2`
    on 4 items runs 2 steps per epoch of batch 1 per process × 2 processes, exit 0;
    only rank 0 prints and writes: one data, schedule and closing line, one progress
    line per step, one env.txt entry, log rows for steps 1 and 2 once each, and the
    run folder holds nothing but the checkpoint, config, env.txt, log and 3
    samples. The checkpoint (step 2,
    the epoch done) continues in a single process for one more step."""
    proc = torchrun("dcl.py", "train", "--mode", "cut", "--max_steps", 2, "--dataroot", data, *TINY,
                    "--checkpoints_dir", tmp_path, "--name", "r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r"
    lines = proc.stdout.splitlines()
    data_lines = [line for line in lines if line.startswith("data: ")]
    assert len(data_lines) == 1 and "2 steps per epoch" in data_lines[0], proc.stdout[-3000:]
    assert "batch 1 per process × 2 processes = 2" in data_lines[0]
    assert [
        line[:5] for line in lines if line.startswith(("data:", "schedule:", "[cut]", "done:"))
    ] == ["data:", "sched", "[cut]", "[cut]", "done:"]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == \
        ["ckpt_latest.pt", "config.json", "env.txt", "log.jsonl", "samples", "samples/latest.png",
         "samples/step_0000001.png", "samples/step_0000002.png"]
    assert (run / "env.txt").read_text().count("argv: ") == 1
    assert [r["step"] for r in read_log(run)] == [1, 2]
    ckpt = torch.load(run / "ckpt_latest.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (2, 2, 0)
    code, out, err = train_in_process(capsys, "--name", "r", "--checkpoints_dir", tmp_path,
                                      "--continue_train", "--max_steps", 3)
    assert code == 0, err
    assert "4 steps per epoch, batch 1;" in out and "processes" not in out
    assert [r["step"] for r in read_log(run)] == [1, 2, 3]
    assert torch.load(run / "ckpt_latest.pt", weights_only=True)["step"] == 3


BENCH_KEYS = {
    "mode",
    "device",
    "batch_size",
    "crop_size",
    "s_per_iter",
    "images_per_s",
    "tflop_per_iter",
    "tflops",
    "matmul_tflops",
    "peak_memory_gb",
    "fast",
}


def test_bench_prints_one_json_line_per_mode(capsys, monkeypatch):
    """§19: `bench` times the mode's real step (dcl.MODES[mode].step, counted here): the first
    call is the FLOP count, then --warmup, then --steps timed calls, and prints one
    JSON line per mode on stdout (the human line goes to stderr) with at least the
    keys mode, device, batch_size, crop_size, s_per_iter, images_per_s,
    tflop_per_iter, tflops, matmul_tflops, peak_memory_gb (null on the CPU) and fast
    (off on the CPU by default): s_per_iter > 0, tflop_per_iter > 0, images_per_s =
    batch / s_per_iter (both are rounded: 1e-3). --mode all gives one line per mode
    of dcl.MODES, in that order; --mode nope is one "error:" line and exit 2."""
    calls = Counter()
    for mode, spec in dcl.MODES.items():
        counted = spec._replace(
            step=lambda *a, m=mode, step=spec.step: (calls.update([m]), step(*a))[1]
        )
        monkeypatch.setitem(dcl.MODES, mode, counted)
    tiny = ["--crop_size", 32, "--ngf", 8, "--ndf", 8, "--netF_nc", 16, "--num_patches", 16,
            "--device", "cpu"]
    code, out, err = main_in_process(capsys, "bench", "--mode", "cut", *tiny, "--batch_size", 2,
                                     "--steps", 2, "--warmup", 1)
    assert code == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    assert BENCH_KEYS <= set(row) and calls == {"cut": 4} and "cut" in err
    assert (row["mode"], row["device"], row["batch_size"], row["crop_size"], row["fast"],
            row["peak_memory_gb"]) == ("cut", "cpu", 2, 32, False, None)
    assert row["s_per_iter"] > 0 and row["tflop_per_iter"] > 0 and row["matmul_tflops"] > 0
    assert row["images_per_s"] == pytest.approx(2 / row["s_per_iter"], rel=1e-3)
    code, out, err = main_in_process(
        capsys, "bench", "--mode", "all", *tiny, "--steps", 1, "--warmup", 0
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["mode"] for r in rows] == list(dcl.MODES) and all(BENCH_KEYS <= set(r) for r in rows)
    assert all(r["s_per_iter"] > 0 and r["tflop_per_iter"] > 0 for r in rows)
    assert calls == Counter({mode: 2 for mode in dcl.MODES}) + Counter(cut=4)
    code, out, err = main_in_process(capsys, "bench", "--mode", "nope")
    assert code == 2 and out == "" and err.startswith("error:") and err.count("\n") == 1, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cut", "dcl"])
def test_fast_step_never_synchronises_with_the_host(mode):
    """§14: under --fast on CUDA (bf16 autocast, channels_last, fused Adam) a cut_step
    and a dual_step at 64 px, after a warm-up step, run with
    torch.cuda.set_sync_debug_mode("error"), which raises on any host
    synchronisation (.item(), a host copy, nonzero, ...): patch ids, the loss terms
    and the optimiser steps stay on the device."""
    cfg, device = tiny_cfg(mode=mode, load_size=72, crop_size=64, device="cuda", fast="on"), "cuda"
    assert dcl.fast_path(cfg, device)
    torch.manual_seed(0)
    nets = dcl.build_networks(cfg, device)
    opts = dcl.build_optimizers(nets, cfg, fused=True)
    real_a, real_b = (torch.rand(1, 3, 64, 64, device=device).mul(2).sub(1)
                      .contiguous(memory_format=torch.channels_last) for _ in "ab")
    with torch.autocast("cuda", torch.bfloat16):
        dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)     # warm-up: lazy init, cuDNN plans
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = dcl.MODES[mode].step(nets, opts, real_a, real_b, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v) for v in losses.values())


def test_resume_lays_adam_out_for_this_run():
    """§16: a --fast run's Adam state (fused, channels_last moments, step on the
    device) loads into an exact-path run as plain Adam: fused off, moments in
    the parameters' contiguous layout with the same values, step a CPU float32;
    the next update then equals a fresh non-fused Adam given the same moments
    (a fused kernel fed channels_last moments next to contiguous parameters
    would mix up elements). And back: an exact-path state loads fused."""
    torch.manual_seed(0)
    fast_cfg = dataclasses.replace(tiny_cfg(), fast="on")
    nets = dcl.build_networks(fast_cfg, "cpu")
    opts = dcl.build_optimizers(nets, fast_cfg, fused=True)
    for p in nets["G"].parameters():
        p.grad = torch.randn_like(p)
    opts["G"].step()
    saved, weights = opts["G"].state_dict(), nets["G"].state_dict()
    plain = dcl.build_networks(tiny_cfg(), "cpu")
    plain["G"].load_state_dict(weights)
    opt = dcl.build_optimizers(plain, tiny_cfg())["G"]
    dcl.load_optimizer(opt, saved, fused=False)
    assert opt.param_groups[0]["fused"] is None
    params = list(plain["G"].parameters())
    for p, q in zip(params, nets["G"].parameters()):
        slots = opt.state[p]
        assert slots["step"].device.type == "cpu" and slots["step"].dtype == torch.float32
        for k in ("exp_avg", "exp_avg_sq"):
            assert slots[k].is_contiguous() and torch.equal(slots[k], opts["G"].state[q][k])
    reference = torch.optim.Adam([p.detach().clone().requires_grad_() for p in params],
                                 lr=opt.param_groups[0]["lr"], betas=opt.param_groups[0]["betas"])
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))  # else it shares opt's tensors
    grads = [torch.randn_like(p) for p in params]
    for p, r, g in zip(params, reference.param_groups[0]["params"], grads):
        p.grad, r.grad = g.clone(), g.clone()
    opt.step()
    reference.step()
    for p, r in zip(params, reference.param_groups[0]["params"]):
        assert torch.equal(p, r)
    back = dcl.build_optimizers(nets, fast_cfg, fused=True)["G"]
    dcl.load_optimizer(back, opt.state_dict(), fused=True)
    assert back.param_groups[0]["fused"] is True
    for p in nets["G"].parameters():
        assert (
            back.state[p]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
            or p.dim() != 4
        )


if __name__ == "__main__":
    pytest.main([__file__, "-q"])

# -----------------------------------------------------------------------------
# evaluation: FID, KID, paired scores, scoring during training (§18)
# -----------------------------------------------------------------------------

def features_with_stats(mean, cov, n=7, seed=0):
    """n×d float64 features whose sample mean and (N − 1) covariance are exactly
    mean and cov: white noise made to have mean 0 and covariance I, then coloured
    by the Cholesky factor of cov."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    cov, mean = torch.tensor(cov, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64)
    return z @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_known_answers():
    """§18: FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½. By hand:
    - 2×2, Σ1 = [[2, 1], [1, 2]] (det 3), Σ2 = diag(1, 4) (det 4), which do not
      commute: a 2×2 matrix M with real non-negative eigenvalues has
      tr M^½ = √(tr M + 2√det M); Σ1 Σ2 = [[2, 4], [1, 8]], tr 10, det 12, so
      tr (Σ1 Σ2)^½ = √(10 + 2√12) = 4.114385; with μ1 = 0, μ2 = (1, 2):
      FID = 5 + 4 + 5 − 2·4.114385 = 5.771220.
    - diagonal Σ1 = diag(1, 4, 9), Σ2 = diag(4, 4, 1), equal means: the
      matrices commute, FID = Σ(√a − √b)² = 1 + 0 + 4 = 5.
    - a set against itself: 0.
    - 5 features in 8 dimensions (both covariances of rank 4, as for any test
      set under 2,048 images): equal to the slow reference that takes the
      square roots of the eigenvalues of the non-symmetric product Σ1 Σ2, to
      1e-6: its four zero eigenvalues come out as rounding noise of about
      1e-16 in either computation, whose square roots reach 1e-8 each."""
    f1 = features_with_stats([0.0, 0.0], [[2.0, 1.0], [1.0, 2.0]])
    f2 = features_with_stats([1.0, 2.0], [[1.0, 0.0], [0.0, 4.0]], seed=1)
    assert dcl.frechet_distance(f1, f2) == pytest.approx(5.771220, abs=1e-6)
    f1 = features_with_stats([0.0] * 3, torch.diag(torch.tensor([1.0, 4.0, 9.0])).tolist())
    f2 = features_with_stats([0.0] * 3, torch.diag(torch.tensor([4.0, 4.0, 1.0])).tolist(), seed=2)
    assert dcl.frechet_distance(f1, f2) == pytest.approx(5.0, abs=1e-9)
    assert abs(dcl.frechet_distance(f1, f1)) < 1e-9
    g = torch.Generator().manual_seed(3)
    f1, f2 = (torch.randn(5, 8, generator=g, dtype=torch.float64) + shift for shift in (0, 0.5))
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    roots = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    reference = (f1.mean(0) - f2.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * roots
    assert dcl.frechet_distance(f1, f2) == pytest.approx(float(reference), abs=1e-6)


def test_kid_known_answer_and_loop_reference():
    """§18: KID, the unbiased MMD² with k(x, y) = (x·y/d + 1)³. By hand, d = 1,
    x = y = {0, 1}: k(0, 0) = k(0, 1) = 1, k(1, 1) = 8; the two within-set sums
    over i ≠ j are 2·k(0, 1)/(2·1) = 1 each, the cross sum (1 + 1 + 1 + 8)·2/4 =
    5.5: MMD² = 1 + 1 − 5.5 = −3.5 (an unbiased estimate can be negative), the
    same in every subset. Then, for 3 subsets of 4 of 6 and 5 random features,
    equal to a double loop over pairs on the same draws (torch.randperm from one
    generator seeded 0, first set then second), mean and population deviation."""
    x = torch.tensor([[0.0], [1.0]])
    assert dcl.kernel_inception_distance(x, x, subsets=3) == (pytest.approx(-3.5), 0.0)
    g = torch.Generator().manual_seed(4)
    f1, f2 = torch.randn(6, 3, generator=g), torch.randn(5, 3, generator=g) + 0.3
    draws, values = torch.Generator().manual_seed(0), []
    for _ in range(3):
        a = f1[torch.randperm(6, generator=draws)[:4]].double()
        b = f2[torch.randperm(5, generator=draws)[:4]].double()
        k = lambda u, v: (float(u @ v) / 3 + 1) ** 3
        within = sum(k(s[i], s[j]) for s in (a, b) for i in range(4) for j in range(4) if i != j)
        cross = sum(k(a[i], b[j]) for i in range(4) for j in range(4))
        values.append(within / 12 - 2 * cross / 16)
    mean, std = dcl.kernel_inception_distance(f1, f2, subsets=3, size=4)
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-9)


def test_paired_scores_known_answers():
    """§18: PSNR = 10·log10(1/MSE) dB and MAE, per pair, then averaged. By hand:
    an error of 0.1 everywhere is MSE 0.01, 20 dB, MAE 0.1; of 0.01: 40 dB, MAE
    0.01; the two pairs together: 30 dB, MAE 0.055. Identical images: the 100 dB cap."""
    real = torch.full((3, 4, 5), 0.5)
    assert dcl.paired_scores([(real + 0.1, real)]) == pytest.approx(dict(psnr=20.0, mae=0.1))
    assert dcl.paired_scores([(real + 0.1, real), (real - 0.01, real)]) == pytest.approx(
        dict(psnr=30.0, mae=0.055))
    assert dcl.paired_scores([(real, real)]) == dict(psnr=100.0, mae=0.0)


def test_fid_inception_is_pytorch_fids_network():
    """§18: pytorch-fid's changes to torchvision's Inception-v3. The pooling branch
    of the A, C and first E blocks (Mixed_5b, Mixed_6b, Mixed_7b here) averages the
    3×3 window over the pixels inside the image only: a hand-written window sum
    divided by the count of pixels inside, 4 at a corner, 6 on an edge, 9 within.
    The last E block (Mixed_7c) max-pools: a hand-written maximum over the 9
    shifted copies of the -inf-padded map. The other branches are torchvision's
    own; the reduction blocks (Mixed_6a, Mixed_7a) are untouched. The state-dict
    keys are torchvision's for 1,008 classes without the auxiliary head (the keys
    of pytorch-fid's file), less the classifier it drops; such a file loads strictly."""
    net = dcl.FIDInception("random")
    window = lambda t: torch.nn.functional.conv2d(
        torch.nn.functional.pad(t, (1, 1, 1, 1)), torch.ones(t.shape[1], 1, 3, 3),
        groups=t.shape[1])
    count = window(torch.ones(1, 1, 7, 7))
    assert (count[0, 0, 0, 0], count[0, 0, 0, 3], count[0, 0, 3, 3]) == (4, 6, 9)
    for name, channels in (("Mixed_5b", 192), ("Mixed_6b", 768), ("Mixed_7b", 1280)):
        block, x = getattr(net.net, name), torch.randn(1, channels, 7, 7)
        expected = torch.cat(block._forward(x)[:3] + [block.branch_pool(window(x) / count)], 1)
        assert torch.allclose(block(x), expected, atol=1e-5), name
    block, x = net.net.Mixed_7c, torch.randn(1, 2048, 5, 5)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-math.inf)
    shifts = [padded[..., i:i + 5, j:j + 5] for i in range(3) for j in range(3)]
    maximum = torch.stack(shifts).amax(0)
    expected = torch.cat(block._forward(x)[:3] + [block.branch_pool(maximum)], 1)
    assert torch.allclose(block(x), expected, atol=1e-5)
    assert "forward" not in vars(net.net.Mixed_6a) and "forward" not in vars(net.net.Mixed_7a)
    from torchvision.models import inception_v3
    official = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    assert set(official.state_dict()) - {"fc.weight", "fc.bias"} == set(net.net.state_dict())


def test_fid_weights_file_loads_and_features_any_size(tmp_path):
    """§18: a weights file in pytorch-fid's format (torchvision's keys) loads
    strictly and its weights are used; images of any size, in one call, each
    give 2048 float64 features; a missing file is a one-line error naming the
    file, the path looked at and --inception_weights."""
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=False, num_classes=1008,
                         init_weights=False).state_dict()
    torch.save(state, tmp_path / dcl.FID_FILE)
    net = dcl.FIDInception(str(tmp_path / dcl.FID_FILE))
    assert torch.equal(net.net.Mixed_6e.branch_pool.conv.weight,
                       state["Mixed_6e.branch_pool.conv.weight"])
    features = net([torch.rand(3, 40, 30), torch.rand(3, 64, 64)])
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    with pytest.raises(dcl.UserError, match="--inception_weights") as error:
        dcl.FIDInception(str(tmp_path / "missing.pth"))
    assert dcl.FID_FILE in str(error.value) and "missing.pth" in str(error.value)


def paired_split(root: Path, n=2) -> Path:
    """trainA, trainB and a paired test split: testA/i.png and testB/i.png."""
    for i in range(n):
        for domain, seed in (("trainA", 0), ("trainB", 10), ("testA", 20), ("testB", 30)):
            write_image(root / domain / f"{i}.png", (40, 40), "RGB", seed=seed + i)
    return root


def test_eval_command_scores_and_refuses(tmp_path, capsys, monkeypatch):
    """§18, §21: `eval --fake F --real R --paired` prints one JSON line: the counts,
    PSNR and MAE against the real image of the same relative name (here JPEG
    and PNG of other sizes, resized to the fake's), FID and KID (random
    Inception weights); the PSNR is that of paired_scores on the same pairs.
    Refused with exit 2 and one line: an empty folder, a single image, a fake
    without a counterpart, and FID without its weights file (TORCH_HOME here
    is empty); with --paired, the missing weights only drop FID and KID."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for i, rel in enumerate(["a.png", "b.png", "sub/c.png"]):
        write_image(tmp_path / "fake" / rel, (32, 32), "RGB", seed=i)
        write_image(tmp_path / "real" / rel.replace("a.png", "a.jpg"), (40, 36), "RGB",
                    seed=i + 5)
    fake, real = tmp_path / "fake", tmp_path / "real"
    code, out, err = main_in_process(capsys, "eval", "--fake", fake, "--real", real, "--paired",
                                     "--inception_weights", "random", "--device", "cpu")
    assert code == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    assert set(row) == {"n_fake", "n_real", "psnr", "mae", "fid", "kid", "kid_std"}
    pairs = [(dcl.unit_image(fake / r), dcl.unit_image(real / q, (32, 32)))
             for r, q in (("a.png", "a.jpg"), ("b.png", "b.png"), ("sub/c.png", "sub/c.png"))]
    assert row["psnr"] == pytest.approx(dcl.paired_scores(pairs)["psnr"], rel=1e-12)
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "one" / "a.png")
    write_image(tmp_path / "other" / "z.png")
    write_image(tmp_path / "other" / "y.png")
    for folder, extra, words in ((tmp_path / "empty", ["--paired"], "no images in"),
                                 (tmp_path / "one", ["--paired"], "1 image in"),
                                 (tmp_path / "other", ["--paired"], "no counterpart"),
                                 (fake, [], "--inception_weights")):
        code, out, err = main_in_process(capsys, "eval", "--fake", folder, "--real", real, *extra)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, out, err = main_in_process(capsys, "eval", "--fake", fake, "--real", real, "--paired")
    assert code == 0 and set(json.loads(out)) == {"n_fake", "n_real", "psnr", "mae"}
    assert dcl.FID_FILE in err


def cheap_features(monkeypatch):
    """FIDInception with its real construction (and random draws) but a cheap
    forward: each image's channel means, tiled to 2048 features."""
    monkeypatch.setattr(dcl.FIDInception, "forward", lambda self, images: torch.stack(
        [x.mean((1, 2)).double().repeat(683)[:2048] for x in images]))


@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_training_time_eval_in_every_mode(mode, tmp_path, capsys, monkeypatch):
    """§15, §18: --eval_freq 1 scores the paired test split at the end of every
    epoch: a log row {"step", "epoch", "eval"} with PSNR and MAE (and _BtoA for
    the two-generator modes), FID and KID with Inception weights (random ones
    for cut), ckpt_best.pt, and a closing line giving the best. No weights in
    the cache (TORCH_HOME is empty): auto picks PSNR. The network's forward is
    cheap_features here (test_eval_command_scores_and_refuses runs the real one)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cheap_features(monkeypatch)
    data = paired_split(tmp_path / "data")
    extra = ["--inception_weights", "random"] if mode == "cut" else []
    code, out, err = train_in_process(capsys, "--mode", mode, "--dataroot", data, *TINY,
                                      "--n_epochs", 1, "--n_epochs_decay", 0, "--eval_freq", 1,
                                      "--checkpoints_dir", tmp_path, "--name", "r", *extra)
    assert code == 0, err
    [row] = [r for r in read_log(tmp_path / "r") if "eval" in r]
    two = "G_ba" in dcl.MODES[mode].networks
    expected = {"psnr", "mae"} | ({"fid", "kid", "kid_std"} if mode == "cut" else set())
    assert set(row["eval"]) == expected | {k + "_BtoA" for k in expected if two}
    assert row["step"] == 2 and row["epoch"] == 1
    assert (tmp_path / "r" / "ckpt_best.pt").is_file()
    metric = "fid" if mode == "cut" else "psnr"
    assert f"eval ({metric}): last" in out.splitlines()[-1]


def test_best_checkpoint_survives_resume_and_matches_eval(tmp_path, capsys, monkeypatch):
    """§15, §16, §18: over 3 epochs, then 2 more after --continue_train, the log
    holds one eval row per epoch; ckpt_best.pt holds the weights of the epoch
    with the highest PSNR of all five (the best before the resume is part of the
    stored state: ckpt_latest.pt's "best"), equal to that epoch's snapshot. The
    logged PSNR of the last epoch is what the official test protocol gives:
    `translate --resize 32` of testA with that epoch's snapshot, then
    `eval --paired` against testB."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = paired_split(tmp_path / "data", n=3)
    flags = ["--mode", "cut", "--dataroot", data, *TINY, "--eval_freq", 1,
             "--checkpoints_dir", tmp_path, "--name", "r", "--lr", 2e-3, "--save_epoch_freq", 1]
    assert train_in_process(capsys, *flags, "--n_epochs", 3, "--n_epochs_decay", 0)[0] == 0
    code, out, err = train_in_process(capsys, *flags, "--n_epochs", 5, "--n_epochs_decay", 0,
                                      "--continue_train")
    assert code == 0, err
    rows = [r for r in read_log(tmp_path / "r") if "eval" in r]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    psnr = [r["eval"]["psnr"] for r in rows]
    best_epoch = 1 + psnr.index(max(psnr))
    stored = torch.load(tmp_path / "r" / "ckpt_latest.pt", weights_only=True)["best"]
    assert stored == dict(metric="psnr", value=max(psnr), epoch=best_epoch)
    best = torch.load(tmp_path / "r" / "ckpt_best.pt", weights_only=True)["nets"]["G"]
    snapshot = torch.load(tmp_path / "r" / f"ckpt_epoch_{best_epoch:03d}.pt",
                          weights_only=True)["nets"]["G"]
    assert all(torch.equal(best[k], snapshot[k]) for k in best)
    assert f"best {max(psnr):.4g} at epoch {best_epoch}" in out.splitlines()[-1]
    code, _, err = main_in_process(capsys, "translate", "--checkpoint",
                                   tmp_path / "r" / "ckpt_epoch_005.pt", "--input", data / "testA",
                                   "--output", tmp_path / "out", "--resize", 32, "--device", "cpu")
    assert code == 0, err
    code, out, err = main_in_process(capsys, "eval", "--fake", tmp_path / "out", "--real",
                                     data / "testB", "--paired")
    assert code == 0, err
    assert json.loads(out)["psnr"] == psnr[-1]


def test_eval_metric_needs_what_it_scores(tmp_path, data, capsys, monkeypatch):
    """§18: refused before training, exit 2, one line: --eval_metric psnr on an
    unpaired test split (the data fixture's testA and testB differ), --eval_metric
    fid without the Inception weights, an explicit --inception_weights path that
    does not exist, and --eval_freq below 0."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    paired = paired_split(tmp_path / "paired")
    for root, extra, words in ((data, ["--eval_metric", "psnr"], "not paired"),
                               (paired, ["--eval_metric", "fid"], dcl.FID_FILE),
                               (paired, ["--inception_weights", tmp_path / "no.pth"], "no.pth"),
                               (paired, ["--eval_freq", -1], "--eval_freq must be at least 0")):
        code, out, err = train_in_process(capsys, "--dataroot", root, *TINY, "--eval_freq", 1,
                                          "--checkpoints_dir", tmp_path, *extra)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_eval_changes_nothing_the_run_learns(tmp_path, capsys, monkeypatch):
    """§15, §18: scoring the test split (here with random Inception weights, whose
    construction draws random numbers) leaves the training's random draws alone:
    the weights after an epoch are bit-identical with and without --eval_freq."""
    cheap_features(monkeypatch)
    data = paired_split(tmp_path / "data")
    flags = ["--mode", "cut", "--dataroot", data, *TINY, "--n_epochs", 1, "--n_epochs_decay", 0,
             "--checkpoints_dir", tmp_path]
    assert train_in_process(capsys, *flags, "--name", "plain")[0] == 0
    assert train_in_process(capsys, *flags, "--name", "scored", "--eval_freq", 1,
                            "--inception_weights", "random")[0] == 0
    plain, scored = (torch.load(tmp_path / n / "ckpt_latest.pt", weights_only=True)["nets"]
                     for n in ("plain", "scored"))
    assert all(torch.equal(plain[net][k], scored[net][k]) for net in plain for k in plain[net])


def test_flags_are_never_abbreviated(capsys):
    """§21: a flag is its full name only. With argparse's abbreviations on,
    --lambda_N would silently set --lambda_NCE and --netF_n --netF_nc; both are
    refused as unknown, exit 2, one line (eval's too)."""
    for flags in (["--lambda_N", "5"], ["--netF_n", "16"]):
        code, out, err = main_in_process(capsys, "train", *flags)
        assert code == 2 and "unrecognized arguments: " + " ".join(flags) in err, err
        assert len(err.strip().splitlines()) == 1
    code, out, err = main_in_process(capsys, "eval", "--fake", "x", "--real", "y", "--pair")
    assert code == 2 and "unrecognized arguments: --pair" in err


# -----------------------------------------------------------------------------
# official command lines, test, channels, the run folder (§13-§17, §21)
# -----------------------------------------------------------------------------

def parsed_config(*argv):
    """The config `train ARGV` would run with, through the parser and the
    official-flag mapping (nothing is trained): (cfg, origin)."""
    args = dcl.build_parser().parse_args(["train", *map(str, argv)])
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(dcl.TrainConfig)
             if hasattr(args, f.name)}
    dcl.official_flags(args, flags)
    return dcl.resolve_config(flags)


@pytest.mark.parametrize("argv, mode", [
    ([], "cut"), (["--CUT_mode", "CUT"], "cut"), (["--CUT_mode", "FastCUT"], "fastcut"),
    (["--model", "cut", "--CUT_mode", "fastcut"], "fastcut"),
    (["--model", "negcut", "--NEGCUT_mode", "NEGCUT"], "negcut"),
    (["--model", "negcut", "--NEGCUT_mode", "FastNEGCUT"], "fastnegcut"),
    (["--model", "negcut"], "negcut"), (["--model", "negcut", "--CUT_mode", "FastCUT"], "negcut"),
    (["--model", "cut", "--NEGCUT_mode", "FastNEGCUT"], "cut"), (["--model", "dcl"], "dcl"),
    (["--NEGCUT_mode", "FastNEGCUT"], "fastnegcut"),
    (["--model", "simdcl"], "simdcl"), (["--model", "cycle_gan"], "cyclegan"),
    (["--model", "qs"], "cut"),
    (["--model", "cycle_gan", "--mode", "cyclegan"], "cyclegan")])
def test_official_model_flags_choose_the_mode(argv, mode):
    """§21: the official --model, with --CUT_mode (read with --model cut, the
    default) or --NEGCUT_mode (read with --model negcut, which it implies when no
    --model is given), picks the mode the
    official command trains, with that mode's preset; --model qs (QS-Attn's
    train.py) is CUT with --patch_select qsattn. A --mode that agrees is fine."""
    cfg, origin = parsed_config(*argv)
    assert cfg.mode == mode
    assert cfg.lambda_NCE == dcl.MODES[mode].preset["lambda_NCE"]
    assert cfg.patch_select == ("qsattn" if "qs" in argv else "random")
    assert (origin.get("mode") == "flag") == bool(argv)


def test_official_flags_map_or_pass():
    """§21: --gpu_ids -1 is --device cpu, --gpu_ids 2 is cuda:2 (a --device typed
    wins); --lambda_identity is --lambda_IDT; the official defaults of the
    architecture and data flags (the one value implemented) are accepted in
    any case; display and naming flags are accepted and change nothing."""
    assert parsed_config("--gpu_ids", "-1")[0].device == "cpu"
    assert parsed_config("--gpu_ids", "2")[0].device == "cuda:2"
    assert parsed_config("--gpu_ids", "2", "--device", "cpu")[0].device == "cpu"
    cfg = parsed_config("--model", "cycle_gan", "--lambda_identity", "0.3")[0]
    assert cfg.lambda_IDT == 0.3
    same = parsed_config("--netG", "resnet_9blocks", "--netD", "basic", "--normG", "instance",
                         "--normD", "Instance", "--n_layers_D", "3", "--lr_policy", "linear",
                         "--dataset_mode", "unaligned", "--init_gain", "0.02", "--no_dropout",
                         "--phase", "train", "--preprocess", "resize_and_crop", "--epoch",
                         "latest", "--netF", "mlp_sample", "--display_id", "0", "--no_html",
                         "--display_port", "8097", "--verbose", "--suffix", "x", "--save_by_iter",
                         "--epoch_count", "1", "--update_html_freq", "1000")[0]
    assert same == parsed_config()[0]


@pytest.mark.parametrize("argv, words", [
    (["--netG", "unet_256"], ["--netG", "unet_256", "resnet_9blocks"]),
    (["--netD", "n_layers"], ["--netD", "'basic'"]),
    (["--normG", "batch"], ["--normG", "'instance'"]),
    (["--lr_policy", "cosine"], ["--lr_policy", "'linear'"]),
    (["--preprocess", "scale_width"], ["--preprocess", "resize_and_crop"]),
    (["--phase", "test"], ["--phase", "'train'"]),
    (["--netF", "sample"], ["--netF", "mlp_sample"]),
    (["--model", "sincut"], ["--model", "sincut", "cycle_gan"]),
    (["--CUT_mode", "SinCUT"], ["--CUT_mode", "fastcut"]),
    (["--model", "cycle_gan", "--mode", "cut"], ["--model cycle_gan", "--mode cyclegan",
                                                 "--mode cut"]),
    (["--CUT_mode", "FastCUT", "--mode", "cut"], ["(fastcut)", "--mode cut"]),
    (["--gpu_ids", "0,1"], ["--gpu_ids 0,1", "torchrun --nproc_per_node=2"])])
def test_official_flags_refused_with_the_reason(argv, words, tmp_path, capsys):
    """§21: an official flag whose value dcl.py does not implement (another
    generator, discriminator, norm, schedule or preprocessing; SinCUT), a
    --model that contradicts --mode, and several --gpu_ids (DataParallel: here
    torchrun) each exit 2 with one line naming the flag and what would work;
    no run folder is made."""
    code, out, err = train_in_process(capsys, *argv, "--checkpoints_dir", tmp_path)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert all(word in err for word in words), err
    assert list(tmp_path.iterdir()) == []


def test_official_train_command_runs(data, tmp_path, capsys):
    """§21: the CUT README's command, as typed for the official train.py with the
    CPU and no display (--gpu_ids -1 --display_id 0 --no_html), trains here: exit 0,
    mode fastcut (--CUT_mode FastCUT), the run folder named by --name, on the
    CPU, and one note on stderr naming the flags that change nothing here."""
    code, out, err = train_in_process(
        capsys, "--dataroot", data, "--name", "grumpycat_FastCUT", "--CUT_mode", "FastCUT",
        "--gpu_ids", "-1", "--display_id", "0", "--no_html", *TINY[:-8], "--num_threads", 0,
        "--max_steps", 2, "--checkpoints_dir", tmp_path)
    assert code == 0, err
    stored = json.loads((tmp_path / "grumpycat_FastCUT" / "config.json").read_text())
    assert stored["mode"] == "fastcut" and stored["device"] == "cpu"
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--display_id" in notes[0] and "--no_html" in notes[0]


def test_help_is_grouped_with_examples_and_mode_defaults(capsys):
    """§21: train --help has the config's groups, the official flags in one
    paragraph and the module docstring's examples; each default shown is the
    one the chosen mode uses (--mode fastcut: λ_NCE 10, said to be fastcut's),
    and --name shows its default once."""
    def help_text(*argv):
        with pytest.raises(SystemExit):
            dcl.main(["train", *argv, "--help"])
        return " ".join(capsys.readouterr().out.split())
    text = help_text()
    for heading in ("method:", "data:", "model:", "losses:", "extensions:", "optimisation:",
                    "run:", "evaluation (§18):", "official flags:", "examples:"):
        assert heading in text
    assert "python dcl.py train --mode simdcl" in text and "--CUT_mode" in text
    assert "(default 1.0 in cut)" in text.partition("--lambda_NCE")[2][:200]
    fast = help_text("--mode", "fastcut")
    assert "(default 10.0 in fastcut)" in fast.partition("--lambda_NCE")[2][:200]
    name = text.partition("--name NAME")[2].partition("--checkpoints_dir")[0]
    assert name.count("default") == 1


def test_bundled_data_named_explicitly_gets_the_demo_settings():
    """§12: --dataroot data (the bundled set, named) gets the demo settings,
    as no --dataroot does; any other folder the official defaults."""
    named = dcl.resolve_config({"dataroot": str(dcl.BUNDLED_DATA / ".." / "data")})[0]
    implicit = dcl.resolve_config({})[0]
    other = dcl.resolve_config({"dataroot": "elsewhere"})[0]
    assert (named.crop_size, named.ngf, named.eval_freq) == (64, 16, 1)
    assert (implicit.crop_size, implicit.ngf) == (64, 16)
    assert (other.crop_size, other.ngf, other.eval_freq) == (256, 64, 0)
    assert named.name == implicit.name == "cut_data"


def test_rate_leaves_out_the_first_step(monkeypatch):
    """§15: the progress line's rate runs from the end of step 1 (which pays for
    workers, autotuning, compiling): a first step of 10 s, then 1 s per step, reads
    1 it/s after 5 steps, not 5/14 it/s; after a reset, two steps of 3 s more make
    6 steps in 10 s since step 1: 0.6 it/s (from the reset it would be 1/3)."""
    now = [0.0]
    monkeypatch.setattr(dcl.time, "perf_counter", lambda: now[0])
    meter = dcl.Meter()
    for t in (10.0, 11.0, 12.0, 13.0, 14.0):                  # steps end at these times
        now[0] = t
        meter.add({"G": torch.tensor(1.0)})
    assert meter.read()[1] == pytest.approx(1.0)              # 4 steps in 4 s since step 1
    for t in (17.0, 20.0):
        now[0] = t
        meter.add({"G": torch.tensor(1.0)})
    assert meter.read()[1] == pytest.approx(0.6)


def test_translate_says_mode_is_ignored_and_names_a_non_checkpoint(runs, data, tmp_path,
                                                                    capsys):
    """§16, §17: --mode given with a dcl.py checkpoint of another mode is ignored,
    and translate says so; a file torch.save did not write (the run's
    config.json) is refused in one line that says so, not with torch's message."""
    run = runs("cut")[1]
    code, out, err = main_in_process(capsys, "translate", "--checkpoint", run / "ckpt_latest.pt",
                                     "--input", data / "testA", "--output", tmp_path / "o",
                                     "--mode", "dcl", "--device", "cpu")
    assert code == 0 and "note: --mode dcl ignored" in out and "cut model" in out, err
    code, out, err = main_in_process(capsys, "translate", "--checkpoint", run / "config.json",
                                     "--input", data / "testA", "--output", tmp_path / "p")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "config.json is not a checkpoint (torch.save did not write it)" in err


def test_test_command_writes_the_official_layout(runs, data, tmp_path, capsys):
    """§17: `test --name N` (the official test.py's flags) finds the run's
    ckpt_latest.pt, and writes results_dir/N/test_latest/images/real_A, fake_B and
    real_B: the first --num_test images of testA and testB at the run's
    crop_size² (bicubic, the official test resize), fake_B byte for byte what
    `translate --resize 32` writes, the reals as the official tensor2im writes
    its inputs; --preprocess none keeps each image's own size."""
    run = runs("cut")[1]
    code, out, err = main_in_process(
        capsys, "test", "--dataroot", data, "--name", "cut", "--checkpoints_dir", run.parent,
        "--results_dir", tmp_path / "results", "--num_test", 2, "--gpu_ids", "-1", "--eval")
    assert code == 0, err
    images = tmp_path / "results" / "cut" / "test_latest" / "images"
    tree = {d.name: sorted(str(p.relative_to(d)) for p in d.rglob("*.png"))
            for d in images.iterdir()}
    assert tree == {"real_A": ["0.png", "1.png"], "fake_B": ["0.png", "1.png"],
                    "real_B": ["0.png", "1.png"]}
    translate_in_process(capsys, run / "ckpt_latest.pt", data / "testA", tmp_path / "t",
                         "--resize", 32)
    for name in ("0.png", "1.png"):
        assert (images / "fake_B" / name).read_bytes() == (tmp_path / "t" / name).read_bytes()
    source = sorted((data / "testB").iterdir())[0]
    expected = dcl.to_uint8(dcl.to_tensor(dcl.load_image(source).resize(
        (32, 32), Image.Resampling.BICUBIC)))
    assert np.array_equal(np.array(Image.open(images / "real_B" / "0.png")), expected)
    assert "dcl.py eval --fake" in out and str(images / "fake_B") in out
    code, out, err = main_in_process(
        capsys, "test", "--dataroot", data, "--name", "cut", "--checkpoints_dir", run.parent,
        "--results_dir", tmp_path / "native", "--preprocess", "none", "--device", "cpu")
    assert code == 0, err
    native = tmp_path / "native" / "cut" / "test_latest" / "images"
    assert Image.open(native / "fake_B" / "sub" / "2.png").size == (37, 29)
    assert len(list((native / "fake_B").rglob("*.png"))) == 3      # every image: no --num_test


def test_test_command_epochs_phases_and_official_weights(runs, data, tmp_path, capsys):
    """§17: --epoch 1 reads ckpt_epoch_001.pt into test_1/, --epoch 9 (none saved)
    is one line naming what it looked for; --phase train translates trainA into
    train_latest/; an official run folder (N_net_G.pth, as the official code
    saves it) is tested with its --CUT_mode, fake_B equal to translate's."""
    run = runs("cut")[1]
    shutil.copytree(run, tmp_path / "ck" / "cut")
    shutil.copy(run / "ckpt_latest.pt", tmp_path / "ck" / "cut" / "ckpt_epoch_001.pt")
    common = ["--dataroot", data, "--checkpoints_dir", tmp_path / "ck", "--device", "cpu",
              "--results_dir", tmp_path / "r", "--name", "cut"]
    code, out, err = main_in_process(capsys, "test", *common, "--epoch", 9)
    assert code == 2 and "ckpt_epoch_009.pt" in err and "9_net_G.pth" in err, err
    code, out, err = main_in_process(capsys, "test", *common, "--epoch", 1)
    assert code == 0 and (tmp_path / "r" / "cut" / "test_1" / "images" / "fake_B").is_dir(), err
    code, out, err = main_in_process(capsys, "test", *common, "--phase", "train")
    assert code == 0, err
    assert len(list((tmp_path / "r" / "cut" / "train_latest" / "images" / "fake_B")
                    .glob("*.png"))) == 4
    official = tmp_path / "official" / "h2z"
    official.mkdir(parents=True)
    state = torch.load(run / "ckpt_latest.pt", weights_only=True)["nets"]["G"]
    torch.save(state, official / "latest_net_G.pth")
    torch.save(state, official / "1_net_G.pth")
    code, out, err = main_in_process(capsys, "test", "--name", "h2z", "--CUT_mode", "CUT",
                                     "--dataroot", data, "--checkpoints_dir", official.parent,
                                     "--results_dir", tmp_path / "o", "--device", "cpu",
                                     "--load_size", 32, "--crop_size", 32, "--epoch", 1)
    assert code == 0, err
    translate_in_process(capsys, run / "ckpt_latest.pt", data / "testA", tmp_path / "t",
                         "--resize", 32)
    fake = tmp_path / "o" / "h2z" / "test_1" / "images" / "fake_B" / "0.png"
    assert fake.read_bytes() == (tmp_path / "t" / "0.png").read_bytes()


def hold_lock(folder: Path):
    """Lock a run folder as another training would (flock on the folder itself)."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_a_run_folder_in_use_is_refused(runs, data, tmp_path, capsys):
    """§15: while another process holds a run folder (as a training does from its
    start to its end), a new run of that --name and a --continue_train of it
    both exit 2 with one line saying the folder is in use, and change no file;
    once it is released, training there works."""
    shutil.copytree(runs("cut")[1], tmp_path / "cut")
    flags = ["--dataroot", data, *TINY, "--max_steps", 3, "--checkpoints_dir", tmp_path]
    handle = hold_lock(tmp_path / "new")
    hold_lock_cut = hold_lock(tmp_path / "cut")
    before = file_tree(tmp_path)
    try:
        for argv in (["--name", "new"], ["--name", "cut", "--continue_train"]):
            code, out, err = train_in_process(capsys, *flags, *argv)
            assert code == 2 and "is in use by another training run" in err, err
            assert len(err.strip().splitlines()) == 1
        assert file_tree(tmp_path) == before
    finally:
        os.close(handle)
        os.close(hold_lock_cut)
    code, out, err = train_in_process(capsys, *flags, "--name", "new")
    assert code == 0, err


def test_two_trainings_of_one_name_never_share_the_folder(data, tmp_path):
    """§15: two `train --name same` started together: exactly one trains
    (exit 0); the other exits 2 saying the folder is in use or already holds a
    run, and the log has each step once."""
    procs = [subprocess.Popen([sys.executable, "dcl.py", "train", "--dataroot", str(data),
                               *map(str, TINY), "--max_steps", "20", "--checkpoints_dir",
                               str(tmp_path), "--name", "same"], cwd=REPO, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "is in use" in results[1][1] or "exists: add --continue_train" in results[1][1]
    steps = [row["step"] for row in read_log(tmp_path / "same") if "eval" not in row]
    assert steps == list(range(1, 21))


def test_a_run_that_crashed_before_its_first_save_resumes(data, tmp_path, capsys, monkeypatch):
    """§15: a run writes ckpt_latest.pt (step 0) before its first step, so one that
    crashes at step 3 of 500 has a folder that a second start refuses (exit 2,
    --continue_train named) and that --continue_train goes on from: steps 1-4
    logged once each, the crashed run's rows dropped."""
    step, calls = dcl.MODES["cut"].step, [0]

    def crash_at_3(*args, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("crash")
        return step(*args, **kw)
    monkeypatch.setitem(dcl.MODES, "cut", dcl.MODES["cut"]._replace(step=crash_at_3))
    flags = ["--dataroot", data, *TINY, "--checkpoints_dir", tmp_path, "--name", "r"]
    with pytest.raises(RuntimeError):
        train_in_process(capsys, *flags, "--max_steps", 4)
    assert torch.load(tmp_path / "r" / "ckpt_latest.pt", weights_only=True)["step"] == 0
    code, out, err = train_in_process(capsys, *flags, "--max_steps", 4)
    assert code == 2 and "--continue_train" in err, err
    code, out, err = train_in_process(capsys, "--name", "r", "--checkpoints_dir", tmp_path,
                                      "--continue_train", "--max_steps", 4)
    assert code == 0, err
    assert [row["step"] for row in read_log(tmp_path / "r")] == [1, 2, 3, 4]


def gray_dataset(root: Path) -> Path:
    """trainA/testA grayscale (L), trainB/testB RGB, 40x40."""
    for split, count in (("train", 3), ("test", 2)):
        for i in range(count):
            write_image(root / f"{split}A" / f"{i}.png", (40, 40), "L", seed=40 + i)
            write_image(root / f"{split}B" / f"{i}.png", (40, 40), "RGB", seed=50 + i)
    return root


def test_one_channel_domains(tmp_path, capsys):
    """§2, §3, §13, §14, §17: --input_nc 1 reads the source as grayscale
    (1×h×w, the L image's values) and builds every network for it: in DCLGAN,
    G_ab 1→3, G_ba 3→1, D_a on 1 channel, D_b on 3, H_a's layer-0 tap 1
    channel; it trains (identity off, exit 0), its samples are RGB, translate
    writes RGB from G_ab and grayscale from G_ba, and the weights load as an
    official 1-channel state dict too (channels read off the weights)."""
    data = gray_dataset(tmp_path / "d")
    cfg = tiny_cfg(dataroot=str(data), mode="dcl", input_nc=1, lambda_IDT=0.0,
                   nce_layers="0,4,8", no_flip=True)
    a, b, _ = dcl.UnpairedDataset(cfg)[(1, 0, True)]
    gray = np.array(Image.open(data / "trainA" / "0.png").resize((32, 32),
                                                                Image.Resampling.BICUBIC))
    assert a.shape == (1, 32, 32) and b.shape == (3, 32, 32)
    assert torch.allclose(a[0], torch.from_numpy(gray).float() / 127.5 - 1, atol=1e-6)
    nets = dcl.build_networks(cfg, "cpu")
    assert (nets["G_ab"].model[1].in_channels, nets["G_ab"].model[-2].out_channels) == (1, 3)
    assert (nets["G_ba"].model[1].in_channels, nets["G_ba"].model[-2].out_channels) == (3, 1)
    assert nets["D_a"].model[0].in_channels == 1 and nets["D_b"].model[0].in_channels == 3
    assert nets["H_a"].mlp_0[0].in_features == 1 and nets["H_b"].mlp_0[0].in_features == 3
    code, out, err = train_in_process(capsys, "--mode", "dcl", "--dataroot", data, *TINY,
                                      "--input_nc", 1, "--lambda_IDT", 0, "--max_steps", 2,
                                      "--checkpoints_dir", tmp_path, "--name", "g")
    assert code == 0, err
    assert Image.open(tmp_path / "g" / "samples" / "latest.png").mode == "RGB"
    ckpt = tmp_path / "g" / "ckpt_latest.pt"
    translate_in_process(capsys, ckpt, data / "testA", tmp_path / "ab")
    translate_in_process(capsys, ckpt, data / "testB", tmp_path / "ba", "--direction", "BtoA")
    assert Image.open(tmp_path / "ab" / "0.png").mode == "RGB"
    assert Image.open(tmp_path / "ba" / "0.png").mode == "L"
    state = torch.load(ckpt, weights_only=True)["nets"]["G_ba"]
    torch.save(state, tmp_path / "latest_net_G.pth")
    G, cfg = dcl.load_generator(tmp_path / "latest_net_G.pth", "cut", "AtoB", "cpu")
    assert (cfg.input_nc, cfg.output_nc) == (3, 1)


@pytest.mark.parametrize("mode, flags, words", [
    ("cut", ["--input_nc", 1], ["--input_nc 1 --output_nc 3", "--mode cut", "dcl"]),
    ("fastcut", ["--output_nc", 1], ["--input_nc 3 --output_nc 1", "--mode fastcut"]),
    ("dcl", ["--input_nc", 1], ["--mode dcl", "--lambda_IDT 0"]),
    ("cyclegan", ["--output_nc", 1], ["--mode cyclegan", "--lambda_IDT 0"]),
    ("cut", ["--input_nc", 2], ["--input_nc", "invalid choice"])])
def test_channel_counts_that_cannot_work_are_refused(mode, flags, words, tmp_path, capsys):
    """§12: different channel counts on the two sides need two generators (CUT's
    one G encodes its own output and translates b images) and no identity term
    (G(b) must look like b); 1 and 3 are the counts the loader makes."""
    code, out, err = train_in_process(capsys, "--mode", mode, *flags, "--checkpoints_dir",
                                      tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(word in err for word in words), err


@pytest.mark.parametrize("mode", ["cut", "cyclegan"])
def test_grayscale_on_both_sides_trains(mode, tmp_path, capsys):
    """§9, §13: both domains grayscale (--input_nc 1 --output_nc 1) train in a
    one-generator mode and in CycleGAN (identity on, its pool holds 1-channel
    fakes), their weights finite after two steps at batch 1."""
    data = tmp_path / "d"
    for split in ("train", "test"):
        for side in "AB":
            for i in range(2):
                write_image(data / f"{split}{side}" / f"{i}.png", (40, 40), "L", seed=i)
    code, out, err = train_in_process(capsys, "--mode", mode, "--dataroot", data, *TINY,
                                      "--input_nc", 1, "--output_nc", 1, "--max_steps", 2,
                                      "--pool_size", 2, "--checkpoints_dir", tmp_path,
                                      "--name", mode)
    assert code == 0, err
    ckpt = torch.load(tmp_path / mode / "ckpt_latest.pt", weights_only=True)
    if mode == "cyclegan":
        assert ckpt["nets"]["pool_a"]["images"].shape == (2, 1, 32, 32)
    assert all(v.isfinite().all() for net in ckpt["nets"].values() for v in net.values()
               if torch.is_tensor(v) and v.is_floating_point())


def test_test_command_uses_the_runs_data_and_direction(runs, data, tmp_path, capsys):
    """§17: without --dataroot, test reads the run's own data (its 3 testA images,
    not the bundled set's 30); a --direction other than the run's uses its other
    generator: for a DCLGAN run trained AtoB, --direction BtoA translates testB
    with G_ba, byte for byte what `translate --direction BtoA --resize 32` writes."""
    for mode, extra in (("cut", []), ("dcl", ["--direction", "BtoA"])):
        run = runs(mode)[1]
        code, out, err = main_in_process(capsys, "test", "--name", mode, "--checkpoints_dir",
                                         run.parent, "--results_dir", tmp_path / "r", "--device",
                                         "cpu", *extra)
        assert code == 0, err
    fakes = tmp_path / "r" / "cut" / "test_latest" / "images" / "fake_B"
    assert len(list(fakes.rglob("*.png"))) == 3
    translate_in_process(capsys, runs("dcl")[1] / "ckpt_latest.pt", data / "testB", tmp_path / "t",
                         "--direction", "BtoA", "--resize", 32)
    fakes = tmp_path / "r" / "dcl" / "test_latest" / "images" / "fake_B"
    assert sorted(p.name for p in fakes.iterdir()) == ["0.png", "1.png"]
    for name in ("0.png", "1.png"):
        assert (fakes / name).read_bytes() == (tmp_path / "t" / name).read_bytes()
