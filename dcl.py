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
  Hneg-SRC        Jung, Kwon, Ye, CVPR 2022, arXiv 2203.01532; official code
                  jcy132/Hneg_SRC (9a9647d). Hard-negative decoupled loss, relations.
  QS-Attn         Hu, Zhou, Wang, Gu, Wang, CVPR 2022, arXiv 2203.08483; official
                  code sapphire497/query-selected-attention (c2c5e40). Selected anchors.
  Extensions, off by default: a VGG16 perceptual loss (--lambda_perc) and
  hard-negative weighting of PatchNCE (--nce_hard_beta).
Every network keeps the official layer indices and state-dict keys, so official
`latest_net_G.pth` files load strictly. Every default is the official code's but
one: --fast auto switches the bf16 fast path on for CUDA devices (F18); --fast off
is the official fp32 arithmetic.

Commands
    python dcl.py train --mode simdcl                   # bundled data, demo settings
    python dcl.py train --mode cut --max_steps 2        # does one training cycle work?
    python dcl.py train --mode cut --dataroot ./datasets/horse2zebra --name h2z
    python dcl.py train --name h2z --continue_train     # resume exactly where it stopped
    python dcl.py train --dataroot ./datasets/horse2zebra --name h2z --CUT_mode CUT  # official
    python dcl.py test --dataroot ./datasets/horse2zebra --name h2z  # as test.py: ./results/h2z/
    python dcl.py translate --checkpoint checkpoints/h2z/ckpt_latest.pt \\
                            --input ./datasets/horse2zebra/testA --output ./results/h2z
    python dcl.py eval --fake ./results/h2z --real ./datasets/horse2zebra/testB  # FID, KID
    python dcl.py bench --mode all                      # s/iter, images/s, TFLOP/s per mode
    torchrun --nproc_per_node=4 dcl.py train --mode cut --dataroot ...   # multi-GPU

Contents
  Part I, the methods, in the order to learn them; it reads alone.
     1. Building blocks: blur resampling, instance norm, ResNet block, init
     2. The generator G and its feature taps
     3. The discriminator D, the adversarial loss and D's step
     4. PatchNCE: the projection head H and the contrastive loss
     5. CUT and FastCUT
     6. DCLGAN and SimDCL
     7. NEGCUT and FastNEGCUT
     8. PatchNCE's successors: Hneg-SRC and QS-Attn
     9. CycleGAN
    10. An extension: the perceptual loss
    11. The modes side by side: presets, networks, steps
  Part II, running them: the machinery, which a first reading can skip.
    12. Configuration        15. The training loop    18. Evaluation: FID, KID
    13. Unpaired data        16. Checkpoints          19. Bench, 20. torchrun
    14. Networks, optimisers 17. Translate, test      21. Command line

Reading paths: for each mode, the functions to read, in this order.
  CUT         Generator, Discriminator, gan_loss, discriminator_step, ProjectionHead,
              patch_nce_loss, nce_between, cut_forward, cut_generator_step, cut_step
  FastCUT     CUT's path; the flip in cut_forward and nce_between(flip_back=True)
  NEGCUT      CUT's path; NegativeGenerator, mean_embedding, patch_nce_loss (its
              `negatives`), diversity_loss, negative_step, negcut_step
  FastNEGCUT  NEGCUT's path, with FastCUT's flip
  DCLGAN      CUT's path up to nce_between; translate_both, dual_step
  SimDCL      DCLGAN's path; MappingHead, similarity_loss, dual_step's L_sim
  Hneg-SRC    CUT's path; hdce_gamma, hdce_loss (in nce_between), relation_loss,
              relation_term (in cut_generator_step); --mode hnegsrc
  QS-Attn     CUT's path; ProjectionHead(select="qsattn"), query_selected_rows;
              --patch_select qsattn with any PatchNCE mode
  CycleGAN    Generator (no_antialias), Discriminator, gan_loss, discriminator_step,
              ImagePool, cyclegan_step
  Every mode: MODES in §11 holds its preset, its networks and its step function.

Letters: n images per batch, S sampled patches per layer and image (--num_patches), E projection
width (--netF_nc), L tapped layers, K negatives per image that NEGCUT's N makes, C×h×w a feature
map's channels and size, τ the temperature (--nce_T). D is only ever the discriminator and N
only NEGCUT's negative generator. Domains are a (source, the paper's X) and b (target, Y); a
name ending in _a or _b says which domain a network or an image belongs to: G_ab maps a to b,
D_b judges b images.

Glossary (code name | paper symbol | official name or flag)
    G; G_ab, G_ba      | G; G: X→Y, F: Y→X         | netG; netG_A, netG_B
    G.encode, taps     | G_enc                     | netG(x, layers, encode_only=True)
    D; D_b, D_a        | D; D_Y, D_X               | netD; netD_A (judges B), netD_B
    H; H_a, H_b        | H_l; H_X, H_Y             | netF (PatchSampleF); netF1, netF2
    M_ra M_fb M_rb M_fa| SimDCL's light heads      | netF3 .. netF6 (MappingF)
    N, H_ema           | negative generator, H̄     | netN, netF_ (NEGCUT)
    pool_a, pool_b     | image history buffer      | fake_A_pool, fake_B_pool (--pool_size)
    real_a, fake_b     | x, G(x)                   | real_A, fake_B
    idt_b = G(real_b)  | identity image G(y)       | idt_B (CUT), idt_A (DCLGAN, CycleGAN)
    feat_q, feat_k     | G_enc(G(x)), G_enc(x)     | feat_q, feat_k (the tapped maps)
    queries, keys      | z; z⁺ and z⁻ (sampled)    | feat_q_pool, feat_k_pool (the loss
                       |                           |   functions' feat_q, feat_k, as official)
    patch_ids          | sampled locations         | sample_ids (patch_ids)
    lambda_NCE         | λ_X (= λ_Y), λ_NCE        | --lambda_NCE
    lambda_IDT         | λ_idt                     | --lambda_IDT (CycleGAN --lambda_identity)
    lambda_SIM         | λ_SIM                     | --lambda_SIM
    lambda_MS_neg      | λ_MS, N's diversity       | --lambda_MS_neg
    NCE, NCE_Y (log)   | ℓ_PatchNCE(G,H,X), (…,Y)  | loss_NCE, loss_NCE_Y
    NCE1, NCE2, Sim    | L_PatchNCE for G and F, L_sim | loss_NCE1, loss_NCE2, loss_Sim
    N (in the log)     | L_N = −NCE + L_div        | loss_N
    HDCE, HDCE_Y, SRC  | hDCE(x), hDCE_idt(y), L_SRC | loss_HDCE, loss_HDCE_Y, loss_SRC
    lambda_NCE (hdce)  | λ_HDCE                    | --lambda_HDCE (an alias here)
    HDCE_gamma         | γ of the hard-negative weights | --HDCE_gamma, --HDCE_gamma_min
    query_selected_rows| A_QS                      | attn_mats (QS-Attn's PatchSampleF)
    nce_T, num_patches, netF_nc, nce_layers | τ 0.07, S 256, E 256, l | the same flags
    torch.nn.functional is F, as everywhere in PyTorch; the notes below are F1..F24.

Faithfulness notes: every place where dcl.py differs from the official code, and the official
quirks it keeps on purpose, each with its reason.
  F1  Kept: PatchNCE fills the diagonal of the negative similarities (each query against its own
      positive) with −10 before dividing by τ, as the official code does (its README's
      pseudocode: −inf). At τ = 0.07 both give exp(−142.9) = 0.
  F2  Kept: the keys are detached (officially; the paper does not say so), and one random set of
      patch positions per layer is shared by every image of a batch.
  F3  Changed: patch ids, the flip coin, the B draw and the image pool use torch's RNG
      (official: numpy's, Python's): one --seed covers all; same laws, other draws.
  F4  Changed: PatchNCE groups patches by the batch size the tensor has; the official code reads
      --batch_size, wrong under multi-GPU and for a partial batch.
  F5  Changed: the heads are built at the start from the known channel counts (official: at the
      first forward pass, with a throwaway forward and backward); layer ids are a tuple (the
      official encoder can append to its caller's list).
  F6  Kept: in the CUT lineage, no random crop in the LR-decay epochs (images resized straight
      to the crop size; --crop_in_decay keeps crops); the LR never reaches 0 (last epoch:
      lr/(decay + 1)); CycleGAN's schedule is one epoch later than upstream's.
  F7  Changed: the step counters (print, display, save) count optimisation steps; the official
      ones count images. The same at batch 1.
  F8  Changed: translate writes one PNG per input at its own size and name, test every image
      (the official test: 50 at 256² by default, and it can overwrite its own outputs); --resize
      256, and test, follow the official test protocol.
  F9  Changed: D scores real and fake images in one call, G translates an input and its identity
      input in one call (exact: no layer mixes images), and PatchNCE's keys reuse that call's
      encoder activations (exact: the same weights and input); augmentation draws come from
      per-item seeds.
  F10 Changed: --max_dataset_size cuts the sorted file list (official: walk order); --crop_size
      must be a multiple of 4 (official: silently rounded); one file holds a run (official: a
      weights file per network, no optimiser state: lossy resume).
  F11 Kept (DCLGAN, SimDCL): the hinge G loss is mean(relu(1 − D(G(x)))), not the common
      −mean(D(G(x))); D's losses are not scaled by λ_GAN; every term is half of the paper's Eq.
      8; no image pool (paper: 50); lr 2e-4, 200 + 200 epochs (papers: DCLGAN lr 1e-4 for 400
      epochs, SimDCL 100 + 100); negatives from the whole batch.
  F12 Kept (DCLGAN): the heads' Adam at lr 1e-3 and betas (0.9, 0.999), Adam's defaults, where
      the paper says 2e-4; --lr_H and --beta1_H change them.
  F13 Changed (DCLGAN, SimDCL): λ_IDT > 0 switches the L1 identity term on (the official code
      tests λ_NCE > 0, and turning off its separate identity flag then crashes). Kept: dot
      products of z/(‖z‖ + 1e-7), not cosines. H's first outputs are tiny (‖z‖ ~ 1e-5), so at
      step 1 the losses agree with cosines' within 1% but the heads' gradients differ by 14-29%
      and G's by 4-11%; Adam's first step moves every bias of H by about ±lr, and from step 2 on
      every row has norm ≥ 0.99996, the gradients agree to 2e-4.
  F14 Kept (SimDCL): the official L1Loss('sum') computes a mean (the string lands in a legacy
      argument): L_sim averages its 64 dimensions; the declared λ_NCE 2 is never applied (our
      preset: 1, the weight in effect); nothing is detached; the fakes get fresh patch ids;
      identity weight 1. Changed: the mapping heads run at any batch size, S and E (official:
      batch 1, S = E = 256).
  F15 Changed (CycleGAN): the upstream CycleGAN repository's behaviour (stride-2 and transposed
      convolutions, N(0, 0.02) init, a pool of 50, G's step before D's). The CUT repository's
      copy does not run (it reads an option that does not exist); DCLGAN's passes the GPU ids as
      the antialiasing switch (CPU only).
  F16 NEGCUT. Kept: H_ema's own random init, not a copy of H; L_div on the negatives of the last
      branch computed (the identity branch when it runs); N makes --num_patches negatives per
      image, split in halves by L_div (an odd count, on which the official code crashes, is
      refused). Changed: N trains at --lr (--lr_N is never read); in N's step only N gets
      gradients (officially G and H_ema too, unused); EMA as H̄ + 0.1·(H − H̄); noise on the
      device.
  F17 Extensions, in no official code and off in every preset: --lambda_perc,
      --lambda_perc_content (VGG16 feature L1) and --nce_hard_beta.
  F18 Added (--fast, on by default on CUDA): bf16 autocast for the networks, with every output,
      L2 normalisation, logit and loss in fp32; channels_last; fused Adam. Only bf16 rounding
      changes; --fast off is official fp32 (TF32 convs aside).
  F19 Added: data parallelism under torchrun (gradients averaged by all-reduce; see
      average_gradients). Each process draws its own patch ids, noise and flips and sees its
      share of A; PatchNCE, pooled negatives and image pools stay per process. Effective batch:
      processes × --batch_size; LR unscaled.
  F20 Changed: every gradient is right at batch size 1. torch 2.13 and 2.14 on the CPU get
      instance norm's backward wrong at batch 1 for an incoming gradient with channels-last
      strides, which the official patch sampler (permute, then pick) sends into the tapped
      ResNet blocks: the official code at batch 1 on these builds learns from a wrong G gradient
      (one CUT step: 84% relative error, cosine 0.63; DCLGAN and SimDCL worse). Here the sampler
      picks before it transposes, and every instance norm makes its incoming gradient contiguous
      (NEGCUT's mean embedding, --fast too).
  F21 Hneg-SRC. Kept from the official code: the preset is its README's horse2zebra recipe, not
      its flag defaults (λ_HDCE 1, λ_SRC 1, γ 1, no identity term); the weights, softmax(z·z/γ)
      over the keys with the diagonal at −10 and divided by the row maximum, multiply the
      negative logits (the paper's von Mises-Fisher density exp(γ·z·z⁻) sharpens with γ, the
      code's weights smooth); the logged HDCE is the weighted cross-entropy, not the decoupled
      loss it differentiates; L_SRC sums all S×S entries, averaged over layers, on the main
      branch only. Changed: patch ids are drawn on the keys (official: on the queries; the same
      distribution); the weights per group of negatives and the relations per image (official:
      over the whole batch, which runs at batch 1 only); identical at batch 1. In DCLGAN and
      SimDCL (no hDCE or SRC officially) each direction gets its own, averaged as every term
      there is.
  F22 QS-Attn. Kept: the global variant, the one its README trains; attention on raw features
      without scaling; the deepest taps only (officially the 4th and 5th of 5, at 256² the
      smallest maps, our rule); the attention rows are not detached. Changed: entropy from
      log_softmax (official: log of the softmax, infinities set to 0; equal up to rounding). Not
      included: local variants.
  F23 Evaluation (not the methods' code: pytorch-fid's protocol). Its network and features
      exactly; tr (Σ1 Σ2)^½ from a symmetric eigendecomposition, not scipy's sqrtm (the same up
      to rounding); images of any size, in subfolders too (pytorch-fid: one folder, batches of
      equal sizes).
  F24 Changed: --input_nc and --output_nc are honoured (the official dataset makes every image
      RGB whatever they say): 1 channel reads grayscale, and every network is built for it.
Not included: display servers, HTML pages, dataset downloads, UNet/StyleGAN generators,
SinCUT, DataParallel, CUDA graphs, wandb.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import sys
import time
from collections import Counter
from functools import partial
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

# =============================================================================
# PART I. THE METHODS
# =============================================================================
# The networks, the losses and one training step per method. Each step takes
# the networks (a dict by name), their optimisers, a batch real_a, real_b
# (n×3×h×w in [−1, 1]) and the run's config `cfg` (Part II, §12: one field per
# command-line flag, named as the official flags are), and returns its losses.

# -----------------------------------------------------------------------------
# 1. Building blocks: blur resampling, instance norm, ResNet block, init
# -----------------------------------------------------------------------------
# The CUT lineage replaces strided convolutions with "blur, then subsample" (Zhang, "Making
# Convolutional Networks Shift-Invariant Again", ICML 2019, arXiv 1904.11486). A stride-2
# convolution keeps every second pixel of its output, so detail finer than two pixels folds back as
# coarse false patterns (aliasing: checkerboards, and outputs that change when the input shifts by
# one pixel). A fixed low-pass filter before the subsampling removes that detail first. Both
# filters are persistent buffers named `filt`, not parameters: they are never trained, but they sit
# in every official checkpoint, so keeping them is what lets those files load.

class Downsample(nn.Module):
    """Blur with [1,2,1]ᵀ⊗[1,2,1]/16, then keep every second pixel.
    n×C×h×w -> n×C×(⌊(h−1)/2⌋+1)×(⌊(w−1)/2⌋+1), exactly h/2 × w/2 for even sizes."""

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
    restores the brightness the zeros took away). n×C×h×w -> n×C×2h×2w."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = a[:, None] * a[None, :]
        self.register_buffer("filt", (4 * kernel / kernel.sum()).repeat(channels, 1, 1, 1))

    def forward(self, x):
        # Replicate-pad by 1 (official: ReplicationPad2d, whose backward torch.compile
        # mis-strides in torch 2.14, hence the concatenation), then a transposed conv
        # with padding 2 gives 2h + 2 rows; like the official code, drop the first
        # and the last row and column.
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], 2)
        x = torch.cat([x[..., :1], x, x[..., -1:]], 3)
        y = F.conv_transpose2d(x, self.filt, stride=2, padding=2, groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]


class InstanceNorm(nn.InstanceNorm2d):
    """Instance norm, as in every network here: each image and channel is normalised to mean 0 and
    variance 1 over its h×w positions, with no affine parameters and no running statistics. It
    removes each image's contrast and brightness per channel, which is style, not content (Ulyanov
    et al. 2016, arXiv 1607.08022), and it has no state at all. It normalises each image alone, so
    several images stacked in one batch give exactly the outputs they would give one by one; the
    steps rely on that to batch their passes (F9).

    Its backward pass gets a contiguous gradient, which costs nothing when it already is (F20:
    torch 2.13 and 2.14 compute instance norm's backward wrongly on the CPU at batch size 1 for a
    channels-last gradient; §4 says where such gradients come from)."""

    def __init__(self, channels: int):
        super().__init__(channels, affine=False, track_running_stats=False)

    def forward(self, x):
        y = F.instance_norm(x, eps=self.eps)
        if y.requires_grad:
            y.register_hook(torch.Tensor.contiguous)
        return y


def norm(channels: int) -> nn.Module:
    # The one place where the networks get their normalisation layer; a test
    # swaps it for the identity to measure receptive fields through the convolutions alone.
    return InstanceNorm(channels)


class ResnetBlock(nn.Module):
    """x + [pad, conv3×3, IN, ReLU, pad, conv3×3, IN](x); no activation after the sum.
    A residual block learns a change to its input rather than a new image, and a
    translation changes appearance more than layout, so most of G's depth sits
    in nine of these at a quarter of the input size."""

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
    untrained G outputs an almost uniform grey. Upstream CycleGAN: N(0, 0.02²). The instance norms
    rescale every normalised layer, so the small weights do not starve G's inner features; what
    stays small at first is what no norm follows: G's last conv (hence the grey), D's last conv
    (scores near 0) and the heads' outputs (F13). Every network of every mode is built this way."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init_type == "xavier":
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                nn.init.normal_(module.weight, 0.0, gain)
            nn.init.zeros_(module.bias)
    return net


def set_requires_grad(net: nn.Module, flag: bool) -> None:
    """Freeze (False) or unfreeze a network. A frozen D still passes gradients
    through to its input, which is how G learns from D without changing it."""
    for p in net.parameters():
        p.requires_grad_(flag)


def optimise(loss: torch.Tensor, *opts: torch.optim.Optimizer) -> None:
    """One update: clear the gradients of the optimisers' parameters, one backward
    pass of loss, one step of each optimiser. (No other backward pass runs between
    a step's start and this call, so clearing here equals clearing at the start.)"""
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()


