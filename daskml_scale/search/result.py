"""What :func:`daskml_scale.search` returns: the trials as a table, the best parameters,
the best model (at its best epoch), and a picture of the search."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from daskml_scale import backend
from daskml_scale.exceptions import TrainingError

__all__ = ["SearchResult", "trials_frame"]

_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def _trial_params(t: Any) -> dict[str, Any]:
    """Every parameter a trial's model was built with: drawn by Optuna, fixed, or found at its default."""
    out = dict(t.params)
    for k, v in t.user_attrs.items():
        for prefix in ("fixed_", "default_"):
            if k.startswith(prefix):
                out.setdefault(k[len(prefix):], v)
    return out


def trials_frame(study: Any, objective: str, epochs: int, direction: str = "minimize") -> pd.DataFrame:
    """One row per trial of ``study``: ``trial``, ``state``, the objective (its best epoch's
    value), ``best_epoch`` (1-based), ``epochs`` run, ``seconds`` (from its start to its end),
    ``compute_seconds`` (in its tasks; a pack's time is shared evenly by its trials), ``build_seconds`` (building
    and tracing its model), ``worker``, ``pack`` (the pack it trained in with other trials, or empty), ``error``,
    ``started`` / ``finished``, a ``params_<name>`` column per parameter and an
    ``<objective>_epoch_<k>`` column per epoch."""
    stale = set(study.user_attrs.get("stale_trials", []))
    pick = min if direction == "minimize" else max
    rows = []
    names: list[str] = []
    for t in study.get_trials(deepcopy=False):
        params = _trial_params(t)
        for n in params:
            if n not in names:
                names.append(n)
        attrs = t.user_attrs
        error = attrs.get("error")
        if t.number in stale and error is None:
            error = "the driver stopped during this trial; its parameters were run again"
        row: dict[str, Any] = {
            "trial": t.number, "state": _STATES.get(t.state.name, t.state.name.lower()),
            objective: t.value if t.state.name == "COMPLETE" else (
                pick(t.intermediate_values.values()) if t.intermediate_values else np.nan),
            "best_epoch": (attrs["best_epoch"] + 1) if "best_epoch" in attrs else np.nan,
            "epochs": attrs.get("epochs", len(t.intermediate_values)),
            "seconds": attrs.get("seconds", (t.duration.total_seconds() if t.duration else np.nan)),
            "compute_seconds": attrs.get("compute_seconds", np.nan), "build_seconds": attrs.get("build_seconds", np.nan),
            "worker": attrs.get("worker"), "pack": attrs.get("pack"), "error": error,
            "rerun_of": attrs.get("rerun_of"), "started": t.datetime_start, "finished": t.datetime_complete,
        }
        row.update({f"params_{n}": v for n, v in params.items()})
        for step, v in t.intermediate_values.items():
            row[f"{objective}_epoch_{step}"] = v
        rows.append(row)
    columns = ["trial", "state", objective, "best_epoch", "epochs", "seconds", "compute_seconds", "build_seconds", "worker", "pack", "error",
               "rerun_of",
               "started", "finished", *[f"params_{n}" for n in names],
               *[f"{objective}_epoch_{k}" for k in range(1, epochs + 1)]]
    frame = pd.DataFrame(rows)
    for c in columns:
        if c not in frame.columns:
            frame[c] = np.nan
    return frame[columns + [c for c in frame.columns if c not in columns]]


class SearchResult:
    """The outcome of a search.

    Attributes
    ----------
    trials : pandas.DataFrame
        One row per trial (see :func:`trials_frame`); ``trials.to_csv(path)`` writes it.
    best_params : dict
        The best trial's parameters (every one its model was built with).
    best_value : float
        The best trial's objective, at its best epoch.
    best_trial : int
        Its number.
    study : optuna.Study
        The study itself, for Optuna's own tools (``optuna.visualization``, ...).
    summary : dict
        Timings, workers, rows.
    """

    def __init__(
        self, *, study: Any, objective: str, direction: str, space: dict[str, Any], build_model: Callable[..., Any],
        style: str, context: dict[str, Any], layout: Any, sample: Any, best: Any, epochs: int,
        seed_of: Callable[[int], int], summary: dict[str, Any],
    ) -> None:
        self.study = study
        self.objective = objective
        self.direction = direction
        self.space = dict(space)
        self.epochs = epochs
        self.summary = summary
        self._build = build_model
        self._style = style
        self._context = context
        self._layout = layout
        self._sample = sample
        self._best = best
        self._seed_of = seed_of
        self.trials = trials_frame(study, objective, epochs, direction)
        if best is None:
            self.best_trial: int | None = None
            self.best_value: float | None = None
            self.best_params: dict[str, Any] = {}
        else:
            self.best_trial = int(best[0])
            self.best_value = float(best[1])
            self.best_params = _trial_params(study.trials[self.best_trial])

    def __repr__(self) -> str:
        counts = self.trials["state"].value_counts().to_dict() if len(self.trials) else {}
        best = f"best {self.objective} {self.best_value:.5g} (trial {self.best_trial})" if self._best else "no best trial"
        return f"SearchResult({len(self.trials)} trials {counts}; {best}; params {self.best_params})"

    @property
    def best_epoch(self) -> int | None:
        """The best trial's best epoch, 1-based."""
        return None if self._best is None else int(self._best[3]) + 1

    def best_model(self) -> Any:
        """The best trial's compiled model with its weights (and optimizer state) at its best epoch.

        ``save_bundle(result.best_model(), preprocessor, url)`` saves it as any trained model.

        Raises
        ------
        TrainingError
            No trial completed (all failed or were pruned), or the best trial's weights
            could not be had.
        """
        from daskml_scale.search.worker import call_builder

        if self._best is None:
            raise TrainingError("No trial of the search completed: there is no best model. See result.trials "
                                "for each trial's state and error.")
        number, _, state, _ = self._best
        if state is None:
            raise TrainingError(f"The weights of the best trial ({number}) are not available: it finished under an "
                                "earlier driver and could not be trained again (see the search's log)")
        model, _ = call_builder(self._build, self._style, self.best_params, self._context)
        backend.set_input_layout(model, self._layout)
        X, y = self._sample
        backend.ensure_built(model, X, y)
        backend.set_weights(model, list(state["weights"]))
        if state.get("optimizer") is not None:
            backend.set_optimizer_state(model, list(state["optimizer"]))
        return model

    def plot(self, path: str | None = None) -> Any:
        """A matplotlib figure: the objective per epoch of every trial, each trial's result
        over the search's time with the best so far, and the objective against each
        parameter. ``path``: also save it there (PNG, SVG, PDF by the suffix)."""
        from daskml_scale.search.plot import plot_search

        fig = plot_search(self.trials, self.objective, self.direction, self.space, self.best_trial)
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig
