"""benchmarks/gpu_sd15.py, the GPU measurement of issue 16, rehearsed on the CPU with every model
narrowed (same topology; 256 x 256 images here, 512 on the GPU): the script that will run on the
GPU machine builds its models, measures the generator stage against the bare diffusers loop (channels-last too), the BLIP-2
captioner and the CLIP checker, and writes its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_cpu_smoke(tmp_path):
    report = tmp_path / "gpu_sd15.json"
    env = {**os.environ, "OUT": str(tmp_path / "unused")}  # --json wins over $OUT
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sd15.py"), "--cpu-smoke",
                          "--json", str(report), "--work-dir", str(tmp_path / "models")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    data = json.loads(report.read_text())
    rows = data["generate"]
    assert [(r["dtype"], r["channels_last"], r["compile"], r["batch"]) for r in rows] == [
        ("fp32", False, False, 1), ("fp32", True, False, 1)]
    for r in rows:
        assert r["stage_images_per_s"] > 0 and r["bare_images_per_s"] > 0, r
        assert 0.3 < r["ratio_stage_over_bare"] < 3, r  # the same work (one image, a busy CPU: noisy)
    for section in ("caption", "check_clip"):
        (row,) = data[section]
        assert row["batch"] == 2 and row["images_per_s"] > 0 and "failed" not in row, row
    assert data["caption"][0]["caption_words_mean"] > 0
    assert data["summary"]["best_stage"]["stage_images_per_s"] == max(r["stage_images_per_s"] for r in rows)
    assert data["summary"]["goals"].startswith("not applicable")
    assert set(data["build_s"]) == {"sd15", "sd15-controlnet", "openclip-vit-b-32", "blip2-opt-2.7b"}
    assert data["env"]["versions"]["diffusers"] and "stage/bare" in out.stdout
    assert not (tmp_path / "unused").exists()
