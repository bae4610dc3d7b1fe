"""The on-disk format of the project's own models: a folder with ``config.json`` and
``model.safetensors``, as transformers and diffusers save theirs. One writer and
one hub resolver for every kind (counter, attribute classifiers, latent autoencoder);
each kind keeps its own config check, since its error says how to make the right folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from factory.errors import FactoryError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


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
