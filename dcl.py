"""dcl.py: contrastive unpaired image-to-image translation in one file.

A readable, runnable reference for patch-wise contrastive translation:
  CUT, FastCUT    Park, Efros, Zhang, Zhu, ECCV 2020, arXiv 2007.15651; official
                  code taesungp/contrastive-unpaired-translation (b3ac297).
  NEGCUT          Wang, Wang, Ma, Li, Jiang, ICCV 2021, arXiv 2108.04547; official
                  code WeilunWang/NEGCUT (c7dbe3d).
  DCLGAN, SimDCL  Han, Shoeiby, Petersson, Armin, CVPR Workshops 2021, arXiv
                  2104.07689; official code JunlinHan/DCLGAN (abb805c).
  CycleGAN        Zhu, Park, Isola, Efros, ICCV 2017, arXiv 1703.10593; the baseline
                  (upstream junyanz/pytorch-CycleGAN-and-pix2pix).
  Extensions, off by default: a VGG16 perceptual loss (--lambda_perc) and
  hard-negative weighting of PatchNCE (--nce_hard_beta).
Every network keeps the official layer indices and state-dict keys, so official
`latest_net_G.pth` files load strictly; every default is the official code's.

Commands
    python dcl.py train --mode simdcl                   # bundled data, demo settings
    python dcl.py train --mode cut --max_steps 2        # does one training cycle work?
    python dcl.py train --mode cut --dataroot ./datasets/horse2zebra --name h2z
    python dcl.py train --name h2z --continue_train     # resume exactly where it stopped
    python dcl.py translate --checkpoint checkpoints/h2z/ckpt_latest.pt \\
                            --input ./datasets/horse2zebra/testA --output ./results/h2z
    python dcl.py bench --mode all                      # s/iter, images/s, TFLOP/s per mode
    torchrun --nproc_per_node=4 dcl.py train --mode cut --dataroot ...   # multi-GPU

Contents ([core] = the methods, [plumbing] = the machinery around them)
    1. Config and mode presets [plumbing]      7. Unpaired data [plumbing]
    2. Building blocks                         8. The training steps [core]
    3. Generator G [core]                      9. The training loop [plumbing]
    4. Discriminator D (PatchGAN)             10. Translate [plumbing]
    5. Heads H, M, N; the image pool [core]   11. Bench [plumbing]
    6. Losses [core]                          12. Command line [plumbing]

Letters: n images per batch, S sampled patches per layer and image
(--num_patches), E projection width (--netF_nc), L tapped layers, C/H/W a
feature map's channels and size, τ the temperature (--nce_T). D is only ever
the discriminator. Domains are a (source, X) and b (target, Y).

Glossary (code name | paper symbol | official name or flag)
    G; G_ab, G_ba      | G; G: X→Y, F: Y→X         | netG; netG_A, netG_B
    G.encode, taps     | G_enc                     | netG(x, layers, encode_only=True)
    D; D_b, D_a        | D; D_Y, D_X               | netD; netD_A (judges B), netD_B
    H; H_a, H_b        | H_l; H_X, H_Y             | netF (PatchSampleF); netF1, netF2
    M_ra M_fb M_rb M_fa| SimDCL's light heads      | netF3 .. netF6 (MappingF)
    N, H_ema           | negative generator, H̄     | netN, netF_ (NEGCUT)
    pool_a, pool_b     | image history buffer      | fake_A_pool, fake_B_pool (--pool_size)
    real_a, fake_b     | x, G(x)                   | real_A, fake_B
    idt_b = G(real_b)  | identity image            | idt_B (CUT), idt_A (DCLGAN, CycleGAN)
    feat_q, feat_k     | query z, keys z⁺ and z⁻   | feat_q, feat_k
    lambda_NCE         | λ_X (= λ_Y), λ_NCE        | --lambda_NCE
    lambda_IDT, _SIM   | λ_idt, λ_SIM              | --lambda_IDT (CycleGAN --lambda_identity), --lambda_SIM
    lambda_MS_neg      | λ_MS, N's diversity       | --lambda_MS_neg
    NCE, NCE_Y         | ℓ_PatchNCE(G,H,X), (…,Y)  | loss_NCE, loss_NCE_Y
    NCE1, NCE2, Sim    | L_PatchNCE for G and F, L_sim | loss_NCE1, loss_NCE2, loss_Sim
    N (in the log)     | L_N = −NCE + L_div        | loss_N
    tau, num_patches, netF_nc, nce_layers | τ 0.07, S 256, E 256, l | --nce_T, --num_patches, ...

Faithfulness notes: every place this file differs from the official code
(methods.md §10 numbers its quirks Q1..Q38), and the quirks we keep.
  F1  Kept: the l_neg diagonal is filled with −10 before dividing by τ (Q1).
  F2  Kept: detached keys (Q2); one patch-id set per layer for the batch (Q3).
  F3  Changed: patch ids, the flip coin, the B draw and the image pool use
      torch's RNG, not numpy's and Python's (Q4, Q15): one --seed covers all.
  F4  Changed: PatchNCE groups patches by the real batch size, not --batch_size (Q5).
  F5  Changed: heads are built eagerly (Q8); layer ids are a tuple, never mutated (Q7).
  F6  Kept: no random crop in the LR-decay epochs of the CUT lineage (Q9;
      --crop_in_decay undoes it); the LR never reaches 0 (Q10); CycleGAN uses
      the same schedule, one epoch later than recent upstream code (Q11).
  F7  Changed: counters count optimisation steps, not images (Q14).
  F8  Changed: translate keeps native size and names (Q13); --resize 256 = official test.
  F9  Changed: D scores real and fake in one call, G its translation and
      identity inputs in one call (exact: no layer mixes images), and the
      keys reuse the encoder activations of that call (exact: the same
      weights, the same input); augmentation draws come from per-item seeds.
  F10 Changed: --max_dataset_size cuts the sorted file list; --crop_size must
      be a multiple of 4; one checkpoint file holds everything.
  F11 Kept (DCLGAN, SimDCL): the hinge G loss is mean(relu(1 − D(G(x)))) (Q16);
      D losses are not scaled by λ_GAN (Q18); every term is half of Eq. 8
      (Q20); no image pool, the paper says 50 (Q21); the code's lr and epochs,
      not the paper's (Q22); negatives pooled over the batch (Q23).
  F12 Kept (DCLGAN): the heads' Adam at lr 1e-3, betas (0.9, 0.999) (Q17), via --lr_H, --beta1_H.
  F13 Changed (DCLGAN, SimDCL): the L1 identity term is switched by λ_IDT > 0
      (Q19); dot products of eps-normalised vectors, not cosines: equal once
      ‖z‖ ≫ 1e-7. At initialisation the loss values agree within 1%, the
      gradients do not: H's first outputs are tiny (‖z‖ ~ 1e-5), so at step 1
      the heads' gradients differ from the cosine version's by 14-29% and G's
      by 4-11% (‖z/(‖z‖ + 1e-7)‖ as low as 0.78 at tap 4). Adam's first step
      moves every bias of H by about ±lr, which lifts ‖z‖ far above 1e-7: from
      step 2 on every row has norm ≥ 0.99996 and the gradients agree to 1e-4.
  F14 Kept (SimDCL): L1Loss('sum') is a mean (Q24); the declared λ_NCE 2 is
      never applied (the preset says 1, Q25); nothing detached, fresh patch
      ids for the fakes (Q27); identity weight 1 (Q28). Changed: the mapping
      heads run at any batch size, S and E (Q26); identical at batch 1.
  F15 Changed (CycleGAN): upstream semantics, not the CUT/DCLGAN copies (Q36, Q37).
  F16 NEGCUT. Kept: H_ema's own random init (Q32); L_div on the last branch's
      negatives (Q34); N makes --num_patches negatives per image and L_div
      splits them in halves (an odd count, which the official code crashes
      on, is refused). Changed: N uses --lr (the declared --lr_N is never
      read, Q29); in N's step only N has gradients (Q30, Q31); the EMA is
      written H̄ + 0.1·(H − H̄) (Q33); noise is drawn on the device (Q35).
  F17 Extensions, in no official code and off in every preset: --lambda_perc,
      --lambda_perc_content (VGG16 feature L1) and --nce_hard_beta.
  F18 Added (--fast, on by default on CUDA): bf16 autocast for the networks,
      with every output, L2 normalisation, logit and loss in fp32;
      channels_last; fused Adam. Results change by bf16 rounding only;
      --fast off is the official fp32 arithmetic (TF32 convolutions aside).
  F19 Added: data parallelism under torchrun (gradients averaged by all-reduce;
      see average_gradients). Each process draws its own patch ids, noise and
      flips and sees its share of A; PatchNCE, pooled negatives and image pools
      stay per process. Effective batch: processes × --batch_size; LR unscaled.
  F20 Changed: every gradient is right at batch size 1. torch 2.13 and 2.14 on
      the CPU compute instance norm's backward wrongly at batch 1 when the
      incoming gradient has channels-last strides. The official patch sampler
      (permute, then pick) sends exactly that into the ResNet blocks tapped for
      PatchNCE, so the official code at batch 1 on these builds learns from a
      wrong G gradient (one CUT step: 84% relative error, cosine 0.63; DCLGAN
      and SimDCL worse). Here the sampler picks before it transposes and every
      instance norm makes its incoming gradient contiguous (F20 at InstanceNorm),
      which also covers NEGCUT's mean embedding and --fast's channels_last
      convolutions. Forward values are unchanged.

Not included: display servers, HTML pages, dataset downloads, UNet/StyleGAN generators,
SinCUT, FID (run pytorch-fid on translate output), DataParallel, CUDA graphs, wandb.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

# -----------------------------------------------------------------------------
# 1. Config and mode presets [plumbing]
# -----------------------------------------------------------------------------
# Precedence: the dataclass defaults (the official CUT code's) < the --mode preset < the
# demo settings (only without --dataroot) < typed flags. The resolved config is printed,
# saved with the run and stored in every checkpoint, so translate needs nothing else.

MODES = {
    # CUT: identity NCE on the target domain (G(y) should stay y), λ_NCE 1,
    # 200 epochs at full LR + 200 of linear decay (official --CUT_mode CUT).
    "cut": dict(lambda_NCE=1.0, nce_idt=True, flip_equivariance=False,
                n_epochs=200, n_epochs_decay=200),
    # FastCUT: no identity pass (half the generator work), a 10x NCE weight and
    # flip-equivariance instead, 150 + 50 epochs (official --CUT_mode FastCUT).
    "fastcut": dict(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True,
                    n_epochs=150, n_epochs_decay=50),
    # NEGCUT (official --NEGCUT_mode NEGCUT / FastNEGCUT): CUT or FastCUT with
    # the in-image negatives replaced by hard ones from a negative generator N,
    # trained adversarially; λ_MS 1 weighs N's diversity term.
    "negcut": dict(lambda_NCE=1.0, nce_idt=True, flip_equivariance=False, lambda_MS_neg=1.0,
                   n_epochs=200, n_epochs_decay=200),
    "fastnegcut": dict(lambda_NCE=10.0, nce_idt=False, flip_equivariance=True, lambda_MS_neg=1.0,
                       n_epochs=150, n_epochs_decay=50),
    # DCLGAN (official --model dcl): two generators, two discriminators, two
    # heads; hinge loss; negatives from the whole batch; L1 identity. The code
    # halves every term of the paper's Eq. 8 (λ_NCE 2 × 0.5 = 1 per direction)
    # and trains the heads with Adam's defaults, lr 1e-3 and beta1 0.9 (Q17).
    # Paper setting: --lr 1e-4 --n_epochs 200 --n_epochs_decay 200 (400 in all).
    "dcl": dict(nce_layers="4,8,12,16", gan_mode="hinge", lambda_NCE=2.0, nce_idt=False,
                lambda_IDT=1.0, nce_includes_all_negatives_from_minibatch=True,
                lr_H=1e-3, beta1_H=0.9),
    # SimDCL (official --model simdcl): DCLGAN plus the similarity loss on four
    # mapping heads, λ_SIM 10. The official code declares λ_NCE 2 but never
    # applies it: 0.5 per direction, i.e. λ_NCE 1 in our formula (Q25). Its
    # heads use --lr and --beta1. Paper setting: --n_epochs 100 --n_epochs_decay 100.
    "simdcl": dict(nce_layers="4,8,12,16", gan_mode="hinge", lambda_NCE=1.0, nce_idt=False,
                   lambda_IDT=1.0, lambda_SIM=10.0, nce_includes_all_negatives_from_minibatch=True),
    # CycleGAN (upstream pytorch-CycleGAN-and-pix2pix): strided and transposed
    # convs, N(0, 0.02) init, cycle weight 10, identity 0.5 (× 10), a pool of
    # 50 old fakes for D, 100 + 100 epochs, random crops throughout.
    "cyclegan": dict(nce_idt=False, lambda_NCE=0.0, lambda_IDT=0.5, pool_size=50,
                     init_type="normal", no_antialias=True, no_antialias_up=True,
                     n_epochs=100, n_epochs_decay=100, crop_in_decay=True),
}
# Which networks each mode builds. Names: G_ab maps A to B; D_b judges B
# images (official D_A); H_a embeds A images (official F1); M_* are SimDCL's
# mapping heads for real/fake A/B sets (official F3..F6); N is NEGCUT's
# negative generator and H_ema its momentum head (official F_); pool_* keep old fakes.
NETWORKS = {"cut": ("G", "D", "H"), "fastcut": ("G", "D", "H"),
            "negcut": ("G", "D", "H", "N", "H_ema"), "fastnegcut": ("G", "D", "H", "N", "H_ema"),
            "dcl": ("G_ab", "G_ba", "D_a", "D_b", "H_a", "H_b"),
            "simdcl": ("G_ab", "G_ba", "D_a", "D_b", "H_a", "H_b", "M_ra", "M_fb", "M_rb", "M_fa"),
            "cyclegan": ("G_ab", "G_ba", "D_a", "D_b", "pool_a", "pool_b")}

# Without --dataroot we train on the bundled 96x96 two-domain set in data/ with
# settings a 2-core CPU runs at several steps per second: 64-pixel crops and a
# quarter-width network. The method (losses, layers, step) is unchanged.
BUNDLED_DATA = Path(__file__).resolve().parent / "data"
DEMO = dict(load_size=72, crop_size=64, ngf=16, ndf=16, n_epochs=6, n_epochs_decay=2, print_freq=25,
            display_freq=100, save_latest_freq=500, save_epoch_freq=1, num_threads=1)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def _opt(default, help, **extra):
    """A config field whose metadata becomes its command-line flag."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # method
    mode: str = _opt("cut", "method preset", choices=tuple(MODES))
    # data
    dataroot: str = _opt("", "folder with trainA/, trainB/ (and testA/, testB/); empty = bundled demo")
    direction: str = _opt("AtoB", "BtoA swaps the domains", choices=("AtoB", "BtoA"))
    load_size: int = _opt(286, "training images are resized to this square first")
    crop_size: int = _opt(256, "then randomly cropped to this square (a multiple of 4)")
    no_flip: bool = _opt(False, "no random horizontal flip of training images")
    serial_batches: bool = _opt(False, "no shuffling; B paired to A by index, not at random")
    crop_in_decay: bool = _opt(False, "keep random crops in the LR-decay epochs (official: no crop)")
    max_dataset_size: int = _opt(0, "use at most this many images per domain (0 = all)")
    num_threads: int = _opt(4, "data-loading worker processes (0 = load in the main process)")
    # model
    ngf: int = _opt(64, "generator width (channels of its first conv)")
    ndf: int = _opt(64, "discriminator width")
    no_antialias: bool = _opt(False, "strided convs instead of blur + subsample in G and D")
    no_antialias_up: bool = _opt(False, "transposed convs instead of upsample + blur in G")
    init_type: str = _opt("xavier", "weight init, gain/std 0.02", choices=("xavier", "normal"))
    netF_nc: int = _opt(256, "E: width of the projection head H")
    nce_layers: str = _opt("0,4,8,12,16", "indices of G.model tapped for PatchNCE, ascending")
    num_patches: int = _opt(256, "S: patches sampled per layer and image")
    # losses
    gan_mode: str = _opt("lsgan", "adversarial loss", choices=("lsgan", "hinge"))
    lambda_GAN: float = _opt(1.0, "weight of the adversarial loss of G")
    lambda_NCE: float = _opt(1.0, "weight of the PatchNCE loss")
    nce_idt: bool = _opt(True, "also apply PatchNCE to y -> G(y) (identity)")
    nce_T: float = _opt(0.07, "tau: the PatchNCE temperature")
    nce_includes_all_negatives_from_minibatch: bool = _opt(False, "negatives from the whole batch")
    lambda_IDT: float = _opt(0.0, "weight of the L1 identity loss |G(y) − y| (CycleGAN: × lambda_A/B)")
    lambda_SIM: float = _opt(0.0, "SimDCL: weight of the similarity loss")
    lambda_A: float = _opt(10.0, "CycleGAN: weight of the cycle loss |G_ba(G_ab(a)) − a|")
    lambda_B: float = _opt(10.0, "CycleGAN: weight of the cycle loss |G_ab(G_ba(b)) − b|")
    pool_size: int = _opt(0, "CycleGAN: D sees fakes from a pool of this many earlier ones")
    lambda_MS_neg: float = _opt(0.0, "NEGCUT: weight of the diversity term of the negative generator")
    # extensions (off in every preset, so the official modes are unchanged)
    lambda_perc: float = _opt(0.0, "weight of the VGG16 perceptual loss (identity, cycle targets)")
    lambda_perc_content: float = _opt(0.0, "weight of a VGG16 relu4_3 content loss, G(x) vs x")
    vgg_weights: str = _opt("", "VGG16 ImageNet weights (vgg16-397923af.pth); default: "
                            "torchvision's cache; 'random' = random weights, for tests only")
    nce_hard_beta: float = _opt(0.0, "weight negatives by exp(beta·similarity) (0 = official)")
    flip_equivariance: bool = _opt(False, "FastCUT: flip inputs at random, G's features back")
    # optimisation
    n_epochs: int = _opt(200, "epochs at the initial learning rate")
    n_epochs_decay: int = _opt(200, "epochs of linear decay after those")
    lr: float = _opt(2e-4, "Adam learning rate of G, D (and H, see lr_H)")
    beta1: float = _opt(0.5, "Adam beta1")
    beta2: float = _opt(0.999, "Adam beta2")
    lr_H: float = _opt(0.0, "Adam lr of the heads (0 = --lr)")
    beta1_H: float = _opt(-1.0, "Adam beta1 of the heads (−1 = --beta1)")
    batch_size: int = _opt(1, "images per domain per step (the papers use 1)")
    # run
    name: str = _opt("", "run folder checkpoints_dir/name (default: <mode>_<dataset folder>)")
    checkpoints_dir: str = _opt("./checkpoints", "where run folders are made")
    continue_train: bool = _opt(False, "continue the run `name` from its latest checkpoint",
                                aliases=("--resume",))
    max_steps: int = _opt(0, "stop after this many steps in all (0 = train every epoch)")
    seed: int = _opt(0, "seeds torch, numpy, python and every data-augmentation draw")
    device: str = _opt("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    deterministic: bool = _opt(False, "deterministic cuDNN and torch algorithms")
    fast: str = _opt("auto", "bf16, channels_last, fused Adam (auto: on CUDA)", choices=("auto", "on", "off"))
    compile: bool = _opt(False, "torch.compile G and D (slow first steps; pays on long runs)")
    print_freq: int = _opt(100, "steps between loss-log rows and progress lines")
    display_freq: int = _opt(2500, "steps between sample grids")
    save_latest_freq: int = _opt(5000, "steps between writes of ckpt_latest.pt")
    save_epoch_freq: int = _opt(5, "epochs between kept weight snapshots")

    @property
    def layer_ids(self) -> tuple:
        return tuple(int(i) for i in self.nce_layers.split(","))

    @property
    def total_epochs(self) -> int:
        return self.n_epochs + self.n_epochs_decay

    def validate(self) -> None:
        """Turn impossible settings into one-line errors before any work starts."""
        try:
            ids = self.layer_ids
        except ValueError:
            raise UserError(f"--nce_layers {self.nce_layers!r}: give comma-separated integers")
        if list(ids) != sorted(set(ids)) or ids[0] < 0:
            raise UserError(f"--nce_layers {self.nce_layers}: indices must be distinct, "
                            "non-negative and ascending")
        if self.crop_size > self.load_size:
            raise UserError(f"--crop_size {self.crop_size} is larger than --load_size "
                            f"{self.load_size}: images are resized to load_size before cropping")
        if self.crop_size % 4 or self.crop_size < 24:
            raise UserError(f"--crop_size {self.crop_size}: use a multiple of 4 (G halves the size "
                            "twice), at least 24 (D's last instance norm needs 2x2 pixels)")
        for flag in ("batch_size", "num_patches", "ngf", "ndf", "netF_nc", "print_freq",
                     "display_freq", "save_latest_freq", "save_epoch_freq"):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be at least 1")
        if self.nce_T <= 0:
            raise UserError("--nce_T must be positive")
        targets = {"cyclegan": True, "dcl": self.lambda_IDT > 0, "simdcl": self.lambda_IDT > 0}
        if self.lambda_perc > 0 and not targets.get(self.mode, self.nce_idt and self.lambda_NCE > 0):
            raise UserError(f"--lambda_perc: --mode {self.mode} makes no identity image here to compare "
                            "with its input; use --lambda_perc_content (G(x) against x) instead")
        if "negcut" in self.mode and self.num_patches % 2:
            raise UserError(f"--num_patches {self.num_patches}: NEGCUT's diversity term splits "
                            "the negatives into two halves; use an even number")
        if "negcut" in self.mode and self.nce_includes_all_negatives_from_minibatch:
            raise UserError("--nce_includes_all_negatives_from_minibatch: NEGCUT compares each "
                            "image with its own generated negatives only")


class UserError(Exception):
    """A mistake in the command, the data or a file: reported in one line, exit 2."""


def resolve_config(flags: dict) -> tuple[TrainConfig, dict]:
    """Merge defaults < mode preset < demo settings < flags; also say where
    each value came from, so the printed config explains itself."""
    mode = flags.get("mode", "cut")
    values, source = dict(MODES[mode]), {k: mode for k in MODES[mode]}
    if not flags.get("dataroot"):
        values.update(DEMO)
        source.update({k: "demo" for k in DEMO})
        values["dataroot"] = str(BUNDLED_DATA)
    values.update(flags)
    source.update({k: "flag" for k in flags})
    if not values.get("name"):
        values["name"] = f"{mode}_{Path(values['dataroot']).resolve().name}"
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg, source


# -----------------------------------------------------------------------------
# 2. Building blocks: antialiased resampling, ResNet block, init
# -----------------------------------------------------------------------------
# The CUT lineage replaces strided convolutions with "blur, then subsample" (Zhang,
# "Making Convolutional Networks Shift-Invariant Again", ICML 2019, arXiv 1904.11486):
# a stride-2 conv aliases high frequencies into checkerboard artefacts, a fixed low-pass
# filter first does not. The filters are persistent buffers `filt`, as in official checkpoints.

class Downsample(nn.Module):
    """Blur with [1,2,1]ᵀ⊗[1,2,1]/16, then keep every second pixel.
    n×C×H×W -> n×C×⌊(H−1)/2⌋+1×⌊(W−1)/2⌋+1 (exactly H/2 for even H)."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        kernel = a[:, None] * a[None, :]
        self.register_buffer("filt", (kernel / kernel.sum()).repeat(channels, 1, 1, 1))
        self.pad = nn.ReflectionPad2d(1)

    def forward(self, x):
        return F.conv2d(self.pad(x), self.filt, stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Insert zeros between pixels and blur with 4·[1,3,3,1]ᵀ⊗[1,3,3,1]/64 (the ×4
    restores the brightness the zeros took away). n×C×H×W -> n×C×2H×2W."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = a[:, None] * a[None, :]
        self.register_buffer("filt", (4 * kernel / kernel.sum()).repeat(channels, 1, 1, 1))

    def forward(self, x):
        # Replicate-pad by 1 (official: ReplicationPad2d, whose backward torch.compile
        # mis-strides in torch 2.14), then a transposed conv with padding 2 gives
        # 2H+2 rows; the official code drops the first and the last row and column.
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], 2)
        x = torch.cat([x[..., :1], x, x[..., -1:]], 3)
        y = F.conv_transpose2d(x, self.filt, stride=2, padding=2, groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]


class InstanceNorm(nn.InstanceNorm2d):
    """Instance norm without affine parameters or running statistics: it has no
    state at all, and it normalises each image alone, so concatenating images
    into one batch never changes any output (the code relies on it).

    Its backward gets a contiguous gradient (F20). In torch 2.13 and 2.14 on the
    CPU, instance norm's backward is wrong at batch size 1 when the incoming
    gradient has channels-last strides: a permuted patch sampler, NEGCUT's mean
    embedding and every channels_last conv (--fast) send one. The hook makes it
    contiguous first, which is free when it already is."""

    def __init__(self, channels: int):
        super().__init__(channels, affine=False, track_running_stats=False)

    def forward(self, x):
        y = F.instance_norm(x, eps=self.eps)
        if y.requires_grad:
            y.register_hook(torch.Tensor.contiguous)
        return y


def norm(channels: int) -> nn.Module:
    return InstanceNorm(channels)


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, IN, ReLU, pad, conv3x3, IN](x); no activation after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm(channels))

    def forward(self, x):
        return x + self.conv_block(x)


def init_weights(net: nn.Module, init_type: str = "xavier", gain: float = 0.02) -> nn.Module:
    """Every conv and linear weight, biases 0. CUT lineage (--init_type xavier
    --init_gain 0.02): xavier_normal, std = 0.02·√(2/(fan_in+fan_out)), so an
    untrained G outputs an almost uniform grey. Upstream CycleGAN: N(0, 0.02²)."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init_type == "xavier":
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                nn.init.normal_(module.weight, 0.0, gain)
            nn.init.zeros_(module.bias)
    return net


def set_requires_grad(net: nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag)


def unit(z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """z/(‖z‖ + 1e-7) along dim, in fp32 even under bf16 autocast (--fast): the
    official code adds the eps rather than clamping, and so do we."""
    z = z.float()
    return z / (z.norm(dim=dim, keepdim=True) + 1e-7)


# -----------------------------------------------------------------------------
# 3. Generator G [core]
# -----------------------------------------------------------------------------
# ResNet generator (Johnson et al. 2016, as in CycleGAN), antialiased as in the
# CUT code. One nn.Sequential named `model`; its indices are public: they name
# the PatchNCE layers and the keys of official checkpoints. At 256x256:
#   idx  module                               output
#    0   ReflectionPad2d(3)                   3×262×262   <- tap 0 (RGB + border)
#   1-3  conv7 3→64, IN, ReLU                 64×256×256
#   4-6  conv3 64→128 (stride 1), IN, ReLU    128×256×256 <- tap 4 (conv, pre-IN)
#    7   Downsample(128)                      128×128×128
#   8-10 conv3 128→256, IN, ReLU              256×128×128 <- tap 8 (conv, pre-IN)
#   11   Downsample(256)                      256×64×64
#  12-20 9 × ResnetBlock(256)                 256×64×64   <- taps 12, 16 (blocks 1, 5)
#   21   Upsample(256), 22-24 conv3 256→128, IN, ReLU     128×128×128
#   25   Upsample(128), 26-28 conv3 128→64, IN, ReLU      64×256×256
#  29-31 ReflectionPad2d(3), conv7 64→3, Tanh             3×256×256
# The taps' receptive fields are 1, 9, 15, 35 and 99 pixels: from single
# pixels to object parts, which is why PatchNCE uses several layers.
# --no_antialias (stride-2 convs down) and --no_antialias_up (transposed convs up) give
# the 28-entry upstream CycleGAN G (keys model.{1,4,7,10..18,19,22,26}): same size, other indices.

class Generator(nn.Module):
    def __init__(self, ngf: int = 64, antialias: bool = True, antialias_up: bool = True,
                 n_blocks: int = 9):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):                                   # 2 × (conv, IN, ReLU, blur-down)
            c = ngf * mult
            layers += ([nn.Conv2d(c, 2 * c, 3, padding=1), norm(2 * c), nn.ReLU(True),
                        Downsample(2 * c)] if antialias else
                       [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), norm(2 * c), nn.ReLU(True)])
        layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks)]
        for mult in (4, 2):                                   # 2 × (blur-up, conv, IN, ReLU)
            c = ngf * mult
            layers += ([Upsample(c), nn.Conv2d(c, c // 2, 3, padding=1)] if antialias_up else
                       [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1)])
            layers += [norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x, taps: tuple | None = None):
        """n×3×H×W in [−1, 1] (H, W multiples of 4) -> n×3×H×W, in fp32 under
        --fast too. With taps, also the activations after those layers: the
        keys of PatchNCE, taken from this pass instead of a second one (F9)."""
        if taps is None:
            return self.model(x).float()
        feats = []
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index in taps:                 # the last tap as encode leaves it: before an in-place ReLU
                after = self.model[index + 1] if index + 1 < len(self.model) else None
                feats.append(x.clone() if index == taps[-1] and getattr(after, "inplace", False) else x)
        return x.float(), feats

    def encode(self, x, layer_ids: tuple) -> list:
        """The activations after each listed layer. Stops after the last one,
        so the decoder never runs (official: encode_only=True)."""
        feats = []
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index in layer_ids:
                feats.append(x)
                if index == layer_ids[-1]:
                    return feats
        raise ValueError(f"layer ids {layer_ids} go beyond G's {len(self.model)} layers")

    def tap_channels(self, layer_ids: tuple) -> list:
        """Channel count at each tapped layer, read off the layer list, so H can
        be built before any image is seen."""
        channels, out = 3, []
        for index, layer in enumerate(self.model):
            channels = getattr(layer, "out_channels", channels)
            if index in layer_ids:
                out.append(channels)
        if len(out) != len(layer_ids):
            raise UserError(f"--nce_layers {','.join(map(str, layer_ids))}: G has layers "
                            f"0..{len(self.model) - 1} only")
        return out


# -----------------------------------------------------------------------------
# 4. Discriminator D (PatchGAN)
# -----------------------------------------------------------------------------
# The 70x70 PatchGAN of pix2pix (Isola et al., arXiv 1611.07004): a small conv
# net whose output is a map of real/fake scores, one per overlapping patch, so
# it judges texture and local structure, not global layout. The CUT code
# replaces each stride-2 conv by conv-stride-1 + Downsample, which widens the
# receptive field to 84x84 but keeps the 30x30 output at 256x256 input.
# (--no_antialias: upstream's stride-2 convs, keys model.{0,2,5,8,11}.)
#   0-2  conv4 3→64, LReLU(0.2), Downsample                 64×128×128
#   3-6  conv4 64→128, IN, LReLU, Downsample                128×64×64
#   7-10 conv4 128→256, IN, LReLU, Downsample               256×32×32
#  11-13 conv4 256→512, IN, LReLU                           512×31×31
#   14   conv4 512→1 (no sigmoid: the GAN loss decides)     1×30×30

class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, antialias: bool = True):
        super().__init__()
        down = lambda c: [Downsample(c)] if antialias else []  # noqa: E731
        stride = 1 if antialias else 2
        layers = [nn.Conv2d(3, ndf, 4, stride, padding=1), nn.LeakyReLU(0.2, True), *down(ndf)]
        for mult in (1, 2):
            c = ndf * mult
            layers += [nn.Conv2d(c, 2 * c, 4, stride, padding=1), norm(2 * c),
                       nn.LeakyReLU(0.2, True), *down(2 * c)]
        layers += [nn.Conv2d(4 * ndf, 8 * ndf, 4, padding=1), norm(8 * ndf),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(8 * ndf, 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):                                     # n×3×H×W -> n×1×h×w fp32 scores
        return self.model(x).float()


# -----------------------------------------------------------------------------
# 5. Heads: projection H, SimDCL's M, NEGCUT's N; CycleGAN's image pool [core]
# -----------------------------------------------------------------------------
# H (official PatchSampleF) picks S positions of each tapped map and sends each
# position's C-vector through a per-layer 2-layer MLP to a unit E-vector, as in
# SimCLR (Chen et al. 2020): the contrastive loss acts on H's output, so the
# encoder keeps information the loss would otherwise throw away.

class ProjectionHead(nn.Module):
    def __init__(self, in_channels: list, width: int = 256):
        super().__init__()
        for index, c in enumerate(in_channels):               # official key names mlp_0, mlp_1, ...
            setattr(self, f"mlp_{index}", nn.Sequential(nn.Linear(c, width), nn.ReLU(),
                                                        nn.Linear(width, width)))
        self.n_layers = len(in_channels)

    def forward(self, feats: list, num_patches: int, patch_ids: list | None = None):
        """feats: L maps n×C_l×H_l×W_l. Returns L tensors (n·S_l)×E, image-major,
        with S_l = min(S, H_l·W_l), and the L position-id sets used.

        Without patch_ids, draws one random set of positions per layer, shared by
        every image of the batch (official; Q3). PatchNCE samples the keys first
        and passes their ids for the queries, so row i of both is one location."""
        out, ids_out = [], []
        for index, feat in enumerate(feats):
            flat = feat.flatten(2)                            # n×C×(H·W), row-major positions
            if patch_ids is None:
                ids = torch.randperm(flat.shape[2], device=feat.device)[:num_patches]  # no host copy
            else:
                ids = patch_ids[index]
            # Pick first, transpose after: the backward of this indexing writes
            # into a fresh, contiguous gradient (the official permute-first
            # order sends a channels-last one into the taps' instance norms, F20).
            picked = flat[:, :, ids].transpose(1, 2).flatten(0, 1)  # (n·S_l)×C
            z = getattr(self, f"mlp_{index}")(picked)         # (n·S_l)×E
            out.append(unit(z))
            ids_out.append(ids)
        return out, ids_out

    def mean_embedding(self, feats: list) -> list:
        """NEGCUT's summary of each image: every position (not a sample) through
        MLP_l, unit-normalised per position, then averaged over positions and
        not re-normalised. L maps n×C_l×H_l×W_l -> L tensors n×E. (The official
        CUT code normalises this full-resolution path over the wrong axis;
        NEGCUT's copy, followed here, normalises each E-vector: Q6.)"""
        out = []
        for index, feat in enumerate(feats):
            z = getattr(self, f"mlp_{index}")(feat.permute(0, 2, 3, 1))  # n×H×W×E
            out.append(unit(z, dim=3).mean(dim=(1, 2)))
        return out


class NegativeGenerator(nn.Module):
    """NEGCUT's N [NEGCUT paper §3.2; official NEGCUT code, models/negative_generator.py]:
    for each tapped layer and image, `count` negative E-vectors (--num_patches,
    as in the official code: 256 by default) made from the image's mean
    embedding v (by the momentum head) and fresh noise z ~ N(0, I₆₄):
        n_j = unit(MLP_l([v; z_j])),  MLP_l: Linear(E+64 → E), ReLU, Linear(E → E)
    so the negatives are specific to the image (v) and varied (z). Trained to
    make PatchNCE hard, they replace the other patches of the image.
    L lists of n×E -> L tensors (n·count)×E, image-major. 739,840 parameters
    at E = 256 with 5 taps (147,968 per tap)."""

    def __init__(self, n_layers: int, width: int = 256, z_dim: int = 64, count: int = 256):
        super().__init__()
        for index in range(n_layers):
            setattr(self, f"mlp_{index}", nn.Sequential(nn.Linear(width + z_dim, width), nn.ReLU(),
                                                        nn.Linear(width, width)))
        self.z_dim, self.count = z_dim, count

    def forward(self, means: list) -> list:
        out = []
        for index, v in enumerate(means):                     # v: n×E
            z = torch.randn(v.shape[0], self.count, self.z_dim, device=v.device)  # fresh every call
            code = torch.cat([v[:, None].expand(-1, self.count, -1), z], dim=2)   # n×count×(E+64)
            y = getattr(self, f"mlp_{index}")(code.flatten(0, 1))                # (n·count)×E
            out.append(unit(y))
        return out


class MappingHead(nn.Module):
    """SimDCL's light head (official MappingF, 10,688 parameters): it reads the
    L sampled and projected patch sets of one image as an L-channel S×E
    "image" and summarises them in one unit 64-vector, an embedding of the
    whole image that the similarity loss compares across domains.
    n×L×S×E -> n×64. Keys model.0 (conv), model.4, model.6 (linears)."""

    def __init__(self, n_layers: int = 4, width: int = 64):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(n_layers, width, 3, stride=2), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, stack):
        return unit(self.model(stack))


