"""Train the tiny Stable-Diffusion stack: VAE, text-to-image base, density ControlNet.

The diffusers way (cf. diffusers' train_text_to_image and train_controlnet
examples): DDPM noise on VAE latents, epsilon prediction, caption dropout for
classifier-free guidance, accelerate for device, precision and checkpoints.
The same code fine-tunes a real SD 1.5 (``--base runwayml/stable-diffusion-v1-5``
and an FSC147 folder as ``--data``) on a GPU. Steps are kept cheap for the
CPU: latents are encoded once, and base/ControlNet train on random latent
crops (``--crop``), which a convolutional UNet generalises from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..world.scenes import DENSITY_SIGMA
from .data import TrainingSet, load_training_set
from .loop import TrainConfig, train

CONDITION_FILE = "density_condition.json"
# Peak of one normalised Gaussian is 1/(2 pi sigma^2): this gain maps it to ~1.
DEFAULT_GAIN = 2 * math.pi * DENSITY_SIGMA**2


def density_condition(density: np.ndarray | torch.Tensor, gain: float = DEFAULT_GAIN) -> torch.Tensor:
    """Density maps (B, H, W) -> the ControlNet's conditioning image (B, 3, H, W) in [0, 1]."""
    d = torch.as_tensor(density, dtype=torch.float32)
    if d.ndim == 2:
        d = d[None]
    return (d * gain).clamp(0, 1)[:, None].expand(-1, 3, -1, -1).contiguous()


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _log(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    f = (out / "train.log").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()

    return log


def _gpu_memory_savers(model) -> None:
    """Gradient checkpointing on a GPU (what lets SD 1.5 train at batch 8+); on the CPU
    the tiny models fit and recomputation would only cost time."""
    if torch.cuda.is_available():
        model.enable_gradient_checkpointing()


# --- VAE ------------------------------------------------------------------------

def eval_vae(vae, n: int = 200) -> dict:
    from ..world import count_objects
    from .data import load_training_set

    test = load_training_set(f"world:test:{n}")
    with torch.no_grad():
        x = to_pixels(test.images)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    exact = np.mean([count_objects(r) == c for r, c in zip(rec_u8, test.counts)])
    mse = F.mse_loss((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).item()
    return {"counter_exact_on_reconstructions": round(float(exact), 4), "psnr": round(10 * math.log10(1 / mse), 2)}


def train_vae(cfg: TrainConfig, data: str, batch: int = 32, init: str | None = None) -> None:
    from diffusers import AutoencoderKL

    from ..models.tiny_sd import build_components

    log = _log(cfg.out)
    vae = AutoencoderKL.from_pretrained(init) if init else build_components(cfg.out / "_init", cfg.seed)["vae"]
    ts = load_training_set(data)
    log(f"vae: {sum(p.numel() for p in vae.parameters())} params, {len(ts)} training images")

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x = to_pixels(ts.images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(torch.Generator().manual_seed(int(rng.integers(2**31))))).sample
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()

    def export():
        # SD scales latents to unit variance; measure this VAE's factor on the data.
        with torch.no_grad():
            z = vae.encode(to_pixels(ts.images[:512])).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        vae.save_pretrained(cfg.out / "vae")
        log(f"saved {cfg.out / 'vae'} (scaling_factor {vae.config.scaling_factor:.4f})")

    train(cfg, [vae], loss_fn, evaluate=lambda step: eval_vae(vae), export=export, log=log)


# --- base and ControlNet ----------------------------------------------------------

def _encode_all(vae, ts: TrainingSet, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(ts), chunk):
            d = vae.encode(to_pixels(ts.images[i: i + chunk])).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def _tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


class _Batches:
    """Noisy latent crops with their captions (and density crops for the ControlNet)."""

    def __init__(self, pipe_dir: Path, ts: TrainingSet, crop: int, caption_dropout: float):
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTokenizer

        # subfolder= loads from a local pipeline folder or a hub id alike.
        self.vae = AutoencoderKL.from_pretrained(str(pipe_dir), subfolder="vae")
        self.noise = DDPMScheduler.from_pretrained(str(pipe_dir), subfolder="scheduler")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(pipe_dir), subfolder="tokenizer")
        self.ts = ts
        self.mean, self.std = _encode_all(self.vae, ts)
        self.scale = self.vae.config.scaling_factor
        self.crop = crop
        self.ids = _tokens(self.tokenizer, ts.captions)
        self.empty = _tokens(self.tokenizer, [""])[0]
        self.caption_dropout = caption_dropout

    def draw(self, rng: np.random.Generator, batch: int):
        idx = rng.integers(len(self.ts), size=batch)
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        z = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g)) * self.scale
        lat = z.shape[-1]
        c = self.crop or lat
        ys, xs = rng.integers(0, lat - c + 1, size=(2, batch))
        z = torch.stack([z[i, :, y: y + c, x: x + c] for i, (y, x) in enumerate(zip(ys, xs))])
        f = self.ts.images.shape[1] // lat  # pixels per latent cell
        dens = np.stack([self.ts.densities[j, y * f: (y + c) * f, x * f: (x + c) * f] for j, y, x in zip(idx, ys, xs)])
        ids = self.ids[idx].clone()
        ids[torch.from_numpy(rng.random(batch) < self.caption_dropout)] = self.empty
        noise = torch.randn(z.shape, generator=g)
        t = torch.from_numpy(rng.integers(0, self.noise.config.num_train_timesteps, size=batch)).long()
        return self.noise.add_noise(z, noise, t), noise, t, ids, density_condition(dens)


