"""Inverters: bring real images into a generator's latent space (DESIGN §1 item 3).

    encoder_inversion    one pass through the generator's trained encoder
    optimise_inversion   Adam on z: masked, blurred MSE, z kept in the norm ball
    ddim_inversion       a diffusion model's initial noise, by inverse DDIM
    psnr, ssim, ClipImageDistance   how close a reconstruction is

Images here are float tensors (n, 3, H, W) in [0, 1] (``to_tensor`` makes them
from uint8 HWC arrays); codes are float32 numpy arrays (n, latent_dim).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FactoryError
from .generator import Generator

# Weight of the unblurred MSE next to the blurred one. The blurred term is the
# one that steers: a stroke a few pixels off its target still overlaps it after
# a sigma-3 blur, so its gradient says which way to move, where the raw MSE of
# two thin strokes that do not overlap is flat. But a blur removes exactly what
# tells a 3 from an 8; this light term brings the strokes in once the layout
# matches. It is small because the raw MSE of a nearly right image (edges a
# pixel off) is several times the blurred one and would otherwise dominate
# early, when only the coarse structure can be fixed.
# Measured on the shipped RAE (16 test scenes, 200 steps): from the encoder's
# start, sigma 3 and plain MSE end within 0.1 dB (26.4 vs 26.5 dB); from the
# prior mean plain MSE is 1.4 dB better. That RAE's code is mostly a grid of
# local cells, which leaves little misalignment for the blur to bridge; the
# blur is for generators with global codes (StyleGAN). `sigma: 0` turns it off.
DETAIL_WEIGHT = 0.25
# Convergence: the best loss improved by less than TOL (relative) over the last WINDOW steps.
TOL = 1e-3
WINDOW = 10
# A loss below the MSE of 8-bit rounding ((1/255)^2 / 12) has nothing left to
# gain that a saved image could show: such an image has converged, whatever
# its relative improvement (which stays large on a vanishing loss).
QUANTISATION_MSE = (1 / 255) ** 2 / 12


# --- images and metrics -----------------------------------------------------

def to_tensor(images, device: str = "cpu") -> torch.Tensor:
    """uint8 HWC images (a list or an (n, H, W, 3) array) -> float (n, 3, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float().to(device)
    arr = np.stack([np.asarray(im) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return (x / 255 if arr.dtype == np.uint8 else x).to(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (n, 3, H, W) in [0, 1] -> uint8 (n, H, W, 3)."""
    return (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image MSE over the pixels where ``mask`` (n, 1, H, W) is 1; all pixels by default."""
    if mask is None:
        return ((a - b) ** 2).flatten(1).mean(1)
    err = ((a - b) ** 2 * mask).flatten(1).sum(1)
    return err / (mask.flatten(1).sum(1) * a.shape[1]).clamp_min(1)


def psnr(a, b, mask=None) -> np.ndarray:
    """Per-image PSNR in dB of images in [0, 1] (tensors (n, 3, H, W)): 10 log10(1 / MSE)."""
    mse = masked_mse(to_tensor(a), to_tensor(b), mask).detach().cpu().numpy()
    return psnr_of(mse)


def psnr_of(mse) -> np.ndarray:
    # Capped at 100 dB so an exact copy stays a finite number in the JSON.
    return np.minimum(10 * np.log10(1.0 / np.maximum(np.asarray(mse, dtype=np.float64), 1e-10)), 100.0)


def ssim(a, b) -> np.ndarray:
    """Per-image SSIM (skimage, uniform 7x7 windows, RGB) of images in [0, 1].

    Our perceptual distance is SSIM, and is called that: LPIPS needs network
    weights that cannot be downloaded on these machines.
    """
    from skimage.metrics import structural_similarity

    a = to_uint8(to_tensor(a)).astype(np.float64) / 255
    b = to_uint8(to_tensor(b)).astype(np.float64) / 255
    return np.array([structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)])


class ClipImageDistance:
    """Cosine distance (1 - cos) between OpenCLIP image embeddings: a learned,
    semantic distance (colours, layout) next to the pixel-level PSNR and SSIM."""

    def __init__(self, model: str = "models/tiny-clip", device: str = "cpu"):
        from ..models import tiny_clip

        self.device = device
        self.model, self.preprocess, _ = tiny_clip.load(model, device)

    @torch.inference_mode()
    def embed(self, images) -> torch.Tensor:
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(im)) for im in to_uint8(to_tensor(images))])
        return F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1)

    def __call__(self, a, b) -> np.ndarray:
        return (1 - (self.embed(a) * self.embed(b)).sum(-1)).cpu().numpy()


