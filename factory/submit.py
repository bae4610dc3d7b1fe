"""`factory submit`: send a recipe to a Ray cluster as a job (Ray Jobs SDK).

The job's entrypoint is ``python -m factory.cli run RECIPE --out OUT --address auto --quiet``;
its runtime environment uploads this project (``working_dir``), so every node
runs the same ``factory``, ``actors``, ``recipes`` and ``models`` as the machine
that submitted it. The job driver starts in the uploaded copy, so that copy is
what ``python -m factory.cli`` imports (the current directory comes first on
``sys.path``), whatever version of the package the cluster has installed.

Paths as the job sees them:

* the recipe is passed relative to the project root, so it must live inside the
  project (it travels with the upload);
* ``--out`` must be a folder every node can reach (an absolute path on a shared
  filesystem) or an fsspec URI: a relative path would land in the job's
  temporary copy of the project and be lost.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from .auth import auth_refusal, is_auth_error, use_cluster_auth
from .errors import FactoryError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What never goes to the cluster. Ray also honours .gitignore and .rayignore;
# these are listed so the upload stays small (Ray refuses packages of
# ~500 MiB and warns from ~250 MiB) even where those files are missing.
EXCLUDES = [
    ".venv", "venv", ".git", ".ci", ".pytest_cache", "out", "runs", "build", "dist", ".whl",
    "**/__pycache__", "*.pyc", "*.egg-info", "*.tar", "*.tar.gz", "*.zip", "*.tmp",
]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _is_uri(path: str) -> bool:
    return "://" in path


def _recipe_arg(recipe_path: str) -> str:
    """The recipe's path relative to the project root, as the job will see it."""
    p = Path(recipe_path).expanduser().resolve()
    try:
        rel = p.relative_to(PROJECT_ROOT)
    except ValueError:
        raise FactoryError(
            f"the recipe {recipe_path} is outside the project ({PROJECT_ROOT}); the job only sees files "
            f"uploaded with the project, so copy the recipe into it (e.g. {PROJECT_ROOT / 'recipes'}) "
            "and submit that copy"
        ) from None
    parts = rel.parts
    if any(part in (".venv", "venv", ".git", "out", "runs", "build", "dist", "__pycache__") for part in parts[:-1]):
        raise FactoryError(
            f"the recipe {recipe_path} is in a folder that is not uploaded to the cluster ({parts[0]}/); "
            f"move it to {PROJECT_ROOT / 'recipes'} and submit it from there"
        )
    return rel.as_posix()


def _check_out(out: str) -> str:
    if _is_uri(out) or os.path.isabs(os.path.expanduser(out)):
        return os.path.expanduser(out) if not _is_uri(out) else out
    raise FactoryError(
        f"the output folder {out!r} is a relative path: on the cluster it would be written inside the "
        "job's temporary copy of the project and lost. Pass --out with an absolute path on a filesystem "
        "every node shares (e.g. /mnt/shared/datasets/demo) or a URI (e.g. s3://bucket/datasets/demo)"
    )


def _warn_relative_sources(recipe) -> None:
    """Relative source paths resolve against the project root in the job."""
    if Path.cwd().resolve() == PROJECT_ROOT:
        return
    for s in getattr(recipe, "sources", []):
        path = getattr(s, "path", None)
        if path and not _is_uri(path) and not os.path.isabs(os.path.expanduser(path)):
            print(f"warning: source path {path!r} is relative to {Path.cwd()} here, but the job resolves it "
                  f"against the project root {PROJECT_ROOT}; submit from the project root or use an "
                  "absolute path on a shared filesystem", file=sys.stderr)


def entrypoint(recipe_arg: str, out: str, workers: int | None = None, shards: str | None = None) -> str:
    # --address auto: join the cluster the job runs on (the job sets RAY_ADDRESS); without it
    # `factory run` starts a private local Ray on the head and the cluster's workers sit idle.
    cmd = ["python", "-m", "factory.cli", "run", recipe_arg, "--out", out, "--address", "auto", "--quiet"]
    if workers is not None:
        cmd += ["--workers", str(int(workers))]
    if shards is not None:
        cmd += ["--shards", shards]
    return shlex.join(cmd)


def runtime_env() -> dict:
    return {
        "working_dir": str(PROJECT_ROOT),
        "excludes": list(EXCLUDES),
        # The job's driver joins the cluster with ray.init(); it must use the cluster's auth
        # mode. The token itself never travels with the job (job info is readable): the
        # driver runs on the head, which has it (~/.ray/auth_token, see cluster.yaml).
        "env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                     "PYTHONUNBUFFERED": "1"},
    }


def _unreachable(address: str, detail: str) -> FactoryError:
    return FactoryError(
        f"cannot reach a Ray cluster's job server at {address} ({detail}). Check that the cluster is up "
        "(`ray up cluster.yaml`, or `ray start --head` for a local one; `ray status` on the head says "
        "whether it runs) and that --address is the dashboard's HTTP address, e.g. http://HEAD:8265 "
        "(8265 is the dashboard port, not the GCS port 6379 nor the Ray Client port 10001); a cluster "
        "from cluster.yaml serves it on the head's loopback only: forward it with `ray dashboard cluster.yaml` "
        "and use http://localhost:8265"
    )


def _quiet_sdk_logs() -> None:
    """The SDK's INFO lines about packaging and web sockets would bury the job's own log;
    warnings that matter (a package near the size limit) still show."""
    import logging

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Directory '.git' is now ignored by default": we exclude it on purpose.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def normalise_address(address: str) -> str:
    """HEAD:8265 means the dashboard over HTTP. (Given to the SDK bare, HOST:PORT is taken for the
    GCS address and a wrong one costs a 30 s time-out in Ray's C++ client.)"""
    address = address.strip().rstrip("/")
    if address and address != "auto" and "://" not in address:
        address = f"http://{address}"
    return address


