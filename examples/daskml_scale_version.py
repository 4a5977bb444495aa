"""The same job as ``laptop_pandas_keras.py``, data-parallel on a Dask cluster.

``transform`` and ``build_model`` are the laptop's lines, unchanged. What changes is
marked ``# <- changes``: connect to a cluster, read with daskml_scale, let a
Preprocessor fit the statistics (one pass over all partitions) instead of the
hand-written ``features``, ``daskml_scale.fit`` instead of ``model.fit``, one bundle
file instead of a .keras file, and ``predict_files`` (one output per input file,
atomic, resumable) instead of ``model.predict`` + ``to_csv``.

For a remote cluster and S3 data only the address and the URLs change
(see ``remote_s3.py``).

Run: ``.venv/bin/python examples/daskml_scale_version.py`` (after ``make demo``).
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

import daskml_scale  # <- changes

NUMERIC = ["carat", "depth", "table", "x", "y", "z", "volume"]
CATEGORICAL = ["cut", "color", "clarity"]


def transform(df: pd.DataFrame) -> pd.DataFrame:
    """The user's pandas code: derived columns and a log target."""
    out = df.copy()
    out["volume"] = out["x"] * out["y"] * out["z"]
    if "price" in out.columns:  # <- changes: the same function runs at prediction time
        out["log_price"] = np.log(out["price"].astype("float64"))
    return out


def build_model(n_features: int) -> keras.Model:
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse", metrics=["mae"])
    return model


def main() -> None:
    client = daskml_scale.connect()  # <- changes: a LocalCluster here; connect("tcp://scheduler:8786") on a cluster
    train = daskml_scale.read_csv("demo-output/data/train/*.csv")  # <- changes
    test = daskml_scale.read_csv("demo-output/data/test/*.csv")  # <- changes
    pre = daskml_scale.Preprocessor(target="log_price", numeric=NUMERIC, categorical=CATEGORICAL,  # <- changes
                                    transform=transform).fit(train, client=client)

    model = build_model(pre.n_features_)
    daskml_scale.fit(model, train, preprocessor=pre, epochs=5, batch_size=256, validation_data=test,  # <- changes
                     strategy=daskml_scale.ModelAveraging(sync_every=16), client=client)
    daskml_scale.save_bundle(model, pre, "demo-output/daskml.bundle")  # <- changes

    # a transform defined in a script cannot be imported back by name: hand it to load_bundle
    bundle = daskml_scale.load_bundle("demo-output/daskml.bundle", transform=transform)  # <- changes
    report = daskml_scale.predict_files(bundle, "demo-output/data/test/*.csv",  # <- changes
                                        "demo-output/daskml-predictions/", keep=["id", "price"], client=client)
    print(report)
    client.close()


if __name__ == "__main__":  # worker processes re-import this file: keep the work under the guard
    main()
