"""Training checkpoints on any fsspec URL: weights, optimizer state, epoch, history.

One ``.npz`` file (NumPy arrays plus a JSON header, no pickle), written atomically:
a temporary name then a rename on local disk, a single put on object storage.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from daskml_scale.exceptions import TrainingError
from daskml_scale.io.writers import write_bytes_atomic

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "checkpoint_file"]

FORMAT = "daskml_scale.checkpoint/1"


@dataclass
class Checkpoint:
    epoch: int  # the last completed epoch (0-based)
    weights: list[np.ndarray]
    optimizer: list[np.ndarray] | None
    history: dict[str, list[float]]
    info: dict[str, Any] = field(default_factory=dict)


def checkpoint_file(url: str) -> str:
    """A checkpoint URL names a file (``.npz``) or a folder that gets ``checkpoint.npz``."""
    return url if url.endswith(".npz") else url.rstrip("/") + "/checkpoint.npz"


def save_checkpoint(url: str, ckpt: Checkpoint, storage_options: dict[str, Any] | None = None) -> str:
    target = checkpoint_file(url)
    arrays: dict[str, np.ndarray] = {}
    for i, w in enumerate(ckpt.weights):
        arrays[f"w{i}"] = np.asarray(w)
    for i, o in enumerate(ckpt.optimizer or []):
        arrays[f"o{i}"] = np.asarray(o)
    header = {
        "format": FORMAT, "epoch": ckpt.epoch, "n_weights": len(ckpt.weights),
        "n_optimizer": None if ckpt.optimizer is None else len(ckpt.optimizer),
        "history": ckpt.history, "info": ckpt.info,
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(target, buf.getvalue(), storage_options=storage_options)
    return target


def load_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> Checkpoint | None:
    """The checkpoint at ``url``, or ``None`` when there is none yet."""
    target = checkpoint_file(url)
    fs, path = fsspec.core.url_to_fs(target, **(storage_options or {}))
    if not fs.exists(path):
        return None
    data = fs.cat_file(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            if header.get("format") != FORMAT:
                raise TrainingError(f"{target} is not a daskml_scale checkpoint (format {header.get('format')!r})")
            weights = [z[f"w{i}"] for i in range(header["n_weights"])]
            opt = None
            if header["n_optimizer"] is not None:
                opt = [z[f"o{i}"] for i in range(header["n_optimizer"])]
    except (ValueError, KeyError, OSError) as exc:
        raise TrainingError(f"Checkpoint {target} is corrupt or incomplete: {exc}") from exc
    return Checkpoint(
        epoch=int(header["epoch"]), weights=weights, optimizer=opt,
        history={k: list(v) for k, v in header["history"].items()}, info=header.get("info", {}),
    )
