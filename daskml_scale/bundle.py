"""The single artifact: a Keras model, its Preprocessor and metadata in one zip file.

``save_bundle(model, preprocessor, url)`` writes, atomically, to any fsspec URL a zip
holding

* ``model.keras``       the Keras 3 ``.keras`` file, as bytes;
* ``preprocessor.json`` :meth:`Preprocessor.to_json`;
* ``metadata.json``     format name and version, library / Keras / TensorFlow versions,
  the input schema, feature names, output names, task, training summary, and where
  the model's custom Keras objects are defined (imported by name at load time);
* ``code/...``          only with ``save_bundle(..., code=[...])``: the user's source files
  (:mod:`daskml_scale.bundle_code`); format version 2 (1 without, as older versions read).

``load_bundle(url)`` reads it back. Nothing is unpickled; the model is loaded with
Keras' safe mode, so a Lambda layer carrying Python code is refused
(:class:`UnsafeBundleError`) unless the user opts in with ``safe_mode=False``; so is
a bundle holding code.
A corrupt file, a missing part or a format version from the future is a
:class:`BundleError` that says what to do.

The SHA-256 of the file bytes (``Bundle.content_hash``) is the key under which
workers cache the loaded model.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd

from daskml_scale import backend, bundle_code, config, custom_objects
from daskml_scale._version import __version__
from daskml_scale.dropped_rows import apply_on_dropped, check_on_dropped, kept_rows
from daskml_scale.exceptions import BundleError, UnsafeBundleError
from daskml_scale.io.writers import write_bytes_atomic
from daskml_scale.features import attach_layout
from daskml_scale.outputs import check_model, output_meta, outputs_to_frame
from daskml_scale.preprocessing import Preprocessor

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["Bundle", "save_bundle", "load_bundle", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "daskml_scale.Bundle"
FORMAT_VERSION = 2  # the newest this version reads and writes; 1 without code/
_MODEL, _PRE, _META = "model.keras", "preprocessor.json", "metadata.json"
_PARTS = (_MODEL, _PRE, _META)


# --------------------------------------------------------------------------- helpers
def _versions() -> dict[str, str | None]:
    import keras

    out: dict[str, str | None] = {
        "daskml_scale": __version__, "keras": keras.__version__, "keras_backend": keras.backend.backend(),
    }
    out.update(backend.current().versions())
    return out


def _model_to_bytes(model: "keras.Model") -> bytes:
    """The ``.keras`` file of ``model``."""
    return backend.model_to_bytes(model)


def _model_from_bytes(
    data: bytes, *, safe_mode: bool, where: str, objects: dict[str, str] | None = None
) -> "keras.Model":
    import keras

    try:  # the custom objects the model needs, imported by name where they import
        with keras.saving.custom_object_scope(custom_objects.resolve(objects or {})):
            return backend.model_from_bytes(data, safe_mode=safe_mode, compile=False)
    except Exception as exc:  # Keras raises ValueError/TypeError/... of its own
        text = str(exc)
        if safe_mode and ("safe_mode" in text or "unsafe" in text.lower() or "Lambda" in text):
            raise UnsafeBundleError(
                f"{where}: the model holds Python code (e.g. a Lambda layer), which safe loading refuses "
                "because loading it would run code from the file. If you trust the file, load it with "
                f"load_bundle(url, safe_mode=False). Keras said: {text}"
            ) from exc
        hint = (
            f" The model needs the custom objects {objects}: install their modules, or save the bundle with "
            "code=[module]." if objects and "Could not locate" in text else ""
        )
        raise BundleError(
            f"{where}: cannot load the Keras model in {_MODEL!r}: {type(exc).__name__}: {text}{hint}"
        ) from exc


# --------------------------------------------------------------------------- Bundle
class Bundle:
    """A model, its preprocessor and metadata, as loaded from one bundle file.

    Build one with :func:`load_bundle` or :meth:`Bundle.from_bytes`; write one with
    :func:`save_bundle`.

    Attributes
    ----------
    preprocessor : Preprocessor
    metadata : dict
        Versions, created time, training summary, user metadata.
    content_hash : str
        SHA-256 (hex) of the file bytes.
    output_names : list of str
        Prediction columns: ``["prediction"]`` (``prediction_0``... for several outputs)
        for regression; ``["proba_<class>"..., "label"]`` for classification.
    task : str
        ``"regression"`` or ``"classification"``.
    input_schema : dict
        Raw input column -> dtype string, as the preprocessor saw them in ``fit``.
    source : str or None
        The URL it was loaded from (``None`` for :meth:`from_bytes`).
    """

    def __init__(
        self,
        data: bytes,
        *,
        safe_mode: bool = True,
        transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        lazy: bool = False,
        where: str = "bundle",
    ) -> None:
        self._data = bytes(data)
        self._safe_mode = safe_mode
        self._where = where
        self.content_hash = hashlib.sha256(self._data).hexdigest()
        parts = _read_parts(self._data, where)
        self.metadata: dict[str, Any] = _parse_metadata(parts[_META], where)
        self.code: dict[str, list[str]] | None = bundle_code.code_of(self.metadata, parts, where)
        if self.code and not safe_mode:  # first: the preprocessor's transform may live in the code
            bundle_code.install_code(self.code, parts, key=self.content_hash, where=where)
        elif self.code and transform is None:  # the transform may live in code that safe mode leaves alone
            transform = bundle_code.refusing_transform(bundle_code.unsafe_message(where, self.code))
        try:
            self.preprocessor = Preprocessor.from_json(parts[_PRE].decode("utf-8"), transform=transform)
        except (ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
            hint = (
                " The transform it names cannot be imported here: install/import the module that defines it, "
                "or pass it with load_bundle(url, transform=fn)." if isinstance(exc, (ImportError, AttributeError)) else ""
            )
            raise BundleError(f"{where}: {_PRE!r} is not a valid preprocessor: {exc}.{hint}") from exc
        self._model_bytes = parts[_MODEL]
        self._model: Any = None
        self.task: str = self.metadata["task"]
        self.output_names: list[str] = list(self.metadata["output_names"])
        self.input_schema: dict[str, str] = dict(self.metadata.get("input_schema") or {})
        self._predict_fn: Callable[[np.ndarray], np.ndarray] | None = None
        self._features_only: Preprocessor | None = None
        if not lazy:
            self.model  # noqa: B018  (load now: errors surface at load time)

    @property
    def source(self) -> str | None:
        """The URL :func:`load_bundle` read this bundle from (None for one made from bytes):
        what a server reloads a new version from."""
        return None if self._where == "bundle" else self._where

    # -- model ---------------------------------------------------------------------
    @property
    def model(self) -> "keras.Model":
        """The Keras model, loaded on first access."""
        if self._model is None:
            if self.code and self._safe_mode:
                raise UnsafeBundleError(bundle_code.unsafe_message(self._where, self.code))
            objects = self.metadata.get("custom_objects")
            model = _model_from_bytes(self._model_bytes, safe_mode=self._safe_mode, where=self._where, objects=objects)
            attach_layout(model, self.preprocessor)  # named inputs get X cut into them
            self._model = model
        return self._model

    @property
    def feature_names(self) -> list[str]:
        return list(self.preprocessor.feature_names_)

    def predict_array(self, X: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Raw model outputs for a feature matrix, shape ``(rows, width)``, float32.

        The model runs through a compiled function on batches of ``batch_size`` rows
        (``daskml_scale.predict.batch-size``), not ``model.predict``.
        """
        if self._predict_fn is None:
            self._predict_fn = compiled_forward(self.model)
        return _batched(self._predict_fn, X, batch_size or int(config.get("predict.batch-size", 8192)))

    def outputs_to_frame(self, out: np.ndarray, index: pd.Index) -> pd.DataFrame:
        """Model outputs as the prediction columns, on ``index``."""
        return outputs_to_frame(out, index, self.task, self.output_names, self.preprocessor.classes_)

    def predict_frame(
        self, df: pd.DataFrame, *, batch_size: int | None = None, on_dropped: str | None = None
    ) -> pd.DataFrame:
        """Predictions for a pandas frame of raw input rows.

        Parameters
        ----------
        df : pandas.DataFrame
            Raw input columns (see ``input_schema``); the preprocessor's transform runs first.
        batch_size : int, optional
            Rows per model call; defaults to ``daskml_scale.predict.batch-size``.
        on_dropped : {"keep", "omit", "error"}, optional
            The rows the transform drops (matched by index label, see
            :mod:`daskml_scale.dropped_rows`): ``"keep"`` (default,
            ``daskml_scale.predict.on-dropped``) answers them with empty predictions,
            ``"omit"`` leaves them out, ``"error"`` raises.

        Returns
        -------
        pandas.DataFrame
            The prediction columns only (``output_names``), with ``df``'s index and
            row order (only the kept rows under ``"omit"``).

        Raises
        ------
        DataError
            A column is missing or a value cannot be used (names the column); the
            transform returned rows that cannot be matched to the input; or it
            dropped rows under ``on_dropped="error"``.
        """
        policy = check_on_dropped(on_dropped)
        pred, rows = self.predict_kept(df, batch_size=batch_size)
        return apply_on_dropped(df, pred, rows, policy)[1]

    def predict_kept(self, df: pd.DataFrame, *, batch_size: int | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Predictions for the rows the transform keeps, in input order, and their
        positions in ``df`` (``None``: every row); see :func:`~daskml_scale.dropped_rows.apply_on_dropped`."""
        kept, rows = self.transformed_rows(df)
        X, _ = self._features().transform(kept, with_target=False)
        index = df.index if rows is None else df.index[rows]
        return self.outputs_to_frame(self.predict_array(X, batch_size=batch_size), index), rows

    def transformed_rows(self, df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray | None]:
        """The user's transform on raw rows for prediction: the rows it keeps, in input
        order, and their positions in ``df`` (``None``: every row)."""
        pre = self.preprocessor
        if pre.target is not None and pre.target in df.columns:
            df = df.drop(columns=[pre.target])  # prediction has no use for it (see Preprocessor.transform)
        kept = pre._apply_user_transform(df)
        order, rows = kept_rows(df.index, kept.index)
        if order is not None:
            kept = kept.iloc[order]
        return kept, rows

    def _features(self) -> Preprocessor:
        """The preprocessor without the user's transform: features of rows already transformed."""
        if self._features_only is None:
            plain = copy.copy(self.preprocessor)
            plain.transform_fn = None
            plain._transform_missing = None
            self._features_only = plain
        return self._features_only

    def empty_frame(self) -> pd.DataFrame:
        """A zero-row frame with the prediction columns and their dtypes (Dask ``meta``)."""
        return output_meta(self.task, self.output_names, self.preprocessor.classes_)

    # -- description ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """A JSON-able description: versions, features, schema, outputs, task, hash."""
        m = self.metadata
        return {
            "format": m.get("format"),
            "format_version": m.get("format_version"),
            "versions": dict(m.get("versions") or {}),
            "created": m.get("created"),
            "task": self.task,
            "feature_names": self.feature_names,
            "input_schema": dict(self.input_schema),
            "output_names": list(self.output_names),
            "classes": self.preprocessor.classes_,
            "target": self.preprocessor.target,
            "training_summary": m.get("training_summary"),
            "metadata": m.get("user"),
            "content_hash": self.content_hash,
            "code": self.code,
            "custom_objects": m.get("custom_objects"),
        }

    def to_bytes(self) -> bytes:
        """The bundle file's bytes (exactly what was loaded or saved)."""
        return self._data

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        safe_mode: bool = True,
        transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    ) -> "Bundle":
        """A Bundle from the bytes of a bundle file (see :func:`load_bundle`)."""
        return cls(data, safe_mode=safe_mode, transform=transform)

    def __repr__(self) -> str:
        return (
            f"Bundle(task={self.task!r}, features={len(self.feature_names)}, outputs={self.output_names!r}, "
            f"hash={self.content_hash[:12]})"
        )


