"""`factory submit` and cluster.yaml.

The end-to-end tests start a real single-node Ray head on loopback (its own
ports and temp dir, tests/ray_procs.py), submit tests/data/tiny.yaml with the
CLI and check the shards; one head has Ray's token authentication on.
"""
from __future__ import annotations

import json
import secrets
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from factory.errors import FactoryError
from factory.submit import (EXCLUDES, PROJECT_ROOT, _check_out, _recipe_arg, entrypoint, normalise_address,
                            runtime_env, submit)
from ray_procs import head_process

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = "tests/data/tiny.yaml"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    # The job's entrypoint runs the `python` found on the head's PATH: make it this virtualenv's.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _factory(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "factory"), *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------- cluster.yaml

LAUNCHER_KEYS = {"cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                 "head_start_ray_commands", "worker_start_ray_commands"}


def test_cluster_yaml_has_what_the_launcher_needs():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert LAUNCHER_KEYS <= set(cfg), LAUNCHER_KEYS - set(cfg)
    assert cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no worker type offers a GPU"
    for name in gpu:
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1
        assert types[name]["max_workers"] <= cfg["max_workers"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head and "8265" in head
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "$RAY_HEAD_IP" in workers
    # The cluster stays closed: token auth on every node, the token file mounted on every node.
    commands = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] + cfg["setup_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in workers
    assert "disabled" not in commands and "0.0.0.0" not in commands
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    setup = " ".join(cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []))
    assert "pip install" in setup and "torch" in setup


def test_cluster_yaml_passes_the_launchers_own_checks():
    """What `ray up` does first: fill in the provider's defaults, then validate against Ray's schema."""
    pytest.importorskip("jsonschema")
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private module: skip, not fail, if a Ray release moves it
        pytest.skip("this Ray has no ray.autoscaler._private.util")

    cfg = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(cfg)
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


# ---------------------------------------------------------------- pieces, no Ray

def test_recipe_must_be_inside_the_project(tmp_path):
    outside = tmp_path / "r.yaml"
    outside.write_text((ROOT / TINY).read_text())
    with pytest.raises(FactoryError, match="outside the project"):
        _recipe_arg(str(outside))
    assert _recipe_arg(str(ROOT / TINY)) == TINY


def test_recipe_path_is_relative_to_the_project_root(monkeypatch):
    monkeypatch.chdir(ROOT / "tests")
    assert _recipe_arg("data/tiny.yaml") == TINY


def test_relative_out_is_refused():
    with pytest.raises(FactoryError, match="relative path"):
        _check_out("out/demo")
    assert _check_out("/mnt/shared/demo") == "/mnt/shared/demo"
    assert _check_out("s3://bucket/demo") == "s3://bucket/demo"


def test_entrypoint_and_runtime_env():
    cmd = entrypoint(TINY, "/data/out dir", workers=3)
    assert cmd == ("python -m factory.cli run tests/data/tiny.yaml --out '/data/out dir' --address auto "
                   "--quiet --workers 3")
    assert entrypoint(TINY, "/data/o", shards="2:4").endswith("--quiet --shards 2:4")
    env = runtime_env()
    assert Path(env["working_dir"]) == PROJECT_ROOT
    assert {".venv", ".git", "out", "runs", "**/__pycache__", "*.tar"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_AUTH_MODE"]
    assert env["excludes"] is not EXCLUDES


def test_bare_host_port_means_the_dashboard():
    assert normalise_address("head:8265") == "http://head:8265"
    assert normalise_address("https://head:8265/") == "https://head:8265"
    assert normalise_address("auto") == "auto"


def test_ray_client_address_is_refused():
    with pytest.raises(FactoryError, match="dashboard port"):
        submit(str(ROOT / TINY), None, "ray://127.0.0.1:10001", out="/tmp/x")


class _FakeClient:
    """Stands in for JobSubmissionClient: records the submission, replays a log, ends in `status`."""

    def __init__(self, status: str, message: str = ""):
        self.status, self.message, self.submitted = status, message, {}

    def submit_job(self, **kw):
        self.submitted = kw
        return "raysubmit_FAKE"

    async def tail_job_logs(self, job_id):
        for line in ("Running entrypoint\n", "run summary\n"):
            yield line

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(status=self.status, message=self.message)


@pytest.mark.parametrize("status,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_follows_and_maps_the_final_status(monkeypatch, capsys, status, code):
    import factory.submit as sub

    fake = _FakeClient(status, "Job entrypoint command failed: ModuleNotFoundError: No module named 'rich'")
    monkeypatch.setattr(sub, "_client", lambda address: fake)
    assert submit(str(ROOT / TINY), None, "127.0.0.1:8265", out="/data/tiny", workers=2) == code
    o = capsys.readouterr()
    assert o.out.splitlines()[0] == "job id: raysubmit_FAKE" and "run summary" in o.out
    assert fake.submitted["entrypoint"].endswith("--out /data/tiny --address auto --quiet --workers 2")
    assert fake.submitted["runtime_env"]["working_dir"] == str(PROJECT_ROOT)
    if code:
        assert status in o.err and "ray job logs raysubmit_FAKE --address http://127.0.0.1:8265" in o.err
        assert "dependencies" in o.err  # the hint for a cluster python without the project's packages


def test_unreachable_address_is_one_paragraph_and_exit_2(tmp_path):
    r = _factory("submit", TINY, "--address", "http://127.0.0.1:1", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "http://127.0.0.1:1" in r.stderr and "8265" in r.stderr and "ray status" in r.stderr
    assert r.stderr.strip().startswith("error:")
    assert "job id" not in r.stdout


# ---------------------------------------------------------------- a real head

@pytest.fixture(scope="module")
def ray_head():
    with head_process(_env()) as address:
        yield address


@pytest.mark.slow
def test_submit_runs_the_recipe_on_a_real_head(ray_head, tmp_path):
    out = tmp_path / "tiny"
    t0 = time.time()
    r = _factory("submit", TINY, "--address", ray_head, "--out", str(out), timeout=420)
    took = time.time() - t0
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    first = r.stdout.splitlines()[0]
    assert first.startswith("job id: raysubmit_"), r.stdout[:500]
    job_id = first.split(": ", 1)[1]
    assert f"job {job_id} succeeded" in r.stdout
    assert "run summary" in r.stdout  # the job's log was streamed
    assert "Traceback" not in r.stdout + r.stderr

    index = json.loads((out / "index.json").read_text())
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == 2 == len(index["shardlist"])  # 10 scenes x 2 variants, 10 per shard
    samples = sum(s["nsamples"] for s in index["shardlist"])
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.stats.json"))]
    assert sum(st["planned"] for st in stats) == 20
    dropped = sum(sum(st[k].values()) for st in stats for k in ("filtered", "failed"))
    assert samples == 20 - dropped and samples > 0
    with tarfile.open(shards[0]) as tf:
        assert any(n.endswith(".png") for n in tf.getnames())
    print(f"submit end to end: {took:.1f} s")


@pytest.mark.slow
def test_submit_no_follow_then_failed_job_exits_1(ray_head, tmp_path):
    """--no-follow returns at once with the id; a job that fails on the cluster exits 1 and says how
    to see its logs. The failure: the output folder is a file, so the run cannot claim it."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    r = _factory("submit", TINY, "--address", ray_head, "--out", str(blocker), "--no-follow")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("job id: raysubmit_") and "ray job stop" in r.stdout

    r = _factory("submit", TINY, "--address", ray_head, "--out", str(blocker), timeout=420)
    assert r.returncode == 1, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "FAILED" in r.stderr and "ray job logs raysubmit_" in r.stderr


@pytest.mark.slow
def test_ctrl_c_while_following_leaves_the_job_running(ray_head, tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.Popen([str(BIN / "factory"), "submit", TINY, "--address", ray_head, "--out", str(out)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("job id: raysubmit_"), first + proc.stderr.read()
        job_id = first.split(": ", 1)[1].strip()
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "keeps running" in err and f"ray job stop {job_id}" in err and "Traceback" not in err

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 300
    while str(client.get_job_status(job_id).value) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.time() < deadline, "the job did not end within 300 s"
        time.sleep(2)
    assert str(client.get_job_status(job_id).value) == "SUCCEEDED"  # it kept running and finished
    assert (out / "index.json").exists()


# ---------------------------------------------------------------- a head with token auth

@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head that requires Ray's token; the clients below have none of their own (an empty HOME)."""
    token = secrets.token_hex(32)
    home = tmp_path_factory.mktemp("home")
    with head_process(_env(HOME=str(home)), token=token) as address:
        yield address, token, home


@pytest.mark.slow
def test_a_cluster_with_token_auth_runs_only_jobs_that_bring_its_token(token_head, tmp_path):
    address, token, home = token_head
    out = tmp_path / "tiny"
    refused = [
        (_env(HOME=str(home)), "requires a token"),  # this shell: no token, RAY_AUTH_MODE=disabled
        (_env(HOME=str(home), RAY_AUTH_TOKEN="0" * 64), "refused the token from RAY_AUTH_TOKEN"),
    ]
    for env, words in refused:
        r = subprocess.run([str(BIN / "factory"), "submit", TINY, "--address", address, "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert words in r.stderr and "Nothing was submitted" in r.stderr and "Traceback" not in r.stderr
        assert "job id" not in r.stdout and not out.exists()
    token_file = tmp_path / "token"
    token_file.write_text(token)
    r = subprocess.run([str(BIN / "factory"), "submit", TINY, "--address", address, "--out", str(out),
                        "--token-file", str(token_file)], cwd=ROOT, env=_env(HOME=str(home)), capture_output=True,
                       text=True, timeout=420)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "succeeded" in r.stdout and len(list(out.glob("shard-*.tar"))) == 2
