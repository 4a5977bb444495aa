"""Many models in one file, and the routing of every row to its group's model.

A group bundle is a zip holding

* ``metadata.json``       format ``daskml_scale.GroupBundle`` (version 1), the group
  columns, the number of groups, the fallback, the training summary;
* ``base.bundle``         an ordinary bundle (:mod:`daskml_scale.bundle`): the
  architecture once (the fallback model, or the untrained template without one), the
  preprocessor, the input schema, the user's code;
* ``groups/index.json``   the groups' keys (in the order of the weights), their rows,
  the groups under ``min_rows``;
* ``groups/w<i>.npy``     weight ``i`` of the architecture, stacked ``(groups, *shape)``;
* ``groups/history.csv``  the per-group history;
* ``groups/scaling_means.npy``, ``groups/scaling_scales.npy``  with
  ``per_group_scaling=True`` only: every group's numeric statistics
  ``(groups, numeric columns)`` (:mod:`daskml_scale.groups.scaling`), applied to the
  rows routed to the group's model.

Loading follows the rules of :func:`daskml_scale.load_bundle`: nothing is unpickled
(JSON, CSV and ``np.load(..., allow_pickle=False)``), the model loads in Keras's safe
mode unless ``safe_mode=False``. The inner bundle is stored compressed and the weights
as ``.npy`` (not zip) files, so a truncated file cannot pass for the zip inside it. An older daskml_scale refuses the file (it finds no
``model.keras`` at the top) instead of answering with the fallback model alone.

:class:`GroupBundle` is a :class:`~daskml_scale.bundle.Bundle` whose predictions route
each row: to its group's model; else to the fallback; else an empty prediction. Two
more output columns say which: ``route`` (``"group"``, ``"fallback"`` or ``"none"``)
and ``route_reason`` (``""``, ``"unseen group"``, ``"below min_rows"`` or ``"missing
group key"``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import threading
import zipfile
from typing import Any, Callable

import numpy as np
import pandas as pd

from daskml_scale import backend
from daskml_scale.bundle import Bundle, bundle_bytes
from daskml_scale.dropped_rows import kept_rows
from daskml_scale.exceptions import BundleError
from daskml_scale.groups import plan
from daskml_scale.outputs import output_meta, outputs_to_frame

__all__ = ["GroupBundle", "group_bundle_bytes", "is_group_bundle", "FORMAT_NAME", "FORMAT_VERSION", "ROUTE_COLUMNS"]

FORMAT_NAME = "daskml_scale.GroupBundle"
FORMAT_VERSION = 1
ROUTE_COLUMNS = ["route", "route_reason"]
_META, _BASE, _INDEX, _HISTORY = "metadata.json", "base.bundle", "groups/index.json", "groups/history.csv"
_PARTS = (_META, _BASE, _INDEX)
_SCALING = ("groups/scaling_means.npy", "groups/scaling_scales.npy")


def _weight_name(i: int) -> str:
    return f"groups/w{i}.npy"


def is_group_bundle(data: bytes) -> bool:
    """Whether ``data`` is a group bundle's file (a cheap look at the zip's names)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return _BASE in names and _INDEX in names


