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

from factory.models.folder import CONFIG, WEIGHTS, resolve_model_folder, save_model_folder

KIND = "density-counter"


class DensityCounter(nn.Module):
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1]; returns (B, H, W) densities.

        A sharp softplus lets the background be ~0 (1e-5 a pixel): a linear
        output's small offset, which a per-pixel loss hardly sees, added up to a
        whole object over 4,096 px; a ReLU output died in training.
        """
        return torch.nn.functional.softplus(self.net(images * 2 - 1).squeeze(1), beta=10.0)

    def count(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images).sum(dim=(-1, -2))

    def save_pretrained(self, folder: str | Path) -> None:
        save_model_folder(folder, self.config, self.state_dict())

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