def unit(z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """z/(‖z‖ + 1e-7) along dim, in fp32 even under bf16 autocast (--fast): the
    official code adds the eps rather than clamping the norm, and so do we.
    The contrastive losses compare directions, not lengths: on unit vectors a
    dot product is a cosine similarity, in [−1, 1], and the temperature τ alone
    sets how sharp the softmax over them is."""
    z = z.float()
    return z / (z.norm(dim=dim, keepdim=True) + 1e-7)


# -----------------------------------------------------------------------------
# 2. The generator G and its feature taps
# -----------------------------------------------------------------------------
# The ResNet generator of Johnson et al. (ECCV 2016, arXiv 1603.08155), as CycleGAN
# uses it, antialiased as in the CUT code: downsample twice, nine residual blocks,
# upsample twice. One nn.Sequential named `model`, whose indices are public: they
# name the layers PatchNCE taps and the keys of official checkpoints. At 256×256:
#   idx  module                               output
#    0   ReflectionPad2d(3)                   3×262×262   <- tap 0 (RGB + border)
#   1-3  conv7 3→64, IN, ReLU                 64×256×256
#   4-6  conv3 64→128 (stride 1), IN, ReLU    128×256×256 <- tap 4 (conv, before IN)
#    7   Downsample(128)                      128×128×128
#   8-10 conv3 128→256, IN, ReLU              256×128×128 <- tap 8 (conv, before IN)
#   11   Downsample(256)                      256×64×64
#  12-20 9 × ResnetBlock(256)                 256×64×64   <- taps 12, 16 (blocks 1, 5)
#   21   Upsample(256), 22-24 conv3 256→128, IN, ReLU     128×128×128
#   25   Upsample(128), 26-28 conv3 128→64, IN, ReLU      64×256×256
#  29-31 ReflectionPad2d(3), conv7 64→3, Tanh             3×256×256
# Through the convolutions alone, the taps see 1, 9, 15, 35 and 99 pixels of the input: from single
# pixels to object parts, which is why PatchNCE uses several layers. (Every instance norm also
# mixes in statistics of the whole image, so strictly each tap depends on all of it.)
# --no_antialias (stride-2 convs down) and --no_antialias_up (transposed convs up)
# give upstream CycleGAN's 28-entry G (keys model.{1,4,7,10..18,19,22,26}): the
# same parameter count, other indices, so the tap list then means other layers.
# in_nc and out_nc (official --input_nc, --output_nc; 3) are the channels of the
# images G reads and writes: 1 for a grayscale domain (thermal, sketches, scans).
#
# The taps. PatchNCE compares features of the input x with features of the output G(x), both from
# G's own encoder (its first layers): the paper's G_enc. The official code runs extra encoder
# passes for them, stopping after the last tapped layer (G.encode). The features of x are exactly
# the activations of the translation pass G(x) itself (the same weights, the same input), so
# G(x, taps) also returns them, and the steps use them as the keys instead of running G.encode(x)
# again: one encoder pass fewer per PatchNCE term, the same numbers (F9). Both go through the one
# loop in `run`.

class Generator(nn.Module):
    def __init__(self, ngf: int = 64, antialias: bool = True, antialias_up: bool = True,
                 n_blocks: int = 9, in_nc: int = 3, out_nc: int = 3):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_nc, ngf, 7), norm(ngf), nn.ReLU(True)]
        for c in (ngf, 2 * ngf):                              # 2 × (conv, IN, ReLU, blur-down)
            layers += ([nn.Conv2d(c, 2 * c, 3, padding=1), norm(2 * c), nn.ReLU(True),
                        Downsample(2 * c)] if antialias else
                       [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), norm(2 * c), nn.ReLU(True)])
        layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks)]
        for c in (4 * ngf, 2 * ngf):                          # 2 × (blur-up, conv, IN, ReLU)
            layers += ([Upsample(c), nn.Conv2d(c, c // 2, 3, padding=1)] if antialias_up else
                       [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1)])
            layers += [norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x, taps: tuple | None = None):
        """n×3×h×w in [−1, 1] (h, w multiples of 4) -> n×3×h×w, in fp32 under
        --fast too. With taps, also the activations after those layers."""
        y, feats = self.run(x, taps or (), encode_only=False)
        return y.float() if taps is None else (y.float(), feats)

    def encode(self, x, layer_ids: tuple) -> list:
        """G_enc: the activations after each listed layer (ascending). Stops
        after the last one, so the decoder never runs (official: encode_only)."""
        return self.run(x, layer_ids, encode_only=True)[1]

    def run(self, x, taps: tuple, encode_only: bool):
        """The one pass through `model` behind forward and encode: collect the
        output of every tapped layer, and with encode_only stop at the last."""
        feats = []
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index not in taps:
                continue
            if index == taps[-1] and encode_only:
                return None, feats + [x]
            after = self.model[index + 1] if index + 1 < len(self.model) else None
            # The last tap as encode leaves it: an in-place ReLU would overwrite it.
            feats.append(x.clone() if index == taps[-1] and getattr(after, "inplace", False) else x)
        if encode_only:
            raise ValueError(f"layer ids {taps} go beyond G's {len(self.model)} layers")
        return x, feats

    def tap_channels(self, layer_ids: tuple) -> list:
        """Channel count at each tapped layer, read off the layer list, so H can
        be built before any image is seen (F5)."""
        channels, out = self.model[1].in_channels, []
        for index, layer in enumerate(self.model):
            channels = getattr(layer, "out_channels", channels)
            if index in layer_ids:
                out.append(channels)
        if len(out) != len(layer_ids):
            raise UserError(f"--nce_layers {','.join(map(str, layer_ids))}: G has layers "
                            f"0..{len(self.model) - 1} only")
        return out


# -----------------------------------------------------------------------------
# 3. The discriminator D, the adversarial loss and D's step
# -----------------------------------------------------------------------------
# The 70×70 PatchGAN of pix2pix (Isola et al., arXiv 1611.07004): a small conv net whose output is
# a map of real/fake scores, one per overlapping patch, so it judges texture and local structure,
# not global layout. The CUT code replaces each stride-2 conv by conv-stride-1 + Downsample, which
# widens the receptive field to 84×84 but keeps the 30×30 output at 256×256 input. (--no_antialias:
# upstream's stride-2 convs, keys model.{0,2,5,8,11}.)
#   0-2  conv4 3→64, LReLU(0.2), Downsample                 64×128×128
#   3-6  conv4 64→128, IN, LReLU, Downsample                128×64×64
#   7-10 conv4 128→256, IN, LReLU, Downsample               256×32×32
#  11-13 conv4 256→512, IN, LReLU                           512×31×31
#   14   conv4 512→1 (no sigmoid: the GAN loss decides)     1×30×30

class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, antialias: bool = True, in_nc: int = 3):
        super().__init__()
        stride = 1 if antialias else 2

        def down(c):
            return [Downsample(c)] if antialias else []
        layers = [nn.Conv2d(in_nc, ndf, 4, stride, padding=1), nn.LeakyReLU(0.2, True), *down(ndf)]
        for c in (ndf, 2 * ndf):
            layers += [nn.Conv2d(c, 2 * c, 4, stride, padding=1), norm(2 * c),
                       nn.LeakyReLU(0.2, True), *down(2 * c)]
        layers += [nn.Conv2d(4 * ndf, 8 * ndf, 4, padding=1), norm(8 * ndf),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(8 * ndf, 1, 4, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):                                     # n×3×h×w -> n×1×h'×w' fp32 scores
        return self.model(x).float()


def gan_loss(prediction: torch.Tensor, target_is_real: bool, gan_mode: str) -> torch.Tensor:
    """Adversarial loss of a score map p (n×1×h×w); the mean runs over every patch.

    [LSGAN: Mao et al., arXiv 1611.04076; official CUT code, networks.py GANLoss]
        lsgan  real: mean((p − 1)²)     fake: mean(p²)
    [hinge: used by DCLGAN; official DCLGAN code, networks.py]
        hinge  real: mean(relu(1 − p))  fake: mean(relu(1 + p))
    Least squares instead of the original log loss: its gradient does not vanish for fakes that D
    already rejects with confidence, so G keeps learning. The generator asks for "real" on its
    fakes: L_G = lsgan_real(D(G(x))). Official quirk, kept (F11): DCLGAN's code uses hinge, and its
    generator loss is therefore mean(relu(1 − D(G(x)))), not the more common −mean(D(G(x)))."""
    if gan_mode == "lsgan":
        return ((prediction - 1) ** 2).mean() if target_is_real else (prediction ** 2).mean()
    if gan_mode == "hinge":
        return F.relu(1 - prediction).mean() if target_is_real else F.relu(1 + prediction).mean()
    raise ValueError(gan_mode)


def discriminator_step(opt, judged: list, cfg) -> list:
    """D's update, the same in every method: for each (D, real, fake) triple,
        L_D = 0.5·[gan(D(real), real) + gan(D(stopgrad(fake)), fake)]
    (LSGAN paper, Eq. 2; official CUT code, cut_model.py compute_D_loss). D learns to score real
    images 1 and fakes 0 (lsgan) while G stays fixed: the fakes are detached. The 0.5 slows D down
    relative to G; L_D is never multiplied by λ_GAN (official). Real and fake images go through D
    in one call, exact because no layer of D mixes images (F9). One Adam step covers every D of the
    list. Returns the (real, fake) terms of each triple."""
    for D, _, _ in judged:
        set_requires_grad(D, True)
    terms = []
    for D, real, fake in judged:
        scores = D(torch.cat([fake.detach(), real]))           # 2n×1×h'×w'
        terms.append((gan_loss(scores[len(fake):], True, cfg.gan_mode),
                      gan_loss(scores[:len(fake)], False, cfg.gan_mode)))
    optimise(sum(0.5 * (real + fake) for real, fake in terms), opt)
    for D, _, _ in judged:                                    # frozen again: G's step sends its
        set_requires_grad(D, False)                           # gradients through D, not into it
    return terms


# -----------------------------------------------------------------------------
# 4. PatchNCE: the projection head H and the contrastive loss
# -----------------------------------------------------------------------------
# CUT's idea (CUT paper §3): an output patch should be more like the input patch at its own
# location than like any other input patch. If G keeps each location's content, a patch of G(x) can
# point out where it came from; if G moved or erased content, it cannot. This replaces CycleGAN's
# second generator and its cycle loss: one generator, one direction, no assumption that the mapping
# is invertible. The comparison happens in feature space, on G's own encoder features at several
# depths (the taps of §2), each sent through a small head H to a unit vector.
#   keys      k = H(G_enc(x)): S sampled locations of the input's features
#   queries   q = H(G_enc(G(x))): the same S locations of the output's features
#   loss      for each query, pick its own key (the positive) out of all S keys
# The rest of this section: H (which samples and projects), the loss for one
# layer (patch_nce_loss), and the loss between two images (nce_between).

class ProjectionHead(nn.Module):
    """H (official PatchSampleF): for each tapped layer l, pick S positions of the map and send
    each position's C_l-vector through a two-layer MLP to a unit E-vector. As in SimCLR (Chen et
    al. 2020, arXiv 2002.05709), the loss acts on H's output, not on the features themselves, so
    the encoder may keep information the loss has no use for; H is trained with G. Keys mlp_0,
    mlp_1, ... (official): Linear(C_l → E), ReLU, Linear(E → E)."""

    def __init__(self, in_channels: list, width: int = 256):
        super().__init__()
        for index, c in enumerate(in_channels):
            setattr(self, f"mlp_{index}", nn.Sequential(nn.Linear(c, width), nn.ReLU(),
                                                        nn.Linear(width, width)))
        self.n_layers = len(in_channels)

    def forward(self, feats: list, num_patches: int, patch_ids: list | None = None,
                select: str = "random"):
        """feats: L maps n×C_l×h_l×w_l. Returns L tensors (n·S_l)×E, image-major,
        with S_l = min(S, h_l·w_l), and the L position-id sets used.

        Without patch_ids, draws one random set of positions per layer, shared by every image of
        the batch (official, F2). PatchNCE samples the keys first and passes their ids for the
        queries, so row i of both is one location. select="qsattn" (§8, QS-Attn): on the deepest
        taps (the smallest maps) each sample is instead an attention-weighted sum of positions, and
        the "ids" of that layer are the n×S×(h·w) attention rows."""
        out, ids_out = [], []
        smallest = min(f.shape[2] * f.shape[3] for f in feats)
        for index, feat in enumerate(feats):
            flat = feat.flatten(2)                            # n×C×(h·w), row-major positions
            if patch_ids is not None:
                ids = patch_ids[index]
            elif select == "qsattn" and flat.shape[2] == smallest:
                ids = query_selected_rows(flat, num_patches)  # n×S×(h·w), §8
            else:                                             # drawn on the device: no host copy
                ids = torch.randperm(flat.shape[2], device=feat.device)[:num_patches]
            # Pick first, transpose after: the backward of this indexing (or of the product with
            # the attention rows) writes a contiguous gradient; the official permute-first order
            # sends a channels-last one into the taps' instance norms (F20).
            if ids.is_floating_point():                       # v = A_QS·F, n×C×S first
                picked = torch.bmm(flat, ids.to(flat.dtype).transpose(1, 2))
            else:
                picked = flat[:, :, ids]
            picked = picked.transpose(1, 2).flatten(0, 1)     # (n·S_l)×C
            out.append(unit(getattr(self, f"mlp_{index}")(picked)))  # (n·S_l)×E
            ids_out.append(ids)
        return out, ids_out


def patch_nce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, groups: int,
                   tau: float = 0.07, hard_beta: float = 0.0,
                   negatives: torch.Tensor | None = None) -> torch.Tensor:
    """PatchNCE for one layer: each output patch must pick out the input patch
    at its own location among the other patches of the same input image.

    [CUT paper §3.1, Eq. 2-3 (ℓ and ℓ_PatchNCE); official CUT code, models/patchnce.py]
        for row i (a query q_i, its positive key k_i, the keys k_j of the other
        S−1 sampled locations of the same image as negatives):
        ℓ_i = −log( exp(q_i·k_i/τ) / ( exp(q_i·k_i/τ) + exp(−10/τ) + Σ_(j≠i) exp(q_i·k_j/τ) ) )
    i.e. a cross-entropy over S + 1 candidates whose right answer is the positive. Shapes: feat_q,
    feat_k (n·S)×E unit vectors, image-major -> ℓ of shape (n·S). The caller takes the mean over
    patches, then over layers (the paper writes sums; every λ in the code refers to the means).

    Why detached keys (official code; the paper is silent, F2): the input's encoding is the fixed
    target, the gradient enters only through the queries, i.e. through G(x). Why −10 on the
    diagonal (F1): that entry repeats the positive; −10/τ leaves exp(−142.9) = 0 in fp32 (the
    official README's pseudocode uses −inf). Why τ = 0.07: a small temperature sharpens the
    softmax, so the loss concentrates on the negatives that resemble the positive. Why negatives
    from the same image: they share the image's style, so only content tells the positive apart,
    and content is what must be kept.

    groups: the number of groups whose patches serve as each other's negatives.
    n (one per image) is CUT's loss; 1 pools the whole batch, so the negatives
    of every query are the patches of all images (DCLGAN's loss, official
    DCLGAN code, models/patchnce.py; equal to CUT's at n = 1). Deviation:
    DCLGAN computes cosine similarities; we take dot products of the
    eps-normalised vectors, equal from the second step on (F13).

    hard_beta = β > 0 (an extension, F17, to skip on a first reading;
    --nce_hard_beta; Robinson et al., "Contrastive
    Learning with Hard Negative Samples", ICLR 2021, arXiv 2010.04592, without
    their debiasing term): negatives that already look like the positive are
    the informative ones, so each is importance-weighted, with s_j = q_i·k_j:
        w_j = exp(β·s_j) / ((1/M)·Σ_m exp(β·s_m))     (detached; mean_j w_j = 1)
        ℓ_i = −log( exp(s⁺/τ) / ( exp(s⁺/τ) + Σ_j w_j·exp(s_j/τ) ) )
    i.e. log w_j is added to negative j's logit, over the M real negatives (the
    masked diagonal keeps its unweighted exp(−10/τ)). β = 0 is the official loss
    bit for bit (the branch is skipped); β → ∞ puts all the weight M on the
    hardest negative: ℓ → −log(e^(s⁺/τ) / (e^(s⁺/τ) + M·e^(s_max/τ))) (M = S − 1,
    or n·S − 1 with whole-batch negatives).

    negatives ((n·K)×E, NEGCUT, §7): each image's queries are compared with its
    own K generated negatives instead of the other keys, so l_neg = q·Nᵀ per
    image, n×S×K, with no diagonal to mask [official NEGCUT code, models/losses.py,
    LearnedPatchNCELoss]. They are not detached: in G's step their gradient
    reaches G's encoder through N and H_ema. (hard_beta does not apply to them:
    N already makes them as hard as it can.)"""
    dtype = torch.promote_types(feat_q.dtype, torch.float32)  # logits in fp32 at least: 1/τ ≈ 14
    feat_k, feat_q = feat_k.detach().to(dtype), feat_q.to(dtype)  # amplifies rounding errors
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)        # (n·S)×1
    q = feat_q.view(groups, -1, feat_q.shape[1])              # groups×P×E, P = n·S/groups
    k = feat_k if negatives is None else negatives.to(dtype)  # the group's keys, or NEGCUT's
    l_neg = torch.bmm(q, k.view(groups, -1, k.shape[1]).transpose(1, 2))  # groups×P×P or n×S×K
    if negatives is None:                                     # each query's own key: masked
        diagonal = torch.eye(q.shape[1], dtype=torch.bool, device=q.device)[None]
        l_neg = l_neg.masked_fill(diagonal, -10.0)
    l_neg = l_neg.flatten(0, 1)                               # (n·S)×P or (n·S)×K
    logits = torch.cat([l_pos, l_neg], dim=1) / tau           # class 0 is the positive
    if hard_beta and negatives is None:
        # The weights enter as log w_j added to negative j's logit, over the M
        # real negatives of each row: log w_j = β·s_j − log Σ_m exp(β·s_m) + log M.
        real = ~diagonal.expand(q.shape[0], -1, -1).flatten(0, 1)  # (n·S)×P, not the diagonal
        scores = (hard_beta * l_neg.detach()).masked_fill(~real, -math.inf)
        n_real = real.sum(1, keepdim=True)                    # M in each row
        log_w = scores - torch.logsumexp(scores, 1, keepdim=True) + n_real.log()
        log_w = log_w.masked_fill(~real, 0.0)                 # the masked diagonal: unweighted
        logits = logits + F.pad(log_w, (1, 0))                # the positive's column: unweighted
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


class PatchNCE(NamedTuple):
    """What nce_between computed: the loss and the pieces the other methods reuse."""
    loss: torch.Tensor              # λ_NCE · mean over layers of the mean over patches
    keys: list                      # L × (n·S_l)×E: H's samples of the source, not detached
    queries: list                   # L × (n·S_l)×E: H_query's samples of the output
    feat_q: list                    # L maps n×C_l×h_l×w_l: the output's features (flipped back)
    negatives: list | None          # NEGCUT: L × (n·K)×E generated negatives, else None


def nce_between(source, output, G, H, cfg, *, G_query=None, H_query=None, feat_k=None,
                flip_back: bool = False, make_negatives: Callable | None = None,
                negatives_only: bool = False, epoch: int = 1) -> PatchNCE:
    """ℓ_PatchNCE(source -> output): PatchNCE averaged over patches and layers, × λ_NCE.
        NCE = (1/L)·Σ_l λ_NCE·mean_i ℓ_(l,i)          [CUT paper §3.2, Eq. 3, as a mean]
    source, output: n×3×h×w. The textbook computation is the lines marked
    k = and q = below, then the loss; the keyword-only switches serve the other methods:
      G_query, H_query: embed the output with other nets (DCLGAN embeds each
        image with the encoder and head of its own domain, §6); default G, H.
      feat_k: the source's tapped activations, if the step has them from its
        translation pass (§2: the same values as G.encode(source), F9).
      flip_back (FastCUT, §5): the output was made from a flipped input;
        flipping its feature maps back lines them up with the unflipped source's, so the loss asks
        for G(flip(x)) = flip(G(x)). (After a stride-2 blur the flipped grid is offset by one
        pixel; so is the official code's.)
      make_negatives (NEGCUT, §7): a function of the source's feature maps that
        returns L × (n·K)×E negatives, which replace the in-image ones.
      negatives_only (NEGCUT's N step): only the negatives carry gradient.
      epoch: the 1-based epoch, for hDCE's schedule of γ (§8).
    Two settings change the loss itself (§8): --nce_loss hdce, Hneg-SRC's
    decoupled loss with hard-negative weights, in place of patch_nce_loss, and
    --patch_select qsattn, QS-Attn's choice of the keys on the deepest taps."""
    layers, S = cfg.layer_ids, cfg.num_patches
    with torch.set_grad_enabled(torch.is_grad_enabled() and not negatives_only):
        feat_k = G.encode(source, layers) if feat_k is None else feat_k  # k = H(G_enc(x))
        keys, patch_ids = H(feat_k, S, select=cfg.patch_select)
        feat_q = (G_query or G).encode(output, layers)                   # q = H(G_enc(G(x)))
        feat_q = [f.flip(3) for f in feat_q] if flip_back else feat_q
        queries, _ = (H_query or H)(feat_q, S, patch_ids)                # the keys' locations
    negs = (make_negatives([f.detach() for f in feat_k] if negatives_only else feat_k)
            if make_negatives is not None else None)          # L × (n·K)×E
    groups = 1 if cfg.nce_includes_all_negatives_from_minibatch else source.shape[0]  # F4
    with torch.autocast(source.device.type, enabled=False):  # logits in fp32 under --fast
        if cfg.nce_loss == "hdce":                            # γ: the epoch's, §8
            layer_losses = [hdce_loss(q, k, groups, cfg.nce_T, hdce_gamma(cfg, epoch)).mean()
                            for q, k in zip(queries, keys)]
        else:
            layer_losses = [patch_nce_loss(q, k, groups, cfg.nce_T, cfg.nce_hard_beta, n).mean()
                            for q, k, n in zip(queries, keys, negs or [None] * len(keys))]
    return PatchNCE(cfg.lambda_NCE * torch.stack(layer_losses).mean(), keys, queries, feat_q, negs)


