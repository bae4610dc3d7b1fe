"""A microscopic, randomly initialised BLIP-2 (OPT) built offline, for tests and demos.

Same classes and folder layout as ``Salesforce/blip2-opt-*``: a
``Blip2ForConditionalGeneration`` (ViT on 64x64 images, patch 16; a 1-layer
Q-Former; a 1-layer OPT) and a ``Blip2Processor`` (``BlipImageProcessor`` at
64x64 + an OPT-style byte-level BPE tokenizer whose vocabulary is the world's
caption words). ``from_pretrained(folder)`` loads both like any hub model.

Recent transformers expand an ``<image>`` token ``num_query_tokens`` times in
the text; the processor adds that token to the tokenizer, and the model's
``image_token_index`` is its id.
"""
from __future__ import annotations

import json
from pathlib import Path

from .tiny_sd import caption_words, whole_word_merges

HIDDEN = 32
NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 64
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: pad 1, bos = eos = "</s>" 2


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's base alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(folder: str | Path, decode_only: list[str] = ()):
    """An OPT-style (GPT-2 byte-level BPE, BOS ``</s>``) tokenizer over the world's words, no downloads.

    Merges chosen word by word (with and without the leading-space marker
    ``Ġ``) make every caption word one token; other text falls back to bytes.
    ``decode_only`` tokens follow them: no merge makes them, so encoding never
    gives them, but ids a model generates there decode to their text.
    """
    from transformers import GPT2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: list[str] = SPECIALS + _byte_chars()
    rank = whole_word_merges([list(w) for w in caption_words() + ["Ġ" + w for w in caption_words()]], vocab)
    known = set(vocab)
    vocab += [t for t in dict.fromkeys(decode_only) if t not in known]
    merges = [f"{a} {b}" for a, b in rank]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return GPT2Tokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(rank), bos_token="</s>",
                         eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
                         model_max_length=64)


def build_tiny_blip2(folder: str | Path, seed: int = 0):
    """Write a fresh tiny BLIP-2 + processor into ``folder``; returns (model, processor)."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    folder = Path(folder)
    tokenizer = write_tokenizer(folder)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         do_convert_rgb=True)
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)  # adds <image>
    image_token_index = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    vocab_size = len(tokenizer)

    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=16),
        qformer_config=Blip2QFormerConfig(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
            encoder_hidden_size=HIDDEN, cross_attention_frequency=1, vocab_size=vocab_size,
            max_position_embeddings=64),
        text_config=OPTConfig(
            vocab_size=vocab_size, hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=1,
            num_attention_heads=2, word_embed_proj_dim=HIDDEN, max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_index,
        image_text_hidden_size=HIDDEN,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor
