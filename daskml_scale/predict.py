"""Prediction at scale: over the partitions of a Dask DataFrame, and file by file.

* :func:`predict` maps the bundle over the partitions of a Dask DataFrame, lazily:
  kept input columns then prediction columns, with the input's index and row order.
* :func:`predict_files` is the batch pattern "one output file per input file"
  (``in/1.csv -> out/1.csv``): one task per file, each output written atomically, a
  rerun skips the outputs that exist and redoes the rest, a failing file is reported
  and does not stop the others.

The bundle's bytes go into the cluster once, as the result of one task (see
:func:`_place_bytes`); each worker fetches them with its first task, loads the model
once and keeps it in :data:`_CACHE`, keyed by the bundle's content hash. Tasks carry
the key and a reference to the bytes, never a live model. The rows the user's
transform drops follow the ``on_dropped`` policy (:mod:`daskml_scale.dropped_rows`);
every wait on the cluster is bounded (:mod:`daskml_scale._utils.waits`).
The model runs on large batches through a compiled function (see
:meth:`Bundle.predict_array`), not ``model.predict`` on tiny frames.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd

from daskml_scale._utils.client import default_client
from daskml_scale._utils import waits
from daskml_scale._utils.lru import LRUCache
from daskml_scale.bundle import Bundle, bundle_bytes, open_bundle, read_bundle_bytes
from daskml_scale.dropped_rows import apply_on_dropped, check_on_dropped
from daskml_scale.exceptions import ArgumentError, BundleError, DataError
from daskml_scale.io.bad_rows import check_on_bad_rows
from daskml_scale.io.csv import LINE_COLUMN, PATH_COLUMN, CsvReader, plan_csv
from daskml_scale.io.parquet import read_parquet_file
from daskml_scale.io.paths import (
    INPUT_SUFFIXES,
    FilePiece,
    display_name,
    expand_paths,
    files_under,
    is_local,
    is_parquet,
    output_paths,
)
from daskml_scale.io.provenance import name_rows
from daskml_scale.io.writers import check_format, remove_stale_temps, write_bytes_atomic, write_frame_atomic
from daskml_scale.predict_report import PredictReport
from daskml_scale.preprocessing import Preprocessor

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da
    import keras
    from distributed import Client

__all__ = ["predict", "predict_files", "PredictReport"]

Transform = Callable[[pd.DataFrame], pd.DataFrame]

# --------------------------------------------------------------------- worker cache
_CACHE_SIZE = 4
_CACHE: LRUCache[tuple[str, bool], Bundle] = LRUCache(_CACHE_SIZE)
_CACHE_LOCK = threading.Lock()  # one load at a time: a second task waits for the first's model
_LOADS: dict[str, int] = {}  # content hash -> times loaded in this process


def cached_bundle(key: str, bundle_data: bytes, safe_mode: bool, transform: Transform | None) -> Bundle:
    """The Bundle with content hash ``key``, loaded from ``bundle_data`` at most once per process."""
    with _CACHE_LOCK:
        bundle = _CACHE.get((key, safe_mode))
        if bundle is None:
            bundle = open_bundle(bundle_data, safe_mode=safe_mode, transform=transform)  # or a GroupBundle
            if bundle.content_hash != key:
                raise BundleError(f"Expected bundle bytes with hash {key[:12]}. Received: {bundle.content_hash[:12]}")
            _CACHE.put((key, safe_mode), bundle)
            _LOADS[key] = _LOADS.get(key, 0) + 1
        if transform is not None:
            bundle.preprocessor.transform_fn = transform
        return bundle


def cache_info() -> dict[str, Any]:
    """The bundles cached in this process and how often each was loaded (for tests, debugging)."""
    return {"cached": [key for key, _ in _CACHE.keys()], "loads": dict(_LOADS)}


# --------------------------------------------------------------------- the bundle
@dataclass
class _BundleRef:
    """What a task needs to find the bundle on a worker (small; the bytes travel apart)."""

    key: str
    safe_mode: bool
    transform: Transform | None


def _as_bundle(
    bundle_or_model: Any, preprocessor: Preprocessor | None, storage_options: dict[str, Any] | None
) -> tuple[Bundle, Transform | None]:
    """(a lazily-loaded Bundle, a transform that workers must be given, if any)."""
    if isinstance(bundle_or_model, Bundle):
        if preprocessor is not None:
            raise ValueError("Expected preprocessor=None with a Bundle (it holds its own). Received a preprocessor.")
        fn = bundle_or_model.preprocessor.transform_fn
        # a transform that is not importable by name must travel with the tasks
        return bundle_or_model, (fn if fn is not None and _needs_shipping(bundle_or_model) else None)
    if isinstance(bundle_or_model, (str, os.PathLike)):
        if preprocessor is not None:
            raise ValueError("Expected preprocessor=None with a bundle URL (it holds its own). Received a preprocessor.")
        url = os.fspath(bundle_or_model)
        return open_bundle(read_bundle_bytes(url, storage_options), lazy=True, where=url), None
    if hasattr(bundle_or_model, "__call__") and hasattr(bundle_or_model, "get_weights"):
        if preprocessor is None:
            raise ValueError(
                "Expected preprocessor= with a Keras model: predict(model, ddf, preprocessor=pre). "
                "Received: preprocessor=None."
            )
        bundle = _live_bundle(bundle_or_model, preprocessor)
        fn = preprocessor.transform_fn
        return bundle, (fn if fn is not None and _needs_shipping(bundle) else None)
    raise TypeError(
        "Expected a Bundle, a bundle URL or a Keras model. "
        f"Received: {type(bundle_or_model).__name__}"
    )


_LIVE: LRUCache[int, tuple[Any, str, Bundle]] = LRUCache(_CACHE_SIZE)  # id(model) -> (weakref, fingerprint, bundle)


def _live_bundle(model: Any, preprocessor: Preprocessor) -> Bundle:
    """The bundle of a live Keras model, made again only when the model or the preprocessor
    changed: repeated ``predict(model, ...)`` calls ship the same bytes, so workers keep the
    model they loaded instead of loading a new copy per call."""
    import hashlib
    import weakref

    h = hashlib.sha256()
    h.update(model.to_json().encode("utf-8"))
    h.update(preprocessor.to_json().encode("utf-8"))
    for w in model.get_weights():
        w = np.ascontiguousarray(w)
        h.update(str((w.dtype.str, w.shape)).encode("ascii"))
        h.update(memoryview(w).cast("B"))
    fingerprint = h.hexdigest()
    held = _LIVE.get(id(model))
    if held is not None and held[0]() is model and held[1] == fingerprint:
        bundle = held[2]
        bundle.preprocessor.transform_fn = preprocessor.transform_fn
        return bundle
    # the model is the user's own live object, not a file of unknown origin
    bundle = Bundle(bundle_bytes(model, preprocessor), safe_mode=False, transform=preprocessor.transform_fn, lazy=True)
    _LIVE.pop(id(model))  # another model that had the same id, now gone
    _LIVE.put(id(model), (weakref.ref(model), fingerprint, bundle))
    return bundle


def _needs_shipping(bundle: Bundle) -> bool:
    info = bundle.preprocessor.to_dict().get("transform") or {}
    return info.get("ref") is None


def _bundle_bytes(data: bytes) -> bytes:
    """The task whose result is the bundle's bytes (see :func:`_place_bytes`)."""
    return data


