"""The ``daskml-scale`` command line: ``train``, ``predict``, ``info`` and ``serve``.

A thin shell over the public API (see ``docs/cli.md``): every command parses its
arguments, calls :func:`daskml_scale.connect`, :func:`daskml_scale.read_csv`,
:func:`daskml_scale.fit`, :func:`daskml_scale.save_bundle`,
:func:`daskml_scale.predict_files`, :func:`daskml_scale.load_bundle` or
:func:`daskml_scale.serve`, and reports. Exit codes: 0 on success, 1 when the work
failed (one line on stderr saying why), 2 for bad arguments, 130 when interrupted.
``--verbose`` adds the traceback.

Run it as ``daskml-scale ...`` or ``python -m daskml_scale ...``; call it in-process
as ``daskml_scale.cli.main([...])``, which returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Iterator, Sequence

from daskml_scale import _cli_args as _args
from daskml_scale._cli_checks import output_problem
from daskml_scale._cli_logs import quiet_logs, quiet_worker_logs
from daskml_scale._utils.jsonable import jsonable as _jsonable

__all__ = ["main", "build_parser", "parse_storage_options", "load_callable"]

PROG = "daskml-scale"

from daskml_scale._cli_text import (  # noqa: E402
    EPILOG_INFO,
    EPILOG_MAIN,
    EPILOG_PREDICT,
    EPILOG_SERVE,
    EPILOG_TRAIN,
    format_info,
)


class CLIError(Exception):
    """A problem with the command line's arguments, found after parsing (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# ----------------------------------------------------------------------------- helpers
