"""Real-size model stacks at random weights, built offline from their published configurations.

`factory models init NAME --out DIR` writes an ordinary diffusers / transformers / open_clip
folder, loaded by the stages exactly as a downloaded one is:

- ``sd15``: Stable Diffusion 1.5 (UNet 860 M, VAE, CLIP ViT-L/14 text tower, CLIP BPE tokenizer,
  PNDM scheduler) in the pipeline layout (``model_index.json`` + one folder per component);
- ``sd15-controlnet``: a ControlNet made from that UNet (``ControlNetModel.from_unet``, the
  3-channel conditioning embedding that takes a 512 x 512 image to the 64 x 64 latent grid);
- ``blip2-opt-2.7b``: ``Blip2ForConditionalGeneration`` (EVA ViT-g, Q-Former, OPT-2.7B) and its
  processor, in bf16 by default (fp32 is 15 GB);
- ``openclip-vit-b-32``: OpenCLIP ViT-B/32 in open_clip's local-dir format;
- ``csrnet-counter``: the real-size counter (:class:`factory.models.counter.CSRNetCounter`).

Random weights serve one purpose: running the code path at real size and measuring its cost
(time, memory) without a hub. Only the configurations live in the repository
(``factory/models/configs``), never weights. The product loads hub ids and folders of real
weights the same way.

Two things differ from the published models, and neither changes a cost: the CLIP tokenizer
is the real one (its BPE table ships in open_clip's wheel), but BLIP-2's OPT tokenizer (GPT-2's
50 k BPE, not shipped by any installed package) is the project's byte-level BPE over the
reference world's words, so a random model's caption decodes to a few of those words.
``narrow=True`` keeps every architecture's topology, image sizes and vocabularies but divides
the widths and depths, for tests and for a CPU rehearsal of the GPU benchmark.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from factory.errors import FactoryError

from .folder import published_config
from .tiny_sd import controlnet_from_unet

NAMES = ("sd15", "sd15-controlnet", "blip2-opt-2.7b", "openclip-vit-b-32", "csrnet-counter")


def _narrowed(cfg: dict, **changes) -> dict:
    return {**cfg, **changes}


# ---------------------------------------------------------------------------------- SD 1.5


def clip_bpe_merges() -> list[str]:
    """CLIP's 48,894 BPE merges ("a b" lines), as open_clip's SimpleTokenizer reads them from
    the vocabulary its wheel ships."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    return gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]


def clip_tokenizer(folder: str | Path, max_length: int = 77):
    """The real CLIP BPE tokenizer (49,408 tokens), from the vocabulary open_clip's wheel ships:
    the same table ``openai/clip-vit-large-patch14`` holds, built as open_clip's SimpleTokenizer
    builds it and saved as a transformers ``CLIPTokenizer``."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = clip_bpe_merges()
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def sd15_components(narrow: bool = False, seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """SD 1.5's components at random weights (``narrow``: a tenth of the widths, same topology)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg = published_config("sd15/unet.json"), published_config("sd15/vae.json")
    text_cfg = published_config("sd15/text_encoder.json")
    if narrow:
        unet_cfg = _narrowed(unet_cfg, block_out_channels=[32, 64, 128, 128], cross_attention_dim=96,
                             layers_per_block=1)
        vae_cfg = _narrowed(vae_cfg, block_out_channels=[32, 32, 64, 64], layers_per_block=1)
        text_cfg = _narrowed(text_cfg, hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                             projection_dim=96)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items() if k != "architectures"}))
    scheduler = PNDMScheduler.from_config(published_config("sd15/scheduler.json"))
    tokenizer = clip_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def write_sd15(out: Path, narrow: bool, seed: int, dtype) -> None:
    from diffusers import StableDiffusionPipeline

    comps = sd15_components(narrow, seed, out / "tokenizer")
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(dtype=dtype).save_pretrained(out)


def write_sd15_controlnet(out: Path, narrow: bool, seed: int, dtype, unet_from: str | None) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    if unet_from:  # the ControlNet of an existing SD 1.5 folder (what `factory train controlnet` starts from)
        unet = UNet2DConditionModel.from_pretrained(unet_from, subfolder="unet", torch_dtype=torch.float32)
    else:
        unet = sd15_components(narrow, seed)["unet"]
    controlnet_from_unet(unet, vae_scale=8).to(dtype=dtype).save_pretrained(out)


# ---------------------------------------------------------------------------------- BLIP-2


OPT_VOCAB = 50272  # the published text_config.vocab_size (50,265 tokens, padded to a multiple of 8)


