"""Federated: cross-silo federated averaging, where rows never leave their site.

A **site** is a set of Dask workers that carry the resource ``site:<name>`` (start them with
``dask worker ... --resources "site:a=1"``). ``fit``'s ``data`` is a dict ``{site: Dask
DataFrame or URL}``. Every task that touches a site's rows (reading, preparing, counting,
training, validating) is restricted to that site's workers with no ``allow_other_workers``;
what comes back to the driver is weights, metric sums and row counts, never a row.

A **round** (one ``fit`` epoch) samples a fraction of the sites (seeded), has each train
``local_epochs`` passes (or ``local_steps`` steps) over its own rows from the global weights
(optionally with FedProx's proximal term ``mu``), and averages their updates weighted by
their rows. A site whose workers are all gone is skipped with a warning (its rows are not
moved anywhere); a site that does not answer within ``round_timeout`` is left out of the
round and counted.

On one machine, ``daskml_scale.connect(sites={"a": 1, "b": 2})`` starts such a cluster.

Privacy options (``clip_norm`` and ``noise_multiplier`` for DP-FedAvg, and
``secure_aggregation``) are in :mod:`daskml_scale.training.federated_privacy`, which says
what each one protects against and what it does not.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from daskml_scale import backend, config
from daskml_scale.exceptions import ArgumentError, DataError, TrainingError
from daskml_scale.training import federated_privacy as privacy
from daskml_scale.training.averaging import weighted_average
from daskml_scale.training.driver import Fit
from daskml_scale.training.strategy import Strategy
from daskml_scale.training.worker import StreamRange, gather_rows, model_for, partition_sizes, prepare_partition

if TYPE_CHECKING:  # pragma: no cover
    from daskml_scale.training.runner import EpochRunner

__all__ = ["Federated", "FederatedFit", "federated_fit_class", "site_workers", "train_site"]

logger = logging.getLogger(__name__)

SITE_PREFIX = "site:"
#: FedProx's proximal step is taken after every this many local steps
PROX_EVERY = 8
#: seconds a site may have no worker in the scheduler before the round goes on without it
_SITE_GRACE_S = 10.0


def site_workers(client: Any) -> dict[str, list[str]]:
    """Site name -> the addresses of the workers that carry its resource ``site:<name>``."""
    out: dict[str, list[str]] = {}
    for addr, info in client.scheduler_info(n_workers=-1)["workers"].items():
        for res in (info.get("resources") or {}):
            if str(res).startswith(SITE_PREFIX):
                out.setdefault(str(res)[len(SITE_PREFIX):], []).append(addr)
    return {s: sorted(w) for s, w in out.items()}


class _FederatedState:
    """Per fit: the sites' plan (set by :class:`FederatedFit`) and the last round's statistics."""

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}
        self.site_names: list[str] = []
        self.streams: list[list[int]] = []  # per site, its partitions
        self.rows: list[int] = []  # per site, its training rows


def federated_fit_class(strategy: Any, preprocessor: Any) -> type:
    """What :func:`~daskml_scale.fit` runs for data given as ``{site: frame or URL}``."""
    if not isinstance(strategy, Federated):
        raise ArgumentError("Data given as a dict {site: DataFrame or URL} is trained with "
                            f"strategy=daskml_scale.Federated(...). Received: strategy={strategy!r}")
    if not hasattr(preprocessor, "feature_names_"):
        raise ArgumentError(
            "Federated training needs a fitted Preprocessor: fitting one on every site's rows would gather "
            "statistics across sites. Fit it on rows you may pool (pre.fit(frame)) and pass it fitted")
    return FederatedFit


def _learning_rate(model: Any) -> float:
    """The optimizer's learning rate now (a schedule: at its current step)."""
    lr = model.optimizer.learning_rate
    if callable(lr) and not hasattr(lr, "numpy"):
        lr = lr(model.optimizer.iterations)
    return float(np.asarray(lr))


