"""Captioners and caption swaps (SemAug §3.2).

``Blip2Captioner`` writes a caption for a source that has none (BLIP-2 via
transformers), computed once per source key, not once per variant.
``CaptionSwapper`` replaces, with probability p_c, a sample's caption by the
caption of another training image whose text embedding has cosine similarity
above t_c; with none above t_c the original stays. Embeddings come from
OpenCLIP or BLIP-2's text side; every pool caption is embedded once, and a
batch's candidates are one matrix product against the pool.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.errors import FactoryError
from factory.recipe import check_model_ref
from factory.sample import Sample
from factory.stage import Resources, Stage, register, torch_dtype


# --- text encoders ---------------------------------------------------------------

def check_encoder(ref: str) -> str:
    kind, _, model = ref.partition(":")
    if kind not in ("openclip", "blip2") or not model:
        raise ValueError(f"encoder {ref!r} must be 'openclip:MODEL' or 'blip2:MODEL' (MODEL: a folder or hub id)")
    if kind == "openclip" and (model.startswith("hf-hub:") or ("/" in model and not Path(model).exists()
                                                              and not model.startswith((".", "/", "~")))):
        return ref  # hub id or NAME/PRETRAINED tag
    check_model_ref(model)
    return ref


class TextEncoder:
    """Unit-norm text embeddings from OpenCLIP or BLIP-2 (``openclip:REF`` / ``blip2:REF``)."""

    def __init__(self, ref: str, device: str = "cpu"):
        import torch

        self.torch = torch
        self.device = device
        kind, _, model = ref.partition(":")
        if kind == "openclip":
            from factory.models import tiny_clip

            self.model, _, self.tokenizer = tiny_clip.load(model, device)
            self._encode = lambda texts: self.model.encode_text(self.tokenizer(texts).to(device))
        else:
            from transformers import AutoTokenizer, Blip2TextModelWithProjection

            self.model = Blip2TextModelWithProjection.from_pretrained(model).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self._encode = lambda texts: self.model(
                **self.tokenizer(texts, padding=True, return_tensors="pt").to(device)).text_embeds[:, 0]

    def __call__(self, texts: list[str], chunk: int = 512) -> np.ndarray:
        out = []
        with self.torch.inference_mode():
            for i in range(0, len(texts), chunk):
                e = self._encode(texts[i: i + chunk]).float()
                out.append(self.torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


# --- caption swaps -------------------------------------------------------------------

class CaptionSwapParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    p: float = Field(0.5, ge=0, le=1, description="p_c: probability that a variant swaps its caption")
    threshold: float = Field(0.7, ge=-1, le=1, description="t_c: least cosine similarity of a swapped-in caption")
    random_swap: bool = Field(False, description="allow t_c <= 0 (random swaps break layout/semantics)")
    encoder: str = Field("openclip:models/tiny-clip", description="openclip:MODEL or blip2:MODEL")
    pool: list[dict] | None = Field(None, description="sources whose captions may be swapped in (default: the recipe's)")

    _check = field_validator("encoder")(classmethod(lambda cls, v: check_encoder(v)))

    @model_validator(mode="after")
    def _explicit_random(self):
        if self.threshold <= 0 and not self.random_swap:
            raise ValueError("threshold <= 0 swaps captions at random, which breaks layout and semantics; "
                             "set random_swap: true if that is what you want")
        return self


@register
class CaptionSwapper(Stage):
    name = "swap_caption"
    Params = CaptionSwapParams
    needs = frozenset({"caption"})
    # memory: peak RSS 1,218 MB with the shipped CLIP (benchmarks/stage_memory.py), +25 %
    resources = Resources(num_cpus=0.25, num_gpus=0.1, memory=int(1.5 * 2**30))
    batch_size = 64

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        from factory.sources import source_captions

        sources = self.params.pool or self.context.get("sources") or []
        pool = [row for spec in sources for row in source_captions(spec)]
        pool = [row for row in pool if row[1]]
        if not pool:
            raise FactoryError("caption swap has an empty caption pool: give sources with captions (params.pool)")
        freq = Counter(c for _, c, _ in pool)
        self.captions = sorted(freq)  # unique captions, embedded once
        self.weights = np.array([freq[c] for c in self.captions], dtype=float)  # swap to a random *image's* caption
        category = {c: cat for _, c, cat in pool}
        self.categories = [category[c] for c in self.captions]
        self.encoder = TextEncoder(self.params.encoder, self.device)
        self.embeddings = self.encoder(self.captions)

    def process(self, samples: list[Sample]) -> None:
        p = self.params
        own = [s.meta.get("caption", "") for s in samples]
        sims = self.encoder(own) @ self.embeddings.T  # (batch, pool): one matrix product
        for s, caption, row in zip(samples, own, sims):
            rng = self.rng(s)
            record = {"swapped": False, "original": caption, "caption": caption, "similarity": 1.0,
                      "p": p.p, "threshold": p.threshold, "encoder": p.encoder}
            if caption and rng.random() < p.p:
                ok = np.flatnonzero((row > p.threshold) & (np.asarray(self.captions) != caption))
                if len(ok):
                    w = self.weights[ok] / self.weights[ok].sum()
                    j = int(ok[rng.choice(len(ok), p=w)])
                    record.update(swapped=True, caption=self.captions[j], similarity=round(float(row[j]), 4))
                    s.meta["caption"] = self.captions[j]
                    source_cat = s.meta.get("category", self.categories[j])
                    if self.categories[j] != source_cat or not self.categories[j]:
                        s.meta["boxes_approximate"] = True  # exemplars of another category
                else:
                    record["no_candidate"] = True
            s.meta["caption_swap"] = record
            s.add_op("swap_caption", swapped=record["swapped"], similarity=record["similarity"], p=p.p,
                     threshold=p.threshold, encoder=p.encoder)


# --- captioning ----------------------------------------------------------------------

class CaptionerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("Salesforce/blip2-opt-2.7b", description="a BLIP-2 folder or hub id")
    prompt: str | None = Field(None, description="optional text prompt, e.g. 'a photo of'")
    max_new_tokens: int = Field(30, gt=0, le=200)
    only_missing: bool = Field(True, description="caption only samples that have no caption")
    dtype: str = Field("auto", pattern="^(auto|fp32|fp16|bf16)$")

    _check = field_validator("model")(classmethod(lambda cls, v: check_model_ref(v)))


@register
class Blip2Captioner(Stage):
    name = "caption"
    Params = CaptionerParams
    provides = frozenset({"caption"})
    # memory: peak RSS 1,124 MB with a tiny BLIP-2 (benchmarks/stage_memory.py), +25 %;
    # a real BLIP-2 needs several times that: raise it in the recipe's resources
    resources = Resources(num_cpus=0.5, num_gpus=0.5, memory=int(1.375 * 2**30))
    batch_size = 16
    CACHE = 10_000

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.torch = torch
        self.dtype = torch_dtype(self.params.dtype, self.device)
        try:
            self.processor = Blip2Processor.from_pretrained(self.params.model)
            self.model = Blip2ForConditionalGeneration.from_pretrained(self.params.model, dtype=self.dtype)
        except OSError as e:
            raise FactoryError(f"could not load the BLIP-2 captioner {self.params.model}: {e}") from None
        if getattr(self.model.config, "image_token_index", None) is None or not self.processor.num_query_tokens:
            # transformers >= 4.47 puts the image (query) embeddings at <image> tokens that the processor
            # expands; a folder without them would caption from the prompt alone, ignoring the image.
            raise FactoryError(f"BLIP-2 folder {self.params.model} predates image tokens (no image_token_index "
                               "in config.json or num_query_tokens in processor_config.json); re-save it with a "
                               "current transformers")
        self.model.to(self.device).eval()
        self.cache: OrderedDict[str, str] = OrderedDict()  # source key -> caption

    def process(self, samples: list[Sample]) -> None:
        todo = [s for s in samples if not (self.params.only_missing and s.meta.get("caption"))]
        need: dict[str, Sample] = {}
        for s in todo:
            key = s.meta.get("source_key", s.key)
            if key not in self.cache:
                need.setdefault(key, s)  # variants of one source share one caption
        if need:
            for key, caption in zip(need, self._caption([s.image for s in need.values()])):
                self.cache[key] = caption
                if len(self.cache) > self.CACHE:
                    self.cache.popitem(last=False)
        for s in todo:
            s.meta["caption"] = self.cache[s.meta.get("source_key", s.key)]
            s.add_op("caption", captioner="Blip2ForConditionalGeneration", model=self.params.model)

    def _caption(self, images: list[np.ndarray]) -> list[str]:
        kw = {"text": [self.params.prompt] * len(images)} if self.params.prompt else {}
        inputs = self.processor(images=list(images), return_tensors="pt", **kw)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)  # token ids and masks stay integers
        with self.torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.params.max_new_tokens, do_sample=False)
        if self.model.config.use_decoder_only_language_model:
            # A decoder-only LM (OPT) returns its input (image tokens, BOS, prompt) ahead of the new
            # tokens; without a prompt, generate builds num_query_tokens image tokens + BOS itself.
            n_in = inputs["input_ids"].shape[1] if "input_ids" in inputs else self.model.config.num_query_tokens + 1
            ids = ids[:, n_in:]
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
