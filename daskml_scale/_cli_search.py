"""``daskml-scale search``: its arguments and its handler (the parser is in :mod:`daskml_scale.cli`).

Reads the data, fits the preprocessor, runs :func:`daskml_scale.search` on the cluster,
writes the trials CSV and the best trial's bundle (and a plot with ``--plot``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["add_search", "cmd_search", "read_space", "EPILOG_SEARCH"]

EPILOG_SEARCH = """\
the model (--model):
  module.py:build_model   build_model(hp) as for Keras Tuner (hp.Int, hp.Float(sampling="log"),
                          hp.Choice, hp.Boolean): the space is what it declares; or, with --space,
                          build_model(params) taking a dict. It may also take n_features= or
                          preprocessor= (by those names). It returns a compiled keras.Model.
the space (--space space.yaml), one entry per parameter:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  units: {type: int, low: 16, high: 128, step: 16}
  activation: [relu, tanh]          # a list: one of these
  batch_norm: {type: bool}
  dropout: 0.1                      # a plain value: fixed

examples:
  daskml-scale search --data 'data/train/*.csv' --target arr_delay \\
      --numeric dep_delay distance hour --categorical carrier origin \\
      --model model_def.py:build_model --space space.yaml --trials 32 --epochs 5 \\
      --algorithm hyperband --out best.bundle --trials-csv trials.csv --plot search.png
  # resumable: the study lives in the storage; run the same command again after a stop
  daskml-scale search ... --storage sqlite:///search.db --study-name flights-1
"""


def add_search(s: argparse.ArgumentParser) -> None:
    """``search``: data, model and space, the search, outputs."""
    from daskml_scale._cli_args import add_data

    d = add_data(s, embed=False)
    v = d.add_mutually_exclusive_group()
    v.add_argument("--validation", metavar="URL", help="validation rows, read like --data")
    v.add_argument("--validation-fraction", type=float, metavar="F",
                   help="hold out this fraction of --data instead (default 0.1)")
    m = s.add_argument_group("model and space")
    m.add_argument("--model", required=True, metavar="MODULE:FN", help="build_model(hp) or build_model(params)")
    m.add_argument("--space", metavar="YAML", help="a dict space (see below); without it, build_model(hp) declares it")
    g = s.add_argument_group("the search")
    g.add_argument("--trials", type=int, default=10, metavar="N", help="trials to run (default 10)")
    g.add_argument("--epochs", type=int, default=5, metavar="N", help="epochs per trial (default 5)")
    g.add_argument("--objective", default="val_loss", metavar="METRIC", help="what to optimize (default val_loss)")
    g.add_argument("--direction", choices=["minimize", "maximize"], help="default: from the metric's name")
    g.add_argument("--algorithm", choices=["random", "tpe", "hyperband"], default="random",
                   help="Optuna's random or TPE sampler; hyperband is TPE with Hyperband pruning (default random)")
    g.add_argument("--pruner", choices=["none", "median", "halving", "hyperband"], help="default: none, or hyperband's")
    g.add_argument("--max-concurrent", type=int, metavar="N", help="trials at once (default: the worker threads)")
    g.add_argument("--batch-size", type=int, metavar="B", help="rows per step (default 256)")
    g.add_argument("--seed", type=int, metavar="S", help="seed of the sampler, splits, initial weights and shuffles")
    g.add_argument("--storage", metavar="URL", help="Optuna storage (sqlite:///search.db): the study is kept there "
                   "and resumed by the same command")
    g.add_argument("--study-name", default="daskml_scale-search", metavar="NAME", help="the study's name in --storage")
    o = s.add_argument_group("outputs")
    o.add_argument("--out", required=True, metavar="BUNDLE_URL", help="where to write the best trial's bundle")
    o.add_argument("--trials-csv", metavar="URL", help="the trials table (default: --out + '.trials.csv')")
    o.add_argument("--plot", metavar="FILE.png", help="also draw the search (matplotlib)")


def read_space(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict space of a YAML file, each entry checked; an error names the file and the line.

    Raises
    ------
    ArgumentError
        The file is not YAML, not a mapping, empty, or an entry is malformed.
    """
    import fsspec
    import yaml

    from daskml_scale.exceptions import ArgumentError
    from daskml_scale.search.space import parse_entry, parse_space

    with fsspec.open(path, "r", **(storage_options or {})) as f:
        text = f.read()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise ArgumentError(f"--space {path}: not valid YAML at {where}: {exc.problem}") from None
    if data is None:
        raise ArgumentError(f"--space {path}: the file is empty; expected one entry per parameter")
    if not isinstance(data, dict) or node is None or not hasattr(node, "value"):
        raise ArgumentError(f"--space {path}: expected a mapping of parameter names to ranges. "
                            f"Received: {type(data).__name__}")
    lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    for name, spec in data.items():
        try:
            parse_entry(str(name), spec)
        except ArgumentError as exc:
            raise ArgumentError(f"--space {path}, line {lines.get(str(name), '?')}: {exc}") from None
    try:
        parse_space(data, source=f"--space {path}")
    except ArgumentError as exc:
        raise ArgumentError(str(exc)) from None
    return data