class ImagePool(nn.Module):
    """CycleGAN's history of generated images (Shrivastava et al. 2017): D is
    shown a mix of current and earlier fakes, so G cannot win by oscillating
    between modes that the latest D happens to miss. Until the pool is full
    each fake is stored and returned; then, per image, with probability 0.5 a
    random stored fake is returned and replaced by the new one, else the new
    one passes through. A module, so its contents travel in checkpoints."""

    def __init__(self, capacity: int, size: int):
        super().__init__()
        self.count = 0
        self.register_buffer("images", torch.zeros(capacity, 3, size, size))

    def forward(self, fakes):                                  # n×3×S×S, detached
        capacity, out = self.images.shape[0], []
        if capacity == 0:                                     # --pool_size 0: no history
            return fakes.detach()
        for image in fakes.detach():
            if self.count < capacity:
                self.images[self.count] = image
                self.count += 1
            elif float(torch.rand(())) < 0.5:
                slot = int(torch.randint(capacity, ()))
                image, self.images[slot] = self.images[slot].clone(), image
            out.append(image)
        return torch.stack(out)

    def get_extra_state(self):
        return self.count

    def set_extra_state(self, count):
        self.count = count


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -----------------------------------------------------------------------------
# 6. Losses, and the optional VGG16 perceptual loss [core]
# -----------------------------------------------------------------------------

