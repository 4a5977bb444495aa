"""The standard inference protocols, served beside ``POST /predict`` from the same
bundle, through the same checks, preprocessor and micro-batcher:

* :mod:`.v2`: the Open Inference Protocol (KServe, Triton), ``/v2/...``;
* :mod:`.tfserving`: TensorFlow Serving's REST API, ``/v1/models/...``;
* :mod:`.mlflow`: MLflow's scoring server, ``/ping``, ``/version``, ``/invocations``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from starlette.routing import Route

__all__ = ["routes"]


def routes() -> list["Route"]:
    """Every protocol's routes (Starlette is imported here, when an app is built)."""
    from daskml_scale.serving.protocols import mlflow, tfserving, v2

    return [*v2.routes(), *tfserving.routes(), *mlflow.routes()]
