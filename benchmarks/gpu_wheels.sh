#!/usr/bin/env bash
# The wheels benchmarks/gpu_sd15.py needs on a GPU machine that has Python 3.12, torch,
# torchvision, transformers, accelerate, numpy, pillow, scipy, scikit-learn, pyarrow, rich,
# regex, safetensors and huggingface_hub but no internet (the workplace's H200 image): the
# stage classes' other imports, at the versions this checkout's .venv runs, downloaded here.
#
#     bash benchmarks/gpu_wheels.sh [FOLDER]        # default .whl (git-ignored); prints sizes
#
# Then on the GPU machine: python3 benchmarks/gpu_sd15.py --wheels FOLDER (it installs them
# with `pip install --no-index --no-deps --target`, nothing else). Not needed there and left out:
# importlib_metadata (diffusers imports it only on Python < 3.8), webdataset and Ray (no stage
# imports them). timm and typing_extensions are there already but travel anyway: open_clip
# needs timm >= 1.0.17 and pydantic-core typing_extensions >= 4.16, newer than that image may hold.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
py="${PYTHON:-.venv/bin/python}"
pkgs=(diffusers open_clip_torch ftfy wcwidth timm pydantic pydantic_core annotated_types typing_inspection
      typing_extensions)
pins=()
for p in "${pkgs[@]}"; do
  v="$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")"
  pins+=("$p==$v")
done
mkdir -p "$out"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" "${pins[@]}"
ls -l "$out"/*.whl | awk '{printf "%10d  %s\n", $5, $NF; total += $5} END {printf "%10d  total (%.1f MiB)\n", total, total / 2^20}'
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
  echo "the wheels are over 64 MiB: they would not travel with the working tree" >&2
  exit 1
fi
