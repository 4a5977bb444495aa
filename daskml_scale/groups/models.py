""":class:`GroupModels`: what :func:`~daskml_scale.groups.fit_groups` returns.

The weights of every group's model are held stacked (one array per weight of the
architecture, ``(groups, *shape)``), next to the architecture once (the ``.keras``
bytes of the template model), the groups' index, their history and the fallback
model. ``model_for(key)`` makes a plain Keras model of one group on demand.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd

from daskml_scale import backend
from daskml_scale.exceptions import ArgumentError
from daskml_scale.groups import plan

__all__ = ["GroupModels"]


class GroupModels:
    """One trained Keras model per group.

    Attributes
    ----------
    by : list of str
        The group columns.
    groups_ : list
        The groups that have a model of their own: a value per group for one ``by``
        column, a tuple for several.
    small_groups_ : dict
        Groups with fewer than ``min_rows`` rows (key -> rows): no model of their own.
    history_ : pandas.DataFrame
        One row per group and epoch: ``group``, ``epoch``, ``loss``, ``val_loss``,
        ``rows`` (training rows), ``val_rows``.
    fallback_ : keras.Model or None
        The model trained on all rows (``fallback="global"``), used for groups without
        a model of their own; ``None`` when there is none.
    mode_ : str
        ``"stacked"`` (one compiled program per worker) or ``"loop"``.
    summary_ : dict
        What the fit did (groups, rows, timings, settings).
    scaling_ : GroupScaling or None
        With ``per_group_scaling=True``: every group's numeric statistics
        (:mod:`daskml_scale.groups.scaling`); ``None``: the Preprocessor's global ones.
    """

    def __init__(
        self, *, by: Sequence[str], keys: Sequence[tuple], weights: Sequence[np.ndarray], template_bytes: bytes,
        history: pd.DataFrame, small: dict[tuple, int], fallback: Any, mode: str, min_rows: int,
        initial_weights: Sequence[np.ndarray], rows: Sequence[int], summary: dict[str, Any] | None = None,
        template: Any = None, scaling: Any = None,
    ) -> None:
        self.by = list(by)
        self._keys = [tuple(k) for k in keys]
        self._index = {k: i for i, k in enumerate(self._keys)}
        self.weights_ = [np.asarray(w) for w in weights]
        self.template_bytes = template_bytes
        self.history_ = history
        self.small_groups_ = {plan.display_key(k): int(n) for k, n in small.items()}
        self._small = dict(small)
        self.fallback_ = fallback
        self.mode_ = mode
        self.min_rows = int(min_rows)
        self.initial_weights_ = [np.asarray(w) for w in initial_weights]
        self.summary_ = dict(summary or {})
        self._template = template
        self.rows_ = [int(n) for n in rows]
        self.scaling_ = scaling
        if scaling is not None and len(scaling) != len(self._keys):
            raise ArgumentError(f"Expected per-group scaling of {len(self._keys)} groups. Received: {len(scaling)}")
        for w in self.weights_:
            if len(w) != len(self._keys):
                raise ArgumentError(f"Expected stacked weights of {len(self._keys)} groups. Received: {w.shape}")

    # ------------------------------------------------------------------ groups
    @property
    def groups_(self) -> list[Any]:
        return [plan.display_key(k) for k in self._keys]

    @property
    def keys_(self) -> list[tuple]:
        """The groups as normalized key tuples, in the order of the stacked weights."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Any) -> bool:
        try:
            return plan.normalize_key(key, len(self.by)) in self._index
        except ValueError:
            return False

    def index_of(self, key: Any) -> int:
        """The position of ``key``'s model in the stacked weights; ``KeyError`` when it has none."""
        k = plan.normalize_key(key, len(self.by))
        if k not in self._index:
            why = (f"it has {self._small[k]} rows, fewer than min_rows={self.min_rows}" if k in self._small
                   else "no training row has it")
            raise KeyError(f"The group {plan.display_key(k)!r} has no model of its own: {why}")
        return self._index[k]

    def weights_for(self, key: Any) -> list[np.ndarray]:
        """The weights of ``key``'s model, as ``model.get_weights()`` lists them."""
        i = self.index_of(key)
        return [w[i] for w in self.weights_]

    def transform_for(self, key: Any, X: np.ndarray) -> np.ndarray:
        """Features of the Preprocessor's transform as ``key``'s model expects them: with
        per-group scaling, rescaled by the group's statistics; else ``X`` as is."""
        i = self.index_of(key)
        if self.scaling_ is None:
            return X
        return self.scaling_.apply(X, np.full(len(X), i, np.int64))

    # ------------------------------------------------------------------ models
    def template(self) -> Any:
        """The architecture as a compiled Keras model (initial weights)."""
        if self._template is None:
            from daskml_scale.custom_objects import load_shipped_model

            self._template = load_shipped_model(self.template_bytes)
        return self._template

    def model_for(self, key: Any) -> Any:
        """A plain Keras model (compiled as the architecture was) with ``key``'s weights.

        Raises
        ------
        KeyError
            The group has no model of its own (unseen, or under ``min_rows``): use
            :attr:`fallback_`.
        """
        weights = self.weights_for(key)
        from daskml_scale.custom_objects import load_shipped_model

        model = load_shipped_model(self.template_bytes)
        backend.set_weights(model, weights)
        return model

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        h = self.history_
        last = h[h["epoch"] == h["epoch"].max()] if len(h) else h
        return {
            "by": list(self.by), "groups": len(self._keys), "small_groups": len(self._small),
            "min_rows": self.min_rows, "mode": self.mode_, "fallback": "global" if self.fallback_ is not None else None,
            "per_group_scaling": self.scaling_ is not None,
            "final_loss_mean": float(last["loss"].mean()) if len(last) else None,
            "final_val_loss_mean": float(last["val_loss"].mean()) if len(last) and last["val_loss"].notna().any() else None,
            **{k: v for k, v in self.summary_.items() if k not in ("by", "groups", "mode")},
        }

    def index_json(self) -> str:
        """The groups' index as JSON: keys, rows, and the groups under ``min_rows``."""
        return json.dumps({
            "by": self.by,
            "keys": [list(k) for k in self._keys],
            "rows": self.rows_,
            "small": [[list(k), int(n)] for k, n in self._small.items()],
            "min_rows": self.min_rows,
            "mode": self.mode_,
        })

    def __repr__(self) -> str:
        fb = "global fallback" if self.fallback_ is not None else "no fallback"
        return f"GroupModels(by={self.by!r}, groups={len(self._keys)}, small={len(self._small)}, {self.mode_}, {fb})"


def history_frame(keys: Sequence[tuple], loss: np.ndarray, val_loss: np.ndarray, rows: np.ndarray,
                  val_rows: np.ndarray) -> pd.DataFrame:
    """The per-group history: one row per group and epoch."""
    g, e = (loss.shape if loss is not None and loss.size else (len(keys), 0))
    if g == 0 or e == 0:
        return pd.DataFrame({"group": [], "epoch": [], "loss": [], "val_loss": [], "rows": [], "val_rows": []})
    display = [plan.display_key(k) for k in keys]
    return pd.DataFrame({
        "group": pd.Series(np.repeat(np.array(display + [None], dtype=object)[:-1], e), dtype=object),
        "epoch": np.tile(np.arange(e), g),
        "loss": loss.reshape(-1).astype(np.float64),
        "val_loss": val_loss.reshape(-1).astype(np.float64),
        "rows": np.repeat(rows, e),
        "val_rows": np.repeat(val_rows, e),
    })