def gan_loss(prediction: torch.Tensor, target_is_real: bool, gan_mode: str) -> torch.Tensor:
    """Adversarial loss of a score map p (n×1×h×w); the mean runs over every patch.

    [LSGAN: Mao et al., arXiv 1611.04076; official CUT code, networks.py GANLoss]
        lsgan  real: mean((p − 1)²)     fake: mean(p²)
    [hinge: used by DCLGAN; official DCLGAN code, networks.py]
        hinge  real: mean(relu(1 − p))  fake: mean(relu(1 + p))
    The generator asks for "real" on its fakes: L_G = lsgan_real(D(G(x))).
    Deviation kept from the DCLGAN code: its hinge generator loss is therefore
    mean(relu(1 − D(G(x)))), not the more common −mean(D(G(x))).
    D's loss is L_D = 0.5·(real + fake), never multiplied by λ_GAN (official)."""
    if gan_mode == "lsgan":
        return ((prediction - 1) ** 2).mean() if target_is_real else (prediction ** 2).mean()
    if gan_mode == "hinge":
        return F.relu(1 - prediction).mean() if target_is_real else F.relu(1 + prediction).mean()
    raise ValueError(gan_mode)


def patch_nce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, n_images: int,
                   tau: float = 0.07, hard_beta: float = 0.0,
                   negatives: torch.Tensor | None = None) -> torch.Tensor:
    """PatchNCE for one layer: each output patch must pick out the input patch
    at its own location among the other patches of the same input image.

    [CUT paper §3.1, Eq. 2-3 (ℓ and ℓ_PatchNCE); official CUT code, models/patchnce.py]
        for row i (a query q_i, its positive key k_i, the keys k_j of the other
        S−1 sampled locations of the same image as negatives):
        ℓ_i = −log( exp(q_i·k_i/τ) / ( exp(q_i·k_i/τ) + exp(−10/τ) + Σ_(j≠i) exp(q_i·k_j/τ) ) )
    Shapes: feat_q, feat_k (n·S)×E unit vectors, image-major -> ℓ of shape (n·S).
    The caller takes the mean over patches, then over layers (the paper writes
    sums; every λ in the code refers to the means).

    Why detached keys (official code; the paper is silent): the input's encoding
    is the fixed target, the gradient enters only through the queries, i.e. G(x).
    Why −10 on the diagonal: it repeats the positive; −10/τ leaves exp(−142.9) = 0
    in fp32 (the README's −inf). Why same-image negatives: they share the image's
    style, so only content tells the positive apart, and content must be kept.

    n_images = 1 views the whole batch as one pool of n·S patches: the
    negatives of every query are then the patches of all images (DCLGAN's
    loss, official DCLGAN code, models/patchnce.py; equal to CUT's at n = 1).
    Deviation: DCLGAN computes cosine similarities; we take dot products of
    the eps-normalised vectors, equal once ‖z‖ ≫ 1e-7: from the second step
    on; at the first the gradients differ (F13).

    hard_beta = β > 0 (an extension, --nce_hard_beta; Robinson et al., "Contrastive
    Learning with Hard Negative Samples", ICLR 2021, arXiv 2010.04592, without
    their debiasing term): negatives that already look like the positive are
    the informative ones, so each is importance-weighted, with s_j = q_i·k_j:
        w_j = exp(β·s_j) / ((1/N)·Σ_m exp(β·s_m))     (detached; mean_j w_j = 1)
        ℓ_i = −log( exp(s⁺/τ) / ( exp(s⁺/τ) + Σ_j w_j·exp(s_j/τ) ) )
    i.e. log w_j is added to negative j's logit, over the N real negatives (the
    masked diagonal keeps its unweighted exp(−10/τ)). β = 0 is the official loss
    bit for bit (the branch is skipped); β → ∞ puts all the weight N on the
    hardest negative: ℓ → −log(e^(s⁺/τ) / (e^(s⁺/τ) + N·e^(s_max/τ))).

    negatives ((n·256)×E, NEGCUT): each image's queries are compared with its
    own 256 generated negatives instead of the other keys, so l_neg = q·Nᵀ per
    image, n×S×256, with no diagonal to mask [official NEGCUT code,
    models/losses.py, LearnedPatchNCELoss]. They are not detached: in G's
    step their gradient reaches G's encoder through N and H_ema. (hard_beta
    is not applied to them: N already makes them as hard as it can.)"""
    dtype = torch.promote_types(feat_q.dtype, torch.float32)  # logits in fp32 at least: 1/τ ≈ 14
    feat_k, feat_q = feat_k.detach().to(dtype), feat_q.to(dtype)  # amplifies rounding errors
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)        # (n·S)×1
    q = feat_q.view(n_images, -1, feat_q.shape[1])            # n×S×E
    if negatives is None:                                     # the image's other keys: n×S×S
        l_neg = torch.bmm(q, feat_k.view(n_images, -1, feat_k.shape[1]).transpose(1, 2))
        diagonal = torch.eye(q.shape[1], dtype=torch.bool, device=q.device)[None]
        l_neg = l_neg.masked_fill(diagonal, -10.0)
    else:                                                     # NEGCUT's: n×S×256
        l_neg = torch.bmm(q, negatives.to(dtype).view(n_images, -1, negatives.shape[1]).transpose(1, 2))
    l_neg = l_neg.flatten(0, 1)                               # (n·S)×S or (n·S)×256
    logits = torch.cat([l_pos, l_neg], dim=1) / tau           # class 0 is the positive
    if hard_beta and negatives is None:
        real = ~diagonal.expand(q.shape[0], -1, -1).flatten(0, 1)  # (n·S)×S, False on the diagonal
        scores = (hard_beta * l_neg.detach()).masked_fill(~real, -math.inf)
        log_w = scores - torch.logsumexp(scores, 1, keepdim=True) + real.sum(1, keepdim=True).log()
        logits = logits + F.pad(log_w.masked_fill(~real, 0.0), (1, 0))  # positive column unweighted
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def nce_between(source, output, G_key, H_key, G_query, H_query, cfg: TrainConfig,
                flip_back: bool = False, negcut: dict | None = None, n_step: bool = False,
                extras: dict | None = None, feat_k: list | None = None) -> torch.Tensor:
    """ℓ_PatchNCE(source -> output), averaged over patches and layers, × λ_NCE.

        NCE = (1/L)·Σ_l λ_NCE·mean_i ℓ_(l,i),   k = H(G.encode(source)),  q = H(G.encode(output))
    The keys are sampled first and their patch ids reused for the queries.
    source, output: n×3×H×W. Key and query nets are separate arguments so the
    same function serves methods that embed each domain with its own encoder.
    flip_back (FastCUT): the output was made from a flipped input; flipping
    its feature maps back lines them up with the unflipped source's, so the
    loss asks for G(flip(x)) = flip(G(x)). (After a stride-2 subsampling the
    flipped grid is offset by one pixel; the official code has the same.)
    negcut (the nets N and H_ema): negatives generated from the source image
    replace the in-image ones [official NEGCUT code, models/losses.py]. With
    n_step, everything but N runs without gradient (N's own update, Q30).
    extras: filled with the keys (L × (n·S)×E, not detached), the query maps
    and the negatives, for SimDCL's similarity loss and NEGCUT's diversity term.
    feat_k: G_key's tapped activations of source, if the step already has them
    from its translation pass (the same weights and input: the same values)."""
    layer_ids = cfg.layer_ids
    with torch.set_grad_enabled(torch.is_grad_enabled() and not n_step):
        feat_q = G_query.encode(output, layer_ids)            # L maps n×C_l×H_l×W_l
        if flip_back:
            feat_q = [f.flip(3) for f in feat_q]
        if feat_k is None:
            feat_k = G_key.encode(source, layer_ids)
        elif n_step:                                          # reused: cut from G's graph here
            feat_k = [f.detach() for f in feat_k]
        keys, patch_ids = H_key(feat_k, cfg.num_patches)      # L × (n·S_l)×E
        queries, _ = H_query(feat_q, cfg.num_patches, patch_ids)
        means = negcut["H_ema"].mean_embedding(feat_k) if negcut else None  # L × n×E
    negatives = negcut["N"](means) if negcut else [None] * len(keys)  # L × (n·256)×E
    n = source.shape[0]                                       # the real batch size (Q5)
    groups = 1 if cfg.nce_includes_all_negatives_from_minibatch else n
    with torch.autocast(source.device.type, enabled=False):  # logits in fp32 under --fast
        layer_losses = [patch_nce_loss(q, k, groups, cfg.nce_T, cfg.nce_hard_beta, negs).mean()
                        for q, k, negs in zip(queries, keys, negatives)]
    if extras is not None:
        extras.update(keys=keys, feat_q=feat_q, negatives=negatives)
    return cfg.lambda_NCE * torch.stack(layer_losses).mean()