# --------------------------------------------------------------------- outputs
def compiled_forward(model: "keras.Model") -> Callable[[np.ndarray], np.ndarray]:
    """``x -> model(x, training=False)`` as NumPy in, NumPy out, compiled once by the
    Keras backend (:meth:`daskml_scale.backend.Backend.compiled_forward`)."""
    return backend.compiled_forward(model)


def _batched(fn: Callable[[np.ndarray], np.ndarray], X: np.ndarray, batch_size: int) -> np.ndarray:
    n = len(X)
    if n <= batch_size:
        return np.asarray(fn(X)).reshape(n, -1) if n else np.empty((0, 0), dtype=np.float32)
    parts = [np.asarray(fn(X[i : i + batch_size])).reshape(min(batch_size, n - i), -1) for i in range(0, n, batch_size)]
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------- file format
def _read_parts(data: bytes, where: str) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BundleError(
            f"{where}: not a daskml_scale bundle (expected a zip file with {list(_PARTS)}; "
            f"received {len(data)} bytes starting {data[:16]!r}). Write bundles with save_bundle()."
        ) from exc
    with zf:
        names = set(zf.namelist())
        missing = [p for p in _PARTS if p not in names]
        if missing:
            raise BundleError(
                f"{where}: the bundle is incomplete: expected the parts {list(_PARTS)}, missing {missing} "
                f"(found {sorted(names)}). Save it again with save_bundle()."
            )
        try:
            return {n: zf.read(n) for n in _PARTS + tuple(n for n in names if n.startswith(bundle_code.CODE_DIR))}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # CRC mismatch, truncation
            raise BundleError(f"{where}: the bundle is corrupt ({exc}). Save it again with save_bundle().") from exc


