import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
FACTORY = [sys.executable, "-m", "factory.cli"]


def write_recipe(path: Path, **overrides) -> Path:
    """A small recipe (world source, render + augment + check) with overrides merged in."""
    recipe = {
        "version": 1,
        "name": "test",
        "seed": 7,
        "variants": 2,
        "sources": [{"kind": "world", "split": "train", "n": 30}],
        "stages": [
            {"name": "render"},
            {"name": "augment", "params": {"hflip": 0.5, "crop": 0.85, "resize": 64, "colour_jitter": 0.1}},
            {"name": "check_count"},
        ],
        "output": {"shard_size": 10},
    }
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def factory_cli(*args, timeout=600, cwd_override=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*FACTORY, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd_override or ROOT, env=env, **kw)


@pytest.fixture(scope="session")
def faulty_fs(tmp_path_factory):
    """``faulty://`` (tests/faultfs.py) installed like a filesystem package: on PYTHONPATH for
    every process started from here on (Ray's workers included), registered in this one."""
    import fsspec

    sys.path.insert(0, str(Path(__file__).parent))
    import faultfs

    site = faultfs.install(tmp_path_factory.mktemp("site"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    # Rules are read at every operation, so tests arm and clear faults by writing this file
    # (processes started before now, like Ray's workers, would not see a new variable).
    os.environ["FAULTFS_RULES"] = str(Path(site) / "rules.json")
    fsspec.register_implementation("faulty", faultfs.FaultyFileSystem, clobber=True)
    return Path(os.environ["FAULTFS_RULES"])


@pytest.fixture(scope="session")
def ray_local(faulty_fs):
    from factory.pipeline import init_ray

    init_ray(num_cpus=2)
    yield
    import ray

    ray.shutdown()
