"""Arguments and dispatch of `factory train KIND` (kept apart from the main CLI)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FactoryError

KINDS = ("vae", "base", "controlnet", "counter", "clip", "attributes", "latent-ae", "digits", "realism", "redo", "slots")

HELP = """\
Train the embedded default models (or fine-tune real ones). Every run
checkpoints into OUT/checkpoints and resumes from the newest checkpoint when
started again with the same OUT; OUT/curve.jsonl records the evaluations.

  factory train vae        --data world:train:20000 --out runs/vae --steps 3000
  factory train base       --data world:train:20000 --pipeline models/tiny-sd --out runs/base --steps 20000
  factory train controlnet --data world:train:20000 --pipeline models/tiny-sd \\
                           --controlnet models/tiny-controlnet --out runs/cn --steps 20000
  factory train counter    --data world:train:5000 --out runs/counter --steps 3000
  factory train clip       --data world:train:20000 --out runs/clip --steps 2000
  factory train latent-ae  --data world:train:20000 --out runs/latent-ae --steps 5000
  factory train attributes --arch labeller --data world:train:10000 --out runs/attr-labeller --seed 0
  factory train attributes --arch checker  --data world:train:10000:500000 --out runs/attr-checker --seed 1
  factory train digits     --data world:train:5000 --out runs/digits --steps 3000
  factory train realism    --data world:train:20000 --calibration world:train:2000:900000 --out runs/realism
  factory train redo       --data world:train:20000 --out runs/redo --steps 3000
  factory train slots      --data world:train:20000 --out runs/slots --steps 4000

At real size (SD 1.5 and a CSRNet counter on an FSC147 folder; README "The real-model path"):
  factory train controlnet --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
                           --data fsc147:data/FSC147_384_V2:train --resolution 512 --crop 0 \
                           --controlnet models/sd15-controlnet-density --out runs/sd15-cn \
                           --batch 8 --mixed-precision fp16 --eval-n 0
  factory train counter    --counter-arch csrnet --data fsc147:data/FSC147_384_V2:train \
                           --resolution 512 --export models/density-counter-fsc147 --out runs/csrnet