# -----------------------------------------------------------------------------
# 5. CUT and FastCUT
# -----------------------------------------------------------------------------
# CUT trains one generator G: A→B, the PatchGAN D on B images and the head H.
#   L_CUT = λ_GAN·L_GAN(G, D, X, Y) + λ_X·ℓ_PatchNCE(G, H, X) + λ_Y·ℓ_PatchNCE(G, H, Y)
#                                                              [CUT paper §3.3, Eq. 5]
# The adversarial term makes G(x) look like a B image. The first PatchNCE term ties each patch of
# G(x) to the patch of x at its place, so the content stays. The second, on y → G(y) for B images
# y, keeps G from changing what needs no change: the paper calls it a learned, domain-specific form
# of the identity loss of earlier methods (CUT paper §3.2). λ_X = λ_Y = 1 in CUT. FastCUT (the
# paper's lighter variant) drops the second term, which halves the generator work, raises λ_X to
# 10, and adds flip-equivariance: on half the steps the input is flipped left-right, and the NCE
# then asks that G(flip(x)) = flip(G(x)), a cheap constraint in place of the identity term. The
# official code averages the two NCE terms (×0.5 each) where the paper adds them; the presets' λ
# refer to the code.
#
# One iteration, in order: the forward pass (cut_forward), D's step, then G's
# and H's step (cut_generator_step). NEGCUT (§7) runs the same three pieces
# with a step of its own in between. The forward pass is done once and shared:
# D's step sees fake_b detached, G's step backpropagates through it. Two savings, both exact (F9):
# real_a and real_b go through G as one batch, and the keys are that pass's activations at the taps
# (§2). Hneg-SRC (§8) runs this same step: --nce_loss hdce changes the loss inside nce_between, and
# --lambda_SRC adds the relation term on the patches that the main branch (real_a -> fake_b)
# sampled, as its official code does.

class CutForward(NamedTuple):
    """The forward pass of one CUT-lineage step."""
    x: torch.Tensor          # G's input, n (or 2n, with the identity input) × 3×h×w, maybe flipped
    fake_b: torch.Tensor     # G(real_a), or G(flip(real_a)) on a flipped step
    idt_b: torch.Tensor      # G(real_b), flipped like x; 0 images without the identity term
    keys_a: list | None      # G's maps at the taps for real_a (§2); None on a flipped step
    keys_b: list | None      # the same for real_b
    flipped: bool            # FastCUT's coin came up


def cut_forward(G, real_a, real_b, cfg) -> CutForward:
    """y = G(x) for x = [real_a; real_b] when the identity term is on (one pass for both: exact,
    instance norm works per image, F9), else for real_a. Its tapped activations are the keys of the
    NCE terms. FastCUT flips x at random (one coin per step); a flipped pass cannot give the
    unflipped keys, so then nce_between encodes the sources itself."""
    n = real_a.shape[0]
    x = torch.cat([real_a, real_b]) if cfg.nce_idt and cfg.lambda_NCE > 0 else real_a
    flipped = cfg.flip_equivariance and float(torch.rand(())) < 0.5
    x = x.flip(3) if flipped else x
    out, taps = (G(x), None) if flipped else G(x, cfg.layer_ids)
    keys_a, keys_b = ([t[:n] for t in taps], [t[n:] for t in taps]) if taps else (None, None)
    return CutForward(x, out[:n], out[n:], keys_a, keys_b, flipped)


def cut_nce(nets, forward: CutForward, real_a, real_b, cfg, **switches) -> tuple:
    """The two PatchNCE terms of CUT's objective, each with nce_between (§4):
        NCE   = λ_X·ℓ_PatchNCE(G, H, X)   on real_a -> fake_b
        NCE_Y = λ_Y·ℓ_PatchNCE(G, H, Y)   on real_b -> idt_b   (identity term only)
    Returns (NCE, NCE_Y or None) as PatchNCE results; switches go to nce_between."""
    if cfg.lambda_NCE == 0:
        return None, None
    G, H, switches = nets["G"], nets["H"], dict(flip_back=forward.flipped, **switches)
    nce_main = nce_between(real_a, forward.fake_b, G, H, cfg, feat_k=forward.keys_a, **switches)
    if forward.idt_b.shape[0] == 0:
        return nce_main, None
    nce_idt = nce_between(real_b, forward.idt_b, G, H, cfg, feat_k=forward.keys_b, **switches)
    return nce_main, nce_idt


def combined_nce(nce_main, nce_idt, zero) -> torch.Tensor:
    """0.5·(NCE + NCE_Y) with the identity term, NCE alone without it (official).
    The average keeps the NCE's share of L_G the same with or without the
    identity term: λ_NCE is the total NCE weight with or without it."""
    if nce_main is None:
        return zero
    return nce_main.loss if nce_idt is None else 0.5 * (nce_main.loss + nce_idt.loss)


def reported(losses: dict) -> dict:
    """A step's losses, detached (no graph kept), without the terms that are off (None)."""
    return {k: v.detach() for k, v in losses.items() if v is not None}


def cut_generator_step(nets, opts, forward: CutForward, real_a, real_b, cfg,
                       make_negatives: Callable | None = None, epoch: int = 1) -> dict:
    """G's and H's step, D frozen (gradients pass through it to G):
        L_G = λ_GAN·lsgan(D(fake_b), real) + 0.5·(NCE + NCE_Y)     (identity term on)
        L_G = λ_GAN·lsgan(D(fake_b), real) + NCE                   (FastCUT)
    plus Hneg-SRC's relation term (§8) and the perceptual terms (§10) when switched on. One
    backward, then one Adam step each for G and H. make_negatives: NEGCUT's, passed to nce_between.
    Logged as NCE and NCE_Y, or as Hneg-SRC's HDCE and HDCE_Y under --nce_loss hdce."""
    zero = real_a.new_zeros(())
    # λ_GAN·L_GAN(G, D, X, Y): G wants D to call its fakes real.
    loss_G_GAN = cfg.lambda_GAN * gan_loss(nets["D"](forward.fake_b), True, cfg.gan_mode) \
        if cfg.lambda_GAN > 0 else zero
    # λ_X·ℓ_PatchNCE(G, H, X) and λ_Y·ℓ_PatchNCE(G, H, Y): content kept, B images left alone.
    nce_main, nce_idt = cut_nce(nets, forward, real_a, real_b, cfg, make_negatives=make_negatives,
                                epoch=epoch)
    loss_G = loss_G_GAN + combined_nce(nce_main, nce_idt, zero)
    n = real_a.shape[0]
    # λ_SRC·L_SRC (Hneg-SRC, §8): the patches of fake_b keep real_a's relations.
    loss_src = relation_term(nce_main, n, cfg) if cfg.lambda_SRC > 0 else None
    identity_pairs = [(forward.idt_b, forward.x[n:])] if nce_idt is not None else []
    loss_perc = perceptual_terms(nets, cfg, [identity_pairs], [(forward.fake_b, forward.x[:n])])
    loss_G = sum((t for t in (loss_src, loss_perc) if t is not None), loss_G)  # x: as G saw it
    optimise(loss_G, opts["G"], opts["H"])
    name = "HDCE" if cfg.nce_loss == "hdce" else "NCE"
    return {"G_GAN": loss_G_GAN, name: zero if nce_main is None else nce_main.loss, "G": loss_G,
            name + "_Y": nce_idt.loss if nce_idt else None, "SRC": loss_src, "perc": loss_perc}


def cut_step(nets: dict, opts: dict, real_a, real_b, cfg, epoch: int = 1) -> dict:
    """One CUT or FastCUT iteration [official CUT code, models/cut_model.py].

    Plan:
      1. Forward: y = G(x) for x = [real_a; real_b] (FastCUT: x = real_a,
         flipped at random); its encoder activations are the keys of step 3.
      2. D step:  L_D = 0.5·[lsgan(D(stopgrad(fake_b)), fake) + lsgan(D(real_b), real)].
      3. G+H step, D frozen:
         L_G = λ_GAN·lsgan(D(fake_b), real) + 0.5·[NCE(real_a→fake_b) + NCE(real_b→idt_b)]
         (FastCUT: + NCE(real_a→fake_b) alone).
    Hneg-SRC (§8) is this step with --nce_loss hdce and --lambda_SRC.
    Shapes: real_a, real_b n×3×h×w. Returns the losses under the official log
    names, detached and on the device (no host sync). epoch: 1-based (§8's γ)."""
    forward = cut_forward(nets["G"], real_a, real_b, cfg)                  # 1.
    [(loss_D_real, loss_D_fake)] = discriminator_step(                     # 2.
        opts["D"], [(nets["D"], real_b, forward.fake_b)], cfg)
    losses = cut_generator_step(nets, opts, forward, real_a, real_b, cfg, epoch=epoch)  # 3.
    return reported(dict(D_real=loss_D_real, D_fake=loss_D_fake, **losses))


# -----------------------------------------------------------------------------
# 6. DCLGAN and SimDCL
# -----------------------------------------------------------------------------
# DCLGAN (DCLGAN paper §3) brings back CycleGAN's two directions, but with no
# cycle: two generators G_ab and G_ba, two discriminators, two heads, and PatchNCE
# in both directions. Its argument: one encoder cannot serve two domains whose
# images look very different, so each domain gets its own encoder and head.
#   L_DCLGAN = λ_GAN·(L_GAN(G, D_Y) + L_GAN(F, D_X)) + λ_NCE·L_PatchNCE(G, H_X, H_Y)
#            + λ_NCE·L_PatchNCE(F, H_X, H_Y) + λ_idt·L_identity(G, F)   [Eq. 8]
# with G = G_ab, F = G_ba, H_X = H_a, H_Y = H_b. The pairing rule (the paper's "dual" setting): an
# image is embedded by the encoder and head of its own domain, whichever generator made it. So NCE1
# (A→B) takes the keys H_a(G_ab.encode(real_a)) and the queries H_b(G_ba.encode(fake_b)); NCE2
# mirrors it. The keys are detached, so in DCLGAN H_a learns only from NCE2's queries and H_b from
# NCE1's (SimDCL's L_sim also reaches them through the keys, which it does not detach, F14). The
# negatives come from the whole batch (F11; the same as CUT's at batch 1), and the adversarial loss
# is the hinge loss.
#
# SimDCL adds a similarity loss: a real and a generated image of the same domain
# should have similar embeddings, which discourages collapse to a few outputs.
# Each image's sampled patches (L layers × S patches × E) are read by a small
# "mapping head" as an L-channel S×E picture and summarised in one unit 64-vector.
#
# The successors of §8 apply here too, as switches no official code has:
# --nce_loss hdce for both NCE terms, --lambda_SRC for the relations of both
# directions (averaged, as every term of this objective is), --patch_select qsattn.

class MappingHead(nn.Module):
    """SimDCL's light head (official MappingF, 10,688 parameters): it reads the L sampled and
    projected patch sets of one image as an L-channel S×E "image" and summarises them in one unit
    64-vector, an embedding of the whole image that the similarity loss compares across domains.
    n×L×S×E -> n×64. Keys model.0 (conv), model.4, model.6 (linears)."""

    def __init__(self, n_layers: int = 4, width: int = 64):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(n_layers, width, 3, stride=2), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, stack):
        return unit(self.model(stack))


def similarity_loss(keys_a, queries_a, keys_b, queries_b, heads: dict, n: int) -> torch.Tensor:
    """SimDCL's similarity loss [DCLGAN paper §3.3, Eq. 6; official DCLGAN code,
    models/simdcl_model.py]: the embeddings of a real and a generated image of
    the same domain should agree, which discourages mode collapse.
        L_sim = mean|M_ra(k_a) − M_fa(q_a)| + mean|M_fb(q_b) − M_rb(k_b)|
    k_a: the sampled, projected patches of real_a (H_a), q_a: of fake_a (H_a, fresh patch ids);
    likewise for B. Each argument is L × (n·S)×E, stacked per image to n×L×S×E; each head gives
    n×64 and the mean runs over n×64. Deviations kept (F14): the official L1Loss('sum') is a mean,
    and nothing is detached. Generalised: the official code stacks into 1×4×256×256 CPU tensors, so
    it runs only at batch 1 with S = E = 256; at n = 1 this is identical."""
    def stack(feats):
        if len({f.shape[0] for f in feats}) > 1:
            raise UserError("SimDCL needs num_patches positions in every tapped layer: "
                            "lower --num_patches or raise --crop_size")
        return torch.stack([f.view(n, -1, f.shape[1]) for f in feats], dim=1)  # n×L×S×E
    return (F.l1_loss(heads["M_ra"](stack(keys_a)), heads["M_fa"](stack(queries_a)))
            + F.l1_loss(heads["M_fb"](stack(queries_b)), heads["M_rb"](stack(keys_b))))


class Translations(NamedTuple):
    """Both generators' outputs for one batch, and the NCE keys (§2)."""
    fake_b: torch.Tensor     # G_ab(real_a)
    fake_a: torch.Tensor     # G_ba(real_b)
    idt_b: torch.Tensor      # G_ab(real_b), official idt_A: 0 images without identity
    idt_a: torch.Tensor      # G_ba(real_a), official idt_B
    keys_a: list             # G_ab's tapped activations of real_a
    keys_b: list             # G_ba's tapped activations of real_b


def translate_both(nets: dict, real_a, real_b, with_identity: bool,
                   taps: tuple = ()) -> Translations:
    """fake_b, fake_a and, with identity, idt_b = G_ab(real_b), idt_a = G_ba(real_a),
    in one pass per generator (exact: instance norm is per image); and the
    tapped activations of real_a in G_ab and of real_b in G_ba (the NCE keys)."""
    n = real_a.shape[0]
    out_b, taps_ab = nets["G_ab"](torch.cat([real_a, real_b]) if with_identity else real_a, taps)
    out_a, taps_ba = nets["G_ba"](torch.cat([real_b, real_a]) if with_identity else real_b, taps)
    return Translations(out_b[:n], out_a[:n], out_b[n:], out_a[n:],
                        [t[:n] for t in taps_ab], [t[:n] for t in taps_ba])


def dual_step(nets: dict, opts: dict, real_a, real_b, cfg, epoch: int = 1) -> dict:
    """One DCLGAN or SimDCL iteration [DCLGAN paper §3, Eq. 8; official DCLGAN
    code, models/dcl_model.py and models/simdcl_model.py].

    Plan:
      1. Forward: fake_b, fake_a, and the identity images idt_b = G_ab(real_b),
         idt_a = G_ba(real_a) when λ_IDT > 0.
      2. D step, both discriminators, hinge: D_b on (real_b, fake_b), D_a on (real_a, fake_a).
      3. G+H step, D frozen:
         L_G = 0.5·λ_GAN·(hinge(D_b(fake_b)) + hinge(D_a(fake_a)))
             + 0.5·(NCE1 + NCE2)                      (λ_NCE inside each)
             + 0.5·λ_IDT·(mean|idt_b − real_b| + mean|idt_a − real_a|)
             + λ_SIM·L_sim                              (SimDCL only)
         For DCLGAN this is half of the paper's Eq. 8 with λ_NCE = 2 (F11); for
         SimDCL the NCE weight in effect is λ_NCE = 1 and L_sim is not halved
         (F14): the official code's factors, so the logged values match official
         logs. λ_IDT is an absolute weight here (in CycleGAN, a factor of λ_A, λ_B).
    Returns the losses under the official log names, in which A names the
    generator: D_A is the loss of our D_b (it judges G_ab's fakes), idt_A that of idt_b."""
    use_idt = cfg.lambda_IDT > 0
    out = translate_both(nets, real_a, real_b, use_idt, cfg.layer_ids)       # 1.
    G_ab, G_ba, H_a, H_b, D_a, D_b = (nets[k] for k in ("G_ab", "G_ba", "H_a", "H_b", "D_a", "D_b"))
    loss_D_b, loss_D_a = (0.5 * (real + fake) for real, fake in discriminator_step(     # 2.
        opts["D"], [(D_b, real_b, out.fake_b), (D_a, real_a, out.fake_a)], cfg))

    zero = real_a.new_zeros(())                                               # 3.
    # λ_GAN·L_GAN(G, D_Y) and λ_GAN·L_GAN(F, D_X): each fake should pass its domain's D.
    loss_gan_ab = cfg.lambda_GAN * gan_loss(D_b(out.fake_b), True, cfg.gan_mode)
    loss_gan_ba = cfg.lambda_GAN * gan_loss(D_a(out.fake_a), True, cfg.gan_mode)
    # λ_NCE·L_PatchNCE in both directions, each image embedded by its own domain's nets:
    #   NCE1: keys H_a(G_ab.encode(real_a)), queries H_b(G_ba.encode(fake_b)); NCE2 mirrored.
    nce_ab = nce_between(real_a, out.fake_b, G_ab, H_a, cfg, G_query=G_ba, H_query=H_b,
                         feat_k=out.keys_a, epoch=epoch)
    nce_ba = nce_between(real_b, out.fake_a, G_ba, H_b, cfg, G_query=G_ab, H_query=H_a,
                         feat_k=out.keys_b, epoch=epoch)
    # λ_SIM·L_sim (SimDCL): real and fake images of a domain should embed alike.
    # The fakes' patches are sampled again with fresh random ids (official, F14).
    loss_sim = zero
    if cfg.lambda_SIM > 0:
        queries_b, _ = H_b(nce_ab.feat_q, cfg.num_patches)
        queries_a, _ = H_a(nce_ba.feat_q, cfg.num_patches)
        loss_sim = cfg.lambda_SIM * similarity_loss(nce_ab.keys, queries_a, nce_ba.keys,
                                                    queries_b, nets, real_a.shape[0])
    # λ_idt·L_identity: a generator fed an image of its output domain should leave it alone.
    loss_idt_b = cfg.lambda_IDT * F.l1_loss(out.idt_b, real_b) if use_idt else zero
    loss_idt_a = cfg.lambda_IDT * F.l1_loss(out.idt_a, real_a) if use_idt else zero
    loss_G = (0.5 * (loss_gan_ab + loss_gan_ba) + 0.5 * (nce_ab.loss + nce_ba.loss)
              + 0.5 * (loss_idt_b + loss_idt_a) + loss_sim)
    # λ_SRC·L_SRC (Hneg-SRC, §8), a switch here: each direction's relations, averaged.
    n = real_a.shape[0]
    loss_src = (0.5 * (relation_term(nce_ab, n, cfg) + relation_term(nce_ba, n, cfg))
                if cfg.lambda_SRC > 0 else None)
    identity_pairs = [(out.idt_b, real_b), (out.idt_a, real_a)] if use_idt else []
    loss_perc = perceptual_terms(nets, cfg, [identity_pairs],
                                 [(out.fake_b, real_a), (out.fake_a, real_b)])
    loss_G = sum((t for t in (loss_src, loss_perc) if t is not None), loss_G)
    optimise(loss_G, opts["G"], opts["H"])
    return reported(dict(D_A=loss_D_b, G_A=loss_gan_ab, NCE1=nce_ab.loss, idt_A=loss_idt_b,
                         D_B=loss_D_a, G_B=loss_gan_ba, NCE2=nce_ba.loss, idt_B=loss_idt_a,
                         G=loss_G, Sim=loss_sim if cfg.lambda_SIM > 0 else None, SRC=loss_src,
                         perc=loss_perc))


# -----------------------------------------------------------------------------
# 7. NEGCUT and FastNEGCUT
# -----------------------------------------------------------------------------
# NEGCUT (NEGCUT paper §3) keeps CUT's networks and objective but changes where
# the negatives come from. CUT's negatives are the other patches of the same
# image, and most of them are easy: a sky patch is not confused with a tree.
# NEGCUT learns a negative generator N that makes hard ones, specific to each
# image, and plays a min-max game over them:
#     min over G, H   max over N   ℓ_PatchNCE(G, H, N) − L_div(N)
# N ascends: it makes negatives that the queries confuse with their positives.
# G and H descend the same loss: G learns to tell its patches from N's hardest
# negatives. L_div stops N from collapsing onto one hard negative.
# The pieces, in the order a step uses them:
#   mean_embedding  each image summarised per layer by a momentum head H_ema,
#                   a moving average of H (an EMA at rate 0.1, like MoCo's), so that
#                   N sees a stable description of the image;
#   N               K negatives per image and layer from that summary and noise;
#   patch_nce_loss  with `negatives` (§4): the queries against N's negatives;
#   diversity_loss  the two halves of each image's negatives should differ;
#   negative_step   N's update; then CUT's G+H step with N's negatives; then the EMA.