def english_pieces(n: int) -> list[str]:
    """Up to ``n`` word pieces in GPT-2's byte-level spelling (``Ġ`` marks a word's start), taken
    from CLIP's BPE table (in open_clip's wheel; ``</w>`` marks a word's end there): what the
    stand-in OPT tokenizer decodes generated ids to, so a random BLIP-2 writes a caption of
    real-looking pieces (and at the published length) instead of ids nothing decodes."""
    pieces = ["".join(m.split()) for m in clip_bpe_merges()]
    return [("Ġ" + p[:-4]) if p.endswith("</w>") else p for p in pieces][:n]


def blip2_config(narrow: bool, tokenizer):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    cfg = published_config("blip2-opt-2.7b.json")
    vision, qformer, text = cfg["vision_config"], cfg["qformer_config"], dict(cfg["text_config"])
    if narrow:
        vision = _narrowed(vision, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        qformer = _narrowed(qformer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, encoder_hidden_size=64)
        text = _narrowed(text, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64)
    text.pop("model_type", None)
    # The published ids are OPT's (bos 2, eos 50118 = "\n"); this tokenizer has its own.
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    return Blip2Config(vision_config=Blip2VisionConfig(**vision).to_dict(),
                       qformer_config=Blip2QFormerConfig(**qformer).to_dict(),
                       text_config=OPTConfig(**text).to_dict(), num_query_tokens=cfg["num_query_tokens"])


def write_blip2(out: Path, narrow: bool, seed: int, dtype) -> None:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from .tiny_blip2 import write_tokenizer

    tokenizer = write_tokenizer(out, decode_only=english_pieces(OPT_VOCAB - 7))
    config = blip2_config(narrow, tokenizer)
    side = config.vision_config.image_size
    image_processor = BlipImageProcessor(size={"height": side, "width": side}, do_convert_rgb=True)
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)
    config.image_token_index = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: BLIP-2 OPT-2.7B is 15 GB in fp32
    try:
        model = Blip2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ---------------------------------------------------------------------------------- OpenCLIP


def write_openclip(out: Path, narrow: bool, seed: int, dtype) -> None:
    import open_clip
    import torch

    from .tiny_clip import save

    model_cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json").read_text())
    if narrow:
        model_cfg = {"embed_dim": 64,
                     "vision_cfg": {**model_cfg["vision_cfg"], "layers": 2, "width": 64, "head_width": 32},
                     "text_cfg": {**model_cfg["text_cfg"], "width": 64, "heads": 2, "layers": 2}}
    cfg = {"model_cfg": model_cfg,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                              "interpolation": "bicubic", "resize_mode": "shortest"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    save(model.to(dtype), out)


# ---------------------------------------------------------------------------------- counter


def write_counter(out: Path, narrow: bool, seed: int, dtype) -> None:
    import torch

    from .counter import CSRNetCounter

    torch.manual_seed(seed)
    if narrow:
        model = CSRNetCounter(frontend=[8, "M", 16, "M", 32, "M", 32], backend=[32, 16])
    else:
        model = CSRNetCounter()
    model.save_pretrained(out)


def init_model(name: str, out: str | Path, narrow: bool = False, seed: int = 0, dtype: str | None = None,
               unet_from: str | None = None) -> Path:
    """Write model ``name`` (one of :data:`NAMES`) at random weights into ``out``; returns it."""
    import torch

    if name not in NAMES:
        raise FactoryError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FactoryError(f"{out} is not empty: give a new folder (nothing was written)")
    default = "bf16" if name == "blip2-opt-2.7b" else "fp32"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if (dtype or default) not in dtypes:
        raise FactoryError(f"unknown dtype {dtype!r}; choose one of {', '.join(dtypes)}")
    torch_dtype = dtypes[dtype or default]
    if unet_from and name != "sd15-controlnet":
        raise FactoryError("--unet-from only applies to sd15-controlnet (the UNet its encoder is copied from)")
    out.mkdir(parents=True, exist_ok=True)
    try:
        if name == "sd15":
            write_sd15(out, narrow, seed, torch_dtype)
        elif name == "sd15-controlnet":
            write_sd15_controlnet(out, narrow, seed, torch_dtype, unet_from)
        elif name == "blip2-opt-2.7b":
            write_blip2(out, narrow, seed, torch_dtype)
        elif name == "openclip-vit-b-32":
            write_openclip(out, narrow, seed, torch_dtype)
        else:
            write_counter(out, narrow, seed, torch_dtype)
    except BaseException:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # no half-written model folder that would load later
        raise
    (out / "RANDOM_WEIGHTS.txt").write_text(
        f"{name}{' (narrowed)' if narrow else ''} at random weights (seed {seed}), built by `factory models init` "
        f"from factory/models/configs: for measuring the code path's cost, not for use.\n")
    return out