def diversity_loss(negatives: list, n_images: int, lambda_ms: float) -> torch.Tensor:
    """NEGCUT's diversity term for N [NEGCUT paper §3.2, Eq. 6 (mode seeking);
    official NEGCUT code, models/negcut_model.py]: the two halves of each image's
    K negatives (K = N's count, --num_patches) come from independent noise, and
    N is rewarded for making them differ, so it cannot collapse onto one hard negative:
        L_div = (1/L)·Σ_l λ_MS·( −mean|N_l[:, :K/2] − N_l[:, K/2:]| ),  N_l viewed n×K×E."""
    halves = [negs.view(n_images, -1, negs.shape[1]).chunk(2, dim=1) for negs in negatives]
    terms = [-(first - second).abs().mean() for first, second in halves]  # n×(K/2)×E each
    return lambda_ms * torch.stack(terms).mean()


def similarity_loss(keys_a, queries_a, keys_b, queries_b, heads: dict, n: int) -> torch.Tensor:
    """SimDCL's similarity loss [DCLGAN paper §3.3, Eq. 6; official DCLGAN code,
    models/simdcl_model.py]: the embeddings of a real and a generated image of
    the same domain should agree, which discourages mode collapse.
        L_sim = mean|M_ra(k_a) − M_fa(q_a)| + mean|M_fb(q_b) − M_rb(k_b)|
    k_a: the sampled, projected patches of real_a (H_a), q_a: of fake_a (H_a,
    fresh patch ids); likewise for B. Each argument is L × (n·S)×E, stacked per
    image to n×L×S×E; each head gives n×64 and the mean runs over n×64.
    Deviations kept: the official L1Loss('sum') is a mean (the string lands in
    the legacy size_average slot, Q24), and nothing is detached (Q27).
    Generalised: the official code stacks into 1×4×256×256 CPU tensors, so it
    runs only at batch 1 with S = E = 256 (Q26); at n = 1 this is identical."""
    def stack(feats):
        if len({f.shape[0] for f in feats}) > 1:
            raise UserError("SimDCL needs num_patches positions in every tapped layer: "
                            "lower --num_patches or raise --crop_size")
        return torch.stack([f.view(n, -1, f.shape[1]) for f in feats], dim=1)  # n×L×S×E
    return (F.l1_loss(heads["M_ra"](stack(keys_a)), heads["M_fa"](stack(queries_a)))
            + F.l1_loss(heads["M_fb"](stack(queries_b)), heads["M_rb"](stack(keys_b))))


# An optional feature-prediction (perceptual) loss [Johnson, Alahi, Fei-Fei, ECCV
# 2016, arXiv 1603.08155], off in every preset: compare images in a frozen VGG16's
# feature space. A pixel L1 is minimised by the blurry average of the plausible
# answers; VGG features respond to edges, textures and parts, so matching them keeps structure sharp.
VGG_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}  # torchvision indices
VGG_WEIGHTS = {"relu1_2": 1 / 16, "relu2_2": 1 / 8, "relu3_3": 1 / 4, "relu4_3": 1.0}
VGG_FILE = "vgg16-397923af.pth"                           # torchvision's IMAGENET1K_V1 weights


def vgg16(weights=None) -> nn.Module:      # torchvision is imported only here, to keep start-up fast
    from torchvision.models import vgg16 as build
    return build(weights=weights)


class Perceptual(nn.Module):
    """L_perc(a, b) = Σ_l w_l·mean|φ_l(a) − φ_l(b)| over VGG_LAYERS with VGG_WEIGHTS
    (deeper layers have smaller activations, hence larger weights), or at
    relu4_3 alone (content: deep features say what is where, not how it looks,
    so they allow the appearance change the translation must make).
    φ = VGG16 `features` up to relu4_3, frozen: eval mode, no gradients into
    it, never in an optimiser or a checkpoint. Inputs n×3×H×W in [−1, 1] are
    mapped to [0, 1] and normalised with the ImageNet mean and std."""

    def __init__(self, weights: str):
        super().__init__()
        path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE
        if weights != "random" and not path.is_file():
            raise UserError(f"--lambda_perc needs VGG16 ImageNet weights ({VGG_FILE}): "
                            f"{path} not found. Nothing is downloaded: on a networked machine run "
                            "torchvision.models.vgg16(weights='IMAGENET1K_V1') once, then copy the "
                            f"file to {path.parent} or pass --vgg_weights PATH")
        self.features = vgg16(weights=None).features[:VGG_LAYERS["relu4_3"] + 1]
        if weights != "random":
            state = {k.removeprefix("features."): v for k, v in read_checkpoint(path).items()}
            load_state(self.features, {k: v for k, v in state.items()
                                       if k in self.features.state_dict()}, f"{path} (VGG16)")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):                       # frozen: always in eval mode
        return super().train(False)

    def forward(self, output, target, content: bool = False) -> torch.Tensor:
        layers = {"relu4_3": 1.0} if content else VGG_WEIGHTS
        x = (torch.cat([output, target]) + 1) / 2             # 2n×3×H×W, one pass for both
        x, loss = (x - self.mean) / self.std, 0.0
        for index, layer in enumerate(self.features):
            x = layer(x)
            for name, weight in layers.items():
                if index == VGG_LAYERS[name]:
                    a, b = x.chunk(2)
                    loss = loss + weight * (a.float() - b.detach().float()).abs().mean()
        return loss


def perceptual_terms(nets: dict, cfg: TrainConfig, target_sets: list, content_pairs: list):
    """λ_perc·Σ_sets mean_pairs L_perc(out, target) + λ_content·mean_pairs L_content(G(x), x).
    A set holds one (output, target) pair per direction, so two-sided modes
    average the directions with 0.5, as they do every other term."""
    vgg, terms = nets.get("vgg"), []
    if vgg is not None and cfg.lambda_perc > 0:
        terms += [cfg.lambda_perc * sum(vgg(o, t) for o, t in pairs) / len(pairs)
                  for pairs in target_sets if pairs]
    if vgg is not None and cfg.lambda_perc_content > 0:
        terms.append(cfg.lambda_perc_content * sum(vgg(o, x, content=True)
                                                   for o, x in content_pairs) / len(content_pairs))
    return sum(terms) if terms else None                      # None: nothing to compare here


