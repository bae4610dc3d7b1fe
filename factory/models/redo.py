"""ReDO (Chen, Artières & Denoyer, NeurIPS 2019): object masks learnt by redrawing, without mask labels.

The premise: an object's region can be redrawn (new colour, new texture) and the image stays
a plausible one *only when the region is the object*. Four networks, trained together
(``factory train redo``):

- the **mask network** M: image -> a soft partition into K = 2 regions (here one logit per
  pixel, region 0 = sigmoid, region 1 = its complement, as the paper's code does for K = 2);
- a **region generator** G_k per region: (code c_k, the rest's colour) -> a new colour for it
  (categorical codes and a learnt colour codebook: see :class:`RegionGenerator` for why);
- a **discriminator** D on the composites x'_k = M_k * G_k(c_k) + (1 - M_k) * x, one region
  redrawn at a time, against real images (hinge loss);
- a **code encoder** E that recovers every c_k from the image with all regions redrawn: a
  region that covers nothing cannot carry its code, so the reconstruction term (weight 5 in
  the paper) keeps M from the trivial answer of one region holding the whole image.

Only M ships (:class:`MaskNetwork`: ``config.json`` + fp16 ``model.safetensors``, about
10 kB); the other three are training machinery, kept in the run's checkpoints.

Which region is the object is not learnt: nothing in ReDO's objective names the regions, and
the trained M puts the digits in region 0 in some images and in region 1 in others. Its
values do fall in two modes per image, so :func:`split_foreground` cuts each image's mask
between its two modes (Otsu's threshold) and calls the smaller side the object (objects are
smaller than their background): a rule about the mask, never about the truth.
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


ARCHS = ("pixel", "unet")


class MaskNetwork(nn.Module):
    """M: images (B, 3, S, S) in [0, 1] -> region-0 logits (B, S, S).

    Two architectures (``arch``), both with a global context (ReDO's pyramid pooling in
    miniature: which colour is the background is a fact about the whole image, not about a
    pixel's neighbourhood):

    - ``pixel`` (the default): 1x1 convolutions on each pixel's colour joined with the image's mean
      feature: the mask is a function of a pixel's colour given the whole image, and of nothing
      else. Measured in this world of flat colours (issue 17's notes), both networks that see
      more failed: the U-Net split every image into a 10 px frame and its inside (zero-padded
      borders tell a deep net where it is), and a 5x5-neighbourhood version drew the digits as
      blobs a pixel or two too wide, holes filled (a third to a half of what it called digit
      was background).
    - ``unet``: a small U-Net (two halvings, skips keep strokes 1-3 px wide), context added at the
      bottleneck, meant for objects that are textured rather than flat; not trained to a usable
      mask here.
    """

    def __init__(self, image_size: int = 64, channels: tuple[int, ...] = (16, 32, 64), arch: str = "pixel",
                 evaluation: dict | None = None, training: dict | None = None):
        super().__init__()
        c0, c1, c2 = (int(c) for c in channels)
        if arch not in ARCHS:
            raise FactoryError(f"mask network arch {arch!r} is not one of {', '.join(ARCHS)}")
        if image_size % 4:
            raise FactoryError(f"image_size {image_size} must be divisible by 4 (two halvings in the mask network)")
        self.config = {"kind": KIND, "image_size": int(image_size), "channels": [c0, c1, c2], "arch": arch,
                       "evaluation": evaluation or {}, "training": training or {}}
        if arch == "pixel":
            self.pixel = nn.Sequential(nn.Conv2d(3, c1, 1), nn.SiLU(), nn.Conv2d(c1, c1, 1), nn.SiLU())
            self.context = nn.Linear(c1, c1)
            self.local = nn.Sequential(nn.Conv2d(2 * c1, c1, 1), nn.SiLU(), nn.Conv2d(c1, c0, 1), nn.SiLU(),
                                       nn.Conv2d(c0, c0, 1), nn.SiLU())
            self.head = nn.Conv2d(c0, 1, 1)
            return
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
        if self.config["arch"] == "pixel":
            h = self.pixel(x * 2 - 1)
            g = self.context(h.mean((2, 3)))[:, :, None, None].expand_as(h)
            return self.head(self.local(torch.cat([h, g], 1)))[:, 0]
        s0 = self.stem(x * 2 - 1)
        s1 = self.down1(s0)
        h = self.down2(s1)
        h = h + self.context(h.mean((2, 3)))[:, :, None, None]
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), s1], 1))
        h = self.up0(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), s0], 1))
        return self.head(h)[:, 0]

    @staticmethod
    def regions(logits: torch.Tensor) -> torch.Tensor:
        """(B, 2, S, S): the soft partition of region-0 ``logits`` (B, S, S), summing to 1 at every pixel."""
        p = torch.sigmoid(logits)
        return torch.stack([p, 1 - p], 1)

    @torch.no_grad()
    def region0(self, images) -> np.ndarray:
        """Region 0's probability (B, S, S) float32 of uint8 (B, S, S, 3) or float (B, 3, S, S) images."""
        x = self.to_tensor(images)
        was = self.training
        self.eval()
        p = torch.sigmoid(self(x))
        self.train(was)
        return p.cpu().numpy().astype(np.float32)

    def foreground(self, images) -> np.ndarray:
        """Object probability (B, S, S) float32: region 0's probability re-centred per image so that
        0.5 is the cut between its two modes and the smaller side is above it (:func:`split_foreground`)."""
        return split_foreground(self.region0(images))

    def to_tensor(self, images) -> torch.Tensor:
        return image_batch(images, self, self.image_size, lambda w, h: size_mismatch(self.image_size, w, h))

    def save_pretrained(self, folder: str | Path) -> None:
        # fp16 on disk halves the shipped folder; weights are cast back to fp32 on load.
        save_model_folder(folder, self.config, self.state_dict(), dtype=torch.float16)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "MaskNetwork":
        return load_model_folder(cls, folder, "mask model", read_config, device)


# A mask whose values span less than this has one mode: no object and background to cut between.
ONE_MODE = 0.05


def split_foreground(region0: np.ndarray) -> np.ndarray:
    """(B, S, S) region-0 probabilities -> object probabilities, per image: cut between the two
    modes of its values (Otsu's threshold t), the smaller side is the object, and the result is
    sigmoid(+-(logit p - logit t)) so that thresholding it at 0.5 gives exactly that cut while a
    pixel's distance from the cut still says how sure the mask is (the segment stage's watershed
    uses it). An image whose mask has one mode has no object: all zero."""
    from skimage.filters import threshold_otsu

    out = np.zeros_like(region0, dtype=np.float32)
    logit = np.log(np.clip(region0, 1e-6, 1 - 1e-6) / np.clip(1 - region0, 1e-6, 1))
    for i, p in enumerate(region0):
        if float(p.max() - p.min()) < ONE_MODE:
            continue
        t = float(threshold_otsu(p.astype(np.float64)))
        side = 1.0 if (p > t).mean() <= 0.5 else -1.0
        lt = np.log(max(t, 1e-6) / max(1 - t, 1e-6))
        out[i] = 1 / (1 + np.exp(-side * (logit[i] - lt)))
    return out


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
    if cfg.get("arch") not in ARCHS:
        # Folders exported before the arch was recorded hold a U-Net mask with one fixed
        # foreground region, which the per-image cut replaced: they cannot be read as today's.
        raise FactoryError(f"{folder}/{CONFIG} names no mask arch ({', '.join(ARCHS)}): it was exported by an "
                           f"earlier `factory train redo`; train it again (the shipped one is models/redo)")
    return cfg


# --- training machinery: not shipped -------------------------------------------------------

class RegionGenerator(nn.Module):
    """G_k: (a categorical code, the mean colour of the rest of the image) -> one colour for its region.

    The paper's generators draw a textured region from a Gaussian code. This world's regions are
    flat and its colours come from a palette of twelve, and that broke the paper's recipe here
    (measured: a region drawn from a continuous code is a colour off the palette, which the
    discriminator spots whatever the mask, and the mask's cheapest answer is then to redraw
    nothing: one region shrank to 0-2 % of the image within 250 steps in every run). So the code
    is categorical and the colour is picked from a learnt codebook (straight-through: the forward
    pass draws exactly a codebook colour, the backward pass trains the choice and the colours),
    and the choice sees the other region's colour, as a redrawn digit must stay legible on its
    background. The code-reconstruction term reads the code back as a class.
    """

    def __init__(self, codes: int = 16, width: int = 32):
        super().__init__()
        self.codes = codes
        self.palette = nn.Parameter(torch.randn(codes, 3))  # logits of RGB in [0, 1], one colour per code
        # The choice starts as code c -> colour c (so the encoder can read every code back from
        # the first step); the context learns to re-route a code whose colour clashes with the rest.
        self.reroute = nn.Sequential(nn.Linear(codes + 3, width), nn.SiLU(), nn.Linear(width, codes))
        nn.init.zeros_(self.reroute[-1].weight)
        nn.init.zeros_(self.reroute[-1].bias)

    def forward(self, code: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``code`` (B,) int, ``context`` (B, 3) in [0, 1] -> colours (B, 3) in [0, 1]."""
        one_hot = F.one_hot(code, self.codes).float()
        logits = 4 * one_hot + self.reroute(torch.cat([one_hot, context * 2 - 1], 1))
        soft = logits.softmax(-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).float()
        return (hard + soft - soft.detach()) @ torch.sigmoid(self.palette)


class CompositeDiscriminator(nn.Module):
    """D: images (B, 3, S, S) -> one logit each: the mean of per-patch logits (does each patch,
    about a digit wide, look drawn by the world: no halo of the old colour, no blotch of the new)
    plus a global one (does the whole image: a scene with its objects, not a blank)."""

    def __init__(self, width: int = 32, whole: bool = True):
        super().__init__()
        sn = spectral_norm
        self.use_whole = whole
        self.features = nn.Sequential(
            sn(nn.Conv2d(3, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2))
        self.patch = sn(nn.Conv2d(4 * width, 1, 3, padding=1))
        self.whole = sn(nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x * 2 - 1)
        patch = self.patch(h).mean((1, 2, 3))
        return patch + self.whole(h.mean((2, 3)))[:, 0] if self.use_whole else patch


class CodeEncoder(nn.Module):
    """E: an image with every region redrawn -> logits of the K codes that drew it (B, K, codes)."""

    def __init__(self, codes: int = 16, regions: int = REGIONS, width: int = 32):
        super().__init__()
        self.codes, self.regions = codes, regions
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2))
        self.fc = nn.Linear(2 * width, regions * codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x * 2 - 1).mean((2, 3))).view(len(x), self.regions, self.codes)


class ReDO(nn.Module):
    """The generator side of ReDO (M, the G_k, E), trained against :class:`CompositeDiscriminator`."""

    def __init__(self, image_size: int = 64, channels=(16, 32, 64), codes: int = 16, gen_width: int = 32,
                 arch: str = "pixel"):
        super().__init__()
        self.codes = codes
        self.mask = MaskNetwork(image_size, channels, arch=arch)
        self.generators = nn.ModuleList(RegionGenerator(codes, width=gen_width) for _ in range(REGIONS))
        self.encoder = CodeEncoder(codes)

    def colours_from(self, images: np.ndarray, seed: int = 0, pixels: int = 20000) -> None:
        """Start every generator's codebook at the colours the images are painted with (k-means of
        their pixels; no masks involved). From random colours the discriminator rejects every redraw,
        whatever the mask, and the mask's easy way out is then to redraw nothing (measured here: one
        region at 0 % of the image after 250 steps); from the data's colours a redraw is only wrong
        where the mask is."""
        from sklearn.cluster import KMeans

        rng = np.random.default_rng(seed)
        flat = images.reshape(-1, 3)
        sample = flat[rng.integers(len(flat), size=pixels)].astype(np.float64) / 255
        centres = KMeans(self.codes, n_init=1, random_state=seed).fit(sample).cluster_centers_
        logits = torch.logit(torch.from_numpy(centres).float().clamp(0.02, 0.98))
        with torch.no_grad():
            for g in self.generators:
                g.palette.copy_(logits)

    def sample_codes(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        """One uniform categorical code per region and image (n, K)."""
        return torch.from_numpy(rng.integers(self.codes, size=(n, REGIONS)))

    def code_loss(self, redrawn: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of reading each region's code back from the image with every region
        redrawn: a region that covers nothing cannot carry its code."""
        return F.cross_entropy(self.encoder(redrawn).flatten(0, 1), codes.flatten())

    def redraw(self, x: torch.Tensor, codes: torch.Tensor, logits: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For images x (B, 3, S, S) and codes (B, K): the regions (B, K, S, S), the composites with
        one region redrawn each (B, K, 3, S, S), and the image with every region redrawn
        (B, 3, S, S), which the code encoder reads."""
        regions = self.mask.regions(self.mask(x) if logits is None else logits)
        drawn = []
        for k, g in enumerate(self.generators):
            rest = 1 - regions[:, k:k + 1]
            context = (x * rest).sum((2, 3)) / rest.sum((2, 3)).clamp_min(1e-3)  # the rest's mean colour
            drawn.append(g(codes[:, k], context)[:, :, None, None] * regions[:, k:k + 1])
        drawn = torch.stack(drawn, 1)
        composites = drawn + (1 - regions[:, :, None]) * x[:, None]
        return regions, composites, drawn.sum(1)
