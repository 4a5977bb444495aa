"""HTTP details every endpoint shares: reading a body under the size limit, and the
503 of a model that is not ready. Plain ASGI, no Starlette objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daskml_scale.serving.errors import RequestError, ServiceUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from starlette.types import Receive

    from daskml_scale.serving.app import ServingState

__all__ = ["receive_body", "require_ready"]


def require_ready(state: "ServingState") -> None:
    """503 unless the bundle is loaded (saying whether it is loading or failed)."""
    if not state.ready.is_set():
        if state.load_error:
            raise ServiceUnavailableError(f"The model failed to load: {state.load_error}")
        raise ServiceUnavailableError("The model is still loading; retry when GET /health says ready")


async def receive_body(receive: "Receive", length: bytes | str | None, limit: int) -> bytes:
    """Read an ASGI body, refusing one over ``limit`` bytes by its header or while reading."""
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"Malformed Content-Length header: {length!r}") from None
        if n > limit:
            raise RequestError(413, f"The body is {n} bytes; the limit is {limit} bytes (serve.max-body-bytes)")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "The client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The body is over the limit of {limit} bytes (serve.max-body-bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]