# -----------------------------------------------------------------------------
# 7. Unpaired data [plumbing]
# -----------------------------------------------------------------------------
# DATAROOT/trainA and trainB hold unrelated images. An epoch visits every A image
# once (max(|A|,|B|) items, A repeating); each is paired with a B drawn at random, so
# no pairing can be learnt (official unaligned_dataset.py). Each item's draws (B index,
# crop, flip) come from its own seed (seed, epoch, position): a run is the same with
# any number of workers and resumes exactly in the middle of an epoch.

def find_images(folder: Path) -> list:
    """Every image below folder (links followed), sorted, extensions in any case."""
    found = []
    for root, _, names in os.walk(folder, followlinks=True):
        found += [Path(root) / n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def load_rgb(path: Path) -> Image.Image:
    """Open any image as RGB (grayscale, palette and RGBA are converted, as the
    official dataset does); a broken file becomes a one-line error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> 3×H×W float in [−1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    array = torch.from_numpy(np.array(img, dtype=np.float32))
    return (array.permute(2, 0, 1) / 255.0 - 0.5) / 0.5


def train_transform(img: Image.Image, cfg: TrainConfig, rng: torch.Generator,
                    no_crop: bool) -> torch.Tensor:
    """Official 'resize_and_crop': PIL bicubic resize to load_size² (aspect ratio
    not kept), random crop_size² crop, random horizontal flip. During the
    LR-decay epochs the CUT lineage resizes straight to crop_size² instead (no
    crop, flip kept), so the last epochs see whole images, as at test time."""
    size = cfg.crop_size if no_crop else cfg.load_size
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    if size > cfg.crop_size:
        top, left = (int(torch.randint(size - cfg.crop_size + 1, (1,), generator=rng))
                     for _ in range(2))
        img = img.crop((left, top, left + cfg.crop_size, top + cfg.crop_size))
    if not cfg.no_flip and float(torch.rand(1, generator=rng)) < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def domain_folders(cfg: TrainConfig, phase: str = "train") -> tuple[Path, Path]:
    """(source, target) folders; --direction BtoA swaps the domains."""
    root = Path(cfg.dataroot)
    a, b = root / f"{phase}A", root / f"{phase}B"
    return (b, a) if cfg.direction == "BtoA" else (a, b)


def list_domain(folder: Path, limit: int = 0) -> list:
    if not folder.is_dir():
        raise UserError(f"{folder} not found: training needs DATAROOT/trainA and DATAROOT/trainB")
    files = find_images(folder)
    if not files:
        raise UserError(f"no images in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case)")
    return files[:limit] if limit > 0 else files


class UnpairedDataset(torch.utils.data.Dataset):
    """Items are keyed by (item seed, index, no_crop) tuples from EpochSampler."""

    def __init__(self, cfg: TrainConfig):
        if not Path(cfg.dataroot).is_dir():
            raise UserError(f"--dataroot {cfg.dataroot} does not exist")
        folder_a, folder_b = domain_folders(cfg)
        self.files_a = list_domain(folder_a, cfg.max_dataset_size)
        self.files_b = list_domain(folder_b, cfg.max_dataset_size)
        self.cfg = cfg

    def __len__(self):
        return max(len(self.files_a), len(self.files_b))

    def __getitem__(self, key):
        """(real_a, real_b, warnings about skipped unreadable files for the main process to print)."""
        item_seed, index, no_crop = key
        rng = torch.Generator().manual_seed(item_seed)
        if self.cfg.serial_batches:
            index_b = index % len(self.files_b)
        else:
            index_b = int(torch.randint(len(self.files_b), (1,), generator=rng))
        img_a, skipped_a = self.load(self.files_a, index % len(self.files_a), rng)
        img_b, skipped_b = self.load(self.files_b, index_b, rng)
        return (train_transform(img_a, self.cfg, rng, no_crop),
                train_transform(img_b, self.cfg, rng, no_crop), "\n".join(skipped_a + skipped_b))

    @staticmethod
    def load(files: list, index: int, rng: torch.Generator, tries: int = 10):
        """A corrupt file found mid-training is skipped with a warning for a
        random other file of its domain; ten in a row means the domain is unusable."""
        skipped = []
        for _ in range(tries):
            try:
                return load_rgb(files[index]), skipped
            except UserError as error:
                reason = str(error)
                skipped.append(f"warning: skipping unreadable image ({reason})")
                index = int(torch.randint(len(files), (1,), generator=rng))
        raise UserError(f"{tries} unreadable images in a row in {files[0].parent}, the last: {reason}")


class EpochSampler(torch.utils.data.Sampler):
    """One epoch's item keys: a seeded permutation (unless --serial_batches),
    cut to whole batches (official drop_last), starting at a given batch.
    Under torchrun, process r of w takes positions r, r + w, r + 2w, ... of
    the same permutation, and every process gets the same number of batches."""

    def __init__(self, n_items: int, cfg: TrainConfig, epoch: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1):
        self.n_items, self.cfg, self.epoch, self.start = n_items, cfg, epoch, start_batch
        self.rank, self.world = rank, world
        self.no_crop = epoch > cfg.n_epochs and not cfg.crop_in_decay

    def __len__(self):
        return (self.n_items // (self.cfg.batch_size * self.world) - self.start) * self.cfg.batch_size

    def __iter__(self):
        seed = lambda *key: int.from_bytes(  # noqa: E731 - a 62-bit hash of the key
            hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 2
        order = (torch.arange(self.n_items) if self.cfg.serial_batches else torch.randperm(
            self.n_items, generator=torch.Generator().manual_seed(seed(self.cfg.seed, self.epoch))))
        for i in range(self.start * self.cfg.batch_size, self.start * self.cfg.batch_size + len(self)):
            position = i * self.world + self.rank
            yield seed(self.cfg.seed, self.epoch, position), int(order[position]), self.no_crop


# -----------------------------------------------------------------------------
# 8. The training steps [core]
# -----------------------------------------------------------------------------

def fast_path(cfg: TrainConfig, device) -> bool:
    """--fast (F18): bf16 autocast, channels_last and fused Adam; auto = on CUDA."""
    return cfg.fast == "on" or (cfg.fast == "auto" and torch.device(device).type == "cuda")


def build_networks(cfg: TrainConfig, device) -> dict:
    """The mode's networks (NETWORKS), built eagerly and initialised; the head
    sizes come from the tapped layers' channel counts (Q8). --fast keeps 4-d weights
    channels_last (NHWC), the layout of the GPU's bf16 convolution kernels."""
    with torch.device("meta"):                                # shapes only: no memory, no RNG
        G = make_generator(cfg)
        channels = G.tap_channels(cfg.layer_ids)
        positions = [f.shape[2] * f.shape[3] for f in
                     G.encode(torch.empty(1, 3, cfg.crop_size, cfg.crop_size), cfg.layer_ids)]
    if cfg.lambda_SIM > 0 and min(positions) < cfg.num_patches:
        raise UserError(f"SimDCL stacks num_patches ({cfg.num_patches}) patches of every tapped layer, "
                        f"but at --crop_size {cfg.crop_size} the smallest has {min(positions)} "
                        "positions: lower --num_patches or raise --crop_size")
    make = {"G": lambda: make_generator(cfg),
            "D": lambda: Discriminator(cfg.ndf, not cfg.no_antialias),
            "H": lambda: ProjectionHead(channels, cfg.netF_nc),
            "N": lambda: NegativeGenerator(len(channels), cfg.netF_nc, count=cfg.num_patches),
            "M": lambda: MappingHead(len(cfg.layer_ids)),
            "p": lambda: ImagePool(cfg.pool_size, cfg.crop_size)}
    nets = {name: init_weights(make[name[0]](), cfg.init_type) for name in NETWORKS[cfg.mode]}
    if "H_ema" in nets:                 # NEGCUT's momentum head: its own random init (Q32),
        nets["H_ema"].requires_grad_(False)  # moved only by the EMA, never by gradients (Q31)
    if cfg.lambda_perc > 0 or cfg.lambda_perc_content > 0:
        nets["vgg"] = Perceptual(cfg.vgg_weights)             # frozen: no optimiser, no checkpoint
    layout = torch.channels_last if fast_path(cfg, device) else torch.preserve_format
    nets = {name: net.to(device, memory_format=layout) for name, net in nets.items()}
    for name in nets:                   # compiled in place: the state-dict keys stay official
        if cfg.compile and name[0] in "GD":
            nets[name].compile()
    return nets


def make_generator(cfg: TrainConfig) -> Generator:
    return Generator(cfg.ngf, not cfg.no_antialias, not cfg.no_antialias_up)


def build_optimizers(nets: dict, cfg: TrainConfig, fused: bool = False) -> dict:
    """One Adam per family: "G", "D", "H" (every head, with --lr_H and --beta1_H when
    set), "N" (at --lr: the official --lr_N is never read, Q29); no weight decay.
    Frozen nets (H_ema, VGG) and image pools get none. fused: one kernel per step."""
    params, opts = {}, {}
    for name, net in nets.items():
        trained = [p for p in net.parameters() if p.requires_grad]
        if trained:
            params.setdefault("H" if name[0] == "M" else name[0], []).extend(trained)
    for family, group in params.items():
        lr, beta1 = cfg.lr, cfg.beta1
        if family == "H":
            lr, beta1 = cfg.lr_H or cfg.lr, cfg.beta1_H if cfg.beta1_H >= 0 else cfg.beta1
        opts[family] = torch.optim.Adam(group, lr=lr, betas=(beta1, cfg.beta2), fused=fused or None)
        opts[family].param_groups[0]["initial_lr"] = lr
    return opts


def discriminator_step(opt, judged: list, cfg: TrainConfig) -> list:
    """Update every D on its (D, real, fake) triple with one Adam step:
        L_D = 0.5·[gan(D(real), real) + gan(D(stopgrad(fake)), fake)]
    never scaled by λ_GAN (official). Real and fake go through D in one call,
    which is exact: no layer of D mixes images. Returns (real, fake) terms."""
    for D, _, _ in judged:
        set_requires_grad(D, True)
    opt.zero_grad(set_to_none=True)
    terms = []
    for D, real, fake in judged:
        scores = D(torch.cat([fake.detach(), real]))           # 2n×1×h×w
        terms.append((gan_loss(scores[len(fake):], True, cfg.gan_mode),
                       gan_loss(scores[:len(fake)], False, cfg.gan_mode)))
    sum(0.5 * (real + fake) for real, fake in terms).backward()
    opt.step()
    for D, _, _ in judged:                                    # frozen again: the G step
        set_requires_grad(D, False)                           # sends gradients through D only
    return terms


def cut_step(nets: dict, opts: dict, real_a, real_b, cfg: TrainConfig) -> dict:
    """One CUT / FastCUT (or NEGCUT) iteration [official CUT code, models/cut_model.py;
    official NEGCUT code, models/negcut_model.py].

    Plan:
      1. Forward: y = G(x) for x = [real_a; real_b] (the identity pass rides in
         the same batch: exact, instance norm is per image); its encoder
         activations are the keys of step 3. FastCUT instead flips x at random
         (one coin per step; a flipped pass cannot give the keys) and has no
         identity pass.
      2. D step:  L_D = 0.5·[lsgan(D(stopgrad(fake_b)), fake) + lsgan(D(real_b), real)].
      3. G+H step, D frozen:
         L_G = λ_GAN·lsgan(D(fake_b), real) + 0.5·[NCE(real_a→fake_b) + NCE(real_b→idt_b)]
         (without identity: + NCE(real_a→fake_b) alone). One backward, then
         Adam on G and on H. The paper adds the two NCE terms; the code
         averages them (×0.5), and the presets' λ refer to the code.
    NEGCUT plays a min-max game over the negatives: between steps 2 and 3,
      2b. N step: N ascends. L_N = −NCE + L_div, where NCE uses N's negatives
         and q, k, H_ema's input come without gradient, so only N learns: it
         makes negatives that the queries confuse with their positives.
      3.  The G+H step descends the same NCE (fresh patch ids and noise), N
         frozen but not detached: G learns to tell its patches from N's
         hardest negatives, also through H_ema and N into its encoder.
      4.  EMA: H_ema ← 0.9·H_ema + 0.1·H, a slowly moving copy that gives N a
         stable summary of the image.
    Shapes: real_a, real_b n×3×S×S. Returns the detached losses (no host sync)."""
    G, D, H = nets["G"], nets["D"], nets["H"]
    n = real_a.shape[0]
    use_idt = cfg.nce_idt and cfg.lambda_NCE > 0
    x = torch.cat([real_a, real_b]) if use_idt else real_a    # (2n or n)×3×S×S
    flipped = cfg.flip_equivariance and float(torch.rand(())) < 0.5
    if flipped:
        x = x.flip(3)
    y, taps = (G(x), None) if flipped else G(x, cfg.layer_ids)  # keys from this pass (F9)
    fake_b, idt_b = y[:n], y[n:]
    keys_a, keys_b = ([t[:n] for t in taps], [t[n:] for t in taps]) if taps else (None, None)

    [(loss_D_real, loss_D_fake)] = discriminator_step(opts["D"], [(D, real_b, fake_b)], cfg)
    zero = real_a.new_zeros(())
    negcut = nets if "N" in nets else None

    def nce_both(n_step: bool = False, extras: dict | None = None):
        """(NCE(real_a→fake_b), NCE(real_b→idt_b) or 0, their combination)."""
        nce = nce_between(real_a, fake_b, G, H, G, H, cfg, flipped, negcut, n_step, extras,
                          keys_a) if cfg.lambda_NCE > 0 else zero  # λ_X·ℓ_PatchNCE(G, H, X)
        nce_y = nce_between(real_b, idt_b, G, H, G, H, cfg, flipped, negcut, n_step, extras,
                            keys_b) if use_idt else zero     # λ_Y·ℓ_PatchNCE(G, H, Y)
        return nce, nce_y, (0.5 * (nce + nce_y) if use_idt else nce)

    if negcut and cfg.lambda_NCE > 0:                         # 2b. N step
        set_requires_grad(nets["N"], True)
        opts["N"].zero_grad(set_to_none=True)
        extras = {}                                           # L_div: last branch's negatives (Q34)
        loss_N = -nce_both(True, extras)[2] + diversity_loss(extras["negatives"], n, cfg.lambda_MS_neg)
        loss_N.backward()
        opts["N"].step()
        set_requires_grad(nets["N"], False)

    opts["G"].zero_grad(set_to_none=True)
    opts["H"].zero_grad(set_to_none=True)
    loss_G_GAN = cfg.lambda_GAN * gan_loss(D(fake_b), True, cfg.gan_mode) \
        if cfg.lambda_GAN > 0 else zero                       # λ_GAN·L_GAN(G, D, X, Y)
    loss_NCE, loss_NCE_Y, loss_NCE_both = nce_both()
    loss_G = loss_G_GAN + loss_NCE_both
    loss_perc = perceptual_terms(nets, cfg, [[(idt_b, real_b)] if use_idt else []],
                                 [(fake_b, x[:n])])           # x: the input as G saw it
    loss_G = loss_G if loss_perc is None else loss_G + loss_perc
    loss_G.backward()
    opts["G"].step()
    opts["H"].step()
    losses = dict(D_real=loss_D_real, D_fake=loss_D_fake, G_GAN=loss_G_GAN, NCE=loss_NCE, G=loss_G)
    if negcut:                                                # 4. H_ema ← H_ema + 0.1·(H − H_ema)
        with torch.no_grad():
            torch._foreach_lerp_(list(nets["H_ema"].parameters()), list(H.parameters()), 0.1)
        losses["N"] = loss_N if cfg.lambda_NCE > 0 else zero
    if use_idt:
        losses["NCE_Y"] = loss_NCE_Y
    if loss_perc is not None:
        losses["perc"] = loss_perc
    return {k: v.detach() for k, v in losses.items()}


def translate_both(nets: dict, real_a, real_b, with_identity: bool, taps: tuple = ()) -> tuple:
    """fake_b, fake_a and, with identity, idt_b = G_ab(real_b), idt_a = G_ba(real_a),
    in one pass per generator (exact: instance norm is per image); then the
    tapped activations of real_a in G_ab and of real_b in G_ba (the NCE keys)."""
    n = real_a.shape[0]
    out_b, taps_ab = nets["G_ab"](torch.cat([real_a, real_b]) if with_identity else real_a, taps)
    out_a, taps_ba = nets["G_ba"](torch.cat([real_b, real_a]) if with_identity else real_b, taps)
    return out_b[:n], out_a[:n], out_b[n:], out_a[n:], [t[:n] for t in taps_ab], [t[:n] for t in taps_ba]


def dual_step(nets: dict, opts: dict, real_a, real_b, cfg: TrainConfig) -> dict:
    """One DCLGAN or SimDCL iteration [DCLGAN paper §3, Eq. 8; official DCLGAN
    code, models/dcl_model.py and models/simdcl_model.py].

    Pairing rule (the paper's "dual" setting): an image is always embedded by
    the encoder and head of its own domain, whichever generator made it. So
    NCE1 (A→B) takes keys H_a(G_ab.encode(real_a)) and queries
    H_b(G_ba.encode(fake_b)); NCE2 mirrors it. Keys are detached, so H_a
    learns only from NCE2's queries and H_b from NCE1's.
    Plan:
      1. Forward: fake_b, fake_a, and the identity images idt_b = G_ab(real_b),
         idt_a = G_ba(real_a) when λ_IDT > 0 (official idt_A, idt_B).
      2. D step, both discriminators, hinge: D_b on (real_b, fake_b), D_a on (real_a, fake_a).
      3. G+H step, D frozen:
         L_G = 0.5·λ_GAN·(hinge(D_b(fake_b)) + hinge(D_a(fake_a)))
             + 0.5·(NCE1 + NCE2)                      (λ_NCE inside each)
             + 0.5·λ_IDT·(mean|idt_b − real_b| + mean|idt_a − real_a|)
             + λ_SIM·L_sim                              (SimDCL only)
         This is half of the paper's Eq. 8 with λ_NCE = 2 (Q20): the official
         code's factors, so the logged values match official logs.
    Returns the losses under the official log names (D_A judges B images)."""
    n = real_a.shape[0]
    use_idt = cfg.lambda_IDT > 0
    fake_b, fake_a, idt_b, idt_a, keys_a, keys_b = translate_both(nets, real_a, real_b, use_idt,
                                                                  cfg.layer_ids)
    G_ab, G_ba, H_a, H_b = nets["G_ab"], nets["G_ba"], nets["H_a"], nets["H_b"]

    (D_A_real, D_A_fake), (D_B_real, D_B_fake) = discriminator_step(
        opts["D"], [(nets["D_b"], real_b, fake_b), (nets["D_a"], real_a, fake_a)], cfg)

    opts["G"].zero_grad(set_to_none=True)
    opts["H"].zero_grad(set_to_none=True)
    zero = real_a.new_zeros(())
    loss_G_A = cfg.lambda_GAN * gan_loss(nets["D_b"](fake_b), True, cfg.gan_mode)
    loss_G_B = cfg.lambda_GAN * gan_loss(nets["D_a"](fake_a), True, cfg.gan_mode)
    similar, one, two = "M_ra" in nets, {}, {}
    nce1 = nce_between(real_a, fake_b, G_ab, H_a, G_ba, H_b, cfg, extras=one, feat_k=keys_a)
    nce2 = nce_between(real_b, fake_a, G_ba, H_b, G_ab, H_a, cfg, extras=two, feat_k=keys_b)
    loss_sim = zero
    if similar:                                               # fresh patch ids for the fakes (Q27)
        queries_b, _ = H_b(one["feat_q"], cfg.num_patches)
        queries_a, _ = H_a(two["feat_q"], cfg.num_patches)
        loss_sim = cfg.lambda_SIM * similarity_loss(one["keys"], queries_a, two["keys"], queries_b, nets, n)
    loss_idt_A = cfg.lambda_IDT * F.l1_loss(idt_b, real_b) if use_idt else zero
    loss_idt_B = cfg.lambda_IDT * F.l1_loss(idt_a, real_a) if use_idt else zero
    loss_G = (0.5 * (loss_G_A + loss_G_B) + 0.5 * (nce1 + nce2)
              + 0.5 * (loss_idt_A + loss_idt_B) + loss_sim)
    loss_perc = perceptual_terms(nets, cfg, [[(idt_b, real_b), (idt_a, real_a)] if use_idt else []],
                                 [(fake_b, real_a), (fake_a, real_b)])
    loss_G = loss_G if loss_perc is None else loss_G + loss_perc
    loss_G.backward()
    opts["G"].step()
    opts["H"].step()
    losses = dict(D_A=0.5 * (D_A_real + D_A_fake), G_A=loss_G_A, NCE1=nce1, idt_A=loss_idt_A,
                  D_B=0.5 * (D_B_real + D_B_fake), G_B=loss_G_B, NCE2=nce2, idt_B=loss_idt_B,
                  G=loss_G)
    if similar:
        losses["Sim"] = loss_sim
    if loss_perc is not None:
        losses["perc"] = loss_perc
    return {k: v.detach() for k, v in losses.items()}


def cyclegan_step(nets: dict, opts: dict, real_a, real_b, cfg: TrainConfig) -> dict:
    """One CycleGAN iteration [CycleGAN paper §3, Eq. 3 and §5.2; upstream
    pytorch-CycleGAN-and-pix2pix, models/cycle_gan_model.py].

    Plan (G before D, unlike the CUT lineage):
      1. Forward: fake_b = G_ab(real_a), fake_a = G_ba(real_b), the
         reconstructions rec_a = G_ba(fake_b), rec_b = G_ab(fake_a), and the
         identity images idt_b = G_ab(real_b), idt_a = G_ba(real_a).
      2. G step, D frozen:
         L_G = lsgan(D_b(fake_b)) + lsgan(D_a(fake_a))
             + λ_A·mean|rec_a − real_a| + λ_B·mean|rec_b − real_b|          (cycle)
             + λ_IDT·λ_B·mean|idt_b − real_b| + λ_IDT·λ_A·mean|idt_a − real_a| (identity)
      3. D step on fakes drawn from the image pools (pool_size 50).
    Returns the losses under the official log names."""
    use_idt = cfg.lambda_IDT > 0
    fake_b, fake_a, idt_b, idt_a, _, _ = translate_both(nets, real_a, real_b, use_idt)
    rec_a, rec_b = nets["G_ba"](fake_b), nets["G_ab"](fake_a)   # n×3×S×S each

    set_requires_grad(nets["D_a"], False)                     # the G step: D frozen, gradients
    set_requires_grad(nets["D_b"], False)                     # pass through it to G only
    opts["G"].zero_grad(set_to_none=True)
    zero = real_a.new_zeros(())
    loss_G_A = cfg.lambda_GAN * gan_loss(nets["D_b"](fake_b), True, cfg.gan_mode)
    loss_G_B = cfg.lambda_GAN * gan_loss(nets["D_a"](fake_a), True, cfg.gan_mode)
    loss_cycle_A = cfg.lambda_A * F.l1_loss(rec_a, real_a)
    loss_cycle_B = cfg.lambda_B * F.l1_loss(rec_b, real_b)
    loss_idt_A = cfg.lambda_IDT * cfg.lambda_B * F.l1_loss(idt_b, real_b) if use_idt else zero
    loss_idt_B = cfg.lambda_IDT * cfg.lambda_A * F.l1_loss(idt_a, real_a) if use_idt else zero
    loss_G = loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B
    loss_perc = perceptual_terms(nets, cfg, [[(idt_b, real_b), (idt_a, real_a)] if use_idt else [],
                                             [(rec_a, real_a), (rec_b, real_b)]],
                                 [(fake_b, real_a), (fake_a, real_b)])
    loss_G = loss_G if loss_perc is None else loss_G + loss_perc
    loss_G.backward()
    opts["G"].step()

    (D_A_real, D_A_fake), (D_B_real, D_B_fake) = discriminator_step(
        opts["D"], [(nets["D_b"], real_b, nets["pool_b"](fake_b)),
                    (nets["D_a"], real_a, nets["pool_a"](fake_a))], cfg)
    losses = dict(D_A=0.5 * (D_A_real + D_A_fake), G_A=loss_G_A, cycle_A=loss_cycle_A,
                  idt_A=loss_idt_A, D_B=0.5 * (D_B_real + D_B_fake), G_B=loss_G_B,
                  cycle_B=loss_cycle_B, idt_B=loss_idt_B, G=loss_G)
    if loss_perc is not None:
        losses["perc"] = loss_perc
    return {k: v.detach() for k, v in losses.items()}


STEPS = {"cut": cut_step, "fastcut": cut_step, "negcut": cut_step, "fastnegcut": cut_step,
         "dcl": dual_step, "simdcl": dual_step,
         "cyclegan": cyclegan_step}


# -----------------------------------------------------------------------------
# 9. The training loop, checkpoints, samples [plumbing]
# -----------------------------------------------------------------------------

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "dcl.py checkpoint", 1
RESUMABLE = {"n_epochs", "n_epochs_decay", "max_steps", "device", "num_threads", "print_freq",
             "display_freq", "save_latest_freq", "save_epoch_freq", "continue_train",
             "deterministic", "checkpoints_dir", "dataroot", "vgg_weights", "fast", "compile"}


def lr_multiplier(epoch: int, cfg: TrainConfig) -> float:
    """Official 'linear' policy for 1-based epoch e: 1 − max(0, e − n_epochs)/(n_epochs_decay + 1).
    Full LR for n_epochs epochs, then linear decay; the last epoch runs at
    lr/(n_epochs_decay + 1): the official schedule never reaches 0 (Q10)."""
    return 1.0 - max(0, epoch - cfg.n_epochs) / (cfg.n_epochs_decay + 1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename over the old
    file: a crash at any moment leaves either the old or the new checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, nets: dict, cfg: TrainConfig, opts: dict | None = None,
                    counters: dict | None = None) -> None:
    """One dict of tensors and plain values (weights_only=True loads it). With opts and
    counters it holds all a run needs to continue; without, a snapshot for translate."""
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "mode": cfg.mode,
            "config": dataclasses.asdict(cfg),
            "nets": {name: net.state_dict() for name, net in nets.items() if name != "vgg"}}
    if opts is not None:
        ckpt.update(optimizers={name: o.state_dict() for name, o in opts.items()},
                    rng=rng_state(), **counters)
    atomic_save(ckpt, path)


