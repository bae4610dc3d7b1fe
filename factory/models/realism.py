"""A rejection filter for samples off the data: a VAE with a Gaussian-mixture prior.

Trained on real scenes only, it is a *selective classifier* of realism (the
GMM-VAE of Ghosh's thesis, Ch. 4): an image is accepted when it lies where
the real data lies, judged two ways, each with a threshold calibrated on
held-out real scenes:

- the Mahalanobis distance of its latent code (the encoder's mean) to the
  nearest mixture component, under that component's diagonal covariance:
  large when the image is unlike any kind of scene the model learnt;
- its reconstruction error (per-pixel MSE of decode(encode(x))): large when
  the image holds what the decoder cannot draw (speckle, fused strokes,
  colours the world never uses).

A sample is rejected when either score exceeds its threshold (by default the
99.5th percentile of held-out real scenes, so about 1 % of real scenes are
rejected in all); both scores are stored. The mixture is learnt with the
VAE (VaDE-style: the ELBO's KL term is taken against the mixture, estimated
with the posterior sample), so its components are the clusters the
encoder makes, not fitted afterwards.

Saved like the other checkers: ``config.json`` (architecture, image size,
thresholds and the held-out scores they came from) + ``model.safetensors``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.errors import FactoryError
from factory.models.folder import image_batch, load_model_folder, read_kind_config, save_model_folder

KIND = "gmm-vae"


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 4, 2, 1), nn.GroupNorm(8, cout), nn.SiLU()]


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout),
            nn.SiLU()]


class GMMVAE(nn.Module):
    """images (B, 3, S, S) in [0, 1] <-> codes (B, latent_dim) under a K-component diagonal GMM prior."""

    def __init__(self, image_size: int = 64, latent_dim: int = 32, components: int = 10,
                 channels: tuple[int, ...] = (32, 64, 128), thresholds: dict | None = None,
                 calibration: dict | None = None):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.base = image_size // 2 ** len(channels)
        if self.base * 2 ** len(channels) != image_size:
            raise FactoryError(f"image_size {image_size} must be divisible by {2 ** len(channels)}")
        self.config = {"kind": KIND, "image_size": int(image_size), "latent_dim": int(latent_dim),
                       "components": int(components), "channels": list(channels),
                       "thresholds": thresholds or {}, "calibration": calibration or {}}
        enc, c = [], 3
        for co in channels:
            enc += _down(c, co)
            c = co
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = c * self.base ** 2
        self.to_stats = nn.Linear(flat, 2 * latent_dim)
        self.from_code = nn.Linear(latent_dim, flat)
        dec = []
        for co in reversed(channels[:-1]):
            dec += _up(c, co)
            c = co
        dec += _up(c, c) + [nn.Conv2d(c, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # The mixture: means spread at random, unit variances, equal weights (learnt).
        self.prior_means = nn.Parameter(torch.randn(components, latent_dim))
        self.prior_logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.prior_logits = nn.Parameter(torch.zeros(components))

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def thresholds(self) -> dict:
        return self.config["thresholds"]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(x * 2 - 1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 6)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_code(z).view(len(z), self.config["channels"][-1], self.base, self.base)
        return torch.sigmoid(self.decoder(h))

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) under the mixture, (B,)."""
        var = self.prior_logvars.exp()
        diff = z[:, None, :] - self.prior_means[None]
        log_n = -0.5 * ((diff ** 2) / var + self.prior_logvars + math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(torch.log_softmax(self.prior_logits, 0)[None] + log_n, dim=1)

    def loss(self, x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO per image: summed squared error (a Gaussian likelihood) + beta * KL(q || GMM)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator)
        z = mu + (0.5 * logvar).exp() * eps
        rec = self.decode(z)
        nll = ((rec - x) ** 2).sum((1, 2, 3)) / (2 * 0.05 ** 2)
        log_q = -0.5 * (eps ** 2 + logvar + math.log(2 * math.pi)).sum(-1)
        return (nll + beta * (log_q - self.log_prior(z))).mean() / x[0].numel()

    @torch.no_grad()
    def scores(self, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Per image: Mahalanobis distance of the code to its nearest component, and the
        reconstruction MSE. ``images`` float (B, 3, S, S) in [0, 1] or uint8 (B, S, S, 3)."""
        x = self.to_tensor(images)
        was = self.training
        self.eval()
        mu, _ = self.encode(x)
        rec = self.decode(mu)
        self.train(was)
        var = self.prior_logvars.exp()
        d2 = (((mu[:, None, :] - self.prior_means[None]) ** 2) / var).sum(-1)
        return {"distance": d2.min(1).values.sqrt().cpu().numpy(),
                "error": ((rec - x) ** 2).mean((1, 2, 3)).cpu().numpy()}

    def to_tensor(self, images) -> torch.Tensor:
        return image_batch(images, self, self.image_size, lambda w, h: (
            f"images are {w}x{h} but this realism model was trained on {self.image_size}x{self.image_size} "
            f"images: train one on your data with `factory train realism --data ...` (or resize the samples first)"))

    def save_pretrained(self, folder: str | Path) -> None:
        # fp16 on disk keeps the shipped folder small; weights are cast back to fp32 on load.
        save_model_folder(folder, self.config, self.state_dict(), dtype=torch.float16)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "GMMVAE":
        return load_model_folder(cls, folder, "realism model", read_config, device)


def read_config(folder: str | Path) -> dict:
    cfg = read_kind_config(folder, KIND, "realism-model", f"{KIND} realism model",
                           "train one with `factory train realism`")
    if not cfg.get("thresholds"):
        raise FactoryError(f"{folder} has no calibrated thresholds: re-export it with `factory train realism`")
    return cfg


def calibrate(model: GMMVAE, images: np.ndarray, quantile: float) -> tuple[dict, dict]:
    """Thresholds at ``quantile`` of each score on held-out real images, and a summary of those scores."""
    parts = [model.scores(images[i:i + 256]) for i in range(0, len(images), 256)]
    scores = {k: np.concatenate([p[k] for p in parts]) for k in ("distance", "error")}
    thresholds = {k: float(np.quantile(v, quantile)) for k, v in scores.items()}
    rejected = (scores["distance"] > thresholds["distance"]) | (scores["error"] > thresholds["error"])
    summary = {"quantile": quantile, "n": int(len(images)), "rejected": round(float(rejected.mean()), 4),
               **{f"{k}_median": round(float(np.median(v)), 5) for k, v in scores.items()}}
    return thresholds, summary