def mean_embedding(H_ema: ProjectionHead, feats: list) -> list:
    """NEGCUT's summary of each image: every position (not a sample) through MLP_l of the momentum
    head, unit-normalised per position, then averaged over positions and not re-normalised. L maps
    n×C_l×h_l×w_l -> L tensors n×E. (The official CUT code normalises this every-position path over
    the wrong axis; NEGCUT's copy, followed here, normalises each E-vector.)"""
    mlps = (getattr(H_ema, f"mlp_{index}") for index in range(len(feats)))
    return [unit(mlp(feat.flatten(2).transpose(1, 2)), dim=2).mean(dim=1)  # n×(h·w)×E -> n×E
            for mlp, feat in zip(mlps, feats)]


class NegativeGenerator(nn.Module):
    """NEGCUT's N [NEGCUT paper §3.2; official NEGCUT code, models/negative_generator.py]:
    for each tapped layer and image, `count` = K negative E-vectors (--num_patches,
    as in the official code: 256 by default) made from the image's mean
    embedding v (by the momentum head) and fresh noise z ~ N(0, I₆₄):
        n_j = unit(MLP_l([v; z_j])),  MLP_l: Linear(E+64 → E), ReLU, Linear(E → E)
    so the negatives are specific to the image (v) and varied (z). Trained to make PatchNCE hard,
    they replace the other patches of the image. L lists of n×E -> L tensors (n·K)×E, image-major.
    739,840 parameters at E = 256 with 5 taps (147,968 per tap)."""

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
            code = torch.cat([v[:, None].expand(-1, self.count, -1), z], dim=2)   # n×K×(E+64)
            out.append(unit(getattr(self, f"mlp_{index}")(code.flatten(0, 1))))  # (n·K)×E
        return out


def diversity_loss(negatives: list, n_images: int, lambda_ms: float) -> torch.Tensor:
    """NEGCUT's diversity term for N [NEGCUT paper §3.2, Eq. 6 (mode seeking);
    official NEGCUT code, models/negcut_model.py]: the two halves of each image's
    K negatives come from independent noise, and N is rewarded for making
    them differ, so it cannot collapse onto one hard negative:
        L_div = (1/L)·Σ_l λ_MS·( −mean|N_l[:, :K/2] − N_l[:, K/2:]| ),  N_l viewed n×K×E."""
    halves = [negs.view(n_images, -1, negs.shape[1]).chunk(2, dim=1) for negs in negatives]
    terms = [-(first - second).abs().mean() for first, second in halves]  # n×(K/2)×E each
    return lambda_ms * torch.stack(terms).mean()


def generated_negatives(nets: dict) -> Callable:
    """The negatives N makes for a source image, from its key maps: N(H̄(feats))."""
    return lambda feats: nets["N"](mean_embedding(nets["H_ema"], feats))


def negative_step(nets: dict, opts: dict, forward: CutForward, real_a, real_b, cfg):
    """N's step: N ascends the NCE, with everything but N frozen:
        L_N = −0.5·(NCE + NCE_Y) + L_div        (FastNEGCUT: −NCE + L_div)
    with both NCE terms computed with N's negatives, and L_div on the
    negatives of the last branch computed (the identity branch when it runs:
    official, F16). q, k and H_ema's input carry no gradient (negatives_only),
    so only N learns (F16). Returns L_N."""
    set_requires_grad(nets["N"], True)
    nce_main, nce_idt = cut_nce(nets, forward, real_a, real_b, cfg,
                                make_negatives=generated_negatives(nets), negatives_only=True)
    last = nce_idt if nce_idt is not None else nce_main
    loss_N = -combined_nce(nce_main, nce_idt, real_a.new_zeros(())) + diversity_loss(
        last.negatives, real_a.shape[0], cfg.lambda_MS_neg)
    optimise(loss_N, opts["N"])
    set_requires_grad(nets["N"], False)                       # frozen again for G's step
    return loss_N


def negcut_step(nets: dict, opts: dict, real_a, real_b, cfg, epoch: int = 1) -> dict:
    """One NEGCUT or FastNEGCUT iteration [NEGCUT paper §3; official NEGCUT code,
    models/negcut_model.py]: CUT's step with N's step between D's and G's.

    Plan:
      1. Forward and 2. D step: as CUT (or FastCUT).
      2b. N step, the max: L_N = −0.5·(NCE + NCE_Y) + L_div, where NCE uses N's
          negatives; only N learns.
      3. G+H step, the min: CUT's L_G with the same NCE terms (fresh patch ids
         and noise), N frozen but not detached: G learns to tell its patches from N's negatives,
         also through H_ema and N into its encoder on the source image.
      4. EMA: H_ema ← H_ema + 0.1·(H − H_ema), a slowly moving copy of H.
    Returns the losses under the official log names (CUT's and N)."""
    forward = cut_forward(nets["G"], real_a, real_b, cfg)                  # 1.
    [(loss_D_real, loss_D_fake)] = discriminator_step(                     # 2.
        opts["D"], [(nets["D"], real_b, forward.fake_b)], cfg)
    loss_N = (negative_step(nets, opts, forward, real_a, real_b, cfg) if cfg.lambda_NCE > 0  # 2b.
              else real_a.new_zeros(()))                     # (no NCE: nothing to play for)
    losses = cut_generator_step(nets, opts, forward, real_a, real_b, cfg,  # 3.
                                make_negatives=generated_negatives(nets))
    with torch.no_grad():                                                  # 4.
        torch._foreach_lerp_(list(nets["H_ema"].parameters()), list(nets["H"].parameters()), 0.1)
    return reported(dict(D_real=loss_D_real, D_fake=loss_D_fake, **losses, N=loss_N))


# -----------------------------------------------------------------------------
# 8. PatchNCE's successors: Hneg-SRC and QS-Attn
# -----------------------------------------------------------------------------
# Two CVPR 2022 methods change what PatchNCE compares, each answering a weakness the NEGCUT paper
# names: most in-image negatives are easy, and PatchNCE keeps each patch's content but not the
# relations between patches (two patches that were alike in x should stay alike in G(x)).
#
# Hneg-SRC (Jung, Kwon, Ye, "Exploring Patch-wise Semantic Relation for
# Contrastive Learning in Image-to-Image Translation Tasks", arXiv 2203.01532;
# official code jcy132/Hneg_SRC, Single-modal/models): CUT's networks and step
# with two changes to the loss (--mode hnegsrc, or switches in CUT, DCLGAN, SimDCL):
#   hdce_loss       a decoupled contrastive loss: the positive leaves the
#                   denominator, and each negative's logit is weighted by how
#                   similar it is to the query's source patch (hard negatives);
#   relation_loss   semantic relation consistency: each patch's similarities to
#                   the other patches, as a distribution, should be the same in
#                   x and in G(x) (a Jensen-Shannon divergence per patch).
#   L_G = L_GAN + λ_HDCE·½(hDCE(x) + hDCE_idt(y)) + λ_SRC·L_SRC
# The official flag defaults (λ_HDCE = λ_SRC = 1, γ = 1, no identity term) did
# not make the published numbers; the preset follows the repository's
# horse2zebra recipe: identity term, λ_HDCE 0.1, λ_SRC 0.05, γ from 50 to 10 (F21).
#
# QS-Attn (Hu, Zhou, Wang, Gu, Wang, "QS-Attn: Query-Selected Attention for Contrastive Learning in
# I2I Translation", arXiv 2203.08483; official code sapphire497/query-selected-attention,
# models/networks_global.py): the anchors are not random positions but the source positions whose
# attention over the image is most peaked, i.e. the most distinctive ones (--patch_select qsattn,
# in every PatchNCE mode). Each anchor is that attention row applied to the features, v = A_QS·F,
# for the source and, with the same rows, for the output, v̂ = A_QS·F_out. The official code does
# this on the deepest taps only (the 64×64 ResNet-block maps at 256²) and samples the others at
# random (F22).

def hdce_gamma(cfg, epoch: int) -> float:
    """γ, the temperature of hDCE's hard-negative weights, in 1-based epoch e:
    --HDCE_gamma; with --use_curriculum it moves linearly towards
    --HDCE_gamma_min, γ_e = γ + (γ_min − γ)·e/(n_epochs + n_epochs_decay), and is
    1 after --step_gamma_epoch when that is set (official SRC.py). A smaller γ
    makes the weights sharper, so the curriculum starts easy and hardens."""
    if not cfg.use_curriculum:
        return cfg.HDCE_gamma
    if cfg.step_gamma_epoch and epoch > cfg.step_gamma_epoch:
        return 1.0
    return cfg.HDCE_gamma + (cfg.HDCE_gamma_min - cfg.HDCE_gamma) * epoch / cfg.total_epochs


def hdce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, groups: int, tau: float,
              gamma: float) -> torch.Tensor:
    """Hneg-SRC's hard-negative decoupled contrastive loss for one layer [Hneg-SRC
    paper, hard negative mining; official code, models/hDCE.py, weights in models/SRC.py].
    With s_ij = q_i·k_j (q_i the query, k_j the keys of its group, z = unit(k)):
        ω_ij = softmax_j(z_i·z_j/γ) / max_j softmax_j(z_i·z_j/γ)   (z_i·z_i set to −10 first)
        ℓ_i = −s_ii/τ + log Σ_j exp(ω_ij·s_ij/τ)        (s_ii·ω_ii replaced by −10)
    A negative whose key resembles the query's own source patch gets a weight near 1, an unlike one
    a smaller weight: the weights come from the source alone and are detached. "Decoupled": the
    positive is not in the sum (the positive-negative coupling of the InfoNCE gradient goes, Yeh et
    al. 2021). Shapes: feat_q, feat_k (n·S)×E -> (n·S). The value returned is what the official
    code logs: the cross-entropy of [s_ii | ω·s]/τ, PatchNCE's form with weighted negatives; its
    gradient is that of ℓ_i (official: exp(ℓ − ℓ.detach()) − 1 + CE.detach(), whose value and
    gradient are the same)."""
    dtype = torch.promote_types(feat_q.dtype, torch.float32)
    feat_k, feat_q = feat_k.detach().to(dtype), feat_q.to(dtype)
    q, k = (f.view(groups, -1, f.shape[1]) for f in (feat_q, feat_k))  # groups×P×E
    diagonal = torch.eye(q.shape[1], dtype=torch.bool, device=q.device)[None]
    z = unit(k, dim=2)                                        # official: normalised again
    weights = torch.bmm(z, z.transpose(1, 2)).masked_fill(diagonal, -10.0)
    weights = (weights / gamma).softmax(dim=2)                # groups×P×P, rows sum to 1
    weights = weights / weights.amax(dim=2, keepdim=True)     # the hardest negative: 1
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)        # (n·S)×1
    l_neg = (torch.bmm(q, k.transpose(1, 2)) * weights).masked_fill(diagonal, -10.0)
    l_neg = l_neg.flatten(0, 1)                               # (n·S)×P
    decoupled = torch.logsumexp((l_neg - l_pos) / tau, dim=1)  # ℓ_i
    target = torch.zeros(l_neg.shape[0], dtype=torch.long, device=l_neg.device)
    logged = F.cross_entropy(torch.cat([l_pos, l_neg], dim=1) / tau, target, reduction="none")
    return decoupled - decoupled.detach() + logged.detach()


def relation_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, n_images: int) -> torch.Tensor:
    """Hneg-SRC's semantic relation consistency for one layer [Hneg-SRC paper,
    L_SRC; official code, models/SRC.py]. Per image, with z = unit(keys of x),
    detached, and w = unit(queries of G(x)), S×E each:
        P_k = softmax_i(z_k·z_i),  Q_k = softmax_i(w_k·w_i)
        L_SRC = Σ_k JSD(Q_k ‖ P_k),  JSD(a‖b) = ½·[KL(a‖m) + KL(b‖m)],  m = ½·(a + b)
    summed over the S×S entries and the images (official: a sum, not a mean). Why: PatchNCE keeps
    each patch apart from the others; this keeps how alike the patches are, so regions that
    belonged together in x stay together. No temperature: dot products of unit vectors, so the P_k
    are soft. The softmax runs over dim 1 as in the official code (columns; the matrices are
    symmetric, so column k is patch k's distribution). Returns a scalar."""
    z = unit(feat_k.detach(), dim=1).view(n_images, -1, feat_k.shape[1])  # n×S×E
    w = unit(feat_q, dim=1).view(n_images, -1, feat_q.shape[1])
    p, q = (torch.bmm(v, v.transpose(1, 2)).softmax(dim=1) for v in (z, w))  # n×S×S
    m = 0.5 * (p + q)
    return 0.5 * ((q * (q.log() - m.log())).sum() + (p * (p.log() - m.log())).sum())


def relation_term(nce: PatchNCE, n_images: int, cfg) -> torch.Tensor:
    """λ_SRC·L_SRC, averaged over the layers, on the patches nce_between sampled."""
    with torch.autocast(nce.loss.device.type, enabled=False):
        terms = [relation_loss(q, k, n_images) for q, k in zip(nce.queries, nce.keys)]
    return cfg.lambda_SRC * torch.stack(terms).mean()


def query_selected_rows(flat: torch.Tensor, num_patches: int) -> torch.Tensor:
    """QS-Attn's global query selection [QS-Attn paper, global attention; official code,
    models/networks_global.py PatchSampleF]. flat: the source's n×C×(h·w) map.
        A = softmax_row(F·Fᵀ),  F = flatᵀ (h·w)×C, per image   (no scaling, as official)
        H_i = −Σ_j A_ij·log A_ij,  keep the S rows of lowest entropy
    A row of low entropy attends to few positions: its query is distinctive,
    so the contrastive loss learns from the patches that matter. Selected per
    image, unlike random ids. Returns A_QS, n×S×(h·w), in fp32; not detached:
    the queries' loss reaches the source's features through it (official)."""
    features = flat.float().transpose(1, 2)                   # n×(h·w)×C
    log_attention = torch.bmm(features, features.transpose(1, 2)).log_softmax(dim=2)
    attention = log_attention.exp()                           # n×(h·w)×(h·w)
    entropy = -(attention * log_attention).sum(dim=2)         # n×(h·w); 0·log 0 counts 0
    rows = entropy.argsort(dim=1)[:, :num_patches]            # the most peaked first
    return attention.gather(1, rows[..., None].expand(-1, -1, attention.shape[2]))


# -----------------------------------------------------------------------------
# 9. CycleGAN
# -----------------------------------------------------------------------------
# The baseline every paper here compares with (CycleGAN paper §3). Two generators,
# G_ab and G_ba, and no contrastive loss. Content is kept by cycle consistency:
# translating there and back should give the input again, |G_ba(G_ab(a)) − a|, which rules out
# mappings that throw the content away but assumes the mapping can be inverted. (That assumption is
# what CUT drops: a zebra's stripes need not say how to paint the horse back.) An identity term
# (CycleGAN paper §5.2, after Taigman et al.) asks each generator to leave images of its output
# domain alone; the paper found it keeps colours from drifting (its Monet→photo example). D is
# shown a history of fakes, the image pool, rather than only the latest ones. The weights:
# λ_A = λ_B = 10 for the cycles, and the identity term at λ_idt = 0.5 of them, 5 in all. Upstream
# CycleGAN uses the stride-2 G and D and N(0, 0.02) weights, and it updates G before D, where the
# CUT lineage does D first (F15): D then learns from this step's fakes, made before G's update,
# mixed with older ones by the pool.

class ImagePool(nn.Module):
    """CycleGAN's history of generated images (Shrivastava et al. 2017): D is shown a mix of
    current and earlier fakes, so G cannot win by oscillating between modes that the latest D
    happens to miss. Until the pool is full each fake is stored and returned; then, per image, with
    probability 0.5 a random stored fake is returned and replaced by the new one, else the new one
    passes through. A module, so its contents travel in checkpoints."""

    def __init__(self, capacity: int, size: int, channels: int = 3):
        super().__init__()
        self.count = 0
        self.register_buffer("images", torch.zeros(capacity, channels, size, size))

    def forward(self, fakes):                                  # n×3×h×w, detached
        capacity, out = self.images.shape[0], []
        if capacity == 0:                                     # --pool_size 0: no history
            return fakes.detach()
        for image in fakes.detach():
            if self.count < capacity:
                self.images[self.count] = image
                self.count += 1
            elif float(torch.rand(())) < 0.5:                # half the time an old fake
                slot = int(torch.randint(capacity, ()))
                image, self.images[slot] = self.images[slot].clone(), image
            out.append(image)
        return torch.stack(out)

    def get_extra_state(self):
        """The fill count travels in the state dict too (key `_extra_state`), so
        a continued run goes on with the same history."""
        return self.count

    def set_extra_state(self, count):
        self.count = count


def cyclegan_step(nets: dict, opts: dict, real_a, real_b, cfg, epoch: int = 1) -> dict:
    """One CycleGAN iteration [CycleGAN paper §3, Eq. 3 and §5.2; upstream
    pytorch-CycleGAN-and-pix2pix, models/cycle_gan_model.py].

    Plan (G before D, unlike the CUT lineage):
      1. Forward: fake_b = G_ab(real_a), fake_a = G_ba(real_b), the
         reconstructions rec_a = G_ba(fake_b), rec_b = G_ab(fake_a), and the
         identity images idt_b = G_ab(real_b), idt_a = G_ba(real_a).
      2. G step, D frozen:
         L_G = λ_GAN·[lsgan(D_b(fake_b)) + lsgan(D_a(fake_a))]          (λ_GAN 1)
             + λ_A·mean|rec_a − real_a| + λ_B·mean|rec_b − real_b|           (cycle)
             + λ_idt·λ_B·mean|idt_b − real_b| + λ_idt·λ_A·mean|idt_a − real_a| (identity)
         one backward through both generators, one Adam step for G_ab ∪ G_ba.
      3. D step on fakes drawn from the image pools (pool_size 50), both Ds
         under one Adam: L_D = 0.5·[lsgan(D(real), real) + lsgan(D(pool(fake)), fake)].
    Returns the losses under the official log names (A names the generator:
    D_A is our D_b, cycle_A the cycle that starts from real_a)."""
    use_idt = cfg.lambda_IDT > 0
    out = translate_both(nets, real_a, real_b, use_idt)                    # 1. (no taps: no NCE)
    G_ab, G_ba, D_a, D_b = (nets[k] for k in ("G_ab", "G_ba", "D_a", "D_b"))
    # The reconstructions: each fake translated back to the domain it came from.
    rec_a, rec_b = G_ba(out.fake_b), G_ab(out.fake_a)                       # n×3×h×w each

    set_requires_grad(D_a, False)                                          # 2. D frozen: G's
    set_requires_grad(D_b, False)                                          # gradients pass through
    zero = real_a.new_zeros(())
    # λ_GAN·[L_GAN(G_ab, D_b) + L_GAN(G_ba, D_a)]: each fake should pass its domain's D.
    loss_gan_ab = cfg.lambda_GAN * gan_loss(D_b(out.fake_b), True, cfg.gan_mode)
    loss_gan_ba = cfg.lambda_GAN * gan_loss(D_a(out.fake_a), True, cfg.gan_mode)
    # λ_A·|G_ba(G_ab(a)) − a| + λ_B·|G_ab(G_ba(b)) − b| (Eq. 2): there and back again.
    loss_cycle_a = cfg.lambda_A * F.l1_loss(rec_a, real_a)
    loss_cycle_b = cfg.lambda_B * F.l1_loss(rec_b, real_b)
    # λ_idt·λ_B·|G_ab(b) − b| + λ_idt·λ_A·|G_ba(a) − a|: an output-domain image stays.
    loss_idt_b = cfg.lambda_IDT * cfg.lambda_B * F.l1_loss(out.idt_b, real_b) if use_idt else zero
    loss_idt_a = cfg.lambda_IDT * cfg.lambda_A * F.l1_loss(out.idt_a, real_a) if use_idt else zero
    loss_G = loss_gan_ab + loss_gan_ba + loss_cycle_a + loss_cycle_b + loss_idt_b + loss_idt_a
    identity_pairs = [(out.idt_b, real_b), (out.idt_a, real_a)] if use_idt else []
    loss_perc = perceptual_terms(nets, cfg, [identity_pairs, [(rec_a, real_a), (rec_b, real_b)]],
                                 [(out.fake_b, real_a), (out.fake_a, real_b)])
    loss_G = loss_G if loss_perc is None else loss_G + loss_perc
    optimise(loss_G, opts["G"])

    # 3. D's step on fakes from the pools, which store and return detached images.
    loss_D_b, loss_D_a = (0.5 * (real + fake) for real, fake in discriminator_step(opts["D"], [
        (D_b, real_b, nets["pool_b"](out.fake_b)), (D_a, real_a, nets["pool_a"](out.fake_a))], cfg))
    return reported(dict(D_A=loss_D_b, G_A=loss_gan_ab, cycle_A=loss_cycle_a, idt_A=loss_idt_b,
                         D_B=loss_D_a, G_B=loss_gan_ba, cycle_B=loss_cycle_b, idt_B=loss_idt_a,
                         G=loss_G, perc=loss_perc))