def read_checkpoint(path) -> dict:
    """Load a checkpoint safely (tensors and plain values only) or explain why not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint (it holds a {type(ckpt).__name__})")
    if ckpt.get("format") == CHECKPOINT_FORMAT and ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} is a version {ckpt.get('version')} checkpoint; this dcl.py "
                        f"reads version {CHECKPOINT_VERSION}")
    return ckpt


def stored_config(ckpt: dict, path) -> TrainConfig:
    """The config a checkpoint was trained with; unknown settings: a newer dcl.py wrote it."""
    unknown = sorted(set(ckpt["config"]) - {f.name for f in fields(TrainConfig)})
    if unknown or ckpt.get("mode") not in MODES:
        raise UserError(f"{path} was written by a newer dcl.py (unknown: "
                        f"{', '.join(unknown) or ckpt.get('mode')}); update dcl.py to use it")
    return TrainConfig(**ckpt["config"])


def load_state(net: nn.Module, state: dict, what: str) -> None:
    """strict=True loading with a short, readable key diff on failure."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        own, given = set(net.state_dict()), set(state)
        missing, unexpected = sorted(own - given)[:3], sorted(given - own)[:3]
        detail = (f"missing {missing}, unexpected {unexpected}" if missing or unexpected
                  else str(error).strip().splitlines()[-1].strip()[:160])
        raise UserError(f"{what} does not fit this network: {detail}") from None


