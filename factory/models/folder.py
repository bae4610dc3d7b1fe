"""The on-disk format of the project's own models: a folder with ``config.json`` and
``model.safetensors``, as transformers and diffusers save theirs. One writer and
one hub resolver for every kind (counter, attribute classifiers, latent autoencoder);
each kind keeps its own config check, since its error says how to make the right folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from factory.errors import FactoryError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CONFIGS = Path(__file__).parent / "configs"


def published_config(name: str) -> dict:
    """A model's published configuration, kept in ``factory/models/configs`` (configs only, never
    weights; `factory models init` builds the real-size models from them); keys starting with
    ``_`` say where it comes from."""
    cfg = json.loads((CONFIGS / name).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def save_model_folder(folder: str | Path, config: dict, state_dict: dict, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and the weights (cast to ``dtype`` when given) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    tensors = {k: (v.detach().to(dtype) if dtype is not None else v).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS))
    return folder


def resolve_model_folder(ref: str | Path, what: str) -> Path:
    """A local folder as is; anything else is taken for a hub id and fetched (fails fast offline)."""
    folder = Path(ref)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(folder)))
    except Exception as e:  # noqa: BLE001 - any hub failure is the same to the user
        raise FactoryError(f"{what} {folder} is not a local folder and could not be fetched: {e}") from None


def read_kind_config(folder: str | Path, kind: str, noun: str, label: str, make: str) -> dict:
    """A folder's config when it is of ``kind``; otherwise a FactoryError that says what the folder
    is (``noun``: "mask-model", ``label``: "gmm-vae realism model") and ``make``s the right one
    (e.g. "train one with `factory train redo`")."""
    cfg_path = Path(folder) / CONFIG
    if not cfg_path.is_file():
        raise FactoryError(f"{folder} is not a {noun} folder: {CONFIG} is missing ({make})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kind") != kind:
        raise FactoryError(f"{folder} holds a {cfg.get('kind') or cfg.get('_class_name', 'unknown')} model, "
                           f"not a {label}: {make}")
    return cfg


def load_model_folder(cls, ref: str | Path, what: str, read_config: Callable[[Path], dict], device: str = "cpu"):
    """``cls(**config)`` with the folder's weights (fp16 on disk for some kinds: cast to fp32), in
    eval mode. ``read_config`` is the kind's own check, whose error names the command that makes
    the right folder."""
    from safetensors.torch import load_file

    folder = resolve_model_folder(ref, what)
    cfg = read_config(folder)
    model = cls(**{k: v for k, v in cfg.items() if k != "kind"})
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
    return model.to(device).eval()


def image_batch(images, module: torch.nn.Module, side: int,
                mismatch: Callable[[int, int], str] | None = None) -> torch.Tensor:
    """uint8 HWC images (one, or a batch array) or float NCHW in [0, 1] -> float NCHW on the
    module's device. An image of another side than the model's is resized to it, or, with
    ``mismatch(width, height)``, refused with that message."""
    device = next(module.parameters()).device
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        # A copy: images decoded by PIL are read-only, which torch.from_numpy warns about.
        images = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(255)
    x = images.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (side, side):
        if mismatch is not None:
            raise FactoryError(mismatch(x.shape[-1], x.shape[-2]))
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x