# -----------------------------------------------------------------------------
# 10. An extension: the perceptual loss
# -----------------------------------------------------------------------------
# A feature-prediction (perceptual) loss [Johnson, Alahi, Fei-Fei, ECCV 2016,
# arXiv 1603.08155], in no official code here and off in every preset (F17):
# compare two images in the feature space of a frozen VGG16 instead of pixel by pixel. A pixel L1
# is minimised by the blurry average of the plausible answers; VGG's features respond to edges,
# textures and parts, so matching them keeps structure sharp. It applies only where a step has a
# target image: identity images against their inputs and CycleGAN's reconstructions against the
# originals (--lambda_perc), and, behind its own switch, G(x) against x at one deep layer
# (--lambda_perc_content), where features say what is where rather than how it looks, so the
# appearance may still change. VGG stays frozen: were it trained with G, it could learn to stop
# seeing the differences it is meant to measure. Its ImageNet weights are read from a local file
# (torchvision's cache or --vgg_weights); nothing is downloaded, and a missing file stops the run
# before it starts (F17).

VGG_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}  # torchvision indices
VGG_WEIGHTS = {"relu1_2": 1 / 16, "relu2_2": 1 / 8, "relu3_3": 1 / 4, "relu4_3": 1.0}
VGG_FILE = "vgg16-397923af.pth"                           # torchvision's IMAGENET1K_V1 weights


def vgg16(weights=None) -> nn.Module:
    """torchvision's VGG16; torchvision is imported here only, to keep start-up fast. Always called
    with weights=None: the weights come from a local file, never from torchvision's downloader."""
    from torchvision.models import vgg16 as build
    return build(weights=weights)


class Perceptual(nn.Module):
    """L_perc(a, b) = Σ_l w_l·mean|φ_l(a) − φ_l(b)| over VGG_LAYERS with VGG_WEIGHTS (the shallow
    layers, which see pixel-level detail, weigh least), or at relu4_3 alone (content). φ = VGG16
    `features` up to relu4_3, frozen: eval mode, no gradients into it, never in an optimiser or a
    checkpoint. Inputs n×3×h×w in [−1, 1] are mapped to [0, 1] and normalised with the ImageNet
    mean and std, the input VGG16 was trained on. The target b is a real image:
    it gets no gradient; both images go through VGG in one batch."""

    def __init__(self, weights: str):
        super().__init__()
        path = local_weights(weights, VGG_FILE, "--lambda_perc", "--vgg_weights",
                             "run torchvision.models.vgg16(weights='IMAGENET1K_V1')")  # §18
        # Only the layers up to relu4_3 are ever used. torchvision's file holds
        # features.N and classifier.N keys; a file of `features` alone loads too.
        self.features = vgg16(weights=None).features[:VGG_LAYERS["relu4_3"] + 1]
        if path is not None:
            state = {k.removeprefix("features."): v for k, v in read_checkpoint(path).items()}
            load_state(self.features, {k: v for k, v in state.items()
                                       if k in self.features.state_dict()}, f"{path} (VGG16)")
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        """Frozen: .train() leaves it in eval mode, whatever the caller asks."""
        return super().train(False)

    def forward(self, output, target, content: bool = False) -> torch.Tensor:
        layers = {"relu4_3": 1.0} if content else VGG_WEIGHTS
        x = (torch.cat([i.expand(-1, 3, -1, -1) for i in (output, target)]) + 1) / 2   # 2n×3×h×w
        # (one pass for both; a grayscale image enters as its gray in all three channels)
        x, loss = (x - self.mean) / self.std, 0.0
        # One pass through VGG; at each chosen layer compare the output half of
        # the batch with the target half, in fp32 under --fast too.
        for index, layer in enumerate(self.features):
            x = layer(x)
            for name, weight in layers.items():
                if index == VGG_LAYERS[name]:
                    a, b = x.chunk(2)
                    loss = loss + weight * (a.float() - b.detach().float()).abs().mean()
        return loss


def perceptual_terms(nets: dict, cfg, target_sets: list, content_pairs: list):
    """λ_perc·Σ_sets mean_pairs L_perc(out, target) + λ_content·mean_pairs L_content(G(x), x).
    A set holds one (output, target) pair per direction, so two-sided modes
    average the two directions (DCLGAN and SimDCL halve every term; CycleGAN's
    own terms are sums, but a perceptual term per direction keeps its scale). None when
    the loss is off (no VGG in nets) or has nothing to compare. The pairs the
    steps pass (λ_perc; the content pairs are (G(x), x) in every mode):
      CUT, NEGCUT      (idt_b, real_b), with the identity term only
      DCLGAN, SimDCL   (idt_b, real_b) and (idt_a, real_a), with λ_IDT > 0
      CycleGAN         those two, and (rec_a, real_a), (rec_b, real_b) as a second set"""
    vgg, terms = nets.get("vgg"), []
    if vgg is not None and cfg.lambda_perc > 0:
        terms += [cfg.lambda_perc * sum(vgg(o, t) for o, t in pairs) / len(pairs)
                  for pairs in target_sets if pairs]
    if vgg is not None and cfg.lambda_perc_content > 0:
        terms.append(cfg.lambda_perc_content * sum(vgg(o, x, content=True)
                                                   for o, x in content_pairs) / len(content_pairs))
    return sum(terms) if terms else None


# -----------------------------------------------------------------------------
# 11. The modes side by side: presets, networks, steps
# -----------------------------------------------------------------------------
# What makes CUT and FastCUT, NEGCUT, DCLGAN, SimDCL and CycleGAN different, in one table. A preset
# lists only the settings that differ from the official CUT defaults (TrainConfig, §12). Network
# names: G_ab maps A to B; D_b judges B images (official D_A); H_a embeds A images (official F1);
# M_* are SimDCL's mapping heads for real/fake A/B sets (official F3..F6); N is NEGCUT's negative
# generator and H_ema its momentum head (official F_); pool_* keep CycleGAN's old fakes. Precedence
# when a run starts: the official defaults < the preset < the demo settings (bundled data
# only) < flags typed by the user.
#   mode        step           networks                      differs from CUT by
#   cut         cut_step       G D H                         (the defaults)
#   fastcut     cut_step       G D H                         λ_NCE 10, no identity, flips
#   negcut      negcut_step    G D H N H_ema                 generated negatives
#   fastnegcut  negcut_step    G D H N H_ema                 FastCUT's, generated negatives
#   dcl         dual_step      G_ab G_ba D_a D_b H_a H_b     two directions, hinge
#   simdcl      dual_step      DCLGAN's + M_ra M_fb M_rb M_fa  DCLGAN + L_sim
#   hnegsrc     cut_step       G D H                         hDCE + relations (§8)
#   cyclegan    cyclegan_step  G_ab G_ba D_a D_b pool_a pool_b  cycle, no NCE
# QS-Attn is a switch of every PatchNCE mode: --patch_select qsattn.

class Mode(NamedTuple):
    step: Callable            # one training iteration: (nets, opts, real_a, real_b, cfg) -> losses
    networks: tuple           # the networks it builds, by name (§14 builds each name)
    preset: dict              # settings that differ from the official CUT defaults


ONE_SIDED = ("G", "D", "H")
TWO_SIDED = ("G_ab", "G_ba", "D_a", "D_b", "H_a", "H_b")
MODES = {
    # CUT (official --CUT_mode CUT): identity NCE on the target domain (G(y)
    # should stay y), λ_NCE 1, 200 epochs at full LR + 200 of linear decay.
    "cut": Mode(cut_step, ONE_SIDED, dict(
        lambda_NCE=1.0, nce_idt=True, flip_equivariance=False, n_epochs=200, n_epochs_decay=200)),
    # FastCUT (official --CUT_mode FastCUT): no identity pass (half the generator
    # work), a 10x NCE weight and flip-equivariance instead, 150 + 50 epochs.
    "fastcut": Mode(cut_step, ONE_SIDED, dict(
        lambda_NCE=10.0, nce_idt=False, flip_equivariance=True, n_epochs=150, n_epochs_decay=50)),
    # NEGCUT, FastNEGCUT (official --NEGCUT_mode): CUT or FastCUT with the
    # in-image negatives replaced by hard ones from N; λ_MS 1 weighs N's diversity term.
    "negcut": Mode(negcut_step, ONE_SIDED + ("N", "H_ema"), dict(
        lambda_NCE=1.0, nce_idt=True, flip_equivariance=False, lambda_MS_neg=1.0,
        n_epochs=200, n_epochs_decay=200)),
    "fastnegcut": Mode(negcut_step, ONE_SIDED + ("N", "H_ema"), dict(
        lambda_NCE=10.0, nce_idt=False, flip_equivariance=True, lambda_MS_neg=1.0,
        n_epochs=150, n_epochs_decay=50)),
    # DCLGAN (official --model dcl): hinge loss, taps without the RGB layer, negatives from the
    # whole batch, L1 identity. The code halves every term of the paper's Eq. 8 (λ_NCE 2 × 0.5 = 1
    # per direction) and trains the heads with Adam's defaults, lr 1e-3 and beta1 0.9 (F11, F12).
    # The paper's setting: --lr 1e-4 --n_epochs 200 --n_epochs_decay 200 (400 in all).
    "dcl": Mode(dual_step, TWO_SIDED, dict(
        nce_layers="4,8,12,16", gan_mode="hinge", lambda_NCE=2.0, nce_idt=False, lambda_IDT=1.0,
        nce_includes_all_negatives_from_minibatch=True, lr_H=1e-3, beta1_H=0.9)),
    # SimDCL (official --model simdcl): DCLGAN plus the similarity loss on four
    # mapping heads, λ_SIM 10. The official code declares λ_NCE 2 but never
    # applies it: 0.5 per direction, i.e. λ_NCE 1 in our formula (F14). Its
    # heads use --lr and --beta1. The paper's setting: --n_epochs 100 --n_epochs_decay 100.
    "simdcl": Mode(dual_step, TWO_SIDED + ("M_ra", "M_fb", "M_rb", "M_fa"), dict(
        nce_layers="4,8,12,16", gan_mode="hinge", lambda_NCE=1.0, nce_idt=False, lambda_IDT=1.0,
        lambda_SIM=10.0, nce_includes_all_negatives_from_minibatch=True)),
    # Hneg-SRC (official jcy132/Hneg_SRC, its README's horse2zebra recipe: --CUT_mode
    # CUT --dce_idt --lambda_HDCE 0.1 --lambda_SRC 0.05 --use_curriculum
    # --HDCE_gamma 50 --HDCE_gamma_min 10): CUT with hDCE and the relation term (F21).
    "hnegsrc": Mode(cut_step, ONE_SIDED, dict(
        lambda_NCE=0.1, nce_idt=True, flip_equivariance=False, nce_loss="hdce", lambda_SRC=0.05,
        use_curriculum=True, HDCE_gamma=50.0, HDCE_gamma_min=10.0, n_epochs=200,
        n_epochs_decay=200)),
    # CycleGAN (upstream pytorch-CycleGAN-and-pix2pix): strided and transposed
    # convs, N(0, 0.02) init, cycle weight 10, identity 0.5 (× 10), a pool of
    # 50 old fakes for D, 100 + 100 epochs, random crops throughout.
    "cyclegan": Mode(cyclegan_step, ("G_ab", "G_ba", "D_a", "D_b", "pool_a", "pool_b"), dict(
        nce_idt=False, lambda_NCE=0.0, lambda_IDT=0.5, pool_size=50, init_type="normal",
        no_antialias=True, no_antialias_up=True, n_epochs=100, n_epochs_decay=100,
        crop_in_decay=True)),
}


# =============================================================================
# PART II. RUNNING THEM
# =============================================================================
# Everything a run needs around the methods: configuration, data, networks, the loop,
# checkpoints, translate, evaluation, bench, torchrun, the command line; no step math.

# -----------------------------------------------------------------------------
# 12. Configuration
# -----------------------------------------------------------------------------
# One dataclass holds every setting; each field is a command-line flag with the
# official name (§21). resolve_config merges the official defaults, the mode
# preset (§11), the demo settings and the typed flags, and records each value's
# origin for the printed config; checkpoints store it, so translate needs nothing else.

# Without --dataroot (or with data/ named) we train on the bundled 96×96 two-domain set with
# settings a 2-core CPU runs at several steps per second: 64-pixel crops and a quarter-width
# network. The method (losses, layers, step) is unchanged.
BUNDLED_DATA = Path(__file__).resolve().parent / "data"
DEMO = dict(load_size=72, crop_size=64, ngf=16, ndf=16, n_epochs=6, n_epochs_decay=2, print_freq=25,
            display_freq=100, save_latest_freq=500, save_epoch_freq=1, num_threads=1, eval_freq=1)


class UserError(Exception):
    """A mistake in the command, the data or a file: reported in one line, exit 2."""


