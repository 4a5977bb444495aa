"""Hyperparameter search on the cluster: :func:`search`.

Many trials at once, one per worker thread, on data prepared once and kept on the
workers; Optuna's samplers and pruners through its ask-and-tell interface; a Keras
Tuner ``build_model(hp)`` unchanged. ``docs/search.md`` has the guide.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from daskml_scale import config
from daskml_scale._utils.client import default_client
from daskml_scale.exceptions import ArgumentError
from daskml_scale.search.result import SearchResult
from daskml_scale.search.space import HyperParameters, parse_space
from daskml_scale.search.study import ALGORITHMS, direction_for

__all__ = ["search", "SearchResult", "HyperParameters"]


def _optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("daskml_scale.search needs optuna: pip install 'daskml_scale[tune]'") from exc


def search(
    build_model: Callable[..., Any],
    data: Any,
    *,
    preprocessor: Any,
    space: Any = None,
    trials: int = 10,
    epochs: int = 5,
    objective: str = "val_loss",
    direction: str | None = None,
    algorithm: Any = "random",
    pruner: Any = None,
    max_concurrent: int | None = None,
    validation_data: Any = None,
    validation_fraction: float | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    client: Any = None,
    storage: Any = None,
    study_name: str = "daskml_scale-search",
    verbose: Any = "auto",
    stack: bool = True,
) -> SearchResult:
    """Search hyperparameters of a Keras model: many trials at once on the Dask cluster.

    Parameters
    ----------
    build_model : callable
        ``build_model(hp)`` as for Keras Tuner (``hp.Int``, ``hp.Float(..., sampling="log")``,
        ``hp.Choice``, ``hp.Boolean``, ``hp.Fixed``), or ``build_model(params)`` taking a
        dict when ``space=`` is given. Returns a compiled Keras model. It may also take
        ``n_features=`` or ``preprocessor=`` (by those names). It runs on the workers:
        define it in a module, a script or a notebook; it travels by value.
    data : dask.dataframe.DataFrame or pandas.DataFrame
        Raw training rows. They are prepared once (``preprocessor``) and every worker keeps
        a copy of the prepared arrays: each trial trains on all of them, on one worker.
    preprocessor : Preprocessor
        Fitted on ``data`` first if it is not.
    space : dict, optional
        A dict space (``{"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "units": {"type": "int", "low": 16, "high": 128, "step": 16}, "act": ["relu", "tanh"],
        "batch_norm": {"type": "bool"}, "dropout": 0.1}``); see :func:`~daskml_scale.search.space.parse_space`.
        ``None``: the space is what ``build_model(hp)`` declares.
    trials : int
        Trials to run (counting those a resumed study already finished).
    epochs : int
        Epochs per trial (a pruned trial stops earlier).
    objective : str
        The metric to optimize: ``"val_loss"``, ``"val_<metric>"``, ``"loss"`` or ``"<metric>"`` as the
        model computes it; a trial's value is its best epoch's.
    direction : "minimize" or "maximize", optional
        Default: maximize accuracy-like metrics (accuracy, auc, precision, recall), minimize the others.
    algorithm : "random", "tpe", "hyperband" or an optuna sampler
        ``"hyperband"`` is TPE with Optuna's ``HyperbandPruner`` over 1..``epochs`` epochs.
    pruner : "median", "halving", "hyperband", "none" or an optuna pruner, optional
        Default: none, or Hyperband's for ``algorithm="hyperband"``.
    max_concurrent : int, optional
        Trials at once; default: the cluster's worker threads.
    validation_data : DataFrame, optional
        Rows to validate on after every epoch.
    validation_fraction : float, optional
        Hold out this fraction of ``data`` instead (default 0.1 when ``objective`` is a ``val_`` metric
        and no ``validation_data`` is given).
    seed : int, optional
        Seeds the sampler, the held-out split, each trial's initial weights and shuffles.
    batch_size : int, optional
        Default ``daskml_scale.training.batch-size``.
    client : distributed.Client, optional
    storage : str or optuna storage, optional
        Where the study lives: ``None`` (in memory), an Optuna storage URL (``"sqlite:///search.db"``), or an
        optuna storage object. A study found there under ``study_name`` is resumed: its finished trials
        count, and trials a stopped driver left running are run again.
    study_name : str
    verbose : "auto", bool
        The progress display (trials done, running, pruned, failed, best so far); ``"auto"``: in a terminal
        or a notebook.
    stack : bool
        Train trials whose models share an architecture shape (the same chain of Dense layers, loss and
        optimizer class; they may differ in learning rate and the optimizer's constants, dropout rates and
        L1/L2 penalties) together as one stacked program on a worker, each with its own optimizer state,
        objective and pruning (``docs/search.md``), when at least ``daskml_scale.search.stack-min-trials``
        (default 4) trials of a shape are asked together. ``.trials["pack"]`` says which pack a trial ran in;
        ``summary["stacking"]`` why the others trained alone. ``False``: every trial trains alone.

    Returns
    -------
    SearchResult
        ``.trials`` (a DataFrame), ``.best_params``, ``.best_model()``, ``.plot()``, ``.study``.

    Raises
    ------
    ArgumentError
        An empty space, an unknown algorithm or pruner, an objective the model does not compute,
        a build_model that fails with the default parameters.
    """
    from daskml_scale.search.driver import Search

    _optuna()
    if not callable(build_model):
        raise ArgumentError(f"Expected build_model to be a function. Received: {type(build_model).__name__}")
    if preprocessor is None or getattr(preprocessor, "target", None) is None:
        raise ArgumentError("Expected a Preprocessor with a target column (preprocessor=Preprocessor(target=...))")
    if isinstance(algorithm, str) and algorithm not in ALGORITHMS:
        raise ArgumentError(f"Expected algorithm to be one of {', '.join(repr(a) for a in ALGORITHMS)} or an optuna "
                            f"sampler. Received: algorithm={algorithm!r}")
    for name, value in (("trials", trials), ("epochs", epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ArgumentError(f"Expected {name} to be an integer >= 1. Received: {name}={value!r}")
    if not isinstance(stack, bool):
        raise ArgumentError(f"Expected stack=True or stack=False. Received: stack={stack!r}")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise ArgumentError(f"Expected max_concurrent >= 1 or None. Received: max_concurrent={max_concurrent!r}")
    if not isinstance(objective, str) or not objective:
        raise ArgumentError(f"Expected objective to be a metric name such as 'val_loss'. Received: {objective!r}")
    direction = direction or direction_for(objective)
    if direction not in ("minimize", "maximize"):
        raise ArgumentError(f"Expected direction='minimize' or 'maximize'. Received: direction={direction!r}")
    if validation_data is not None and validation_fraction:
        raise ArgumentError("Expected validation_data or validation_fraction, not both")
    if validation_fraction is None:
        validation_fraction = 0.1 if objective.startswith("val_") and validation_data is None else 0.0
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ArgumentError(f"Expected 0 <= validation_fraction < 1. Received: {validation_fraction}")
    params = parse_space(space) if space is not None else None
    client = default_client(client, purpose="search()")

    import dask.dataframe as dd

    if isinstance(data, pd.DataFrame):
        data = dd.from_pandas(data, npartitions=max(1, len(client.nthreads())))
    if isinstance(validation_data, pd.DataFrame):
        validation_data = dd.from_pandas(validation_data, npartitions=max(1, len(client.nthreads())))
    if not hasattr(preprocessor, "feature_names_"):
        preprocessor.fit(data, client=client)
    run = Search(
        client=client, build_model=build_model, style="dict" if params is not None else "hp", space=params,
        data=data, preprocessor=preprocessor, trials=trials, epochs=epochs, objective=objective, direction=direction,
        algorithm=algorithm, pruner=pruner, max_concurrent=max_concurrent, validation_data=validation_data,
        validation_fraction=float(validation_fraction), seed=int(seed if seed is not None else config.get("training.seed", 0)),
        storage=storage, study_name=study_name, batch_size=int(batch_size or config.get("training.batch-size", 256)),
        verbose=verbose, stack=stack,
    )
    return run.run()