def size_problem(generator: Generator, shape: tuple[int, ...]) -> str | None:
    """Why an image of ``shape`` (H, W[, C]) cannot be inverted by ``generator``, or None.

    We refuse rather than resize: a silent resize would move every point and
    box label the sample carries, and the `augment` stage is the one place that
    resizes images together with their labels.
    """
    s = generator.image_size
    if tuple(shape[:2]) != (s, s) or (len(shape) == 3 and shape[2] != 3):
        got = "x".join(map(str, shape))
        return (f"{generator.model_id} takes {s}x{s}x3 RGB images, this one is {got}: add "
                f"`- name: augment` with `params: {{resize: {s}, crop: 1.0, hflip: 0}}` before `invert` "
                f"(it resizes the labels with the image), or use a generator trained at that size")
    return None


def _check_sizes(generator: Generator, x: torch.Tensor) -> None:
    problem = size_problem(generator, (x.shape[2], x.shape[3], x.shape[1]))
    if problem:
        raise FactoryError(problem)


def project(z: torch.Tensor, radius: float) -> torch.Tensor:
    """Each code scaled back onto the ball ||z|| <= radius (codes inside are unchanged)."""
    norm = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z * (radius / norm).clamp(max=1.0)


# --- encoder inversion --------------------------------------------------------

@torch.no_grad()
def encoder_inversion(generator: Generator, images, radius: float | None = None) -> tuple[np.ndarray, dict]:
    """Codes from the generator's encoder, in one pass, and their reconstruction errors.

    The codes are projected into the norm ball, like every other inverter's:
    editors assume codes there, and the errors are those of the projected codes.
    Returns ``(z, {"mse": (n,), "psnr": (n,), "seconds": s})``.
    """
    if not generator.has_encoder:
        raise FactoryError(f"{generator.model_id} has no encoder: invert with method: optimise")
    x = to_tensor(images, generator.device)
    _check_sizes(generator, x)
    t0 = time.perf_counter()
    z = project(generator.encode(x).float(), radius or generator.latent_radius())
    mse = masked_mse(generator.synthesize(z), x).cpu().numpy()
    seconds = time.perf_counter() - t0
    return z.cpu().numpy().astype(np.float32), {"mse": mse, "psnr": psnr_of(mse), "seconds": seconds}


# --- optimisation-based inversion --------------------------------------------

