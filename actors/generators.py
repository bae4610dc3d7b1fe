"""Density-conditioned diffusion (SemAug): Stable Diffusion + a density ControlNet.

For each sample, the source's density map is the ControlNet's condition and
its caption the prompt; the generated image's labels are the *conditioning*
density map (count = its sum), points and the source's exemplar boxes. The
pipeline is diffusers' ``StableDiffusionControlNetPipeline`` (or the SDXL
one), loaded once per actor from a local folder or a hub id.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.errors import FactoryError
from factory.masks import drop_mask
from factory.recipe import check_model_ref
from factory.sample import Sample, stage_seed
from factory.stage import Resources, Stage, register, torch_dtype

from .augmenters import resize_density

def check_model_kind(ref: str, expected: tuple[str, ...], role: str) -> str:
    """A local model folder must hold the expected class (a UNet is not a ControlNet):
    say so at validation, before any GPU time is spent."""
    ref = check_model_ref(ref)
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return ref  # a hub id: checked when the actor loads it
    cfg_path = folder / "config.json"
    index_path = folder / "model_index.json"
    if index_path.is_file():
        kind = json.loads(index_path.read_text()).get("_class_name", "")
    elif cfg_path.is_file():
        kind = json.loads(cfg_path.read_text()).get("_class_name", "")
    else:
        raise ValueError(f"{ref} holds neither model_index.json nor config.json: not a diffusers {role} folder")
    if kind not in expected:
        raise ValueError(f"{ref} holds a {kind or 'unknown model'}, but a {role} ({' or '.join(expected)}) is expected here")
    return ref


class GeneratorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("models/tiny-sd", description="SD pipeline folder or hub id")
    controlnet: str | None = Field("models/tiny-controlnet", description="density ControlNet; null = caption only")
    steps: int = Field(20, gt=0, le=1000)
    guidance: float = Field(2.0, ge=0)
    control_scale: float = Field(1.0, ge=0)
    eta: float = Field(0.0, ge=0, le=1)
    size: int | None = Field(None, gt=0, description="output side (default: the density map's)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    compile: bool = Field(False, description="torch.compile the UNet and ControlNet (GPU)")
    sdxl: bool = False
    condition_gain: float | None = Field(None, gt=0, description="density -> condition image gain (default: the ControlNet's)")
    condition_sigma: float | None = Field(
        None, gt=0, le=16,
        description="draw the ControlNet's condition from the sample's points with Gaussians this wide (px, at "
                    "the output size) instead of passing its density map as it is; the stored density label "
                    "stays the source's. Narrower than the map the ControlNet was trained on keeps the objects "
                    "it draws apart (benchmarks/sampler_sweep.py --condition-sigma)")

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        return check_model_kind(v, ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline",
                                    "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline"), "Stable Diffusion pipeline")

    @field_validator("controlnet")
    @classmethod
    def _controlnet(cls, v):
        return None if v is None else check_model_kind(v, ("ControlNetModel",), "ControlNet")

    @model_validator(mode="after")
    def _controlnet_fits_unet(self):
        if self.controlnet:
            controlnet_mismatch(self.model, self.controlnet)
        return self


def _local_config(folder: str, sub: str = "") -> dict | None:
    path = Path(folder).expanduser() / sub / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def controlnet_mismatch(model: str, controlnet: str) -> None:
    """A ControlNet must be made for the pipeline's UNet (same latent channels, widths and text
    width) and its conditioning embedding must take an image at the pipeline's pixel size to the
    latent grid (one stage per halving by the VAE): else diffusers fails on a GPU worker with a
    shape error, or the condition lands on the wrong grid. Checked on local folders, before any
    model loads (a hub id is checked when it loads)."""
    cn, unet, vae = _local_config(controlnet), _local_config(model, "unet"), _local_config(model, "vae")
    if not (cn and unet):
        return
    for key in ("in_channels", "block_out_channels", "cross_attention_dim"):
        if key in cn and key in unet and cn[key] != unet[key]:
            raise ValueError(f"the ControlNet {controlnet} was made for another UNet: its {key} is {cn[key]}, "
                             f"{model}'s UNet has {unet[key]}; train one for this pipeline "
                             f"(`factory train controlnet --pipeline {model}`)")
    if cn.get("conditioning_channels", 3) != 3:
        raise ValueError(f"the ControlNet {controlnet} takes {cn['conditioning_channels']}-channel conditions; "
                         f"the density condition is a 3-channel image (the map in every channel)")
    if vae and "conditioning_embedding_out_channels" in cn:
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        cn_scale = 2 ** (len(cn["conditioning_embedding_out_channels"]) - 1)
        if cn_scale != vae_scale:
            raise ValueError(f"the ControlNet {controlnet} brings its condition image down {cn_scale}x, but "
                             f"{model}'s VAE makes latents {vae_scale}x smaller than the image: the condition "
                             f"would not match the latent grid; use a ControlNet made for this pipeline")


@register
class DensityControlNetGenerator(Stage):
    name = "generate"
    Params = GeneratorParams
    needs = frozenset({"caption"})
    # memory: peak RSS 1,327 MB with the tiny SD + ControlNet (benchmarks/stage_memory.py), +25 %;
    # SD 1.5 needs several times that: raise it in the recipe's resources
    resources = Resources(num_cpus=0.5, num_gpus=1.0, memory=int(1.625 * 2**30))
    batch_size = 16

    @classmethod
    def needs_with(cls, params: dict) -> dict[str, str]:
        out = super().needs_with(params)
        if params.get("controlnet") and params.get("condition_sigma"):
            out["points"] = ("its condition_sigma draws the ControlNet's condition from the objects' points "
                             "(remove condition_sigma to condition on the source's density maps)")
        return out

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        import torch

        p = self.params
        self.torch = torch
        self.dtype = torch_dtype(p.dtype, self.device)
        self.pipe = self._load()
        self.gain = p.condition_gain or self._gain()

    def _load(self):
        import diffusers

        p = self.params
        kw = dict(torch_dtype=self.dtype)
        try:
            if p.controlnet:
                controlnet = diffusers.ControlNetModel.from_pretrained(p.controlnet, **kw)
                cls = diffusers.StableDiffusionXLControlNetPipeline if p.sdxl else diffusers.StableDiffusionControlNetPipeline
                pipe = cls.from_pretrained(p.model, controlnet=controlnet, **kw, **self._no_safety())
            else:
                cls = diffusers.StableDiffusionXLPipeline if p.sdxl else diffusers.StableDiffusionPipeline
                pipe = cls.from_pretrained(p.model, **kw, **self._no_safety())
        except OSError as e:
            raise FactoryError(f"could not load {p.model} / {p.controlnet}: {e}") from None
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(self.device)
        if self.device == "cuda":
            from diffusers.models.attention_processor import AttnProcessor2_0

            pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA
            if p.compile:
                pipe.unet = self.torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
                if p.controlnet:
                    pipe.controlnet = self.torch.compile(pipe.controlnet, mode="reduce-overhead", fullgraph=True)
        return pipe

    def _no_safety(self) -> dict:
        return {} if self.params.sdxl else {"safety_checker": None, "requires_safety_checker": False}

    def _gain(self) -> float:
        from factory.train.diffusion import CONDITION_FILE, DEFAULT_GAIN

        f = Path(str(self.params.controlnet or "")) / CONDITION_FILE
        return json.loads(f.read_text())["gain"] if f.is_file() else DEFAULT_GAIN

    def process(self, samples: list[Sample]) -> None:
        ready = self.usable(samples)
        # One pipeline call per output size: a batch shares its latent shape.
        by_size: dict[tuple, list[Sample]] = {}
        for s in ready:
            by_size.setdefault(self._size(s), []).append(s)
        for size, group in by_size.items():
            try:
                self._generate(group, size)
            except Exception as e:  # noqa: BLE001 - the batch fails, the run goes on
                for s in group:
                    s.fail(self.name, f"{type(e).__name__}: {e}")

    def unusable(self, s: Sample) -> str | None:
        if not s.meta.get("caption"):
            return "no caption: give the source captions, or add a `caption` stage before `generate`"
        if s.density is None and self.params.controlnet:
            return "no density map: the source has no density and no points"
        if s.density is not None and s.image is not None and s.density.shape != s.image.shape[:2]:
            return f"density map shape {s.density.shape} does not match the image {s.image.shape[:2]}"
        if s.density is not None and float(s.density.min()) < 0:
            return "the count map has negative values"
        if self.params.controlnet and self.params.condition_sigma and "points" not in s.meta:
            return ("condition_sigma draws the condition from the sample's points, and it has none: "
                    "use a source with points, or remove condition_sigma")
        return None

    def _size(self, s: Sample) -> tuple[int, int]:
        if self.params.size:
            return (self.params.size, self.params.size)
        h, w = (s.density if s.density is not None else s.image).shape[:2]
        return (h - h % 8, w - w % 8)

    def _generate(self, group: list[Sample], size: tuple[int, int]) -> None:
        torch, p = self.torch, self.params
        gens = [torch.Generator(self.device).manual_seed(stage_seed(s.seed, self.name)) for s in group]
        kw = dict(prompt=[s.meta["caption"] for s in group], num_inference_steps=p.steps, guidance_scale=p.guidance,
                  eta=p.eta, height=size[0], width=size[1], generator=gens, output_type="np")
        if p.controlnet:
            from factory.train.diffusion import density_condition

            dens = np.stack([self._condition_map(s, size) for s in group])
            kw.update(image=density_condition(dens, self.gain).to(self.device, self.dtype),
                      controlnet_conditioning_scale=p.control_scale)
        with torch.inference_mode():
            images = self.pipe(**kw).images
        for s, img in zip(group, images):
            self._label(s, (np.clip(img, 0, 1) * 255).round().astype(np.uint8), size)

    def _condition_map(self, s: Sample, size: tuple[int, int]) -> np.ndarray:
        """The count map the ControlNet sees. With ``condition_sigma``, one Gaussian of that width per
        point, each still summing to one: the tiny ControlNet, trained on the world's 1.5 px maps, draws
        digits wide enough to touch a neighbour in 10-12 % of variants; a narrower map at sampling time
        keeps them apart (README, "The sampler"). Its peaks are higher too, so the gain stays the
        ControlNet's: the condition's total, the count, is what the model was trained to read."""
        if not self.params.condition_sigma:
            return resize_density(s.density, size)
        from factory.world.scenes import density_map

        h, w = s.density.shape if s.density is not None else s.image.shape[:2]
        sy, sx = size[0] / h, size[1] / w
        points = [[x * sx, y * sy] for x, y in s.meta["points"]]
        return density_map(points, shape=size, sigma=self.params.condition_sigma).astype(np.float32)

    def _label(self, s: Sample, image: np.ndarray, size: tuple[int, int]) -> None:
        h, w = s.density.shape if s.density is not None else s.image.shape[:2]
        sy, sx = size[0] / h, size[1] / w
        if s.density is not None:
            s.density = resize_density(s.density, size)
            s.meta["count"] = int(round(float(s.density.sum())))
        if (sy, sx) != (1.0, 1.0):
            s.meta["points"] = [[x * sx, y * sy] for x, y in s.meta.get("points", [])]
            s.meta["boxes"] = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in s.meta.get("boxes", [])]
        s.image = image
        # The generator draws an object at each point, but not where its pixels are: no mask.
        dropped = drop_unconditioned_labels(s.meta) + drop_mask(s)
        s.add_op("generate", generator=type(self.pipe).__name__, model=self.params.model,
                 controlnet=self.params.controlnet, steps=self.params.steps, guidance=self.params.guidance,
                 control_scale=self.params.control_scale, eta=self.params.eta,
                 seed=stage_seed(s.seed, self.name), condition_gain=self.gain,
                 **({"condition_sigma": self.params.condition_sigma}
                    if self.params.controlnet and self.params.condition_sigma else {}),
                 **({"labels_dropped": dropped} if dropped else {}))


# Per-object labels the density map does not condition: the generator draws *an* object at each
# point, not the source's digit at the source's size, so these would be false of the image.
UNCONDITIONED = ("digits", "sizes")


def drop_unconditioned_labels(meta: dict) -> list[str]:
    """Remove the source's labels that a density-conditioned image does not hold; returns their names."""
    dropped = [k for k in UNCONDITIONED if k in meta]
    for k in dropped:
        del meta[k]
    attrs = meta.get("attributes")
    if isinstance(attrs, dict) and "large_objects" in attrs:  # follows from the sizes
        del attrs["large_objects"]
        dropped.append("attributes.large_objects")
    return dropped