def cmd_search(args: argparse.Namespace) -> int:
    """``daskml-scale search``: read, fit the preprocessor, search, write the trials and the best bundle."""
    import fsspec

    from daskml_scale.bundle import save_bundle
    from daskml_scale.cli import CLIError, _cluster, _read, _say, load_callable
    from daskml_scale._cli_args import preprocessor_from
    from daskml_scale.search import search

    so = args.storage_options
    if not args.numeric and not args.categorical:
        raise CLIError("Expected feature columns: give --numeric and/or --categorical column names")
    for name in ("trials", "epochs"):
        if getattr(args, name) < 1:
            raise CLIError(f"Expected --{name} >= 1. Received: {getattr(args, name)}")
    build = load_callable(args.model, "--model")
    space = read_space(args.space, so) if args.space else None
    transform = load_callable(args.transform, "--transform") if args.transform else None
    data = _read(args.data, so, args.data_format)
    validation = _read(args.validation, so, args.data_format) if args.validation else None
    trials_csv = args.trials_csv or (args.out + ".trials.csv")
    pre = preprocessor_from(args, transform)
    with _cluster(args) as client:
        t0 = time.perf_counter()
        _say(args, f"fitting the preprocessor on {args.data} ({data.npartitions} partitions, one pass) ...")
        pre.fit(data, client=client)
        _say(args, f"  {pre.n_samples_:,} rows -> {pre.n_features_} features")
        _say(args, f"searching: {args.trials} trials x {args.epochs} epochs, {args.algorithm}, objective "
                   f"{args.objective}" + (f", study {args.study_name!r} at {args.storage}" if args.storage else ""))
        result = search(
            build, data, preprocessor=pre, space=space, trials=args.trials, epochs=args.epochs,
            objective=args.objective, direction=args.direction, algorithm=args.algorithm, pruner=args.pruner,
            max_concurrent=args.max_concurrent, validation_data=validation,
            validation_fraction=args.validation_fraction, seed=args.seed, batch_size=args.batch_size,
            client=client, storage=args.storage, study_name=args.study_name, verbose=0 if args.quiet else 1,
        )
        with fsspec.open(trials_csv, "w", **(so or {})) as f:
            result.trials.to_csv(f, index=False)
        _say(args, f"trials written to {trials_csv}")
        if args.plot:
            result.plot(args.plot)
            _say(args, f"plot written to {args.plot}")
        counts = result.trials["state"].value_counts().to_dict()
        states = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("complete", "pruned", "failed"))
        if result.best_trial is None:
            first = result.trials["error"].dropna()
            raise RuntimeError(f"no trial completed ({states}); first error: "
                               f"{first.iloc[0] if len(first) else 'none recorded'}")
        model = result.best_model()
        save_bundle(model, pre, args.out, storage_options=so or None,
                    training_summary={"search": {"best_trial": result.best_trial, "best_params": result.best_params,
                                                 args.objective: result.best_value, "trials": len(result.trials)}})
        _say(args, f"{len(result.trials)} trials ({states}) in {time.perf_counter() - t0:.1f}s; best {args.objective} "
                   f"{result.best_value:.5g} (trial {result.best_trial}, epoch {result.best_epoch}): {result.best_params}")
        _say(args, f"best bundle written to {args.out}")
    return 0