def _parse_metadata(raw: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: {_META!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BundleError(f"{where}: expected format {FORMAT_NAME!r} in {_META!r}. Received: format={got!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: expected an integer format_version >= 1. Received: {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is newer than this daskml_scale reads "
            f"(up to {FORMAT_VERSION}; the file was written by daskml_scale "
            f"{(meta.get('versions') or {}).get('daskml_scale', '?')}). Upgrade daskml_scale to load it."
        )
    for key in ("task", "output_names"):
        if key not in meta:
            raise BundleError(f"{where}: {_META!r} lacks the key {key!r}. Save the bundle again with save_bundle().")
    return meta


def bundle_bytes(
    model: "keras.Model",
    preprocessor: Preprocessor,
    *,
    training_summary: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    code: bundle_code.CodeItem | Sequence[bundle_code.CodeItem] | None = None,
) -> bytes:
    """The bytes of a bundle file (what :func:`save_bundle` writes)."""
    task, names, width = check_model(model, preprocessor)
    modules, files = bundle_code.pack_code(code) if code else ([], {})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if files else 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "task": task,
        "output_names": names,
        "output_width": width,
        "feature_names": list(preprocessor.feature_names_),
        "input_schema": dict(preprocessor.input_schema_),
        "target": preprocessor.target,
        "classes": preprocessor.classes_,
        "training_summary": training_summary,
        "user": metadata,
    }
    if files:
        meta["code"] = {"modules": modules, "files": sorted(files)}
    model_bytes = _model_to_bytes(model)
    refs = custom_objects.references(model, model_bytes)
    if refs:  # where the model's custom objects are defined: loading imports them
        meta["custom_objects"] = refs
    try:
        meta_text = json.dumps(meta, sort_keys=True, default=_json_default)
    except TypeError as exc:
        raise BundleError(f"Expected JSON-able training_summary and metadata. Received: {exc}") from exc
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(_META, meta_text, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_PRE, preprocessor.to_json(), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_MODEL, model_bytes, compress_type=zipfile.ZIP_STORED)  # already a zip
        for name in sorted(files):
            zf.writestr(name, files[name], compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# --------------------------------------------------------------------- public
def save_bundle(
    model: "keras.Model",
    preprocessor: Preprocessor,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    training_summary: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    code: bundle_code.CodeItem | Sequence[bundle_code.CodeItem] | None = None,
) -> str:
    """Write a model and its preprocessor as one bundle file, atomically.

    Parameters
    ----------
    model : keras.Model
        A built Keras 3 model with one output.
    preprocessor : Preprocessor
        The fitted preprocessor whose features the model takes.
    url : str
        Local path or fsspec URL (``s3://bucket/models/price.bundle``).
    storage_options : dict, optional
        Passed to fsspec.
    training_summary, metadata : dict, optional
        JSON-able; stored in ``metadata.json`` and shown by :meth:`Bundle.info`.
    code : list of modules, module names, .py files or package folders, optional
        The user's code that loading needs (custom Keras objects, the transform), as
        MLflow's ``code_paths``: stored in the bundle, imported first by
        ``load_bundle(url, safe_mode=False)``, so it loads where they are not installed.

    Returns
    -------
    str
        ``url``.

    Raises
    ------
    BundleError
        The preprocessor is not fitted, the model's shape does not fit it, or the
        metadata is not JSON-able.
    ArgumentError
        An item of ``code`` is none of those.

    Examples
    --------
    >>> save_bundle(model, pre, "s3://models/price.bundle")  # doctest: +SKIP
    >>> bundle = load_bundle("s3://models/price.bundle")  # doctest: +SKIP
    >>> save_bundle(model, pre, "price.bundle", code=[my_losses])  # doctest: +SKIP
    """
    from daskml_scale.groups.models import GroupModels  # many models (fit_groups): one file too

    make = bundle_bytes
    if isinstance(model, GroupModels):
        from daskml_scale.groups.bundle import group_bundle_bytes as make
    data = make(model, preprocessor, training_summary=training_summary, metadata=metadata, code=code)
    write_bytes_atomic(url, data, storage_options=storage_options)
    return url


def read_bundle_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The raw bytes of a bundle file at ``url``."""
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise BundleError(f"No bundle at {url!r}: the file does not exist. Write one with save_bundle().") from exc


def load_bundle(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    safe_mode: bool = True,
    transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> Bundle:
    """Load a bundle file written by :func:`save_bundle`.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    storage_options : dict, optional
        Passed to fsspec.
    safe_mode : bool
        Keras safe mode (default): refuse models holding Python code (Lambda layers)
        and bundles holding code (``save_bundle(..., code=...)``, imported first when
        off). Set ``False`` only for files you trust.
    transform : callable, optional
        The preprocessor's transform, when it was not importable by name at save
        time (a lambda or a function defined in ``__main__``).

    Returns
    -------
    Bundle

    Raises
    ------
    BundleError
        The file is missing, corrupt, incomplete, or from a newer format version.
    UnsafeBundleError
        The model or the bundle holds code and ``safe_mode`` is on.
    """
    return open_bundle(read_bundle_bytes(url, storage_options), safe_mode=safe_mode, transform=transform, where=url)


def open_bundle(data: bytes, **kwargs: Any) -> Bundle:
    """A :class:`Bundle` from a bundle file's bytes (``Bundle(data, **kwargs)``), or a
    :class:`daskml_scale.groups.GroupBundle` when the file holds one model per group."""
    from daskml_scale.groups.bundle import GroupBundle, is_group_bundle

    return (GroupBundle if is_group_bundle(data) else Bundle)(data, **kwargs)
