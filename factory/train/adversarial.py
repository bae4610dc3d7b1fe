"""A patch-adversarial term for sharp decoders, as Stable Diffusion's autoencoder uses.

Pixel losses (L1/L2) average over what a decoder is unsure of, and on the
reference world that average is a faint, thin stroke that the pixel check
reads as two blobs, or a speckled background. A PatchGAN discriminator
(pix2pix; taming-transformers' ``NLayerDiscriminator``) judges each patch as
real or decoded, and the decoder is pushed toward patches with flat
backgrounds and solid strokes. The generator term is weighted adaptively
against the reconstruction loss by the ratio of their gradients at the
decoder's last layer (Esser et al. 2021), so neither swamps the other.

No pretrained perceptual network (LPIPS's VGG) is reachable offline; the
patch discriminator needs none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Conv stack with one logit per patch (receptive field 22 px at depth 3: about one digit)."""

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = width
        for i in range(1, depth):
            out = width * min(2 ** i, 4)
            stride = 2 if i < depth - 1 else 1
            layers += [nn.Conv2d(c, out, 4, stride, 1), nn.GroupNorm(8, out), nn.LeakyReLU(0.2, True)]
            c = out
        layers += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor, cap: float = 1e4) -> torch.Tensor:
    """||grad rec|| / ||grad g|| at the decoder's last weights (taming's calculate_adaptive_weight)."""
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, cap).detach()


class AdversarialTerm:
    """The discriminator, its optimiser and one update per training step.

    ``loss(real, fake, rec_loss, last)`` updates the discriminator on
    (real, fake.detach()) and returns the decoder's weighted generator term;
    before ``start`` steps it returns zero (a discriminator that sees
    half-trained reconstructions only teaches the decoder noise).
    """

    def __init__(self, weight: float, start: int, lr: float = 2e-4, seed: int = 0):
        torch.manual_seed(seed)
        self.weight, self.start = weight, start
        self.disc = PatchDiscriminator()
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.9))

    def checkpointed(self) -> list:
        """Objects with state_dict/load_state_dict for the run's checkpoints."""
        return [self.disc, self.opt]

    def loss(self, real: torch.Tensor, fake: torch.Tensor, rec_loss: torch.Tensor, last: torch.Tensor,
             step: int) -> tuple[torch.Tensor, dict]:
        if self.weight <= 0 or step < self.start:
            return fake.new_zeros(()), {}
        self.disc.train()
        self.opt.zero_grad(set_to_none=True)
        d_loss = hinge_d_loss(self.disc(real), self.disc(fake.detach()))
        d_loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        g_loss = -self.disc(fake).mean()
        w = adaptive_weight(rec_loss, g_loss, last) * self.weight
        return w * g_loss, {"d_loss": d_loss.item(), "g_weight": w.item()}
