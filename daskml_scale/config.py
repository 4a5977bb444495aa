"""Defaults under the ``daskml_scale`` key of :mod:`dask.config`.

They are set the Dask way: in a YAML file under ``~/.config/dask/``, through
environment variables (``DASK_DASKML_SCALE__IO__BLOCKSIZE=128MiB``) or with
``dask.config.set({"daskml_scale.io.blocksize": "128MiB"})``.
"""

from __future__ import annotations

import os
from typing import Any



def _keras_json_backend() -> str | None:
    """The backend named in Keras's own config file (``$KERAS_HOME/keras.json``, else
    ``~/.keras/keras.json``), as Keras reads it; None when there is none."""
    import json

    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            value = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


# Keras reads its backend when it is first imported: the package's default (and quiet
# TensorFlow C++ logs) are set here, before any module of the package imports Keras.
# The Keras way wins: a user's KERAS_BACKEND, else the backend of keras.json; else TensorFlow.
if "KERAS_BACKEND" not in os.environ and _keras_json_backend() is None:
    os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dask.config  # noqa: E402
import yaml  # noqa: E402

_fn = os.path.join(os.path.dirname(__file__), "daskml_scale.yaml")
with open(_fn) as _f:
    defaults: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(defaults)


def get(key: str, default: Any = None) -> Any:
    """Return ``dask.config.get("daskml_scale." + key)``."""
    return dask.config.get(f"daskml_scale.{key}", default=default)
