"""fit_groups with a group larger than ``max_group_rows``: it is not shuffled into one
partition but trained with fit() over its rows where they are; every other group as usual."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import daskml_scale
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform
from daskml_scale.exceptions import ArgumentError

EPOCHS, BATCH, VAL, SEED = 3, 32, 0.2, 5


def build_model(n_features: int):
    import keras

    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def preprocessor():
    return daskml_scale.Preprocessor(target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL,
                                     transform=flights_transform)


@pytest.fixture(scope="module")
def table():
    """Real flights: the busiest aircraft (its rows spread over every partition) and 12
    ordinary ones with 60-120 flights."""
    df = flights().iloc[:80000]
    counts = df["tailnum"].value_counts()
    busiest = counts.index[0]
    ordinary = sorted(counts[(counts >= 60) & (counts <= 120)].index)[:12]
    rows = df[df["tailnum"].isin([busiest, *ordinary])].sort_values("id").reset_index(drop=True)
    return rows, busiest, ordinary, int(counts.iloc[0])


def test_a_group_over_max_group_rows_is_trained_where_its_rows_are(client, table):
    import dask.dataframe as dd

    df, busiest, ordinary, n_busiest = table
    ddf = dd.from_pandas(df, npartitions=4)
    pre = preprocessor()
    models = daskml_scale.fit_groups(build_model, ddf, by="tailnum", preprocessor=pre, epochs=EPOCHS,
                                     batch_size=BATCH, validation_fraction=VAL, min_rows=20, seed=SEED,
                                     fallback=None, client=client, max_group_rows=n_busiest - 1)
    # one group trained apart; had its rows also gone through the shuffle, it would be trained twice (an error)
    assert models.summary_["large_groups"] == 1
    assert models.summary_["partitions"] >= 1
    assert sorted(models.groups_) == sorted([busiest, *ordinary])
    usable = df[(df.tailnum == busiest) & df.arr_delay.notna() & df.air_time.notna() & df.dep_delay.notna()]
    h = models.history_
    mine = h[h.group == busiest].sort_values("epoch")
    assert len(mine) == EPOCHS and mine["loss"].notna().all() and mine["val_loss"].notna().all()
    assert 0.7 * len(usable) < int(mine["rows"].iloc[0]) < 0.9 * len(usable)  # its training rows (20% held out)
    assert mine["loss"].iloc[-1] < mine["loss"].iloc[0]
    # the group's model is a plain Keras model, trained: better than its starting weights on its own rows,
    # and what daskml_scale.fit makes of the group's rows from the same starting weights
    X, y = pre.transform(usable)
    start = build_model(pre.n_features_)
    start.set_weights(models.initial_weights_)
    trained = models.model_for(busiest)
    mse = lambda m: float(np.mean((m.predict(X, verbose=0).ravel() - y) ** 2))  # noqa: E731
    assert mse(trained) < mse(start)
    by_hand = build_model(pre.n_features_)
    by_hand.set_weights(models.initial_weights_)
    daskml_scale.fit(by_hand, ddf[ddf.tailnum == busiest], preprocessor=pre, epochs=EPOCHS, batch_size=BATCH,
                     validation_fraction=VAL, client=client, seed=SEED, verbose=0)
    for a, b in zip(by_hand.get_weights(), models.weights_for(busiest)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    # the others are trained in their partitions as usual, each from the same starting weights
    for key in ordinary[:3]:
        assert not np.allclose(models.weights_for(key)[0], models.initial_weights_[0])


def test_without_large_groups_nothing_changes_and_bad_values_are_clear(client, table):
    df, busiest, ordinary, n_busiest = table
    small = df[df.tailnum.isin(ordinary)]
    common = dict(by="tailnum", preprocessor=preprocessor(), epochs=1, batch_size=BATCH, min_rows=20, seed=SEED,
                  fallback=None, client=client)
    off = daskml_scale.fit_groups(build_model, small, max_group_rows="off", **common)
    counted = daskml_scale.fit_groups(build_model, small, max_group_rows=10_000, **common)
    assert off.summary_["large_groups"] == counted.summary_["large_groups"] == 0
    for key in ordinary:
        for a, b in zip(off.weights_for(key), counted.weights_for(key)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ArgumentError, match="max_group_rows"):
        daskml_scale.fit_groups(build_model, small, max_group_rows=0, **common)
    with pytest.raises(ArgumentError, match="per_group_scaling"):
        daskml_scale.fit_groups(build_model, df, max_group_rows=n_busiest - 1, per_group_scaling=True,
                                **{**common, "preprocessor": preprocessor()})
