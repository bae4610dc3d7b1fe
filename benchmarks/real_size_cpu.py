"""The real-model path at real size, on this CPU: recipes/semaug-sd15.yaml's stages with SD 1.5 +
a density ControlNet at 512 x 512, BLIP-2 OPT-2.7B, OpenCLIP ViT-B/32 and a CSRNet counter, all
at random weights (`factory models init`), on an FSC147-format folder (`factory world --format
fsc147`: JPEGs 384 px high of varying width).

1. Each stage alone, in a fresh process, on the same samples in the recipe's order (read ->
   caption -> swap_caption -> generate -> check_count -> check_clip): seconds to load its model,
   seconds per sample, and the process's peak RSS (what its actor needs; the declaration it
   suggests is that + 25 %, rounded up to 256 MiB).
2. The whole recipe through `factory run` (Ray actors, shards written), each actor's peak RSS
   sampled twice a second, and the shards checked: 512 x 512 images, density maps whose sum is
   the count, captions, both checks.
3. One real-size training step (in fact two, to report a pace past the first) of
   `factory train controlnet` (SD 1.5 frozen, the ControlNet trained, gradient checkpointing,
   fp32, batch 1 at 512) and of `factory train counter --counter-arch csrnet` (batch 4 at 512):
   seconds per step and peak RSS.

The caption stage runs with only_missing: false here (the FSC147 folder has class names, which
semaug-sd15 turns into captions, so it would otherwise skip every sample): its figures are what a
folder without captions costs. A random BLIP-2 never stops early, so each caption is the full
30 new tokens: a worst case. fp32 on the CPU (fp16 is the recipe's GPU setting); 2 DDIM steps
(the recipe's 20 cost 10x the UNet share).

    python benchmarks/real_size_cpu.py [--n 4] [--steps 2] [--work out/real-size] [--json report.json]
        [--skip-run] [--skip-train] [--only generate ...]

Models are built once into WORK/models (about 13 GB) and reused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 2**20
STEP = 256 * MB
MODELS = ("sd15", "sd15-controlnet", "blip2-opt-2.7b", "openclip-vit-b-32", "csrnet-counter")
STAGES = ("read", "caption", "swap_caption", "generate", "check_count", "check_clip")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_models(work: Path, narrow: bool = False) -> dict[str, Path]:
    from factory.models.real_size import init_model

    paths = {}
    folder = work / ("models-narrow" if narrow else "models")
    for name in MODELS:
        out = folder / name
        if not (out / "RANDOM_WEIGHTS.txt").is_file():
            shutil.rmtree(out, ignore_errors=True)
            t = time.time()
            init_model(name, out, narrow=narrow,
                       unet_from=str(folder / "sd15") if name == "sd15-controlnet" else None)
            log(f"built {name} in {time.time() - t:.0f} s")
        paths[name] = out
    return paths


def recipe(models: dict[str, Path], data: Path, n: int, steps: int) -> dict:
    """semaug-sd15.yaml with the random-weight folders, 2 steps, fp32 and no GPU."""
    r = yaml.safe_load((ROOT / "recipes" / "semaug-sd15.yaml").read_text())
    r["variants"] = 1
    r["sources"] = [{"kind": "fsc147", "path": str(data), "split": "train", "limit": n}]
    params = {
        "caption": {"model": str(models["blip2-opt-2.7b"]), "only_missing": False, "dtype": "bf16"},
        "swap_caption": {"encoder": f"openclip:{models['openclip-vit-b-32']}"},
        "generate": {"model": str(models["sd15"]), "controlnet": str(models["sd15-controlnet"]), "steps": steps,
                     "dtype": "fp32"},
        "check_count": {"counter": str(models["csrnet-counter"])},
        # Scores stored, nothing filtered: a random CLIP's scores say nothing, and every sample
        # must reach the shards to be checked there.
        "check_clip": {"model": str(models["openclip-vit-b-32"]), "min_score": None},
    }
    for stage in r["stages"]:
        stage["params"].update(params[stage["name"]])
        stage["resources"] = {"num_cpus": 0.25, "num_gpus": 0}
        stage["batch_size"] = n
    r["output"] = {"path": "unused", "shard_size": n, "image_format": "jpg"}
    return r


# --- 1. each stage alone ---------------------------------------------------------------------

def stage_child(name: str, spec_file: Path, samples_in: Path, samples_out: Path, report: Path) -> None:
    """In a fresh process: load one stage, run it on the pickled samples, pickle them on."""
    import torch

    from factory.recipe import parse_recipe
    from factory.stage import get_stage

    torch.set_num_threads(os.cpu_count() or 1)
    r = parse_recipe(yaml.safe_load(spec_file.read_text()))
    context = {"sources": [s.model_dump(mode="json") for s in r.sources], "seed": r.seed}
    t0 = time.time()
    if name == "read":
        from factory.plan import make_plan
        from factory.sources import SourceReader

        plan = make_plan(r)  # the run's rows, as its read tasks make them
        samples = [item.to_sample() for shard in range(plan.num_shards) for item in plan.shard_rows(shard)]
        stage = SourceReader()
    else:
        samples = pickle.loads(samples_in.read_bytes())
        spec = next(s for s in r.stages if s.name == name)
        stage = get_stage(name)(spec.params, context=context)
    load = time.time() - t0
    t1 = time.time()
    stage.process(samples)
    seconds = time.time() - t1
    samples_out.write_bytes(pickle.dumps(samples))
    alive = [s for s in samples if s.alive]
    failed = [s.meta.get("failed") or s.meta.get("filtered") for s in samples if not s.alive]
    report.write_text(json.dumps({
        "stage": name, "load_s": round(load, 1), "seconds": round(seconds, 2), "samples": len(samples),
        "alive": len(alive), "failed": failed[:3], "s_per_sample": round(seconds / max(len(samples), 1), 2),
        "peak_rss_mb": peak_rss_mb(),
    }))


def peak_rss_mb() -> int:
    """This process's peak RSS since it started (VmHWM: its own memory map's high-water mark;
    getrusage's ru_maxrss would also count the parent's RSS at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def cli_child(argv: list[str], report: Path) -> None:
    """In a fresh process: one `factory` command, then its peak RSS into ``report``."""
    from factory.cli import main as factory_main

    code = factory_main(argv)
    report.write_text(json.dumps({"exit": code, "peak_rss_mb": peak_rss_mb()}))


