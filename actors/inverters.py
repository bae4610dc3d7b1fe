"""Inverters: bring real images into a generator's latent space, so `edit` can move them.

One stage, ``invert``, four methods (DESIGN §1 item 3):

    encoder            the generator's trained encoder, one pass
    optimise           Adam on the code from the prior mean: masked, blurred MSE, code kept in the norm ball
    encoder+optimise   the same, warm-started from the encoder (the default: best and still cheap)
    ddim               a diffusion model's initial noise, by inverse DDIM (no latent code for editors)

A sample whose reconstruction error stays above ``max_mse`` is failed with its
reason (an edit of a code that does not reproduce the image would edit some
other image), not silently kept. The real image stays the sample's image:
the `edit` stage stores it as the "before" image.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from factory.errors import FactoryError
from factory.masks import drop_mask
from factory.sample import Sample
from factory.stage import Resources, Stage, register

from .generators import check_model_kind

METHODS = ("encoder", "optimise", "encoder+optimise", "ddim")
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline")
# The inverted DDIM noise travels to later stages (in meta["_ddim_latent"],
# never written to the JSON) only up to this many values: the tiny SD's
# 4x32x32 is 4,096 values, some 40 KB of JSON text a row; SD 1.5's 4x64x64
# at 512 px would add four times that to every row Ray moves, for no stage
# that reads it yet, so it is dropped and the labels say so.
MAX_KEPT_NOISE = 4096


class InvertParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field("encoder+optimise", description=" | ".join(METHODS))
    generator: str = Field("models/latent-ae", description="latent generator folder (latent methods)")
    steps: int = Field(200, ge=1, le=100_000, description="optimisation steps (most; an image stops when converged)")
    lr: float = Field(0.05, gt=0, description="Adam learning rate on the code")
    sigma: float = Field(3.0, ge=0, description="Gaussian blur of the loss, px (0 = plain MSE)")
    tol: float = Field(1e-3, gt=0, description="converged: relative loss improvement over 10 steps below this")
    max_mse: float | None = Field(0.01, gt=0, description="fail a sample whose reconstruction MSE is above (None keeps all)")
    model: str = Field("models/tiny-sd", description="ddim: Stable Diffusion pipeline folder or hub id")
    controlnet: str | None = Field(None, description="ddim: density ControlNet to condition the inversion on")
    ddim_steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(1.0, ge=0, description="ddim: classifier-free guidance (1 = none, the most exact)")
    emit: Literal["image", "reconstruction"] = Field(
        "image", description="the sample's image afterwards: the real one, or its reconstruction")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v):
        from factory.recipe import check_choice

        return check_choice(v, METHODS, "inversion method")

    @model_validator(mode="after")
    def _models(self):
        # Only the models the method uses are checked: a ddim recipe need not ship a latent generator.
        if self.method == "ddim":
            self.model = check_model_kind(self.model, SD_PIPELINES, "Stable Diffusion pipeline")
            if self.controlnet is not None:
                self.controlnet = check_model_kind(self.controlnet, ("ControlNetModel",), "ControlNet")
        else:
            from factory.latent.generator import check_generator_ref

            self.generator = check_generator_ref(self.generator)
        return self


@register
class Inverter(Stage):
    name = "invert"
    Params = InvertParams
    provides = frozenset({"latent"})
    # memory: peak RSS 1,162 MB with the shipped latent-ae (benchmarks/stage_memory.py), +25 %
    resources = Resources(num_cpus=0.5, num_gpus=0.5, memory=int(1.4375 * 2**30))
    batch_size = 32

    def __init__(self, params=None, device=None, context=None):
        super().__init__(params, device, context)
        import torch

        self.torch = torch
        p = self.params
        if p.method == "ddim":
            from factory.latent.inversion import DDIMInverter

            self.ddim = DDIMInverter(p.model, p.controlnet, self.device)
        else:
            from factory.latent.generator import load_generator

            self.generator = load_generator(p.generator, self.device)
            if p.method != "optimise" and not self.generator.has_encoder:
                raise FactoryError(f"generator {p.generator} has no encoder, so method {p.method!r} cannot run: "
                                   f"use method: optimise")
            if p.method == "optimise":
                from factory.latent.inversion import prior_mean

                self.start = prior_mean(self.generator)  # once per actor: it samples 1,024 codes

    def process(self, samples: list[Sample]) -> None:
        ready = self.usable(samples)
        # One batch per image size (ddim takes any multiple of 8; the latent generators one size).
        by_size: dict[tuple, list[Sample]] = {}
        for s in ready:
            by_size.setdefault(s.image.shape, []).append(s)
        for group in by_size.values():
            try:
                if self.params.method == "ddim":
                    self._ddim(group)
                else:
                    self._latent(group)
            except Exception as e:  # noqa: BLE001 - the batch fails with its reason, the run goes on
                for s in group:
                    s.fail(self.name, f"{type(e).__name__}: {e}")

    def unusable(self, s: Sample) -> str | None:
        from factory.latent.inversion import size_problem

        if s.image is None:
            return "no image to invert: `invert` takes real images (a `latents` source already has codes)"
        if s.image.ndim != 3 or s.image.shape[2] != 3:
            return f"image of shape {s.image.shape} is not RGB (H, W, 3)"
        if self.params.method != "ddim":
            return size_problem(self.generator, s.image.shape)
        if not s.meta.get("caption"):
            return "no caption: DDIM inversion is conditioned on it; add a `caption` stage before `invert`"
        if self.params.controlnet and s.density is None:
            return "no density map: the ControlNet inversion is conditioned on it (the source has no density or points)"
        if self.params.controlnet and s.density.shape != s.image.shape[:2]:
            return f"density map shape {s.density.shape} does not match the image {s.image.shape[:2]}"
        return self.ddim.size_problem(s.image.shape)

    # --- latent generators ------------------------------------------------------

    def _latent(self, group: list[Sample]) -> None:
        from factory.latent.inversion import encoder_inversion, optimise_inversion, psnr_of, to_tensor, to_uint8

        p, g = self.params, self.generator
        x = to_tensor([s.image for s in group], g.device)
        n = len(group)
        if p.method == "encoder":
            z, err = encoder_inversion(g, x)
            mse = err["mse"]
            steps, converged = np.zeros(n, int), np.ones(n, bool)  # one pass: nothing to converge
            reasons = [None if p.max_mse is None or m <= p.max_mse else
                       f"MSE {m:.4f} above max_mse {p.max_mse} after the encoder's one pass: "
                       f"use method: encoder+optimise" for m in mse]
        else:
            z0 = np.repeat(self.start[None], n, axis=0) if p.method == "optimise" else None  # else: the encoder
            r = optimise_inversion(g, x, z0=z0, steps=p.steps, lr=p.lr, sigma=p.sigma, tol=p.tol, max_mse=p.max_mse)
            z, mse, steps, converged, reasons = r.z, r.mse, r.steps, r.converged, r.reasons
        recon = None
        if p.emit == "reconstruction":
            with self.torch.no_grad():
                recon = to_uint8(g.synthesize(self.torch.from_numpy(z).to(g.device)))
        psnr = psnr_of(mse)
        for i, s in enumerate(group):
            # No wall time here: it is not a label (two runs' shards would differ); the stage's
            # time goes to the shard's stats (factory.stage.record_seconds).
            s.meta["inversion"] = {"method": p.method, "mse": round(float(mse[i]), 6),
                                   "psnr": round(float(psnr[i]), 3), "steps": int(steps[i]),
                                   "converged": bool(converged[i])}
            # max_mse: None opts out of the quality gate: an unconverged code is then kept, marked converged: false.
            if reasons[i] and p.max_mse is not None:
                s.fail(self.name, f"inversion: {reasons[i]}")
                continue
            s.meta["latent"] = {"z": [float(v) for v in z[i]], "generator": g.model_id}
            # The reconstruction is another image: the real one's mask would not be its own.
            dropped = drop_mask(s) if recon is not None else []
            s.add_op("invert", method=p.method, generator=g.model_id, steps=p.steps, lr=p.lr, sigma=p.sigma,
                     tol=p.tol, max_mse=p.max_mse, **({"labels_dropped": dropped} if dropped else {}))
            if recon is not None:
                s.image = recon[i]

    # --- diffusion ---------------------------------------------------------------

    def _ddim(self, group: list[Sample]) -> None:
        from factory.latent.inversion import ddim_inversion, to_uint8

        p = self.params
        density = [s.density for s in group] if p.controlnet else None
        latents, recon, err = ddim_inversion(self.ddim, np.stack([s.image for s in group]),
                                             [s.meta["caption"] for s in group], steps=p.ddim_steps,
                                             density=density, guidance=p.guidance)
        images = to_uint8(recon)
        kept = latents[0].numel() <= MAX_KEPT_NOISE
        shape = list(latents.shape[1:])
        for i, s in enumerate(group):
            mse = float(err["mse"][i])
            s.meta["inversion"] = {
                "method": "ddim", "model": p.model, "controlnet": p.controlnet, "steps": p.ddim_steps,
                "guidance": p.guidance, "mse": round(mse, 6), "psnr": round(float(err["psnr"][i]), 3),
                "vae_psnr": round(float(err["vae_psnr"][i]), 3),
                "noise": f"{shape}, passed to later stages in _ddim_latent, not written" if kept else
                         f"dropped: {latents[0].numel()} values is more than {MAX_KEPT_NOISE} to carry per row",
            }
            if p.max_mse is not None and mse > p.max_mse:
                vae = float(err["vae_mse"][i])
                # The VAE's round trip bounds DDIM's: near it, more steps cannot help.
                fix = "raise max_mse or use a model whose VAE reconstructs better" if vae > 0.8 * mse else \
                    "raise ddim_steps or max_mse"
                s.fail(self.name, f"inversion: MSE {mse:.4f} above max_mse {p.max_mse} after DDIM inversion "
                                  f"(the VAE alone: {vae:.4f}): {fix}")
                continue
            if kept:
                # float32 precision to 5 decimals: far below what moves a DDIM sample, a third of the text.
                s.meta["_ddim_latent"] = {"shape": shape,
                                          "values": np.round(latents[i].float().cpu().numpy().ravel(), 5).tolist()}
            dropped = drop_mask(s) if p.emit == "reconstruction" else []
            s.add_op("invert", method="ddim", model=p.model, controlnet=p.controlnet, steps=p.ddim_steps,
                     guidance=p.guidance, max_mse=p.max_mse, **({"labels_dropped": dropped} if dropped else {}))
            if p.emit == "reconstruction":
                s.image = images[i]
