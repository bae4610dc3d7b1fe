"""Arguments and dispatch of `factory train KIND` (kept apart from the main CLI)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FactoryError

KINDS = ("vae", "base", "controlnet", "counter", "clip")

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

--data is world:SPLIT:N (reference-world scenes), a shard folder, or
fsc147:PATH[:SPLIT]. `vae` creates the pipeline folder (--pipeline) with the
trained VAE and fresh UNet, text encoder, tokenizer and scheduler; `base`
trains that UNet and text encoder in place; `controlnet` trains a ControlNet
on the frozen base and writes it to --controlnet.
"""


def add_parser(sub) -> None:
    sp = sub.add_parser("train", help="train (or fine-tune) the models: vae, base, controlnet, counter",
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
    sp.add_argument("--export", help="counter/clip: where the trained model goes (default models/counter, models/tiny-clip)")
    sp.add_argument("--init", help="start from these weights instead of a fresh model")
    sp.add_argument("--unfreeze-base", action="store_true",
                    help="controlnet: train the base UNet along with the ControlNet (faster on a small budget; "
                         "SemAug keeps it frozen)")
    sp.add_argument("--crop", type=int, default=16, help="latent crop side for base/controlnet (0: whole latents)")
    sp.add_argument("--checkpoint-every", type=int, default=250)
    sp.add_argument("--eval-every", type=int, default=500)
    sp.add_argument("--resolution", type=int, help="base/controlnet: resize training images to this side "
                    "(e.g. 512 for SD 1.5 on FSC147)")
    sp.add_argument("--eval-n", type=int, default=100, help="controlnet: test layouts generated per evaluation")
    sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sp.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    sp.set_defaults(fn=run)


def run(args) -> int:
    from .loop import TrainConfig

    if args.steps <= 0:
        raise FactoryError(f"--steps must be positive, got {args.steps}")
    cfg = TrainConfig(out=Path(args.out), steps=args.steps, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, mixed_precision=args.mixed_precision, threads=args.threads)
    pipe = Path(args.pipeline)
    if args.kind == "vae":
        from .diffusion import train_vae

        cfg.lr = args.lr or 1e-3
        train_vae(cfg, args.data, batch=args.batch or 32, init=args.init)
        _install_vae(cfg.out, pipe, args.seed)
    elif args.kind == "base":
        from .diffusion import train_base

        _need_pipeline(pipe, "run `factory train vae` first: it creates the pipeline folder")
        cfg.lr = args.lr or 5e-4
        train_base(cfg, args.data, pipe, batch=args.batch or 64, crop=args.crop, resolution=args.resolution)
    elif args.kind == "controlnet":
        from .diffusion import train_controlnet

        _need_pipeline(pipe, "train the base first (`factory train vae`, then `factory train base`)")
        cfg.lr = args.lr or 5e-4
        cfg.extra["init_controlnet"] = args.init
        cfg.extra["unfreeze_base"] = args.unfreeze_base
        train_controlnet(cfg, args.data, pipe, Path(args.controlnet), batch=args.batch or 64, crop=args.crop,
                         eval_n=args.eval_n, resolution=args.resolution)
    elif args.kind == "counter":
        from .counter import train_counter

        cfg.lr = args.lr or 1e-3
        train_counter(cfg, args.data, Path(args.export or "models/counter"), batch=args.batch or 32)
    elif args.kind == "clip":
        from .clip import train_clip

        cfg.lr = args.lr or 1e-3
        train_clip(cfg, args.data, Path(args.export or "models/tiny-clip"), batch=args.batch or 128)
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
