"""fit() with Federated on a real cluster whose workers belong to sites (Dask worker
resources ``site:<name>``): every task that touches a site's rows runs on that site's
workers, and the driver gets weights and metric sums, never rows."""

from __future__ import annotations

import numpy as np
import pytest

import daskml_scale
from daskml_scale.datasets import write_csv_shards
from daskml_scale.training.federated import site_workers
from tests.training.conftest import build_model

SITES = ("a", "b")


@pytest.fixture(scope="module")
def sites_client():
    """A scheduler and one worker process per site (Nanny, 1 thread, resource ``site:<name>``)."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {f"site-{s}": {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": "3GiB",
                                                       "resources": {f"site:{s}": 1}}} for s in SITES}
    cluster = SpecCluster(scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}, workers=workers)
    client = daskml_scale.connect(cluster.scheduler_address)
    try:
        client.wait_for_workers(len(SITES), timeout=180)
        yield client
    finally:
        client.close()
        cluster.close(timeout=120)  # a loaded machine can take a while to stop worker processes


def _write_sites(diamond_data, root, split):
    urls = {}
    for part, name in ((diamond_data.train, "train"), (diamond_data.val, "val")):
        first = split(part)
        for site, rows in (("a", part[first]), ("b", part[~first])):
            write_csv_shards(rows, str(root / name / site), 3 if name == "train" else 1)
            urls[(name, site)] = str(root / name / site / "*.csv")
    return urls


@pytest.fixture(scope="module")
def site_data(diamond_data, tmp_path_factory):
    """The diamonds rows split by cut (non-IID): the best cuts at site a, the others at b."""
    return _write_sites(diamond_data, tmp_path_factory.mktemp("sites"), lambda df: df["cut"].isin(["Ideal", "Premium"]))


@pytest.fixture(scope="module")
def iid_site_data(diamond_data, tmp_path_factory):
    """The same rows split at random between the two sites."""
    return _write_sites(diamond_data, tmp_path_factory.mktemp("iid-sites"),
                        lambda df: np.random.default_rng(1).random(len(df)) < 0.5)


def frames(site_data, name):
    return {s: daskml_scale.read_csv(site_data[(name, s)]) for s in SITES}


def test_bad_arguments_are_clear(fitted_pre, diamond_data):
    with pytest.raises(ValueError, match="fraction"):
        daskml_scale.Federated(fraction=0)
    with pytest.raises(ValueError, match="mu"):
        daskml_scale.Federated(mu=-1)
    with pytest.raises(ValueError, match="Federated"):
        daskml_scale.fit(build_model(len(fitted_pre.feature_names_)), {"a": diamond_data.ddf()},
                         preprocessor=fitted_pre, strategy=daskml_scale.ModelAveraging(), client=object())


def test_sites_are_sampled_by_seed():
    fed = daskml_scale.Federated(fraction=0.5, min_sites=1, seed=3)
    sites = [f"s{i}" for i in range(6)]
    rounds = [fed.sample(sites, r, seed=0) for r in range(8)]
    assert all(len(r) == 3 and set(r) <= set(sites) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # a new draw each round
    assert rounds == [fed.sample(sites, r, seed=0) for r in range(8)]
    assert daskml_scale.Federated(fraction=0.1, min_sites=2).sample(sites, 0, 0).__len__() == 2


@pytest.mark.slow
def test_every_task_runs_at_the_site_of_its_rows(sites_client, site_data, fitted_pre):
    from distributed import get_task_stream

    client = sites_client
    where = site_workers(client)
    assert {s: len(w) for s, w in where.items()} == {"a": 1, "b": 1}
    train, val = frames(site_data, "train"), frames(site_data, "val")
    # the tasks that read a site's rows: those of its frames' graphs (as fit() turns them into tasks)
    keys_of = {s: {str(k) for f in (train[s], val[s]) for d in f.to_delayed() for k in d.dask} for s in SITES}
    # what reaches the driver: every way a result comes back (client.gather, Future.result,
    # compute(sync=True), as_completed(with_results=True)) goes through Client._gather
    received: list = []
    plain_gather = client._gather

    async def recording_gather(futures, *args, **kwargs):
        out = await plain_gather(futures, *args, **kwargs)
        received.append(out)
        return out

    client._gather = recording_gather
    try:
        with get_task_stream(client=client) as ts:
            h = daskml_scale.fit(build_model(len(fitted_pre.feature_names_)), train, preprocessor=fitted_pre,
                                 epochs=2, batch_size=128, client=client, verbose=0, validation_data=val,
                                 strategy=daskml_scale.Federated(local_epochs=1))
    finally:
        del client._gather  # the class's method again
    site_of_worker = {w: s for s, ws in where.items() for w in ws}
    touched = 0
    for task in ts.data:
        key = str(task["key"])
        sites = {s for s in SITES if key in keys_of[s] or f"-{s}-" in key or f"-{s}'" in key}
        if not sites:
            continue  # touches no rows: the model's bytes, the warm-up on placeholder rows
        assert len(sites) == 1, key
        assert site_of_worker[task["worker"]] in sites, (key, task["worker"])
        touched += 1
    assert touched >= 2 * (3 + 1)  # at least every partition's read and preparation
    assert h.history["fed_sites_answered"] == [2.0, 2.0]
    assert all(h.history[f"fed_samples_{s}"][0] > 1000 for s in SITES)
    assert h.history["val_loss"][-1] < h.history["val_loss"][0]
    # what the driver gathered: counts, metric sums, weight-shaped updates; nothing as large as a row block
    n_params = sum(int(np.prod(w.shape)) for w in build_model(len(fitted_pre.feature_names_)).weights)
    for out in received:
        for arr in _arrays(out):
            assert arr.size <= n_params, arr.shape
    values = [v for out in received for v in (out if isinstance(out, (list, tuple)) else [out])]
    assert not [v for v in values if isinstance(v, (bytes, bytearray, memoryview, str)) and len(v) >= 1000]
    # the recording saw what the fit gathered (so it would see a row): every site's update of
    # every round (by Future.result) and the training partitions' sizes
    assert sorted(v["site"] for v in values if isinstance(v, dict) and "update" in v) == ["a", "a", "b", "b"]
    assert len([v for v in values if isinstance(v, tuple) and len(v) == 3]) >= 2 * 3


def _arrays(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
    else:
        assert not hasattr(value, "iloc"), f"the driver received a frame: {type(value)}"


@pytest.mark.slow
def test_fedavg_is_pooled_averaging_on_iid_sites_and_fedprox_no_worse_on_non_iid(
        sites_client, site_data, iid_site_data, fitted_pre, client):
    import dask.dataframe as dd

    n = len(fitted_pre.feature_names_)
    common = dict(preprocessor=fitted_pre, epochs=4, batch_size=128, verbose=0)

    def federated(urls, **kw):
        return daskml_scale.fit(build_model(n), frames(urls, "train"), client=sites_client,
                                validation_data=frames(urls, "val"), strategy=daskml_scale.Federated(**kw), **common)

    iid = federated(iid_site_data)
    pooled = [dd.concat([daskml_scale.read_csv(iid_site_data[(name, s)]) for s in SITES]) for name in ("train", "val")]
    # the same rows pooled, on two workers averaged once per local epoch: the same algorithm, other cuts of rows
    central = daskml_scale.fit(build_model(n), pooled[0], client=client, validation_data=pooled[1],
                               strategy=daskml_scale.ModelAveraging(), **common)
    assert iid.history["val_loss"][-1] <= 1.1 * central.history["val_loss"][-1]
    fed, prox = federated(site_data), federated(site_data, mu=0.1)
    print("val_loss iid", iid.history["val_loss"], "pooled", central.history["val_loss"],
          "non-iid fedavg", fed.history["val_loss"], "fedprox", prox.history["val_loss"])
    assert prox.history["val_loss"][-1] <= 1.1 * fed.history["val_loss"][-1]
    assert fed.history["val_loss"][-1] < 0.5 * fed.history["val_loss"][0]
    assert all(x > 0 for x in fed.history["fed_update_norm"])
    assert prox.daskml_summary["mu"] == 0.1


# ---------------------------------------------------------------- privacy options
def test_privacy_arguments_are_clear():
    with pytest.raises(ValueError, match="noise_multiplier needs clip_norm"):
        daskml_scale.Federated(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        daskml_scale.Federated(clip_norm=0)
    with pytest.raises(ValueError, match="optimizer_state='reset'"):
        daskml_scale.Federated(clip_norm=1.0, optimizer_state="average")
    with pytest.raises(ValueError, match="secure_aggregation"):
        daskml_scale.Federated(secure_aggregation="yes")
    assert daskml_scale.Federated(clip_norm=1.0).slots == "reset"
    assert daskml_scale.Federated().slots == "average"


def test_secure_masks_cancel_in_the_sum_and_hide_each_update():
    from daskml_scale.training import federated_privacy as p

    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=2000) * 3 for s in ("a", "b", "c")}
    keys = {s: p.hold_update("unit", s, 0, xs[s]) for s in xs}
    answers = {s: p.masked_update("unit", s, 0, keys) for s in xs}
    np.testing.assert_allclose(p.unmasked_sum(list(answers.values())), sum(xs.values()), atol=1e-6)
    for s in xs:  # one answer alone says nothing of its update
        assert abs(np.corrcoef(p.decode(answers[s]), xs[s])[0, 1]) < 0.15
    with pytest.raises(Exception, match="already answered"):
        p.masked_update("unit", "a", 0, keys)
    # c drops out after step 1: a and b reveal their masks with c, and the sum of a and b is exact
    keys = {s: p.hold_update("unit", s, 1, xs[s]) for s in xs}
    answers = {s: p.masked_update("unit", s, 1, keys) for s in ("a", "b")}
    wrong = p.unmasked_sum(list(answers.values()))
    assert np.max(np.abs(wrong - xs["a"] - xs["b"])) > 1e3  # the masks with c do not cancel by themselves
    reveals = [p.reveal_masks("unit", s, 1, {"c": keys["c"]}, 2000) for s in answers]
    np.testing.assert_allclose(p.unmasked_sum(list(answers.values()), reveals), xs["a"] + xs["b"], atol=1e-6)
    with pytest.raises(Exception, match="at least two sites"):
        p.masked_update("unit", "a", 2, {"a": keys["a"]})
    with pytest.raises(Exception, match="fixed-point range"):
        p.encode(np.array([1e30]))


def test_clipping_bounds_the_norm():
    from daskml_scale.training import federated_privacy as p

    update = [np.full((3, 4), 2.0), np.full(5, -1.0)]
    clipped, norm, was = p.clip_update(update, 1.0)
    assert was and norm == pytest.approx(np.sqrt(12 * 4 + 5))
    assert np.sqrt(sum(np.sum(c * c) for c in clipped)) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped[0] / clipped[0].flat[0], 1.0)  # the direction is kept
    same, _, was = p.clip_update(update, 100.0)
    assert not was and all(np.array_equal(a, b) for a, b in zip(same, update))
    assert p.noise_std(1.5, 0.2, 3) == pytest.approx(0.1)


def _both(a, b) -> str:
    """Two fits' histories and summaries side by side: what a failure message shows."""
    import logging

    keys = sorted(set(a.history) | set(b.history))
    lines = [f"{k}: {a.history.get(k)} | {b.history.get(k)}" for k in keys]
    for h in (a, b):
        s = h.daskml_summary
        lines.append(f"summary: { {k: s[k] for k in sorted(s) if not isinstance(s[k], (dict, list))} }")
    lines.append(f"keras: floatx={__import__('keras').config.floatx()} "
                 f"policy={__import__('keras').config.dtype_policy().name}; "
                 f"daskml_scale.training config: {__import__('dask').config.get('daskml_scale.training', {})}; "
                 f"fit logger level {logging.getLogger('daskml_scale.fit').getEffectiveLevel()}")
    return "\n".join(lines)


