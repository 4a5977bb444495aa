"""The daskml_scale job on a remote Dask cluster with the data on S3.

Only the scheduler address and the URLs change from the laptop
(``daskml_scale_version.py``). The workers read the CSV files straight from S3 and the
bundle and the predictions are written back there; no training row passes through
this machine.

Usage::

    export DASK_SCHEDULER_ADDRESS=tcp://scheduler.example:8786
    export DASKML_S3_PREFIX=s3://my-bucket/diamonds   # data/, models/, predictions/ go under it
    export AWS_ENDPOINT_URL=https://s3.example.com    # only for S3-compatible stores (MinIO, ...)
    python examples/remote_s3.py --upload             # --upload: write the diamonds shards first

or ``python examples/remote_s3.py --scheduler tcp://... --prefix s3://bucket/path``.
Credentials come the usual boto way (environment, ~/.aws, instance role), on this
machine and on the workers.
"""

from __future__ import annotations

import argparse
import os
import sys

import daskml_scale
from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform, write_csv_shards


def build_model(n_features: int):
    import keras

    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse", metrics=["mae"])
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="daskml_scale on a remote scheduler with s3:// data")
    ap.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
                    help="scheduler address (default $DASK_SCHEDULER_ADDRESS)")
    ap.add_argument("--prefix", default=os.environ.get("DASKML_S3_PREFIX"),
                    help="s3://bucket/path for data, model and predictions (default $DASKML_S3_PREFIX)")
    ap.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                    help="S3-compatible endpoint (default $AWS_ENDPOINT_URL; none for AWS)")
    ap.add_argument("--upload", action="store_true", help="write the diamonds table as CSV shards first")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)
    if not args.scheduler or not args.prefix:
        ap.error("give --scheduler and --prefix (or DASK_SCHEDULER_ADDRESS and DASKML_S3_PREFIX)")
    prefix = args.prefix.rstrip("/")
    so = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}

    if args.upload:
        df = diamonds().sample(frac=1.0, random_state=0)
        write_csv_shards(df.iloc[len(df) // 10:], f"{prefix}/data/train", 8, storage_options=so)
        write_csv_shards(df.iloc[: len(df) // 10], f"{prefix}/data/test", 2, storage_options=so)

    client = daskml_scale.connect(args.scheduler)  # the only line that differs from the laptop
    try:
        train = daskml_scale.read_csv(f"{prefix}/data/train/*.csv", storage_options=so)
        test = daskml_scale.read_csv(f"{prefix}/data/test/*.csv", storage_options=so)
        # an importable transform (module:function) is stored in the bundle by name
        pre = daskml_scale.Preprocessor(target="log_price", numeric=DIAMONDS_NUMERIC + ["volume"],
                                        categorical=DIAMONDS_CATEGORICAL, transform=diamonds_transform)
        pre.fit(train, client=client)
        model = build_model(pre.n_features_)
        history = daskml_scale.fit(model, train, preprocessor=pre, validation_data=test, epochs=args.epochs,
                                   batch_size=256, strategy=daskml_scale.ModelAveraging(sync_every=16),
                                   checkpoint=f"{prefix}/checkpoints/", client=client, storage_options=so)
        bundle_url = f"{prefix}/models/diamonds.bundle"
        daskml_scale.save_bundle(model, pre, bundle_url, storage_options=so,
                                 training_summary={**history.daskml_summary, "history": history.history})
        report = daskml_scale.predict_files(bundle_url, f"{prefix}/data/test/", f"{prefix}/predictions/",
                                            keep=["id"], storage_options=so, client=client)
    finally:
        client.close()
    print(f"val MAE (log price) {history.history['val_mae'][-1]:.4f}; bundle {bundle_url}")
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
