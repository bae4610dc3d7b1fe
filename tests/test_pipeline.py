"""End-to-end runs on a local Ray: determinism, resume, faults, bad sources."""
import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import FACTORY, ROOT, write_recipe
from factory.errors import FactoryError
from factory.pipeline import run
from factory.recipe import load_recipe
from factory.shards import OutputDir
from factory.world.export import write_world_shards

pytestmark = pytest.mark.slow


def shard_hashes(out) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("small")
    recipe = load_recipe(write_recipe(d / "r.yaml"))
    result = run(recipe, str(d / "ref"), workers=1)
    return recipe, d, result


def test_run_writes_shards_index_stats_manifest(small):
    recipe, d, result = small
    out = d / "ref"
    index = json.loads((out / "index.json").read_text())
    assert [s["url"] for s in index["shardlist"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe_hash"] == recipe.content_hash() and "ray" in manifest["versions"]
    total = 0
    for i, entry in enumerate(index["shardlist"]):
        stats = json.loads((out / f"shard-{i:06d}.stats.json").read_text())
        assert stats["planned"] == 10
        assert stats["generated"] + sum(stats["filtered"].values()) + sum(stats["failed"].values()) == 10
        assert entry["nsamples"] == stats["generated"]
        # Each stage's time is in the stats (never in the labels, which stay the same across runs).
        assert set(stats["stage_seconds"]) == {"read", "render", "augment", "check_count"}
        assert all(t >= 0 for t in stats["stage_seconds"].values())
        total += stats["generated"]
    assert total == result.generated > 50
    assert not list(out.glob("*.tmp"))


def test_same_bytes_across_runs_and_worker_counts(small):
    recipe, d, _ = small
    ref = shard_hashes(d / "ref")
    run(recipe, str(d / "again"), workers=1)
    run(recipe, str(d / "two"), workers=2)
    assert shard_hashes(d / "again") == ref
    assert shard_hashes(d / "two") == ref


def test_resume_rewrites_only_missing_shards(small, tmp_path):
    recipe, d, _ = small
    out = tmp_path / "resume"
    run(recipe, str(out))
    for i in (2, 4):
        (out / f"shard-{i:06d}.tar").unlink()
    (out / "index.json").unlink()
    (out / "shard-000003.tar.tmp").write_bytes(b"half a shard")  # as a killed run leaves it
    result = run(recipe, str(out))
    assert (result.shards_skipped, result.shards_written) == (4, 2)
    assert shard_hashes(out) == shard_hashes(d / "ref")
    assert not list(out.glob("*.tmp"))


def test_other_recipe_into_same_output_is_refused(small, tmp_path):
    recipe, d, _ = small
    before = shard_hashes(d / "ref")
    other = load_recipe(write_recipe(tmp_path / "other.yaml", seed=99))
    with pytest.raises(FactoryError, match="another recipe"):
        run(other, str(d / "ref"))
    assert shard_hashes(d / "ref") == before
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(FactoryError, match="not a factory output"):
        run(recipe, str(tmp_path / "stuff"))


def _corrupt_member(tar_path, key, ext):
    import tarfile

    with tarfile.open(tar_path) as t:
        m = t.getmember(f"{key}.{ext}")
    data = bytearray(tar_path.read_bytes())
    data[m.offset_data: m.offset_data + m.size] = b"\x00" * m.size
    tar_path.write_bytes(bytes(data))


def test_corrupt_and_truncated_source_shards_fail_per_sample(tmp_path, ray_local):
    src = tmp_path / "src"
    write_world_shards("train", 12, str(src), shard_size=4)
    _corrupt_member(src / "shard-000000.tar", "train_000001", "png")
    last = src / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[:3000])  # cut inside the second sample
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", variants=1,
                                      sources=[{"kind": "shards", "path": str(src)}]))
    result = run(recipe, str(tmp_path / "out"))
    assert any("truncated or corrupt" in w for w in result.warnings)
    failed = [f for i in range(result.shards_total)
              for f in json.loads((tmp_path / "out" / f"shard-{i:06d}.stats.json").read_text())["failed_samples"]]
    assert any(f["key"].startswith("train_000001") and f["stage"] == "read" for f in failed)
    assert result.generated + sum(result.failed.values()) + sum(result.filtered.values()) == result.planned
    assert result.planned >= 9  # every sample before the damage was read


# --- faults: driver killed, actor killed, Ctrl-C --------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("big")
    path = write_recipe(d / "big.yaml", variants=4, sources=[{"kind": "world", "split": "train", "n": 400}],
                        output={"shard_size": 50})
    run(load_recipe(path), str(d / "ref"))
    return path, shard_hashes(d / "ref")


