"""SemAug generation throughput: the factory's generator against a bare diffusers loop.

Three ways to generate the same N images (same prompts, same density
conditions, same batch size, steps, guidance and precision), in one process:

  bare      StableDiffusionControlNetPipeline called directly on prepared prompts and
            condition tensors: what a researcher would write by hand
  stage     the factory's generator stage (DensityControlNetGenerator) called directly on
            samples: adds its per-sample work (checks, condition resizing, labels)
  factory   `factory run` of a one-stage recipe (world source -> generate -> shards):
            adds Ray Data, actor start-up and model load, PNG encoding and shard writing

Default mode (the embedded tiny models, CPU): bare, stage and factory for N = 64
at batch 16, 20 steps. Reported: images/s of each, the factory's whole run (its
actor start-up and model load included, Ray's own start-up not), and ratios to
the bare loop both with and without the bare loop's model load.

    python benchmarks/semaug_throughput.py [--n 64] [--batch 16] [--steps 20] \\
        [--model models/tiny-sd] [--controlnet models/tiny-controlnet] [--json report.json]

``--gpu-arch sd15`` (a GPU machine): a UNet, ControlNet, text encoder and VAE of
Stable Diffusion 1.5's architecture and size, random weights built from config
(no hub needed; cached in --arch-dir), at 512², fp16, 20 steps; stage against
bare for batch sizes 1, 8, 16, with and without torch.compile. Needs torch,
diffusers, transformers and this repo's factory/actors packages; not Ray.

    python benchmarks/semaug_throughput.py --gpu-arch sd15 [--batches 1 8 16] [--n 64]
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.augmenters import resize_density  # noqa: E402
from actors.generators import DensityControlNetGenerator  # noqa: E402
from factory.evaluation.fidelity import heldout_layouts  # noqa: E402
from factory.train.diffusion import CONDITION_FILE, DEFAULT_GAIN, density_condition  # noqa: E402

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# --- the bare diffusers loop ---------------------------------------------------------

def condition_gain(controlnet: str) -> float:
    f = Path(controlnet) / CONDITION_FILE
    return json.loads(f.read_text())["gain"] if f.is_file() else DEFAULT_GAIN


def bare_pipeline(model: str, controlnet: str, dtype: str, device: str, compile: bool):
    """The pipeline as a user would load it, with the stage's scheduler and attention settings."""
    import torch
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    dt = getattr(torch, DTYPES[dtype])
    cn = ControlNetModel.from_pretrained(controlnet, torch_dtype=dt)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=cn, torch_dtype=dt,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if compile and device == "cuda":
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        pipe.controlnet = torch.compile(pipe.controlnet, mode="reduce-overhead", fullgraph=True)
    return pipe


def bare_inputs(samples, size: int, gain: float) -> tuple[list[str], "torch.Tensor"]:
    """Prompts and condition images, prepared before the clock starts."""
    dens = np.stack([resize_density(s.density, (size, size)) for s in samples])
    return [s.meta["caption"] for s in samples], density_condition(dens, gain)


