"""Model averaging: workers train locally, the driver averages, every ``sync_every`` steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from daskml_scale.exceptions import ArgumentError
from daskml_scale.training.strategy import Strategy

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.runner import EpochRunner

__all__ = ["ModelAveraging", "weighted_average"]


def weighted_average(arrays: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Sample-weighted mean of lists of arrays; integer arrays (step counters) take the max."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = []
    for parts in zip(*arrays):
        first = parts[0]
        if np.issubdtype(np.asarray(first).dtype, np.integer):
            out.append(np.max(np.stack(parts), axis=0).astype(first.dtype))
            continue
        acc = np.zeros(np.shape(first), dtype=np.float64)
        for wi, p in zip(w, parts):
            acc += wi * np.asarray(p, dtype=np.float64)
        out.append(acc.astype(np.asarray(first).dtype))
    return out


class _AveragingState:
    """Per fit: the outer step's velocity (``outer_momentum > 0``)."""

    def __init__(self) -> None:
        self.velocity: list[np.ndarray] | None = None


@dataclass
class ModelAveraging(Strategy):
    """Every worker trains a copy of the model on the partitions it holds for
    ``sync_every`` local steps (``None``: one local epoch); the driver then averages
    the weights, weighted by the samples each worker saw, and starts the next round
    from the average.

    Parameters
    ----------
    sync_every : int or None
        Local steps (batches) per round. Small values track single-process SGD more
        closely and cost one scheduler round trip per round; ``None`` averages once
        per epoch.
    optimizer_state : {"average", "reset"}
        ``"average"`` (default): the optimizer's slots (e.g. Adam's moments and step
        count) are averaged like the weights and sent back with them, so the driver
        holds the whole training state and a round can rerun anywhere;
        ``"reset"``: every round starts from fresh optimizer slots.
    outer_lr : float or "workers"
        Scale of the averaged change of a round: ``w = w + outer_lr * (avg - w)``.
        ``1.0`` is plain averaging. ``"workers"`` (the number of workers that
        contributed) adds up the workers' changes instead, so a round moves the
        model as far as the same steps run one after another would. With Adam this
        doubles the step and was unstable on the benchmark tables: an option, not a
        default.
    outer_momentum : float
        Momentum of that outer step (0 = none): ``v = m * v + outer_lr * (avg - w); w = w + v``.

    Notes
    -----
    Non-trainable weights (e.g. BatchNormalization statistics) are averaged too.
    """

    sync_every: int | None = None
    optimizer_state: str = "average"
    outer_lr: float | str = 1.0
    outer_momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.sync_every is not None and int(self.sync_every) < 1:
            raise ArgumentError(f"Expected sync_every to be a positive integer or None. Received: {self.sync_every!r}")
        if self.optimizer_state not in ("average", "reset"):
            raise ArgumentError(
                f"Expected optimizer_state to be 'average' or 'reset'. Received: {self.optimizer_state!r}"
            )
        if self.outer_lr != "workers" and not (isinstance(self.outer_lr, (int, float)) and self.outer_lr > 0):
            raise ArgumentError(f"Expected outer_lr to be a positive number or 'workers'. Received: {self.outer_lr!r}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ArgumentError(f"Expected 0 <= outer_momentum < 1. Received: {self.outer_momentum!r}")

    name = "averaging"

    def steps_per_round(self) -> int | None:
        return self.sync_every

    def create_state(self) -> _AveragingState:
        return _AveragingState()

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name, "sync_every": self.sync_every,
            "optimizer_state": self.optimizer_state, "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
        }

    def run_epoch(self, runner: "EpochRunner") -> None:
        velocity = runner.state.velocity
        for round_slices in runner.rounds(self.sync_every):
            keep = self.optimizer_state == "average"
            state = {
                "weights": runner.weights,
                # "reset": every round starts from the optimizer's fresh slots
                "optimizer": runner.optimizer_state if keep else runner.initial_optimizer_state,
            }
            results = runner.run_round(state, round_slices)
            results = [r for r in results if r.get("samples", 0) > 0]
            if not results:
                continue
            samples = [r["samples"] for r in results]
            avg = weighted_average([r["weights"] for r in results], samples)
            lr = float(len(results)) if self.outer_lr == "workers" else float(self.outer_lr)
            if lr != 1.0 or self.outer_momentum > 0:
                # only trainable weights take the outer step; statistics (e.g. BatchNorm's
                # moving variance) are plain averages
                mask = runner.trainable_mask
                delta = [
                    (lr if t else 1.0) * (a.astype(np.float64) - w) for a, w, t in zip(avg, runner.weights, mask)
                ]
                if self.outer_momentum > 0:
                    velocity = delta if velocity is None else [
                        self.outer_momentum * v + d for v, d in zip(velocity, delta)
                    ]
                    runner.state.velocity = velocity
                    delta = velocity
                avg = [(w + d).astype(np.asarray(w).dtype) for w, d in zip(runner.weights, delta)]
            runner.weights = avg
            if self.optimizer_state == "average":
                runner.optimizer_state = weighted_average([r["optimizer"] for r in results], samples)
            runner.add_train_metrics([r["metrics"] for r in results], sum(samples))
            if runner.round_end():
                break
