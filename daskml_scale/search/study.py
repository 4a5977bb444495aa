"""The Optuna study behind a search: samplers, pruners, storage and resuming.

The search algorithm is Optuna's, driven through its ask-and-tell interface from the
driver: ``study.ask`` draws a trial's parameters, every epoch's objective is
``trial.report``-ed, ``trial.should_prune`` stops it at the end of that epoch, and
``study.tell`` records how it ended. The study lives in Optuna's storage: in memory,
or at a storage URL (``sqlite:///search.db``, any database URL Optuna's
``RDBStorage`` takes, or an Optuna storage object), where a later driver finds it again.
"""

from __future__ import annotations

from typing import Any

from daskml_scale.exceptions import ArgumentError

__all__ = ["ALGORITHMS", "PRUNERS", "make_sampler", "make_pruner", "open_study", "direction_for", "recover_stale"]

ALGORITHMS = ("random", "tpe", "hyperband")
PRUNERS = ("none", "median", "halving", "hyperband")

#: metric names for which a larger value is better (the direction of the objective)
_MAXIMIZE = ("acc", "auc", "precision", "recall", "f1", "r2", "iou")


def direction_for(objective: str) -> str:
    """``"maximize"`` for accuracy-like metrics (``val_accuracy``, ``auc``, ...), else ``"minimize"``."""
    name = objective[4:] if objective.startswith("val_") else objective
    return "maximize" if any(name.startswith(m) or name.endswith(m) for m in _MAXIMIZE) else "minimize"


def make_sampler(algorithm: Any, seed: int, trials: int) -> Any:
    """``"random"`` -> ``RandomSampler``; ``"tpe"`` and ``"hyperband"`` -> ``TPESampler``
    (constant liar, so that trials running at once do not all draw the same point);
    an Optuna sampler is used as given."""
    import optuna

    if isinstance(algorithm, optuna.samplers.BaseSampler):
        return algorithm
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm in ("tpe", "hyperband"):
        startup = max(2, min(10, trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    raise ArgumentError(
        f"Expected algorithm to be one of {', '.join(repr(a) for a in ALGORITHMS)} or an optuna sampler. "
        f"Received: algorithm={algorithm!r}"
    )


def make_pruner(pruner: Any, algorithm: Any, epochs: int) -> Any:
    """The pruner: ``algorithm="hyperband"`` implies Optuna's ``HyperbandPruner`` over
    1..``epochs`` epochs; ``pruner=`` names one (``"median"``, ``"halving"``,
    ``"hyperband"``, ``"none"``) or is an Optuna pruner."""
    import optuna

    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner is None:
        pruner = "hyperband" if algorithm == "hyperband" else "none"
    if pruner == "none":
        return optuna.pruners.NopPruner()
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    raise ArgumentError(
        f"Expected pruner to be one of {', '.join(repr(p) for p in PRUNERS)} or an optuna pruner. "
        f"Received: pruner={pruner!r}"
    )


def open_study(storage: Any, study_name: str, direction: str, sampler: Any, pruner: Any) -> Any:
    """Create the study, or load the one of that name at ``storage`` (resuming it).

    Raises
    ------
    ArgumentError
        The stored study optimizes in the other direction (another objective).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is not None and not isinstance(storage, (str, optuna.storages.BaseStorage)):
        raise ArgumentError(
            "Expected storage to be an Optuna storage URL (e.g. 'sqlite:///search.db'), an optuna storage object, "
            f"or None (in memory). Received: storage={type(storage).__name__}"
        )
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    stored = study.direction.name.lower()
    if stored != direction:
        raise ArgumentError(
            f"The study {study_name!r} at the storage {storage!r} was made to {stored} its objective; "
            f"this search would {direction} it. Use another study_name, or the same objective as before."
        )
    return study


def recover_stale(study: Any) -> list[int]:
    """Trials left RUNNING by a driver that stopped (killed, or its machine lost): marked
    failed, listed in the study's user attribute ``stale_trials``, and their parameters
    queued again, so that each is rerun.

    Only one driver may work on a study at a time: a second driver would take the first
    one's running trials for stale ones.
    """
    import optuna

    stale = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number}, skip_if_exists=False)
        stale.append(t.number)
    if stale:
        study.set_user_attr("stale_trials", sorted(set(study.user_attrs.get("stale_trials", [])) | set(stale)))
    return stale
