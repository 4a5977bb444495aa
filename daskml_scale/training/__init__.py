"""Data-parallel training of a compiled Keras model on Dask workers: :func:`fit`."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from daskml_scale import config
from daskml_scale._utils.client import default_client
from daskml_scale.exceptions import ArgumentError, DataError, MissingColumnError
from daskml_scale.features import attach_layout
from daskml_scale.training.allreduce import AllReduce
from daskml_scale.training.averaging import ModelAveraging
from daskml_scale.training.federated import Federated
from daskml_scale.training.gossip import Gossip
from daskml_scale.training.parameter_server import ParameterServer
from daskml_scale.training.runner import EpochRunner
from daskml_scale.training.strategy import Strategy

__all__ = ["fit", "default_strategy", "Strategy", "EpochRunner", "AllReduce", "ModelAveraging", "ParameterServer",
           "Gossip", "Federated"]


def default_strategy() -> Strategy:
    """What :func:`fit` does with no ``strategy=``: the fastest to a target validation loss
    on the training benchmark (``benchmarks/bench_training.py``, ``docs/benchmarks.md``).

    Local SGD over the workers' ring: 64 local steps, then the weights and the optimizer's
    slots are averaged among the workers and the averaged change is taken 1.5 times
    (``AllReduce(every=64, outer_lr=1.5)``). On the flights table it reaches the
    validation loss of single-process ``model.fit`` in about as many epochs (plain
    averaging once per epoch needs about twice as many), with no round trip to the
    driver inside an epoch. Where the workers cannot connect to each other it falls back
    to the same schedule through the driver (``ModelAveraging(sync_every=64, outer_lr=1.5)``).
    """
    return AllReduce(every=64, outer_lr=1.5, fallback=ModelAveraging(sync_every=64, outer_lr=1.5))


def fit(
    model: Any,
    data: Any,
    *,
    preprocessor: Any,
    strategy: Any = None,
    epochs: int = 1,
    batch_size: int | None = None,
    validation_data: Any = None,
    validation_fraction: float | None = None,
    callbacks: Sequence[Any] | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
    client: Any = None,
    seed: int | None = None,
    shuffle: bool = True,
    cache: bool | str = "auto",
    verbose: Any = "auto",
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Train a compiled Keras model data-parallel on the Dask cluster.

    Parameters
    ----------
    model : keras.Model
        A compiled Keras 3 model (``model.compile(optimizer=..., loss=...)``). Its
        weights are the starting point and hold the result when ``fit`` returns.
    data : dask.dataframe.DataFrame or pandas.DataFrame
        Raw training rows (what :func:`daskml_scale.read_csv` gives). Partitions are
        turned into batches on the workers; no training row travels to the client.
    preprocessor : Preprocessor
        Turns a partition into ``(X, y)``; fitted on ``data`` first if it is not.
    strategy : Strategy
        How workers combine their work: :class:`AllReduce`, :class:`ModelAveraging`,
        :class:`ParameterServer`, or a :class:`Strategy` of your own. Default:
        :func:`default_strategy`.
    epochs, batch_size : int
        As in ``model.fit``; ``batch_size`` is the rows of one worker's step (defaults to
        ``daskml_scale.training.batch-size``): on ``N`` workers a step takes ``N *
        batch_size`` rows in all. To keep the global batch (and the learning rate) of a
        script tuned in one process at batch ``B``, pass ``B // N`` (``docs/training.md``).
    validation_data : dask or pandas DataFrame, optional
        Rows to validate on after every epoch, on the workers.
    validation_fraction : float, optional
        Hold out this fraction of ``data`` instead (deterministic for a given seed).
    callbacks : list of keras.callbacks.Callback
        Called on the driver with epoch-level logs (History, EarlyStopping,
        ModelCheckpoint, TerminateOnNaN, ...); a "batch" is one round.
    checkpoint : str, optional
        fsspec URL (folder or ``.npz`` file) written after every epoch: weights,
        optimizer state, epoch and history.
    resume : bool
        Continue from the checkpoint at ``checkpoint`` when there is one.
    client : distributed.Client, optional
        Defaults to the current client.
    seed : int, optional
        Seeds the partition and row shuffles and the held-out split.
    cache : bool or "auto"
        Keep preprocessed partitions in worker memory across epochs (``True``), or
        stream them from the source every epoch (``False``: a worker holds a few
        partitions at a time, whatever the data's size). ``"auto"`` caches when the
        data is small next to the cluster's memory.
    verbose : "auto", bool or int
        ``"auto"``: in a Jupyter kernel the live view (:class:`daskml_scale.LivePlot`:
        progress, curves, rows/s per worker), on a terminal Keras's progress bar, else
        nothing; true: Keras's progress bar; false: nothing. Every fit also reports to the
        Dask dashboard's daskml page (:mod:`daskml_scale.dashboard`).

    Returns
    -------
    keras.callbacks.History
        ``history.history`` has per-epoch ``loss``, metrics and ``val_*`` entries;
        ``history.daskml_summary`` describes the run; ``history.plot()`` draws the curves.

    Raises
    ------
    ValueError
        The model is not compiled, or arguments are invalid.
    MissingColumnError
        The target or a feature column is missing.
    WorkersLostError
        Every worker is gone (after the last checkpoint was written).
    """
    import dask.dataframe as dd

    from daskml_scale.training.driver import Fit

    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise ArgumentError(
            "Expected a compiled Keras model. Received: a model without an optimizer; "
            "call model.compile(optimizer=..., loss=...) before fit()"
        )
    if preprocessor is None:
        raise ArgumentError("Expected a Preprocessor (preprocessor=Preprocessor(target=..., numeric=[...], ...))")
    if preprocessor.target is None:
        raise ArgumentError("Expected a Preprocessor with a target column to train on. Received: target=None")
    if epochs < 1:
        raise ArgumentError(f"Expected epochs >= 1. Received: epochs={epochs}")
    strategy = strategy if strategy is not None else default_strategy()
    if not isinstance(strategy, Strategy):
        raise ArgumentError(
            "Expected strategy to be a daskml_scale.Strategy (ModelAveraging(), ParameterServer(...), or a "
            f"subclass of your own). Received: strategy={strategy!r}"
        )
    batch_size = int(batch_size or config.get("training.batch-size", 256))
    seed = int(seed if seed is not None else config.get("training.seed", 0))
    validation_fraction = float(validation_fraction or 0.0)
    if not 0.0 <= validation_fraction < 1.0:
        raise ArgumentError(f"Expected 0 <= validation_fraction < 1. Received: {validation_fraction}")
    if resume and not checkpoint:
        raise ArgumentError("resume=True needs checkpoint=URL")
    client = default_client(client, purpose="fit()")
    fit_class: Any = Fit
    if isinstance(data, dict):  # federated: {site: DataFrame or URL}; rows stay on their site's workers
        from daskml_scale.training.federated import federated_fit_class

        fit_class = federated_fit_class(strategy, preprocessor)

    if isinstance(data, pd.DataFrame):
        data = dd.from_pandas(data, npartitions=max(1, len(client.nthreads())))
    if isinstance(validation_data, pd.DataFrame):
        validation_data = dd.from_pandas(validation_data, npartitions=max(1, len(client.nthreads())))
    _check_target(data, preprocessor)
    if not hasattr(preprocessor, "feature_names_"):
        preprocessor.fit(data, client=client)
    # a model with named inputs gets X cut into them; names and widths checked before any work
    attach_layout(model, preprocessor, error=ArgumentError)

    run = fit_class(
        client=client, model=model, data=data, preprocessor=preprocessor, strategy=strategy, epochs=epochs,
        batch_size=batch_size, validation_data=validation_data, validation_fraction=validation_fraction,
        callbacks=list(callbacks or []), checkpoint=checkpoint, resume=resume, seed=seed, verbose=verbose,
        cache=cache, storage_options=storage_options, shuffle=shuffle,
    )
    return run.run()


def _check_target(data: Any, preprocessor: Any) -> None:
    """Fail before any work when the target cannot appear (checked on the schema)."""
    meta = getattr(data, "_meta_nonempty", None)
    if meta is None:
        return
    try:
        out = preprocessor._apply_user_transform(meta)
    except Exception:
        return  # the user's transform does not run on placeholder rows: checked later
    if preprocessor.target not in out.columns:
        raise MissingColumnError(
            f"The target column {preprocessor.target!r} is missing: the data has columns {list(out.columns)}",
            column=preprocessor.target,
        )
    if len(data.columns) == 0:
        raise DataError("Expected training data with columns. Received: none")
