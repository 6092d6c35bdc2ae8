"""Ray token authentication for every cluster dragons starts.

Ray reads ``RAY_AUTH_MODE`` once, when ``ray`` is first imported (its C++ core
caches the config), so this runs from ``dragons/__init__.py``, before anything
can import ray. Without token auth anyone who can reach a Ray port can run
code on the cluster; Ray ships it off by default.
"""

from __future__ import annotations

import os
import secrets

# Where the embedded cluster's token lives: a 0600 file in a 0700 directory,
# never in the environment (which ``ps e`` and crash reports show).
TOKEN_FILE = os.path.join("~", ".config", "dragons", "ray_token")


def token_path() -> str:
    return os.path.expanduser(TOKEN_FILE)


def ensure_token_file(path: str | None = None) -> str:
    """Create the token file (0600) if missing; returns its path."""
    path = path or token_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # a token readable by others is no secret
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def enable_token_auth() -> None:
    """Turn on token auth for a cluster this process starts or joins.

    An explicit ``RAY_AUTH_MODE`` wins (a job on a token cluster already has
    it and its token). Otherwise: mode ``token``, and unless a token is given
    (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``), our own token file. Ray
    workers and ``ray start`` children inherit both variables.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_ADDRESS"):
        return  # joining a cluster: Ray finds its token (RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token)
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = ensure_token_file()