def _start(recipe, out, **kw):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([*FACTORY, "run", str(recipe), "--out", str(out), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_shards(out, n, proc, timeout=240):
    t = time.time()
    while time.time() - t < timeout:
        if len(list(out.glob("shard-*.tar"))) >= n or proc.poll() is not None:
            return
        time.sleep(0.1)
    raise TimeoutError("no shard appeared")


def test_kill_9_of_the_driver_then_resume(big, tmp_path):
    recipe, ref = big
    out = tmp_path / "out"
    proc = _start(recipe, out)
    _wait_for_shards(out, 2, proc)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = shard_hashes(out)
    assert 0 < len(partial) < len(ref)
    assert all(ref[name] == h for name, h in partial.items())  # what was complete is complete
    done = _start(recipe, out)
    assert done.wait(timeout=600) == 0, done.stderr.read()
    assert shard_hashes(out) == ref


def test_actor_killed_mid_run_is_retried(big, tmp_path):
    recipe, ref = big
    out = tmp_path / "out"
    proc = _start(recipe, out)
    _wait_for_shards(out, 1, proc)
    killed = subprocess.run(["pkill", "-9", "-f", "MapBatches\\(LayoutRenderer\\)"]).returncode == 0
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert killed, "no renderer actor was found to kill"
    assert shard_hashes(out) == ref


def test_ctrl_c_keeps_only_complete_shards(big, tmp_path):
    recipe, ref = big
    out = tmp_path / "out"
    proc = _start(recipe, out)
    _wait_for_shards(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    if code == 0:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert code == 2 and "Traceback" not in err and "resume" in err
    assert not list(out.glob("*.tmp"))
    assert all(ref[name] == h for name, h in shard_hashes(out).items())
    assert OutputDir(str(out)).completed() == {int(n[6:12]) for n in shard_hashes(out)}


def test_inspect_summarises_an_output(small):
    from conftest import factory_cli
    from factory.inspection import summarise

    recipe, d, result = small
    summary = summarise(str(d / "ref"))
    assert summary["samples"] == result.generated
    assert sum(summary["count_histogram"].values()) == result.generated
    assert summary["checks"]["count checked"] == result.generated
    assert summary["op_chains"] == {"render > augment": result.generated}
    # render and augment keep every mask exact, so every sample written has one
    assert summary["masks"] == summary["members_and_labels"]["mask.png"] == result.generated
    res = factory_cli("inspect", d / "ref")
    assert res.returncode == 0 and "count histogram" in res.stdout
    assert f"{result.generated}/{result.generated} samples (100.0 %)" in res.stdout
    res = factory_cli("inspect", d)
    assert res.returncode == 2 and "index.json" in res.stderr


def test_semaug_stages_run_on_ray(tmp_path, ray_local):
    """swap_caption -> generate -> check_count -> check_clip through Ray, on random tiny models."""
    from factory.models import tiny_clip
    from factory.models.counter import DensityCounter
    from factory.models.tiny_sd import build_components, controlnet_from_unet, save_pipeline_folder

    comps = build_components(tmp_path / "parts")
    save_pipeline_folder(tmp_path / "sd", comps)
    controlnet_from_unet(comps["unet"]).save_pretrained(tmp_path / "cn")
    clip, _, _ = tiny_clip.create(tmp_path / "clip")
    tiny_clip.save(clip, tmp_path / "clip")
    DensityCounter().save_pretrained(tmp_path / "counter")
    recipe = load_recipe(write_recipe(
        tmp_path / "semaug.yaml", variants=2, op="semaug",
        sources=[{"kind": "world", "split": "train", "n": 6}],
        stages=[
            {"name": "swap_caption", "params": {"p": 1.0, "threshold": -1.0, "random_swap": True,
                                                "encoder": f"openclip:{tmp_path / 'clip'}"}},
            {"name": "generate", "params": {"model": str(tmp_path / "sd"), "controlnet": str(tmp_path / "cn"),
                                            "steps": 2}, "batch_size": 4,
             # as in recipes/semaug.yaml: with the other stages this asks for more than the
             # 2 CPUs of the test's Ray, so the runner must scale requests down to start them all
             "resources": {"num_cpus": 1.0, "num_gpus": 1.0}},
            {"name": "check_count", "params": {"counter": str(tmp_path / "counter")}},
            {"name": "check_clip", "params": {"model": str(tmp_path / "clip")}},
        ],
        output={"shard_size": 6}))
    result = run(recipe, str(tmp_path / "out"))
    assert result.generated == 12, result.failed
    from factory.loaders import ShardDataset

    for s in ShardDataset(str(tmp_path / "out")):
        j = s["json"]
        assert [o["op"] for o in j["ops"]] == ["swap_caption", "generate"]
        assert j["caption_swap"]["swapped"] and j["caption"] != j["caption_swap"]["original"]
        assert abs(float(s["density"].sum()) - j["count"]) < 1e-3
        assert set(j["checks"]) == {"count", "clip"}


def test_missing_captions_stop_the_run_before_any_model_loads(tmp_path):
    from factory.world.export import write_fsc147

    root = write_fsc147("train", 3, str(tmp_path / "fsc"))
    (root / "captions.json").unlink()
    (root / "ImageClasses_FSC147.txt").unlink()
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", sources=[{"kind": "fsc147", "path": str(root)}],
                                      stages=[{"name": "generate", "params": {"model": "org/sd", "controlnet": None}}]))
    with pytest.raises(FactoryError, match="needs captions.*add `- name: caption`"):
        run(recipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fsc147_density_that_disagrees_with_its_points_fails_that_sample_and_the_run_goes_on(tmp_path, ray_local):
    """An FSC147 folder as the real one is (JPEGs 384 px high of varying width) runs to a square side;
    a density map whose sum is not its point count fails that sample alone, recorded with its reason."""
    import numpy as np

    from factory.world.export import write_fsc147

    root = write_fsc147("train", 3, str(tmp_path / "fsc"))
    bad = root / "gt_density_map_adaptive_384_VarV2" / "train_000001.npy"
    np.save(bad, np.load(bad) + 1.0 / np.load(bad).size * 5)  # five objects too many
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", variants=2, sources=[{"kind": "fsc147", "path": str(root)}],
                                      stages=[{"name": "augment", "params": {"hflip": 0.5, "resize": 64}}],
                                      output={"shard_size": 4}))
    result = run(recipe, str(tmp_path / "out"), workers=1)
    assert result.generated == 4 and result.failed == {"read": 2}, (result.generated, result.failed)
    failed = [f for i in range(result.shards_total)
              for f in json.loads((tmp_path / "out" / f"shard-{i:06d}.stats.json").read_text())["failed_samples"]]
    assert len(failed) == 2 and all(f["key"].startswith("train_000001-") and f["stage"] == "read" for f in failed)
    assert all("train_000001.npy" in f["reason"] and "disagree" in f["reason"] for f in failed)
    from factory.loaders import ShardDataset

    for s in ShardDataset(str(tmp_path / "out")):
        assert s["density"].shape == (64, 64) and abs(float(s["density"].sum()) - s["json"]["count"]) < 1e-3