def _opt(default, help, **extra):
    """A config field whose metadata becomes its command-line flag."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # method
    mode: str = _opt("cut", "method preset", choices=tuple(MODES))
    # data
    dataroot: str = _opt("", "folder with trainA/, trainB/ (testA/, testB/); empty = the demo")
    direction: str = _opt("AtoB", "BtoA swaps the domains", choices=("AtoB", "BtoA"))
    input_nc: int = _opt(3, "channels of the source images: 3 RGB, 1 grayscale", choices=(1, 3))
    output_nc: int = _opt(3, "channels of the target images: 3 RGB, 1 grayscale", choices=(1, 3))
    load_size: int = _opt(286, "training images are resized to this square first")
    crop_size: int = _opt(256, "then randomly cropped to this square (a multiple of 4)")
    no_flip: bool = _opt(False, "no random horizontal flip of training images")
    serial_batches: bool = _opt(False, "no shuffling; B paired to A by index, not at random")
    crop_in_decay: bool = _opt(False, "random crops in the LR-decay epochs too (official: none)")
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
    num_patches: int = _opt(256, "S: patches per layer and image (NEGCUT: negatives per image)")
    # losses
    gan_mode: str = _opt("lsgan", "adversarial loss", choices=("lsgan", "hinge"))
    lambda_GAN: float = _opt(1.0, "weight of the adversarial loss of G")
    lambda_NCE: float = _opt(1.0, "weight of PatchNCE (or hDCE)", aliases=("--lambda_HDCE",))
    nce_idt: bool = _opt(True, "PatchNCE on y -> G(y) too (identity)", aliases=("--dce_idt",))
    nce_T: float = _opt(0.07, "tau: the PatchNCE temperature")
    nce_includes_all_negatives_from_minibatch: bool = _opt(False, "negatives from the whole batch")
    lambda_IDT: float = _opt(0.0, "L1 identity |G(y) − y| (CycleGAN: × lambda_A/B)",
                             aliases=("--lambda_identity",))
    lambda_SIM: float = _opt(0.0, "SimDCL: weight of the similarity loss")
    lambda_A: float = _opt(10.0, "CycleGAN: weight of the cycle loss |G_ba(G_ab(a)) − a|")
    lambda_B: float = _opt(10.0, "CycleGAN: weight of the cycle loss |G_ab(G_ba(b)) − b|")
    pool_size: int = _opt(0, "CycleGAN: D sees fakes from a pool of this many earlier ones")
    lambda_MS_neg: float = _opt(0.0, "NEGCUT: weight of the negative generator's diversity")
    # extensions (off in every preset, so the official modes are unchanged)
    lambda_perc: float = _opt(0.0, "weight of the VGG16 perceptual loss (identity, cycle targets)")
    lambda_perc_content: float = _opt(0.0, "weight of a VGG16 relu4_3 content loss, G(x) vs x")
    vgg_weights: str = _opt("", "VGG16 ImageNet weights (vgg16-397923af.pth); default: "
                            "torchvision's cache; 'random' = random weights, for tests only")
    nce_hard_beta: float = _opt(0.0, "weight negatives by exp(beta·similarity) (0 = official)")
    # successors of PatchNCE (§8; off in every preset but hnegsrc)
    nce_loss: str = _opt("patchnce", "PatchNCE, or Hneg-SRC's hDCE", choices=("patchnce", "hdce"))
    lambda_SRC: float = _opt(0.0, "Hneg-SRC: weight of the semantic relation consistency loss")
    HDCE_gamma: float = _opt(1.0, "Hneg-SRC: γ, the temperature of the hard-negative weights")
    HDCE_gamma_min: float = _opt(1.0, "Hneg-SRC: γ at the end of the run, with --use_curriculum")
    use_curriculum: bool = _opt(False, "Hneg-SRC: move γ linearly to HDCE_gamma_min")
    step_gamma_epoch: int = _opt(0, "Hneg-SRC: γ = 1 after this epoch, with --use_curriculum "
                                 "(0 = never; official --step_gamma --step_gamma_epoch)")
    patch_select: str = _opt("random", "PatchNCE's anchors: random, or QS-Attn's selected rows "
                             "(deepest taps)", choices=("random", "qsattn"))
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
    continue_train: bool = _opt(False, "go on with run `name`", aliases=("--resume",))
    max_steps: int = _opt(0, "stop after this many steps in all (0 = train every epoch)")
    seed: int = _opt(0, "seeds torch, numpy, python and every data-augmentation draw")
    device: str = _opt("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    deterministic: bool = _opt(False, "deterministic cuDNN and torch algorithms")
    fast: str = _opt("auto", "bf16, channels_last, fused Adam", choices=("auto", "on", "off"))
    compile: bool = _opt(False, "torch.compile G and D (slow first steps; pays on long runs)")
    print_freq: int = _opt(100, "steps between loss-log rows and progress lines")
    display_freq: int = _opt(2500, "steps between sample grids")
    save_latest_freq: int = _opt(5000, "steps between writes of ckpt_latest.pt")
    save_epoch_freq: int = _opt(5, "epochs between kept weight snapshots")
    # evaluation (§18)
    eval_freq: int = _opt(0, "score the test split every E epochs, keep ckpt_best.pt (0 = never)")
    eval_metric: str = _opt("auto", "ckpt_best.pt's score", choices=("auto", "fid", "kid", "psnr"))
    inception_weights: str = _opt("", "pytorch-fid's Inception weights (default: hub cache)")

    @property
    def layer_ids(self) -> tuple:
        return tuple(int(i) for i in self.nce_layers.split(","))

    @property
    def total_epochs(self) -> int:
        return self.n_epochs + self.n_epochs_decay

    def validate(self) -> None:
        """Turn impossible settings into one-line errors before any work starts:
        the message of the first rule below that is broken."""
        try:
            ids = self.layer_ids
        except ValueError:
            raise UserError(f"--nce_layers {self.nce_layers!r}: give comma-separated integers")
        mode = MODES[self.mode]
        one_g, neg, n = "G" in mode.networks, "N" in mode.networks, f"--mode {self.mode}"
        low = next((f"--{f} must be at least {int(f != 'eval_freq')}" for f in (
            "batch_size", "num_patches", "ngf", "ndf", "netF_nc", "print_freq", "display_freq",
            "save_latest_freq", "save_epoch_freq", "eval_freq") if getattr(self, f) < (
                f != "eval_freq")), "")
        # Which steps make an image that has a target to compare with (§10).
        targets = {cyclegan_step: True, dual_step: self.lambda_IDT > 0}.get(
            mode.step, self.nce_idt and self.lambda_NCE > 0)
        successor = next((flag for flag, used in (("--nce_loss hdce", self.nce_loss == "hdce"), (
            "--lambda_SRC", self.lambda_SRC > 0), ("--patch_select qsattn", self.patch_select ==
                                                   "qsattn")) if used), "")
        rules = [
            (list(ids) != sorted(set(ids)) or ids[0] < 0, f"--nce_layers {self.nce_layers}: "
             "indices must be distinct, non-negative and ascending"),
            (self.crop_size > self.load_size, f"--crop_size {self.crop_size} is larger than "
             f"--load_size {self.load_size}: images are resized to load_size before cropping"),
            (self.crop_size % 4 or self.crop_size < 24, f"--crop_size {self.crop_size}: use a "
             "multiple of 4 (G halves the size twice), at least 24 (D's last instance norm "
             "needs 2x2 pixels)"), (low, low), (self.nce_T <= 0, "--nce_T must be positive"),
            (self.lambda_perc > 0 and not targets, f"--lambda_perc: {n} makes no identity image "
             "here to compare with its input; use --lambda_perc_content (G(x) against x) instead"),
            (self.lambda_SIM > 0 and "M_ra" not in mode.networks, f"--lambda_SIM: {n} has no "
             "mapping heads for the similarity loss; use --mode simdcl"),
            (successor and (mode.step is cyclegan_step or self.lambda_NCE <= 0), f"{successor}: "
             f"{n} with --lambda_NCE {self.lambda_NCE} has no contrastive loss to change"),
            (self.nce_loss == "hdce" and (neg or self.nce_hard_beta), "--nce_loss hdce weights "
             "the in-image negatives itself: not with NEGCUT's negatives nor --nce_hard_beta"),
            (self.input_nc != self.output_nc and (one_g or self.lambda_IDT > 0), f"--input_nc "
             f"{self.input_nc} --output_nc {self.output_nc}: {n} " + ("encodes G's output with G "
             "itself; use --mode dcl, simdcl or cyclegan" if one_g else "translates b images "
             "for its identity term; add --lambda_IDT 0")),
            (neg and self.num_patches % 2, f"--num_patches {self.num_patches}: NEGCUT's "
             "diversity term splits the negatives into two halves; use an even number"),
            (neg and self.nce_includes_all_negatives_from_minibatch, "--nce_includes_all_"
             "negatives_from_minibatch: NEGCUT compares each image with its own negatives only")]
        for broken, message in rules:
            if broken:
                raise UserError(message)


def resolve_config(flags: dict) -> tuple[TrainConfig, dict]:
    """Merge defaults < mode preset < demo settings < flags; also say where
    each value came from (its origin), so the printed config explains itself."""
    mode = flags.get("mode", "cut")
    values, origin = dict(MODES[mode].preset), dict.fromkeys(MODES[mode].preset, mode)
    if Path(flags.get("dataroot") or BUNDLED_DATA).resolve() == BUNDLED_DATA:   # named or not
        values.update(DEMO, dataroot=str(BUNDLED_DATA))
        origin.update(dict.fromkeys(DEMO, "demo"))
    values.update(flags)
    origin.update(dict.fromkeys(flags, "flag"))
    if not values.get("name"):
        values["name"] = f"{mode}_{Path(values['dataroot']).resolve().name}"
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg, origin


def describe_config(cfg: TrainConfig, origin: dict) -> str:
    lines = [f"  {f.name:<18} {getattr(cfg, f.name)!s:<24}"
             + (f" ({origin[f.name]})" if f.name in origin else "") for f in fields(cfg)]
    return ("config; in brackets where a value came from, if not the official default "
            "(mode preset, demo settings, flag, stored run):\n" + "\n".join(lines))


# -----------------------------------------------------------------------------
# 13. Unpaired data
# -----------------------------------------------------------------------------
# DATAROOT/trainA and trainB hold unrelated images. An epoch has max(|A|, |B|) items
# (official unaligned_dataset.py): item i is A image i mod |A|, so every A image is seen at least
# once, each with a B image drawn at random, so that no pairing can be learnt. Each item's draws (B
# index, crop, flip) come from its own seed (seed, epoch, position): a run is the same with any
# number of workers and resumes exactly in the middle of an epoch (F9).

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def find_images(folder: Path, least: int = 0, why: str = "") -> list:
    """Every image below folder (links followed, any case), sorted; at least `least`."""
    found = [Path(root) / n for root, _, names in os.walk(folder, followlinks=True)
             for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if len(found) < least:
        raise UserError(f"{len(found) or 'no'} image{'s' * (len(found) != 1)} in {folder}{why} "
                        f"(looked for {' '.join(IMAGE_EXTENSIONS)}, any case)")
    return sorted(found)


def load_image(path: Path, channels: int = 3) -> Image.Image:
    """Open any image as RGB, or grayscale for 1 channel (palette, RGBA, ... are
    converted, as the official dataset does); a broken file: a one-line error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB or L -> C×h×w float in [−1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    array = torch.from_numpy(np.array(img, dtype=np.float32)).view(img.height, img.width, -1)
    return (array.permute(2, 0, 1) / 255.0 - 0.5) / 0.5


def train_transform(img: Image.Image, cfg: TrainConfig, rng: torch.Generator,
                    no_crop: bool) -> torch.Tensor:
    """Official 'resize_and_crop': PIL bicubic resize to load_size² (aspect ratio not
    kept), random crop_size² crop, random flip. In the LR-decay epochs the CUT lineage
    resizes straight to crop_size² (no crop): whole images, as at test time (F6)."""
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
    """(A, B) folders of a phase; --direction BtoA swaps the domains."""
    a, b = (Path(cfg.dataroot) / f"{phase}{domain}" for domain in "AB")
    return (b, a) if cfg.direction == "BtoA" else (a, b)


class UnpairedDataset(torch.utils.data.Dataset):
    """Items are looked up by the (item seed, index, no_crop) tuples of EpochSampler."""

    def __init__(self, cfg: TrainConfig):
        if not Path(cfg.dataroot).is_dir():
            raise UserError(f"--dataroot {cfg.dataroot} does not exist")
        self.files_a, self.files_b = (find_images(f, 1, " (training needs trainA and trainB)")
                                      [:cfg.max_dataset_size or None] for f in domain_folders(cfg))
        self.cfg = cfg

    def __len__(self):
        return max(len(self.files_a), len(self.files_b))

    def __getitem__(self, item):
        """(real_a, real_b, warnings about skipped unreadable files, printed by the main
        process: a worker's would come after the run's last line)."""
        (item_seed, index, no_crop), cfg = item, self.cfg
        rng = torch.Generator().manual_seed(item_seed)
        index_b = (index % len(self.files_b) if cfg.serial_batches else
                   int(torch.randint(len(self.files_b), (1,), generator=rng)))
        skipped = []
        img_a = self.load(self.files_a, index % len(self.files_a), rng, cfg.input_nc, skipped)
        img_b = self.load(self.files_b, index_b, rng, cfg.output_nc, skipped)
        return (*(train_transform(img, cfg, rng, no_crop) for img in (img_a, img_b)),
                "\n".join(skipped))

    @staticmethod
    def load(files: list, index: int, rng: torch.Generator, channels: int, skipped: list,
             tries: int = 10):
        """A corrupt file found mid-training is skipped with a warning (added to
        skipped) for a random other file of its domain; ten in a row: unusable."""
        for _ in range(tries):
            try:
                return load_image(files[index], channels)
            except UserError as error:
                reason = str(error)
                skipped.append(f"warning: skipping unreadable image ({reason})")
                index = int(torch.randint(len(files), (1,), generator=rng))
        raise UserError(f"{tries} unreadable images in a row in {files[0].parent} (last: {reason})")


def item_seed(*key) -> int:
    """A 62-bit hash of the key: unrelated seeds for neighbouring keys."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class EpochSampler(torch.utils.data.Sampler):
    """One epoch's items: a seeded permutation (unless --serial_batches), cut to whole
    batches (official drop_last), from a given batch on. Under torchrun process r of
    w takes positions r, r + w, ... of it; every process gets as many batches."""

    def __init__(self, n_items: int, cfg: TrainConfig, epoch: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1):
        self.n_items, self.cfg, self.epoch, self.start = n_items, cfg, epoch, start_batch
        self.rank, self.world = rank, world
        self.no_crop = epoch > cfg.n_epochs and not cfg.crop_in_decay

    def __len__(self):
        batches = self.n_items // (self.cfg.batch_size * self.world)
        return (batches - self.start) * self.cfg.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(item_seed(self.cfg.seed, self.epoch))
        order = (torch.arange(self.n_items) if self.cfg.serial_batches
                 else torch.randperm(self.n_items, generator=generator))
        first = self.start * self.cfg.batch_size
        for i in range(first, first + len(self)):
            position = i * self.world + self.rank
            yield item_seed(self.cfg.seed, self.epoch, position), int(order[position]), self.no_crop


# -----------------------------------------------------------------------------
# 14. Networks and optimisers
# -----------------------------------------------------------------------------
# Every network name a mode lists in §11: what it is, and which Adam trains it.
# None: no optimiser (H_ema moves by the EMA only; a pool holds images).
NETWORK_KINDS = {
    **dict.fromkeys(("G", "G_ab", "G_ba"), ("generator", "G")),
    **dict.fromkeys(("D", "D_a", "D_b"), ("discriminator", "D")),
    **dict.fromkeys(("H", "H_a", "H_b"), ("projection head", "H")),
    **dict.fromkeys(("M_ra", "M_fb", "M_rb", "M_fa"), ("mapping head", "H")),
    **dict.fromkeys(("pool_a", "pool_b"), ("image pool", None)),
    "H_ema": ("projection head", None), "N": ("negative generator", "N")}


def domains(name: str) -> str:
    """The domains of the images a network reads (and writes), by the naming rule: a
    suffix _a, _b, _ab, _ba says it; their channels are --input_nc (a), --output_nc (b)."""
    return {"G": "ab", "D": "b", "H": "a", "H_ema": "a"}.get(name, name.partition("_")[2])


def make_generator(cfg: TrainConfig, domains: str = "ab") -> Generator:
    nc = {"a": cfg.input_nc, "b": cfg.output_nc}
    return Generator(cfg.ngf, not cfg.no_antialias, not cfg.no_antialias_up, 9, nc[domains[0]],
                     nc[domains[1]])


def fast_path(cfg: TrainConfig, device) -> bool:
    """--fast (F18): bf16 autocast, channels_last and fused Adam; auto = on CUDA."""
    return cfg.fast == "on" or (cfg.fast == "auto" and torch.device(device).type == "cuda")


def memory_layout(fast: bool):
    """channels_last (NHWC, what bf16 GPU convolutions want) under --fast; else as is."""
    return torch.channels_last if fast else torch.preserve_format


def build_networks(cfg: TrainConfig, device) -> dict:
    """The mode's networks (§11), initialised, heads sized by the tapped layers'
    channels (F5); a network that no optimiser trains gets no gradients either."""
    with torch.device("meta"):                                # shapes only: no memory, no RNG
        taps = {d: make_generator(cfg, d + d).tap_channels(cfg.layer_ids) for d in "ab"}
        probe = torch.empty(1, cfg.input_nc, cfg.crop_size, cfg.crop_size)
        smallest = min(f[0, 0].numel() for f in make_generator(cfg).encode(probe, cfg.layer_ids))
    if cfg.lambda_SIM > 0 and smallest < cfg.num_patches:    # the fewest positions h·w of a tap
        raise UserError(f"SimDCL stacks num_patches ({cfg.num_patches}) patches of every tapped "
                        f"layer, but at --crop_size {cfg.crop_size} the smallest has "
                        f"{smallest} positions: lower --num_patches or raise --crop_size")
    nc = {"a": cfg.input_nc, "b": cfg.output_nc}
    build = {"generator": lambda d: make_generator(cfg, d),
             "discriminator": lambda d: Discriminator(cfg.ndf, not cfg.no_antialias, nc[d]),
             "projection head": lambda d: ProjectionHead(taps[d], cfg.netF_nc),
             "negative generator": lambda d: NegativeGenerator(len(cfg.layer_ids), cfg.netF_nc,
                                                               count=cfg.num_patches),
             "mapping head": lambda d: MappingHead(len(cfg.layer_ids)),
             "image pool": lambda d: ImagePool(cfg.pool_size, cfg.crop_size, nc[d])}
    nets = {}
    for name in MODES[cfg.mode].networks:
        kind, family = NETWORK_KINDS[name]
        nets[name] = init_weights(build[kind](domains(name)), cfg.init_type)
        if family is None:              # H_ema: its own random init (F16), moved only by the EMA
            nets[name].requires_grad_(False)
    if cfg.lambda_perc > 0 or cfg.lambda_perc_content > 0:
        nets["vgg"] = Perceptual(cfg.vgg_weights)             # frozen: no optimiser, no checkpoint
    for name, net in nets.items():
        net.to(device, memory_format=memory_layout(fast_path(cfg, device)))
        if cfg.compile and NETWORK_KINDS.get(name, ("",))[0] in ("generator", "discriminator"):
            net.compile()               # in place: the state-dict keys stay official
    return nets


def build_optimizers(nets: dict, cfg: TrainConfig, fused: bool = False) -> dict:
    """One Adam per family of NETWORK_KINDS, no weight decay: G, D, H (all heads;
    --lr_H, --beta1_H), N (at --lr; --lr_N is never read, F16). fused: --fast."""
    params, opts = {}, {}
    for name, net in nets.items():
        family = NETWORK_KINDS.get(name, ("", None))[1]
        trained = [p for p in net.parameters() if p.requires_grad]
        if family and trained:
            params.setdefault(family, []).extend(trained)
    for family, group in params.items():
        lr = (cfg.lr_H or cfg.lr) if family == "H" else cfg.lr
        beta1 = cfg.beta1_H if family == "H" and cfg.beta1_H >= 0 else cfg.beta1
        opts[family] = torch.optim.Adam(group, lr=lr, betas=(beta1, cfg.beta2), fused=fused or None)
        opts[family].param_groups[0]["initial_lr"] = lr
    return opts


def build_training(cfg: TrainConfig, device) -> tuple:
    """What train and bench both need: (nets, optimisers, whether --fast is on)."""
    fast = fast_path(cfg, device)
    nets = build_networks(cfg, device)
    return nets, build_optimizers(nets, cfg, fused=fast), fast


# -----------------------------------------------------------------------------
# 15. The training loop
# -----------------------------------------------------------------------------
# train() runs in numbered phases: processes and device, the run folder, seeds,
# data, networks (restored when continuing), what will happen, the loop, the end.
# Its output: a one-line progress display, a JSON row per log step in log.jsonl,
# sample grids of fixed inputs, and ckpt_latest.pt, which always resumes (§16).

def lr_multiplier(epoch: int, cfg: TrainConfig) -> float:
    """Official 'linear' policy for 1-based epoch e: 1 − max(0, e − n_epochs)/(n_epochs_decay + 1).
    The last epoch runs at lr/(n_epochs_decay + 1): the schedule never reaches 0 (F6)."""
    return 1.0 - max(0, epoch - cfg.n_epochs) / (cfg.n_epochs_decay + 1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Meter:
    """Sums losses on the device, so the step never waits for the GPU; read at log steps.
    The rate runs from the end of the first step (which pays for the start: workers,
    cuDNN's autotuning, compiling) to now, steady enough for the ETA on a busy machine."""

    def __init__(self):
        self.first, self.steps = None, 0                      # end of step 1, steps since
        self.reset()

    def reset(self) -> None:
        self.sums, self.count, self.start, self.data_time = {}, 0, time.perf_counter(), 0.0

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count, self.steps = self.count + 1, self.steps + (self.first is not None)
        self.first = self.first or time.perf_counter()

    def read(self, reset: bool = True) -> tuple[dict, float, float]:
        """(mean losses, data waiting share since the last reset; steps/s since step 1)."""
        now = time.perf_counter()
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        speed = self.steps / (now - self.first) if self.steps else self.count / (now - self.start)
        waiting = self.data_time / (now - self.start)
        if reset:
            self.reset()
        return means, speed, waiting


def fixed_samples(cfg: TrainConfig, dataset: UnpairedDataset, count: int = 4) -> tuple:
    """A few test inputs (else training ones), resized to crop_size² as the test does."""
    batches, size = [], (cfg.crop_size,) * 2
    for folder, files, nc in zip(domain_folders(cfg, "test"), (dataset.files_a, dataset.files_b),
                                 (cfg.input_nc, cfg.output_nc)):
        images = [load_image(p, nc).resize(size, Image.Resampling.BICUBIC)
                  for p in (find_images(folder) or files)[:count]]  # test images, else training
        batches.append(torch.stack([to_tensor(img) for img in images]))
    return tuple(batch[:min(map(len, batches))] for batch in batches)


@torch.no_grad()
def save_samples(nets, samples, cfg, device, path: Path) -> None:
    """One row per fixed input; columns real_a | fake_b | real_b, then idt_b (CUT) or
    fake_a (two-generator modes); 2-pixel black borders, as torchvision's make_grid."""
    real_a, real_b = samples[0].to(device), samples[1].to(device)
    G = nets["G"] if "G" in nets else nets["G_ab"]
    last = [nets["G_ba"](real_b)] if "G_ba" in nets else [G(real_b)] if cfg.nce_idt else []
    grid = torch.stack([x.expand(-1, 3, -1, -1) for x in (real_a, G(real_a), real_b, *last)], 1)
    grid = F.pad(grid.float().cpu(), (2, 0, 2, 0), value=-1)  # rows×cols×3×(h+2)×(w+2), gray as RGB
    rows, cols, _, h, w = grid.shape
    image = F.pad(grid.permute(2, 0, 3, 1, 4).reshape(3, rows * h, cols * w), (0, 2, 0, 2),
                  value=-1)
    Image.fromarray(to_uint8(image)).save(path)


def write_run_info(run_dir: Path, cfg: TrainConfig, device: torch.device, argv: list) -> None:
    """config.json, and versions and this file's SHA-256 in env.txt: what made the run."""
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    code_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    with open(run_dir / "env.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  python {platform.python_version()}  "
                f"torch {torch.__version__}  cuda {torch.version.cuda}  gpu {gpu}  "
                f"dcl.py sha256 {code_hash}\n  argv: {' '.join(argv)}\n")


def open_run(cfg: TrainConfig, origin: dict, latest: Path) -> tuple:
    """(cfg, origin, stored checkpoint or None): continuing takes the stored config
    (and the flags that may change, §16); a new run may not reuse a run's folder."""
    if cfg.continue_train:
        resume = read_checkpoint(latest)
        cfg = resume_config(resume, cfg, origin, latest)
        origin = {f.name: "flag" if origin.get(f.name) == "flag" else "stored" for f in fields(cfg)}
        return cfg, origin, resume
    refuse_existing(latest)
    return cfg, origin, None


def refuse_existing(latest: Path) -> None:
    if latest.exists():
        raise UserError(f"{latest} exists: add --continue_train to continue that run, or "
                        "choose another --name (or delete that folder)")


HELD_LOCKS = {}                         # run folder -> descriptor, locked by this process


def lock_run(run_dir: Path) -> None:
    """Lock the run folder until this process ends (the system drops the lock
    even after kill -9): a second training in the same folder is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = HELD_LOCKS.get(run_dir.resolve()) or os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{run_dir} is in use by another training run (same --name and "
                        "--checkpoints_dir); wait for it, or choose another --name") from None
    HELD_LOCKS[run_dir.resolve()] = handle


def restore_run(resume: dict, latest: Path, nets: dict, opts: dict, fast: bool,
                steps_per_epoch: int, world: int) -> tuple:
    """Load a stored run's weights, optimiser states and RNG states; return
    where it stopped, (step, epoch, epoch_step), as the position to go on from."""
    for name, state in resume["nets"].items():
        load_state(nets[name], state, f"{latest} ({name})")
    for name, opt in opts.items():
        load_optimizer(opt, resume["optimizers"][name], fast)
    step, epoch, epoch_step = resume["step"], resume["epoch"], resume["epoch_step"]
    set_rng_state(resume["rng"])
    if epoch_step >= steps_per_epoch:                         # saved just as an epoch ended
        epoch, epoch_step = epoch + 1, 0
    if epoch_step and resume.get("world", 1) != world:        # the epoch's shards would change
        raise UserError(f"{latest} stopped mid-epoch with {resume.get('world', 1)} process(es): "
                        f"continue with as many (this run has {world})")
    return step, epoch, epoch_step


def batches_from(dataset, cfg: TrainConfig, epoch: int, epoch_step: int, rank: int, world: int,
                 device: torch.device):
    """The batches of the rest of the run, from one DataLoader, whose workers
    therefore outlive the epochs; each epoch's sampler tells them whether to crop."""
    items = itertools.chain.from_iterable(
        EpochSampler(len(dataset), cfg, e, epoch_step if e == epoch else 0, rank, world)
        for e in range(epoch, cfg.total_epochs + 1))
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=items, num_workers=cfg.num_threads,
        drop_last=True, pin_memory=device.type == "cuda", generator=torch.Generator()))


def next_batch(batches):
    """The next (real_a, real_b, notes), or None at the end. An error raised in a
    worker arrives as a traceback in text: only its last line is the message."""
    try:
        return next(batches, None)
    except UserError as error:
        text = str(error).strip()
        message = text.splitlines()[-1].partition(": ")[2] if "\n" in text else text
        raise UserError(message) from None