def format_duration(seconds: float) -> str:
    s = int(seconds)
    days, hours, minutes = s // 86400, s // 3600 % 24, s // 60 % 60
    return (f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m" if hours
            else f"{minutes}m{s % 60:02d}s")


class Meter:
    """Sums losses on the device, so the step never waits for the GPU; read at log steps."""

    def __init__(self):
        self.sums, self.count, self.start, self.data_time = {}, 0, time.perf_counter(), 0.0

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += 1

    def read(self, reset: bool = True) -> tuple[dict, float, float]:
        """(mean losses, steps/s, fraction of time waiting for data) since the last reset."""
        elapsed = time.perf_counter() - self.start
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        speed, waiting = self.count / elapsed, self.data_time / elapsed
        if reset:
            self.__init__()
        return means, speed, waiting


def fixed_samples(cfg: TrainConfig, dataset: UnpairedDataset, count: int = 4) -> tuple:
    """A few held-out inputs (testA/testB, else the first training images), resized
    without crop or flip, as translate would see them."""
    batches = []
    for test_folder, train_files in zip(domain_folders(cfg, "test"), (dataset.files_a, dataset.files_b)):
        files = find_images(test_folder) if test_folder.is_dir() else []
        files = (files or train_files)[:count]
        images = [load_rgb(p).resize((cfg.crop_size,) * 2, Image.Resampling.BICUBIC) for p in files]
        batches.append(torch.stack([to_tensor(img) for img in images]))
    n = min(len(batches[0]), len(batches[1]))
    return batches[0][:n], batches[1][:n]


@torch.no_grad()
def save_samples(nets, samples, cfg, device, path: Path) -> None:
    """One row per fixed input; columns real_a | fake_b | real_b, then idt_b (CUT) or
    fake_a (two-generator modes); 2-pixel black borders, as torchvision's make_grid."""
    real_a, real_b = samples[0].to(device), samples[1].to(device)
    G = nets["G"] if "G" in nets else nets["G_ab"]
    last = [nets["G_ba"](real_b)] if "G_ba" in nets else [G(real_b)] if cfg.nce_idt else []
    grid = F.pad(torch.stack([real_a, G(real_a), real_b, *last], 1).float().cpu(), (2, 0, 2, 0), value=-1)
    rows, cols, _, h, w = grid.shape                          # rows×cols×3×(S+2)×(S+2)
    image = F.pad(grid.permute(2, 0, 3, 1, 4).reshape(3, rows * h, cols * w), (0, 2, 0, 2), value=-1)
    Image.fromarray(to_uint8(image)).save(path)


def describe_config(cfg: TrainConfig, source: dict) -> str:
    lines = [f"  {f.name:<18} {getattr(cfg, f.name)!s:<24}"
             + (f" ({source[f.name]})" if f.name in source else "") for f in fields(cfg)]
    return ("config; in brackets where a value came from, if not the official default "
            "(mode preset, demo settings, flag, stored run):\n" + "\n".join(lines))


def write_run_info(run_dir: Path, cfg: TrainConfig, device: torch.device, argv: list) -> None:
    """config.json, and versions and this file's SHA-256 in env.txt: what made the run."""
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    source_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    with open(run_dir / "env.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}  "
                f"torch {torch.__version__}  cuda {torch.version.cuda}  gpu {gpu}  "
                f"dcl.py sha256 {source_hash}\n  argv: {' '.join(argv)}\n")


def load_optimizer(opt: torch.optim.Optimizer, state: dict, fused: bool) -> None:
    """A stored Adam state, laid out for this run: fused or not (--fast may differ
    from the run that saved it), moments in their parameters' memory layout."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["fused"] = fused or None
        for p in group["params"]:
            slots = opt.state.get(p, {})
            for k, v in slots.items():
                slots[k] = (v.to(p.device if fused else "cpu", torch.float32) if k == "step"
                            else torch.empty_like(p).copy_(v))


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Under torchrun (RANK in the environment) join the process group: NCCL
    and one GPU per process on CUDA, gloo on CPU. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def average_gradients(opt: torch.optim.Optimizer, args=(), kwargs=None) -> None:
    """Before every optimiser step under torchrun: each gradient becomes its mean
    over the processes (one flat all-reduce). DDP's arithmetic without its wrapper,
    whose one-forward-per-backward rule the GAN steps break (a frozen D in the G
    step, encoder passes outside forward); StyleGAN2-ADA does the same."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads]).div_(dist.get_world_size())
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def train(cfg: TrainConfig, source: dict, argv: list) -> int:
    rank, world, device = setup_distributed(pick_device(cfg.device))
    master = rank == 0                                        # only it prints and writes files
    run_dir = Path(cfg.checkpoints_dir) / cfg.name
    latest = run_dir / "ckpt_latest.pt"
    resume = read_checkpoint(latest) if cfg.continue_train else None
    if resume is not None:
        cfg = resume_config(resume, cfg, source, latest)
        source = {f.name: "flag" if source.get(f.name) == "flag" else "stored" for f in fields(cfg)}
    elif latest.exists():
        raise UserError(f"{latest} exists: add --continue_train to continue that run, "
                        "or choose another --name")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = not cfg.deterministic
    seed_everything(cfg.seed)                                 # the same initial weights everywhere
    dataset = UnpairedDataset(cfg)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {cfg.batch_size} × {world} processes is larger than the "
                        f"dataset ({len(dataset)})")
    samples = fixed_samples(cfg, dataset)
    fast = fast_path(cfg, device)
    nets = build_networks(cfg, device)
    opts = build_optimizers(nets, cfg, fused=fast)
    step, epoch, epoch_step = 0, 1, 0
    if resume is not None:
        for name, state in resume["nets"].items():
            load_state(nets[name], state, f"{latest} ({name})")
        for name, opt in opts.items():
            load_optimizer(opt, resume["optimizers"][name], fast)
        step, epoch, epoch_step = resume["step"], resume["epoch"], resume["epoch_step"]
        set_rng_state(resume["rng"])
        if epoch_step >= steps_per_epoch:                     # saved just as an epoch ended
            epoch, epoch_step = epoch + 1, 0
        if epoch_step and resume.get("world", 1) != world:    # the epoch's shards would change
            raise UserError(f"{latest} stopped mid-epoch with {resume.get('world', 1)} process(es): "
                            f"continue with as many (this run has {world})")
    if world > 1:                                             # own patch ids, noise, flips (F19)
        seed_everything(cfg.seed + 1000 * rank + step)
        for opt in opts.values():
            opt.register_step_pre_hook(average_gradients)
    if master:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, cfg, device, argv)
    say = print if master else lambda *args, **kw: None

    say(describe_config(cfg, source))
    say("networks: " + ", ".join(f"{k} {count_parameters(v) / 1e6:.3f}M" for k, v in nets.items()
                                 if count_parameters(v)))
    total_steps = min(cfg.total_epochs * steps_per_epoch, cfg.max_steps or math.inf)
    batch = (f"batch {cfg.batch_size}" if world == 1 else f"batch {cfg.batch_size} per process × "
             f"{world} processes = {cfg.batch_size * world} (the papers used 1; lr not scaled)")
    say(f"data: {len(dataset.files_a)} A, {len(dataset.files_b)} B images, {steps_per_epoch} "
        f"steps per epoch, {batch}; device {device}{', bf16 fast path' if fast else ''}; "
        f"run folder {run_dir}")
    say(f"schedule: lr {cfg.lr:g} for epochs 1-{cfg.n_epochs}, then linear decay over "
        f"{cfg.n_epochs_decay} epochs{' without random crops' if not cfg.crop_in_decay else ''}; "
        f"{total_steps} steps in all" + (f", resuming at step {step}" if step else ""))
    if source.get("dataroot") not in ("flag", "stored"):
        say(f"No --dataroot: training on the bundled set in {BUNDLED_DATA} with demo settings. "
            f"Watch {run_dir / 'samples'}: a 2-core CPU shows the translation within ~10 minutes.")

    step_fn, meter = STEPS[cfg.mode], Meter()
    amp = torch.autocast(device.type, torch.bfloat16, enabled=fast)
    layout = torch.channels_last if fast else torch.preserve_format
    log_path = run_dir / "log.jsonl"
    if master and resume is not None and log_path.exists():  # rows logged after the checkpoint
        rows = log_path.read_text().splitlines(keepends=True)  # (a crash, kill -9) are redone
        log_path.write_text("".join(r for r in rows if r.strip() and json.loads(r)["step"] <= step))
    log = open(log_path, "a") if master else None
    tty, last_print = sys.stdout.isatty() and master, 0.0
    stop = install_stop_handlers()
    counters = lambda: dict(step=step, epoch=epoch, epoch_step=epoch_step, world=world)  # noqa: E731
    finished = bool(cfg.max_steps) and step >= cfg.max_steps
    skipped_files, halt = 0, 0
    first_epoch, first_batch = epoch, epoch_step              # one loader for the whole run:
    keys = itertools.chain.from_iterable(                     # its workers outlive the epochs
        EpochSampler(len(dataset), cfg, e, first_batch if e == first_epoch else 0, rank, world)
        for e in range(first_epoch, cfg.total_epochs + 1))
    batches = iter(torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=keys, num_workers=cfg.num_threads,
        drop_last=True, pin_memory=device.type == "cuda", generator=torch.Generator()))
    try:
        while epoch <= cfg.total_epochs and not finished:
            lr_now = cfg.lr * lr_multiplier(epoch, cfg)
            for opt in opts.values():
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_multiplier(epoch, cfg)
            wait = time.perf_counter()
            try:
                real_a, real_b, notes = next(batches)
            except StopIteration:
                break
            except UserError as error:                        # from a worker: a traceback as text
                text = str(error).strip()
                raise UserError(text.splitlines()[-1].partition(": ")[2] if "\n" in text else text) from None
            meter.data_time += time.perf_counter() - wait
            for note in filter(None, notes):
                print(note, file=sys.stderr)
                skipped_files += note.count("\n") + 1
            with amp:
                losses = step_fn(nets, opts, real_a.to(device, non_blocking=True, memory_format=layout),
                                 real_b.to(device, non_blocking=True, memory_format=layout), cfg)
            meter.add(losses)
            step, epoch_step = step + 1, epoch_step + 1
            finished = bool(cfg.max_steps) and step >= cfg.max_steps
            if world == 1:
                halt = stop["signal"]
            elif step % cfg.print_freq == 0:                  # every process stops at one step
                flag = torch.tensor([stop["signal"]], device=device)
                dist.all_reduce(flag, dist.ReduceOp.MAX)
                halt = int(flag)
            epoch_done = epoch_step == steps_per_epoch
            log_now = (step % cfg.print_freq == 0 or finished or epoch_done or halt
                       or step % cfg.save_latest_freq == 0)
            if master and (log_now or (tty and time.perf_counter() - last_print > 1.0)):
                last_print = time.perf_counter()
                report(meter, log if log_now else None, cfg, step, epoch, epoch_step,
                       steps_per_epoch, total_steps, lr_now, device, tty, log_now)
            if master and step % cfg.display_freq == 0:
                save_samples(nets, samples, cfg, device, run_dir / "samples" / f"step_{step:07d}.png")
            if epoch_done:
                if master and epoch % cfg.save_epoch_freq == 0:
                    save_checkpoint(run_dir / f"ckpt_epoch_{epoch:03d}.pt", nets, cfg)
                    save_samples(nets, samples, cfg, device, run_dir / "samples" / f"epoch_{epoch:03d}.png")
                epoch, epoch_step = epoch + 1, 0
            if master and step % cfg.save_latest_freq == 0:
                save_checkpoint(latest, nets, cfg, opts, counters())
            if finished or halt:
                break
    finally:
        if log is not None:
            log.close()
        stop["restore"]()
        if tty:
            print()
    if master:
        save_checkpoint(latest, nets, cfg, opts, counters())
        save_samples(nets, samples, cfg, device, run_dir / "samples" / "latest.png")
        resume_cmd = shlex.join(["python", "dcl.py", "train", "--name", cfg.name, "--checkpoints_dir",
                                 cfg.checkpoints_dir, "--continue_train"])
        more = "--max_steps M (or 0 for every epoch)" if cfg.max_steps else "--n_epochs N"
        if skipped_files:
            print(f"skipped {skipped_files} reads of unreadable images (see the warnings above)")
        print(f"stopped by signal {halt} at step {step}; checkpoint saved. Resume with:\n  {resume_cmd}"
              if halt else f"done: {step} steps; checkpoint {latest}, samples in {run_dir / 'samples'}. "
              f"To train longer: {resume_cmd} {more}")
    if world > 1:                       # leave together, after rank 0 saved: torchrun stops every
        dist.barrier()                  # process once one ends, and gloo may abort a lone teardown
    return 128 + halt if halt and master else 0


