"""The embedded default OpenCLIP model: a tiny ViT + text transformer in
open_clip's own local-folder format (``open_clip_config.json`` + weights),
loaded with ``open_clip.create_model_and_transforms("local-dir:PATH")`` like
any OpenCLIP checkpoint. Its tokenizer is the world-vocabulary CLIP BPE of the
tiny SD stack (a local Hugging Face tokenizer folder), which keeps the token
table small enough to ship.
"""
from __future__ import annotations

import json
from pathlib import Path

from .tiny_sd import MAX_TOKENS, write_tokenizer

WEIGHTS = "open_clip_model.safetensors"


def model_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": MAX_TOKENS, "vocab_size": vocab_size, "width": 64, "heads": 2,
                     "layers": 2, "hf_tokenizer_name": "local", "tokenizer_kwargs": {"clean": "lower"}},
    }


def create(folder: str | Path, seed: int = 0):
    """A fresh tiny CLIP whose config and tokenizer live in ``folder``."""
    import open_clip
    import torch

    folder = Path(folder)
    tok = write_tokenizer(folder)  # open_clip reads a local-dir model's tokenizer from the folder itself
    cfg = {"model_cfg": model_config(len(tok)),
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                              "resize_mode": "squash"}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def save(model, folder: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(Path(folder) / WEIGHTS))


def load(ref: str, device: str = "cpu"):
    """(model, preprocess, tokenizer) from a local folder, an ``hf-hub:`` id or an open_clip
    ``NAME/PRETRAINED`` pair (e.g. ``ViT-B-32/laion2b_s34b_b79k``)."""
    import open_clip

    if Path(ref).is_dir():
        name = f"local-dir:{ref}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        return model.eval(), preprocess, open_clip.get_tokenizer(name)
    if ref.startswith("hf-hub:"):
        model, _, preprocess = open_clip.create_model_and_transforms(ref, device=device)
        return model.eval(), preprocess, open_clip.get_tokenizer(ref)
    name, _, pretrained = ref.partition("/")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)