def open_log(run_dir: Path, step: int, resuming: bool):
    """log.jsonl for appending; when continuing, rows logged after the
    checkpoint (a crash, kill -9) are dropped first, since those steps rerun."""
    path = run_dir / "log.jsonl"
    if resuming and path.exists():
        rows = path.read_text().splitlines(keepends=True)
        path.write_text("".join(r for r in rows if r.strip() and json.loads(r)["step"] <= step))
    return open(path, "a")


def train(cfg: TrainConfig, origin: dict, argv: list) -> int:
    # 1. Processes and device: a plain run, or one of torchrun's processes (§20).
    rank, world, device = setup_distributed(pick_device(cfg.device))
    master = rank == 0                                        # only it prints and writes files
    say = print if master else lambda *args, **kw: None

    # 2. The run folder: a new run, or the stored config and state of the one to continue.
    run_dir = Path(cfg.checkpoints_dir) / cfg.name
    latest, sample_dir = run_dir / "ckpt_latest.pt", run_dir / "samples"
    if master and cfg.continue_train and run_dir.is_dir():
        lock_run(run_dir)               # before its checkpoint is read: no other run writes it
    cfg, origin, resume = open_run(cfg, origin, latest)

    # 3. Reproducibility: one seed gives the same initial weights in every process.
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = not cfg.deterministic
    seed_everything(cfg.seed)

    # 4. Data: whole batches only, the same number for every process.
    dataset = UnpairedDataset(cfg)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {cfg.batch_size} × {world} processes is larger than the "
                        f"dataset ({len(dataset)})")
    samples = fixed_samples(cfg, dataset)
    tests = TestSplit(cfg, device, resume) if cfg.eval_freq and master else None     # §18

    # 5. Networks and optimisers, with their stored state when continuing.
    nets, opts, fast = build_training(cfg, device)
    step, epoch, epoch_step = (0, 1, 0) if resume is None else restore_run(
        resume, latest, nets, opts, fast, steps_per_epoch, world)

    def position() -> dict:             # what ckpt_latest.pt holds besides weights and states
        return dict(step=step, epoch=epoch, epoch_step=epoch_step, world=world,
                    last=tests and tests.last, best=tests and tests.best)
    if world > 1:                                             # own patch ids, noise, flips (F19)
        seed_everything(cfg.seed + 1000 * rank + step)
        for opt in opts.values():
            opt.register_step_pre_hook(average_gradients)

    # 6. Say what will happen; record what made the run.
    if master:                          # from here on the folder is this run's, resumable
        lock_run(run_dir)
        if resume is None:              # a run started meanwhile, finished before the lock
            refuse_existing(latest)
            save_checkpoint(latest, nets, cfg, opts, position())
        sample_dir.mkdir(exist_ok=True)
        write_run_info(run_dir, cfg, device, argv)
    total_steps = min(cfg.total_epochs * steps_per_epoch, cfg.max_steps or math.inf)
    say(describe_config(cfg, origin))
    sizes = {k: sum(p.numel() for p in v.parameters()) / 1e6 for k, v in nets.items()}
    say("networks: " + ", ".join(f"{k} {n:.3f}M" for k, n in sizes.items() if n))
    batch = (f"batch {cfg.batch_size}" if world == 1 else f"batch {cfg.batch_size} per process × "
             f"{world} processes = {cfg.batch_size * world} (the papers used 1; lr not scaled)")
    say(f"data: {len(dataset.files_a)} A, {len(dataset.files_b)} B images, {steps_per_epoch} steps"
        f" per epoch, {batch}; device {device}{', bf16 fast path' * fast}; run folder {run_dir}")
    say(f"schedule: lr {cfg.lr:g} for epochs 1-{cfg.n_epochs}, then linear decay over "
        f"{cfg.n_epochs_decay} epochs{' without random crops' if not cfg.crop_in_decay else ''}; "
        f"{total_steps} steps in all" + (f", resuming at step {step}" if step else ""))
    if tests is not None:
        say(f"eval: every {cfg.eval_freq} epoch(s), {len(tests.files[0])} + {len(tests.files[1])} "
            f"test images{' (paired)' * tests.paired}; ckpt_best.pt by {tests.metric}")
    if Path(cfg.dataroot).resolve() == BUNDLED_DATA:
        say(f"Training on the bundled set in {BUNDLED_DATA} with demo settings. Watch "
            f"{sample_dir}: on 2 CPU cores the sky darkens after epoch 1 (CUT: under a minute).")

    # 7. The loop: one step per batch, until the schedule or --max_steps ends, or a signal.
    step_fn, meter = MODES[cfg.mode].step, Meter()
    amp, layout = torch.autocast(device.type, torch.bfloat16, enabled=fast), memory_layout(fast)
    log = open_log(run_dir, step, resume is not None) if master else None
    tty, last_print = sys.stdout.isatty() and master, 0.0
    stop = install_stop_handlers()
    finished, halt = bool(cfg.max_steps) and step >= cfg.max_steps, 0
    batches = batches_from(dataset, cfg, epoch, epoch_step, rank, world, device)
    try:
        while epoch <= cfg.total_epochs and not finished:
            lr_now = cfg.lr * lr_multiplier(epoch, cfg)
            for group in [group for opt in opts.values() for group in opt.param_groups]:
                group["lr"] = group["initial_lr"] * lr_multiplier(epoch, cfg)
            wait = time.perf_counter()
            if (batch := next_batch(batches)) is None:
                break
            meter.data_time += time.perf_counter() - wait
            for note in filter(None, batch[2]):               # unreadable images skipped
                print(note, file=sys.stderr)
            with amp:                                         # batch: real_a, real_b, notes
                losses = step_fn(nets, opts, *(x.to(device, non_blocking=True, memory_format=layout)
                                               for x in batch[:2]), cfg, epoch=epoch)
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
                save_samples(nets, samples, cfg, device, sample_dir / f"step_{step:07d}.png")
            if epoch_done:
                if master and epoch % cfg.save_epoch_freq == 0:
                    save_checkpoint(run_dir / f"ckpt_epoch_{epoch:03d}.pt", nets, cfg)
                    save_samples(nets, samples, cfg, device, sample_dir / f"epoch_{epoch:03d}.png")
                if tests is not None and epoch % cfg.eval_freq == 0:
                    tests.score(nets, cfg, log, step, epoch, run_dir)
                epoch, epoch_step = epoch + 1, 0
            if master and step % cfg.save_latest_freq == 0:
                save_checkpoint(latest, nets, cfg, opts, position())
            if finished or halt:
                break
    finally:
        if log is not None:
            log.close()
        stop["restore"]()
        if tty:
            print()

    # 8. The end: a checkpoint to continue from, the last samples, the command that continues.
    if master:
        save_checkpoint(latest, nets, cfg, opts, position())
        save_samples(nets, samples, cfg, device, sample_dir / "latest.png")
        resume_cmd = shlex.join(["python", "dcl.py", "train", "--name", cfg.name,
                                 "--checkpoints_dir", cfg.checkpoints_dir, "--continue_train"])
        more = "--max_steps M (or 0 for every epoch)" if cfg.max_steps else "--n_epochs N"
        print(f"stopped by signal {halt} at step {step}; checkpoint saved. Resume with:\n  "
              f"{resume_cmd}" if halt else f"done: {step} steps; checkpoint {latest}, samples in "
              f"{sample_dir}. To train longer: {resume_cmd} {more}")
        if tests is not None and tests.best:
            last, best = tests.last, tests.best
            print(f"eval ({tests.metric}): last {last['value']:.4g} at epoch {last['epoch']}; best "
                  f"{best['value']:.4g} at epoch {best['epoch']}, kept in {run_dir}/ckpt_best.pt")
    if world > 1:                       # leave together, after rank 0 saved: torchrun stops every
        dist.barrier()                  # process once one ends, and gloo may abort a lone teardown
    return 128 + halt if halt and master else 0


def report(meter, log, cfg, step, epoch, epoch_step, steps_per_epoch, total_steps, lr_now,
           device, tty, log_now) -> None:
    """The progress line (in place on a terminal) and, at log steps, a JSON row."""
    first = step - meter.count + 1
    means, speed, waiting = meter.read(reset=log_now)         # a terminal refresh only peeks
    if bad := [k for k, v in means.items() if not math.isfinite(v)]:  # before every checkpoint
        raise UserError(f"loss {bad[0]} became {means[bad[0]]} in steps {first}-{step} (epoch "
                        f"{epoch}); the last checkpoint was kept. Lower --lr or check the data")
    losses = " ".join(f"{k} {v:.3f}" for k, v in means.items())
    memory = (f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
              if device.type == "cuda" else "")
    eta = datetime.timedelta(seconds=int((total_steps - step) / speed))
    line = (f"[{cfg.mode}] ep {epoch}/{cfg.total_epochs} it {epoch_step}/{steps_per_epoch} | "
            f"{speed:.2f} it/s | eta {eta} | lr {lr_now:.1e} | {losses}"
            + (f" | data {waiting:.0%}" if waiting > 0.1 else "") + memory)
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
    """Ctrl-C/SIGTERM: stop after this step and save; twice: at once. stop["restore"]()."""
    stop = {"signal": 0, "restore": lambda: None}

    def handler(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signum
    with contextlib.suppress(ValueError):                     # not the main thread (e.g. in a test)
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        stop["restore"] = lambda: [signal.signal(s, h) for s, h in old.items()]
    return stop


# -----------------------------------------------------------------------------
# 16. Checkpoints
# -----------------------------------------------------------------------------
# One file holds a run: every network and optimiser state, the counters, the RNG
# states and the config (official: one weights file per network, F10), written
# atomically and loaded with weights_only=True, so it never runs code. Continuing
# may change only the settings in RESUMABLE; translate rebuilds G from the config.

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "dcl.py checkpoint", 1
RESUMABLE = set("n_epochs n_epochs_decay max_steps device num_threads print_freq display_freq "
                "save_latest_freq save_epoch_freq continue_train deterministic checkpoints_dir "
                "dataroot vgg_weights fast compile eval_freq inception_weights".split())


def rng_state() -> dict:
    """torch's generators only: nothing here draws from Python's or numpy's (F3)."""
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"torch": torch.get_rng_state(), **cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
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
        with open(path, "rb") as f:                          # torch.save writes a zip archive
            if f.read(2) not in (b"PK", b"\x80\x02"):           # (before PyTorch 1.6: a pickle)
                raise UserError(f"{path} is not a checkpoint (torch.save did not write it)")
        text = str(error).strip()
        reason = text.splitlines()[0][:120] if text else type(error).__name__
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


def resume_config(ckpt: dict, cfg: TrainConfig, origin: dict, path: Path) -> TrainConfig:
    """The stored config, with only schedule and plumbing flags changeable."""
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizers" not in ckpt:
        raise UserError(f"{path} is not a resumable dcl.py checkpoint")
    stored = stored_config(ckpt, path)
    typed = [flag for flag in origin if origin[flag] == "flag"]
    for flag in typed:
        if flag not in RESUMABLE and getattr(cfg, flag) != getattr(stored, flag):
            raise UserError(f"--{flag} cannot change when continuing {path} "
                            f"(stored: {getattr(stored, flag)}); only "
                            f"{', '.join(sorted(RESUMABLE - {'continue_train'}))} can")
    cfg = dataclasses.replace(stored, **{f: getattr(cfg, f) for f in typed if f in RESUMABLE})
    cfg.validate()
    return cfg


# -----------------------------------------------------------------------------
# 17. Translate and test
# -----------------------------------------------------------------------------
# G is fully convolutional, so it translates any size: reflect-pad to a
# multiple of 4 (two halvings and two doublings), translate, crop back (F8).

def load_generator(path, mode: str | None, direction: str, device) -> tuple:
    """(G, its config): a trained G from a dcl.py checkpoint (--direction: G_ab or G_ba), or
    an official state dict (`latest_net_G.pth`, ...; CPU runs save `module.` keys) and --mode."""
    ckpt = {k.removeprefix("module."): v for k, v in read_checkpoint(path).items()}  # DataParallel
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        mode, cfg, nets = ckpt["mode"], stored_config(ckpt, path), ckpt["nets"]
        if direction == "BtoA" and "G_ba" not in nets:
            raise UserError(f"{path} is a {mode} checkpoint with one generator (A to B); it cannot "
                            "translate BtoA. Train with --direction BtoA for the other way")
        name = "G" if "G" in nets else "G_ba" if direction == "BtoA" else "G_ab"
        state, sides = nets[name], domains(name)
    elif "model.1.weight" in ckpt:
        if mode is None:
            raise UserError(f"{path} is an official state dict: say which method made it with "
                            f"--mode ({', '.join(MODES)})")
        state, sides = ckpt, "ab"                             # the file picks the direction
        last = max(int(k.split(".")[1]) for k in state if k.startswith("model."))
        cfg = TrainConfig(**{**MODES[mode].preset, "mode": mode, "ngf": state["model.1.weight"]
                             .shape[0], "input_nc": state["model.1.weight"].shape[1],
                             "output_nc": state[f"model.{last}.weight"].shape[0]})
    else:
        raise UserError(f"{path} is neither a dcl.py checkpoint nor an official generator "
                        "state dict")
    G = make_generator(cfg, sides)
    load_state(G, state, str(path))
    return G.to(device).eval(), cfg


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """C×h×w in [−1, 1] -> h×w×C (1 channel: h×w) uint8 as the official tensor2im:
    (x + 1)/2·255, truncated."""
    array = (image.float().clamp(-1, 1).cpu().numpy().transpose(1, 2, 0) + 1) / 2.0 * 255.0
    return array.astype(np.uint8).squeeze(2) if len(image) == 1 else array.astype(np.uint8)


def output_paths(files: list, input_path: Path, output: Path) -> list:
    """One PNG per input, at its path relative to the input folder; x.jpg and
    x.png side by side become x.jpg.png and x.png.png, so neither overwrites."""
    relative = [p.relative_to(input_path) if input_path.is_dir() else Path(p.name) for p in files]
    targets = [r.with_suffix(".png") for r in relative]
    clashes = {t for t, c in Counter(targets).items() if c > 1}
    return [output / (r.with_name(r.name + ".png") if t in clashes else t)
            for r, t in zip(relative, targets)]


def translate(args) -> int:
    device, input_path, output = pick_device(args.device), Path(args.input), Path(args.output)
    if not input_path.exists():
        raise UserError(f"--input {input_path} does not exist")
    files = [input_path] if input_path.is_file() else find_images(input_path, least=1)
    if input_path.is_dir() and output.resolve() == input_path.resolve():
        raise UserError(f"--output {output} is the input folder; choose another")
    G, cfg = load_generator(args.checkpoint, args.mode, args.direction, device)
    if args.mode not in (None, cfg.mode):
        print(f"note: --mode {args.mode} ignored: {args.checkpoint} holds a {cfg.mode} model")
    start = time.perf_counter()
    translate_files(G, files, input_path, output, device, args.resize)
    rate = len(files) / (time.perf_counter() - start)
    print(f"translated {len(files)} image{'s' * (len(files) != 1)} into {output} "
          f"({rate:.2f} images/s, reading and writing included)")
    return 0


def run_test(cfg: TrainConfig, origin: dict, args) -> int:
    """test, as the official test.py: the run's G (dcl.py checkpoint or official weights; a
    --direction other than the run's: G_ba) translates DATAROOT/<phase>A (the run's unless
    typed) at crop_size² (--preprocess none: native) into .../fake_B, beside real_A, real_B."""
    run, epoch = Path(cfg.checkpoints_dir) / cfg.name, args.epoch
    ours = run / (f"ckpt_epoch_{int(epoch):03d}.pt" if epoch.isdigit() else f"ckpt_{epoch}.pt")
    names = (ours, run / f"{epoch}_net_G.pth", run / f"{epoch}_net_G_A.pth")
    if not (found := [p for p in names if p.is_file()]):
        raise UserError(f"--epoch {epoch}: none of {', '.join(p.name for p in names)} in {run}")
    device = pick_device(cfg.device)
    G, stored = load_generator(found[0], cfg.mode, "AtoB", device)
    if origin.get("direction") == "flag" and cfg.direction != stored.direction:
        G = load_generator(found[0], cfg.mode, "BtoA", device)[0]
    typed = {k: getattr(cfg, k) for k in ("crop_size", "direction", "dataroot")
             if origin.get(k) == "flag"}
    stored = dataclasses.replace(stored, **typed)
    out = Path(args.results_dir) / cfg.name / f"{args.phase}_{epoch}" / "images"
    resize = 0 if args.preprocess == "none" else stored.crop_size
    folder_a, folder_b = domain_folders(stored, args.phase)
    ins, outs = G.model[1].in_channels, G.model[-2].out_channels  # the reals as G sees them
    for visual, net, folder, nc in (("real_A", nn.Identity(), folder_a, ins), (
            "fake_B", G, folder_a, 0), ("real_B", nn.Identity(), folder_b, outs)):
        files = find_images(folder, 1, f" (--phase {args.phase})")[:max(args.num_test, 0) or None]
        translate_files(net, files, folder, out / visual, device, resize, nc)
        print(f"{visual}: {len(files)} images into {out / visual}")
    print(f"FID, KID: python dcl.py eval --fake {out / 'fake_B'} --real {out / 'real_B'}")
    return 0


@torch.no_grad()
def translate_files(G, files: list, input_path: Path, output: Path, device, resize: int = 0,
                    channels: int = 0) -> None:
    """Each file through G (channels: of its input; 0: read off G), resized to resize²
    first if given (the official test: bicubic), written as a PNG under output."""
    channels = channels or G.model[1].in_channels
    for path, target in zip(files, output_paths(files, input_path, output)):
        img = load_image(path, channels)
        img = img.resize((resize, resize), Image.Resampling.BICUBIC) if resize else img
        x = to_tensor(img)[None].to(device)                   # 1×C×h×w
        h, w = x.shape[2:]
        if min(h, w) < 8:
            raise UserError(f"{path} is {w}x{h}; images need at least 8 pixels per side")
        x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")  # to a multiple of 4
        try:
            translated = G(x)[0, :, :h, :w]
        except RuntimeError as error:                         # torch.OutOfMemoryError included
            if "memory" not in str(error) and "alloc" not in str(error):
                raise
            raise UserError(f"{path} ({w}x{h}) does not fit in {device} memory: shrink it, "
                            "use --resize N, or another --device") from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(translated)).save(target)
        except OSError as error:
            raise UserError(f"cannot write {target}: {error.strerror or error}") from None


# -----------------------------------------------------------------------------
# 18. Evaluation: FID, KID and paired scores
# -----------------------------------------------------------------------------
# The papers report FID, the Fréchet distance between Gaussians fitted to Inception-v3 pool
# features of the translated and of the real target test images, as the pytorch-fid package
# computes it (its network and weights, 2048-d, 299² bilinear); another network or resize gives an
# incomparable number. Below 2,048 images FID is biased upwards; KID, unbiased, stands beside it. A
# paired test split (testA/x and testB/x one scene, as in the bundled data) also gives PSNR and
# MAE, with no weights file. Papers report the best score seen during training (train --eval_freq
# keeps that checkpoint), not the last.

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"         # pytorch-fid's weights file
FID_GET = "pip install pytorch-fid and run `python -m pytorch_fid DIR1 DIR2` on any two folders"
FID_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
              "Mixed_7b", "Mixed_7c")


def local_weights(given: str, name: str, user: str, flag: str, recipe: str) -> Path | None:
    """The weights file `name`: the path given with `flag`, else torch hub's cache
    (torchvision's and pytorch-fid's); None for 'random'. Never downloaded."""
    path = Path(given) if given else Path(torch.hub.get_dir()) / "checkpoints" / name
    if given != "random" and not path.is_file():
        raise UserError(f"{user}: no {name} at {path}. Nothing is downloaded: on a networked "
                        f"machine {recipe} once, then copy it to {path.parent} or pass {flag} PATH")
    return None if given == "random" else path


def tf_pooled(block: nn.Module, pool: Callable, x: torch.Tensor) -> torch.Tensor:
    """A torchvision Inception block whose pooling branch pools as the TensorFlow
    graph of the FID weights does (the block's own pooled branch is dropped)."""
    return torch.cat(block._forward(x)[:-1] + [block.branch_pool(pool(x))], 1)


