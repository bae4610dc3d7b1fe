"""A small density-regression counter (CSRNet-style): image in, density map out.

It is the *independent* checker of counts: trained on real scenes only, never
on the generator's output. Saved like a transformers/diffusers model: a folder
with ``config.json`` and ``model.safetensors``, loaded by ``from_pretrained``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from factory.errors import FactoryError

from factory.models.folder import CONFIG, WEIGHTS, published_config, resolve_model_folder, save_model_folder

KIND = "density-counter"


class DensityRegressor(nn.Module):
    """What every counter shares: ``self.net`` maps an image in [-1, 1] to one channel, read as
    objects per ``downsample`` x ``downsample`` cell through a sharp softplus, so the background
    can be ~0 (1e-5 a pixel): a linear output's small offset, which a per-pixel loss hardly sees,
    added up to a whole object over 4,096 px; a ReLU output died in training. Subclasses build
    ``net`` and ``config`` (the folder format: ``config.json`` + ``model.safetensors``)."""

    #: pixels a side of one output cell
    downsample = 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, H / downsample, W / downsample) densities."""
        return torch.nn.functional.softplus(self.net(images * 2 - 1).squeeze(1), beta=10.0)

    def count(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images).sum(dim=(-1, -2))

    def save_pretrained(self, folder: str | Path) -> None:
        save_model_folder(folder, self.config, self.state_dict())


class DensityCounter(DensityRegressor):
    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        self.config = {"kind": KIND, "width": width, "depth": depth}
        layers, c = [], 3
        for i in range(depth):
            # Dilation grows the receptive field to a whole digit without pooling.
            d = 2 ** min(i, 2)
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            c = width
        layers += [nn.Conv2d(c, 1, 1)]
        self.net = nn.Sequential(*layers)
        # Start near the world's mean density (6.5 objects over 64x64 px; softplus(-0.4,
        # beta=10) = 0.0016): from a zero bias the first count is ~280, the count loss
        # drives every output into softplus's flat tail, and training can die there
        # (a 200-scene run predicted 0 everywhere after 800 steps).
        nn.init.constant_(self.net[-1].bias, -0.4)

    # downsample 1: the density map comes out at full resolution

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "DensityCounter":
        from safetensors.torch import load_file

        folder = resolve_model_folder(folder, "counter")
        cfg_path = folder / CONFIG
        if not cfg_path.is_file():
            raise FactoryError(f"{folder} is not a counter folder: {CONFIG} is missing")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("kind") != KIND:
            raise FactoryError(f"{folder} holds a {cfg.get('kind') or cfg.get('_class_name', 'unknown')} model, not a {KIND}")
        model = cls(cfg["width"], cfg["depth"])
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
        return model.to(device).eval()


class QuarterDensityCounter(DensityRegressor):
    """A counter of another architecture: strided convs, density at quarter resolution.

    Used where a result must not hang on one model (benchmarks/semaug_utility.py trains both
    architectures): two stride-2 stages, then dilated convs, one density value per 4 x 4 px
    cell (the target is the full-resolution density summed over each cell, so the count is
    the same number). Same ``count`` and ``downsample`` interface as :class:`DensityCounter`.
    """

    downsample = 4

    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        self.config = {"kind": "quarter-density-counter", "width": width, "depth": depth}
        layers = [nn.Conv2d(3, width, 4, 2, 1), nn.GroupNorm(8, width), nn.ReLU(inplace=True),
                  nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GroupNorm(8, 2 * width), nn.ReLU(inplace=True)]
        for i in range(depth):
            d = 2 ** min(i, 2)
            layers += [nn.Conv2d(2 * width, 2 * width, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(2 * width, 1, 1)]
        self.net = nn.Sequential(*layers)
        # Start at the world's mean density per 4x4 cell (6.5 objects over 256 cells, 0.025 a cell:
        # softplus(-0.126, beta=10)), for the reason DensityCounter gives.
        nn.init.constant_(self.net[-1].bias, -0.126)


class CSRNetCounter(DensityRegressor):
    """The real-size counter: CSRNet (Li et al., CVPR 2018), the architecture FSC147 and
    crowd-counting baselines use. VGG-16's first ten convs (three max-pools: density at 1/8
    resolution) and six dilated convs, 16.3 M parameters at the published widths
    (``factory/models/configs/csrnet-counter.json``); for photos at 384-512 px, where the
    DensityCounter's full-resolution dilated stack would cost ~100x more per pixel of context.
    Same ``count`` / ``downsample`` interface and folder format as :class:`DensityCounter`.
    """

    downsample = 8

    def __init__(self, frontend: list | None = None, backend: list | None = None, dilation: int = 2):
        super().__init__()
        cfg = published_config("csrnet-counter.json")
        frontend = list(frontend or cfg["frontend"])
        backend = list(backend or cfg["backend"])
        self.config = {"kind": CSRNET_KIND, "frontend": frontend, "backend": backend, "dilation": dilation}
        layers, c = [], 3
        for v in frontend:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        if sum(v == "M" for v in frontend) != 3:
            raise FactoryError(f"a CSRNet frontend has three max-pools ('M'), got {frontend}")
        for v in backend:
            layers += [nn.Conv2d(c, v, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            c = v
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)
        # Start near a sparse scene's density per 8 x 8 cell, for the reason DensityCounter gives.
        nn.init.constant_(self.net[-1].bias, -0.3)


CSRNET_KIND = "csrnet-counter"


ARCHITECTURES = {"density": DensityCounter, "quarter": QuarterDensityCounter, "csrnet": CSRNetCounter}
KINDS = {KIND: DensityCounter, "quarter-density-counter": QuarterDensityCounter, CSRNET_KIND: CSRNetCounter}


def build_counter(arch: str, width: int = 32, depth: int = 5) -> nn.Module:
    """A fresh counter of the named architecture (``density``, ``quarter``, or ``csrnet`` at
    its published size, which ignores ``width`` and ``depth``)."""
    if arch not in ARCHITECTURES:
        raise FactoryError(f"unknown counter architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return CSRNetCounter() if arch == "csrnet" else ARCHITECTURES[arch](width, depth)


def load_counter(folder: str | Path, device: str = "cpu") -> nn.Module:
    """Any of the project's counters from its folder, by the ``kind`` its config names."""
    from .folder import load_model_folder, read_kind_config

    path = resolve_model_folder(folder, "counter")
    cfg_path = path / CONFIG
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("kind") not in KINDS:  # says what the folder holds instead, and how to make a counter
        read_kind_config(path, KIND, "counter", f"counter ({', '.join(KINDS)})",
                         "train one with `factory train counter`")
    return load_model_folder(KINDS[cfg["kind"]], path, "counter", lambda _: cfg, device)
