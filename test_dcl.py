"""Tests for dcl.py: networks, PatchNCE, data, training step, and the command line.

    python -m pytest -q

Everything runs on the CPU at tiny sizes (ngf 8, 32-pixel crops, S = 16,
E = 16), so the whole file takes about a minute on two cores. Parameter counts
and state-dict keys at the official sizes are checked on the meta device.
Section numbers (§N) refer to the banners of dcl.py; "methods.md" is the
fidelity spec.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
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
              "fastnegcut": {"D_real", "D_fake", "G_GAN", "NCE", "G", "N"}}
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
    G, crop back, (y + 1)/2·255 truncated to uint8 (methods.md §6)."""
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32))
    x = (x.permute(2, 0, 1) / 255.0 - 0.5) / 0.5
    h, w = x.shape[1:]
    with torch.no_grad():
        y = G(torch.nn.functional.pad(x[None], (0, -w % 4, 0, -h % 4), mode="reflect"))[0, :, :h, :w]
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
# networks (§2-§5)
# -----------------------------------------------------------------------------

def weight_and_bias(key, shape):
    return {f"{key}.weight": shape, f"{key}.bias": shape[:1]}


def shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_parameter_counts_at_official_sizes():
    """§3-§5: G, D and H have the official parameter counts (methods.md §1.10)."""
    with torch.device("meta"):
        G, D = dcl.Generator(64), dcl.Discriminator(64)
        H5 = dcl.ProjectionHead(G.tap_channels((0, 4, 8, 12, 16)), 256)
        H4 = dcl.ProjectionHead(G.tap_channels((4, 8, 12, 16)), 256)
    assert [dcl.count_parameters(net) for net in (G, D, H5, H4)] == \
        [11_378_179, 2_764_737, 560_384, 493_568]


def test_state_dict_keys_are_official():
    """§3-§5: the keys and shapes of G (52 entries), D (13) and H are the
    official ones, written out here from methods.md §1.4, §1.6 and §1.7."""
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
    for i, (o, c) in {0: (64, 3), 3: (128, 64), 7: (256, 128), 11: (512, 256), 14: (1, 512)}.items():
        d.update(weight_and_bias(f"model.{i}", (o, c, 4, 4)))
    h = {}
    for l, c in enumerate((3, 128, 256, 256, 256)):
        h.update({**weight_and_bias(f"mlp_{l}.0", (256, c)), **weight_and_bias(f"mlp_{l}.2", (256, 256))})
    assert (len(g), len(d)) == (52, 13)
    assert shapes(G) == g and shapes(D) == d and shapes(H) == h


def test_shapes_at_256():
    """§3-§4: at 256x256, G gives 3x256x256 in [-1, 1], D a 1x30x30 score map,
    and the taps 0,4,8,12,16 are 3x262², 2ngf x256², 4ngf x128², 4ngf x64², 4ngf x64²."""
    torch.manual_seed(0)
    ngf = 8
    G, D = dcl.init_weights(dcl.Generator(ngf)), dcl.init_weights(dcl.Discriminator(8))
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        y, scores, taps = G(x), D(x), G.encode(x, (0, 4, 8, 12, 16))
    assert y.shape == (1, 3, 256, 256) and y.min() >= -1 and y.max() <= 1
    assert scores.shape == (1, 1, 30, 30)
    assert [t.shape[1:] for t in taps] == [(3, 262, 262), (2 * ngf, 256, 256),
                                           (4 * ngf, 128, 128), (4 * ngf, 64, 64), (4 * ngf, 64, 64)]


def test_encode_is_a_prefix_run_that_stops_early():
    """§3: G.encode returns exactly the outputs of the listed layers of G.model,
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
    """§2: the blur kernels are [1,2,1]⊗[1,2,1]/16 and 4·[1,3,3,1]⊗[1,3,3,1]/64,
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
    """§2, §8: build_networks gives every conv and linear weight
    std = 0.02·√(2/(fan_in+fan_out)) and zero biases. A resblock conv at ngf 64
    has fan_in = fan_out = 256·9 = 2304, so std = 0.02·√(2/4608) ≈ 4.167e-4;
    H's mlp_4.2 (256x256) has std = 0.02·√(2/512) = 1.25e-3."""
    nets = dcl.build_networks(dcl.resolve_config({"dataroot": "unused"})[0], "cpu")
    conv = nets["G"].model[12].conv_block[1].weight
    assert conv.std().item() == pytest.approx(0.02 * math.sqrt(2 / 4608), rel=0.05)
    assert nets["H"].mlp_4[2].weight.std().item() == pytest.approx(1.25e-3, rel=0.05)
    for net in nets.values():
        for name, p in net.named_parameters():
            assert not name.endswith("bias") or not p.any(), name