def stages_alone(spec_file: Path, work: Path, only: list[str] | None) -> list[dict]:
    rows = []
    prev = None
    for name in STAGES:
        out, rep = work / f"samples-{name}.pkl", work / f"report-{name}.json"
        if only and name not in only and out.is_file():  # reuse an earlier stage's output
            prev = out
            continue
        cmd = [sys.executable, __file__, "--child", name, "--spec", str(spec_file),
               "--samples-in", str(prev or ""), "--samples-out", str(out), "--report", str(rep)]
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            log(proc.stderr[-3000:])
            raise SystemExit(f"stage {name} failed (exit {proc.returncode})")
        row = json.loads(rep.read_text())
        row["process_s"] = round(time.time() - t, 1)
        rows.append(row)
        log(f"{name}: {row}")
        prev = out
    return rows


# --- 2. the whole recipe through `factory run` ------------------------------------------------

def whole_run(spec_file: Path, work: Path, n: int) -> dict:
    from _rss import RssSampler

    from factory.pipeline import init_ray, run
    from factory.recipe import parse_recipe

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    init_ray()
    sampler = RssSampler(0.5)
    sampler.start()
    t = time.time()
    try:
        res = run(parse_recipe(yaml.safe_load(spec_file.read_text())), str(out))
    finally:
        sampler.stop()
    seconds = time.time() - t
    peaks = {k: round(v / MB) for k, v in sorted(sampler.peak_by_actor().items())}
    return {"planned": res.planned, "generated": res.generated, "seconds": round(seconds, 1),
            "actor_peak_rss_mb": peaks, "shards": check_shards(out, n)}


def check_shards(out: Path, n: int) -> dict:
    """Every written sample: a 512 x 512 image, a density map at its size summing to the count, a
    caption, the count and CLIP checks."""
    from factory.loaders import ShardDataset

    rows = list(ShardDataset(str(out)))
    problems = []
    for s in rows:
        key, labels = s["key"], s["json"]
        if tuple(s["image"].shape) != (3, 512, 512):
            problems.append(f"{key}: image {tuple(s['image'].shape)}")
        if "density" not in s or abs(float(s["density"].sum()) - s.get("count", -1)) > 0.5:
            problems.append(f"{key}: density/count")
        if not s["caption"]:
            problems.append(f"{key}: no caption")
        if not {"count", "clip"} <= set(labels.get("checks", {})):
            problems.append(f"{key}: checks {sorted(labels.get('checks', {}))}")
    return {"samples": len(rows), "expected": n, "problems": problems[:5], "valid": not problems and len(rows) == n}


# --- 3. one training step each ----------------------------------------------------------------

def run_measured(argv: list[str], log_file: Path) -> tuple[float, int | None, int]:
    """(wall seconds, peak RSS in MB, exit code) of a `factory` command in a fresh process."""
    report = log_file.with_suffix(".rss.json")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--cli-report", str(report), "--", *argv]
    t = time.time()
    with log_file.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    peak = json.loads(report.read_text())["peak_rss_mb"] if report.is_file() else None
    return time.time() - t, peak, code


