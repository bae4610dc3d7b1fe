"""ReDO (Chen, Artières & Denoyer, NeurIPS 2019): object masks learnt by redrawing, without mask labels.

The premise: an object's region can be redrawn (new colour, new texture) and the image stays
a plausible one *only when the region is the object*. Four networks, trained together
(``factory train redo``):

- the **mask network** M: image -> a soft partition into K = 2 regions (here one logit per
  pixel, region 0 = sigmoid, region 1 = its complement, as the paper's code does for K = 2);
- a **region generator** G_k per region: (code z_k, the region's mask) -> new pixels for it;
- a **discriminator** D on the composites x'_k = M_k * G_k(z_k) + (1 - M_k) * x, one region
  redrawn at a time, against real images (hinge loss);
- a **code encoder** E that recovers every z_k from the image with all regions redrawn: a
  region that covers nothing cannot carry its code, so the reconstruction term (weight 5 in
  the paper) keeps M from the trivial answer of one region holding the whole image.

In the reference world a scene is ``bg * (1 - alpha) + fg * alpha``: redrawing the
foreground with the soft mask alpha makes exactly another scene of the world, so the
equilibrium mask is the digits' alpha, whose > 0.5 pixels are the renderer's mask.

Only M ships (:class:`MaskNetwork`: ``config.json`` + fp16 ``model.safetensors``, about
0.3 MB); the other three are training machinery, kept in the run's checkpoints. Which of
the two regions is the foreground is not learnt: at export it is the one that covers less
of held-out training images (objects are smaller than their background), stored in the
config as ``foreground_region``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from factory.errors import FactoryError
from factory.models.folder import CONFIG, image_batch, load_model_folder, read_kind_config, save_model_folder

KIND = "redo-mask"
REGIONS = 2


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 if stride == 1 else 1), nn.GroupNorm(4, cout), nn.SiLU()]


class MaskNetwork(nn.Module):
    """M: images (B, 3, S, S) in [0, 1] -> region-0 logits (B, S, S).

    A small U-Net (full resolution kept by the skips: strokes are 1-3 px wide) with a global
    context vector added at the bottleneck, ReDO's pyramid pooling in miniature: which colour is
    the background is a fact about the whole image, not about a pixel's neighbourhood.
    """

    def __init__(self, image_size: int = 64, channels: tuple[int, ...] = (16, 32, 64),
                 foreground_region: int = 0, evaluation: dict | None = None, training: dict | None = None):
        super().__init__()
        c0, c1, c2 = (int(c) for c in channels)
        if image_size % 4:
            raise FactoryError(f"image_size {image_size} must be divisible by 4 (two halvings in the mask network)")
        if foreground_region not in range(REGIONS):
            raise FactoryError(f"foreground_region must be 0 or 1, got {foreground_region}")
        self.config = {"kind": KIND, "image_size": int(image_size), "channels": [c0, c1, c2],
                       "foreground_region": int(foreground_region), "evaluation": evaluation or {},
                       "training": training or {}}
        self.stem = nn.Sequential(*_conv(3, c0))
        self.down1 = nn.Sequential(*_conv(c0, c1, 4, 2), *_conv(c1, c1))
        self.down2 = nn.Sequential(*_conv(c1, c2, 4, 2), *_conv(c2, c2))
        self.context = nn.Linear(c2, c2)
        self.up1 = nn.Sequential(*_conv(c2 + c1, c1))
        self.up0 = nn.Sequential(*_conv(c1 + c0, c0))
        self.head = nn.Conv2d(c0, 1, 1)

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x * 2 - 1)
        s1 = self.down1(s0)
        h = self.down2(s1)
        h = h + self.context(h.mean((2, 3)))[:, :, None, None]
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), s1], 1))
        h = self.up0(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), s0], 1))
        return self.head(h)[:, 0]

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S): the soft partition, summing to 1 at every pixel."""
        p = torch.sigmoid(self(x))
        return torch.stack([p, 1 - p], 1)

    @torch.no_grad()
    def foreground(self, images) -> np.ndarray:
        """Foreground probability (B, S, S) float32 of uint8 (B, S, S, 3) or float (B, 3, S, S) images."""
        x = self.to_tensor(images)
        was = self.training
        self.eval()
        p = torch.sigmoid(self(x))
        self.train(was)
        if self.config["foreground_region"] == 1:
            p = 1 - p
        return p.cpu().numpy().astype(np.float32)

    def to_tensor(self, images) -> torch.Tensor:
        return image_batch(images, self, self.image_size, lambda w, h: size_mismatch(self.image_size, w, h))

    def save_pretrained(self, folder: str | Path) -> None:
        # fp16 on disk halves the shipped folder; weights are cast back to fp32 on load.
        save_model_folder(folder, self.config, self.state_dict(), dtype=torch.float16)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "MaskNetwork":
        return load_model_folder(cls, folder, "mask model", read_config, device)