@pytest.mark.skipif(not (ROOT / "models" / "latent-ae").is_dir(), reason="models/latent-ae is not trained yet")
def test_latent_edit_recipes_run_on_ray(tmp_path, ray_local):
    """latents -> sample_latent -> edit (every attribute, both ways) -> check_edit, and real scenes
    -> invert -> edit, through Ray with the shipped models; the edit is fitted once (prepare)."""
    models = ROOT / "models"
    common = {"generator": str(models / "latent-ae"), "labeller": str(models / "attr-labeller"),
              "n_fit": 400, "cache": str(tmp_path / "cache")}
    check = {"name": "check_edit", "params": {"checker": str(models / "attr-checker"),
                                              "counter": str(models / "counter")}}
    recipe = load_recipe(write_recipe(
        tmp_path / "attr.yaml", variants=8, op="attr", sources=[{"kind": "latents", "n": 2}],
        stages=[{"name": "sample_latent", "params": {"generator": str(models / "latent-ae")}},
                {"name": "edit", "params": {**common, "editor": "centroid", "attribute": "all",
                                            "confidence": 0.6}},
                check],
        output={"shard_size": 16}))
    result = run(recipe, str(tmp_path / "out"))
    assert result.generated == 16, result.failed
    fitted = sorted(p.name for p in (tmp_path / "cache").glob("*.json") if not p.name.startswith("codes-"))
    assert len(fitted) == 8  # one direction per (attribute, direction), fitted once in the driver
    from factory.loaders import ShardDataset

    seen = set()
    for s in ShardDataset(str(tmp_path / "out")):
        j = s["json"]
        assert [o["op"] for o in j["ops"]] == ["sample_latent", "edit"]
        seen.add((j["edit"]["attribute"], j["edit"]["direction"]))
        assert j["checks"]["edit"]["verdict"] in ("pass", "fail")
        assert "_before" not in j and len(j["latent"]["z"]) > 0
    assert len(seen) == 8

    recipe = load_recipe(write_recipe(
        tmp_path / "inv.yaml", variants=1, op="invedit", sources=[{"kind": "world", "split": "test", "n": 3}],
        stages=[{"name": "invert", "params": {"method": "encoder", "generator": str(models / "latent-ae"),
                                              "max_mse": None}},
                {"name": "edit", "params": {**common, "editor": "centroid", "attribute": "dark_background",
                                            "confidence": 0.6}},
                check],
        output={"shard_size": 3}))
    result = run(recipe, str(tmp_path / "inv"))
    assert result.generated == 3, result.failed
    for s in ShardDataset(str(tmp_path / "inv")):
        j = s["json"]
        assert j["source_key"].startswith("test_") and j["edit"]["inverter"] == "encoder"
        assert j["edit"]["reconstruction_error"] is not None