@dataclass
class Federated(Strategy):
    """Federated averaging across sites (FedAvg, FedProx with ``mu > 0``).

    Parameters
    ----------
    fraction : float
        Fraction of the sites sampled per round (rounded up, at least ``min_sites``).
    min_sites : int
        Sites per round at the least (fewer only when fewer have live workers).
    local_epochs : int
        Passes a sampled site makes over its own rows per round.
    local_steps : int or None
        Instead: this many local steps (batches) per round.
    mu : float
        FedProx's proximal coefficient: a site's weights are pulled toward the round's
        global weights, ``w = w_g + (w - w_g) / (1 + k lr mu)`` after every ``k = 8``
        local steps (the proximal step of ``mu/2 |w - w_g|^2``; ``lr`` the optimizer's).
    round_timeout : float or None
        Seconds a round waits for the sites; those not done are left out of the round
        and counted (``fed_stragglers``). Default ``daskml_scale.training.ps-timeout``.
    seed : int or None
        Seeds the sampling of sites (default: the fit's seed).
    optimizer_state : {"average", "reset"} or None
        ``"average"``: the sites' optimizer slots (Adam's moments) are averaged like the
        weights, weighted by rows, and every site starts the next round from them (as
        :class:`ModelAveraging` does); ``"reset"``: every round starts from the
        optimizer's fresh slots (FedAvg with stateless clients). Default (None):
        ``"reset"`` with ``clip_norm`` (slots are neither clipped nor noised, so they are
        not shared), else ``"average"``.
    clip_norm : float or None
        DP-FedAvg: every site's update is clipped to this L2 norm, and the updates are
        averaged with equal weight per site.
    noise_multiplier : float
        DP-FedAvg: Gaussian noise of ``noise_multiplier * clip_norm / sites`` on every
        coordinate of the mean update (needs ``clip_norm``).
    secure_aggregation : bool
        The driver sees only the sum of the sites' updates (pairwise masks agreed between
        the sites' workers, which cancel in the sum); at least two sites per round. See
        :mod:`daskml_scale.training.federated_privacy` for what it does not protect against.

    Notes
    -----
    Every site starts a round from the global weights. The History gets per round ``fed_sites_sampled``, ``fed_sites_answered``,
    ``fed_stragglers``, ``fed_update_norm`` (the norm of the averaged update) and
    ``fed_samples_<site>`` (rows each site trained on; 0 when not sampled or lost); with
    ``clip_norm``, ``fed_clip_norm``, ``fed_sites_clipped`` and ``fed_noise_std``; with
    ``secure_aggregation``, ``fed_sites_summed`` (the sites in the round's sum; 0: the
    round was discarded).
    """

    fraction: float = 1.0
    min_sites: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    mu: float = 0.0
    round_timeout: float | None = None
    seed: int | None = None
    optimizer_state: str | None = None
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    secure_aggregation: bool = False

    name = "federated"

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ArgumentError(f"Expected 0 < fraction <= 1. Received: fraction={self.fraction!r}")
        if not isinstance(self.min_sites, (int, np.integer)) or self.min_sites < 1:
            raise ArgumentError(f"Expected min_sites to be a positive integer. Received: min_sites={self.min_sites!r}")
        if not isinstance(self.local_epochs, (int, np.integer)) or self.local_epochs < 1:
            raise ArgumentError(f"Expected local_epochs >= 1. Received: local_epochs={self.local_epochs!r}")
        if self.local_steps is not None and (not isinstance(self.local_steps, (int, np.integer)) or self.local_steps < 1):
            raise ArgumentError(f"Expected local_steps to be None or >= 1. Received: local_steps={self.local_steps!r}")
        if not isinstance(self.mu, (int, float)) or self.mu < 0:
            raise ArgumentError(f"Expected mu >= 0. Received: mu={self.mu!r}")
        if self.optimizer_state not in (None, "average", "reset"):
            raise ArgumentError(
                f"Expected optimizer_state to be 'average', 'reset' or None. Received: {self.optimizer_state!r}")
        if self.clip_norm is not None and (isinstance(self.clip_norm, bool) or not isinstance(self.clip_norm, (int, float))
                                           or not math.isfinite(self.clip_norm) or self.clip_norm <= 0):
            raise ArgumentError(f"Expected clip_norm to be None or a positive number. Received: clip_norm={self.clip_norm!r}")
        if (isinstance(self.noise_multiplier, bool) or not isinstance(self.noise_multiplier, (int, float))
                or not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0):
            raise ArgumentError(f"Expected noise_multiplier >= 0. Received: noise_multiplier={self.noise_multiplier!r}")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ArgumentError("noise_multiplier needs clip_norm: the noise is scaled to the clipped updates' "
                                f"bound. Received: noise_multiplier={self.noise_multiplier!r}, clip_norm=None")
        if self.clip_norm is not None and self.optimizer_state == "average":
            raise ArgumentError("optimizer_state='average' with clip_norm would share the sites' optimizer slots "
                                "unclipped and without noise; use optimizer_state='reset' (the default with clip_norm)")
        if not isinstance(self.secure_aggregation, bool):
            raise ArgumentError(f"Expected secure_aggregation to be True or False. Received: {self.secure_aggregation!r}")
        if self.secure_aggregation:
            privacy.cryptography_x25519()

    @property
    def slots(self) -> str:
        """The optimizer-state policy in effect: ``"average"`` or ``"reset"``."""
        return self.optimizer_state or ("reset" if self.clip_norm is not None else "average")

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "fraction": float(self.fraction), "min_sites": int(self.min_sites),
                "local_epochs": int(self.local_epochs), "local_steps": self.local_steps, "mu": float(self.mu),
                "optimizer_state": self.slots, "clip_norm": self.clip_norm,
                "noise_multiplier": float(self.noise_multiplier), "secure_aggregation": self.secure_aggregation}

    def create_state(self) -> _FederatedState:
        return _FederatedState()

    def _timeout(self) -> float:
        t = self.round_timeout if self.round_timeout is not None else config.get("training.ps-timeout", 120)
        return float(t)

    def sample(self, sites: Sequence[str], round_: int, seed: int) -> list[str]:
        """The sites of round ``round_``: seeded by ``(seed, round)``."""
        k = min(len(sites), max(int(self.min_sites), math.ceil(float(self.fraction) * len(sites))))
        rng = np.random.default_rng([int(self.seed if self.seed is not None else seed), 4099, round_])
        return sorted(str(s) for s in rng.choice(sorted(sites), size=k, replace=False)) if k else []

    def run_epoch(self, runner: "EpochRunner") -> None:
        st: _FederatedState = runner.state
        if not st.site_names:
            raise ArgumentError("Federated needs data as a dict {site: DataFrame or URL}")
        live = site_workers(runner.client)
        sites = st.site_names
        gone = [s for s in sites if not live.get(s)]
        for s in gone:
            logger.warning("daskml_scale.fit: site %r has no live worker; it is skipped in round %d", s, runner.epoch)
        chosen = self.sample([s for s in sites if live.get(s)], runner.epoch, runner.seed)
        lr = _learning_rate(runner.model)
        keep = self.slots == "average"
        slots = runner.optimizer_state if keep else runner.initial_optimizer_state
        futs = {}
        for s in chosen:
            i = sites.index(s)
            parts = st.streams[i]
            futs[s] = runner.client.submit(
                train_site, runner.fit_id, runner.model_bytes, runner.weights, slots,
                StreamRange(tuple(parts), 0, st.rows[i], i), runner.sources(parts),
                batch_size=runner.batch_size, seed=runner.seed, round_=runner.epoch,
                local_epochs=int(self.local_epochs), local_steps=self.local_steps, mu=float(self.mu), lr=lr, site=s,
                clip_norm=self.clip_norm, secure=self.secure_aggregation, keep_slots=keep,
                pure=False, workers=live[s], allow_other_workers=False,
                key=(f"daskml-fed-train-{runner.fit_id}-{s}", runner.epoch, uuid.uuid4().hex[:6]),
            )
        runner.round_begin()
        results, stragglers = self._wait(runner, futs)
        st.stats = {"sites_sampled": float(len(chosen)), "sites_answered": float(len(results)),
                    "stragglers": float(stragglers), "update_norm": 0.0,
                    **{f"samples_{s}": float(results[s]["samples"]) if s in results else 0.0 for s in sites}}
        if self.clip_norm is not None:
            st.stats.update(clip_norm=float(self.clip_norm), sites_clipped=0.0, noise_std=0.0)
        if self.secure_aggregation:
            st.stats["sites_summed"] = 0.0
        done = [r for r in results.values() if r["samples"] > 0]
        if not done:
            runner.round_end()
            return
        samples = [r["samples"] for r in done]
        update, slots_avg = self._aggregate(runner, {r["site"]: r for r in done}, keep)
        if update is not None:
            st.stats["update_norm"] = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
            runner.weights = [(np.asarray(w) + u).astype(np.asarray(w).dtype) for w, u in zip(runner.weights, update)]
            if slots_avg is not None:
                runner.optimizer_state = slots_avg
        runner.add_train_metrics([r["metrics"] for r in done], sum(samples))
        runner.round_end()

    def _aggregate(self, runner: "EpochRunner", done: dict[str, dict[str, Any]],
                   keep: bool) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """The round's mean update (None: the round is discarded) and, with ``keep``, the
        averaged optimizer slots: weighted by rows, or with ``clip_norm`` equal per site
        plus DP noise; with ``secure_aggregation`` from the masked sum only."""
        st: _FederatedState = runner.state
        like = runner.weights
        slot_like = [s for s in (runner.optimizer_state or []) if not _integer(s)] if keep else []
        if self.secure_aggregation:
            summed = privacy.secure_sum(runner.client, runner.fit_id, runner.epoch, done, self._timeout())
            st.stats["sites_summed"] = float(len(summed[1])) if summed else 0.0
            if summed is None:
                return None, None
            vector, sites = summed
            rows = [done[s]["samples"] for s in sites]
            n_w = sum(int(np.size(w)) for w in like)
            n_s = sum(int(np.size(s)) for s in slot_like)
            total_update = privacy.unflatten(vector[:n_w], like)
            total_slots = privacy.unflatten(vector[n_w: n_w + n_s], slot_like)
            clipped = float(vector[n_w + n_s]) if self.clip_norm is not None else 0.0
            ints = [done[x]["optimizer_ints"] for x in sites]
        else:
            sites = sorted(done)
            rows = [done[s]["samples"] for s in sites]
            weight = [1.0] * len(sites) if self.clip_norm is not None else rows
            total_update = [sum(w * np.asarray(done[s]["update"][j], np.float64) for w, s in zip(weight, sites))
                            for j in range(len(like))]
            total_slots = weighted_average([done[s]["optimizer"] for s in sites], rows) if keep else []
            clipped = float(sum(done[s].get("clipped", 0.0) for s in sites))
            ints = None
        if self.clip_norm is not None:
            std = privacy.noise_std(self.noise_multiplier, self.clip_norm, len(sites))
            update = privacy.add_noise([u / len(sites) for u in total_update], std)
            st.stats.update(clip_norm=float(self.clip_norm), sites_clipped=clipped, noise_std=std)
        else:
            update = [u / float(sum(rows)) for u in total_update]
        if not keep:
            return update, None
        if ints is None:
            return update, total_slots
        merged, it_f, it_i = [], iter(total_slots), iter(zip(*ints)) if ints and ints[0] else iter(())
        for s in runner.optimizer_state:
            if _integer(s):
                merged.append(np.max(np.stack(next(it_i)), axis=0).astype(np.asarray(s).dtype))
            else:
                merged.append((next(it_f) / float(sum(rows))).astype(np.asarray(s).dtype))
        return update, merged

    def _wait(self, runner: "EpochRunner", futs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int]:
        """The sites' results within ``round_timeout``; a site that lost its workers, or is
        late, is left out (cancelled, never rerun elsewhere)."""
        deadline = time.monotonic() + self._timeout()
        pending = dict(futs)
        results: dict[str, dict[str, Any]] = {}
        gone_since: dict[str, float] = {}  # a worker can drop out of the scheduler a moment, and come back
        late = 0
        while pending:
            for s in [s for s, f in pending.items() if f.done()]:
                f = pending.pop(s)
                if f.status == "finished":
                    results[s] = f.result(timeout=self._timeout())
                else:
                    logger.warning("daskml_scale.fit: site %r failed round %d: %s", s, runner.epoch,
                                   f.exception(timeout=self._timeout()))
            if not pending:
                break
            live = site_workers(runner.client)
            now = time.monotonic()
            for s in list(pending):
                if live.get(s):
                    gone_since.pop(s, None)
                elif now - gone_since.setdefault(s, now) > _SITE_GRACE_S:
                    logger.warning("daskml_scale.fit: site %r lost its workers in round %d; the round goes on "
                                   "without it", s, runner.epoch)
                    pending.pop(s).cancel()
                    late += 1
            if time.monotonic() > deadline:
                logger.warning("daskml_scale.fit: sites %s did not answer round %d within %.0fs; left out",
                               sorted(pending), runner.epoch, self._timeout())
                for f in pending.values():
                    f.cancel()
                late += len(pending)
                break
            runner.wait(list(pending.values()), 0.2)
        return results, late

    def epoch_logs(self, runner: "EpochRunner") -> dict[str, float]:
        return {f"fed_{k}": v for k, v in runner.state.stats.items()}


