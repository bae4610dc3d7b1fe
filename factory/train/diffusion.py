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
from .pixel_losses import ink_mask_loss, reconstruction_loss

INK_MASK_WEIGHT = 1.0  # beside the ink-weighted pixel loss when fine-tuning a decoder (both ~0.01-0.03)

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


def _gpu_memory_savers(model, checkpointing: bool | None = None) -> None:
    """Gradient checkpointing (what lets SD 1.5 train at batch 8+): by default on a GPU only,
    since on the CPU the tiny models fit and recomputation would only cost time;
    ``checkpointing`` forces it on or off (`--gradient-checkpointing`)."""
    if torch.cuda.is_available() if checkpointing is None else checkpointing:
        model.enable_gradient_checkpointing()


def vae_scale_factor(pipe_dir: Path) -> int:
    """Pixels per latent cell of a pipeline's VAE (8 for SD 1.5, 2 for the tiny one)."""
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(str(pipe_dir), subfolder="vae")
    return 2 ** (len(cfg["block_out_channels"]) - 1)


# --- VAE ------------------------------------------------------------------------

def eval_vae(vae, n: int = 200) -> dict:
    """Pixel checks on the VAE's reconstructions of test-pool scenes: the ceiling of every
    image the pipeline decodes. The real scenes themselves pass the object check 97-99 %."""
    from ..world import count_objects
    from ..world.object_check import check_objects
    from ..world.scenes import make_scene

    scenes = [make_scene("test", i) for i in range(n)]
    with torch.no_grad():
        x = to_pixels(np.stack([s.image for s in scenes]))
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    exact = np.mean([count_objects(r) == s.count for r, s in zip(rec_u8, scenes)])
    passed = np.mean([check_objects(r, s.points, s.boxes).passed for r, s in zip(rec_u8, scenes)])
    mse = F.mse_loss((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2).item()
    return {"counter_exact_on_reconstructions": round(float(exact), 4),
            "objects_pass_on_reconstructions": round(float(passed), 4), "psnr": round(10 * math.log10(1 / mse), 2)}


def train_vae(cfg: TrainConfig, data: str, batch: int = 32, init: str | None = None, decoder_only: bool = False,
              adversarial: float = 0.0, disc_start: int = 0) -> None:
    """Train the tiny SD autoencoder, or fine-tune its decoder alone (``decoder_only``).

    Fine-tuning the decoder with the encoder frozen is how Stable Diffusion's
    improved VAE decoders (ft-EMA, ft-MSE) were made: the latent space stays
    the same, so a UNet and ControlNet trained on it keep working, and only
    what the decoder draws from a latent changes. ``adversarial`` > 0 adds the
    patch-adversarial term (factory.train.adversarial) from step ``disc_start``.
    """
    from diffusers import AutoencoderKL

    from ..models.tiny_sd import build_components
    from .adversarial import AdversarialTerm

    log = _log(cfg.out)
    vae = AutoencoderKL.from_pretrained(init) if init else build_components(cfg.out / "_init", cfg.seed)["vae"]
    if decoder_only:
        if not init:
            raise ValueError("decoder-only training fine-tunes a trained VAE: give its folder (--init)")
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    adv = AdversarialTerm(adversarial, disc_start, seed=cfg.seed)
    ts = load_training_set(data)
    trained = sum(p.numel() for p in vae.parameters() if p.requires_grad)
    log(f"vae: {trained} of {sum(p.numel() for p in vae.parameters())} params trained, {len(ts)} training images"
        f"{', adversarial weight %g from step %d' % (adversarial, disc_start) if adversarial > 0 else ''}")

    def loss_fn(rng, step):
        idx = rng.integers(len(ts), size=batch)
        x = to_pixels(ts.images[idx])
        if decoder_only:
            with torch.no_grad():
                post = vae.encode(x).latent_dist
        else:
            post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(torch.Generator().manual_seed(int(rng.integers(2**31))))).sample
        # Fine-tuning weighs ink more (factory.train.pixel_losses): what the pixel check still
        # fails on VAE reconstructions is thin strokes drawn faint enough to break in two.
        rec_loss = (reconstruction_loss((rec + 1) / 2, (x + 1) / 2)
                    + INK_MASK_WEIGHT * ink_mask_loss((rec + 1) / 2, (x + 1) / 2) if decoder_only
                    else F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x))
        g_term, _ = adv.loss(x, rec, rec_loss, vae.decoder.conv_out.weight, step)
        kl = 0.0 if decoder_only else 1e-6 * post.kl().mean()
        return rec_loss + kl + g_term

    def export():
        if not decoder_only:
            # SD scales latents to unit variance; measure this VAE's factor on the data.
            with torch.no_grad():
                z = vae.encode(to_pixels(ts.images[:512])).latent_dist.mode()
            vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        vae.save_pretrained(cfg.out / "vae")
        log(f"saved {cfg.out / 'vae'} (scaling_factor {vae.config.scaling_factor:.4f})")

    train(cfg, [vae], loss_fn, evaluate=lambda step: eval_vae(vae), export=export, log=log,
          state=adv.checkpointed() if adversarial > 0 else ())


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