# --- generators with a latent space --------------------------------------------

class LatentSamplerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generator: str = Field("models/latent-ae", description="generator folder: the shipped autoencoder or a "
                                                           "StyleGAN-family checkpoint (see factory.latent.generator)")

    @field_validator("generator")
    @classmethod
    def _generator(cls, v):
        from factory.latent.generator import check_generator_ref

        return check_generator_ref(v)


@register
class LatentSampler(Stage):
    """Draw a code from the generator's prior and synthesise its image.

    The code's seed is the source's (a `latents` source gives seed i to
    ``seed_00000i``), so every variant of a source starts from the same code
    and an `edit` stage can sweep alpha over the variants; samples from other
    sources draw from their own sample seed. The code travels in
    ``meta["latent"]`` for the stages that edit it.
    """

    name = "sample_latent"
    Params = LatentSamplerParams
    provides = frozenset({"image", "latent"})
    # memory: peak RSS 953 MB with the shipped latent-ae (benchmarks/stage_memory.py), +25 %
    resources = Resources(num_cpus=0.25, num_gpus=0.25, memory=int(1.1875 * 2**30))
    batch_size = 64

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        from factory.latent.generator import load_generator

        self.generator = load_generator(self.params.generator, self.device)

    def process(self, samples: list[Sample]) -> None:
        import torch

        seeds = [int(s.meta.get("latent_seed", stage_seed(s.seed, self.name))) for s in samples]
        z = self.generator.sample_latents(seeds)
        with torch.no_grad():
            images = self.generator.synthesize(torch.from_numpy(z).to(self.generator.device))
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for s, code, seed, image in zip(samples, z, seeds, pixels):
            s.image = image
            s.density = None  # a sampled image has no density label: only its checks say what it shows
            dropped = drop_mask(s)  # nor the source's objects, whose mask this would be
            s.meta["latent"] = {"z": [float(v) for v in code.astype(np.float32)],
                                "generator": self.generator.model_id, "seed": seed}
            s.add_op(self.name, generator=self.generator.model_id, latent_seed=seed,
                     **({"labels_dropped": dropped} if dropped else {}))