--data is world:SPLIT:N (reference-world scenes), a shard folder, or
fsc147:PATH[:SPLIT]. `vae` creates the pipeline folder (--pipeline) with the
trained VAE and fresh UNet, text encoder, tokenizer and scheduler; `base`
trains that UNet and text encoder in place; `controlnet` trains a ControlNet
on the frozen base and writes it to --controlnet. `attributes` trains an
attribute classifier (4 binary attributes + a count head): the labeller that
labels latents for the editors, or the checker that re-scores edits; keep the
checker independent (its own arch, seed and scenes: world:SPLIT:N:START takes
scenes START..START+N-1). `latent-ae` trains the regularised autoencoder
that latent edits use (a generator with an encoder), fits the Gaussian
mixture it samples codes from and writes the folder to --export (default
models/latent-ae); its curve is the independent counter's exact rate on
reconstructions of test scenes. `digits` trains the digit classifier (ten
digits and 'not a digit') on object crops of real scenes: the reader that
says whether an edit kept each object's digit and whether generated objects
are legible. `realism` trains the GMM-VAE rejection filter on real scenes and
calibrates its two thresholds on held-out real scenes (--calibration).
`redo` trains the mask model the `segment` stage uses (ReDO: which pixels
are object) on images alone, without any mask: a mask network splits each
image into two regions and is rewarded when each region, redrawn with new
colours, still leaves a scene a discriminator takes for real and when the
colours it was redrawn with can be read back (--adversarial 0 trains without
the discriminator: the ablation). It
writes the mask network to --export (default models/redo); its curve is the
foreground accuracy and IoU against the renderer's exact masks on --eval-n
test scenes (default 200). The data must be square images of one side
divisible by 4 (the world's are 64x64); --init continues from a mask-model
folder of the same image size. `slots` trains the object-slot scene model
(after SPACE: a grid of cells, each proposing an object with presence, box
and appearance, over a background) on images alone, fits its learned prior
over layouts and writes the folder to --export (default models/slots); its
curve is the count error rate of its decompositions of --eval-n test scenes
(default 200) and their box IoU against the world's boxes. Count edits with
`editor: slot` switch one of its slots on or off.
"""


def add_parser(sub) -> None:
    sp = sub.add_parser("train", help="train (or fine-tune) the models: vae, base, controlnet, counter, clip, attributes, latent-ae, digits, realism, redo, slots",
                        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("kind", choices=KINDS)
    sp.add_argument("--data", default="world:train:20000", help="training data (see above)")
    sp.add_argument("--out", required=True, help="run folder: checkpoints, curve.jsonl, train.log")
    sp.add_argument("--steps", type=int, default=3000)
    sp.add_argument("--batch", type=int, default=None, help="batch size (default per kind)")
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--pipeline", default="models/tiny-sd", help="the SD pipeline folder")
    sp.add_argument("--controlnet", default="models/tiny-controlnet", help="where the ControlNet goes")
    sp.add_argument("--export", help="counter/clip/attributes/latent-ae/digits/realism/redo/slots: where the trained model "
                    "goes (default models/counter, models/tiny-clip, models/attr-ARCH, models/latent-ae, "
                    "models/digit-classifier, models/realism, models/redo)")
    sp.add_argument("--latent-dim", type=int, default=144,
                    help="latent-ae: length of a code (16 global numbers + a grid of 8x8 cells, so 16 + 64k)")
    sp.add_argument("--arch", choices=("labeller", "checker"), default="labeller",
                    help="attributes: the labeller (labels latents) or the independent edit checker")
    sp.add_argument("--init", help="start from these weights instead of a fresh model (redo: a mask-model folder "
                    "such as models/redo, of the training images' size)")
    sp.add_argument("--decoder-only", action="store_true",
                    help="vae: fine-tune the decoder of --init with the encoder frozen, so the latent space (and "
                         "the UNet and ControlNet trained on it) stay valid, as SD's ft-MSE/ft-EMA decoders were made")
    sp.add_argument("--adversarial", type=float, default=None,
                    help="vae (and latent-ae): weight of the patch-adversarial term (default 0: pixel losses only; "
                         "Stable Diffusion's autoencoder uses 0.5); redo: weight of the discriminator's term "
                         "(default 1; 0 is the ablation without it)")
    sp.add_argument("--disc-start", type=int, default=0,
                    help="step at which the adversarial term starts (after the reconstructions settle)")
    sp.add_argument("--ema", type=float, default=0.0,
                    help="base/controlnet: decay of an exponential moving average of the weights, which the export "
                         "and evaluations use (e.g. 0.999; 0: none)")
    sp.add_argument("--min-snr", type=float, default=0.0,
                    help="base/controlnet: Min-SNR-gamma loss weighting (e.g. 5; 0: uniform)")
    sp.add_argument("--calibration", default="world:train:2000:900000",
                    help="realism: held-out real images the rejection thresholds are calibrated on (not in --data)")
    sp.add_argument("--quantile", type=float, default=0.995,
                    help="realism: quantile of the held-out scores each threshold sits at (0.5-1; 0.995 rejects "
                         "about 1 %% of real images)")
    sp.add_argument("--unfreeze-base", action="store_true",
                    help="controlnet: train the base UNet along with the ControlNet (faster on a small budget; "
                         "SemAug keeps it frozen)")
    sp.add_argument("--crop", type=int, default=16, help="latent crop side for base/controlnet (0: whole latents)")
    sp.add_argument("--checkpoint-every", type=int, default=250)
    sp.add_argument("--eval-every", type=int, default=500)
    sp.add_argument("--resolution", type=int, help="base/controlnet/counter: resize training images to this side "
                    "(e.g. 512 for SD 1.5 on FSC147, whose images are 384 px high of varying width)")
    sp.add_argument("--counter-arch", choices=("density", "quarter", "csrnet"), default="density",
                    help="counter: density (the shipped DensityCounter, full-resolution density), quarter, or "
                         "csrnet (the real-size counter for photos: VGG-16 front, density at 1/8)")
    sp.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="base/controlnet: recompute activations in the backward pass (default: on a GPU only); "
                         "what lets SD 1.5 train in a GPU's memory")
    sp.add_argument("--eval-n", type=int, default=None,
                    help="test scenes per evaluation (controlnet: layouts generated, default 100; attributes: 500; "
                         "redo: 200; controlnet 0: no evaluation, as for SD 1.5 on FSC147)")
    sp.add_argument("--prior-steps", type=int, default=2000,
                    help="slots: steps fitting the learned prior over layouts on encoded training scenes, at export")
    sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sp.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    sp.set_defaults(fn=run)


def run(args) -> int:
    from .loop import TrainConfig

    if args.steps <= 0:
        raise FactoryError(f"--steps must be positive, got {args.steps}")
    if not 0 <= args.ema < 1:
        raise FactoryError(f"--ema is a decay in [0, 1), e.g. 0.999, got {args.ema}")
    if args.min_snr < 0:
        raise FactoryError(f"--min-snr must be >= 0 (0 turns it off), got {args.min_snr}")
    if args.eval_n is not None and args.eval_n < 0:
        raise FactoryError(f"--eval-n must be >= 0, got {args.eval_n}")
    cfg = TrainConfig(out=Path(args.out), steps=args.steps, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, mixed_precision=args.mixed_precision, threads=args.threads)
    cfg.extra["gradient_checkpointing"] = args.gradient_checkpointing
    if args.adversarial is not None and args.adversarial < 0:
        raise FactoryError(f"--adversarial must be >= 0, got {args.adversarial}")
    adversarial = args.adversarial if args.adversarial is not None else (1.0 if args.kind == "redo" else 0.0)
    pipe = Path(args.pipeline)
    if args.kind == "vae":
        from .diffusion import train_vae

        cfg.lr = args.lr or 1e-3
        if args.decoder_only and not args.init:
            raise FactoryError("--decoder-only fine-tunes a trained VAE: pass its folder with --init "
                               "(e.g. --init models/tiny-sd/vae)")
        train_vae(cfg, args.data, batch=args.batch or 32, init=args.init, decoder_only=args.decoder_only,
                  adversarial=adversarial, disc_start=args.disc_start)
        _install_vae(cfg.out, pipe, args.seed)
    elif args.kind == "base":
        from .diffusion import train_base

        _need_pipeline(pipe, "run `factory train vae` first: it creates the pipeline folder")
        cfg.lr = args.lr or 5e-4
        cfg.extra.update(ema=args.ema, min_snr=args.min_snr)
        train_base(cfg, args.data, pipe, batch=args.batch or 64, crop=args.crop, resolution=args.resolution)
    elif args.kind == "controlnet":
        from .diffusion import train_controlnet

        _need_pipeline(pipe, "train the base first (`factory train vae`, then `factory train base`)")
        cfg.lr = args.lr or 5e-4
        cfg.extra["init_controlnet"] = args.init
        cfg.extra["unfreeze_base"] = args.unfreeze_base
        cfg.extra.update(ema=args.ema, min_snr=args.min_snr)
        train_controlnet(cfg, args.data, pipe, Path(args.controlnet), batch=args.batch or 64, crop=args.crop,
                         eval_n=100 if args.eval_n is None else args.eval_n, resolution=args.resolution)
    elif args.kind == "counter":
        from .counter import train_counter

        cfg.lr = args.lr or 1e-3
        from .counter import held_out_for

        train_counter(cfg, args.data, Path(args.export or "models/counter"), batch=args.batch or 32,
                      test=held_out_for(args.data, args.eval_n or 300), arch=args.counter_arch,
                      resolution=args.resolution)
    elif args.kind == "clip":
        from .clip import train_clip

        cfg.lr = args.lr or 1e-3
        train_clip(cfg, args.data, Path(args.export or "models/tiny-clip"), batch=args.batch or 128)
    elif args.kind == "latent-ae":
        from .latent import train_latent_ae

        if args.latent_dim <= 0:
            raise FactoryError(f"--latent-dim must be positive, got {args.latent_dim}")
        cfg.lr = args.lr or 1e-3
        train_latent_ae(cfg, args.data, Path(args.export or "models/latent-ae"), batch=args.batch or 16,
                        latent_dim=args.latent_dim, adversarial=adversarial, disc_start=args.disc_start)
    elif args.kind == "digits":
        from .digits import train_digits

        cfg.lr = args.lr or 2e-3
        train_digits(cfg, args.data, Path(args.export or "models/digit-classifier"), batch=args.batch or 128,
                     test=f"world:test:{args.eval_n or 300}")
    elif args.kind == "realism":
        from .realism import train_realism

        if not 0.5 <= args.quantile < 1:
            raise FactoryError(f"--quantile must be in [0.5, 1), e.g. 0.995, got {args.quantile}")
        cfg.lr = args.lr or 1e-3
        train_realism(cfg, args.data, Path(args.export or "models/realism"), args.calibration,
                      batch=args.batch or 64, quantile=args.quantile)
    elif args.kind == "redo":
        from .redo import train_redo

        if args.batch is not None and args.batch <= 0:
            raise FactoryError(f"--batch must be positive, got {args.batch}")
        if args.eval_n is not None and args.eval_n <= 0:
            raise FactoryError(f"--eval-n must be positive, got {args.eval_n}")
        cfg.lr = args.lr or 1e-3  # the paper's is 1e-4 for 50k steps; the shipped run: 1e-3, a few thousand on a CPU
        train_redo(cfg, args.data, Path(args.export or "models/redo"), batch=args.batch or 16,
                   test=f"world:test:{args.eval_n or 200}", adversarial_weight=adversarial, init=args.init)
    elif args.kind == "slots":
        from .slots import train_slots

        if args.batch is not None and args.batch <= 0:
            raise FactoryError(f"--batch must be positive, got {args.batch}")
        if args.eval_n is not None and args.eval_n <= 0:
            raise FactoryError(f"--eval-n must be positive, got {args.eval_n}")
        cfg.lr = args.lr or 5e-4
        if args.prior_steps <= 0:
            raise FactoryError(f"--prior-steps must be positive, got {args.prior_steps}")
        train_slots(cfg, args.data, Path(args.export or "models/slots"), batch=args.batch or 16,
                    test=f"world:test:{args.eval_n or 200}", prior_steps=args.prior_steps)
    elif args.kind == "attributes":
        from .attributes import train_attributes

        cfg.lr = args.lr or 2e-3
        train_attributes(cfg, args.data, Path(args.export or f"models/attr-{args.arch}"), args.arch,
                         batch=args.batch or 64, test=f"world:test:{args.eval_n or 500}")
    return 0


def _need_pipeline(pipe: Path, hint: str) -> None:
    """A local pipeline folder must exist; a hub id (org/name) is fetched by diffusers."""
    from ..recipe import HUB_ID

    if not (pipe / "unet").exists() and not (HUB_ID.match(str(pipe)) and not pipe.exists()):
        raise FactoryError(f"{pipe} holds no Stable Diffusion pipeline: {hint}")


def _install_vae(out: Path, pipe: Path, seed: int) -> None:
    """Create the pipeline folder around the trained VAE (fresh UNet, text encoder, tokenizer, scheduler)."""
    import shutil

    from diffusers import AutoencoderKL

    from ..models.tiny_sd import build_components, save_pipeline_folder

    if (pipe / "unet").exists():
        shutil.rmtree(pipe / "vae", ignore_errors=True)
        shutil.copytree(out / "vae", pipe / "vae")
        return
    comps = build_components(out / "_init", seed)
    comps["vae"] = AutoencoderKL.from_pretrained(out / "vae")
    save_pipeline_folder(pipe, comps)
