from __future__ import annotations

import numpy as np
import pytest

import daskml_scale
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform, write_csv_shards


def build_model(n_features: int, seed: int = 0, lr: float = 2e-3, batchnorm: bool = False):
    import keras

    with daskml_scale.seeded(seed):
        layers = [keras.Input((n_features,)), keras.layers.Dense(32, activation="relu")]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers.append(keras.layers.Dense(1))
        model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse", metrics=["mae"])
    return model


def normalized_model(n_features: int):
    """A model with a Normalization layer first (common in Keras code): its weights hold
    an int64 count beside the floats."""
    import keras

    norm = keras.layers.Normalization()
    norm.adapt(np.random.default_rng(0).random((640, n_features)).astype(np.float32))
    with daskml_scale.seeded(0):
        model = keras.Sequential([keras.Input((n_features,)), norm, keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
    assert any(v.dtype != "float32" for v in model.weights)
    return model


def single_process_sgd(model, parts, batch: int, epochs: int) -> int:
    """The reference: per step, one optimizer step on the mean loss of the union of the
    workers' batches (the row-weighted mean of their batch gradients), in this process,
    with Keras's own ``train_on_batch`` (any backend)."""
    steps = max(int(np.ceil(len(X) / batch)) for X, _ in parts)
    for _ in range(epochs):
        for i in range(steps):
            xs = [X[i * batch:(i + 1) * batch] for X, _ in parts]
            ys = [y[i * batch:(i + 1) * batch] for _, y in parts]
            model.train_on_batch(np.concatenate(xs), np.concatenate(ys))
    return steps


def make_preprocessor():
    return daskml_scale.Preprocessor(
        target="log_price", numeric=DIAMONDS_NUMERIC + ["volume"], categorical=DIAMONDS_CATEGORICAL,
        transform=diamonds_transform,
    )


class Data:
    def __init__(self, root, train, val):
        self.root = root
        self.train = train
        self.val = val

    def ddf(self, **kw):
        return daskml_scale.read_csv(str(self.root / "train" / "*.csv"), **kw)

    def val_ddf(self):
        return daskml_scale.read_csv(str(self.root / "val" / "*.csv"))


@pytest.fixture(scope="session")
def diamond_data(tmp_path_factory):
    """The public diamonds table: 24,000 training rows in 6 shards, 4,000 held out."""
    df = diamonds().sample(frac=1.0, random_state=0).reset_index(drop=True)
    train, val = df.iloc[:24_000], df.iloc[24_000:28_000]
    root = tmp_path_factory.mktemp("diamond-train")
    write_csv_shards(train, str(root / "train"), 6)
    write_csv_shards(val, str(root / "val"), 2)
    return Data(root, train, val)


@pytest.fixture(scope="session")
def fitted_pre(diamond_data):
    return make_preprocessor().fit(diamond_data.train)


class Flights:
    """The public NYC flights 2013 table: ~300k training rows in 8 shards, 10% held out."""

    def __init__(self, root, train, val, pre):
        self.root = root
        self.train = train
        self.val = val
        self.pre = pre


@pytest.fixture(scope="session")
def flights_data(tmp_path_factory):
    from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform

    table = flights()
    held = np.random.default_rng(0).random(len(table)) < 0.1
    train, val = table[~held], table[held]
    root = tmp_path_factory.mktemp("flights")
    write_csv_shards(train, str(root / "train"), 8)
    write_csv_shards(val, str(root / "val"), 2)
    pre = daskml_scale.Preprocessor(
        target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL, transform=flights_transform,
    ).fit(train)
    return Flights(root, train, val, pre)