def _recorded(monkeypatch, module, name):
    """Calls of ``module.name`` in this (the driver's) process: their arguments, in order."""
    calls = []
    plain = getattr(module, name)

    def record(*args, **kwargs):
        calls.append(args)
        return plain(*args, **kwargs)

    monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.slow
def test_secure_aggregation_trains_as_fedavg_and_the_driver_sees_masked_updates_only(
        sites_client, site_data, fitted_pre, monkeypatch):
    from daskml_scale.training import federated, federated_privacy

    n = len(fitted_pre.feature_names_)
    common = dict(preprocessor=fitted_pre, epochs=2, batch_size=256, verbose=0, client=sites_client,
                  validation_data=frames(site_data, "val"), seed=0)
    aggregated = _recorded(monkeypatch, federated.Federated, "_aggregate")
    plain = daskml_scale.fit(build_model(n), frames(site_data, "train"), strategy=daskml_scale.Federated(), **common)
    plain_updates = {s: r["update"] for s, r in aggregated[0][2].items()}  # round 0, per site
    aggregated.clear()
    answers = _recorded(monkeypatch, federated_privacy, "unmasked_sum")
    secure = daskml_scale.fit(build_model(n), frames(site_data, "train"),
                              strategy=daskml_scale.Federated(secure_aggregation=True), **common)
    # the same algorithm: the same losses, from a sum the driver never saw the parts of
    why = _both(plain, secure)
    np.testing.assert_allclose(secure.history["loss"], plain.history["loss"], rtol=1e-3, err_msg=why)
    np.testing.assert_allclose(secure.history["val_loss"], plain.history["val_loss"], rtol=1e-3, err_msg=why)
    assert secure.history["fed_sites_summed"] == [2.0, 2.0]
    assert secure.daskml_summary["secure_aggregation"] is True
    for _, _, done, _ in aggregated:  # what the sites answered in the clear: no update, no slots
        for result in done.values():
            assert "update" not in result and "optimizer" not in result and len(result["public_key"]) == 32
    round0 = answers[0][0]
    assert len(round0) == 2
    rows = {s: secure.history[f"fed_samples_{s}"][0] for s in SITES}
    for s, masked in zip(sorted(SITES), round0):
        true = np.concatenate([u.ravel() for u in plain_updates[s]]) * rows[s]
        assert masked.dtype == np.uint64 and len(masked) >= len(true)
        decoded = federated_privacy.decode(masked)[:len(true)]
        assert abs(np.corrcoef(decoded, true)[0, 1]) < 0.2, s
    total = federated_privacy.unmasked_sum(round0)[:len(true)]
    expected = sum(np.concatenate([u.ravel() for u in plain_updates[s]]) * rows[s] for s in SITES)
    np.testing.assert_allclose(total, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.slow
def test_dp_fedavg_clips_every_site_and_adds_noise_of_the_stated_scale(sites_client, site_data, fitted_pre):
    n = len(fitted_pre.feature_names_)
    clip = 0.05
    common = dict(preprocessor=fitted_pre, epochs=1, batch_size=256, verbose=0, client=sites_client, seed=0)

    def weights(**kw):
        model = build_model(n)
        h = daskml_scale.fit(model, frames(site_data, "train"),
                             strategy=daskml_scale.Federated(clip_norm=clip, **kw), **common)
        return h, np.concatenate([np.ravel(w) for w in model.get_weights()])

    quiet, w0 = weights()
    assert quiet.history["fed_sites_clipped"] == [2.0]  # a whole local epoch moves further than 0.05
    assert quiet.history["fed_update_norm"][0] <= clip * (1 + 1e-6)
    assert quiet.history["fed_noise_std"] == [0.0] and quiet.history["fed_clip_norm"] == [clip]
    noisy, w1 = weights(noise_multiplier=1.0)
    assert noisy.history["fed_noise_std"] == [pytest.approx(clip / 2)]
    spread = float(np.std(w1 - w0))
    assert 0.8 * clip / 2 < spread < 1.2 * clip / 2, (spread, _both(quiet, noisy))
    secure, w2 = weights(secure_aggregation=True)  # clipping and the clipped count through the masked sum
    assert secure.history["fed_sites_clipped"] == [2.0]
    np.testing.assert_allclose(w2, w0, atol=1e-4)
