"""Hub ids a run needs, checked on the driver before any actor starts.

A stage's model may be a hub id (``org/name``, ``hf-hub:org/name``, an OpenCLIP
``NAME/PRETRAINED`` pair). Validation accepts one without network access (a recipe
is written where the hub may not be), but a run that cannot fetch it would only
find out when a GPU actor starts, minutes in, on every worker. So before the run:
each hub id must be in the local Hugging Face cache or reachable on the hub;
otherwise the error names it and says to download it or give a local folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FactoryError
from .recipe import HUB_ID

# Stage parameters that name a model (a folder or a hub id); `encoder` is KIND:REF.
MODEL_KEYS = ("model", "controlnet", "counter", "checker", "digits", "generator", "encoder", "labeller")


def hub_ids(recipe) -> list[tuple[str, str, str]]:
    """(stage, parameter, hub repo id) of every model a recipe names by hub id."""
    out = []
    for spec in recipe.stages:
        for key in MODEL_KEYS:
            value = (spec.params or {}).get(key)
            if not isinstance(value, str):
                continue
            if key == "encoder":
                value = value.partition(":")[2]
            repo = repo_of(value)
            if repo:
                out.append((spec.name, key, repo))
    return out


def repo_of(ref: str) -> str | None:
    """The hub repo a model reference is fetched from, or None for a local path or a URL."""
    if not ref or "://" in ref or Path(os.path.expanduser(ref)).exists():
        return None
    if ref.startswith("hf-hub:"):
        return ref[len("hf-hub:"):]
    name, _, tag = ref.partition("/")
    try:  # an OpenCLIP NAME/PRETRAINED pair: its weights live in a hub repo of their own
        import open_clip

        cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    except Exception:  # noqa: BLE001 - not an OpenCLIP name
        cfg = {}
    if cfg.get("hf_hub"):
        return cfg["hf_hub"].rstrip("/")
    return ref if HUB_ID.match(ref) else None


def reachable(repo: str, timeout: float = 10.0) -> str | None:
    """None when ``repo`` is in the local cache or on the hub; else why not."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, local_files_only=True)
        return None
    except Exception:  # noqa: BLE001 - not cached (or partly): ask the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo, timeout=timeout)
        return None
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: the user's answer is the same
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the hub cannot be reached or refuses it ({first[:160]})"


def check_hub_models(recipe) -> None:
    """Refuse the run, naming each hub id it cannot get, before any actor starts."""
    missing = []
    for stage, key, repo in hub_ids(recipe):
        why = reachable(repo)
        if why:
            missing.append(f"{stage}.{key} = {repo!r}: {why}")
    if missing:
        raise FactoryError(
            "these models are hub ids that cannot be fetched from here:\n  " + "\n  ".join(missing) +
            "\nDownload each where the hub is reachable (`huggingface-cli download ORG/NAME --local-dir "
            "models/NAME`) and give that folder in the recipe instead, or run where the hub is reachable; "
            "to build stand-ins at random weights for measuring cost, see `factory models init --help`")
