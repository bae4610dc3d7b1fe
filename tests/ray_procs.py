"""Real Ray heads for tests, started with `ray start --block` on loopback and stopped by process id.

Never `ray stop`: it kills every Ray process of this user on the machine, other
people's runs included. A head runs in a session of its own, on its own ports
and temp dir, and is torn down by the ids of that session's processes.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[3])  # state ppid pgrp session ...


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def our_processes(sid: int) -> set[int]:
    """A head's processes: its session, and the descendants of those (the job's driver may start
    a session of its own). Found by id, so another Ray on this machine is never touched."""
    pids = {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _session_of(int(d.name)) == sid}
    kids = _children()
    todo = list(pids)
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in pids:
                pids.add(k)
                todo.append(k)
    pids.discard(os.getpid())
    return pids


def _answers(url: str, token: str | None = None) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # zombies: dead, waiting for a parent that may never reap them


def stop(proc: subprocess.Popen) -> None:
    """What `ray stop --force` does, gentler first (SIGTERM, 5 s, SIGKILL), to this head's processes only."""
    pids = our_processes(proc.pid)
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for pid in pids | our_processes(proc.pid):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in pids):
            proc.poll()  # reap `ray start` itself, our child
            time.sleep(0.5)
        if not any(alive(p) for p in pids):
            break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@contextmanager
def head_process(env: dict, token: str | None = None, num_cpus: int = 2):
    """A single-node head with its dashboard and job server on 127.0.0.1; yields the dashboard's URL.
    With ``token``, Ray's token authentication is on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)."""
    temp_dir = f"/tmp/rt_{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit in 107 bytes
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--object-store-memory=300000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *[f"{k}={v}" for k, v in ports.items()]]
    env = dict(env)
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    log = open(f"{temp_dir}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while not (_answers(f"{address}/api/version", token) and _answers(f"{address}/api/jobs/", token)):
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {Path(f'{temp_dir}.log').read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"the Ray head did not answer on {address} within 180 s")
            time.sleep(1)
        yield address
    finally:
        stop(proc)
        log.close()
        subprocess.run(["rm", "-rf", temp_dir, f"{temp_dir}.log"], check=False)