def _place_bytes(bundle: Bundle, client: "Client | None") -> Any:
    """The bundle bytes as a task argument: on a cluster, the future of a task that
    returns them, keyed by their content hash; else the bytes.

    Not ``client.scatter(..., broadcast=True)``: its replication can loop for ever when
    a worker is slow or goes away while it runs (dask/distributed#4907, #5704; a
    ``predict_files`` hung for 15 minutes in it). A task's result reaches the workers
    that need it through the ordinary transfer of a dependency, each worker keeps its
    copy while its tasks run (and loads the model once, :func:`cached_bundle`), and the
    scheduler, which holds the task, computes it again if the worker holding the
    result dies. Submitting does not wait for anything.
    """
    if client is None:
        return bundle.to_bytes()
    import dask.config
    from dask.utils import parse_bytes

    data = bundle.to_bytes()
    # the bytes travel once, in this one task, which is what the large-graph warning asks for
    limit = max(parse_bytes(dask.config.get("distributed.admin.large-graph-warning-threshold")), len(data) + 2**20)
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": limit}):
        return client.submit(_bundle_bytes, data, key=f"daskml-bundle-{bundle.content_hash}", pure=False)


# --------------------------------------------------------------------- frames
def _keep_columns(keep: None | str | Sequence[str], columns: Sequence[str], outputs: Sequence[str]) -> list[str]:
    if keep is None:
        cols: list[str] = []
    elif keep == "all":
        cols = [c for c in columns if c not in (PATH_COLUMN, LINE_COLUMN)]
    elif isinstance(keep, str):
        cols = [keep]
    else:
        cols = list(keep)
    missing = [c for c in cols if c not in columns]
    if missing:
        raise DataError(
            f"Expected keep= to name input columns. Received: {missing} not in the input columns {list(columns)}",
            column=missing[0],
        )
    clash = [c for c in cols if c in outputs]
    if clash:
        raise ValueError(
            f"The kept columns {clash} have the names of prediction columns {list(outputs)}; "
            "rename them in the input or leave them out of keep="
        )
    return cols


