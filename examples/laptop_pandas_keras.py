"""The laptop version: pandas + Keras in one process.

Compare with ``daskml_scale_version.py``: the transform and the model are the same
lines; the lines marked ``# <- changes`` there are all that changes.

Run: ``.venv/bin/python examples/laptop_pandas_keras.py`` (after ``make demo``, which
writes the CSV shards under ``demo-output/data``).
"""

from __future__ import annotations

import glob

import keras
import numpy as np
import pandas as pd

NUMERIC = ["carat", "depth", "table", "x", "y", "z", "volume"]
CATEGORICAL = ["cut", "color", "clarity"]


def transform(df: pd.DataFrame) -> pd.DataFrame:
    """The user's pandas code: derived columns and a log target."""
    out = df.copy()
    out["volume"] = out["x"] * out["y"] * out["z"]
    out["log_price"] = np.log(out["price"].astype("float64"))
    return out


def build_model(n_features: int) -> keras.Model:
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse", metrics=["mae"])
    return model


def features(df: pd.DataFrame, stats: dict) -> np.ndarray:
    num = (df[NUMERIC].fillna(stats["mean"]) - stats["mean"]) / stats["std"]
    cat = pd.get_dummies(df[CATEGORICAL]).reindex(columns=stats["dummies"], fill_value=0)
    return np.hstack([num.to_numpy("float32"), cat.to_numpy("float32")])


def main() -> None:
    train = transform(pd.concat(map(pd.read_csv, sorted(glob.glob("demo-output/data/train/*.csv")))))
    test = transform(pd.concat(map(pd.read_csv, sorted(glob.glob("demo-output/data/test/*.csv")))))
    stats = {"mean": train[NUMERIC].mean(), "std": train[NUMERIC].std(ddof=0),
             "dummies": list(pd.get_dummies(train[CATEGORICAL]).columns)}
    X, y = features(train, stats), train["log_price"].to_numpy("float32")

    model = build_model(X.shape[1])
    model.fit(X, y, epochs=5, batch_size=256, validation_data=(features(test, stats), test["log_price"]))
    model.save("demo-output/laptop.keras")

    pred = test[["id", "price"]].assign(prediction=model.predict(features(test, stats), batch_size=8192)[:, 0])
    pred.to_csv("demo-output/laptop-predictions.csv", index=False)


if __name__ == "__main__":
    main()
