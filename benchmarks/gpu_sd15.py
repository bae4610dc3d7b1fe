"""SD 1.5 + ControlNet, the BLIP-2 captioner and the CLIP checker at real size on one GPU (issue 16).

Everything is built here at random weights from the published configurations
(``factory.models.real_size.init_model``: no hub, no weights), on the GPU, and
measured in one process without Ray:

1. ``generate``: images/s at 512 x 512, 20 DDIM steps, guidance 2.0, for each
   dtype (fp16, bf16), channels-last (off, on), batch (1, 8, 16, 32) and
   torch.compile (off, on): the factory's stage (``get_stage("generate")``,
   ``DensityControlNetGenerator.process(samples)``) against a bare diffusers loop
   (``StableDiffusionControlNetPipeline`` called directly on prepared prompts and
   condition tensors; the helpers of ``benchmarks/semaug_throughput.py``), and
   the ratio stage / bare at each setting. The winning setting is the one where
   the stage is fastest.
2. ``caption`` (BLIP-2 OPT-2.7B, 30 new tokens) and ``check_clip`` (OpenCLIP
   ViT-B/32): the stages' images/s on 512 x 512 images at batches 8, 32, 64 (what
   fractional-GPU actors get), with their peak GPU memory and the share of the
   time spent in their CPU preprocessing.

Goals (issue 16): >= 6 images/s for SD 1.5 + ControlNet per H100-class GPU at the
best setting, the stage >= 0.95x the bare loop. For scale, published A100 figures
for SD 1.5 + ControlNet are about 0.7-1.1 images/s at 50 steps, batch 16.

The whole run is planned to fit 10 minutes (``--budget-s``, default 540 s from
the process start): the eager settings first, then CLIP and BLIP-2, then
torch.compile (its cost is the least predictable), where eager was fastest
first and its fastest batch first. Before each measurement its cost is
estimated from the ones before it; what would not fit is recorded as skipped.
Each measurement is printed as it ends and the JSON report (``--json``, default
``$OUT/gpu_sd15.json`` when ``OUT`` is set) is rewritten after each, so a run
killed at its time limit leaves what it measured on disk. Timing: one untimed warm-up batch per setting and batch size
(``--warmup-steps`` DDIM steps: the same shapes, so compiled graphs and CUDA
graphs are made there), then ``max(batch, --min-images)`` images timed. With
compile, each batch size is its own static graph (automatic dynamic shapes off),
as one actor runs one batch size. Channels-last is not a stage parameter: the
benchmark converts the UNet, ControlNet and VAE of both pipelines after loading.

The wheels (the GPU machine has Python 3.12, torch, transformers and accelerate
but not diffusers, open_clip or pydantic; 13.7 MiB in all), made here once, at
the versions this checkout's .venv runs (the script prints the list and sizes;
README "SD 1.5 on a GPU" has the same as one `pip download` line):

    bash benchmarks/gpu_wheels.sh .whl

On the GPU machine, in the repository root (no internet, no Ray needed):

    python3 benchmarks/gpu_sd15.py --wheels .whl --json $OUT/gpu_sd15.json

(the device tool: ``carry: [".whl"]``, ``timeout_s: 600``). Narrower runs:
``--skip-blip2``, ``--dtypes fp16``, ``--batches 8 16 32``, ``--compile off``.
A CPU rehearsal with every model narrowed (same topology, 512 x 512 images;
about 45 s here, ``tests/test_gpu_bench.py``):

    python benchmarks/gpu_sd15.py --cpu-smoke --json /tmp/gpu_sd15.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parent.parent
GOAL_IMAGES_PER_S = 6.0
GOAL_RATIO = 0.95


# --- wheels (the GPU machine has no internet) -------------------------------------------

def install_wheels(folder: str, site: str) -> list[str]:
    """``pip install --no-index --no-deps --target SITE`` every wheel in ``folder``; SITE goes first on
    sys.path (and PYTHONPATH, for torch.compile's worker processes). Run before anything imports them."""
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}: make them with `bash benchmarks/gpu_wheels.sh {folder}`")
    names = [w.name.split("-")[0].lower() for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"{folder} holds two versions of {', '.join(twice)}: keep one of each")
    stamp = Path(site) / ".wheels"
    wanted = "\n".join(w.name for w in wheels)
    if not (stamp.is_file() and stamp.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *map(str, wheels)], check=True)
        stamp.write_text(wanted)
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    return [w.name for w in wheels]