def _probe(address: str, timeout: float = 15.0) -> None:
    """Fail fast where nothing answers: the SDK's own requests have no time-out, so a
    firewalled address would hang it forever."""
    if "://" not in address or not address.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # something answers; the SDK says what (404: not a Ray dashboard, 401: auth)
    except Exception as e:  # noqa: BLE001 - refused, time-out, no such host, malformed URL
        reason = getattr(e, "reason", e)
        raise _unreachable(address, f"{type(reason).__name__}: {reason}") from None


def _client(address: str):
    if address.startswith("ray://"):
        raise FactoryError(
            f"--address {address} is a Ray Client address; `factory submit` talks to the job server "
            "on the dashboard port: use http://HEAD:8265"
        )
    _probe(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # ray without the [default] extra
        raise FactoryError(f"the Ray Jobs SDK is missing ({e}); install it with: pip install 'ray[default]'") from None
    _quiet_sdk_logs()  # after the import: the SDK's modules set their loggers to INFO when imported
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise _unreachable(address, str(e).rstrip(".")) from None
    except Exception as e:  # noqa: BLE001 - bad URL, 404, auth: all told as one paragraph
        if is_auth_error(e):
            raise auth_refusal(address, e) from None
        raise _unreachable(address, f"{type(e).__name__}: {str(e).rstrip('.')}") from None


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _final_status(client, job_id: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL or time.time() > deadline:
            return status, info
        time.sleep(1.0)


def _ray_job(verb: str, job_id: str, address: str, *extra: str) -> str:
    """A `ray job` command to copy; the CLI needs the same auth mode as this process."""
    env = "RAY_AUTH_MODE=disabled " if os.environ.get("RAY_AUTH_MODE") == "disabled" else ""
    if os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        env = f"RAY_AUTH_TOKEN_PATH={shlex.quote(os.environ['RAY_AUTH_TOKEN_PATH'])} "
    return f"{env}ray job {verb} {job_id} --address {shlex.quote(address)}" + "".join(f" {e}" for e in extra)


def submit(recipe_path: str, recipe, address: str, out: str, follow: bool = True,
           workers: int | None = None, shards: str | None = None, token_file: str | None = None) -> int:
    """Submit ``factory run`` as a Ray job; print its id; follow its logs unless told not to.

    Returns 0 when the job succeeded (or was submitted, with ``follow=False``), 1 when it failed or
    was stopped, 130 when following was interrupted (the job keeps running).
    """
    recipe_arg = _recipe_arg(recipe_path)
    out = _check_out(out)
    address = normalise_address(address)
    _warn_relative_sources(recipe)
    use_cluster_auth(token_file)  # before the SDK is imported: it reads the mode once
    client = _client(address)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint(recipe_arg, out, workers, shards),
            runtime_env=runtime_env(),
            metadata={"factory_recipe": recipe_arg, "factory_out": out,
                      "factory_recipe_name": str(getattr(recipe, "name", ""))},
        )
    except ConnectionError as e:
        raise _unreachable(address, str(e).rstrip(".")) from None
    except Exception as e:  # noqa: BLE001 - e.g. the upload was too big or refused
        if is_auth_error(e):
            raise auth_refusal(address, e) from None
        raise FactoryError(
            f"the cluster at {address} refused the job: {type(e).__name__}: {str(e).rstrip('.')}. If the "
            f"project upload is too large, add big folders under {PROJECT_ROOT} to .rayignore or .gitignore"
        ) from None
    print(f"job id: {job_id}", flush=True)
    if not follow:
        print(f"follow it: {_ray_job('logs', job_id, address, '--follow')}\n"
              f"status:    {_ray_job('status', job_id, address)}\n"
              f"stop it:   {_ray_job('stop', job_id, address)}", flush=True)
        return 0
    try:
        try:
            asyncio.run(_follow(client, job_id))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - the log stream broke; the job may still run
            print(f"warning: lost the log stream ({type(e).__name__}: {e}); waiting for the job to end",
                  file=sys.stderr, flush=True)
        try:
            status, info = _final_status(client, job_id, timeout=3600.0)
        except Exception as e:  # noqa: BLE001 - the head went away while we followed
            raise FactoryError(
                f"lost contact with the cluster at {address} while following job {job_id} "
                f"({type(e).__name__}: {e}); once it is back, see the job with: "
                f"{_ray_job('status', job_id, address)}"
            ) from None
    except KeyboardInterrupt:
        print(f"\nstopped following; the job {job_id} keeps running on the cluster.\n"
              f"follow it again: {_ray_job('logs', job_id, address, '--follow')}\n"
              f"stop it:         {_ray_job('stop', job_id, address)}", file=sys.stderr, flush=True)
        return 130
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded; output: {out}", flush=True)
        return 0
    message = (getattr(info, "message", None) or "").strip()
    hint = ""
    if "No module named" in message or "ModuleNotFoundError" in message:
        hint = ("\nthe job's `python` lacks this project's dependencies: install them on every node "
                "(cluster.yaml's setup_commands), or start Ray from the virtualenv that has them "
                "(its bin/ first on PATH), since the entrypoint runs the `python` found on the head's PATH")
    if len(message) > 300:  # the tail of the log it carries was just streamed above
        message = message.splitlines()[0]
    print(f"job {job_id} ended {status}" + (f": {message}" if message else "") + hint + "\n"
          f"see its logs with: {_ray_job('logs', job_id, address)}", file=sys.stderr, flush=True)
    return 1