def pace(train_log: Path) -> float | None:
    """Mean seconds per step the training loop logged."""
    for line in reversed(train_log.read_text().splitlines() if train_log.is_file() else []):
        if "s/step" in line:
            return float(line.rsplit("(", 1)[1].split()[0])
    return None


def training_steps(models: dict[str, Path], data: Path, work: Path) -> list[dict]:
    runs = {kind: work / f"train-{kind}" for kind in ("controlnet", "counter")}  # each job's --out
    jobs = {
        "controlnet": ["train", "controlnet", "--pipeline", str(models["sd15"]),
                       "--controlnet", str(runs["controlnet"] / "controlnet"), "--init", str(models["sd15-controlnet"]),
                       "--data", f"fsc147:{data}:train", "--resolution", "512", "--crop", "0",
                       "--batch", "1", "--steps", "2", "--eval-n", "0", "--gradient-checkpointing",
                       "--checkpoint-every", "1000", "--out", str(runs["controlnet"])],
        "counter": ["train", "counter", "--counter-arch", "csrnet", "--data", f"fsc147:{data}:train",
                    "--resolution", "512", "--batch", "4", "--steps", "2", "--checkpoint-every", "1000",
                    "--export", str(runs["counter"] / "counter"), "--out", str(runs["counter"])],
    }
    rows = []
    for kind, cmd in jobs.items():
        shutil.rmtree(runs[kind], ignore_errors=True)
        runs[kind].mkdir(parents=True)
        log_file = work / f"train-{kind}.log"
        wall, peak, rc = run_measured(cmd, log_file)
        row = {"train": kind, "exit": rc, "wall_s": round(wall, 1), "s_per_step": pace(runs[kind] / "train.log"),
               "peak_rss_mb": peak}
        rows.append(row)
        log(f"train {kind}: {row}")
        if rc:
            log(log_file.read_text()[-3000:])
    return rows


def declare(peak_mb: float) -> int:
    return math.ceil(peak_mb * MB * 1.25 / STEP) * STEP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="samples (FSC147-format images, one variant each)")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps")
    ap.add_argument("--work", default="out/real-size", help="models, data and outputs (reused)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="rerun only these stages alone")
    ap.add_argument("--skip-run", action="store_true", help="no `factory run` of the whole recipe")
    ap.add_argument("--skip-train", action="store_true", help="no training steps")
    ap.add_argument("--narrow", action="store_true",
                    help="narrowed models (same topology and sizes, a fraction of the widths): a quick rehearsal")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cli-report", help=argparse.SUPPRESS)
    ap.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--samples-in", help=argparse.SUPPRESS)
    ap.add_argument("--samples-out", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cli_report:
        cli_child(args.argv, Path(args.cli_report))
        return
    if args.child:
        stage_child(args.child, Path(args.spec), Path(args.samples_in or "."), Path(args.samples_out),
                    Path(args.report))
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.narrow)
    data = work / "fsc147"
    if not (data / "annotation_FSC147_384.json").is_file():
        from factory.world.export import write_fsc147

        write_fsc147("train", max(args.n, 8), str(data))
    spec_file = work / "recipe.yaml"
    spec_file.write_text(yaml.safe_dump(recipe(models, data, args.n, args.steps), sort_keys=False))
    report: dict = {"n": args.n, "steps": args.steps, "threads": os.cpu_count(), "narrow": args.narrow}
    report["stages"] = stages_alone(spec_file, work, args.only)
    if not args.skip_run:
        report["run"] = whole_run(spec_file, work, args.n)
        log(f"factory run: {report['run']}")
    if not args.skip_train:
        report["train"] = training_steps(models, data, work)
    print(f"\n{'stage':<14} {'load s':>7} {'s/sample':>9} {'peak RSS MB':>12} {'declare GiB':>12}")
    for r in report["stages"]:
        print(f"{r['stage']:<14} {r['load_s']:>7} {r['s_per_sample']:>9} {r['peak_rss_mb']:>12} "
              f"{declare(r['peak_rss_mb']) / 2**30:>12.2f}")
    if "run" in report:
        run_ = report["run"]
        print(f"\nfactory run: {run_['generated']} of {run_['planned']} samples in {run_['seconds']} s; shards "
              f"{'valid' if run_['shards']['valid'] else 'INVALID ' + str(run_['shards']['problems'])}")
        for actor, mb in run_["actor_peak_rss_mb"].items():
            print(f"  {actor:<34} peak RSS {mb:>7} MB")
    for r in report.get("train", []):
        print(f"train {r['train']:<11} {r['s_per_step']} s/step, peak RSS {r['peak_rss_mb']} MB (exit {r['exit']})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