def _assemble(df: pd.DataFrame, keep: list[str], pred: pd.DataFrame) -> pd.DataFrame:
    """Kept columns then prediction columns, positionally (duplicate index labels are fine)."""
    out = df[keep].copy() if keep else pd.DataFrame(index=df.index)
    for col in pred.columns:
        out[col] = pred[col].to_numpy() if isinstance(pred[col].dtype, np.dtype) else pred[col].array
    return out


def _predict_rows(
    df: pd.DataFrame, bundle: Bundle, on_dropped: str, batch_size: int | None
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(input rows, their predictions, rows the transform dropped) under the ``on_dropped``
    policy (:mod:`daskml_scale.dropped_rows`)."""
    pred, rows = bundle.predict_kept(df, batch_size=batch_size)
    return (*apply_on_dropped(df, pred, rows, on_dropped), 0 if rows is None else len(df) - len(rows))


def _predict_partition(
    df: pd.DataFrame, bundle_data: bytes, source: _BundleRef, keep: list[str], batch_size: int | None,
    on_dropped: str,
) -> pd.DataFrame:
    bundle = cached_bundle(source.key, bundle_data, source.safe_mode, source.transform)
    # an error about a row names its file and line (the rows are read again only then)
    rows, pred, _ = name_rows(_predict_rows, df, bundle, on_dropped, batch_size)
    return _assemble(rows, keep, pred)


def _predict_block(block: Any, bundle_data: bytes, source: _BundleRef, batch_size: int | None) -> Any:
    bundle = cached_bundle(source.key, bundle_data, source.safe_mode, source.transform)
    return bundle.predict_array(np.ascontiguousarray(block, dtype=np.float32), batch_size=batch_size)


def _features_preprocessor(width: int) -> Preprocessor:
    """A stand-in preprocessor for a model given feature arrays (its stats are never used)."""
    names = [f"x{j}" for j in range(width)]
    return Preprocessor(numeric=names).fit(pd.DataFrame(np.zeros((2, width)), columns=names))


def _predict_array(bundle_or_model: Any, X: Any, batch_size: int | None, preprocessor: Any, storage_options: Any) -> Any:
    """Model outputs for a Dask array of features: a Dask array ``(rows, width)``, float32."""
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D Dask array of features (rows, features). Received: shape {X.shape}")
    if preprocessor is not None:
        raise ValueError(
            "Expected preprocessor=None with a Dask array: the array holds features, already transformed. "
            "Received a preprocessor; pass a Dask DataFrame of raw rows to use it."
        )
    if hasattr(bundle_or_model, "__call__") and hasattr(bundle_or_model, "get_weights"):
        width = bundle_or_model.inputs[0].shape[-1] if getattr(bundle_or_model, "inputs", None) else X.shape[1]
        bundle_or_model = _live_bundle(bundle_or_model, _features_preprocessor(int(width)))
    bundle, _ = _as_bundle(bundle_or_model, None, storage_options)
    from daskml_scale.groups.bundle import GroupBundle

    if isinstance(bundle, GroupBundle):
        raise ArgumentError(
            f"Expected a Dask DataFrame with the group column(s) {bundle.by} for a group bundle: each row goes to "
            f"its group's model, and a Dask array of features has no group column. Received: a Dask array of shape "
            f"{X.shape}; pass the raw rows as a Dask DataFrame (predict(bundle, ddf))"
        )
    n_features = len(bundle.feature_names)
    if X.shape[1] != n_features:
        raise ValueError(f"Expected {n_features} feature columns, the model's input. Received: an array of shape {X.shape}")
    if len(X.chunks[1]) > 1:
        X = X.rechunk({1: -1})
    source = _BundleRef(bundle.content_hash, bundle._safe_mode, None)
    bundle_data = _place_bytes(bundle, default_client())
    width = int(bundle.metadata.get("output_width") or len(bundle.output_names))
    return X.map_blocks(
        _predict_block, bundle_data, source, batch_size,
        chunks=(X.chunks[0], (width,)), dtype=np.float32, meta=np.empty((0, width), dtype=np.float32),
        token="daskml-predict",  # keys from the inputs and the bundle's content
    )


def predict(
    bundle_or_model: Any,
    ddf: Any,
    *,
    keep: None | str | Sequence[str] = None,
    batch_size: int | None = None,
    preprocessor: Preprocessor | None = None,
    storage_options: dict[str, Any] | None = None,
    on_dropped: str | None = None,
) -> "dd.DataFrame | da.Array":
    """Predictions for every row of a Dask DataFrame (or Dask array of features), lazily.

    Parameters
    ----------
    bundle_or_model : Bundle, str or keras.Model
        A loaded bundle, a bundle URL, or a Keras model given with ``preprocessor=``
        (no preprocessor for a Dask array).
    ddf : dask.dataframe.DataFrame or dask.array.Array
        Raw input rows (the columns the preprocessor's transform expects); or a 2-D
        array of features, already transformed, for which the raw model outputs come
        back as a Dask array ``(rows, outputs)`` of float32, like ``model.predict``.
    keep : None, "all", str or list of str
        Input columns to keep before the prediction columns: none (default), all,
        or the named ones (e.g. an id column).
    batch_size : int, optional
        Rows per model call (``daskml_scale.predict.batch-size``).
    preprocessor : Preprocessor, optional
        Required with a Keras model; not allowed with a bundle.
    storage_options : dict, optional
        For a bundle URL.
    on_dropped : {"keep", "omit", "error"}, optional
        The rows the preprocessor's transform drops (matched to the input by index
        label within each partition): ``"keep"`` (default,
        ``daskml_scale.predict.on-dropped``) keeps them with empty predictions (NaN;
        integer and boolean outputs become pandas' nullable dtypes), ``"omit"``
        leaves them out, ``"error"`` fails the computation with a ``DataError``.

    Returns
    -------
    dask.dataframe.DataFrame
        Kept columns then ``bundle.output_names``, with ``ddf``'s index, divisions
        and row order (without the dropped rows under ``on_dropped="omit"``).

    Raises
    ------
    DataError
        ``keep`` names a column that is not in ``ddf``. When computed: the transform
        returned rows that cannot be matched to its input (a label twice, or not in
        the input), or dropped rows under ``on_dropped="error"``.
    ArgumentError
        ``on_dropped`` is not one of the three policies, or a group bundle was given
        a Dask array (its rows need their group column: pass a Dask DataFrame).
    BundleError, UnsafeBundleError
        The bundle cannot be loaded.

    Examples
    --------
    >>> bundle = load_bundle("s3://models/price.bundle")  # doctest: +SKIP
    >>> out = predict(bundle, read_csv("s3://data/*.csv"), keep="id")  # doctest: +SKIP
    >>> out.to_parquet("s3://predictions/")  # doctest: +SKIP
    >>> scores = predict(model, features)  # a dask array (rows, 27) -> (rows, 1)  # doctest: +SKIP
    """
    import dask.array as da  # noqa: F811  (the runtime import)

    if isinstance(ddf, da.Array):
        if keep is not None:
            raise ValueError("Expected keep=None with a Dask array: it has no columns to keep. Received: keep=%r" % (keep,))
        return _predict_array(bundle_or_model, ddf, batch_size, preprocessor, storage_options)
    policy = check_on_dropped(on_dropped)
    bundle, ship = _as_bundle(bundle_or_model, preprocessor, storage_options)
    if not isinstance(ddf, dd.DataFrame):
        raise TypeError(f"Expected a dask DataFrame. Received: {type(ddf).__name__}; use Bundle.predict_frame for pandas")
    keep_cols = _keep_columns(keep, list(ddf.columns), bundle.output_names)
    rows_meta, pred_meta = apply_on_dropped(ddf._meta, bundle.empty_frame(), None, policy)
    meta = _assemble(rows_meta, keep_cols, pred_meta)
    source = _BundleRef(bundle.content_hash, bundle._safe_mode, ship)
    bundle_data = _place_bytes(bundle, default_client())
    return ddf.map_partitions(
        _predict_partition, bundle_data, source, keep_cols, batch_size, policy,
        meta=meta, enforce_metadata=False, align_dataframes=False,
    )


# --------------------------------------------------------------------- files
def _read_input(reader: CsvReader, piece: FilePiece) -> pd.DataFrame:
    """One input file as pandas: a Parquet file whole, a CSV file through the plan's reader."""
    if is_parquet(piece.path):
        return read_parquet_file(reader.fs, piece.path)
    return reader(piece)


def _predict_file(
    bundle_data: bytes, source: _BundleRef, reader: CsvReader, piece: FilePiece, out_path: str, out_display: str,
    out_fs: fsspec.AbstractFileSystem, format: str, keep: None | str | list[str], batch_size: int | None,
    on_dropped: str,
) -> dict[str, Any]:
    """One input file -> one output file, written atomically. Errors are returned, not raised."""
    entry: dict[str, Any] = {"input": piece.display, "output": out_display, "rows": None, "dropped": None, "error": None}
    try:
        bundle = cached_bundle(source.key, bundle_data, source.safe_mode, source.transform)
        df = _read_input(reader, piece)
        keep_cols = _keep_columns(keep, list(df.columns), bundle.output_names)
        try:
            rows, pred, dropped = _predict_rows(df, bundle, on_dropped, batch_size)
        except DataError:
            # read without provenance columns (faster); on a bad value, read again with
            # them so that the error names the file and line
            _predict_rows(_read_input(reader.with_provenance(), piece), bundle, on_dropped, batch_size)
            raise
        out = _assemble(rows, keep_cols, pred)
        if format == "csv" and out.shape[1] == 1 and dropped and on_dropped == "keep":
            # one column with empty cells: pyarrow's writer makes them blank lines, which CSV
            # readers skip (the rows would no longer line up); pandas' writes them as ""
            write_bytes_atomic(out_path, out.to_csv(index=False).encode("utf-8"), fs=out_fs)
        else:
            write_frame_atomic(out, out_path, format=format, fs=out_fs)
        entry["rows"], entry["dropped"] = int(len(rows)), int(dropped)
    except Exception as exc:  # noqa: BLE001  (every failure is this file's report entry)
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


def predict_files(
    bundle: Any,
    input_urlpath: str | Sequence[str],
    output_dir: str,
    *,
    format: str = "csv",
    keep: None | str | Sequence[str] = None,
    storage_options: dict[str, Any] | None = None,
    on_bad_rows: str | None = None,
    client: "Client | None" = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    output_storage_options: dict[str, Any] | None = None,
    on_dropped: str | None = None,
) -> PredictReport:
    """Predict file by file: one output file per input file, atomic and resumable.

    Parameters
    ----------
    bundle : Bundle or str
        A loaded bundle or a bundle URL.
    input_urlpath : str or list of str
        CSV (or Parquet) files: a file, glob, directory or list, local or fsspec URL.
    output_dir : str
        Folder (local or fsspec URL) for the outputs. ``in/a/1.csv`` becomes
        ``output_dir/a/1.<format>``, relative to the inputs' common folder.
    format : {"csv", "parquet"}
    keep : None, "all", str or list of str
        Input columns written before the predictions (e.g. ``"id"``).
    storage_options : dict, optional
        fsspec options for the inputs and the bundle (and the outputs, unless
        ``output_storage_options`` is given).
    on_bad_rows : {"error", "skip"}, optional
        ``"error"`` (default, ``daskml_scale.io.on-bad-rows``): a file with a
        malformed row fails, is reported with its file and line, and others go on;
        ``"skip"``: malformed rows are dropped (see :func:`bad_rows_report`).
    client : distributed.Client, optional
        Defaults to the current client.
    overwrite : bool
        Redo every file. By default an existing output is complete (outputs appear
        only whole, by atomic rename or single put) and is skipped.
    batch_size : int, optional
        Rows per model call.
    on_dropped : {"keep", "omit", "error"}, optional
        The rows the preprocessor's transform drops (matched to the file's rows by
        index label): ``"keep"`` (default, ``daskml_scale.predict.on-dropped``)
        writes every input row, with empty prediction cells for those; ``"omit"``
        leaves them out; both count them in the report. ``"error"``: the file fails.

    Returns
    -------
    PredictReport
        Files done (with row counts and dropped rows), skipped and failed (with
        their errors). When no file finishes within ``daskml_scale.predict.wait-timeout``
        seconds of the previous one, the files left fail with a ``ClusterTimeoutError``
        naming the workers that run them; the outputs written are complete and a
        rerun does the rest.

    Raises
    ------
    DataError
        No input file matches.
    ClusterError
        No client is available.
    ArgumentError
        ``format``, ``on_bad_rows`` or ``on_dropped`` is not one of its values.

    Examples
    --------
    >>> report = predict_files("model.bundle", "s3://in/*.csv", "s3://out/", keep="id")  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    """
    from daskml_scale.exceptions import ClusterError

    check_format(format)
    on_bad_rows = check_on_bad_rows(on_bad_rows)
    on_dropped = check_on_dropped(on_dropped)
    client = default_client(client)
    if client is None:
        raise ClusterError("predict_files needs a Dask client: call daskml_scale.connect() first or pass client=")
    b, ship = _as_bundle(bundle, None, storage_options)
    keep_arg = None if keep is None else (keep if isinstance(keep, str) else list(keep))

    fs, paths = expand_paths(input_urlpath, storage_options, suffixes=INPUT_SUFFIXES)
    out_fs, out_root = fsspec.core.url_to_fs(output_dir, **(output_storage_options or storage_options or {}))
    outs = output_paths(paths, out_root, format)
    out_display = [display_name(out_fs, o) for o in outs]

    report = PredictReport(on_dropped=on_dropped)
    todo: list[int] = []
    existing = files_under(out_fs, out_root) if not overwrite else set()

    def blank(i: int, error: str | None = None) -> dict[str, Any]:
        return {"input": display_name(fs, paths[i]), "output": out_display[i], "rows": None, "dropped": None, "error": error}

    for i, o in enumerate(outs):
        if not overwrite and o in existing:
            report.skipped.append(blank(i))
        else:
            todo.append(i)
    if not todo:
        return report

    # the schema comes from the whole input set (as read_csv infers it), whichever files are left to do
    # (a file whose first rows cannot be read is left out of the sample and fails alone)
    plan = plan_csv(
        [p for p in paths if not is_parquet(p)], fs=fs, blocksize=None, on_bad_rows=on_bad_rows, skip_unreadable=True
    )
    csv_pieces = {p.path: p for p in plan.pieces}
    pieces = {paths[i]: csv_pieces.get(paths[i]) or FilePiece.whole(fs, paths[i]) for i in todo}

    bundle_data = _place_bytes(b, client)
    source = _BundleRef(b.content_hash, b._safe_mode, ship)
    futures = {}
    for i in todo:
        fut = client.submit(
            _predict_file, bundle_data, source, plan.reader, pieces[paths[i]], outs[i], out_display[i], out_fs, format,
            keep_arg, batch_size, on_dropped, pure=False, key=f"daskml-predict-file-{i}-{os.urandom(4).hex()}",
        )
        futures[fut] = i
    results: dict[int, dict[str, Any]] = {}
    timeout = waits.wait_timeout()
    try:
        for fut in waits.completed(list(futures), timeout):
            i = futures[fut]
            try:
                results[i] = waits.result(fut, timeout=timeout, what="predict_files")
            except Exception as exc:  # noqa: BLE001  (e.g. KilledWorker after repeated worker loss)
                results[i] = blank(i, f"{type(exc).__name__}: {exc}")
    except queue.Empty:
        left: dict[Any, str] = {f: display_name(fs, paths[i]) for f, i in futures.items() if i not in results}
        if not isinstance(bundle_data, bytes) and not bundle_data.done():
            left[bundle_data] = "the bundle"
        err = waits.stalled_error(
            client, left, timeout, "predict_files: no file",
            "A worker may be stuck or unreachable: see its log, or restart it (client.restart()). If a file needs "
            "longer, raise daskml_scale.predict.wait-timeout. The outputs written are complete: a rerun does the rest.",
        )
        for i in futures.values():
            results.setdefault(i, blank(i, f"{type(err).__name__}: {err}"))
    for i in todo:
        entry = results[i]
        (report.failed if entry["error"] else report.done).append(entry)
    if is_local(out_fs):
        remove_stale_temps([outs[i] for i in todo])
    return report
