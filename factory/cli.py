"""The `factory` command. Every user error prints one paragraph and exits 2."""
from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console

from .errors import FactoryError

console = Console()
err_console = Console(stderr=True, emoji=False)  # "world:train:5" is no emoji code

DESCRIPTION = """\
A synthetic-dataset factory: a recipe (YAML) describes controlled variations
of a labelled image set; the factory runs its stages on Ray and writes
WebDataset shards whose labels hold by construction.

Typical session:
  factory world --split train --n 500 --out data/world-train   # real scenes
  factory validate recipes/demo.yaml                            # check a recipe
  factory plan recipes/demo.yaml                                # what it will make
  factory run recipes/demo.yaml --out out/demo                  # make it
  factory inspect out/demo                                      # what was made
  factory gallery out/demo --n 64                               # look at it
"""


def _recipe(path: str):
    from .recipe import load_recipe

    return load_recipe(path)


def cmd_validate(args) -> int:
    recipe = _recipe(args.recipe)
    console.print_json(json.dumps(recipe.resolved()))
    console.print(f"[green]ok[/]: {args.recipe} is valid (content hash {recipe.content_hash()[:12]})")
    return 0


def cmd_plan(args) -> int:
    from rich.table import Table

    from .plan import make_plan, parse_shard_range

    recipe = _recipe(args.recipe)
    plan = make_plan(recipe)  # sizes only: rows are made per shard, so this is cheap at any scale
    span = parse_shard_range(args.shards, plan.num_shards)
    t = Table(title=f"plan: {recipe.name}", show_header=False)
    t.add_row("sources", ", ".join(_source_text(s) for s in recipe.sources))
    t.add_row("source samples", str(plan.source_samples))
    t.add_row("variants per source (M)", str(recipe.variants))
    t.add_row("output samples", str(plan.total))
    t.add_row("shards", f"{plan.num_shards} of up to {recipe.output.shard_size}")
    if len(span) != plan.num_shards:
        n = sum(plan.shard_len(s) for s in span)
        t.add_row("--shards", f"{span.start}:{span.stop}: {len(span)} shards, {n} samples")
    for i, spec in enumerate(["read", *[s.name for s in recipe.stages]]):
        t.add_row(f"stage {i}: {spec}", f"{plan.total} samples")
    first = plan.rows(span.start * plan.shard_size, span.start * plan.shard_size + 3)
    if first:
        t.add_row("first keys", ", ".join(it.key for it in first))
    console.print(t)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    return 0


def _out_of(args, recipe) -> str:
    out = args.out or recipe.output.path
    if not out:
        raise FactoryError("no output folder: pass --out DIR or set output.path in the recipe")
    return out


def cmd_run(args) -> int:
    from .pipeline import run
    from .progress import RunProgress, print_summary

    recipe = _recipe(args.recipe)
    out = _out_of(args, recipe)
    result = run(recipe, out, address=args.address, workers=args.workers,
                 progress=None if args.quiet else RunProgress(err_console), num_cpus=args.num_cpus,
                 shards=args.shards, notify=lambda m: err_console.print(f"[yellow]note:[/] {m}", highlight=False))
    print_summary(result, console)
    if result.missing:
        console.print(f"shards: {out}/shard-*.tar; {result.missing} shards of the plan are still missing (other "
                      f"--shards ranges): index.json is written by the run that completes the last of them. "
                      f"`factory inspect {out}` lists them.")
    else:
        console.print(f"shards: {out}/shard-*.tar  index: {out}/index.json")
    return 0


def _source_text(s) -> str:
    if s.kind == "world":
        return f"world {s.split}[{s.start}:{s.start + s.n}]"
    if s.kind == "latents":
        return f"latents seeds {s.start}..{s.start + s.n - 1}"
    return f"{s.kind} {getattr(s, 'path', '')}"