def group_bundle_bytes(
    group_models: Any, preprocessor: Any, *, training_summary: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None, code: Any = None,
) -> bytes:
    """The bytes of a group bundle (what ``save_bundle(group_models, ...)`` writes)."""
    gm = group_models
    base_model = gm.fallback_ if gm.fallback_ is not None else gm.template()
    summary = {"groups": gm.describe(), **(training_summary or {})}
    base = bundle_bytes(base_model, preprocessor, training_summary=summary, metadata=metadata, code=code)
    history = gm.history_.copy()
    history["group"] = [json.dumps(list(plan.normalize_key(k, len(gm.by)))) for k in history["group"]]
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "by": list(gm.by), "groups": len(gm), "small_groups": len(gm.small_groups_), "min_rows": gm.min_rows,
        "fallback": "global" if gm.fallback_ is not None else None, "mode": gm.mode_,
        "weights": len(gm.weights_), "training_summary": gm.describe(),
        "per_group_scaling": gm.scaling_.columns if gm.scaling_ is not None else None,
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_META, json.dumps(meta, sort_keys=True, default=_json_default), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_BASE, base, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_INDEX, gm.index_json(), compress_type=zipfile.ZIP_DEFLATED)
        for i, w in enumerate(gm.weights_):
            one = io.BytesIO()
            np.save(one, np.ascontiguousarray(w, dtype=np.float32), allow_pickle=False)
            zf.writestr(_weight_name(i), one.getvalue(), compress_type=zipfile.ZIP_STORED)
        zf.writestr(_HISTORY, history.to_csv(index=False), compress_type=zipfile.ZIP_DEFLATED)
        if gm.scaling_ is not None:
            for name, arr in zip(_SCALING, (gm.scaling_.means, gm.scaling_.scales)):
                one = io.BytesIO()
                np.save(one, np.ascontiguousarray(arr, dtype=np.float64), allow_pickle=False)
                zf.writestr(name, one.getvalue(), compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _read(data: bytes, where: str) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{where}: not a daskml_scale group bundle (not a zip file)") from exc
    with zf:
        names = set(zf.namelist())
        missing = [p for p in _PARTS if p not in names]
        if missing:
            raise BundleError(f"{where}: the group bundle is incomplete: missing {missing}. Save it again with save_bundle().")
        weights = tuple(sorted((n for n in names if n.startswith("groups/w") and n.endswith(".npy")),
                               key=lambda n: int(n[len("groups/w"):-len(".npy")])))
        try:
            extra = tuple(n for n in (_HISTORY, *_SCALING) if n in names)
            return {n: zf.read(n) for n in _PARTS + weights + extra}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise BundleError(f"{where}: the group bundle is corrupt ({exc}). Save it again with save_bundle().") from exc


def _parse_meta(raw: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: {_META!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BundleError(f"{where}: expected format {FORMAT_NAME!r} in {_META!r}. Received: "
                          f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: expected an integer format_version >= 1. Received: {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where}: group bundle format version {version} is newer than this daskml_scale reads "
                          f"(up to {FORMAT_VERSION}). Upgrade daskml_scale to load it.")
    return meta


class GroupBundle(Bundle):
    """A bundle of one model per group; predictions route every row to its group's model.

    Attributes (besides :class:`~daskml_scale.bundle.Bundle`'s)
    ----------------------------------------------------------
    by : list of str
        The group columns; a prediction request must have them.
    groups : list
        The groups with a model of their own.
    has_fallback : bool
        Whether rows of other groups go to the fallback model (else: empty predictions).
    group_metadata : dict
        The group bundle's ``metadata.json``.
    """

    def __init__(self, data: bytes, *, safe_mode: bool = True, transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
                 lazy: bool = False, where: str = "bundle") -> None:
        parts = _read(bytes(data), where)
        meta = _parse_meta(parts[_META], where)
        super().__init__(parts[_BASE], safe_mode=safe_mode, transform=transform, lazy=True, where=where)
        self._data = bytes(data)
        self.content_hash = hashlib.sha256(self._data).hexdigest()
        self.group_metadata = meta
        try:
            index = json.loads(parts[_INDEX].decode("utf-8"))
            self.by: list[str] = [str(c) for c in index["by"]]
            self._keys = [tuple(k) for k in index["keys"]]
            self._rows = [int(n) for n in index.get("rows", [])]
            self._small = {tuple(k): int(n) for k, n in index.get("small", [])}
            self._weights = [np.load(io.BytesIO(parts[_weight_name(i)]), allow_pickle=False)
                             for i in range(int(meta["weights"]))]
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise BundleError(f"{where}: the group index or weights are unreadable ({type(exc).__name__}: {exc})") from exc
        for w in self._weights:
            if len(w) != len(self._keys):
                raise BundleError(f"{where}: the stacked weights hold {len(w)} groups, the index {len(self._keys)}")
        self._code_of = {k: i for i, k in enumerate(self._keys)}
        self.scaling = self._read_scaling(parts, meta, where)
        self._history_csv = parts.get(_HISTORY)
        self.has_fallback = meta.get("fallback") == "global"
        self.base_output_names = list(self.output_names)
        self.output_names = [*self.base_output_names, *ROUTE_COLUMNS]
        self._forward: Any = None
        self._lock = threading.Lock()
        if not lazy:
            self.model  # noqa: B018  (load now: errors surface at load time)

    def _read_scaling(self, parts: dict[str, bytes], meta: dict[str, Any], where: str) -> Any:
        columns = meta.get("per_group_scaling")
        if not columns:
            return None
        from daskml_scale.groups.scaling import GroupScaling

        pre = self.preprocessor
        try:
            means, scales = (np.load(io.BytesIO(parts[n]), allow_pickle=False) for n in _SCALING)
            if list(columns) != list(pre.numeric):
                raise ValueError(f"scaled columns {columns} are not the preprocessor's numeric {pre.numeric}")
            scaling = GroupScaling.of(pre, means, scales)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise BundleError(f"{where}: the per-group scaling is unreadable ({type(exc).__name__}: {exc})") from exc
        if len(scaling) != len(self._keys):
            raise BundleError(f"{where}: the per-group scaling holds {len(scaling)} groups, the index {len(self._keys)}")
        return scaling

    # ------------------------------------------------------------------ groups
    @property
    def groups(self) -> list[Any]:
        return [plan.display_key(k) for k in self._keys]

    def history(self) -> pd.DataFrame:
        """The per-group training history stored in the file."""
        if not self._history_csv:
            return pd.DataFrame()
        h = pd.read_csv(io.BytesIO(self._history_csv))
        h["group"] = [plan.display_key(tuple(json.loads(k))) for k in h["group"]]
        return h

    def model_for(self, key: Any) -> Any:
        """A Keras model (not compiled) with the weights of ``key``'s group."""
        k = plan.normalize_key(key, len(self.by))
        if k not in self._code_of:
            raise KeyError(f"The group {plan.display_key(k)!r} has no model of its own in this bundle")
        import keras

        model = keras.models.clone_model(self.model)
        backend.set_weights(model, [w[self._code_of[k]] for w in self._weights])
        return model

    # ------------------------------------------------------------------ routing
    def route(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Per row of ``df``: its group's position in the weights (-1: none) and the reason."""
        keys = plan.row_keys(df, self.by) if all(c in df.columns for c in self.by) else [None] * len(df)
        codes = np.fromiter((self._code_of.get(k, -1) if k is not None else -1 for k in keys), np.int64, len(keys))
        reason = np.array([
            "" if c >= 0 else ("missing group key" if k is None else ("below min_rows" if k in self._small else "unseen group"))
            for k, c in zip(keys, codes)
        ], dtype=object)
        return codes, reason

    def _group_forward(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``fn(X, codes) -> outputs``: stacked (one program) for a stackable architecture;
        else one compiled forward of a copy of the model, the group's weights assigned per group."""
        if self._forward is None:
            from daskml_scale.groups.spec import stack_plan

            spec, _ = stack_plan(self.model, for_training=False)
            if spec is not None:
                self._forward = backend.current().make_stacked_forward(spec, self._weights)
            else:
                import keras

                copy = keras.models.clone_model(self.model)
                forward = backend.compiled_forward(copy)
                weights = self._weights

                def per_group(X: np.ndarray, codes: np.ndarray) -> np.ndarray:
                    out = None
                    for c in np.unique(codes):
                        rows = np.flatnonzero(codes == c)
                        backend.set_weights(copy, [w[int(c)] for w in weights])
                        part = np.asarray(forward(X[rows])).reshape(len(rows), -1)
                        if out is None:
                            out = np.empty((len(X), part.shape[1]), np.float32)
                        out[rows] = part
                    return out if out is not None else np.zeros((0, 1), np.float32)

                self._forward = per_group
        return self._forward

    def predict_kept(self, df: pd.DataFrame, *, batch_size: int | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
        """As :meth:`Bundle.predict_kept`, each row through its group's model (or the
        fallback), with the ``route`` and ``route_reason`` columns."""
        pre = self.preprocessor
        if pre.target is not None and pre.target in df.columns:
            df = df.drop(columns=[pre.target])
        kept = pre._apply_user_transform(df)
        order, rows = kept_rows(df.index, kept.index)
        if order is not None:
            kept = kept.iloc[order]
        X, _ = self._features().transform(kept, with_target=False)
        source = kept if all(c in kept.columns for c in self.by) else (df if rows is None else df.iloc[rows])
        codes, reason = self.route(source)
        index = df.index if rows is None else df.index[rows]
        n = len(X)
        routed = codes >= 0
        out: np.ndarray | None = None
        route = np.full(n, "none", dtype=object)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if routed.any():
            Xg = X[routed]
            if self.scaling is not None:
                Xg = self.scaling.apply(Xg, codes[routed])
            with self._lock:
                parts.append((routed, self._group_forward()(Xg, codes[routed].astype(np.int32))))
            route[routed] = "group"
        if self.has_fallback and (~routed).any():
            parts.append((~routed, self.predict_array(X[~routed], batch_size=batch_size)))
            route[~routed] = "fallback"
        for mask, values in parts:
            if out is None:
                out = np.full((n, values.shape[1]), np.nan, np.float32)
            out[mask] = values
        if out is None:
            out = np.full((n, int(self.metadata.get("output_width") or 1)), np.nan, np.float32)
        frame = outputs_to_frame(out, index, self.task, self.base_output_names, pre.classes_)
        if self.task == "classification" and "label" in frame.columns:
            frame.loc[route == "none", "label"] = pd.NA
        frame["route"] = pd.array(route, dtype="str") if n else pd.array([], dtype="str")
        frame["route_reason"] = pd.array(reason, dtype="str") if n else pd.array([], dtype="str")
        return frame, rows

    def empty_frame(self) -> pd.DataFrame:
        meta = output_meta(self.task, self.base_output_names, self.preprocessor.classes_)
        for c in ROUTE_COLUMNS:
            meta[c] = pd.Series([], dtype="str")
        return meta

    # ------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        out = super().info()
        m = self.group_metadata
        out["content_hash"] = self.content_hash
        out["output_names"] = list(self.output_names)
        out["groups"] = {
            "by": list(self.by), "count": len(self._keys), "small_groups": len(self._small),
            "min_rows": m.get("min_rows"), "fallback": m.get("fallback"), "mode": m.get("mode"),
            "per_group_scaling": bool(m.get("per_group_scaling")),
            "format": m.get("format"), "format_version": m.get("format_version"),
            "training_summary": m.get("training_summary"),
        }
        return out

    def __repr__(self) -> str:
        return (f"GroupBundle(by={self.by!r}, groups={len(self._keys)}, fallback={self.has_fallback}, "
                f"task={self.task!r}, hash={self.content_hash[:12]})")