class FIDInception(nn.Module):
    """pytorch-fid's Inception-v3, images -> N×2048 float64 features: torchvision's
    with 1,008 classes and pytorch-fid's changes: the A, C and first E blocks
    average-pool over pixels inside the image only (as TensorFlow pads), the last
    E block max-pools. Each image (3×h×w in [0, 1], any size) is resized to 299²
    bilinearly (align_corners=False) and mapped to [−1, 1], 50 at a time."""

    def __init__(self, weights: str):
        super().__init__()
        from torchvision.models import inception_v3
        path = local_weights(weights, FID_FILE, "FID and KID", "--inception_weights", FID_GET)
        with torch.random.fork_rng(devices=[]):               # leaves the training RNG as it was
            self.net = inception_v3(num_classes=1008, aux_logits=False, init_weights=False)
        pools = (partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False),
                 partial(F.max_pool2d, kernel_size=3, stride=1, padding=1))
        for name in FID_BLOCKS:
            block = getattr(self.net, name)
            block.forward = partial(tf_pooled, block, pools[name == "Mixed_7c"])
        if path is not None:
            load_state(self.net, read_checkpoint(path), f"{path} (Inception-v3)")
        self.net.fc = nn.Identity()                           # the features, not the classes
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images, batch: int = 50) -> torch.Tensor:
        device, images, features = next(self.parameters()).device, iter(images), []
        while chunk := list(itertools.islice(images, batch)):
            x = torch.cat([F.interpolate(x[None].to(device), size=(299, 299), mode="bilinear",
                                         align_corners=False) for x in chunk])
            features.append(self.net(2 * x - 1).double().cpu())
        return torch.cat(features)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr (Σ1 Σ2)^½ of N×d features, in float64,
    covariances over N − 1. Σ1 Σ2 has the eigenvalues of the symmetric Σ1^½ Σ2 Σ1^½:
    tr (Σ1 Σ2)^½ = Σ √eig, rounding's negative eigenvalues (rank-deficient Σ) as 0."""
    f1, f2 = f1.double(), f2.double()
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T       # Σ1^½
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()
    return float((f1.mean(0) - f2.mean(0)).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def kernel_inception_distance(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 100,
                              size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID, the unbiased MMD² with k(x, y) = (x·y/d + 1)³ on random subsets of
    m = min(size, N1, N2) features per side (without replacement), (mean, std):
      MMD² = Σ_{i≠j} k(x_i, x_j)/(m(m − 1)) + Σ_{i≠j} k(y_i, y_j)/(m(m − 1))
             − 2·Σ_{i,j} k(x_i, y_j)/m²   (two sets of m images: std 0)"""
    f1, f2 = f1.double(), f2.double()
    m, generator, values = min(size, len(f1), len(f2)), torch.Generator().manual_seed(seed), []
    kxx, kyy, kxy = ((a @ b.T / f1.shape[1] + 1) ** 3 for a, b in ((f1, f1), (f2, f2), (f1, f2)))
    for _ in range(subsets):                                  # subsets index the kernels once made
        i, j = (torch.randperm(len(f), generator=generator)[:m] for f in (f1, f2))
        xx, yy, xy = kxx[i][:, i], kyy[j][:, j], kxy[i][:, j]
        values.append((xx.sum() - xx.trace() + yy.sum() - yy.trace()) / (m * (m - 1))
                      - 2 * xy.mean())
    return float(torch.stack(values).mean()), float(torch.stack(values).std(unbiased=False))


def paired_scores(pairs) -> dict:
    """Each (fake, real) pair of 3×h×w images in [0, 1] scored, then averaged over
    pairs: PSNR = 10·log10(1/MSE) dB (peak 1, at most 100) and MAE = mean|fake − real|."""
    errors = [fake.double() - real.double() for fake, real in pairs]
    psnr = [10 * math.log10(1 / max(float(e.square().mean()), 1e-10)) for e in errors]
    return dict(psnr=sum(psnr) / len(psnr), mae=sum(float(e.abs().mean()) for e in errors)
                / len(errors))


def unit_image(path: Path, size: tuple | None = None) -> torch.Tensor:
    """An image file -> 3×h×w in [0, 1], resized (bicubic) to size = (w, h) if given."""
    img = load_image(path)
    img = img.resize(size, Image.Resampling.BICUBIC) if size not in (None, img.size) else img
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def score_folders(fake_dir: Path, real_dir: Path, paired: bool, net: FIDInception | None,
                  real_features: torch.Tensor | None = None) -> dict:
    """FID and KID of the images below fake_dir against real_dir's (with a network);
    if paired, PSNR and MAE against the real of the same name, at the fake's size."""
    fakes, reals = (find_images(d, 2, f" ({what}; FID and KID need 2 or more)")
                    for d, what in ((fake_dir, "fakes"), (real_dir, "reals")))
    scores = dict(n_fake=len(fakes), n_real=len(reals))
    if paired:
        by_name = {p.relative_to(real_dir).with_suffix(""): p for p in reals}
        names = [p.relative_to(fake_dir).with_suffix("") for p in fakes]
        if missing := [str(n) for n in names if n not in by_name]:
            raise UserError(f"--paired: {len(missing)} of {len(fakes)} images in {fake_dir} have "
                            f"no counterpart of the same name in {real_dir}, e.g. {missing[0]}")
        scores.update(paired_scores((x, unit_image(by_name[n], x.shape[:0:-1]))
                                    for x, n in zip(map(unit_image, fakes), names)))
    if net is not None:
        fake_features = net(map(unit_image, fakes))
        real_features = net(map(unit_image, reals)) if real_features is None else real_features
        kid, kid_std = kernel_inception_distance(fake_features, real_features)
        scores.update(fid=frechet_distance(fake_features, real_features), kid=kid, kid_std=kid_std)
    return scores


def evaluate(args) -> int:
    """eval: a JSON line on stdout, a readable one on stderr; --paired needs no weights."""
    try:
        net, note = FIDInception(args.inception_weights).to(pick_device(args.device)), ""
    except UserError as error:
        if not args.paired or not str(error).startswith("FID and KID:"):
            raise
        net, note = None, f" (no FID, KID: {error})"
    scores = score_folders(Path(args.fake), Path(args.real), args.paired, net)
    print(json.dumps(scores), flush=True)
    print(" ".join(f"{k} {v:.4g}" for k, v in scores.items()) + note, file=sys.stderr)
    return 0


class TestSplit:
    """The test split scored during training (--eval_freq) as the official test and
    eval would: each G translates its test folder at crop_size² into run_dir/eval/,
    scored against the other (PSNR and MAE if paired: the same names both sides).
    Continuing a run (resume: its checkpoint), it goes on from the stored scores."""

    def __init__(self, cfg: TrainConfig, device: torch.device, resume: dict | None = None):
        self.folders = domain_folders(cfg, "test")
        self.files = [find_images(f, 2, " (--eval_freq needs 2 or more test images per domain)")
                      for f in self.folders]
        names = [[p.relative_to(f).with_suffix("") for p in fs]
                 for f, fs in zip(self.folders, self.files)]
        self.paired, self.device = names[0] == names[1], device
        self.last, self.best = (resume or {}).get("last"), (resume or {}).get("best")
        if cfg.eval_metric == "psnr" and not self.paired:
            raise UserError(f"--eval_metric psnr: the test split in {cfg.dataroot} is not paired "
                            "(testA and testB file names differ)")
        try:
            self.net = FIDInception(cfg.inception_weights).to(device)
        except UserError:               # no weights in the cache: paired scores only, if paired
            if cfg.inception_weights or cfg.eval_metric in ("fid", "kid") or not self.paired:
                raise
            self.net = None
        self.metric = {"auto": "fid" if self.net else "psnr"}.get(cfg.eval_metric, cfg.eval_metric)
        self.real = [self.net(map(unit_image, fs)) if self.net else None for fs in self.files]

    def score(self, nets: dict, cfg: TrainConfig, log, step: int, epoch: int, run_dir: Path):
        """Score each direction, log the scores, keep ckpt_best.pt by the metric of A to B."""
        scores = {}
        for suffix, name, source in (("", "G" if "G" in nets else "G_ab", 0), ("_BtoA", "G_ba", 1)):
            if name in nets:
                out = run_dir / "eval" / ("BtoA" if suffix else "AtoB")
                translate_files(nets[name], self.files[source], self.folders[source], out,
                                self.device, resize=cfg.crop_size)
                scores.update({k + suffix: v for k, v in score_folders(
                    out, self.folders[1 - source], self.paired, self.net,
                    self.real[1 - source]).items() if not k.startswith("n_")})
        log.write(json.dumps(dict(step=step, epoch=epoch, eval=scores)) + "\n")
        log.flush()
        self.last = dict(metric=self.metric, value=scores[self.metric], epoch=epoch)
        sign, best = 1 if self.metric == "psnr" else -1, self.best or {}     # PSNR: higher wins
        if best.get("metric") != self.metric or sign * self.last["value"] > sign * best["value"]:
            self.best = self.last
            save_checkpoint(run_dir / "ckpt_best.pt", nets, cfg)
        print(f"eval at epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in scores.items())
              + f"; best {self.metric} {self.best['value']:.4g} at epoch {self.best['epoch']}",
              flush=True)


# -----------------------------------------------------------------------------
# 19. Bench
# -----------------------------------------------------------------------------
# Times the real training step (MODES[mode].step, under train's autocast) on random batches: no
# data loading, warm-up steps (cuDNN autotuning, compilation), then timed steps between
# synchronisations. torch.utils.flop_counter counts the FLOPs of the first step; the device's
# matmul rate, measured here, is the ceiling.

def matmul_tflops(device: torch.device, sync) -> tuple[float, str]:
    """Measured matrix-multiply rate (n×n @ n×n is 2n³ operations): bf16 on a GPU,
    the ceiling of --fast; fp32 on a CPU, which has no fast bf16 kernels."""
    size, reps, dtype = (8192, 20, torch.bfloat16) if device.type == "cuda" else (1024, 5,
                                                                                  torch.float32)
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
        nets, opts, fast = build_training(cfg, device)
        real_a, real_b = (torch.rand(cfg.batch_size, 3, cfg.crop_size, cfg.crop_size, device=device)
                          .mul(2).sub(1).to(memory_format=memory_layout(fast)) for _ in "ab")

        def run():        # one autocast region per step, as in train: it caches bf16 weight copies
            with torch.autocast(device.type, torch.bfloat16, enabled=fast):
                return MODES[mode].step(nets, opts, real_a, real_b, cfg)
        with FlopCounterMode(display=False) as flops:
            run()
        for _ in range(warmup):
            run()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            losses = run()
        sync()
        seconds, tflop = (time.perf_counter() - start) / steps, flops.get_total_flops() / 1e12
        if not all(math.isfinite(float(v)) for v in losses.values()):
            raise UserError(f"bench {mode}: a loss is not finite")
        row = dict(mode=mode, device=torch.cuda.get_device_name(device) if cuda else "cpu",
                   torch=torch.__version__, batch_size=cfg.batch_size, crop_size=cfg.crop_size,
                   fast=fast, compile=cfg.compile, s_per_iter=seconds,
                   images_per_s=cfg.batch_size / seconds, tflop_per_iter=tflop,
                   tflops=tflop / seconds, matmul_tflops=ceiling, matmul_dtype=dtype,
                   peak_memory_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None)
        row = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}
        print(f"{mode:<10} {seconds:.4f} s/iter {row['images_per_s']:8.2f} images/s  "
              f"{tflop:.4g} TFLOP/iter {tflop / seconds:.4g} TFLOP/s = "
              f"{tflop / seconds / ceiling:.0%} of {dtype} matmul", file=sys.stderr)
        print(json.dumps(row), flush=True)
    return 0


# -----------------------------------------------------------------------------
# 20. torchrun
# -----------------------------------------------------------------------------
# `torchrun --nproc_per_node=N dcl.py train ...` runs N copies of this program, each with RANK,
# LOCAL_RANK and WORLD_SIZE in its environment (F19). They build the same networks from one seed,
# each takes its share of every epoch (§13) and draws its own patch ids, noise and flips; gradients
# are averaged before every optimiser step, so the weights stay identical. Only rank 0 prints and
# writes.

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
    """Before every optimiser step under torchrun, each gradient becomes its mean over
    the processes (one flat all-reduce): DDP's arithmetic without its wrapper, whose
    one-forward-per-backward rule the GAN steps break; StyleGAN2-ADA does the same."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads]).div_(dist.get_world_size())
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


# -----------------------------------------------------------------------------
# 21. Command line
# -----------------------------------------------------------------------------
# train, test and bench get one flag per TrainConfig field, generated from the dataclass, with
# the official spelling; translate and eval have their own few. Official command lines run too:
# --model (with --CUT_mode, --NEGCUT_mode) picks --mode, --gpu_ids the --device; OFFICIAL holds
# the one value implemented of other official flags (argparse refuses others), IGNORED the rest.

OFFICIAL_MODELS = {"cut": "cut", "negcut": "negcut", "dcl": "dcl", "simdcl": "simdcl",
                   "cycle_gan": "cyclegan", "qs": "cut"}    # qs: QS-Attn, CUT with its patches
OFFICIAL = dict(                        # the one value dcl.py implements: the official default
    netG="resnet_9blocks", netD="basic", normG="instance", normD="instance", n_layers_D="3",
    lr_policy="linear", dataset_mode="unaligned", init_gain="0.02", no_dropout="true",
    QS_mode="global", phase="train", preprocess="resize_and_crop", epoch="latest",
    netF="mlp_sample")
IGNORED = ("display_id display_port display_server display_env display_ncols display_winsize "
           "update_html_freq no_html verbose suffix easy_label save_by_iter epoch_count "
           "lr_decay_iters evaluation_freq eval").split()   # display, HTML, naming: no use here
GROUPS = dict(mode="method", dataroot="data", ngf="model", gan_mode="losses", lambda_perc=
              "extensions", nce_loss="successors of PatchNCE (§8)", n_epochs="optimisation",
              name="run", eval_freq="evaluation (§18)")


class Parser(argparse.ArgumentParser):
    def error(self, message):                                 # one line, exit 2, no usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_bool(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")


def add_config_flags(sub: argparse.ArgumentParser, modes: tuple, mode: str) -> None:
    """One flag per config field, named as officially, in GROUPS; booleans: --f, --f true,
    --f false. The defaults shown are those of `mode` (the --mode typed, else cut)."""
    for f in fields(TrainConfig):
        group = sub.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        preset, text = MODES[mode].preset, f.metadata["help"]
        shown = f" (default {preset.get(f.name, f.default)!r}{f' in {mode}' * (f.name in preset)})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text + shown * ("default" not in
                                                                               text))
        if isinstance(f.default, bool):
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            kw.update(type=type(f.default),
                      choices=modes if f.name == "mode" else f.metadata.get("choices"))
        group.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kw)


def add_official_flags(sub: argparse.ArgumentParser, own: tuple = ()) -> None:
    """The flags of OFFICIAL (other values: refused by argparse) and IGNORED, but
    those the command has itself; --help sums them up under --model."""
    fixed = {k: v for k, v in OFFICIAL.items() if k not in own}
    group, hidden = sub.add_argument_group("official flags"), dict(default=argparse.SUPPRESS,
                                                                   help=argparse.SUPPRESS)
    group.add_argument("--model", type=str.lower, choices=tuple(OFFICIAL_MODELS), metavar="MODEL",
                       default=argparse.SUPPRESS, help=f"{'|'.join(OFFICIAL_MODELS)} (with "
                       "--CUT_mode, --NEGCUT_mode) sets --mode; --gpu_ids -1|N sets --device; "
                       "accepted as " + ", ".join(f"--{k} {v}" for k, v in fixed.items())
                       + "; ignored: --" + " --".join(IGNORED))
    group.add_argument("--CUT_mode", type=str.lower, choices=("cut", "fastcut"), **hidden)
    group.add_argument("--NEGCUT_mode", type=str.lower, choices=("negcut", "fastnegcut"), **hidden)
    group.add_argument("--gpu_ids", **hidden)
    for name, value in fixed.items():
        group.add_argument(f"--{name}", type=str.lower, choices=(value,), nargs="?", **hidden)
    for name in IGNORED:
        group.add_argument(f"--{name}", dest=f"ignored_{name}", nargs="?", **hidden)


def official_flags(args: argparse.Namespace, flags: dict) -> None:
    """Turn the official --model (--CUT_mode, --NEGCUT_mode) and --gpu_ids typed into
    dcl.py's --mode and --device in `flags`, and say which flags are ignored."""
    model = getattr(args, "model", "negcut" if hasattr(args, "NEGCUT_mode") else None)
    variant = getattr(args, {"negcut": "NEGCUT_mode"}.get(model, "CUT_mode"), None)
    mode = variant if model in (None, "cut", "negcut") and variant else OFFICIAL_MODELS.get(model)
    if mode and flags.setdefault("mode", mode) != mode:
        raise UserError(f"--model {model or 'cut'}{f' ({variant})' * bool(variant)} is --mode "
                        f"{mode}, not --mode {flags['mode']}")
    if model == "qs" or hasattr(args, "QS_mode"):            # QS-Attn's train.py: --model qs
        flags.setdefault("patch_select", "qsattn")
    ids = getattr(args, "gpu_ids", "")
    if "," in ids:
        raise UserError(f"--gpu_ids {ids}: one process per GPU here: torchrun "
                        f"--nproc_per_node={ids.count(',') + 1} dcl.py train ... (README)")
    if ids:
        flags.setdefault("device", "cpu" if ids.startswith("-") else f"cuda:{ids}")
    if ignored := [f"--{k[8:]}" for k in vars(args) if k.startswith("ignored_")]:
        print(f"note: ignored {' '.join(ignored)} (no display, HTML, name suffix or resume "
              "bookkeeping here)", file=sys.stderr)


def build_parser(mode: str = "cut") -> argparse.ArgumentParser:
    parser = Parser(prog="dcl.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True,  # flags never abbreviate
                                     parser_class=partial(Parser, allow_abbrev=False))
    examples = "examples:\n" + __doc__.split("Commands\n")[1].split("\n\n")[0]
    train = commands.add_parser("train", help="train a model (see --mode)", epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--mode MODE] [--dataroot DIR] [flag ...]")
    bench = commands.add_parser("bench", help="time the training step of a mode or all "
                                "(random batches; default batch 1 at 256x256)")
    te = commands.add_parser("test", help="as the official test.py: a run's test split into "
                             "results_dir/name/ (the run's own flags are accepted)")
    for sub, modes in ((train, tuple(MODES)), (bench, (*MODES, "all")), (te, tuple(MODES))):
        add_config_flags(sub, modes, mode)
    add_official_flags(train)
    bench.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    tr = commands.add_parser("translate", help="translate an image or a folder with a trained G")
    tr.add_argument("--checkpoint", required=True, help="dcl.py checkpoint or official *_net_G.pth")
    tr.add_argument("--input", required=True, help="an image, or a folder (searched recursively)")
    tr.add_argument("--output", required=True, help="results folder (PNGs, relative paths kept)")
    tr.add_argument("--mode", choices=tuple(MODES), help="the method of an official state dict")
    tr.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB")
    tr.add_argument("--resize", type=int, default=0, help="resize to this square first (256: the "
                    "official test protocol; 0: native size)")
    te.add_argument("--results_dir", default="./results", help="where results/name/ is made")
    te.add_argument("--num_test", type=int, default=0, help="the first N (0, <0: all; official 50)")
    te.add_argument("--phase", default="test", help="DATAROOT/<phase>A and <phase>B")
    te.add_argument("--epoch", default="latest", help="latest, best, N (or official N_net_G.pth)")
    te.add_argument("--preprocess", default="resize_and_crop", choices=("resize_and_crop", "none"),
                    help="resize to crop_size² (official), or none: native size")
    add_official_flags(te, own=("phase", "epoch", "preprocess"))
    ev = commands.add_parser("eval", help="FID and KID of two folders (pytorch-fid's protocol)")
    ev.add_argument("--fake", required=True, help="translated images (searched recursively)")
    ev.add_argument("--real", required=True, help="real images of the target domain")
    ev.add_argument("--paired", action="store_true", help="also PSNR, MAE against same-name reals")
    ev.add_argument("--inception_weights", default="", help=f"{FID_FILE} ('random': for tests)")
    for sub in (tr, ev):
        sub.add_argument("--device", default="auto")
    return parser


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode = argv[argv.index("--mode") + 1] if "--mode" in argv[:-1] else "cut"
    args = build_parser(mode if mode in MODES else "cut").parse_args(argv)
    try:
        if args.command in ("translate", "eval"):
            return translate(args) if args.command == "translate" else evaluate(args)
        flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if hasattr(args, f.name)}
        if args.command == "bench":
            if args.steps < 1 or args.warmup < 0:
                raise UserError("bench needs --steps 1 or more and --warmup 0 or more")
            mode = flags.pop("mode", "cut")
            return bench(flags, [m for m in MODES if mode in ("all", m)], args.steps, args.warmup)
        official_flags(args, flags)
        cfg, origin = resolve_config(flags)
        if args.command == "test":
            return run_test(cfg, origin, args)
        return train(cfg, origin, ["dcl.py"] + argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():                             # joined by a torchrun train
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