# ------------------------------------------------------------------------ the driver
class FederatedFit(Fit):
    """A :class:`~daskml_scale.training.driver.Fit` whose data is ``{site: frame or URL}``:
    every task that touches a site's rows runs on that site's workers only."""

    def _placeholder_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Two rows for building the model, made from Dask's placeholder rows of the first
        site's schema (never from a site's rows): both, or the first one that the
        preprocessor takes, twice."""
        meta = getattr(self.frames[self.site_names[0]], "_meta_nonempty", None)
        if meta is None:
            return None
        for rows in (meta.head(2), *(meta.iloc[[i, i]] for i in range(min(2, len(meta))))):
            try:
                X, y = self.pre.transform(rows)
            except Exception:
                continue
            if y is not None and len(X):
                return X, y
        return None

    def _ship_model(self) -> None:
        """Only called without placeholder rows (the warm-up ships the model otherwise):
        the rows of a site's partition never leave it."""
        raise ArgumentError("Federated training builds the model on placeholder rows from the data's schema, "
                            "and the preprocessor's transform failed on them; make it accept Dask's "
                            "placeholder rows (no real row leaves a site)")

    def run(self) -> Any:
        self.frames = {str(s): _frame(v, self.storage_options) for s, v in self.data.items()}
        self.site_names = sorted(self.frames)
        self.val_frames = None
        if self.validation_data is not None:
            if not isinstance(self.validation_data, dict):
                raise ArgumentError("Expected validation_data as a dict {site: DataFrame or URL} with Federated. "
                                    f"Received: {type(self.validation_data).__name__}")
            self.val_frames = {str(s): _frame(v, self.storage_options) for s, v in self.validation_data.items()}
        return super().run()

    def _submit_sources(self, workers: list[str]) -> None:
        """Nothing ahead of the plan: a site's partitions are prepared by :meth:`_plan`, on the site."""

    def _plan(self, workers: list[str]) -> None:
        self.workers, self.homes = workers, list(workers)
        self.sites = site_workers(self.client)
        missing = [s for s in self.site_names if not self.sites.get(s)]
        if missing:
            raise ArgumentError(
                f"No worker carries the resource of site(s) {missing}: start their workers with "
                f"dask worker ... --resources \"site:{missing[0]}=1\" (sites seen: {sorted(self.sites)})")
        self.cached = True
        self.sources, self.streams = self._site_sources(self.frames, self.validation_fraction, "train")
        sizes = self._site_sizes(self.sources, self.streams)
        self.train_sizes, self.val_sizes = [s[0] for s in sizes], [s[1] for s in sizes]
        self.dropped_missing_target = sum(s[2] for s in sizes)
        if sum(self.train_sizes) == 0:
            raise DataError("Expected training rows. Received: 0 rows after reading and preprocessing every site's data")
        if self.val_frames is not None:
            self.val_sources, self.val_streams = self._site_sources(self.val_frames, 0.0, "val")
        elif self.validation_fraction > 0:
            self.val_streams = self.streams
        st = self.strategy_state
        st.site_names, st.streams = list(self.site_names), [list(p) for p in self.streams]
        st.rows = [sum(self.train_sizes[p] for p in parts) for parts in self.streams]

    def _site_sources(self, frames: dict[str, Any], val_fraction: float, tag: str) -> tuple[list[Any], list[list[int]]]:
        import dask

        sources: list[Any] = []
        streams: list[list[int]] = []
        for site in sorted(frames):
            if site not in self.sites:
                raise ArgumentError(f"No worker carries the resource of site {site!r} (validation_data)")
            parts = frames[site].to_delayed()
            start = len(sources)
            prepared = [
                dask.delayed(prepare_partition, pure=True)(
                    p, self.pre, val_fraction, self.seed, start + i, dask_key_name=f"fed-{tag}-prep-{self.fit_id}-{site}-{i}")
                for i, p in enumerate(parts)
            ]
            # every task of these graphs (the reads too) runs on the site's workers, and only there
            sources += self.client.compute(prepared, workers=self.sites[site], allow_other_workers=False)
            streams.append(list(range(start, len(sources))))
        return sources, streams

    def _site_sizes(self, sources: list[Any], streams: list[list[int]]) -> list[tuple[int, int, int]]:
        futs: list[Any] = [None] * len(sources)
        for site, parts in zip(self.site_names, streams):
            for p in parts:
                futs[p] = self.client.submit(partition_sizes, sources[p], pure=False, workers=self.sites[site],
                                             allow_other_workers=False, key=f"fed-sizes-{self.fit_id}-{site}-{p}")
        sizes = self._gather_within(futs, "reading and preparing the sites' rows")
        if len(sizes) < len(futs):
            raise TrainingError("Federated: some sites' rows could not be read and prepared on their own workers "
                                f"within {_wait_s():.0f}s (daskml_scale.training.ps-timeout); see the warning above")
        return [tuple(x) for x in sizes]

    def _gather_within(self, futs: list[Any], what: str) -> list[Any]:
        """The results of the tasks among ``futs`` that finish within the bound (a site's
        tasks cannot move elsewhere, so a site that lost its workers must not hold the fit)."""
        from daskml_scale.training.driver import wait_done

        if not wait_done(futs, _wait_s()):
            late = [str(f.key) for f in futs if not f.done()]
            logger.warning("daskml_scale.fit: Federated %s: %d task(s) did not finish within %.0fs and are left "
                           "out: %s", what, len(late), _wait_s(), late[:4])
        done = [f for f in futs if f.status == "finished"]
        self.client.cancel([f for f in futs if f.status != "finished"])
        return [f.result(timeout=_wait_s()) for f in done]

    def start_validation(self, epoch: int) -> Callable[[], dict[str, float]]:
        from daskml_scale.training.worker import evaluate_parts

        if self.val_sources is not None:
            sources, names, rows = self.val_sources, sorted(self.val_frames or {}), "all"
        else:
            sources, names, rows = self.sources, self.site_names, "held-out"
        live = site_workers(self.client)
        futs = []
        for site, parts in zip(names, self.val_streams):
            if not parts or not live.get(site):
                continue
            futs.append(self.client.submit(
                evaluate_parts, self.fit_id, self.model_bytes, self.weights, parts, {p: sources[p] for p in parts},
                batch_size=max(self.batch_size, 1024), rows=rows, pure=False, workers=live[site],
                allow_other_workers=False, key=(f"daskml-fed-validate-{self.fit_id}-{site}", epoch, uuid.uuid4().hex[:6]),
            ))
        return lambda: self._validation_logs(self._gather_within(futs, "validation"))


