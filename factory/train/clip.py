"""Train the tiny OpenCLIP model on reference-world images and their captions
(contrastive, open_clip's own ClipLoss), for caption similarity and CLIP scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import tiny_clip
from ..world.palette import allowed_pairs
from .data import load_training_set
from .diffusion import _log
from .loop import TrainConfig, train


def colour_retrieval(model, tokenizer, images: np.ndarray, fg_bg: list[tuple[str, str]]) -> float:
    """Share of images whose own colour pair's caption scores highest among all pairs'."""
    pairs = allowed_pairs()
    texts = tokenizer([f"{fg} handwritten digits on a {bg} background" for fg, bg in pairs])
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        v = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    best = (v @ t.T).argmax(1).numpy()
    return float(np.mean([pairs[b] == p for b, p in zip(best, fg_bg)]))


def train_clip(cfg: TrainConfig, data: str, folder: Path, batch: int = 128) -> None:
    from open_clip.loss import ClipLoss

    log = _log(cfg.out)
    model, _, tokenizer = tiny_clip.create(folder, cfg.seed)
    ts = load_training_set(data)
    tokens = tokenizer(ts.captions)
    test = load_training_set("world:test:300")
    from ..train.data import scene_colours

    test_pairs = scene_colours("test", 300)
    loss = ClipLoss()
    log(f"clip: {sum(p.numel() for p in model.parameters())} params, {len(ts)} image-caption pairs")

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x = torch.from_numpy(ts.images[idx]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        image_features, text_features, logit_scale = model(x, tokens[idx])[:3]
        return loss(image_features, text_features, logit_scale)

    def evaluate(step):
        return {"colour_retrieval": round(colour_retrieval(model, tokenizer, test.images, test_pairs), 4)}

    train(cfg, [model], loss_fn, evaluate=evaluate, export=lambda: tiny_clip.save(model, folder), log=log)
    log(f"saved {folder}")
