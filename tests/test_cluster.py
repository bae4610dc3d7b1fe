"""A node dies mid-run: a real multi-node Ray cluster on this machine (tests/multinode.py), one
worker node's raylet killed with kill -9, and the run completes or stops with one paragraph
and resumes, with the bytes of an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FACTORY, ROOT, write_recipe
from factory.pipeline import run
from factory.recipe import load_recipe

pytestmark = pytest.mark.slow


def shard_hashes(out) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


@pytest.fixture
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("multinode.py")), "2", "2"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "the cluster did not start"
        yield json.loads(line)
    finally:
        proc.stdin.close()  # the helper shuts its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _stage_actors(raylet: int) -> list[str]:
    """The Ray Data actors a raylet runs (its child processes titled ray::MapWorker(...))."""
    names = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if title.startswith("ray::MapWorker"):
                    names.append(title[len("ray::MapWorker(MapBatches("):].split(")")[0])
        except (OSError, IndexError, ValueError):
            continue
    return names


def _run_on(address, recipe, out):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([*FACTORY, "run", str(recipe), "--out", str(out), "--address", address, "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_worker_node_killed_mid_run(cluster, tmp_path, ray_local):
    recipe = write_recipe(tmp_path / "r.yaml", sources=[{"kind": "world", "split": "train", "n": 300}],
                          output={"shard_size": 60})  # 600 samples, 10 shards
    run(load_recipe(recipe), str(tmp_path / "ref"))  # uninterrupted, on the local instance
    ref = shard_hashes(tmp_path / "ref")
    out = tmp_path / "out"
    proc = _run_on(cluster["address"], recipe, out)
    t = time.time()
    while not list(out.glob("_staging/*/*.piece")) and proc.poll() is None and time.time() - t < 300:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before a node could be killed: {proc.stderr.read()[-2000:]}"
    # The node with the most stage actors: their work in flight, and their staged pieces' records.
    victim = max(cluster["raylets"], key=lambda pid: len(_stage_actors(pid)))
    actors = _stage_actors(victim)
    assert actors, "no stage actor runs on a worker node"
    os.kill(victim, signal.SIGKILL)
    killed_at = (time.time() - t, len(list(out.glob("_staging/*/*.piece"))))
    code = proc.wait(timeout=600)
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    if code != 0:  # stopped: one paragraph that says how to resume
        assert code == 2 and "error:" in err and "Run the same command again to resume" in err, err[-3000:]
        done = shard_hashes(out)
        assert all(ref[name] == h for name, h in done.items())  # complete shards are complete
        again = _run_on(cluster["address"], recipe, out)  # on the node that is left
        assert again.wait(timeout=600) == 0, again.stderr.read()[-3000:]
    print(f"node kill: raylet with {len(actors)} stage actors ({', '.join(sorted(actors))}) killed "
          f"{killed_at[0]:.1f} s into the run, {killed_at[1]} batches staged; the run exited {code} after "
          f"{time.time() - t:.1f} s")
    assert shard_hashes(out) == ref
    assert (out / "index.json").read_bytes() == (tmp_path / "ref" / "index.json").read_bytes()
