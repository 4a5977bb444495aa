"""Locked doors: a bearer token on every endpoint but the health checks, and URL
prefixes that batch jobs may read from and write to.

The token comes from ``token=``, a ``token_file``, the ``DASKML_SCALE_SERVE_TOKEN``
environment variable or the ``serve.token-file`` setting, in that order; without one
the server is open (as before) and ``POST /jobs`` is off. It is compared in constant
time (:func:`hmac.compare_digest`). ``/health``, ``/models/{name}/health``,
``/v2/health/live``, ``/v2/health/ready`` and ``/ping`` stay open for load balancers.

A job's input and output URLs must fall under ``serve.jobs.allow-read`` and
``serve.jobs.allow-write`` after normalization: local paths are resolved
(``os.path.realpath``: ``..`` and symlinks), other URLs must keep the prefix's scheme
and may hold no ``..`` segment. Anything else is refused with 403 before it is opened.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from daskml_scale.exceptions import ArgumentError
from daskml_scale.serving.errors import ServingError

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ForbiddenError", "UnauthorizedError", "AuthMiddleware", "load_token", "check_url", "TOKEN_ENV"]

TOKEN_ENV = "DASKML_SCALE_SERVE_TOKEN"
OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready", "/ping"})
_MODEL_HEALTH = re.compile(r"^/models/[^/]+/health$")
_GLOB = re.compile(r"[*?\[]")


class UnauthorizedError(ServingError, PermissionError):
    """401: the request carries no bearer token, or the wrong one."""

    status = 401


class ForbiddenError(ServingError, PermissionError):
    """403: the request may not do this (a job URL outside the allowed prefixes, jobs off)."""

    status = 403


def load_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The server's bearer token: ``token``, else the first line of ``token_file``, else
    ``$DASKML_SCALE_SERVE_TOKEN``, else ``serve.token-file``; ``None``: no token.

    Raises
    ------
    ArgumentError
        The file cannot be read, or the token is empty.
    """
    from daskml_scale.config import get

    if token is None:
        token_file = token_file or None
        if token_file is None and os.environ.get(TOKEN_ENV):
            token = os.environ[TOKEN_ENV]
        else:
            token_file = token_file or get("serve.token-file", None)
            if token_file is None:
                return None
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise ArgumentError(f"Cannot read the token file {token_file!r}: {exc}") from exc
    token = token.strip()
    if not token:
        raise ArgumentError("Expected a non-empty bearer token. Received: an empty token (file or variable)")
    return token


class AuthMiddleware:
    """Refuse, with 401, every request without ``Authorization: Bearer <token>`` (but the health checks)."""

    def __init__(self, app: "ASGIApp", token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        from daskml_scale.serving.inputs import dumps

        err = UnauthorizedError("This server needs a bearer token: send the header 'Authorization: Bearer <token>'")
        body = dumps(err.to_dict())
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="daskml_scale"')]})
        await send({"type": "http.response.body", "body": body})

    def allowed(self, scope: "Scope") -> bool:
        path = scope.get("path", "")
        if path in OPEN_PATHS or _MODEL_HEALTH.match(path):
            return True
        got = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                got = v
                break
        return hmac.compare_digest(got, self.expected)


# --------------------------------------------------------------------------- job URLs
def _split(url: str) -> tuple[str, str]:
    """(scheme, path) with ``file`` for local paths."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return scheme.lower(), rest
    return "file", url


def _local(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _fixed_part(path: str) -> str:
    """The part of a (glob) path before its first wildcard, cut at a separator."""
    m = _GLOB.search(path)
    if m is None:
        return path
    return path[: m.start()].rsplit("/", 1)[0] or "/"


def check_url(url: str, prefixes: Sequence[str], what: str) -> None:
    """403 unless ``url`` (a path, a glob or a folder) falls under one of ``prefixes``.

    Parameters
    ----------
    url : str
        The job's input or output URL.
    prefixes : sequence of str
        Allowed URL prefixes (``serve.jobs.allow-read`` or ``allow-write``).
    what : str
        ``"input"`` or ``"output"``, for the message.
    """
    scheme, path = _split(url)
    if "\x00" in url:
        raise ForbiddenError(f"Job {what} {url!r}: a NUL byte in a URL", field=what)
    parts = path.replace("\\", "/").split("/")
    for prefix in prefixes:
        p_scheme, p_path = _split(prefix)
        if p_scheme != scheme:
            continue
        if scheme == "file":
            root = _local(p_path)
            got = _local(_fixed_part(path))
            if ".." in parts[len(_fixed_part(path).split("/")):]:  # a '..' inside the wildcard part
                continue
            if got == root or got.startswith(root.rstrip(os.sep) + os.sep):
                return
        else:
            if ".." in parts or "." in parts[1:]:
                continue
            root = p_path.rstrip("/")
            if path == root or path.startswith(root + "/"):
                return
    allowed = list(prefixes) or "none (serve.jobs.allow-read / allow-write are empty)"
    raise ForbiddenError(f"Job {what} {url!r} is outside the URL prefixes this server may "
                         f"{'read' if what == 'input' else 'write'}: {allowed}", field=what)
