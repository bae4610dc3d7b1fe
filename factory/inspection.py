"""`factory inspect`: what an output folder holds, from its index, stats and labels."""
from __future__ import annotations

import json
from collections import Counter

import webdataset as wds

from .errors import FactoryError
from .shards import INDEX, MANIFEST, OutputDir


def summarise(url: str) -> dict:
    out = OutputDir(url)
    if not out.fs.exists(out.path(INDEX)):
        raise FactoryError(f"{url!r} has no {INDEX}: not a finished factory output (run it, or rerun to finish it)")
    with out.fs.open(out.path(INDEX)) as f:
        index = json.load(f)
    manifest = out.manifest() if out.fs.exists(out.path(MANIFEST)) else {}
    counts, labels, ops, checks = Counter(), Counter(), Counter(), Counter()
    failed, filtered = Counter(), Counter()
    samples = 0
    for i, shard in enumerate(index["shardlist"]):
        stats = out.read_stats(i) if out.fs.exists(out.path(f"shard-{i:06d}.stats.json")) else {}
        failed.update(stats.get("failed", {}))
        filtered.update(stats.get("filtered", {}))
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
    return {
        "url": url,
        "recipe": manifest.get("recipe", {}).get("name"),
        "recipe_hash": manifest.get("recipe_hash"),
        "shards": len(index["shardlist"]),
        "samples": samples,
        "members_and_labels": dict(sorted(labels.items())),
        "count_histogram": dict(sorted(counts.items())),
        "op_chains": dict(ops),
        "checks": dict(checks),
        "failed": dict(failed),
        "filtered": dict(filtered),
    }


def render(summary: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{summary['url']}  ({summary['recipe'] or 'world export'})", show_header=False)
    t.add_row("shards", str(summary["shards"]))
    t.add_row("samples", str(summary["samples"]))
    t.add_row("members/labels", ", ".join(f"{k} {v}" for k, v in summary["members_and_labels"].items()))
    hist = summary["count_histogram"]
    if hist:
        peak = max(hist.values())
        t.add_row("count histogram", "\n".join(f"{c:>3} {'#' * max(1, round(30 * n / peak))} {n}" for c, n in hist.items()))
    t.add_row("op chains", ", ".join(f"{k}: {v}" for k, v in summary["op_chains"].items()))
    for name in [k[: -len(" checked")] for k in summary["checks"] if k.endswith(" checked")]:
        ok, n = summary["checks"][f"{name} exact"], summary["checks"][f"{name} checked"]
        t.add_row(f"check {name}", f"{ok}/{n} exact ({100 * ok / max(n, 1):.1f} %)")
    for kind in ("filtered", "failed"):
        t.add_row(kind, ", ".join(f"{k}: {v}" for k, v in summary[kind].items()) or "none")
    console.print(t)
