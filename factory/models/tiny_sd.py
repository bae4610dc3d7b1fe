"""The embedded default diffusion stack: a tiny Stable-Diffusion-format model.

Same classes and folder layout as SD 1.5 + ControlNet (diffusers), sized for
64x64 reference-world scenes on a CPU: AutoencoderKL (16, 32) with 4x32x32
latents, a UNet (32, 64) with cross-attention on a 2-layer CLIP text encoder,
a ControlNet made from the UNet, and a CLIP BPE tokenizer whose vocabulary is
the world's caption words. ``StableDiffusionControlNetPipeline.from_pretrained``
loads the result like any hub model.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..world.palette import PALETTE
from ..world.scenes import CAPTION_TEMPLATES

MAX_TOKENS = 16
EXTRA_WORDS = "a an the of photo image picture with and on over in plain background digits digit numbers numerals handwritten written objects many few some several".split()


def caption_words() -> list[str]:
    words = set(EXTRA_WORDS) | set(PALETTE)
    for t in CAPTION_TEMPLATES:
        words |= {w for w in t.replace("{", " ").replace("}", " ").split() if w.isalpha()}
    return sorted(words)


def bpe(parts: list[str], rank: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    while len(parts) > 1:
        pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def whole_word_merges(words: list[list[str]], vocab: list[str]) -> dict[tuple[str, str], int]:
    """Merges, chosen word by word, that make each word (given as its initial
    symbols) one token; ``vocab`` gains the merged symbols. Each word is first
    encoded with the merges so far, so no later word splits an earlier one."""
    rank: dict[tuple[str, str], int] = {}
    for symbols in words:
        parts = bpe(symbols, rank)
        while len(parts) > 1:
            rank[(parts[0], parts[1])] = len(rank)
            if parts[0] + parts[1] not in vocab:
                vocab.append(parts[0] + parts[1])
            parts = bpe(symbols, rank)
    return rank


def write_tokenizer(folder: str | Path):
    """A CLIP BPE tokenizer over the world's words, built without downloads.

    Every caption word is one token; unknown words fall back to characters.
    As in CLIP, the start and end tokens take the two highest ids: OpenCLIP
    pools a text at its end token by taking the argmax of the ids.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-")
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    rank = whole_word_merges([list(w[:-1]) + [w[-1] + "</w>"] for w in caption_words()], vocab)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in rank) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def build_components(folder: str | Path, seed: int = 0) -> dict:
    """Fresh, randomly initialised components of the tiny stack (saved into ``folder``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        # Self-attention over 32x32 latents costs most of a step and buys
        # nothing for plain-background scenes.
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def controlnet_from_unet(unet, vae_scale: int = 2):
    """A ControlNet made from ``unet`` (its encoder copied, zero convs at zero) whose conditioning
    embedding takes the density image down ``vae_scale`` times to the latent grid: one stage per
    halving, with the published ControlNet's widths (16, 32, 96, 256; SD 1.5's VAE scales by 8,
    the tiny one's 64x64 scenes to 32x32 latents by 2)."""
    import math

    from diffusers import ControlNetModel

    from .folder import published_config

    widths = published_config("sd15/controlnet.json")["conditioning_embedding_out_channels"]
    stages = int(math.log2(vae_scale)) + 1
    if 2 ** (stages - 1) != vae_scale or stages > len(widths):
        raise ValueError(f"a VAE scale factor of {vae_scale} has no conditioning embedding (1, 2, 4 or 8)")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(widths[:stages]),
                                     load_weights_from_unet=True)


def save_pipeline_folder(folder: str | Path, components: dict) -> None:
    """Write the SD layout (model_index.json + one subfolder per component)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