def size_mismatch(model_size: int, width: int, height: int, where: str = "this mask model") -> str:
    return (f"images are {width}x{height} but {where} was trained on {model_size}x{model_size} images: train one "
            f"on images of your size with `factory train redo --data ...` (or resize the samples to "
            f"{model_size}x{model_size} with an `augment` stage first)")


def read_config(folder: str | Path) -> dict:
    """The config of a ReDO mask folder; any other folder is refused with how to make the right one."""
    cfg = read_kind_config(folder, KIND, "mask-model", f"{KIND} (ReDO) mask model",
                           "train one with `factory train redo`")
    if not isinstance(cfg.get("image_size"), int):
        raise FactoryError(f"{folder}/{CONFIG} has no image_size: re-export it with `factory train redo`")
    return cfg


# --- training machinery: not shipped -------------------------------------------------------

class FiLM(nn.Module):
    """Group-normalised features scaled and shifted by the region's code (the paper's
    conditional instance norm, with groups)."""

    def __init__(self, channels: int, z_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, channels, affine=False)
        self.scale_shift = nn.Linear(z_dim, 2 * channels)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift(z)[:, :, None, None].chunk(2, 1)
        return F.silu(self.norm(h) * (1 + scale) + shift)


class RegionGenerator(nn.Module):
    """G_k: (code (B, z), region mask (B, 1, S, S)) -> pixels for the region (B, 3, S, S) in [0, 1],
    drawn at S/2 and upsampled (a region's content is smooth; its edges come from the mask)."""

    def __init__(self, image_size: int = 64, z_dim: int = 16, width: int = 32):
        super().__init__()
        self.size = image_size // 2
        self.base = self.size // 4
        self.fc = nn.Linear(z_dim, width * self.base ** 2)
        self.film0 = FiLM(width, z_dim)
        self.conv1 = nn.Conv2d(width + 1, width, 3, padding=1)
        self.film1 = FiLM(width, z_dim)
        self.conv2 = nn.Conv2d(width + 1, width // 2, 3, padding=1)
        self.film2 = FiLM(width // 2, z_dim)
        self.out = nn.Conv2d(width // 2 + 1, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.film0(self.fc(z).view(len(z), -1, self.base, self.base), z)
        for conv, film in ((self.conv1, self.film1), (self.conv2, self.film2)):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            m = F.adaptive_avg_pool2d(mask, h.shape[-1])
            h = film(conv(torch.cat([h, m], 1)), z)
        m = F.adaptive_avg_pool2d(mask, h.shape[-1])
        out = torch.sigmoid(self.out(torch.cat([h, m], 1)))
        return F.interpolate(out, size=mask.shape[-2:], mode="bilinear", align_corners=False)


class CompositeDiscriminator(nn.Module):
    """D: images (B, 3, S, S) -> one logit each: the mean of per-patch logits (does each patch,
    about a digit wide, look drawn by the world: no halo of the old colour, no blotch of the new)
    plus a global one (does the whole image: a scene with its objects, not a blank)."""

    def __init__(self, width: int = 32):
        super().__init__()
        sn = spectral_norm
        self.features = nn.Sequential(
            sn(nn.Conv2d(3, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2))
        self.patch = sn(nn.Conv2d(4 * width, 1, 3, padding=1))
        self.whole = sn(nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x * 2 - 1)
        return self.patch(h).mean((1, 2, 3)) + self.whole(h.mean((2, 3)))[:, 0]


class CodeEncoder(nn.Module):
    """E: an image with every region redrawn -> the K codes that drew it (B, K, z)."""

    def __init__(self, z_dim: int = 16, regions: int = REGIONS, width: int = 32):
        super().__init__()
        self.z_dim, self.regions = z_dim, regions
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2))
        self.fc = nn.Linear(2 * width, regions * z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x * 2 - 1).mean((2, 3))).view(len(x), self.regions, self.z_dim)


class ReDO(nn.Module):
    """The generator side of ReDO (M, the G_k, E), trained against :class:`CompositeDiscriminator`."""

    def __init__(self, image_size: int = 64, channels=(16, 32, 64), z_dim: int = 16, gen_width: int = 32):
        super().__init__()
        self.z_dim = z_dim
        self.mask = MaskNetwork(image_size, channels)
        self.generators = nn.ModuleList(RegionGenerator(image_size, z_dim, gen_width) for _ in range(REGIONS))
        self.encoder = CodeEncoder(z_dim)

    def redraw(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For images x (B, 3, S, S) and codes z (B, K, z): the regions (B, K, S, S), the
        composites with one region redrawn each (B, K, 3, S, S), and the image with every region
        redrawn (B, 3, S, S), which the code encoder reads."""
        regions = self.mask.regions(x)
        drawn = torch.stack([g(z[:, k], regions[:, k:k + 1]) * regions[:, k:k + 1]
                             for k, g in enumerate(self.generators)], 1)
        composites = drawn + (1 - regions[:, :, None]) * x[:, None]
        return regions, composites, drawn.sum(1)
