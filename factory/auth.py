"""Ray token authentication for clients of a cluster (`factory submit`).

A cluster keeps Ray's token authentication on (cluster.yaml); only a local
single-machine instance runs without one. A client proves itself with the
cluster's token, found where Ray looks for it: ``RAY_AUTH_TOKEN``, a file named
by ``RAY_AUTH_TOKEN_PATH`` (or ``--token-file``), or ``~/.ray/auth_token``.
This module picks the mode before Ray is imported and turns the job server's
401/403 answers into one paragraph that says which of those to fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FactoryError

DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def use_cluster_auth(token_file: str | None = None) -> str:
    """Set this process's RAY_AUTH_MODE for talking to a cluster; returns it ("token" or "disabled").

    A token given (flag, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) means token mode; otherwise an
    explicit RAY_AUTH_MODE is kept; otherwise ~/.ray/auth_token, if there, means token mode.
    """
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise FactoryError(f"--token-file {token_file}: no token there (the file is missing or empty). "
                               f"Copy the cluster's token file from the head (~/.ray/auth_token) or pass it as "
                               f"RAY_AUTH_TOKEN; nothing was submitted.")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())
        os.environ.pop("RAY_AUTH_TOKEN", None)
        mode = "token"
    elif os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        mode = "token"
    elif os.environ.get("RAY_AUTH_MODE"):
        mode = os.environ["RAY_AUTH_MODE"].lower()
    else:
        mode = "token" if DEFAULT_TOKEN_FILE.is_file() else "disabled"
    os.environ["RAY_AUTH_MODE"] = mode
    _refresh_ray_config()
    return mode


def _refresh_ray_config() -> None:
    """Ray caches the mode and token per process; a process that imported Ray before (tests)
    must reload them."""
    import sys

    if "ray._raylet" not in sys.modules:
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # noqa: BLE001 - private API: a Ray without it has nothing cached to reload
        pass


def token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file {os.environ['RAY_AUTH_TOKEN_PATH']}"
    return f"the file {DEFAULT_TOKEN_FILE}"


def is_auth_error(e: BaseException) -> bool:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        return False
    return isinstance(e, AuthenticationError)


def auth_refusal(address: str, e: BaseException) -> FactoryError:
    """The job server's 401 (no token) or 403 (wrong token) as one paragraph."""
    where = ("set RAY_AUTH_TOKEN to the cluster's token, or point RAY_AUTH_TOKEN_PATH (or --token-file) at a "
             "copy of its token file (~/.ray/auth_token on the head, which cluster.yaml writes; "
             "`ray get-auth-token` on the head prints it)")
    if "required" in str(e).lower() or os.environ.get("RAY_AUTH_MODE") != "token":
        return FactoryError(
            f"the cluster at {address} requires a token (Ray token authentication is on) and this shell gave "
            f"none{' (RAY_AUTH_MODE=disabled here)' if os.environ.get('RAY_AUTH_MODE') == 'disabled' else ''}: "
            f"{where}. Nothing was submitted.")
    return FactoryError(
        f"the cluster at {address} refused the token from {token_source()}: it is not this cluster's token. "
        f"Use the head's own: {where}. Nothing was submitted.")