# --- the report: rewritten after every measurement --------------------------------------

class Report:
    def __init__(self, path: str | None, budget_s: float):
        self.path = Path(path) if path else None
        self.budget_s = budget_s
        self.data: dict = {"generate": [], "caption": [], "check_clip": []}

    def left(self) -> float:
        return self.budget_s - (time.time() - T0)

    def add(self, section: str, row: dict) -> dict:
        self.data[section].append(row)
        print(f"[{time.time() - T0:6.1f} s] {section} {json.dumps(row)}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - T0, 1)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".part")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)


# --- models ------------------------------------------------------------------------------

def build(name: str, args, torch, **kw) -> tuple[str, float]:
    """A random-weight model folder in --work-dir (reused when complete), built on the GPU when there is one."""
    from factory.models.real_size import init_model

    out = Path(args.work_dir) / (name + ("-narrow" if args.narrow else ""))
    if (out / "RANDOM_WEIGHTS.txt").is_file():
        return str(out), 0.0
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t = time.perf_counter()
    with torch.device(args.device):  # random init of 0.9-3.9 G parameters takes seconds on a GPU, minutes on a CPU
        init_model(name, out, narrow=args.narrow, **kw)
    free_memory(torch)
    print(f"[{time.time() - T0:6.1f} s] built {out} in {time.perf_counter() - t:.1f} s", flush=True)
    return str(out), round(time.perf_counter() - t, 1)


def free_memory(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gb(torch) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# --- generate: the stage against the bare loop --------------------------------------------

@contextmanager
def stage_steps(stage, steps: int):
    """The stage's DDIM steps for an untimed warm-up batch (same shapes, fewer steps)."""
    keep = stage.params.steps
    stage.params.steps = steps
    try:
        yield
    finally:
        stage.params.steps = keep


def channels_last(pipe, torch) -> None:
    for name in ("unet", "controlnet", "vae"):
        getattr(pipe, name).to(memory_format=torch.channels_last)


class SdSetting:
    """The generator stage and the bare pipeline, loaded once for one (dtype, channels-last, compile)."""

    def __init__(self, ctx, dtype: str, cl: bool, compile: bool):
        self.ctx, self.dtype, self.cl, self.compile = ctx, dtype, cl, compile
        st, torch, args = ctx.st, ctx.torch, ctx.args
        if compile:
            torch._dynamo.reset()
        params = {"model": ctx.sd, "controlnet": ctx.cn, "steps": args.steps, "dtype": dtype, "compile": compile,
                  "size": args.size}
        t = time.perf_counter()
        self.stage = ctx.stage_cls(params, args.device)
        self.pipe = st.bare_pipeline(ctx.sd, ctx.cn, dtype, args.device, compile)
        if cl:
            channels_last(self.stage.pipe, torch)
            channels_last(self.pipe, torch)
        self.load_s = round(time.perf_counter() - t, 1)
        self.stage_first = False

    def key(self) -> dict:
        return {"dtype": self.dtype, "channels_last": self.cl, "compile": self.compile}

    def measure(self, batch: int) -> dict:
        ctx, st, args = self.ctx, self.ctx.st, self.ctx.args
        from factory.evaluation.fidelity import heldout_layouts

        n = -(-max(batch, args.min_images) // batch) * batch
        row = {**self.key(), "batch": batch, "n": n}
        est = ctx.estimate(self.dtype, self.compile, batch, n)
        if est > ctx.report.left():
            return ctx.report.add("generate", {**row, "skipped": f"budget: about {est:.0f} s needed, "
                                                                 f"{max(ctx.report.left(), 0):.0f} s left"})
        prompts, conditions = st.bare_inputs(heldout_layouts(n), args.size, ctx.gain)
        self.stage_first = not self.stage_first  # which one is timed first alternates: no order bias
        row["timed_first"] = "stage" if self.stage_first else "bare"
        try:
            reset_peak(ctx.torch)
            # Untimed warm-up: CUDA kernels, and with compile the graphs and CUDA graphs for this batch shape.
            with stage_steps(self.stage, args.warmup_steps):
                stage_warm_s = st.stage_loop(self.stage, batch, batch)
            bare_warm_s = st.bare_loop(self.pipe, prompts[:batch], conditions[:batch], batch, args.warmup_steps,
                                       args.size)
            if self.stage_first:
                stage_s = st.stage_loop(self.stage, n, batch)
            bare_s = st.bare_loop(self.pipe, prompts, conditions, batch, args.steps, args.size)
            if not self.stage_first:
                stage_s = st.stage_loop(self.stage, n, batch)
        except Exception as e:  # noqa: BLE001 - an out-of-memory or compile failure is a result too
            free_memory(ctx.torch)
            return ctx.report.add("generate", {**row, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        ctx.learn(self, batch, (stage_s + bare_s) / (2 * n), stage_warm_s + bare_warm_s)
        return ctx.report.add("generate", {
            **row, "stage_images_per_s": round(n / stage_s, 3), "bare_images_per_s": round(n / bare_s, 3),
            "ratio_stage_over_bare": round(bare_s / stage_s, 3), "load_s": self.load_s,
            "warmup_s": {"stage": round(stage_warm_s, 1), "bare": round(bare_warm_s, 1)},
            "peak_gpu_gb_both_loaded": peak_gb(ctx.torch)})

    def close(self) -> None:
        del self.stage, self.pipe
        if self.compile:
            self.ctx.torch._dynamo.reset()
        free_memory(self.ctx.torch)


class Context:
    """What the measurements share: the models, the report and the budget's cost model."""

    def __init__(self, args, torch, st, report):
        self.args, self.torch, self.st, self.report = args, torch, st, report
        self.sec_per_image: dict = {}  # (dtype, compile, batch) -> measured s an image (stage and bare averaged)
        self.compile_s: float | None = None  # warm-up seconds of a compiled batch size (stage + bare)
        self.sd = self.cn = self.stage_cls = None
        self.gain = 1.0

    def estimate(self, dtype: str, compile: bool, batch: int, n: int) -> float:
        """Seconds a measurement will take: 2 x (n + a warm-up batch) images, plus compiling."""
        cuda = self.args.device == "cuda"
        spi = (self.sec_per_image.get((dtype, compile, batch)) or self.sec_per_image.get((dtype, False, batch))
               or max(self.sec_per_image.values(), default=0.25 if cuda else 15.0) * (1.5 if batch == 1 else 1))
        warm = batch * self.args.warmup_steps / self.args.steps
        compile_s = (self.compile_s or 150.0) if compile and cuda else 0.0
        return 1.2 * spi * 2 * (n + warm) + compile_s

    def learn(self, setting: SdSetting, batch: int, spi: float, warm_s: float) -> None:
        self.sec_per_image[(setting.dtype, setting.compile, batch)] = spi
        if setting.compile:
            self.compile_s = warm_s


def sd_part(ctx: Context) -> None:
    args, torch, report = ctx.args, ctx.torch, ctx.report
    ctx.stage_cls = get_stage("generate")
    fp = "fp32" if args.device == "cpu" else "fp16"  # on disk; each setting loads it in the dtype it measures
    ctx.sd, build_s = build("sd15", args, torch, dtype=fp)
    ctx.cn, cn_build_s = build("sd15-controlnet", args, torch, dtype=fp)
    ctx.gain = ctx.st.condition_gain(ctx.cn)
    report.data["build_s"].update({"sd15": build_s, "sd15-controlnet": cn_build_s})
    report.save()

    for dt in args.dtypes:
        for cl in args.channels_last:
            if False in args.compile:
                run_setting(ctx, dt, cl, False, args.batches)


def sd_compiled(ctx: Context) -> None:
    """torch.compile, last (its cost is the least predictable): where eager was fastest first, its
    fastest batch first, so what the budget leaves out is the least likely winner."""
    args, report = ctx.args, ctx.report
    if True not in args.compile:
        return
    if args.device != "cuda":
        report.add("generate", {"compile": True, "skipped": "the stage compiles on CUDA only"})
        return
    eager = [(dt, cl) for dt in args.dtypes for cl in args.channels_last]
    ranked = sorted(eager, key=lambda k: -best_rate(report, *k, False))
    batches = sorted(args.batches, key=lambda b: -best_rate(report, *ranked[0], False, b))
    for dt, cl in ranked:
        run_setting(ctx, dt, cl, True, batches)


def open_setting(ctx: Context, dtype: str, cl: bool, compile: bool) -> SdSetting | None:
    try:
        return SdSetting(ctx, dtype, cl, compile)
    except Exception as e:  # noqa: BLE001
        free_memory(ctx.torch)
        ctx.report.add("generate", {"dtype": dtype, "channels_last": cl, "compile": compile,
                                    "error": f"loading: {type(e).__name__}: {str(e)[:500]}"})
        return None


def run_setting(ctx: Context, dtype: str, cl: bool, compile: bool, batches: list[int]) -> None:
    cheapest = min(ctx.estimate(dtype, compile, b, b) for b in batches)
    if cheapest + 10 > ctx.report.left():  # not worth loading (about 10 s for both pipelines)
        for b in batches:
            ctx.report.add("generate", {"dtype": dtype, "channels_last": cl, "compile": compile, "batch": b,
                                        "skipped": f"budget: {max(ctx.report.left(), 0):.0f} s left"})
        return
    setting = open_setting(ctx, dtype, cl, compile)
    if setting:
        for b in batches:
            setting.measure(b)
        setting.close()


def best_rate(report: Report, dtype: str, cl: bool, compile: bool, batch: int | None = None) -> float:
    rates = [r["stage_images_per_s"] for r in report.data["generate"]
             if "stage_images_per_s" in r and (r["dtype"], r["channels_last"], r["compile"]) == (dtype, cl, compile)
             and batch in (None, r["batch"])]
    return max(rates, default=0.0)


# --- caption and check_clip ----------------------------------------------------------------

@lru_cache(maxsize=4)
def _scenes(n: int):
    from factory.evaluation.fidelity import heldout_layouts

    return heldout_layouts(n)


def image_samples(n: int, size: int, prefix: str):
    """n samples with a size x size image and a caption, each with its own key (the captioner caches by key)."""
    import numpy as np

    from factory.sample import Sample

    scenes = _scenes(min(n, 64))
    out = []
    for i in range(n):
        s = scenes[i % len(scenes)]
        k = -(-size // s.image.shape[0])
        image = np.ascontiguousarray(np.kron(s.image, np.ones((k, k, 1), np.uint8))[:size, :size])
        out.append(Sample(f"{prefix}-{i:06d}", i, image, None, {"caption": s.meta["caption"]}))
    return out


def stage_rows(ctx: Context, section: str, stage, batches: list[int], preprocess) -> None:
    """A model stage's images/s at each batch size, its peak GPU memory and its CPU preprocessing share."""
    args, torch, st = ctx.args, ctx.torch, ctx.st
    spi = None
    for b in batches:
        n = -(-max(2 * b, args.min_images) // b) * b  # two timed batches
        row = {"batch": b, "n": n}
        est = 1.3 * (n + b) * (spi or 0.0) + 5
        if est > ctx.report.left():
            ctx.report.add(section, {**row, "skipped": f"budget: {max(ctx.report.left(), 0):.0f} s left"})
            continue
        try:
            stage.process(image_samples(b, args.size, f"warm{b}"))
            samples = image_samples(n, args.size, f"timed{b}")
            reset_peak(torch)
            t = time.perf_counter()
            for i in range(0, n, b):
                stage.process(samples[i: i + b])
            st._sync()
            secs = time.perf_counter() - t
            t = time.perf_counter()
            preprocess(samples[:b])
            prep_s = (time.perf_counter() - t) * (n / b)
        except Exception as e:  # noqa: BLE001
            free_memory(torch)
            ctx.report.add(section, {**row, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            continue
        failed = [s.meta["failed"]["reason"] for s in samples if not s.alive]
        spi = secs / n
        row.update(images_per_s=round(n / secs, 2), peak_gpu_gb=peak_gb(torch),
                   cpu_preprocess_share=round(min(prep_s / secs, 1.0), 3))
        if section == "caption":
            words = [len(s.meta.get("caption", "").split()) for s in samples]
            row["caption_words_mean"] = round(sum(words) / len(words), 1)
        if failed:
            row["failed"] = f"{len(failed)}: {failed[0]}"
        ctx.report.add(section, row)


def clip_part(ctx: Context) -> None:
    args, torch = ctx.args, ctx.torch
    if ctx.report.left() < (40 if not args.narrow else 5):
        ctx.report.add("check_clip", {"skipped": "budget"})
        return
    folder, ctx.report.data["build_s"]["openclip-vit-b-32"] = build("openclip-vit-b-32", args, torch, dtype="fp32")
    stage, load_s = ctx.st.timed(lambda: get_stage("check_clip")({"model": folder}, args.device))
    ctx.report.data["load_s"]["check_clip"] = round(load_s, 1)

    def preprocess(samples):
        from PIL import Image

        torch.stack([stage.preprocess(Image.fromarray(s.image)) for s in samples])

    stage_rows(ctx, "check_clip", stage, args.clip_batches, preprocess)
    del stage
    free_memory(torch)


def caption_part(ctx: Context) -> None:
    args, torch = ctx.args, ctx.torch
    need = 5 if args.narrow else 150  # build in bf16 on the GPU and save (7.7 GB), load, three batch sizes
    if ctx.report.left() < need:
        ctx.report.add("caption", {"skipped": f"budget: about {need} s needed, {max(ctx.report.left(), 0):.0f} s left"})
        return
    folder, ctx.report.data["build_s"]["blip2-opt-2.7b"] = build("blip2-opt-2.7b", args, torch)
    params = {"model": folder, "only_missing": False, "dtype": args.caption_dtype}
    stage, load_s = ctx.st.timed(lambda: get_stage("caption")(params, args.device))
    ctx.report.data["load_s"]["caption"] = round(load_s, 1)
    ctx.report.data["caption_settings"] = {"dtype": str(stage.dtype).replace("torch.", ""),
                                           "max_new_tokens": stage.params.max_new_tokens}

    def preprocess(samples):
        stage.processor(images=[s.image for s in samples], return_tensors="pt")

    stage_rows(ctx, "caption", stage, args.caption_batches, preprocess)
    del stage
    free_memory(torch)


def get_stage(name: str):
    from factory.stage import get_stage as get

    return get(name)


# --- summary -----------------------------------------------------------------------------------

def summarise(report: Report, args) -> dict:
    rows = [r for r in report.data["generate"] if "stage_images_per_s" in r]
    if not rows:
        return {"generate": "nothing measured"}
    best = max(rows, key=lambda r: r["stage_images_per_s"])
    best_bare = max(rows, key=lambda r: r["bare_images_per_s"])
    setting = lambda r: {k: r[k] for k in ("dtype", "channels_last", "compile", "batch")}  # noqa: E731
    out = {"best_stage": {**setting(best), "stage_images_per_s": best["stage_images_per_s"],
                          "bare_images_per_s": best["bare_images_per_s"],
                          "ratio_stage_over_bare": best["ratio_stage_over_bare"]},
           "best_bare": {**setting(best_bare), "bare_images_per_s": best_bare["bare_images_per_s"]},
           "ratio_min": min(r["ratio_stage_over_bare"] for r in rows),
           "ratio_max": max(r["ratio_stage_over_bare"] for r in rows)}
    if args.narrow or args.device != "cuda":
        out["goals"] = "not applicable: narrowed models or no GPU"
    else:
        out["goals"] = {
            f"stage >= {GOAL_IMAGES_PER_S} images/s at the best setting":
                best["stage_images_per_s"] >= GOAL_IMAGES_PER_S,
            f"stage >= {GOAL_RATIO}x bare at the best setting": best["ratio_stage_over_bare"] >= GOAL_RATIO,
            f"stage >= {GOAL_RATIO}x bare at every measured setting": out["ratio_min"] >= GOAL_RATIO}
    return out


def table(report: Report) -> str:
    lines = ["dtype  cl   compile batch   stage img/s   bare img/s   stage/bare"]
    for r in report.data["generate"]:
        if "stage_images_per_s" in r:
            lines.append(f"{r['dtype']:<6} {str(r['channels_last']):<5} {str(r['compile']):<7} {r['batch']:>5} "
                         f"{r['stage_images_per_s']:>13.3f} {r['bare_images_per_s']:>12.3f} "
                         f"{r['ratio_stage_over_bare']:>12.3f}")
        elif "batch" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"{r['dtype']:<6} {str(r['channels_last']):<5} {str(r['compile']):<7} {r['batch']:>5}"
                         f"   {why}")
    for section in ("caption", "check_clip"):
        for r in report.data[section]:
            what = (f"{r['images_per_s']:.2f} images/s, peak {r['peak_gpu_gb']} GB, "
                    f"CPU preprocessing {100 * r['cpu_preprocess_share']:.0f} %" if "images_per_s" in r
                    else r.get("skipped") or r.get("error"))
            lines.append(f"{section} batch {r.get('batch', '-')}: {what}")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", help="install the wheels in this folder first (pip --no-index --no-deps --target)")
    ap.add_argument("--site", default=str(Path(tempfile.gettempdir()) / "gpu-sd15-site"),
                    help="where --wheels installs to")
    out = os.environ.get("OUT")
    ap.add_argument("--json", default=os.path.join(out, "gpu_sd15.json") if out else None,
                    help="write the report here, rewritten after each measurement (default: $OUT/gpu_sd15.json)")
    ap.add_argument("--budget-s", type=float, default=540, help="seconds from the start; later measurements are "
                                                                "skipped when their estimate does not fit")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "gpu-sd15-models"),
                    help="where the random-weight model folders are built (reused when complete)")
    ap.add_argument("--narrow", action="store_true", help="narrowed models (same topology and 512 x 512 images)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU rehearsal: --narrow --device cpu --dtypes fp32 --batches 1 --steps 2 --compile off "
                         "--channels-last off on --caption-batches 2 --clip-batches 2 --min-images 1 --size 256 "
                         "(256 px: the same code at a quarter of the pixels; the GPU run is at 512)")
    ap.add_argument("--dtypes", nargs="+", choices=["fp16", "bf16", "fp32"], default=["fp16", "bf16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--channels-last", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--warmup-steps", type=int, default=3, help="DDIM steps of the untimed warm-up batch")
    ap.add_argument("--min-images", type=int, default=4, help="images timed per measurement, at least one batch")
    ap.add_argument("--size", type=int, default=512, help="image side")
    ap.add_argument("--caption-batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--caption-dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto",
                    help="the captioner's dtype (auto: fp16 on a GPU, the stage's default)")
    ap.add_argument("--clip-batches", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-blip2", action="store_true")
    ap.add_argument("--skip-clip", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on a CPU, torch's on a GPU)")
    args = ap.parse_args(argv)
    args.compile = [v == "on" for v in args.compile]
    args.channels_last = [v == "on" for v in args.channels_last]
    if args.cpu_smoke:
        args.narrow, args.device, args.dtypes, args.batches, args.steps = True, "cpu", ["fp32"], [1], 2
        args.warmup_steps, args.compile, args.channels_last, args.min_images = 1, [False], [False, True], 1
        args.caption_batches, args.clip_batches, args.size = [2], [2], 256
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    wheels = install_wheels(args.wheels, args.site) if args.wheels else []
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import semaug_throughput as st  # the bare loop and the stage loop of the CPU benchmark

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda":
        # One static graph per batch size (an actor runs one); room for 4 sizes x 2 pipelines.
        torch._dynamo.config.automatic_dynamic_shapes = False
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    quiet()
    report = Report(args.json, args.budget_s)
    report.data.update(env=environment(torch, args, wheels), settings={
        k: v for k, v in vars(args).items() if k not in ("wheels", "site", "json", "cpu_smoke")},
        goals={"images_per_s": GOAL_IMAGES_PER_S, "ratio_stage_over_bare": GOAL_RATIO},
        build_s={}, load_s={})
    report.save()

    def stop(signum, frame):
        report.data["interrupted"] = f"signal {signum} after {time.time() - T0:.0f} s"
        report.save()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    ctx = Context(args, torch, st, report)
    if not args.skip_sd:
        sd_part(ctx)  # eager settings
    if not args.skip_clip:
        clip_part(ctx)
    if not args.skip_blip2:
        caption_part(ctx)
    if not args.skip_sd:
        sd_compiled(ctx)
    report.data["summary"] = summarise(report, args)
    report.save()
    print(table(report))
    print(json.dumps(report.data["summary"], indent=1))
    return report.data


def quiet() -> None:
    """No progress bars or load warnings between the measurements."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def environment(torch, args, wheels) -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "open_clip_torch", "pydantic", "timm"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env = {"python": sys.version.split()[0], "versions": versions, "wheels": wheels, "device": args.device,
           "torch_threads": torch.get_num_threads()}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


if __name__ == "__main__":
    main()