def bare_loop(pipe, prompts, conditions, batch: int, steps: int, size: int) -> float:
    import torch

    device, dtype = pipe.controlnet.device, pipe.controlnet.dtype
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        with torch.inference_mode():
            out = pipe(prompt=prompts[i: i + batch], image=conditions[i: i + batch].to(device, dtype),
                       num_inference_steps=steps, guidance_scale=2.0, eta=0.0, controlnet_conditioning_scale=1.0,
                       height=size, width=size, generator=torch.Generator(device).manual_seed(i), output_type="np")
        (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    _sync()
    return time.perf_counter() - t


# --- the factory's stage, called directly ------------------------------------------------

def stage_loop(stage, n: int, batch: int) -> float:
    samples = heldout_layouts(n)
    t = time.perf_counter()
    for i in range(0, n, batch):
        stage.process(samples[i: i + batch])
    _sync()
    failed = [s.meta["failed"]["reason"] for s in samples if not s.alive]
    if failed:
        raise RuntimeError(f"{len(failed)} samples failed in the generator stage, e.g. {failed[0]}")
    return time.perf_counter() - t


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


# --- `factory run` (needs Ray) ----------------------------------------------------------

def factory_run(args) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed"}
    from factory.pipeline import init_ray, run
    from factory.recipe import parse_recipe

    recipe = parse_recipe({
        "version": 1, "name": "throughput-benchmark", "variants": 1,
        "sources": [{"kind": "world", "split": "test", "n": args.n}],
        "stages": [{"name": "generate", "batch_size": args.batch, "workers": 1,
                    "params": {"model": args.model, "controlnet": args.controlnet, "steps": args.steps,
                               "dtype": args.dtype}}],
        "output": {"shard_size": args.n},
    })
    t0 = time.perf_counter()
    init_ray(num_cpus=args.num_cpus)
    ray_init_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        res = run(recipe, str(tmp / "out"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"samples_per_s": round(res.generated / res.seconds, 3), "run_s": round(res.seconds, 1),
           "first_batch_out_s": round(res.startup_seconds, 1), "ray_init_s": round(ray_init_s, 1),
           "generated": res.generated, "worker_torch_threads": ray_worker_threads()}
    if res.running_samples:  # samples after the first output batch (needs N > the encoder's batch of 64)
        out["running_samples_per_s"] = round(res.running_samples / res.running_seconds, 3)
    return out


def ray_worker_threads() -> int:
    """torch threads in a Ray worker holding the generate stage's 0.5 CPU (Ray sets OMP_NUM_THREADS)."""
    import ray

    @ray.remote(num_cpus=DensityControlNetGenerator.resources.num_cpus)
    def threads():
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


# --- modes ------------------------------------------------------------------------------

def tiny_mode(args) -> dict:
    import torch

    size, warm = 64, args.warmup * args.batch
    prompts, conditions = bare_inputs(heldout_layouts(max(args.n, warm)), size, condition_gain(args.controlnet))
    pipe, bare_load_s = timed(lambda: bare_pipeline(args.model, args.controlnet, args.dtype, args.device, False))
    bare_warm_s = bare_loop(pipe, prompts[:warm], conditions[:warm], args.batch, args.steps, size)
    bare_s = bare_loop(pipe, prompts[: args.n], conditions[: args.n], args.batch, args.steps, size)
    del pipe
    params = {"model": args.model, "controlnet": args.controlnet, "steps": args.steps, "dtype": args.dtype}
    stage, stage_load_s = timed(lambda: DensityControlNetGenerator(params, args.device))
    stage_warm_s = stage_loop(stage, warm, args.batch)
    stage_s = stage_loop(stage, args.n, args.batch)
    del stage
    factory = factory_run(args) if not args.no_factory else {"skipped": "--no-factory"}
    bare_rate = args.n / bare_s
    report = {
        "mode": "tiny", "n": args.n, "batch": args.batch, "steps": args.steps, "size": size, "dtype": args.dtype,
        "device": args.device, "model": args.model, "controlnet": args.controlnet,
        "torch_threads": torch.get_num_threads(),
        "bare": {"samples_per_s": round(bare_rate, 3), "load_s": round(bare_load_s, 1),
                 "warmup_s": round(bare_warm_s, 1), "generate_s": round(bare_s, 1)},
        "stage": {"samples_per_s": round(args.n / stage_s, 3), "load_s": round(stage_load_s, 1),
                  "warmup_s": round(stage_warm_s, 1), "generate_s": round(stage_s, 1),
                  "ratio_over_bare": round(bare_s / stage_s, 3)},
        "factory": factory,
    }
    if "samples_per_s" in factory:
        # The factory's whole run against the bare loop end to end (load, warm-up batch and all), and
        # against its warm generation alone (the factory's start-up is not amortised over a small N).
        bare_with_load = (args.n + warm) / (bare_load_s + bare_warm_s + bare_s)
        report["ratio_factory_over_bare"] = round(factory["samples_per_s"] / bare_with_load, 3)
        report["ratio_factory_over_bare_without_its_load"] = round(factory["samples_per_s"] / bare_rate, 3)
    return report


def build_sd15(folder: Path, width_div: int = 1, device: str = "cpu") -> tuple[str, str]:
    """SD 1.5's architecture (UNet 860 M, ControlNet 361 M, CLIP ViT-L/14 text encoder, VAE 84 M) with random
    weights, saved as a pipeline folder + a ControlNet folder. ``width_div`` > 1 narrows every block (same
    structure) for smoke tests on a CPU. The tokenizer is the tiny stack's (the world's vocabulary), padded to
    SD's 77 tokens; the text encoder keeps SD's vocabulary size."""
    import torch
    from diffusers import DDIMScheduler

    from factory.models.tiny_sd import save_pipeline_folder, write_tokenizer

    sd, cn = folder / "sd15", folder / "sd15-controlnet"
    if (sd / "model_index.json").is_file() and (cn / "config.json").is_file():
        return str(sd), str(cn)
    w = lambda c: max(32, c // width_div // 32 * 32)  # noqa: E731 - channel widths (multiples of the 32 norm groups)
    torch.manual_seed(0)
    tokenizer = write_tokenizer(folder / "tokenizer")
    tokenizer.model_max_length = 77
    with torch.device(device):  # random init of 1.4 G parameters is quicker on the GPU
        text, vae, unet, controlnet = _sd15_modules(w, tokenizer)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for m in (text, vae, unet, controlnet):
        m.to(torch.float16)  # halves the folders; the benchmark loads them in the dtype it measures
    save_pipeline_folder(sd, {"tokenizer": tokenizer, "text_encoder": text, "vae": vae, "unet": unet,
                              "scheduler": scheduler})
    controlnet.save_pretrained(cn)
    return str(sd), str(cn)


def _sd15_modules(w, tokenizer):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=w(768), intermediate_size=w(3072), num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=w(768), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(w(c) for c in (128, 256, 512, 512)), norm_num_groups=32,
    )
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(w(c) for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=w(768), attention_head_dim=8, norm_num_groups=32,
    )
    controlnet = ControlNetModel.from_unet(unet)  # SD's conditioning embedding: 512² image -> 64² latents
    return text, vae, unet, controlnet


def sd15_mode(args) -> dict:
    import torch

    model, controlnet = build_sd15(Path(args.arch_dir), args.arch_width_div, args.device)
    size, gain = args.size, condition_gain(controlnet)
    rows = []
    for compile in args.compile:
        if compile and args.device != "cuda":
            rows.append({"compile": True, "skipped": "the stage compiles on CUDA only"})
            continue
        params = {"model": model, "controlnet": controlnet, "steps": args.steps, "dtype": args.dtype,
                  "compile": compile, "size": size}
        stage = DensityControlNetGenerator(params, args.device)
        pipe = bare_pipeline(model, controlnet, args.dtype, args.device, compile)
        for b in args.batches:
            n, warm = -(-args.n // b) * b, args.warmup * b
            prompts, conditions = bare_inputs(heldout_layouts(max(n, warm)), size, gain)
            # Warm-up batches, untimed: CUDA kernels, and with compile the graphs for this batch shape.
            stage_warm_s = stage_loop(stage, warm, b) if warm else 0.0
            bare_warm_s = bare_loop(pipe, prompts[:warm], conditions[:warm], b, args.steps, size) if warm else 0.0
            prompts, conditions = prompts[:n], conditions[:n]
            stage_s = stage_loop(stage, n, b)
            bare_s = bare_loop(pipe, prompts, conditions, b, args.steps, size)
            rows.append({"compile": compile, "batch": b, "n": n,
                         "stage_images_per_s": round(n / stage_s, 3), "bare_images_per_s": round(n / bare_s, 3),
                         "ratio_stage_over_bare": round(bare_s / stage_s, 3),
                         "warmup_s": {"stage": round(stage_warm_s, 1), "bare": round(bare_warm_s, 1)}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del stage, pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return {"mode": "sd15", "size": size, "steps": args.steps, "dtype": args.dtype, "device": device_name,
            "arch_width_div": args.arch_width_div, "guidance": 2.0, "results": rows}


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-arch", choices=["sd15"], default=None, help="SD 1.5-size random stack (GPU machine)")
    ap.add_argument("--n", type=int, default=64, help="images per measurement (rounded up to whole batches)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (tiny mode)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--model", default="models/tiny-sd", help="SD pipeline folder (tiny mode)")
    ap.add_argument("--controlnet", default="models/tiny-controlnet", help="ControlNet folder (tiny mode)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 for sd15, fp32 otherwise")
    ap.add_argument("--no-factory", action="store_true", help="skip the `factory run` measurement (tiny mode)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (tiny mode)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for bare and stage in this process; default on a CPU: 1, what the "
                         "factory's generate actor gets from Ray (reported as worker_torch_threads), and on a "
                         "busy machine more threads than free cores make timings noisy; on a GPU: torch's")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches before bare and stage are timed")
    g = ap.add_argument_group("--gpu-arch sd15")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    g.add_argument("--compile", type=on_off, nargs="+", default=[False, True], metavar="{off,on}",
                   help="torch.compile settings to measure (default: off on)")
    g.add_argument("--size", type=int, default=512, help="image side")
    g.add_argument("--arch-dir", default=str(Path(tempfile.gettempdir()) / "semaug-sd15-arch"),
                   help="where the random SD 1.5-size folders are built (reused)")
    g.add_argument("--arch-width-div", type=int, default=1, help="narrow every block by this factor (smoke tests)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.threads = args.threads or (1 if args.device == "cpu" else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("fp16" if args.gpu_arch else "fp32")
    report = sd15_mode(args) if args.gpu_arch else tiny_mode(args)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