def cmd_world(args) -> int:
    from .world.export import write_fsc147, write_world_shards

    if args.n <= 0:
        raise FactoryError(f"--n must be a positive number of scenes, got {args.n}")
    if args.format == "fsc147":
        root = write_fsc147(args.split, args.n, args.out, args.start, args.seed)
        console.print(f"wrote {args.n} {args.split} scenes as an FSC147-style folder: {root}")
    else:
        index = write_world_shards(args.split, args.n, args.out, args.start, args.seed, args.shard_size)
        console.print(f"wrote {sum(s['nsamples'] for s in index['shardlist'])} {args.split} scenes "
                      f"in {len(index['shardlist'])} shards: {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from .inspection import render, summarise

    summary = summarise(args.dir)
    if args.json:
        console.print_json(json.dumps(summary))
    else:
        render(summary, console)
    return 0


def cmd_gallery(args) -> int:
    from .gallery import write_gallery

    path = write_gallery(args.dir, n=args.n, html=args.html)
    console.print(f"gallery: {path}")
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    recipe = _recipe(args.recipe)
    if args.shards is not None:  # refuse a bad range here, not in a job on the cluster
        from .plan import make_plan, parse_shard_range

        parse_shard_range(args.shards, make_plan(recipe).num_shards)
    return submit(args.recipe, recipe, args.address, out=_out_of(args, recipe), follow=not args.no_follow,
                  workers=args.workers, shards=args.shards, token_file=args.token_file)


MODELS_HELP = """\
Write a real-size model folder at random weights, from the published configuration
kept in factory/models/configs (no hub, no download). The folders are ordinary
diffusers / transformers / open_clip folders: recipes and `factory train` take them
where they take a hub id. Random weights only run the code path at real size and
measure its cost (seconds per sample, memory); they make no sensible image.

  factory models init sd15              --out /tmp/real/sd15              # 3.4 GB
  factory models init sd15-controlnet   --out /tmp/real/controlnet --unet-from /tmp/real/sd15
  factory models init blip2-opt-2.7b    --out /tmp/real/blip2             # 7.7 GB in bf16
  factory models init openclip-vit-b-32 --out /tmp/real/openclip
  factory models init csrnet-counter    --out /tmp/real/counter

benchmarks/real_size_cpu.py runs semaug-sd15's stages with them on an FSC147-format
folder; benchmarks/gpu_sd15.py measures SD 1.5 + ControlNet on a GPU.
"""


def cmd_models(args) -> int:
    from .models.real_size import init_model

    out = init_model(args.name, args.out, narrow=args.narrow, seed=args.seed, dtype=args.dtype,
                     unet_from=args.unet_from)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(f"wrote {args.name}{' (narrowed)' if args.narrow else ''} at random weights: {out} "
                  f"({size / 2**20:,.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="factory", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, help_, desc=None):
        sp = sub.add_parser(name, help=help_, description=desc or help_,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("validate", cmd_validate, "check a recipe and print it with every default filled in",
             "Check a recipe. Prints the resolved recipe; on an error, names the YAML path and line and how to fix it.")
    sp.add_argument("recipe", help="path to a recipe YAML (see recipes/)")

    sp = add("plan", cmd_plan, "show what a run will produce, without loading any model",
             "Show what a run will produce: totals per source, shard and stage, and the first keys. Rows are "
             "made per shard when a run reads them, so this costs the same for ten samples or ten million.")
    sp.add_argument("recipe", help="path to a recipe YAML")
    sp.add_argument("--shards", metavar="A:B", help="show this range of shards, as `factory run --shards` runs it")

    sp = add("run", cmd_run, "run a recipe on Ray and write shards",
             "Run a recipe end to end: read sources, run the stages on Ray actor pools, write WebDataset "
             "shards, per-shard stats, an index and a manifest. Rerunning into the same --out resumes: "
             "finished shards are kept, and the result is byte-identical to an uninterrupted run.")
    sp.add_argument("recipe", help="path to a recipe YAML")
    sp.add_argument("--out", help="output folder or fsspec URI (default: the recipe's output.path)")
    sp.add_argument("--address", help="Ray cluster to join, e.g. auto or ray://HEAD:10001 (default: a local Ray)")
    sp.add_argument("--workers", type=int, help="most actors per stage (overrides the recipe)")
    sp.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    sp.add_argument("--shards", metavar="A:B", help="run only shards A to B-1 of the plan (A:B, like a Python slice; A or B may be left out), so one recipe can be split across jobs; the union of the ranges is byte-identical to one whole run")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("world", cmd_world, "write scenes of the reference world (real handwritten digits, exact labels)",
             "Write reference-world scenes as shards in the sample format of generated data, "
             "or as an FSC147-style folder (--format fsc147). Train and test splits use disjoint handwriting.")
    sp.add_argument("--split", choices=["train", "test"], default="train")
    sp.add_argument("--n", type=int, default=500, help="number of scenes")
    sp.add_argument("--start", type=int, default=0, help="index of the first scene")
    sp.add_argument("--seed", type=int, default=0, help="world seed")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--format", choices=["shards", "fsc147"], default="shards")
    sp.add_argument("--shard-size", type=int, default=1000)

    sp = add("inspect", cmd_inspect, "summarise an output: samples, labels, count histogram, checks, failures")
    sp.add_argument("dir", help="an output folder (with index.json)")
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")

    sp = add("gallery", cmd_gallery, "write an HTML contact sheet with labels drawn on the images")
    sp.add_argument("dir", help="an output folder (with index.json)")
    sp.add_argument("--n", type=int, default=64, help="number of samples to show")
    sp.add_argument("--html", help="where to write the page (default: DIR/gallery.html)")

    sp = add("models", cmd_models, "build real-size model stacks at random weights, offline (for measuring cost)",
             MODELS_HELP)
    msub = sp.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mp = msub.add_parser("init", help="write one model folder at random weights", description=MODELS_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    from .models.real_size import NAMES

    mp.add_argument("name", choices=NAMES, help="which model")
    mp.add_argument("--out", required=True, help="a new (or empty) folder")
    mp.add_argument("--narrow", action="store_true",
                    help="same topology, image sizes and vocabularies at a fraction of the widths and depths "
                         "(tests, and a CPU rehearsal of the GPU benchmark)")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                    help="weights' dtype on disk (default fp32; bf16 for blip2-opt-2.7b, 15 GB in fp32)")
    mp.add_argument("--unet-from", metavar="SD_FOLDER",
                    help="sd15-controlnet: copy the encoder of this SD 1.5 folder's UNet (default: a fresh UNet)")

    from .train.cli import add_parser as add_train

    add_train(sub)

    sp = add("submit", cmd_submit, "send a recipe to a Ray cluster as a job and follow its logs",
             "Submit `factory run` as a Ray job (Jobs SDK) with this project as its runtime environment. "
             "Prints the job id, then follows the logs until the job ends.")
    sp.add_argument("recipe", help="path to a recipe YAML")
    sp.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    sp.add_argument("--out", help="output folder or URI as the cluster sees it")
    sp.add_argument("--workers", type=int, help="most actors per stage")
    sp.add_argument("--shards", metavar="A:B", help="run only shards A to B-1 of the plan (A:B, like a Python slice; A or B may be left out), so one recipe can be split across jobs; the union of the ranges is byte-identical to one whole run")
    sp.add_argument("--token-file", metavar="PATH",
                    help="the cluster's auth token in a file (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                         "or ~/.ray/auth_token)")
    sp.add_argument("--no-follow", action="store_true", help="print the job id and return")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except FactoryError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing half-written was kept; rerun the same command to resume.")
        return 2


if __name__ == "__main__":
    sys.exit(main())
