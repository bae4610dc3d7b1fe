"""`factory inspect`: what an output folder holds, from its index, stats and labels."""
from __future__ import annotations

import json
from collections import Counter

import webdataset as wds

from .errors import FactoryError
from .masks import MEMBER as MASK
from .shards import INDEX, MANIFEST, OutputDir, shard_name


def summarise(url: str) -> dict:
    out = OutputDir(url)
    manifest = out.manifest() if out.fs.exists(out.path(MANIFEST)) else {}
    planned = manifest.get("plan", {}).get("shards")
    complete = sorted(out.completed())
    if out.fs.exists(out.path(INDEX)):
        with out.fs.open(out.path(INDEX)) as f:
            index = json.load(f)
    elif manifest:
        # Not finished (a range run, or a run that stopped): what is there, and what is missing.
        index = {"shardlist": [{"url": shard_name(i)} for i in complete]}
    else:
        raise FactoryError(f"{url!r} has no {INDEX}: not a finished factory output (run it, or rerun to finish it)")
    missing = sorted(set(range(planned)) - set(complete)) if planned is not None else []
    counts, labels, ops, checks, objects = Counter(), Counter(), Counter(), Counter(), Counter()
    failed, filtered, spent = Counter(), Counter(), Counter()
    samples = 0
    for shard in index["shardlist"]:
        i = int(shard["url"][len("shard-"): -len(".tar")])
        stats = out.read_stats(i) if out.fs.exists(out.path(f"shard-{i:06d}.stats.json")) else {}
        failed.update(stats.get("failed", {}))
        filtered.update(stats.get("filtered", {}))
        spent.update(stats.get("stage_seconds", {}))
        urls = out.fs.unstrip_protocol(out.path(shard["url"])) if "://" in url else out.path(shard["url"])
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            samples += 1
            meta = json.loads(sample["json"])
            labels.update(k for k in sample if not k.startswith("__"))
            labels.update(f"json.{k}" for k in meta)
            if "count" in meta:
                counts[int(meta["count"])] += 1
            ops[" > ".join(o["op"] for o in meta.get("ops", [])) or "(real)"] += 1
            for name, check in meta.get("checks", {}).items():
                if isinstance(check, dict) and "exact" in check:
                    checks[f"{name} exact"] += bool(check["exact"])
                    checks[f"{name} checked"] += 1
                if isinstance(check, dict) and "rejected" in check:  # the realism filter
                    checks[f"{name} rejected"] += bool(check["rejected"])
                    checks[f"{name} scored"] += 1
                _count_objects(objects, check.get("objects") if name == "edit" and isinstance(check, dict)
                               else check if name == "objects" else None)
    return {
        "url": url,
        "recipe": manifest.get("recipe", {}).get("name"),
        "recipe_hash": manifest.get("recipe_hash"),
        "shards": len(index["shardlist"]),
        "shards_planned": planned,
        "shards_missing": missing,
        "samples": samples,
        "members_and_labels": dict(sorted(labels.items())),
        "masks": labels.get(MASK, 0),  # samples with an instance mask (renders know theirs; new images drop them)
        "count_histogram": dict(sorted(counts.items())),
        "op_chains": dict(ops),
        "checks": dict(checks),
        "objects": _object_rates(objects),
        "failed": dict(failed),
        "filtered": dict(filtered),
        # Worker time per stage, summed over samples (from the shards' stats; time is no label).
        "stage_seconds": {k: round(v, 1) for k, v in spent.items()},
    }


OBJECT_KINDS = ("merged", "split", "missing", "extra")


def _count_objects(tally: Counter, check: dict | None) -> None:
    """Tally one sample's pixel object check (checks.objects, or checks.edit.objects)."""
    if not isinstance(check, dict) or "pass" not in check:
        return
    tally["checked"] += 1
    tally["pass"] += bool(check["pass"])
    for kind in OBJECT_KINDS:
        tally[kind] += bool(check.get(kind))
    for key in ("legible", "digits_kept"):
        if check.get(key) is not None:
            tally[f"{key} sum"] += check[key]
            tally[f"{key} n"] += 1


def _object_rates(tally: Counter) -> dict:
    """Shares of checked samples that pass, and that have each failure kind; mean legibility/identity."""
    n = tally["checked"]
    if not n:
        return {}
    out = {"checked": n, "pass": round(tally["pass"] / n, 4),
           **{kind: round(tally[kind] / n, 4) for kind in OBJECT_KINDS}}
    for key in ("legible", "digits_kept"):
        if tally[f"{key} n"]:
            out[key] = round(tally[f"{key} sum"] / tally[f"{key} n"], 4)
    return out


def render(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{summary['url']}  ({summary['recipe'] or 'world export'})", show_header=False)
    t.add_row("shards", str(summary["shards"]))
    if summary["shards_missing"]:
        t.add_row("shards missing", f"{len(summary['shards_missing'])} of {summary['shards_planned']}: "
                                    f"{shard_ranges(summary['shards_missing'])} (run them with --shards A:B)")
    t.add_row("samples", str(summary["samples"]))
    t.add_row("members/labels", ", ".join(f"{k} {v}" for k, v in summary["members_and_labels"].items()))
    n = summary["samples"]
    t.add_row("instance masks", f"{summary['masks']}/{n} samples ({100 * summary['masks'] / max(n, 1):.1f} %)")
    hist = summary["count_histogram"]
    if hist:
        peak = max(hist.values())
        t.add_row("count histogram", "\n".join(f"{c:>3} {'#' * max(1, round(30 * n / peak))} {n}" for c, n in hist.items()))
    t.add_row("op chains", ", ".join(f"{k}: {v}" for k, v in summary["op_chains"].items()))
    for name in [k[: -len(" checked")] for k in summary["checks"] if k.endswith(" checked")]:
        ok, n = summary["checks"][f"{name} exact"], summary["checks"][f"{name} checked"]
        t.add_row(f"check {name}", f"{ok}/{n} exact ({100 * ok / max(n, 1):.1f} %)")
    for name in [k[: -len(" scored")] for k in summary["checks"] if k.endswith(" scored")]:
        bad, n = summary["checks"][f"{name} rejected"], summary["checks"][f"{name} scored"]
        t.add_row(f"check {name}", f"{bad}/{n} rejected ({100 * bad / max(n, 1):.1f} %)")
    rates = summary.get("objects") or {}
    if rates:
        parts = [f"{rates['pass']:.1%} pass of {rates['checked']}"]
        parts += [f"{k} {rates[k]:.1%}" for k in OBJECT_KINDS]
        parts += [f"{k.replace('_', ' ')} {rates[k]:.1%}" for k in ("legible", "digits_kept") if k in rates]
        t.add_row("pixel object check", ", ".join(parts))
    for kind in ("filtered", "failed"):
        t.add_row(kind, ", ".join(f"{k}: {v}" for k, v in summary[kind].items()) or "none")
    if summary.get("stage_seconds"):
        t.add_row("stage time", ", ".join(f"{k} {v:.1f} s" for k, v in summary["stage_seconds"].items()))
    console.print(t)


def shard_ranges(shards: list[int]) -> str:
    """[2, 3, 4, 9] -> '2:5, 9:10', in the --shards notation."""
    out, start = [], None
    for i, s in enumerate(shards):
        if start is None:
            start = s
        if i + 1 == len(shards) or shards[i + 1] != s + 1:
            out.append(f"{start}:{s + 1}")
            start = None
    return ", ".join(out)
