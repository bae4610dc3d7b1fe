"""Does the latent-ae draw digits? Identity, legibility and the pixel object check on its reconstructions.

For each latent-ae folder given (e.g. the shipped one and a candidate), the first N test-pool
scenes (handwriting no model trained on) are encoded and decoded, and the reconstructions are
judged against the scenes' own labels:

  objects pass   the pixel object check (factory.world.object_check): each labelled object one
                 whole ink blob, each blob one object (model-free)
  digits kept    share of objects whose crop the digit classifier (models/digit-classifier,
                 trained on real crops only) reads as the object's labelled digit: identity
  legible        share of objects read as some digit with confidence (top digit p >= 0.5)
  counter exact  the independent DensityCounter's exact count on the reconstructions
  psnr           reconstruction PSNR

``--test-start`` scores a second set of test-pool scenes from that index (other layouts,
colours and handwriting draws), so a figure is not one test set's.

    python benchmarks/latent_ae_identity.py models/latent-ae [OTHER ...] [--n 500] \\
        [--test-start 500000] [--json report.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from factory.models.counter import DensityCounter  # noqa: E402
from factory.models.digit_classifier import DigitClassifier  # noqa: E402
from factory.models.latent_ae import LatentAE  # noqa: E402
from factory.train.data import scenes_training_set  # noqa: E402
from factory.train.latent import evaluate_reconstructions  # noqa: E402
from factory.world import make_scene  # noqa: E402

COLUMNS = ("objects_pass_on_reconstructions", "digits_kept", "legible", "counter_exact_on_reconstructions", "psnr")


def score(folder: str, start: int, n: int, counter, reader) -> dict:
    model = LatentAE.from_pretrained(folder)
    scenes = [make_scene("test", i) for i in range(start, start + n)]
    with torch.no_grad():
        return evaluate_reconstructions(model, counter, scenes_training_set(scenes), reader, scenes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="latent-ae folders (factory train latent-ae --export)")
    ap.add_argument("--n", type=int, default=500, help="test-pool scenes per set")
    ap.add_argument("--test-start", type=int, default=None, help="also score scenes from this test-pool index")
    ap.add_argument("--counter", default="models/counter")
    ap.add_argument("--digits", default="models/digit-classifier")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for folder in args.folders + [args.counter, args.digits]:
        if not Path(folder).is_dir():
            sys.exit(f"latent_ae_identity: {folder} is not a folder")
    counter = DensityCounter.from_pretrained(args.counter).eval()
    reader = DigitClassifier.from_pretrained(args.digits)
    starts = [0] + ([args.test_start] if args.test_start is not None else [])
    report = {"n": args.n, "sets": {}}
    print(f"{'folder':<36} {'scenes':>14} " + " ".join(f"{c.split('_on_')[0]:>14}" for c in COLUMNS))
    for folder in args.folders:
        for start in starts:
            t = time.time()
            r = score(folder, start, args.n, counter, reader)
            r["seconds"] = round(time.time() - t, 1)
            report["sets"][f"{folder}@{start}"] = r
            print(f"{folder:<36} {f'{start}..{start + args.n - 1}':>14} "
                  + " ".join(f"{r[c]:>14}" for c in COLUMNS), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
