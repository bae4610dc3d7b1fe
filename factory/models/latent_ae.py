"""A regularised autoencoder (RAE, Ghosh et al. 2020) for 64x64 RGB scenes: the shipped
generator with a latent space.

The code (``latent_dim`` = 144 numbers by default) has two parts: ``global_dim`` = 16
numbers from a fully connected layer (colours, anything scene-wide) and a
``spatial_channels`` x 8 x 8 grid (2 x 8 x 8) from a 1x1 conv of the encoder's last
feature map, flattened; editors see one flat vector. The decoder draws a full-resolution
mask that blends two coarse colour layers (see ``output``). Why this shape, measured
with the independent counter on reconstructions of test scenes (one CPU thread):

- a purely fully connected 128-d bottleneck (4 stride-2 stages): after 600 steps it
  drew only the background, 0 % counted right (PSNR 14.6);
- 16 global + 7 x 4 x 4 grid: 0.5 % after 500 steps; plain deep conv stacks with
  PyTorch's default init also barely passed the image through (hence He init and
  GroupNorm below);
- 16 global + 2 x 8 x 8 grid, layered output: 36 % after 300 steps (RGB output: 19 %).
  Each grid cell speaks for its own 8 x 8 px, so digits need not be placed from a
  global code; 144 rather than 128 numbers because the 16 global ones carry the colours.

Deterministic conv encoder and decoder; what makes the decoder a generator is
(1) an L2 penalty on the codes during training, which keeps the code space
compact and smooth (the role the KL term plays in a VAE, without its blur),
(2) weight decay on the decoder, and (3) an *ex-post* density fitted on the
training codes after training: a 10-component full-covariance Gaussian
mixture, stored in ``prior.npz``. Sampling = draw from the mixture, decode.

Saved like the counter: a folder with ``config.json`` ("kind": "latent-ae",
the architecture and the code statistics), ``model.safetensors`` (fp16, to keep
the shipped folder small; cast back to fp32 on load) and ``prior.npz``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from factory.errors import FactoryError

from factory.models.folder import CONFIG, WEIGHTS, resolve_model_folder, save_model_folder

PRIOR = "prior.npz"
KIND = "latent-ae"
IMAGE_SIZE = 64


def _act() -> nn.Module:
    return nn.SiLU()


def _conv(cin: int, cout: int, k: int, norm: bool, **kw) -> list[nn.Module]:
    """conv [+ GroupNorm] + SiLU. GroupNorm rather than BatchNorm: a code's image must not
    depend on the batch it is decoded in (editors decode one code at a time or many)."""
    layers = [nn.Conv2d(cin, cout, k, **kw)]
    if norm:
        layers.append(nn.GroupNorm(min(8, cout // 4) or 1, cout))
    return layers + [_act()]


class LatentAE(nn.Module):
    """images (B, 3, 64, 64) in [0, 1] <-> codes (B, latent_dim)."""

    def __init__(self, latent_dim: int = 144, channels: tuple[int, ...] = (32, 64, 128),
                 dec_channels: tuple[int, ...] = (64, 32, 32), image_size: int = IMAGE_SIZE,
                 global_dim: int = 16, norm: bool = True, output: str = "layered"):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        dec_channels = tuple(int(c) for c in dec_channels)
        n = len(channels)
        if len(dec_channels) != n:
            raise FactoryError(f"dec_channels {dec_channels} needs one width per encoder stage ({n})")
        self.base = image_size // 2**n  # side of the smallest feature map (8 for 64 px and 3 stages)
        if self.base * 2**n != image_size or self.base < 1:
            raise FactoryError(f"image_size {image_size} is not divisible by 2**{n}: give a power of two")
        spatial, rest = divmod(latent_dim - global_dim, self.base**2)
        if global_dim < 0 or spatial < 0 or rest:
            raise FactoryError(f"latent_dim {latent_dim} - global_dim {global_dim} must be a non-negative multiple "
                               f"of {self.base**2} (a {self.base}x{self.base} grid): e.g. 144 and 16")
        if output not in ("layered", "rgb"):
            raise FactoryError(f"output must be 'layered' or 'rgb', got {output!r}")
        self.global_dim, self.spatial = int(global_dim), int(spatial)
        self.config = {"kind": KIND, "latent_dim": int(latent_dim), "global_dim": self.global_dim,
                       "spatial_channels": self.spatial, "channels": list(channels),
                       "dec_channels": list(dec_channels), "image_size": int(image_size), "norm": bool(norm),
                       "output": output}

        enc, c = [], 3
        for co in channels:  # strided 4x4 convs halve the side at each stage
            enc += _conv(c, co, 4, norm, stride=2, padding=1) + _conv(co, co, 3, norm, padding=1)
            c = co
        self.encoder = nn.Sequential(*enc)
        self.to_global = nn.Linear(c * self.base**2, self.global_dim) if self.global_dim else None
        self.to_grid = nn.Conv2d(c, self.spatial, 1) if self.spatial else None

        self.from_global = nn.Linear(self.global_dim, c * self.base**2) if self.global_dim else None
        self.from_grid = nn.Conv2d(self.spatial, c, 3, padding=1) if self.spatial else None
        self.stem = nn.Sequential(_act(), *_conv(c, c, 3, norm, padding=1))
        # "layered": the image is a background layer and a foreground layer blended by a
        # full-resolution mask, image = (1 - a) * bg + a * fg, with both colour layers coarse
        # (4x4, upsampled smoothly). Scenes of this world are one ink colour on a plain
        # background; a plain RGB head has to learn colour-times-shape products and after
        # 500 steps still drew only the background (0.5 % of test reconstructions counted
        # right), whereas the mask is a colour-free shape, as easy as an MNIST autoencoder's.
        # Coarse layers still allow slow colour gradients, so this is not hard-wired to two colours.
        self.colours = nn.Conv2d(c, 6, 1) if output == "layered" else None
        dec = []
        # dec_channels[i] is the width after the i-th doubling (16, 32, 64 px for 64 px
        # images); the last, widest map is the costliest on a CPU, so it is the thinnest.
        for co in dec_channels:
            # Nearest upsampling + 3x3 conv (no transposed convs: their checkerboard
            # pattern shows on plain backgrounds); a second conv per stage sharpens strokes.
            dec += [nn.Upsample(scale_factor=2, mode="nearest")] + _conv(c, co, 3, norm, padding=1) \
                + _conv(co, co, 3, norm, padding=1)
            c = co
        dec += [nn.Conv2d(c, 1 if output == "layered" else 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        for m in self.modules():
            # He init: with PyTorch's default (gain 1/sqrt(3)) the signal shrank ~0.6x a layer,
            # and after the encoder's 8 convs codes hardly depended on the image (their spread
            # across a batch was 1e-5), so nothing but the mean colour was learnt for hundreds of steps.
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if output == "layered":
            # Start the mask mostly "background" (sigmoid(-2) = 0.12, about the ink share of a
            # scene): from 0.5 it drifted to all-foreground within 300 steps, where the sigmoid
            # saturates, the coarse foreground layer copies the background and no gradient
            # reaches the strokes again.
            nn.init.constant_(dec[-1].bias, -2.0)

    @property
    def latent_dim(self) -> int:
        return self.config["latent_dim"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """codes (B, latent_dim): [global part, grid part flattened channel-major]."""
        f = self.encoder(images * 2 - 1)
        parts = []
        if self.to_global is not None:
            parts.append(self.to_global(f.flatten(1)))
        if self.to_grid is not None:
            parts.append(self.to_grid(f).flatten(1))
        return torch.cat(parts, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c, b, g = self.config["channels"][-1], self.base, self.global_dim
        h = 0
        if self.from_global is not None:
            h = h + self.from_global(z[:, :g]).view(-1, c, b, b)
        if self.from_grid is not None:
            h = h + self.from_grid(z[:, g:].reshape(-1, self.spatial, b, b))
        h = self.stem(h)
        # Sigmoids keep outputs in [0, 1] with gradients everywhere (a clamp would cut them).
        out = torch.sigmoid(self.decoder(h))
        if self.colours is None:
            return out
        layers = torch.sigmoid(nn.functional.interpolate(self.colours(h), size=out.shape[-2:], mode="bilinear",
                                                         align_corners=False))
        return (1 - out) * layers[:, :3] + out * layers[:, 3:]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(images)
        return self.decode(z), z

    # --- folder format ---------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, code_stats: dict | None = None, prior: dict | None = None) -> None:
        """Write config.json, model.safetensors (fp16) and, when given, prior.npz
        (arrays ``weights`` (K,), ``means`` (K, d) and the Cholesky factors packed, see pack_chols)."""
        cfg = dict(self.config)
        if code_stats is not None:
            cfg["code_stats"] = code_stats
        folder = save_model_folder(folder, cfg, self.state_dict(), torch.float16)
        if prior is not None:
            arrays = {k: np.asarray(v) for k, v in prior.items() if k != "chols"}
            if "chols" in prior:
                arrays["chol_tril"] = pack_chols(np.asarray(prior["chols"]))
            np.savez(folder / PRIOR, **arrays)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "LatentAE":
        from safetensors.torch import load_file

        folder = resolve_folder(folder)
        cfg = read_config(folder)
        model = cls(cfg["latent_dim"], tuple(cfg["channels"]), tuple(cfg["dec_channels"]),
                    cfg.get("image_size", IMAGE_SIZE), cfg.get("global_dim", 16), cfg.get("norm", False),
                    cfg.get("output", "rgb"))
        model.config = {**model.config, **{k: v for k, v in cfg.items() if k == "code_stats"}}
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
        model.load_state_dict(state)
        return model.to(device).eval()


def resolve_folder(folder: str | Path) -> Path:
    return resolve_model_folder(folder, "latent autoencoder")


def read_config(folder: Path) -> dict:
    """The folder's config, refused with a message naming what the folder holds instead."""
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        what = "a diffusers pipeline" if (folder / "model_index.json").is_file() else f"no {CONFIG}"
        raise FactoryError(f"{folder} is not a latent-ae folder: it holds {what}; "
                           f"give a folder written by `factory train latent-ae` (e.g. models/latent-ae)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != KIND:
        other = cfg.get("kind") or cfg.get("_class_name") or cfg.get("model_type") or "unknown"
        raise FactoryError(f"{folder} holds a {other} model, not a {KIND}; give a folder written by "
                           f"`factory train latent-ae` (e.g. models/latent-ae)")
    return cfg


def load_prior(folder: str | Path) -> dict[str, np.ndarray]:
    path = Path(folder) / PRIOR
    if not path.is_file():
        raise FactoryError(f"{folder} has no {PRIOR} (the Gaussian mixture over codes that sampling draws from); "
                           f"re-export it with `factory train latent-ae` (the export fits it)")
    with np.load(path) as f:
        prior = {k: f[k] for k in f.files}
    if "chol_tril" in prior:
        prior["chols"] = unpack_chols(prior.pop("chol_tril"), prior["means"].shape[1])
    return prior


def pack_chols(chols: np.ndarray) -> np.ndarray:
    """The lower triangles of (K, d, d) Cholesky factors as (K, d(d+1)/2) float16. Why: the full
    float32 factors of a 528-d code's 10 components take 11 MB, the packed ones 2.8 MB, and the
    shipped models/ must stay under 20 MB; fp16's 1e-3 relative precision is far below the
    sampling noise the factors scale."""
    rows, cols = np.tril_indices(chols.shape[-1])
    return chols[:, rows, cols].astype(np.float16)


def unpack_chols(packed: np.ndarray, dim: int) -> np.ndarray:
    rows, cols = np.tril_indices(dim)
    chols = np.zeros((len(packed), dim, dim), np.float32)
    chols[:, rows, cols] = packed.astype(np.float32)
    return chols


def fit_prior(codes: np.ndarray, components: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """The ex-post density of RAE: a full-covariance Gaussian mixture on the training codes.
    Cholesky factors are stored so sampling is mean + chol @ normal, with no refactorisation."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-5, random_state=seed, max_iter=200)
    gmm.fit(codes.astype(np.float64))
    chols = np.linalg.cholesky(gmm.covariances_)
    return {"weights": gmm.weights_.astype(np.float64), "means": gmm.means_.astype(np.float32),
            "chols": chols.astype(np.float32)}


def code_statistics(codes: np.ndarray) -> dict:
    """Summary of the training codes kept in config.json: the norm ball inversion and
    editing stay in (99.9th percentile norm), and per-dimension scale for reference."""
    norms = np.linalg.norm(codes, axis=1)
    return {
        "n": int(len(codes)),
        "radius": float(np.percentile(norms, 99.9)),
        "norm_mean": float(norms.mean()),
        "norm_p50": float(np.percentile(norms, 50)),
        "norm_max": float(norms.max()),
        "dim_std_mean": float(codes.std(0).mean()),
        "dim_std_min": float(codes.std(0).min()),
        "dim_std_max": float(codes.std(0).max()),
        "mean_abs_mean": float(np.abs(codes.mean(0)).mean()),
    }
