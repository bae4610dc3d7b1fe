"""Reconstruction losses for decoders of the reference world's scenes.

Digits cover about 5-25 % of a scene; with uniform weights a small decoder
first learns the plain background and blurs thin strokes away, and a stroke
drawn at less than half its contrast is, for the pixel check, a break: one
digit read as two blobs. Pixels of ink (far from the scene's background
colour) weigh more.
"""
from __future__ import annotations

import torch

INK_WEIGHT = 4.0
INK_THRESHOLD = 0.15  # |pixel - background| (max over channels, in [0, 1]) counted as ink


def ink_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W) for images in [0, 1]: 1 on the background, 1 + INK_WEIGHT on ink.
    A scene's background is plain and covers most of it, so the per-channel median is its colour."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    ink = ((x - bg).abs().amax(dim=1, keepdim=True) > INK_THRESHOLD).float()
    return 1 + INK_WEIGHT * ink


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Ink-weighted MSE + L1 for images in [0, 1]. MSE for colour fidelity plus L1, whose constant
    gradient keeps pushing faint, half-drawn strokes to full contrast (MSE alone settles on blur)."""
    w = ink_weights(x)
    return ((rec - x) ** 2 * w).mean() + 0.5 * ((rec - x).abs() * w).mean()


INK_EDGE = 0.05  # softness of the soft ink mask, as a share of the scene's ink contrast


def ink_mask_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between a soft ink mask of ``rec`` and the ink mask of ``x`` (images in
    [0, 1]), both taken at half of ``x``'s ink contrast from its background colour, where the pixel
    check draws the line (factory.world.pixel_counter.ink_mask). A stroke a decoder draws at 40 %
    of its contrast costs little in MSE, yet the check reads it as a gap and the digit as two
    blobs; this term puts the loss where that line is crossed."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    dist_x = (x - bg).norm(dim=1)
    dist_r = (rec - bg).norm(dim=1)
    contrast = torch.quantile(dist_x.flatten(1), 0.995, dim=1).clamp(min=0.2)[:, None, None]
    target = (dist_x > 0.5 * contrast).float()
    logits = (dist_r - 0.5 * contrast) / (INK_EDGE * contrast)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