def report(meter, log, cfg, step, epoch, epoch_step, steps_per_epoch, total_steps, lr_now,
           device, tty, log_now) -> None:
    """The progress line (in place on a terminal) and, at log steps, a JSON row."""
    first = step - meter.count + 1
    means, speed, waiting = meter.read(reset=log_now)         # a terminal refresh only peeks
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:                                                   # checked before every checkpoint write
        raise UserError(f"loss {bad[0]} became {means[bad[0]]} in steps {first}-{step} (epoch "
                        f"{epoch}); the last checkpoint was kept. Try a lower --lr or check the data")
    losses = " ".join(f"{k} {v:.3f}" for k, v in means.items())
    memory = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G" if device.type == "cuda" else ""
    line = (f"[{cfg.mode}] ep {epoch}/{cfg.total_epochs} it {epoch_step}/{steps_per_epoch} | "
            f"{speed:.2f} it/s | eta {format_duration((total_steps - step) / speed)} | "
            f"lr {lr_now:.1e} | {losses}" + (f" | data {waiting:.0%}" if waiting > 0.1 else "") + memory)
    if tty:
        width = max(40, os.get_terminal_size().columns - 1)
        print("\r" + line[:width].ljust(width), end="\n" if log_now else "", flush=True)
    elif log_now:
        print(line, flush=True)
    if log is not None:
        log.write(json.dumps(dict(step=step, epoch=epoch, lr=lr_now, **means, it_per_s=speed,
                                  time=time.time())) + "\n")
        log.flush()


def install_stop_handlers() -> dict:
    """Ctrl-C/SIGTERM: stop after this step and save; a second Ctrl-C: at once. restore() undoes it."""
    stop = {"signal": 0, "restore": lambda: None}

    def handler(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signum
    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        stop["restore"] = lambda: [signal.signal(s, h) for s, h in old.items()]
    except ValueError:                                        # not the main thread (e.g. in a test)
        pass
    return stop


def resume_config(ckpt: dict, cfg: TrainConfig, source: dict, path: Path) -> TrainConfig:
    """The stored config, with only schedule and plumbing flags changeable."""
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizers" not in ckpt:
        raise UserError(f"{path} is not a resumable dcl.py checkpoint")
    stored = stored_config(ckpt, path)
    for flag in source:
        if source[flag] == "flag" and flag not in RESUMABLE and getattr(cfg, flag) != getattr(stored, flag):
            raise UserError(f"--{flag} cannot change when continuing {path} "
                            f"(stored: {getattr(stored, flag)}); only "
                            f"{', '.join(sorted(RESUMABLE - {'continue_train'}))} can")
    changes = {f: getattr(cfg, f) for f in source if source[f] == "flag" and f in RESUMABLE}
    cfg = dataclasses.replace(stored, **changes)
    cfg.validate()
    return cfg


# -----------------------------------------------------------------------------
# 10. Translate [plumbing]
# -----------------------------------------------------------------------------
# G is fully convolutional, so it translates any size: reflect-pad to a
# multiple of 4 (two halvings and two doublings), translate, crop back.

def load_generator(path, mode: str | None, direction: str, device) -> nn.Module:
    """A trained G from a dcl.py checkpoint (config inside; --direction picks
    G_ab or G_ba in two-generator modes), or an official generator state dict
    (`latest_net_G.pth`, `latest_net_G_A.pth`, ...) given the --mode that made it."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        mode, cfg, nets = ckpt["mode"], stored_config(ckpt, path), ckpt["nets"]
        if direction == "BtoA" and "G_ba" not in nets:
            raise UserError(f"{path} is a {mode} checkpoint with one generator (A to B); it cannot "
                            "translate BtoA. Train with --direction BtoA for the other way")
        state = nets["G"] if "G" in nets else nets["G_ba" if direction == "BtoA" else "G_ab"]
    elif "model.1.weight" in ckpt:
        if mode is None:
            raise UserError(f"{path} is an official state dict: say which method made it with "
                            f"--mode ({', '.join(MODES)})")
        state = ckpt                                          # the file itself picks the direction
        cfg = TrainConfig(**{**MODES[mode], "mode": mode, "ngf": state["model.1.weight"].shape[0]})
    else:
        raise UserError(f"{path} is neither a dcl.py checkpoint nor an official generator state dict")
    G = make_generator(cfg)
    load_state(G, state, str(path))
    return G.to(device).eval()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """3×H×W in [−1, 1] -> H×W×3 uint8 exactly as the official tensor2im:
    (x + 1)/2·255, truncated, not rounded."""
    array = (image.float().clamp(-1, 1).cpu().numpy().transpose(1, 2, 0) + 1) / 2.0 * 255.0
    return array.astype(np.uint8)


@torch.no_grad()
def translate(args) -> int:
    device = pick_device(args.device)
    source, output = Path(args.input), Path(args.output)
    if not source.exists():
        raise UserError(f"--input {source} does not exist")
    files = [source] if source.is_file() else find_images(source)
    if not files:
        raise UserError(f"no images in {source} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case)")
    if source.is_dir() and output.resolve() == source.resolve():
        raise UserError(f"--output {output} is the input folder; choose another")
    G = load_generator(args.checkpoint, args.mode, args.direction, device)
    relative = [p.relative_to(source) if source.is_dir() else Path(p.name) for p in files]
    targets = [r.with_suffix(".png") for r in relative]
    clashes = {t for t, c in Counter(targets).items() if c > 1}  # x.jpg and x.png: keep both
    targets = [output / (r.with_name(r.name + ".png") if t in clashes else t)
               for r, t in zip(relative, targets)]
    start = time.perf_counter()
    for path, target in zip(files, targets):
        img = load_rgb(path)
        if args.resize:                                       # official test protocol: square bicubic
            img = img.resize((args.resize, args.resize), Image.Resampling.BICUBIC)
        if args.max_side and max(img.size) > args.max_side:  # keep the aspect ratio
            scale = args.max_side / max(img.size)
            img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
        x = to_tensor(img)[None].to(device)                   # 1×3×h×w
        h, w = x.shape[2:]
        if min(h, w) < 8:
            raise UserError(f"{path} is {w}x{h}; images need at least 8 pixels per side")
        x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")  # to a multiple of 4
        try:
            y = G(x)[0, :, :h, :w]
        except RuntimeError as error:                         # torch.OutOfMemoryError included
            if "memory" not in str(error) and "alloc" not in str(error):
                raise
            raise UserError(f"{path} ({w}x{h}) does not fit in {device} memory: use --max_side "
                            f"{max(64, max(w, h) // 2)} (or another --device)") from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(y)).save(target)
        except OSError as error:
            raise UserError(f"cannot write {target}: {error.strerror or error}") from None
    print(f"translated {len(files)} image{'s' * (len(files) != 1)} into {output} "
          f"({len(files) / (time.perf_counter() - start):.2f} images/s, reading and writing included)")
    return 0


# -----------------------------------------------------------------------------
# 11. Bench [plumbing]
# -----------------------------------------------------------------------------
# Times the real training step (STEPS, under train's autocast) on random batches:
# no data loading, warm-up steps (cuDNN autotuning, compilation), then timed steps
# between synchronisations. FLOPs are counted by torch.utils.flop_counter on the
# first step; the device's matmul rate, measured in the same run, is the ceiling.

def matmul_tflops(device: torch.device, sync) -> tuple[float, str]:
    """Measured matrix-multiply rate (n×n @ n×n is 2n³ operations): bf16 on a GPU,
    the ceiling of --fast; fp32 on a CPU, which has no fast bf16 kernels."""
    size, reps, dtype = (8192, 20, torch.bfloat16) if device.type == "cuda" else (1024, 5, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b, sync()                                             # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e12, str(dtype).split(".")[1]


def bench(flags: dict, modes: list, steps: int, warmup: int) -> int:
    device = pick_device(flags.get("device", "auto"))
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    ceiling, dtype = matmul_tflops(device, sync)
    for mode in modes:
        cfg, _ = resolve_config({"dataroot": "(random batches)", "load_size": flags.get(
            "crop_size", 256), **flags, "mode": mode})
        seed_everything(cfg.seed)
        fast = fast_path(cfg, device)
        nets = build_networks(cfg, device)
        opts = build_optimizers(nets, cfg, fused=fast)
        real_a, real_b = (torch.rand(cfg.batch_size, 3, cfg.crop_size, cfg.crop_size, device=device)
                          .mul(2).sub(1).contiguous(memory_format=torch.channels_last if fast
                                                    else torch.contiguous_format) for _ in "ab")

        def run():        # one autocast region per step, as in train: it caches bf16 weight copies
            with torch.autocast(device.type, torch.bfloat16, enabled=fast):
                return STEPS[mode](nets, opts, real_a, real_b, cfg)
        with FlopCounterMode(display=False) as flops:
            run()
        for _ in range(warmup):
            run()
        sync()
        torch.cuda.reset_peak_memory_stats(device) if cuda else None
        start = time.perf_counter()
        for _ in range(steps):
            losses = run()
        sync()
        seconds, tflop = (time.perf_counter() - start) / steps, flops.get_total_flops() / 1e12
        sig = lambda x: float(f"{x:.4g}")                     # noqa: E731 - 4 significant digits
        if not all(math.isfinite(float(v)) for v in losses.values()):
            raise UserError(f"bench {mode}: a loss is not finite")
        row = dict(mode=mode, device=torch.cuda.get_device_name(device) if cuda else "cpu",
                   torch=torch.__version__, batch_size=cfg.batch_size, crop_size=cfg.crop_size,
                   fast=fast, compile=cfg.compile, s_per_iter=sig(seconds),
                   images_per_s=sig(cfg.batch_size / seconds), tflop_per_iter=sig(tflop),
                   tflops=sig(tflop / seconds), matmul_tflops=sig(ceiling), matmul_dtype=dtype,
                   peak_memory_gb=sig(torch.cuda.max_memory_allocated(device) / 1e9) if cuda else None)
        print(f"{mode:<10} {seconds:.4f} s/iter {row['images_per_s']:8.2f} images/s  {tflop:.4g} TFLOP/iter "
              f"{tflop / seconds:.4g} TFLOP/s = {tflop / seconds / ceiling:.0%} of {dtype} matmul",
              file=sys.stderr)
        print(json.dumps(row), flush=True)
    return 0


# -----------------------------------------------------------------------------
# 12. Command line [plumbing]
# -----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):                                 # one line, exit 2, no usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dcl.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train_parser = commands.add_parser("train", help="train a model (see --mode)")
    bench_parser = commands.add_parser("bench", help="time the training step of one mode or all "
                                       "(random batches; default batch 1 at 256x256)")
    for f, sub in itertools.product(fields(TrainConfig), (train_parser, bench_parser)):
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"]
                  + f" (default {f.default!r})")            # one flag per config field, official names
        if isinstance(f.default, bool):                      # --flag, --flag true, --flag false
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            choices = f.metadata.get("choices")
            kw.update(type=type(f.default), choices=(*choices, "all") if sub is bench_parser
                      and f.name == "mode" else choices)
        sub.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kw)
    bench_parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    bench_parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    tr = commands.add_parser("translate", help="translate an image or a folder with a trained G")
    tr.add_argument("--checkpoint", required=True, help="a dcl.py checkpoint, or an official "
                    "latest_net_G.pth with --mode")
    tr.add_argument("--input", required=True, help="an image, or a folder (searched recursively)")
    tr.add_argument("--output", required=True, help="folder for the results (relative paths "
                    "kept, written as .png)")
    tr.add_argument("--mode", choices=tuple(MODES), default=None,
                    help="the method an official state dict came from")
    tr.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB")
    tr.add_argument("--max_side", type=int, default=0, help="shrink larger images so their "
                    "longer side is this many pixels (0 = never)")
    tr.add_argument("--resize", type=int, default=0, help="resize to this square first "
                    "(256 = the official test protocol); 0 = native resolution")
    tr.add_argument("--device", default="auto")
    return parser


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "translate":
            return translate(args)
        flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
        if args.command == "bench":
            if args.steps < 1 or args.warmup < 0:
                raise UserError("bench needs --steps 1 or more and --warmup 0 or more")
            mode = flags.pop("mode", "cut")
            return bench(flags, [m for m in MODES if mode in ("all", m)], args.steps, args.warmup)
        cfg, source = resolve_config(flags)
        return train(cfg, source, ["dcl.py"] + argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():                             # joined by a torchrun train
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