def _integer(a: Any) -> bool:
    return bool(np.issubdtype(np.asarray(a).dtype, np.integer))


def _wait_s() -> float:
    return float(config.get("training.ps-timeout", 120))


def _frame(value: Any, storage_options: dict[str, Any] | None) -> Any:
    """A site's data: a Dask DataFrame as it is, a URL read lazily (its reads then run on
    the site's workers, in the graph that prepares it)."""
    if isinstance(value, str):
        from daskml_scale.io import read_csv, read_parquet

        reader = read_parquet if value.rstrip("/").endswith((".parquet", ".pq")) else read_csv
        return reader(value, storage_options=storage_options)
    if not hasattr(value, "to_delayed"):
        raise ArgumentError(f"Expected a site's data to be a Dask DataFrame or a URL. Received: {type(value).__name__}")
    return value


# -------------------------------------------------------------------------- the task
def train_site(
    fit_id: str, model_bytes: bytes, weights: list[np.ndarray], optimizer: list[np.ndarray], rows: StreamRange,
    sources: dict[int, Any], *, batch_size: int, seed: int, round_: int, local_epochs: int, local_steps: int | None,
    mu: float, lr: float, site: str, clip_norm: float | None = None, secure: bool = False, keep_slots: bool = True,
) -> dict[str, Any]:
    """A site's round: train from the global ``weights`` over its own rows; returns the
    update (``weights`` subtracted; clipped to ``clip_norm``), the metric state and the
    rows trained on. With ``secure`` the update stays on this worker, and the answer
    carries this round's public key instead (see :mod:`.federated_privacy`)."""
    cached = model_for(fit_id, model_bytes)
    with cached.lock:
        model = cached.model
        passes = []
        for e in range(local_epochs if local_steps is None else 1):
            X, y = gather_rows([rows], sources, seed, round_ * 1009 + e, True)
            passes.append((X, y))
        if not len(passes[0][0]):
            return {"samples": 0, "site": site}
        backend.ensure_built(model, passes[0][0][:2], passes[0][1][:2])
        backend.set_weights(model, weights)
        backend.set_optimizer_state(model, optimizer)
        backend.reset_metrics(model)
        trainable = {id(v) for v in model.trainable_weights}
        mask = [id(v) in trainable for v in model.weights]
        chunk = PROX_EVERY * batch_size if mu > 0 else None
        pull = 1.0 / (1.0 + PROX_EVERY * lr * mu)
        samples = 0
        if local_steps is not None:
            X, y = passes[0]
            idx = np.arange(local_steps * batch_size) % len(X)
            passes = [(X[idx], y[idx])]
        for X, y in passes:
            step = chunk or len(X)
            for a in range(0, len(X), step):
                cached.train(X[a: a + step], y[a: a + step], batch_size)
                samples += len(X[a: a + step])
                if mu > 0:  # FedProx: the proximal step toward the round's global weights
                    now = backend.get_weights(model)
                    backend.set_weights(model, [g + (w - g) * pull if t else w
                                                for w, g, t in zip(now, weights, mask)])
        update = [np.asarray(w, np.float64) - np.asarray(g, np.float64)
                  for w, g in zip(backend.get_weights(model), weights)]
        out: dict[str, Any] = {"samples": samples, "site": site, "metrics": backend.metric_state(model)}
        clipped = False
        if clip_norm is not None:
            update, _, clipped = privacy.clip_update(update, float(clip_norm))
        slots = backend.get_optimizer_state(model) if keep_slots else []
        if not secure:
            return {**out, "update": update, "optimizer": slots, "clipped": float(clipped)}
        from distributed import get_worker

        # in the sum: the update (x rows, unless clipped: equal weight), the float slots (x rows), the clipped count
        scale = 1.0 if clip_norm is not None else float(samples)
        parts = [u * scale for u in update] + [np.asarray(s, np.float64) * samples for s in slots if not _integer(s)]
        vector = privacy.flatten(parts)
        if clip_norm is not None:
            vector = np.append(vector, float(clipped))
        return {**out, "worker": get_worker().address, "optimizer_ints": [s for s in slots if _integer(s)],
                "public_key": privacy.hold_update(fit_id, site, round_, vector)}
