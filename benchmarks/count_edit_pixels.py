"""Count edits judged by the pixels: pass rate of the pixel object check and yield, per source count.

Reads the output of a count-edit run on reference-world scenes (recipes/count-edit.yaml, whose
check_edit filters with the learned checks and, with ``objects: true``, the pixel object check):

  attempted   planned edits of scenes with that many objects (the world's count of the source)
  learned     edits the learned checks kept (the independent counter saw the target count, the
              other attributes held): those in the shards plus those dropped for the pixel check only
  pixel pass  share of ``learned`` whose pixels confirm the labels (each carried object one whole
              blob, each blob one object; without carried labels, the target count of blobs)
  kept        edits in the shards that the pixel check passed (with ``objects: true``, all of them);
              yield = kept / attempted
  carried     kept edits whose object labels were carried over (the rest carry the count only)

    factory run recipes/count-edit.yaml --out out/count-edit
    python benchmarks/count_edit_pixels.py out/count-edit [--json report.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.world import make_scene  # noqa: E402

SOURCE = re.compile(r"^(train|test)_(\d+)-")
PIXEL = "pixel object check"


def source_count(key: str, cache: dict) -> int | None:
    m = SOURCE.match(key)
    if not m:
        return None
    split, index = m.group(1), int(m.group(2))
    if (split, index) not in cache:
        cache[(split, index)] = make_scene(split, index).count
    return cache[(split, index)]


def only_pixel(reason: str) -> bool:
    """A check_edit reason made of the pixel object check alone (reasons are '; '-joined)."""
    parts = [p.strip() for p in reason.split("; ")]
    return bool(parts) and all(p.startswith(PIXEL) for p in parts)


def tally(out: Path) -> dict:
    import webdataset as wds

    counts: dict = {}
    rows = defaultdict(lambda: defaultdict(int))
    kept_keys = set()
    for tar in sorted(out.glob("shard-*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            key = sample["__key__"]
            kept_keys.add(key)
            n = source_count(key, counts)
            rows[n]["attempted"] += 1
            rows[n]["learned"] += 1
            edit = json.loads(sample["json"]).get("checks", {}).get("edit", {})
            passed = bool(edit.get("objects", {}).get("pass"))
            rows[n]["pixel_pass"] += passed
            rows[n]["kept"] += passed  # a run with objects: false keeps pixel failures: not counted as kept
            rows[n]["carried"] += "matched" in edit.get("objects", {})
    for f in sorted(out.glob("shard-*.stats.json")):
        stats = json.loads(f.read_text())
        for s in stats.get("failed_samples", []):
            rows[source_count(s["key"], counts)]["attempted"] += 1
            rows[source_count(s["key"], counts)]["failed"] += 1
        for s in stats.get("filtered_samples", []):
            n = source_count(s["key"], counts)
            rows[n]["attempted"] += 1
            if s.get("stage") == "check_edit" and only_pixel(s.get("reason", "")):
                rows[n]["learned"] += 1
    report = {}
    for n in sorted(k for k in rows if k is not None):
        r = rows[n]
        report[n] = {**{k: r[k] for k in ("attempted", "failed", "learned", "kept", "carried")},
                     "pixel_pass": round(r["pixel_pass"] / r["learned"], 4) if r["learned"] else None,
                     "yield": round(r["kept"] / r["attempted"], 4) if r["attempted"] else None}
    tot = {k: sum(report[n][k] for n in report) for k in ("attempted", "failed", "learned", "kept", "carried")}
    tot["pixel_pass"] = round(tot["kept"] / tot["learned"], 4) if tot["learned"] else None
    tot["yield"] = round(tot["kept"] / tot["attempted"], 4) if tot["attempted"] else None
    return {"by_source_count": report, "total": tot}


def print_table(report: dict, file=sys.stderr) -> None:
    """A :func:`tally` report as a table, one row per source count and one for all."""
    print(f"{'source count':>12}{'attempted':>10}{'learned':>9}{'pixel pass':>11}{'kept':>6}{'yield':>7}", file=file)
    for n, r in [*report["by_source_count"].items(), ("all", report["total"])]:
        pp = f"{r['pixel_pass']:.3f}" if r["pixel_pass"] is not None else "-"
        yd = f"{r['yield']:.3f}" if r["yield"] is not None else "-"
        print(f"{n!s:>12}{r['attempted']:>10}{r['learned']:>9}{pp:>11}{r['kept']:>6}{yd:>7}", file=file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder of a count-edit run")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    report = tally(Path(args.out))
    print_table(report)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