@dataclass
class InversionResult:
    """Per image: the code, its masked MSE and PSNR, the steps it took, whether
    its loss converged, and why it is not usable (None when it is)."""

    z: np.ndarray
    mse: np.ndarray
    psnr: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    seconds: float
    reasons: list = field(default_factory=list)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, zero padding (see ``masked_blur`` for why zeros)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma).to(x.device, x.dtype)
    c, r = x.shape[1], len(k) // 2
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def masked_blur(x: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised convolution: blur(x * mask) / blur(mask).

    Invalid pixels (mask 0) then never leak into the blurred valid ones, and
    the image border is handled the same way (zero padding is a mask of 0
    outside the image), so neither a border nor a hole pulls values to black.
    """
    if sigma <= 0:
        return x
    return blur(x * mask, sigma) / blur(mask, sigma).clamp_min(1e-6)


def fill_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images with their invalid pixels set to the mean colour of their valid ones.

    An encoder knows no masks: what it is shown where the mask is 0 would steer
    the warm start (and so the local minimum found) by pixels the loss ignores.
    The mean valid colour is neutral, and on a plain background it is nearly
    the background.
    """
    if bool((mask > 0).all()):
        return x
    mean = (x * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1)
    return x * mask + mean * (1 - mask)


def prior_mean(generator: Generator, n: int = 1024) -> np.ndarray:
    """The mean of the generator's prior, estimated from ``n`` fixed seeds (zero for N(0, I))."""
    return generator.sample_latents(list(range(n))).mean(0).astype(np.float32)


def optimise_inversion(generator: Generator, images, z0=None, steps: int = 200, lr: float = 0.05,
                       sigma: float = 3.0, mask: torch.Tensor | None = None, radius: float | None = None,
                       tol: float = TOL, window: int = WINDOW, max_mse: float | None = None,
                       detail_weight: float = DETAIL_WEIGHT) -> InversionResult:
    """Codes whose images match ``images`` on the masked pixels, by Adam on z.

    Loss per image: MSE of the masked-blurred images (sigma px) + ``detail_weight``
    x the unblurred masked MSE. After each step every code is projected back into
    the ball ||z|| <= radius (default ``generator.latent_radius()``): outside it
    a generator makes images it was never trained to make, which can match the
    pixels while no longer being an image of its world, and editors assume it.
    Start: ``z0``, else the encoder's codes (of the images with masked-out
    pixels filled, see ``fill_masked``), else the prior mean.

    Images are independent: their losses are summed, and Adam is per-coordinate,
    so a batch gives each image the same steps as inverting it alone. An image
    stops when its best loss improved by less than ``tol`` over the last
    ``window`` steps, or fell below 8-bit rounding (converged); its best code is
    returned. ``mse``/``psnr`` are of the unblurred image on the masked pixels.
    An image has a reason (``reasons[i]``, else None) when its MSE is above
    ``max_mse``, or, with no ``max_mse``, when it did not converge.
    """
    t0 = time.perf_counter()
    x = to_tensor(images, generator.device)
    _check_sizes(generator, x)
    n = len(x)
    m = torch.ones_like(x[:, :1]) if mask is None else mask.float().to(x.device)
    radius = float(radius or generator.latent_radius())
    if z0 is None:
        if generator.has_encoder:
            with torch.no_grad():
                z0 = generator.encode(fill_masked(x, m)).float()
        else:
            z0 = np.repeat(prior_mean(generator)[None], n, axis=0)
    z = project(torch.as_tensor(np.asarray(z0) if not isinstance(z0, torch.Tensor) else z0,
                                dtype=torch.float32, device=x.device).detach().clone(), radius)
    z.requires_grad_(True)
    target = masked_blur(x, m, sigma)
    opt = torch.optim.Adam([z], lr=lr)

    def loss(zz, idx):
        y = generator.synthesize(zz)
        coarse = masked_mse(masked_blur(y, m[idx], sigma), target[idx], m[idx])
        return coarse + detail_weight * masked_mse(y, x[idx], m[idx])

    best = torch.full((n,), float("inf"), device=x.device)
    best_z = z.detach().clone()
    history: list[torch.Tensor] = []  # best loss so far, one row per step
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    taken = torch.full((n,), steps, dtype=torch.long)
    for step in range(steps + 1):
        # Only the active images are synthesised: a converged one costs nothing more.
        idx = active.nonzero().squeeze(1)
        per = loss(z[idx], idx)
        with torch.no_grad():
            better = per.detach() < best[idx]
            best[idx[better]] = per.detach()[better]
            best_z[idx[better]] = z.detach()[idx[better]]
            history.append(best.clone())
            done = active & (best < QUANTISATION_MSE)
            if step >= window:
                gain = (history[-1 - window] - best) / history[-1 - window].clamp_min(1e-12)
                done |= active & (gain < tol)
            taken[done.cpu()] = step
            active &= ~done
        if step == steps or not active.any():
            break
        opt.zero_grad(set_to_none=True)
        per.sum().backward()
        opt.step()
        with torch.no_grad():
            # Adam's momentum still moves a converged code: put it back at its best.
            z.copy_(torch.where(active[:, None], project(z, radius), best_z))

    with torch.no_grad():
        mse = masked_mse(generator.synthesize(best_z), x, m).cpu().numpy()
    converged = (~active).cpu().numpy()
    if max_mse is not None:
        converged |= mse <= max_mse
    reasons = [_reason(i, history, window, mse[i], bool(converged[i]), max_mse, int(taken[i])) for i in range(n)]
    return InversionResult(z=best_z.cpu().numpy().astype(np.float32), mse=mse, psnr=psnr_of(mse),
                           steps=taken.numpy(), converged=converged, seconds=time.perf_counter() - t0,
                           reasons=reasons)


def _reason(i, history, window, mse, converged, max_mse, steps) -> str | None:
    if max_mse is not None and mse > max_mse:
        if converged:
            return f"MSE {mse:.4f} above max_mse {max_mse} (the loss stopped improving at step {steps})"
        k = min(window, len(history) - 1)
        falling = 100 * float((history[-1 - k][i] - history[-1][i]) / history[-1 - k][i].clamp_min(1e-12))
        return (f"MSE {mse:.4f} above max_mse {max_mse}, loss still falling by {falling:.1f} %/{k} steps "
                f"at step {steps}: raise steps")
    if not converged:
        k = min(window, len(history) - 1)
        falling = 100 * float((history[-1 - k][i] - history[-1][i]) / history[-1 - k][i].clamp_min(1e-12))
        return f"loss still falling by {falling:.1f} %/{k} steps at step {steps}: raise steps"
    return None


# --- DDIM inversion -----------------------------------------------------------

class DDIMInverter:
    """Inverse DDIM for a Stable-Diffusion pipeline (with a density ControlNet or not).

    An image is VAE-encoded (the posterior mean, so the same image always gives
    the same noise), then walked up the noise levels with diffusers'
    ``DDIMInverseScheduler``, the UNet conditioned on the caption (and the
    ControlNet on the density map); the pipeline's own DDIM sampler (eta 0,
    steps_offset 1, as in the `generate` stage) walks it back down. Loaded once;
    ``ddim_inversion`` is the one-call form.
    """

    def __init__(self, model: str = "models/tiny-sd", controlnet: str | None = None, device: str = "cpu",
                 condition_gain: float | None = None):
        import diffusers

        self.device = device
        no_safety = {"safety_checker": None, "requires_safety_checker": False}
        try:
            if controlnet:
                cn = diffusers.ControlNetModel.from_pretrained(controlnet)
                pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=cn, **no_safety)
            else:
                pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, **no_safety)
        except OSError as e:
            raise FactoryError(f"could not load {model} / {controlnet}: {e}") from None
        # fp32 throughout: inversion is only exact to the precision of the steps.
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
        self.inverse = diffusers.DDIMInverseScheduler.from_config(pipe.scheduler.config, steps_offset=1)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.controlnet = controlnet
        self.gain = condition_gain or self._gain(controlnet)
        self.factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    @staticmethod
    def _gain(controlnet: str | None) -> float:
        from ..train.diffusion import CONDITION_FILE, DEFAULT_GAIN

        f = Path(str(controlnet or "")) / CONDITION_FILE
        return json.loads(f.read_text())["gain"] if f.is_file() else DEFAULT_GAIN

    def size_problem(self, shape: tuple[int, ...]) -> str | None:
        h, w = shape[:2]
        if h % 8 or w % 8:
            return (f"DDIM inversion needs sides that are multiples of 8, this image is {h}x{w}: add "
                    f"`- name: augment` with `params: {{resize: {h - h % 8 or 8}}}` before `invert`")
        return None

    def _condition(self, density, n: int, size: tuple[int, int]):
        if not self.controlnet:
            return None
        if density is None:
            raise FactoryError("this DDIM inverter has a density ControlNet: give the density maps (density=)")
        from ..train.diffusion import density_condition

        d = np.stack([np.asarray(x, dtype=np.float32) for x in density])
        if d.shape[0] != n or d.shape[1:] != size:
            raise FactoryError(f"density maps {d.shape} do not match the images ({n}, {size[0]}, {size[1]})")
        return density_condition(d, self.gain).to(self.device)

    def _embeds(self, captions: list[str], guidance: float):
        pos, neg = self.pipe.encode_prompt(list(captions), self.device, 1, guidance > 1.0)
        return pos, neg

    def _eps(self, latents, t, embeds, cond, guidance: float) -> torch.Tensor:
        pos, neg = embeds
        cfg = guidance > 1.0
        lat = torch.cat([latents, latents]) if cfg else latents
        emb = torch.cat([neg, pos]) if cfg else pos
        kw = {}
        if cond is not None:
            c = torch.cat([cond, cond]) if cfg else cond
            down, mid = self.pipe.controlnet(lat, t, encoder_hidden_states=emb, controlnet_cond=c,
                                             conditioning_scale=1.0, return_dict=False)
            kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        eps = self.pipe.unet(lat, t, encoder_hidden_states=emb, **kw).sample
        if cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + guidance * (text - uncond)
        return eps

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        vae = self.pipe.vae
        x = to_tensor(images, self.device)
        return vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    @torch.inference_mode()
    def invert(self, images, captions: list[str], density=None, steps: int = 20, guidance: float = 1.0) -> torch.Tensor:
        """The initial noise (n, 4, H/f, W/f) from which DDIM regenerates ``images``."""
        x = to_tensor(images, self.device)
        cond = self._condition(density, len(x), tuple(x.shape[2:]))
        latents = self.encode(x)
        embeds = self._embeds(captions, guidance)
        self.inverse.set_timesteps(steps, device=self.device)
        for t in self.inverse.timesteps:
            latents = self.inverse.step(self._eps(latents, t, embeds, cond, guidance), t, latents).prev_sample
        return latents

    @torch.inference_mode()
    def regenerate(self, latents: torch.Tensor, captions: list[str], density=None, steps: int = 20,
                   guidance: float = 1.0) -> torch.Tensor:
        """Images (n, 3, H, W) in [0, 1] sampled by the pipeline from the initial noise ``latents``."""
        n, _, h, w = latents.shape
        size = (h * self.factor, w * self.factor)
        kw = dict(prompt=list(captions), latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                  eta=0.0, height=size[0], width=size[1], output_type="pt")
        cond = self._condition(density, n, size)
        if cond is not None:
            kw.update(image=cond, controlnet_conditioning_scale=1.0)
        return self.pipe(**kw).images.float().clamp(0, 1)

    def noise_like(self, images, seeds: list[int]) -> torch.Tensor:
        """Random initial noise of the latent shape of ``images`` (a baseline for the inversion)."""
        x = to_tensor(images)
        shape = (self.pipe.unet.config.in_channels, x.shape[2] // self.factor, x.shape[3] // self.factor)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(self.device)


def ddim_inversion(pipeline_folder, images, captions: list[str], steps: int = 20, controlnet: str | None = None,
                   density=None, guidance: float = 1.0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Invert real images to the diffusion model's initial noise and regenerate them from it.

    ``pipeline_folder`` is a Stable-Diffusion folder or hub id (or a loaded
    ``DDIMInverter``). Returns ``(latents, reconstructions, errors)``: errors
    per image are ``mse``/``psnr`` of the regenerated image against the real
    one and ``vae_mse``/``vae_psnr`` of the VAE's round trip alone (the ceiling
    that DDIM cannot beat), plus ``seconds`` for the whole batch.
    """
    t0 = time.perf_counter()
    inv = pipeline_folder if isinstance(pipeline_folder, DDIMInverter) else DDIMInverter(
        str(pipeline_folder), controlnet, device)
    x = to_tensor(images, inv.device)
    problem = inv.size_problem(tuple(x.shape[2:]))
    if problem:
        raise FactoryError(problem)
    latents = inv.invert(x, captions, density, steps, guidance)
    recon = inv.regenerate(latents, captions, density, steps, guidance)
    mse = masked_mse(recon, x).cpu().numpy()
    vae_mse = masked_mse(inv.decode(inv.encode(x)), x).cpu().numpy()
    errors = {"mse": mse, "psnr": psnr_of(mse), "vae_mse": vae_mse, "vae_psnr": psnr_of(vae_mse),
              "seconds": time.perf_counter() - t0}
    return latents, recon, errors