# --- scale: shard ranges, one run per output, write faults ----------------------

def test_shard_ranges_add_up_to_a_whole_run(small, tmp_path, monkeypatch):
    """Two jobs of one recipe (--shards 3:6, then 0:3) give the whole run's bytes; between them
    inspect says what is missing; the driver received a few bytes of records per sample, no samples.
    The first job streams in two windows (one Ray Data execution each), as a long run does."""
    import factory.pipeline
    from conftest import factory_cli
    from factory.inspection import summarise

    recipe, d, whole = small
    out = tmp_path / "split"
    monkeypatch.setattr(factory.pipeline, "WINDOW_SAMPLES", 20)
    first = run(recipe, str(out), shards="3:6")
    monkeypatch.undo()
    assert (first.shards_written, first.missing) == (3, 3) and not (out / "index.json").exists()
    summary = summarise(str(out))
    assert summary["shards_missing"] == [0, 1, 2] and summary["shards_planned"] == 6
    res = factory_cli("inspect", out)
    assert res.returncode == 0 and "shards missing" in res.stdout and "0:3" in res.stdout
    second = run(recipe, str(out), shards="0:3")
    assert second.missing == 0 and second.shards_written == 3
    assert shard_hashes(out) == shard_hashes(d / "ref")
    assert (out / "index.json").read_bytes() == (d / "ref" / "index.json").read_bytes()
    assert not list(out.glob("_*")) and not list(out.glob("*.tmp"))  # no lease or staging left
    # What the driver received: completion records (shard, position, status), no sample bytes.
    assert 0 < whole.record_bytes < 40 * whole.planned


def test_a_second_run_into_a_live_output_is_refused(big, tmp_path):
    """The second run says who holds the output and writes nothing; the first, whose temporary
    files the second used to delete in its clean-up, finishes with the right bytes."""
    recipe, ref = big
    out = tmp_path / "out"
    proc = _start(recipe, out)
    t = time.time()
    while not list(out.glob("_staging/*/*.piece")) and proc.poll() is None and time.time() - t < 240:
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before a second could start"
    res = subprocess.run([*FACTORY, "run", str(recipe), "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "being written by a live run" in res.stderr and f"pid {proc.pid}" in res.stderr
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert shard_hashes(out) == ref


def test_write_faults_stop_the_run_and_a_rerun_resumes(small, tmp_path, faulty_fs, capsys):
    """A full disk under a shard's writer (from the command line: no traceback), a refused
    permission under a staging actor, an object store's error on the driver's index: each stops
    the run with exit 2 and one paragraph naming the output and the cause, complete shards stay,
    and each rerun resumes; the last one, with the cause gone, completes the run's bytes."""
    from factory.cli import main

    recipe, d, _ = small
    out = tmp_path / "out"
    url = f"faulty://{out}"
    faulty_fs.write_text(json.dumps([{"match": "shard-000002.tar.tmp", "op": "write", "error": "ENOSPC"}]))
    res = subprocess.run([*FACTORY, "run", str(d / "r.yaml"), "--out", url, "--quiet"], cwd=ROOT, timeout=600,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "the disk is full" in res.stderr and f"output {url}" in res.stderr
    assert "\n" not in res.stderr[res.stderr.index("error:"):].strip()  # one paragraph
    for rule, words in (({"match": "_staging/shard-000004", "op": "write", "error": "EACCES"}, "permission denied"),
                        ({"match": "index.json", "op": "mv", "error": "store"}, "ObjectStoreError: 503 SlowDown")):
        faulty_fs.write_text(json.dumps([rule]))
        try:
            assert main(["run", str(d / "r.yaml"), "--out", url, "--quiet"]) == 2
        finally:
            faulty_fs.write_text("[]")
        err = capsys.readouterr().err
        assert f"cannot write to the output {url}" in err and words in err and "resume" in err
        assert "Traceback" not in err
        assert all(shard_hashes(d / "ref")[name] == h for name, h in shard_hashes(out).items())
        assert not list(out.glob("*.tmp")) and not list(out.glob("_staging/*"))
    assert main(["run", str(d / "r.yaml"), "--out", url, "--quiet"]) == 0
    assert shard_hashes(out) == shard_hashes(d / "ref")
    assert (out / "index.json").read_bytes() == (d / "ref" / "index.json").read_bytes()