def test_official_state_dict_loads_strictly(tmp_path):
    """§3: a G state dict saved as an official latest_net_G.pth loads into a new
    Generator with strict=True and gives the same outputs."""
    torch.manual_seed(0)
    G = dcl.init_weights(dcl.Generator(8))
    torch.save(G.state_dict(), tmp_path / "latest_net_G.pth")
    G2 = dcl.Generator(8)
    G2.load_state_dict(torch.load(tmp_path / "latest_net_G.pth", weights_only=True), strict=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(G(x), G2(x))


def test_two_generator_parameter_counts_at_official_sizes():
    """§3-§5, §8: on the meta device, the non-antialiased G (both flags off)
    has the antialiased G's 11,378,179 parameters, the stride-2 D 2,764,737,
    a MappingHead 10,688 (conv 4·64·9 + 64 = 2,368, two linears
    2·(64·64 + 64) = 8,320). build_networks at official sizes (ngf = ndf = 64,
    E = 256) trains 2·11,378,179 + 2·2,764,737 = 28,285,832 parameters for
    CycleGAN (the pools hold buffers only), + 2·493,568 = 29,272,968 for
    DCLGAN, + 4·10,688 = 29,315,720 for SimDCL (methods.md §1.10)."""
    totals = {}
    with torch.device("meta"):
        G, D, M = dcl.Generator(64, False, False), dcl.Discriminator(64, False), dcl.MappingHead()
        for mode in TWO_SIDED:
            nets = dcl.build_networks(dcl.resolve_config({"mode": mode, "dataroot": "x"})[0], "meta")
            assert list(nets) == list(dcl.NETWORKS[mode])
            totals[mode] = sum(dcl.count_parameters(net) for net in nets.values())
    assert [dcl.count_parameters(net) for net in (G, D, M)] == [11_378_179, 2_764_737, 10_688]
    assert totals == {"cyclegan": 28_285_832, "dcl": 29_272_968, "simdcl": 29_315_720}


def test_upstream_cyclegan_state_dict_keys():
    """§3-§4: with both antialias flags off, G has upstream CycleGAN's 48 keys
    (methods.md §1.4): model.1 (conv7 3→64), model.4 and model.7 (stride-2
    conv3 64→128, 128→256), model.10..18.conv_block.{1,5}, the transposed
    convs model.19 and model.22 (weights stored in×out×3×3: 256x128 and
    128x64, biases of the output width), model.26 (conv7 64→3), and no `filt`
    buffer. The stride-2 D has model.{0,2,5,8,11} (10 keys, methods.md §1.6).
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
    """§3-§4: the non-antialiased G maps 64x64 to 3x64x64 (two stride-2 convs
    64 → 32 → 16, two transposed convs with output_padding 1 back to 64); the
    stride-2 D (ndf 8) maps 256x256 to a 1x30x30 score map: k4 s2 p1 gives
    256 → 128 → 64 → 32, then k4 s1 p1 gives 31 and 30 (methods.md §1.6)."""
    torch.manual_seed(0)
    G = dcl.init_weights(dcl.Generator(8, False, False), "normal")
    D = dcl.init_weights(dcl.Discriminator(8, False), "normal")
    with torch.no_grad():
        y = G(torch.rand(2, 3, 64, 64) * 2 - 1)
        scores = D(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert y.shape == (2, 3, 64, 64) and y.min() >= -1 and y.max() <= 1
    assert scores.shape == (1, 1, 30, 30)


def test_translate_official_cyclegan_generator(data, tmp_path, capsys):
    """§10: a random non-antialiased G saved as CycleGAN's latest_net_G_A.pth
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
# projection head (§5)
# -----------------------------------------------------------------------------

def test_projection_head():
    """§5: rows are unit vectors, (n·S)xE, image-major; S is clamped to H·W;
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
# image pool (§5)
# -----------------------------------------------------------------------------

def test_image_pool_fills_then_swaps_at_random():
    """§5: capacity 3. The first 3 fakes are stored in slots 0..2 and returned
    unchanged (count 1, 2, 3). Once full, each returned image is either the new
    one (pool unchanged) or exactly one stored image, whose slot then holds the
    new one (methods.md §3.6); with the torch RNG seeded, both happen within 20
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
    """§5: with capacity 0 (--pool_size 0, upstream's "no pool") the pool
    returns its input, detached, whatever the RNG draws."""
    pool = dcl.ImagePool(0, 4)
    torch.manual_seed(0)
    fakes = torch.rand(4, 3, 4, 4, requires_grad=True)
    out = pool(fakes)
    assert torch.equal(out, fakes) and not out.requires_grad and pool.count == 0


def test_image_pool_state_round_trips(tmp_path):
    """§5, §9: the pool's images and its count travel through state_dict /
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
# losses (§6)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, p, real, expected", [
    ("lsgan", 0.5, True, 0.25), ("lsgan", 0.5, False, 0.25), ("lsgan", 1.0, True, 0.0),
    ("hinge", 0.5, True, 0.5), ("hinge", 0.5, False, 1.5), ("hinge", 2.0, True, 0.0)])
def test_gan_loss_known_answers(mode, p, real, expected):
    """§6: on a constant map p, lsgan real = (p−1)², fake = p²; hinge real =
    relu(1−p), fake = relu(1+p). p = 0.5: lsgan 0.25 both; hinge 0.5 and 1.5;
    lsgan real at p = 1 and hinge real at p = 2 are 0."""
    assert dcl.gan_loss(torch.full((2, 1, 30, 30), p), real, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("tau", [0.07, 1.0, 10.0])
def test_patch_nce_known_answer(tau):
    """§6: q = k = three orthonormal vectors (n = 1). Row i has l_pos = 1, l_neg
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
    """The official semantics, one row at a time (methods.md §2.2)."""
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
    """§6: patch_nce_loss equals a literal loop over images and patches (to
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
    """§6: the keys are detached (Q2); the gradient enters through the queries only."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_()
    dcl.patch_nce_loss(q, k, 2).sum().backward()
    assert k.grad is None or not k.grad.any()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_nce_between_known_answer_with_a_constant_head():
    """§6: if H maps every patch to one unit vector u, each row has l_pos = 1,
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
    loss = dcl.nce_between(x, y, G, H, G, H, cfg).item()
    assert loss == pytest.approx(2.0 * (3 * math.log(100) + 2 * math.log(64)) / 5, rel=1e-5)


def test_nce_between_flip_back():
    """§6: flip_back flips the query maps back along the width. G's stride-1
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
        losses.append(dcl.nce_between(src, output, G, H, G, H, cfg, flip_back).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[2] != pytest.approx(losses[1], rel=1e-2)   # without flip_back it differs


def test_whole_batch_negatives():
    """§6: n_images = 1 views an (n·S)xE batch as one pool (DCLGAN, methods.md
    §2.3, Q23): it equals the slow loop run as one image of n·S = 15 patches,
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
                losses[name, n] = dcl.nce_between(x[:n], y[:n], G, H, G, H, cfg)
    assert torch.equal(losses["whole", 1], losses["same", 1])
    assert losses["whole", 2] > losses["same", 2]


def literal_similarity(keys_a, queries_a, keys_b, queries_b, heads):
    """The official batch-1 SimDCL construction (methods.md §3.5, Q26): each
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
    included (nothing detached, Q27)."""
    torch.manual_seed(0)
    L, S, E, n = 4, 16, 16, 4
    heads = {name: dcl.MappingHead(L) for name in ("M_ra", "M_fb", "M_rb", "M_fa")}
    unit = lambda t: t / t.norm(dim=1, keepdim=True)          # noqa: E731
    sets = [[unit(torch.randn(n * S, E)).requires_grad_() for _ in range(L)] for _ in range(4)]
    per_image = []
    for b in range(n):
        one = [[f[b * S:(b + 1) * S] for f in feats] for feats in sets]
        per_image.append(literal_similarity(*one, heads))
        assert dcl.similarity_loss(*one, heads, 1).item() == pytest.approx(per_image[-1].item(), abs=1e-7)
    assert len({round(v.item(), 6) for v in per_image}) == n       # four different images
    loss = dcl.similarity_loss(*sets, heads, n)
    assert loss.item() == pytest.approx(torch.stack(per_image).mean().item(), rel=1e-6)
    loss.backward()
    for feats in sets:                                        # keys_a, queries_a, keys_b, queries_b
        assert all(f.grad is not None and f.grad.any() for f in feats)
    for name, head in heads.items():
        assert all(p.grad is not None and p.grad.any() for p in head.parameters()), name

# -----------------------------------------------------------------------------
# the training step (§8)
# -----------------------------------------------------------------------------

def test_cut_step_gradient_routing():
    """§8: L_D reaches D only (fake_b detached); L_G reaches G (first and last
    conv) and every MLP of H, and leaves D's gradients as the D step left them;
    after the step every parameter tensor of G, D and H has changed."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    nets, seen = dcl.build_networks(cfg, "cpu"), {}
    opts = dcl.build_optimizers(nets, cfg)
    grads = lambda net: [None if p.grad is None else p.grad.clone() for p in net.parameters()]  # noqa: E731

    def spy(name, record):
        step = opts[name].step
        opts[name].step = lambda *a, **k: (record(), step(*a, **k))[1]
    spy("D", lambda: seen.update(D_at_D=grads(nets["D"]), G_at_D=grads(nets["G"]),
                                 H_at_D=grads(nets["H"])))
    spy("G", lambda: seen.update(D_at_G=grads(nets["D"]), G=dict(nets["G"].named_parameters()),
                                 H=dict(nets["H"].named_parameters())))
    before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
    dcl.cut_step(nets, opts, torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, cfg)
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
    """§8: cut_step returns the official loss names (NCE_Y only with the identity
    pass), finite and detached, and G = G_GAN + 0.5·(NCE + NCE_Y) for CUT (the
    code averages the two NCE terms) or G_GAN + NCE for FastCUT."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode=mode)
    nets = dcl.build_networks(cfg, "cpu")
    losses = dcl.cut_step(nets, dcl.build_optimizers(nets, cfg), torch.rand(1, 3, 32, 32),
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
    """§8: dual_step's D step (fakes detached) gives G_ab, G_ba, H_a, H_b (and
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
    dcl.dual_step(nets, opts, torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, cfg)
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
    """§8: NCE1 = nce_between(real_a, fake_b, G_ab, H_a, G_ba, H_b): keys
    H_a(G_ab.encode(real_a)), detached; queries H_b(G_ba.encode(fake_b)). So
    NCE1 alone (fake_b a fixed image) gives H_a and G_ab no gradient and every
    parameter of H_b a non-zero one, and reaches G_ba's encoder: H_a learns
    only from NCE2's queries (methods.md §3.4)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode="dcl")
    nets = dcl.build_networks(cfg, "cpu")
    real_a, fake_b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    dcl.nce_between(real_a, fake_b, nets["G_ab"], nets["H_a"], nets["G_ba"], nets["H_b"], cfg).backward()
    grads = gradients(nets)
    assert all(g is None or not g.any() for name in ("G_ab", "H_a") for g in grads[name])
    assert all(g is not None and g.any() for g in grads["H_b"])
    assert nets["G_ba"].model[1].weight.grad.any()           # the first conv of the query encoder


@pytest.mark.parametrize("mode", TWO_SIDED)
def test_two_generator_step_losses(mode):
    """§8: dual_step and cyclegan_step return the official loss names, finite,
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
            expected.update(D_A=0.5 * ((D_b(real_b) - 1) ** 2 + D_b(fake_b) ** 2).mean(),
                            D_B=0.5 * ((D_a(real_a) - 1) ** 2 + D_a(fake_a) ** 2).mean(),
                            G_A=((D_b(fake_b) - 1) ** 2).mean(), G_B=((D_a(fake_a) - 1) ** 2).mean(),
                            cycle_A=10 * l1(G_ba(fake_b), real_a), cycle_B=10 * l1(G_ab(fake_a), real_b))
        else:
            expected.update(D_A=0.5 * ((1 - D_b(real_b)).relu().mean() + (1 + D_b(fake_b)).relu().mean()),
                            D_B=0.5 * ((1 - D_a(real_a)).relu().mean() + (1 + D_a(fake_a)).relu().mean()))
    losses = dcl.STEPS[mode](nets, dcl.build_optimizers(nets, cfg), real_a, real_b, cfg)
    assert set(losses) == LOSS_NAMES[mode]
    assert all(v.shape == () and torch.isfinite(v) and not v.requires_grad for v in losses.values())
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5), name
    if mode == "cyclegan":
        combination = sum(losses[k] for k in ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B"))
    else:
        combination = 0.5 * (losses["G_A"] + losses["G_B"]) + 0.5 * (losses["NCE1"] + losses["NCE2"]) \
            + 0.5 * (losses["idt_A"] + losses["idt_B"]) + losses.get("Sim", 0.0)
    assert losses["G"].item() == pytest.approx(float(combination), rel=1e-6)
    assert mode != "simdcl" or losses["Sim"] > 0


class ScaleByW(torch.nn.Module):
    """x·w with one trainable scalar w = 1: an identity generator that backward
    and Adam can still work on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.w


def test_cyclegan_identity_generators_give_zero_cycle_and_identity():
    """§8: with G_ab = G_ba = identity (x·1), rec_a = real_a, rec_b = real_b,
    idt_b = real_b, idt_a = real_a, so cycle_A, cycle_B, idt_A and idt_B are
    exactly 0 and G = G_A + G_B; the adversarial term still moves w."""
    torch.manual_seed(0)
    cfg = tiny_cfg(mode="cyclegan")
    nets = dcl.build_networks(cfg, "cpu")
    nets.update(G_ab=ScaleByW(), G_ba=ScaleByW())
    losses = dcl.cyclegan_step(nets, dcl.build_optimizers(nets, cfg), torch.rand(1, 3, 32, 32) * 2 - 1,
                               torch.rand(1, 3, 32, 32) * 2 - 1, cfg)
    assert [losses[k].item() for k in ("cycle_A", "cycle_B", "idt_A", "idt_B")] == [0.0] * 4
    assert losses["G"].item() == pytest.approx((losses["G_A"] + losses["G_B"]).item(), rel=1e-6)
    assert nets["G_ab"].w.item() != 1.0 and nets["G_ba"].w.item() != 1.0


def test_cyclegan_step_gradient_routing():
    """§8: cyclegan_step's G step runs with D_a and D_b frozen (its docstring;
    methods.md §3.6, §4: requires_grad False), so D has no gradient when Adam
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
    dcl.cyclegan_step(nets, opts, torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1, cfg)
    for name in ("G_ab", "G_ba"):
        assert all(g is not None and g.any() for g in seen["at_G"][name]), name
        assert all(torch.equal(a, b) for a, b in zip(seen["at_G"][name], seen["at_D"][name])), name
    assert all(g is not None and g.any() for name in ("D_a", "D_b") for g in seen["at_D"][name])
    assert all(g is None for name in ("D_a", "D_b") for g in seen["at_G"][name])

# -----------------------------------------------------------------------------
# config and schedule (§1, §9)
# -----------------------------------------------------------------------------

def test_mode_presets_and_precedence():
    """§1: presets set λ_NCE, nce_idt, flip and epochs; flags beat presets; the
    demo settings apply only without --dataroot; other defaults are official.
    §8: one Adam(2e-4, (0.5, 0.999)) each for G, D and H."""
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
    """§1 (methods.md §3.4-§3.6, Q17, Q21-Q28): DCLGAN taps 4,8,12,16 with
    hinge, λ_NCE 2, λ_IDT 1, whole-batch negatives, no pool, heads at lr 1e-3
    and beta1 0.9, 200 + 200 epochs. SimDCL: the same but λ_NCE 1 (the
    effective weight: the official λ_NCE 2 is never applied), λ_SIM 10, heads
    at --lr and --beta1. CycleGAN: lsgan, λ_IDT 0.5, λ_A = λ_B = 10, a pool of
    50, normal init, both antialias flags off, 100 + 100 epochs with crops in
    the decay epochs. None of them runs CUT's identity NCE. NETWORKS lists each
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
    assert (c.gan_mode, c.lambda_IDT, c.lambda_A, c.lambda_B, c.pool_size, c.init_type, c.no_antialias,
            c.no_antialias_up, c.n_epochs, c.n_epochs_decay, c.crop_in_decay, c.nce_idt, c.lambda_SIM) == \
        ("lsgan", 0.5, 10.0, 10.0, 50, "normal", True, True, 100, 100, True, False, 0.0)
    assert not d.crop_in_decay and not s.crop_in_decay
    assert {m: dcl.NETWORKS[m] for m in ONE_SIDED + TWO_SIDED} == {
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
    """§8 (methods.md §4): one Adam per family, no weight decay: G over G_ab ∪
    G_ba and D over D_a ∪ D_b, both (2e-4, (0.5, 0.999)); H over H_a ∪ H_b at
    Adam's defaults (1e-3, (0.9, 0.999)) for DCLGAN (Q17), over H_a ∪ H_b and
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
    """§9: 1 − max(0, e − 200)/201 for 200 + 200 epochs: 1 for epochs 1..200,
    1 − 1/201 at 201, and 1/201 (never 0) at 400."""
    cfg = dcl.resolve_config({"dataroot": "x", "n_epochs": 200, "n_epochs_decay": 200})[0]
    assert dcl.lr_multiplier(1, cfg) == 1.0 and dcl.lr_multiplier(200, cfg) == 1.0
    assert dcl.lr_multiplier(201, cfg) == pytest.approx(1 - 1 / 201)
    assert dcl.lr_multiplier(400, cfg) == pytest.approx(1 / 201)


def expected_resize(path, size):
    """A plain PIL bicubic resize to size², mapped to [−1, 1] (methods.md §5)."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def test_no_crop_in_decay_epochs(data):
    """§7: the sampler switches cropping off after n_epochs (Q9) unless
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
    """§7: every (seed, epoch, position) gets its own item seed, so no item of
    epoch 2 repeats the B draw, crop and flip of an item of epoch 1 (a linear
    seed formula once made position p + 7919 of one epoch equal position p of
    the next)."""
    cfg = dcl.resolve_config({"dataroot": "x"})[0]
    seeds = [{key[0] for key in dcl.EpochSampler(8000, cfg, epoch)} for epoch in (1, 2)]
    assert len(seeds[0]) == len(seeds[1]) == 8000 and not seeds[0] & seeds[1]

# -----------------------------------------------------------------------------
# data (§7)
# -----------------------------------------------------------------------------

def test_find_images(tmp_path):
    """§7: find_images walks subfolders, matches extensions in any case, skips other files."""
    names = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.BMP", "e.tif", "f.webp", "g.Png"]
    for name in names + ["notes.txt", "sub/readme.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert dcl.find_images(tmp_path) == sorted(tmp_path / n for n in names)


def test_dataset_modes_lengths_and_reproducibility(data):
    """§7: L, RGBA and P images load as 3-channel tensors in [−1, 1]; the length
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
# command line: train and translate (§9-§11)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(dcl.MODES))
def test_train_then_translate(mode, runs, data, tmp_path):
    """§9-§10: `train --max_steps 2` writes a checkpoint, two log rows with the
    mode's losses, samples and config.json; `translate` writes one PNG per
    input, at the input's size and relative path (subfolders kept)."""
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
    proc = cli("translate", "--checkpoint", run_dir / "ckpt_latest.pt", "--input", data / "testA",
               "--output", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    inputs = sorted(p.relative_to(data / "testA") for p in (data / "testA").rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == \
        sorted(p.with_suffix(".png") for p in inputs) and len(inputs) == 3
    for rel in inputs:
        assert Image.open(out / rel.with_suffix(".png")).size == Image.open(data / "testA" / rel).size


def test_resume_gives_identical_losses_and_weights(data, tmp_path):
    """§9: 4 steps in one run equal 2 steps, then --continue_train to 4
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
        assert {k: row_a[k] for k in LOSS_NAMES["fastcut"]} == {k: row_b[k] for k in LOSS_NAMES["fastcut"]}
    nets_a, nets_b = (torch.load(tmp_path / n / "ckpt_latest.pt", weights_only=True)["nets"]
                      for n in "AB")
    for net in ("G", "D", "H"):
        assert all(torch.equal(nets_a[net][k], nets_b[net][k]) for k in nets_a[net])


def test_resume_at_max_steps_trains_nothing(runs, tmp_path):
    """§9: --max_steps counts steps in all, so continuing a run that already
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
    """§9-§10: the checkpoint loads with weights_only=True; translate's output
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
    """§10: G's weights (G_ab's in two-generator modes) saved as an official
    latest_net_G.pth (latest_net_G_A.pth) translate to byte-identical PNGs
    given --mode; without --mode, exit 2 naming --mode."""
    _, run_dir = runs(mode)
    nets = torch.load(run_dir / "ckpt_latest.pt", weights_only=True)["nets"]
    one_sided = "G" in nets
    official = tmp_path / ("latest_net_G.pth" if one_sided else "latest_net_G_A.pth")
    torch.save(nets["G" if one_sided else "G_ab"], official)
    translate_in_process(capsys, run_dir / "ckpt_latest.pt", data / "testA", tmp_path / "ours")
    translate_in_process(capsys, official, data / "testA", tmp_path / "theirs", "--mode", mode)
    ours = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours").rglob("*.png"))
    assert len(ours) == 3
    for rel in ours:
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "theirs" / rel).read_bytes()
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", official, "--input",
                                   data / "testA", "--output", tmp_path / "x", "--device", "cpu")
    assert code == 2 and "--mode" in err


def test_translate_btoa_uses_g_ba(runs, data, tmp_path, capsys):
    """§10: --direction BtoA on a DCLGAN checkpoint translates with G_ba: on
    testB its PNGs differ from the AtoB ones (G_ab), and the one for 0.png
    equals G_ba(x) computed here from the checkpoint."""
    _, run_dir = runs("dcl")
    checkpoint = run_dir / "ckpt_latest.pt"
    translate_in_process(capsys, checkpoint, data / "testB", tmp_path / "ab")
    translate_in_process(capsys, checkpoint, data / "testB", tmp_path / "ba", "--direction", "BtoA")
    names = sorted(p.name for p in (tmp_path / "ba").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["0.png", "1.png"]
    read = lambda path: np.asarray(Image.open(path))         # noqa: E731
    assert all(not np.array_equal(read(tmp_path / "ab" / n), read(tmp_path / "ba" / n)) for n in names)
    ckpt = torch.load(checkpoint, weights_only=True)
    G_ba = dcl.make_generator(dcl.TrainConfig(**ckpt["config"]))
    G_ba.load_state_dict(ckpt["nets"]["G_ba"])
    expected = translated_by_hand(G_ba, data / "testB" / "0.png")
    assert np.array_equal(read(tmp_path / "ba" / "0.png"), expected)


def test_resume_cyclegan_restores_the_image_pools(data, tmp_path, capsys):
    """§9: CycleGAN, 4 steps in one run equal 2 steps, then --continue_train
    to 4: identical log rows 3-4 and identical nets, the pools' images and
    counts included. --pool_size 1 makes the pools full after step 1, so from
    step 2 on D sees a random mix of the restored pool and new fakes (torch
    RNG). In-process (no --deterministic: it would switch torch's global
    deterministic mode on for the rest of the session; the CPU kernels used
    here are deterministic anyway)."""
    mode = "cyclegan"
    flags = ["--mode", mode, "--dataroot", data, *TINY, "--pool_size", 1, "--seed", 1,
             "--checkpoints_dir", tmp_path]
    for name, extra in (("A", ["--max_steps", 4]), ("B", ["--max_steps", 2]),
                        ("B", ["--max_steps", 4, "--continue_train"])):
        code, _, err = train_in_process(capsys, *flags, "--name", name, *extra)
        assert code == 0, err
    a, b = read_log(tmp_path / "A"), read_log(tmp_path / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a[2:], b[2:]):
        assert {k: row_a[k] for k in LOSS_NAMES[mode]} == {k: row_b[k] for k in LOSS_NAMES[mode]}
    nets_a, nets_b = (torch.load(tmp_path / n / "ckpt_latest.pt", weights_only=True)["nets"] for n in "AB")
    assert [nets[p]["_extra_state"] for nets in (nets_a, nets_b) for p in ("pool_a", "pool_b")] == [1] * 4
    for net in dcl.NETWORKS["cyclegan"]:
        assert nets_a[net].keys() == nets_b[net].keys()
        assert all(torch.equal(nets_a[net][k], nets_b[net][k]) for k in nets_a[net] if k != "_extra_state")


def test_translate_never_overwrites_its_own_output(runs, data, tmp_path, capsys):
    """§10: translate writes one PNG per input (F8): x.jpg and x.png in one
    folder become x.jpg.png and x.png.png instead of overwriting one x.png."""
    _, run_dir = runs("cut")
    shutil.copy(data / "testA" / "0.jpg", tmp_path / "x.jpg")
    shutil.copy(data / "trainB" / "0.png", tmp_path / "x.png")
    code, _, err = main_in_process(capsys, "translate", "--checkpoint", run_dir / "ckpt_latest.pt",
                                   "--input", tmp_path, "--output", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.jpg.png", "x.png.png"]

# -----------------------------------------------------------------------------
# command line: errors, --help, size (§11)
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
        return train + ["--dataroot", data, "--mode", "simdcl", "--num_patches", 256], "--num_patches"
    (tmp_path / "empty").mkdir()
    return translate + ["--input", tmp_path / "empty", "--output", tmp_path / "o"], "empty"


@pytest.mark.parametrize("case", ["missing_dataroot", "trainA_missing", "trainB_empty",
                                  "unknown_mode", "crop_larger_than_load", "not_a_checkpoint",
                                  "btoa", "output_is_input", "simdcl_too_few_positions",
                                  "empty_input"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, data, runs, capsys):
    """§11: every mistake in the command, data or files exits with status 2 and
    one stderr line "error: ..." naming the path or flag, without a traceback.
    Run in-process through dcl.main (the same code path as the command line;
    all of these fail before training starts) to keep the suite fast.
    SimDCL stacks S patches of every tapped layer; at 32 px the taps 12 and 16
    have 8·8 = 64 positions, so S = 256 is refused before any run folder exists."""
    argv, needle = bad_input(case, tmp_path, data, runs)
    code, _, err = main_in_process(capsys, *argv)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    if case == "simdcl_too_few_positions":
        assert "64" in err and not (tmp_path / "ck").exists()
    if case == "trainB_empty":
        assert "trainB" in err


def test_existing_run_is_refused_untouched(runs, data, tmp_path, capsys):
    """§9: train with the name of a run that has ckpt_latest.pt, without
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
    """§7, §9: when every trainA file is garbage, each read is skipped for
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


def test_corrupt_image_is_skipped_and_counted(data, tmp_path, capsys):
    """§7: one corrupt file among good ones is skipped with a warning naming
    it, replaced by another image of its domain, counted in the closing
    summary, and training finishes (exit 0). With --serial_batches and 4 A
    images, 4 steps read every A file once, so the bad one is met."""
    shutil.copytree(data, tmp_path / "d")
    (tmp_path / "d" / "trainA" / "1.png").write_bytes(b"truncated")
    code, out, err = train_in_process(capsys, "--dataroot", tmp_path / "d", *TINY, "--max_steps", 4,
                                      "--serial_batches", "--checkpoints_dir", tmp_path / "ck")
    assert code == 0, err
    assert "warning: skipping unreadable image" in err and str(tmp_path / "d" / "trainA" / "1.png") in err
    assert "skipped 1 reads of unreadable images" in out


def test_help_lists_every_config_field(capsys):
    """§11: `train --help` has one flag per TrainConfig field."""
    code, out, _ = main_in_process(capsys, "train", "--help")
    assert code == 0
    flags = set(re.findall(r"(?m)^\s+--(\w+)", out))
    assert {f.name for f in dataclasses.fields(dcl.TrainConfig)} <= flags


def test_line_budget():
    """style.md §3: dcl.py stays within 2,000 lines."""
    assert len(Path(dcl.__file__).read_text().splitlines()) <= 2000


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