def parse_storage_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=testing", "client_kwargs.endpoint_url=http://h:9000"]`` -> nested dict.

    Values are parsed as JSON when they can be (``anon=true`` -> ``True``,
    ``max_concurrency=8`` -> ``8``) and kept as text otherwise. Dotted keys nest.

    Raises
    ------
    CLIError
        An item is not ``KEY=VALUE``.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"Expected --storage-option KEY=VALUE. Received: {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        parts = [p for p in key.strip().split(".")]
        node = options
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CLIError(f"--storage-option {item!r}: {part!r} was already given a value")
            node = child
        node[parts[-1]] = value
    return options


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """A function from ``file.py:name`` or ``package.module:name``.

    A file's module is loaded without being registered in ``sys.modules``, so the
    function travels to the workers by value (cloudpickle) and is not stored in a
    bundle by a name that other processes could not import.

    Raises
    ------
    CLIError
        ``spec`` has no ``:name`` part.
    FileNotFoundError
        The file does not exist.
    ImportError, AttributeError
        The module or the name cannot be found.
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name or (len(source) == 1 and source.isalpha()):
        raise CLIError(f"Expected {what} as module.py:function or package.module:function. Received: {spec!r}")
    if source.endswith(".py") or os.sep in source or "/" in source:
        path = os.path.abspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no such file {source!r}")
        mod_name = f"_daskml_scale_cli_{os.path.splitext(os.path.basename(path))[0]}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise ImportError(f"{what}: cannot load {source!r} as Python")
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{what}: {source!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{what}: {spec!r} is not callable")
    return obj


def _is_parquet(url: str) -> bool:
    return url.rstrip("/").lower().endswith((".parquet", ".pq"))


def _read(url: str, storage_options: dict[str, Any], fmt: str) -> Any:
    from daskml_scale.io import read_csv, read_parquet

    if fmt == "parquet" or (fmt == "auto" and _is_parquet(url)):
        return read_parquet(url, storage_options=storage_options or None)
    return read_csv(url, storage_options=storage_options or None)


def _say(args: argparse.Namespace, message: str) -> None:
    """A progress line on stdout (stderr is kept for the one-line error)."""
    if not getattr(args, "quiet", False):
        print(message, flush=True)


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """A client on ``--scheduler``, or on a local cluster started for this command."""
    from daskml_scale.cluster import connect

    if args.scheduler:
        if args.workers is not None or args.threads_per_worker is not None:
            raise CLIError("Expected either --scheduler or --workers/--threads-per-worker (a local cluster), not both")
        _say(args, f"connecting to the scheduler at {args.scheduler} ...")
        client = connect(args.scheduler, timeout=args.timeout)
    else:
        _say(args, "starting a local Dask cluster ...")
        with warnings.catch_warnings():
            if not args.verbose:  # "Port 8787 is already in use": the dashboard line says where it is
                warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            client = connect(n_workers=args.workers, threads_per_worker=args.threads_per_worker)
    try:
        if not args.scheduler and not args.verbose:
            # the local workers write to this terminal: no task tracebacks before the one-line error
            client.register_plugin(quiet_worker_logs())
        workers = client.scheduler_info().get("workers", {})
        if args.scheduler and not workers:
            _say(args, "waiting for a worker to join ...")
            client.wait_for_workers(1, timeout=args.timeout)
            workers = client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        _say(args, f"cluster: {len(workers)} workers, {threads} threads; dashboard {client.dashboard_link}")
        yield client
    finally:
        client.close()


def _model_builder(spec: str, storage_options: dict[str, Any]) -> Callable[..., Any] | None:
    """Check ``--model`` before any pass over the data: the ``.keras`` file exists, or the
    build function can be imported (returned, for :func:`_load_model`)."""
    import fsspec

    if spec.lower().endswith(".keras"):
        fs, path = fsspec.core.url_to_fs(spec, **storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"--model: no such file {spec!r}")
        return None
    return load_callable(spec, "--model")


def _load_model(spec: str, pre: Any, storage_options: dict[str, Any], build: Callable[..., Any] | None = None) -> Any:
    """A compiled Keras model from ``FILE.keras`` (any fsspec URL) or ``module.py:build_fn``:
    ``build_fn(n_features)``, or ``build_fn(preprocessor)`` (its parameter named so) for a
    model with named inputs (``--embed``; see :func:`daskml_scale.model_inputs`)."""
    import fsspec
    import keras

    if spec.lower().endswith(".keras"):
        fs, path = fsspec.core.url_to_fs(spec, **storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"--model: no such file {spec!r}")
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.keras")
            fs.get(path, local)
            model = keras.saving.load_model(local)
        if getattr(model, "optimizer", None) is None:
            raise CLIError(f"--model {spec}: the model was saved without compile(); compile it before model.save()")
        return model
    build = build or load_callable(spec, "--model")
    import inspect

    takes_pre = "preprocessor" in inspect.signature(build).parameters
    model = build(preprocessor=pre) if takes_pre else build(pre.n_features_)
    if not hasattr(model, "get_weights"):
        raise CLIError(f"--model {spec}: expected build_fn(n_features) to return a keras.Model. Received: {type(model).__name__}")
    return model


def _strategy(args: argparse.Namespace) -> Any:
    from daskml_scale.training import AllReduce, Gossip, ModelAveraging, ParameterServer

    if args.strategy is None:  # settings of one strategy name it; none: fit()'s default
        if args.every is not None:
            args.strategy = "allreduce"
        elif args.sync_every is not None or args.outer_lr != "1.0" or args.max_staleness is not None:
            args.strategy = "averaging"  # as before the default changed: --max-staleness is refused there
        elif args.push_every is not None:
            raise CLIError("--push-every applies to --strategy ps-sync/ps-async only")
        else:
            return None
    if args.strategy != "averaging" and args.outer_lr != "1.0":
        raise CLIError("--outer-lr applies to --strategy averaging only")
    if args.strategy in ("allreduce", "gossip"):
        if args.max_staleness is not None or args.push_every is not None:
            raise CLIError("--max-staleness and --push-every apply to --strategy ps-sync/ps-async only")
        return AllReduce(every=args.every or 1) if args.strategy == "allreduce" else Gossip(every=args.every or 16)
    if args.every is not None:
        raise CLIError("--every applies to --strategy allreduce or gossip only")
    if args.strategy == "averaging":
        if args.max_staleness is not None:
            raise CLIError("--max-staleness applies to --strategy ps-async only")
        outer_lr: Any = args.outer_lr
        if outer_lr != "workers":
            try:
                outer_lr = float(outer_lr)
            except ValueError:
                raise CLIError(f"Expected --outer-lr to be a number or 'workers'. Received: {args.outer_lr!r}") from None
        return ModelAveraging(sync_every=args.sync_every, outer_lr=outer_lr)
    push_every = args.push_every or args.sync_every or 1
    return ParameterServer(mode=args.strategy.split("-", 1)[1], push_every=push_every, max_staleness=args.max_staleness)


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    """``daskml-scale train``: read, fit the preprocessor, train, save the bundle."""
    from daskml_scale.bundle import save_bundle
    from daskml_scale.outputs import check_model
    from daskml_scale.training import default_strategy
    from daskml_scale.training import fit

    so = args.storage_options
    if not args.numeric and not args.categorical and not args.embed:
        raise CLIError("Expected feature columns: give --numeric, --categorical and/or --embed column names")
    if args.validation and args.validation_fraction:
        raise CLIError("Expected --validation URL or --validation-fraction F, not both")
    if args.resume and not args.checkpoint:
        raise CLIError("--resume needs --checkpoint URL (where the last run wrote its checkpoints)")
    strategy = _strategy(args)
    transform = load_callable(args.transform, "--transform") if args.transform else None
    # reading plans the partitions and infers the schema here, before any cluster starts
    data = _read(args.data, so, args.data_format)
    validation = _read(args.validation, so, args.data_format) if args.validation else None
    # the model and where the results go are checked before the pass over the data
    build = _model_builder(args.model, so)
    for what, url, folder in (("--out", args.out, False), ("--checkpoint", args.checkpoint, True)):
        problem = output_problem(url, so, folder=folder) if url else None
        if problem:
            raise CLIError(f"{what} {url}: {problem}")
    pre = _args.preprocessor_from(args, transform)
    with _cluster(args) as client:
        t0 = time.perf_counter()
        _say(args, f"fitting the preprocessor on {args.data} ({data.npartitions} partitions, one pass) ...")
        pre.fit(data, client=client)
        task = pre.task_ if pre.classes_ is None else f"{pre.task_} of {pre.classes_}"
        _say(args, f"  {pre.n_samples_:,} rows -> {pre.n_features_} features; {task}")
        if pre.dropped_missing_target_:
            _say(args, f"  {pre.dropped_missing_target_:,} rows without a target {args.target!r} dropped "
                       "(--missing-target drop)")
        model = _load_model(args.model, pre, so, build)
        check_model(model, pre)  # the model's outputs fit the task, before training
        if args.group_by:  # one model per group (daskml_scale.groups): fit_groups and a group bundle
            from daskml_scale.groups.command import train_groups

            return train_groups(args, data, pre, client, lambda n: _load_model(args.model, pre, so, build),
                                lambda m: _say(args, m))
        described = (strategy or default_strategy()).describe()
        _say(args, "training: " + ", ".join(f"{k} {v}" for k, v in described.items()) + f", {args.epochs} epochs ...")
        history = fit(
            model, data, preprocessor=pre, strategy=strategy, epochs=args.epochs, batch_size=args.batch_size,
            validation_data=validation, validation_fraction=args.validation_fraction, checkpoint=args.checkpoint,
            resume=args.resume, client=client, seed=args.seed, verbose=0 if args.quiet else 1,
            storage_options=so or None,
        )
        summary = _jsonable({**history.daskml_summary, "history": history.history})
        save_bundle(model, pre, args.out, storage_options=so or None, training_summary=summary)
        final = summary.get("final", {})
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, (int, float)))
        _say(args, f"trained {summary.get('epochs_run')} epochs in {time.perf_counter() - t0:.1f}s: {metrics}")
        if summary.get("dropped_missing_target"):
            _say(args, f"  {summary['dropped_missing_target']:,} training rows without a target left out")
        _say(args, f"bundle written to {args.out}")
        if transform is not None and (pre.to_dict().get("transform") or {}).get("ref") is None:
            _say(args, f"note: the transform {args.transform} is not importable by name; pass --transform "
                       f"{args.transform} to predict and serve as well")
    return 0


def _load_bundle(args: argparse.Namespace, url: str | None = None) -> Any:
    from daskml_scale.bundle import load_bundle

    url = args.bundle if url is None else url
    transform = load_callable(args.transform, "--transform") if args.transform else None
    bundle = load_bundle(url, storage_options=args.storage_options or None, transform=transform,
                         safe_mode=not args.unsafe)
    described = bundle.preprocessor.to_dict().get("transform") or {}
    if transform is None and described.get("name") and not described.get("ref"):
        raise CLIError(
            f"The bundle {url} was trained with the transform {described['name']!r}, which it cannot "
            "import by name: pass it with --transform module.py:function"
        )
    return bundle


def cmd_predict(args: argparse.Namespace) -> int:
    """``daskml-scale predict``: predict_files, then the per-file report."""
    from daskml_scale.predict import predict_files

    keep: Any = None
    if args.keep:
        cols = [c.strip() for c in args.keep.split(",") if c.strip()]
        keep = "all" if cols == ["all"] else cols
    bundle = _load_bundle(args)  # a missing or corrupt bundle fails before a cluster starts
    with _cluster(args) as client:
        t0 = time.perf_counter()
        _say(args, f"predicting {args.input} -> {args.output} ({args.format}) ...")
        report = predict_files(
            bundle, args.input, args.output, format=args.format, keep=keep,
            storage_options=args.storage_options or None, client=client, overwrite=args.overwrite,
            on_dropped=args.on_dropped,
        )
        took = time.perf_counter() - t0
    for status in ("done", "skipped", "failed"):
        entries = getattr(report, status)
        for e in entries[: args.max_lines]:
            detail = f"{e['rows']:,} rows" if status == "done" else (e["error"] if status == "failed" else "already there")
            if status == "done" and e.get("dropped"):
                detail += f", {e['dropped']:,} dropped by the transform"
            print(f"  {status:7s} {e['input']} -> {e['output']}  ({detail})")
        if len(entries) > args.max_lines:
            print(f"  ... and {len(entries) - args.max_lines} more {status}")
    dropped = ""
    if report.dropped:
        how = "written with empty predictions" if report.on_dropped == "keep" else "left out"
        dropped = f"; {report.dropped:,} rows dropped by the transform, {how}"
    print(
        f"{len(report.done)} done ({report.rows:,} rows{dropped}), {len(report.skipped)} skipped, "
        f"{len(report.failed)} failed in {took:.1f}s; outputs in {args.output}"
    )
    if report.failed:
        first = report.failed[0]
        print(f"{PROG} predict: {len(report.failed)} file(s) failed, first {first['input']}: {first['error']}",
              file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``daskml-scale info``: what a bundle holds (no cluster needed)."""
    bundle = _load_bundle(args)
    info = bundle.info()
    if args.json:
        print(json.dumps(_jsonable(info), indent=2, default=str))
    else:
        print(format_info(args.bundle, info))
        from daskml_scale.groups.command import describe as describe_groups

        for line in describe_groups(info):  # a group bundle: its groups
            print(line)
    if args.plot:
        from daskml_scale.plots import plot_history

        plot_history(bundle, title=args.bundle, path=args.plot, storage_options=args.storage_options or None)
        if not args.json:
            _say(args, f"wrote the training curves to {args.plot}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``daskml-scale serve`` (also ``python -m daskml_scale.serving``): the REST server,
    blocks until stopped."""
    from daskml_scale.serving import serve

    # each bundle loads here, so that a bad one fails in one line rather than in the server's
    # background; each keeps its URL (Bundle.source), which SIGHUP and the repository endpoint reload
    sources = _serve_sources(args)
    bundles = {name: _load_bundle(args, url) for name, url in sources.items()}
    scheduler = args.scheduler
    with contextlib.ExitStack() as stack:
        if scheduler is None and args.workers is not None:
            client = stack.enter_context(_cluster(args))
            scheduler = client.scheduler.address
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise CLIError("--ssl-certfile and --ssl-keyfile go together: give both, or neither")
        scheme = "https" if args.ssl_certfile else "http"
        names = ", ".join(f"{n}={u}" for n, u in sources.items()) if len(sources) > 1 else next(iter(sources.values()))
        _say(args, f"serving {names} on {scheme}://{args.host}:{args.port} (POST /predict, GET /info); "
                   f"SIGHUP reloads, Ctrl-C stops")
        serve(
            bundles, host=args.host, transform=load_callable(args.transform, "--transform") if args.transform else None, port=args.port, scheduler=scheduler,
            storage_options=args.storage_options or None,
            log_level=args.log_level or ("info" if args.verbose else "warning"),
            max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms,
            micro_batching=not args.no_micro_batching, max_body_bytes=args.max_body_bytes,
            numpy_forward=False if args.no_numpy_forward else None,
            id_column=args.id_column, tf_threads=args.tf_threads, freeze_gc=not args.no_gc_freeze,
            on_dropped=args.on_dropped, safe_mode=not args.unsafe, max_queue_rows=args.max_queue_rows,
            token_file=args.token_file, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
            jobs_allow_read=args.jobs_allow_read or None, jobs_allow_write=args.jobs_allow_write or None,
        )
    return 0


def _serve_sources(args: argparse.Namespace) -> dict[str, str]:
    """``serve``'s positional arguments -> {model name: bundle URL}, in order.

    ``NAME=URL`` names a model; a bare URL is named after its file (``price.bundle`` ->
    ``price``); a folder stands for each ``*.bundle`` file in it.
    """
    from daskml_scale.serving.models import sources_of

    out: dict[str, str] = {}
    for item in args.bundle:
        m = re.match(r"^([A-Za-z0-9_.-]+)=(.+)$", item)
        name, url = (m.group(1), m.group(2)) if m else (None, item)
        try:
            found = sources_of(url, name, args.storage_options or None)
        except FileNotFoundError as exc:
            raise CLIError(f"{PROG} serve: {exc}") from None
        if name is not None and len(found) > 1:
            raise CLIError(f"{PROG} serve: {item}: a folder holds several bundles; name them one by one "
                           "(NAME=FOLDER/FILE.bundle), or give the folder without a name")
        for n, u in found.items():
            if n in out:
                raise CLIError(f"{PROG} serve: two models named {n!r} ({out[n]} and {u}): name them with NAME=URL")
            out[n] = str(u)
    return out


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``daskml-scale`` (one sub-parser per command)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG, formatter_class=fmt, epilog=EPILOG_MAIN,
        description="Train and serve pandas + Keras models at scale on Dask: train, predict, info, serve.",
    )
    from daskml_scale._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a Keras model data-parallel and save a bundle", formatter_class=fmt,
                       epilog=EPILOG_TRAIN, description="Read data, fit a Preprocessor in one pass, train the model "
                       "data-parallel on the cluster and save model + preprocessor as one bundle file.")
    _args.add_train(t)
    from daskml_scale.groups.command import add_arguments as add_group_arguments

    add_group_arguments(t)  # --group-by COL ...: one model per group
    _args.add_common(t)
    t.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict file by file (atomic, resumable)", formatter_class=fmt,
                       epilog=EPILOG_PREDICT, description="Map a bundle over input files on the cluster: "
                       "one output file per input file.")
    _args.add_predict(p)
    _args.add_common(p)
    p.set_defaults(func=cmd_predict)

    i = sub.add_parser("info", help="show a bundle's features, schema, training summary and metrics",
                       formatter_class=fmt, epilog=EPILOG_INFO)
    _args.add_info(i)
    _args.add_common(i, cluster=False)
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="serve a bundle over REST", formatter_class=fmt, epilog=EPILOG_SERVE)
    _args.add_serve(s)
    _args.add_common(s)
    s.set_defaults(func=cmd_serve)

    from daskml_scale import _cli_search

    q = sub.add_parser("search", help="search hyperparameters: many trials at once, the best as a bundle",
                       formatter_class=fmt, epilog=_cli_search.EPILOG_SEARCH, description="Run Optuna's search "
                       "over build_model's parameters on the cluster; write the trials CSV and the best bundle.")
    _cli_search.add_search(q)
    _args.add_common(q)
    q.set_defaults(func=_cli_search.cmd_search)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError) and not hasattr(exc, "path") and text.startswith("'"):
        text = text.strip("'")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.storage_options = parse_storage_options(args.storage_option)
        with quiet_logs(not args.verbose):
            return int(args.func(args))
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except CLIError as exc:
        if verbose:
            traceback.print_exc()
        msg = _one_line(exc)
        print(msg if msg.startswith(PROG) else f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (every failure is one line, the traceback on --verbose)
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
