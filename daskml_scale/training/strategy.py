"""The contract between :func:`daskml_scale.fit` and a way of combining workers.

A :class:`Strategy` runs one epoch at a time through an
:class:`~daskml_scale.training.driver.EpochRunner`: the runner gives it the epoch's
rows (per stream, one stream per worker), the master state (weights, optimizer
slots), a way to run tasks on a stream's worker and to wait for them without ever
hanging, and the hooks that report progress to Keras callbacks. What a strategy keeps
across epochs of one fit (a server, a velocity, connections) lives in the state object
it makes in :meth:`Strategy.create_state`, handed back as ``runner.state``, and is
released in :meth:`Strategy.release`.

Writing a strategy of one's own needs this module only::

    class AverageOncePerEpoch(daskml_scale.Strategy):
        name = "once-per-epoch"

        def run_epoch(self, runner):
            state = {"weights": runner.weights, "optimizer": runner.optimizer_state}
            for round_slices in runner.rounds(None):  # one round: a whole epoch per worker
                results = [r for r in runner.run_round(state, round_slices) if r["samples"]]
                samples = [r["samples"] for r in results]
                runner.weights = average([r["weights"] for r in results], samples)
                runner.optimizer_state = average([r["optimizer"] for r in results], samples)
                runner.add_train_metrics([r["metrics"] for r in results], sum(samples))
                runner.round_end()
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.driver import EpochRunner

__all__ = ["Strategy"]


class Strategy(abc.ABC):
    """How the workers of a :func:`~daskml_scale.fit` combine what they learn.

    Subclasses implement :meth:`run_epoch`; the other hooks have defaults that do
    nothing. ``__init__`` of a strategy only stores its settings (it is described in
    the fit's summary and checkpoints), so one instance can serve several fits.
    """

    #: A short name for the fit's summary (``history.daskml_summary["strategy"]``).
    name: str = "custom"

    def describe(self) -> dict[str, Any]:
        """The strategy and its settings, as plain values (the fit's summary)."""
        return {"strategy": self.name}

    def steps_per_round(self) -> int | None:
        """Local steps between the points where the driver sees progress (a Keras
        "batch" for callbacks and the progress bar); ``None``: once per epoch."""
        return None

    def worker_functions(self) -> tuple[str, ...]:
        """The compiled functions this strategy's worker tasks call, traced ahead while
        the data is prepared: any of ``"train"`` (``model.train_step`` loops),
        ``"gradients"`` (the parameter server's gradient loop), ``"fused"``
        (AllReduce's apply-then-gradient step) and ``"local_sgd"`` (AllReduce's round of
        local steps with the state in and out)."""
        return ("train",)

    def create_state(self) -> Any:
        """What the strategy keeps across the epochs of one fit (``runner.state``)."""
        return None

    @abc.abstractmethod
    def run_epoch(self, runner: "EpochRunner") -> None:
        """Train one epoch: leave the result in ``runner.weights`` and
        ``runner.optimizer_state``, report rounds with ``runner.round_end()`` and the
        training metrics with ``runner.add_train_metrics(...)``."""

    def epoch_logs(self, runner: "EpochRunner") -> dict[str, float]:
        """Extra entries for the epoch's logs (and so the History)."""
        return {}

    def release(self, state: Any) -> None:
        """The fit is over (finished or failed): free what ``state`` holds in the cluster."""