class WeightsEMA:
    """An exponential moving average of the trained weights (diffusers' EMAModel), which is what
    diffusion models are sampled from: the raw weights of a small model trained with a noisy
    objective draw speckle that the average smooths out. Checkpointed with the run; exports
    and evaluations use the averaged weights."""

    def __init__(self, modules, decay: float):
        from diffusers.training_utils import EMAModel

        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.ema = EMAModel(self.params, decay=decay, use_ema_warmup=True) if decay > 0 else None

    def checkpointed(self) -> list:
        return [self.ema] if self.ema else []

    def step(self, step: int) -> None:
        if self.ema:
            self.ema.step(self.params)

    def applied(self, fn):
        """Run ``fn`` with the averaged weights in place, then put the trained ones back."""
        if not self.ema:
            return fn()
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            return fn()
        finally:
            self.ema.restore(self.params)


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR.

    Uniform weights spend most of the gradient on the easy, low-noise steps; capping them lets
    the high-noise steps that decide layout and background learn faster. gamma <= 0: uniform."""
    if gamma <= 0:
        return torch.ones(len(t))
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    return snr.clamp(max=gamma) / snr


def _noise_loss(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * weights).mean()


def train_base(cfg: TrainConfig, data: str, pipe_dir: Path, batch: int = 64, crop: int = 16,
               resolution: int | None = None) -> None:
    """Train the UNet and text encoder of ``pipe_dir`` (which holds the trained VAE)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    log = _log(cfg.out)
    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(pipe_dir), subfolder="text_encoder")
    _gpu_memory_savers(unet, cfg.extra.get("gradient_checkpointing"))
    batches = _Batches(pipe_dir, load_training_set(data, size=resolution), crop, caption_dropout=0.1)
    log(f"base: unet {sum(p.numel() for p in unet.parameters())} params, {len(batches.ts)} images")

    def loss_fn(rng, step):
        noisy, noise, t, ids, _ = batches.draw(rng, batch)
        pred = unet(noisy, t, encoder_hidden_states=text(ids)[0]).sample
        return _noise_loss(pred, noise, min_snr_weights(batches.noise, t, cfg.extra.get("min_snr", 0.0)))

    ema = WeightsEMA([unet, text], cfg.extra.get("ema", 0.0))

    def export():
        def save():
            unet.save_pretrained(pipe_dir / "unet")
            text.save_pretrained(pipe_dir / "text_encoder")
        ema.applied(save)
        log(f"saved unet and text encoder into {pipe_dir}")

    train(cfg, [unet, text], loss_fn, export=export, log=log, state=ema.checkpointed(), on_step=ema.step)


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
    _gpu_memory_savers(unet, cfg.extra.get("gradient_checkpointing"))
    init = cfg.extra.get("init_controlnet")
    controlnet = (ControlNetModel.from_pretrained(init) if init
                  else controlnet_from_unet(unet, vae_scale_factor(pipe_dir)))
    _gpu_memory_savers(controlnet, cfg.extra.get("gradient_checkpointing"))
    batches = _Batches(pipe_dir, load_training_set(data, size=resolution), crop, caption_dropout=0.1)
    log(f"controlnet: {sum(p.numel() for p in controlnet.parameters())} params, {len(batches.ts)} images")

    def loss_fn(rng, step):
        noisy, noise, t, ids, cond = batches.draw(rng, batch)
        with torch.no_grad():
            states = text(ids)[0]
        down, mid = controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        return _noise_loss(pred, noise, min_snr_weights(batches.noise, t, cfg.extra.get("min_snr", 0.0)))

    modules = [controlnet, unet] if unfreeze else [controlnet]
    ema = WeightsEMA(modules, cfg.extra.get("ema", 0.0))

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

    # eval_n = 0: no evaluation (it generates world layouts and counts them with the world's
    # counter: the tiny stack's curve, meaningless for SD 1.5 on FSC147 and hours on a CPU).
    train(cfg, modules, loss_fn, evaluate=(lambda step: ema.applied(lambda: evaluate(step))) if eval_n else None,
          export=lambda: ema.applied(export), log=log, state=ema.checkpointed(), on_step=ema.step)
