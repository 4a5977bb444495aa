"""The arguments of each ``daskml-scale`` command (the parser itself is in :mod:`daskml_scale.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from daskml_scale.io.writers import FORMATS

__all__ = ["UNSAFE_HELP", "add_common", "add_data", "preprocessor_from", "add_train", "add_predict", "add_info", "add_serve"]

UNSAFE_HELP = "load a bundle that holds code (saved with code=, a Lambda layer): it runs that code; only for bundles you trust"


def add_common(p: argparse.ArgumentParser, cluster: bool = True) -> None:
    g = p.add_argument_group("cluster and storage")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running Dask scheduler (tcp://host:8786); default: start a local cluster"
                   + ("" if cluster else " (not needed by this command)"))
    g.add_argument("--workers", type=int, metavar="N", help="local cluster: worker processes (default: one per core)")
    g.add_argument("--threads-per-worker", type=int, metavar="N", help="local cluster: threads per worker (default 1)")
    g.add_argument("--timeout", default="30s", metavar="T", help="how long to wait for --scheduler (default 30s)")
    g.add_argument("--storage-option", action="append", dest="storage_option", metavar="KEY=VALUE", default=[],
                   help="fsspec option for every URL, repeatable; JSON values; dotted keys nest "
                   "(client_kwargs.endpoint_url=http://127.0.0.1:9000)")
    o = p.add_argument_group("output")
    o.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error, and more logs")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def add_data(p: argparse.ArgumentParser, *, embed: bool = True) -> argparse._ArgumentGroup:
    """The data arguments of ``train`` and ``search``: the files, the target, the feature
    columns (``--embed`` / ``--max-categories`` with ``embed``), the transform, rows
    without a target, the task. Returns the group (the callers add validation to it)."""
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="URL", help="training CSV/Parquet: file, glob, folder; local or s3://...")
    d.add_argument("--data-format", choices=["auto", "csv", "parquet"], default="auto",
                   help="input format (default: from the suffix, else CSV)")
    d.add_argument("--target", required=True, metavar="COL", help="the column to predict")
    d.add_argument("--numeric", nargs="+", metavar="COL", help="numeric feature columns (standardized)")
    d.add_argument("--categorical", nargs="+", metavar="COL", help="categorical feature columns (one-hot)")
    if embed:
        d.add_argument("--embed", nargs="+", metavar="COL", help="categorical columns as integer codes, one model "
                       "input each, for embeddings (the model function takes `preprocessor`)")
        d.add_argument("--max-categories", type=int, default=1000, metavar="N", help="categories kept per column (default 1000)")
    d.add_argument("--transform", metavar="MODULE:FN", help="pandas function applied to every partition first")
    d.add_argument("--missing-target", choices=["error", "drop"], default="error",
                   help="rows without a target: stop at the first, naming its file and line (default), "
                   "or drop them and count them")
    d.add_argument("--task", choices=["auto", "classification", "regression"], default="auto",
                   help="auto (default): text or a two-valued integer target (0/1) is a classification, "
                   "other numbers a regression")
    return d


def preprocessor_from(args: argparse.Namespace, transform: Any) -> Any:
    """The unfitted Preprocessor the data arguments describe."""
    from daskml_scale.preprocessing import Preprocessor

    categorical = list(args.categorical or ())
    embed = [c for c in (getattr(args, "embed", None) or ()) if c not in categorical]
    return Preprocessor(
        target=args.target, numeric=args.numeric or (), transform=transform, task=args.task,
        categorical=[*categorical, *embed], missing_target=args.missing_target,
        categorical_encoding={c: "int" for c in getattr(args, "embed", None) or ()},
        max_categories=getattr(args, "max_categories", 1000),
    )


def add_train(t: argparse.ArgumentParser) -> None:
    """``train``: data, validation, model and training."""
    d = add_data(t)
    v = d.add_mutually_exclusive_group()
    v.add_argument("--validation", metavar="URL", help="validation rows, read like --data")
    v.add_argument("--validation-fraction", type=float, metavar="F", help="hold out this fraction of --data instead")
    m = t.add_argument_group("model and training")
    m.add_argument("--model", required=True, metavar="FILE.keras|MODULE:FN",
                   help="a compiled .keras file, or build_fn(n_features) returning a compiled model")
    m.add_argument("--strategy", choices=["averaging", "allreduce", "gossip", "ps-sync", "ps-async"], default=None,
                   help="how workers combine: model averaging, all-reduce among the workers, gossip among "
                   "neighbours, or a parameter server, synchronous or asynchronous (default: fit()'s default strategy)")
    m.add_argument("--epochs", type=int, default=1, metavar="N", help="passes over the data (default 1)")
    m.add_argument("--batch-size", type=int, metavar="B", help="rows per step on each worker (default 256)")
    m.add_argument("--sync-every", type=int, metavar="K",
                   help="averaging: local steps between averages (default: once per epoch; 16 is a good start)")
    m.add_argument("--every", type=int, metavar="K",
                   help="allreduce: 1 reduces gradients every step (default), K > 1 averages weights every K steps; "
                   "gossip: local steps between exchanges with a neighbour (default 16)")
    m.add_argument("--push-every", type=int, metavar="K",
                   help="ps-*: batches per push (default 1; --sync-every is accepted as its old name)")
    m.add_argument("--max-staleness", type=int, metavar="V",
                   help="ps-async: refuse gradients computed on weights more than V versions old")
    m.add_argument("--outer-lr", default="1.0", metavar="LR|workers",
                   help="averaging: scale of each averaged step (default 1.0); 'workers' sums the workers' steps")
    m.add_argument("--seed", type=int, metavar="S", help="seed for shuffles and the held-out split")
    m.add_argument("--checkpoint", metavar="URL", help="write a checkpoint here after every epoch")
    m.add_argument("--resume", action="store_true", help="continue from the checkpoint at --checkpoint")
    m.add_argument("--out", required=True, metavar="BUNDLE_URL", help="where to write the bundle (local or s3://...)")


def add_predict(p: argparse.ArgumentParser) -> None:
    """``predict``: bundle, input, output."""
    p.add_argument("--bundle", required=True, metavar="URL", help="the bundle written by 'train'")
    p.add_argument("--input", required=True, metavar="URL", help="CSV/Parquet files: file, glob or folder")
    p.add_argument("--output", required=True, metavar="URL", help="output folder")
    p.add_argument("--format", choices=list(FORMATS), default="csv", help="output format (default csv)")
    p.add_argument("--keep", metavar="COLS", help="input columns to copy before the predictions, comma-separated, or 'all'")
    p.add_argument("--overwrite", action="store_true", help="redo files whose output already exists")
    p.add_argument("--on-dropped", choices=["keep", "omit", "error"], metavar="{keep,omit,error}",
                   help="rows the transform drops: keep them with empty predictions, omit them (both counted), "
                   "or fail the file (default: config predict.on-dropped, keep)")
    p.add_argument("--transform", metavar="MODULE:FN", help="the training transform, when the bundle cannot import it")
    p.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    p.add_argument("--max-lines", type=int, default=20, metavar="N", help="files listed per status (default 20)")


def add_info(i: argparse.ArgumentParser) -> None:
    """``info``."""
    i.add_argument("bundle", metavar="BUNDLE_URL")
    i.add_argument("--json", action="store_true", help="machine-readable JSON")
    i.add_argument("--transform", metavar="MODULE:FN", help="the training transform, when the bundle cannot import it")
    i.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    i.add_argument("--plot", metavar="OUT.png", help="also write the training curves from the bundle's summary "
                   "(.png, .svg or .pdf; local or s3://...; needs matplotlib)")


def add_serve(s: argparse.ArgumentParser) -> None:
    """``serve``."""
    s.add_argument("bundle", metavar="[NAME=]BUNDLE_URL", nargs="+",
                   help="a bundle, or a folder of *.bundle files; several as NAME=URL (the first is the default "
                   "model, at /predict). SIGHUP reloads each from its URL")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--transform", metavar="MODULE:FN", help="the training transform, when the bundle cannot import it")
    s.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    s.add_argument("--max-batch-rows", type=int, metavar="N", help="most rows in one coalesced model call (config serve.max-batch-rows)")
    s.add_argument("--max-wait-ms", type=float, metavar="MS", help="longest wait to fill a batch (config serve.max-wait-ms)")
    s.add_argument("--no-micro-batching", action="store_true", help="one model call per request")
    s.add_argument("--no-numpy-forward", action="store_true",
                   help="always call the Keras backend (default: a small Dense model answers through its NumPy form; "
                   "config serve.numpy-forward)")
    s.add_argument("--max-body-bytes", type=int, metavar="N", help="largest request body (config serve.max-body-bytes)")
    s.add_argument("--id-column", metavar="COL", help="column passed through next to the predictions")
    s.add_argument("--on-dropped", choices=["keep", "omit", "error"], metavar="{keep,omit,error}",
                   help="rows the transform drops: null predictions with the reason, left out, or a 422 "
                   "(default: config predict.on-dropped, keep)")
    s.add_argument("--max-queue-rows", type=int, metavar="N",
                   help="most rows waiting for the model; beyond, 503 with Retry-After at once (config serve.max-queue-rows)")
    s.add_argument("--token-file", metavar="FILE", help="bearer token every request but the health checks must carry "
                   "(or $DASKML_SCALE_SERVE_TOKEN; config serve.token-file)")
    s.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate (with --ssl-keyfile)")
    s.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    s.add_argument("--jobs-allow-read", action="append", metavar="URL_PREFIX",
                   help="POST /jobs may read under this prefix (repeatable; jobs also need a token and --jobs-allow-write)")
    s.add_argument("--jobs-allow-write", action="append", metavar="URL_PREFIX", help="POST /jobs may write under this prefix")
    s.add_argument("--tf-threads", type=int, metavar="N", help="TensorFlow threads in the server process")
    s.add_argument("--no-gc-freeze", action="store_true",
                   help="leave the garbage collector as it is (default: gc.freeze() after loading and a "
                        "youngest-generation threshold of 10,000)")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default warning, info with --verbose)")