def train_base(cfg: TrainConfig, data: str, pipe_dir: Path, batch: int = 64, crop: int = 16,
               resolution: int | None = None) -> None:
    """Train the UNet and text encoder of ``pipe_dir`` (which holds the trained VAE)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    log = _log(cfg.out)
    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(pipe_dir), subfolder="text_encoder")
    _gpu_memory_savers(unet)
    batches = _Batches(pipe_dir, load_training_set(data, size=resolution), crop, caption_dropout=0.1)
    log(f"base: unet {sum(p.numel() for p in unet.parameters())} params, {len(batches.ts)} images")

    def loss_fn(rng, step):
        noisy, noise, t, ids, _ = batches.draw(rng, batch)
        pred = unet(noisy, t, encoder_hidden_states=text(ids)[0]).sample
        return F.mse_loss(pred, noise)

    def export():
        unet.save_pretrained(pipe_dir / "unet")
        text.save_pretrained(pipe_dir / "text_encoder")
        log(f"saved unet and text encoder into {pipe_dir}")

    train(cfg, [unet, text], loss_fn, export=export, log=log)


def train_controlnet(cfg: TrainConfig, data: str, pipe_dir: Path, controlnet_dir: Path, batch: int = 64,
                     crop: int = 16, eval_n: int = 100, resolution: int | None = None) -> None:
    """Train a density ControlNet on a frozen base (the SemAug recipe)."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..models.tiny_sd import controlnet_from_unet

    log = _log(cfg.out)
    unfreeze = bool(cfg.extra.get("unfreeze_base"))
    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir), subfolder="unet").requires_grad_(unfreeze)
    text = CLIPTextModel.from_pretrained(str(pipe_dir), subfolder="text_encoder").requires_grad_(False)
    _gpu_memory_savers(unet)
    init = cfg.extra.get("init_controlnet")
    controlnet = ControlNetModel.from_pretrained(init) if init else controlnet_from_unet(unet)
    _gpu_memory_savers(controlnet)
    batches = _Batches(pipe_dir, load_training_set(data, size=resolution), crop, caption_dropout=0.1)
    log(f"controlnet: {sum(p.numel() for p in controlnet.parameters())} params, {len(batches.ts)} images")

    def loss_fn(rng, step):
        noisy, noise, t, ids, cond = batches.draw(rng, batch)
        with torch.no_grad():
            states = text(ids)[0]
        down, mid = controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        return F.mse_loss(pred, noise)

    def save(folder: Path) -> None:
        controlnet.save_pretrained(folder)
        if unfreeze:  # the UNet learnt alongside: the pipeline must carry the same one
            unet.save_pretrained(folder / "base-unet")
        (folder / CONDITION_FILE).write_text(json.dumps({"kind": "density", "gain": DEFAULT_GAIN}))

    def evaluate(step):
        import shutil

        folder = cfg.out / "eval-controlnet"
        save(folder)
        pipe_eval = pipe_dir
        if unfreeze:  # evaluate the pipeline with the co-trained UNet
            pipe_eval = cfg.out / "eval-pipeline"
            shutil.rmtree(pipe_eval, ignore_errors=True)
            shutil.copytree(pipe_dir, pipe_eval)
            shutil.rmtree(pipe_eval / "unet")
            shutil.copytree(folder / "base-unet", pipe_eval / "unet")
        from ..evaluation.fidelity import label_fidelity

        return label_fidelity(str(pipe_eval), str(folder), n=eval_n, batch=25)

    def export():
        save(controlnet_dir)
        if unfreeze:
            unet.save_pretrained(pipe_dir / "unet")
            import shutil

            shutil.rmtree(controlnet_dir / "base-unet", ignore_errors=True)

    modules = [controlnet, unet] if unfreeze else [controlnet]
    train(cfg, modules, loss_fn, evaluate=evaluate, export=export, log=log)
