"""CSV shards -> predictions CSV: predict_files on 2 workers against the alternatives.

    .venv/bin/python benchmarks/bench_predict.py [--copies 40] [--shards 16] [--keep id|all]
                                                 [--skip-naive] [--skip-files] [--quick] [--rounds N]

Everything is measured in the same run, on the same machine, with the method of
``benchmarks/_method.py``: one warm-up each, then interleaved rounds, medians with
min and max; results in ``benchmarks/results/predict.json``.

* ours  predict_files(bundle, in/, out/) on a 2-worker LocalCluster (1 thread each),
        its default batch size (``daskml_scale.predict.batch-size``, 8,192 rows);
* (a)   the best single-process script (the baseline): pandas read_csv(engine="pyarrow"),
        Preprocessor.transform, the model through a tf.function on 8,192-row batches
        (TensorFlow on every core), pyarrow.csv.write_csv;
* (a')  the same script with DataFrame.to_csv;
* (b)   naive Dask, as a user would write it: dd.read_csv, map_partitions with the model
        captured in a closure calling model.predict(X, batch_size=8192, verbose=0),
        dd.to_csv. (``model.predict``'s default batch size, 32, would make it several
        times slower; the batch size is the one a user who read the Keras docs passes.)

Then in-memory throughput against the raw model(x) in large batches in one process
(TensorFlow using every core), all on the same feature matrix persisted on the workers:
predict() on a Dask array with a loaded bundle and with a live Keras model (the same
work as the raw call), and on a Dask DataFrame of the features (adds the preprocessor's
arithmetic); then the full pipeline (user transform + one-hot + model) against its
single-process version. ``--skip-files`` runs only this part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from _method import Benchmark, Ratio, Variant, add_arguments  # noqa: E402

BATCH = 8192  # rows per model call in the single-process script
NAIVE_BATCH = 8192  # model.predict(batch_size=...) in the naive Dask script


def _rows_per_s(fn: Callable[[], Any], rows: int) -> Callable[[], dict]:
    """``fn`` as a variant that also reports millions of rows per second."""

    def run() -> dict:
        t = time.perf_counter()
        fn()
        secs = time.perf_counter() - t
        return {"seconds": secs, "mrows_s": rows / secs / 1e6}

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=None, help="diamonds copies, 53,940 rows each (default 40; --quick: 4)")
    ap.add_argument("--shards", type=int, default=None, help="CSV input files (default 16; --quick: 4)")
    ap.add_argument("--keep", default="id", help="input columns written next to the prediction: id | all")
    ap.add_argument("--skip-naive", action="store_true", help="leave out (b), naive Dask")
    ap.add_argument("--skip-files", action="store_true", help="only the in-memory figures")
    add_arguments(ap)
    args = ap.parse_args()
    args.copies = args.copies if args.copies is not None else (4 if args.quick else 40)
    args.shards = args.shards if args.shards is not None else (4 if args.quick else 16)

    import dask
    import dask.dataframe as dd
    import keras
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import tensorflow as tf

    import daskml_scale
    from daskml_scale import Preprocessor, load_bundle, predict, predict_files, save_bundle
    from daskml_scale.datasets import DIAMONDS_CATEGORICAL, DIAMONDS_NUMERIC, diamonds, diamonds_transform
    from daskml_scale.io.writers import frame_to_csv

    bench = Benchmark.from_args("predict", args, description="batch prediction: CSV -> predictions CSV, and in memory")
    our_batch = dask.config.get("daskml_scale.predict.batch-size", None)
    keep_cols = ["id"] if args.keep == "id" else None  # None: every input column
    root = tempfile.mkdtemp(prefix="bench-predict-")
    try:
        # ------------------------------------------------------------------ data, model
        t = time.perf_counter()
        df = diamonds(copies=args.copies)
        rows = len(df)
        in_dir = os.path.join(root, "in")
        os.makedirs(in_dir)
        for i, idx in enumerate(np.array_split(np.arange(rows), args.shards)):
            with open(os.path.join(in_dir, f"part-{i:03d}.csv"), "wb") as f:
                frame_to_csv(df.iloc[idx], f)
        size = sum(os.path.getsize(os.path.join(in_dir, f)) for f in os.listdir(in_dir))
        print(f"data: {rows:,} rows in {args.shards} CSV shards, {size / 2**20:.0f} MiB ({time.perf_counter() - t:.1f} s)")
        bench.fact("rows", rows)
        bench.fact("csv_bytes", size)

        base = diamonds()
        pre = Preprocessor(
            target="log_price", numeric=DIAMONDS_NUMERIC + ["volume"], categorical=DIAMONDS_CATEGORICAL,
            transform=diamonds_transform,
        ).fit(base)
        X0, y0 = pre.transform(base)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((X0.shape[1],)), keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1),
        ])
        model.compile("adam", "mse")
        model.fit(X0, y0, epochs=1, batch_size=256, verbose=0)
        bundle_path = save_bundle(model, pre, os.path.join(root, "price.bundle"))
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        print(f"model: MLP 64-64-1 on {X0.shape[1]} features; tf threads intra={intra} (0 = all cores)")
        bench.fact("features", int(X0.shape[1]))

        forward = tf.function(
            lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, X0.shape[1]], tf.float32)]
        )

        def model_in_batches(X: np.ndarray, bs: int = BATCH) -> np.ndarray:
            return np.concatenate([forward(X[i : i + bs]).numpy() for i in range(0, len(X), bs)])[:, 0]

        model_in_batches(X0[:10000])  # trace once

        files = sorted(os.listdir(in_dir))
        single_settings = {
            "processes": 1, "reader": "pandas.read_csv(engine='pyarrow')", "transform": "Preprocessor.transform",
            "model": f"tf.function(model(x, training=False)) on {BATCH:,}-row batches",
            "tensorflow_threads": intra or "TensorFlow default (every core)", "writer": "pyarrow.csv.write_csv",
            "file_by_file": True, "keep": args.keep,
        }

        def single_process(writer: str) -> None:
            out_dir = os.path.join(root, f"out-single-{writer}")
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(out_dir)
            for name in files:
                part = pd.read_csv(os.path.join(in_dir, name), engine="pyarrow")
                X, _ = pre.transform(part)
                out = (part[keep_cols] if keep_cols else part).copy()
                out["prediction"] = model_in_batches(X)
                if writer == "pyarrow":
                    pacsv.write_csv(pa.Table.from_pandas(out, preserve_index=False), os.path.join(out_dir, name))
                else:
                    out.to_csv(os.path.join(out_dir, name), index=False)

        # ------------------------------------------------------------------ cluster
        client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None, memory_limit="6GiB")
        client.wait_for_workers(2)

        def ours() -> dict:
            report = predict_files(
                bundle_path, in_dir, os.path.join(root, "out-ours"), keep=args.keep, client=client, overwrite=True,
            )
            if not report.ok:
                return {"errors": len(report.failed), "error": report.failed[0]["error"]}
            if report.rows != rows:
                return {"errors": 1, "error": f"{report.rows:,} rows written out of {rows:,}"}
            return {"files": len(report.done)}

        def naive() -> None:
            out_dir = os.path.join(root, "out-naive")
            shutil.rmtree(out_dir, ignore_errors=True)
            ddf = dd.read_csv(os.path.join(in_dir, "*.csv"), blocksize=None, dtype={c: "float64" for c in DIAMONDS_NUMERIC})

            def part(p: pd.DataFrame) -> pd.DataFrame:
                X, _ = pre.transform(p)
                out = (p[keep_cols] if keep_cols else p).copy()
                out["prediction"] = model.predict(X, batch_size=NAIVE_BATCH, verbose=0)[:, 0]
                return out

            meta = (ddf._meta[keep_cols] if keep_cols else ddf._meta).assign(prediction=np.float32(0))
            ddf.map_partitions(part, meta=meta).to_csv(os.path.join(out_dir, "*.csv"), index=False)

        if not args.skip_files:
            variants = [
                Variant("ours", ours, "predict_files, 2 workers x 1 thread",
                        {"workers": 2, "threads_per_worker": 1, "batch_size": our_batch, "keep": args.keep,
                         "writer": "daskml_scale CSV writer (atomic)"}),
                Variant("single", lambda: single_process("pyarrow"), "(a) one process, pyarrow reader and writer",
                        single_settings),
                Variant("single_to_csv", lambda: single_process("pandas"), "(a') the same script with DataFrame.to_csv",
                        {**single_settings, "writer": "DataFrame.to_csv(index=False)"}),
            ]
            ratios = [
                Ratio("ours", "single", "CSV -> CSV: predict_files vs the best single-process script "
                      f"(pyarrow reader and writer, {BATCH:,}-row batches)", target=">= 1.3x", headline=True),
                Ratio("ours", "single_to_csv", "CSV -> CSV: predict_files vs the same script with DataFrame.to_csv"),
            ]
            if not args.skip_naive:
                variants.append(Variant(
                    "naive", naive, f"(b) naive Dask: model in a closure, model.predict(batch_size={NAIVE_BATCH}), dd.to_csv",
                    {"workers": 2, "threads_per_worker": 1, "reader": "dd.read_csv(blocksize=None)",
                     "model": f"captured in a map_partitions closure; model.predict(X, batch_size={NAIVE_BATCH}, verbose=0)",
                     "writer": "dd.to_csv(index=False)"},
                ))
                ratios.append(Ratio("ours", "naive", "CSV -> CSV: predict_files vs naive Dask "
                                    f"(closure, model.predict(batch_size={NAIVE_BATCH}), to_csv)", target=">= 3x"))
            cmp = bench.compare(
                "files", f"CSV -> predictions CSV, {rows:,} rows in {args.shards} files, keep={args.keep!r}",
                variants, ratios=ratios,
            )
            if cmp.sides["ours"].warmup:
                bench.fact("ours_first_call_s", cmp.sides["ours"].warmup["seconds"])
                bench.note(f"predict_files' first call (the warm-up: every worker loads the model) took "
                           f"{cmp.sides['ours'].warmup['seconds']:.2f} s")
            if not cmp.failed:  # ours writes what the single-process script writes
                a_out = pd.concat([pd.read_csv(os.path.join(root, "out-single-pyarrow", n)) for n in files], ignore_index=True)
                o_out = pd.concat([pd.read_csv(os.path.join(root, "out-ours", n)) for n in files], ignore_index=True)
                if keep_cols:
                    assert (a_out["id"].to_numpy() == o_out["id"].to_numpy()).all(), "ids differ from (a)"
                max_diff = float(np.abs(a_out["prediction"].to_numpy() - o_out["prediction"].to_numpy()).max())
                assert max_diff < 1e-3, f"predictions differ from (a) by up to {max_diff}"
                bench.fact("max_abs_diff_vs_single", max_diff)
                print(f"   max |ours - (a)| prediction = {max_diff:.2e}")

        # ------------------------------------------------------------------ in memory
        # the same feature matrix on both sides: raw model(x) in one process against
        # predict() on a Dask array persisted on the workers (the model only, as raw), and
        # on a Dask DataFrame of the same features (adds the preprocessor's arithmetic)
        import dask.array as da
        from distributed import wait

        X_all, _ = pre.transform(df)
        Xd = da.from_array(X_all, chunks=(-(-len(X_all) // 16), X_all.shape[1])).persist()
        wait(Xd)
        feat = [f"f{j}" for j in range(X_all.shape[1])]
        fdf = pd.DataFrame(X_all, columns=feat)
        fpre = Preprocessor(numeric=feat).fit(fdf.iloc[:1000])
        fpre.means_ = {c: 0.0 for c in feat}
        fpre.scales_ = {c: 1.0 for c in feat}
        fbundle = load_bundle(save_bundle(model, fpre, os.path.join(root, "features.bundle")))
        fddf = dd.from_pandas(fdf, npartitions=16).persist()
        wait(fddf)

        def run_predict(b: Any, d: Any) -> None:
            out = predict(b, d).persist()
            wait(out)
            del out

        check = predict(model, Xd).compute()[:, 0]
        assert np.allclose(check, model_in_batches(X_all), atol=1e-5), "predict(model, dask array) differs from model(x)"
        raw_settings = {"processes": 1, "model": f"tf.function(model(x, training=False)) on {BATCH:,}-row batches",
                        "tensorflow_threads": intra or "TensorFlow default (every core)", "data": "NumPy array in memory"}
        ours_settings = {"workers": 2, "threads_per_worker": 1, "chunks": 16, "batch_size": our_batch,
                         "data": "persisted on the workers"}
        bench.compare(
            "in_memory", f"in memory, {rows:,} rows x {X_all.shape[1]} features",
            [
                Variant("raw", _rows_per_s(lambda: model_in_batches(X_all), rows),
                        f"raw model(x) in one process, {BATCH:,}-row batches", raw_settings),
                Variant("bundle_array", _rows_per_s(lambda: run_predict(fbundle, Xd), rows),
                        "predict(bundle, dask array), 2 workers", ours_settings),
                Variant("model_array", _rows_per_s(lambda: run_predict(model, Xd), rows),
                        "predict(live Keras model, dask array), 2 workers: fingerprinted on every call, "
                        "shipped again only when it changed", ours_settings),
                Variant("bundle_frame", _rows_per_s(lambda: run_predict(fbundle, fddf), rows),
                        "predict(bundle, dask DataFrame of the features), 2 workers: adds the preprocessor",
                        {**ours_settings, "data": "Dask DataFrame persisted on the workers"}),
            ],
            show=["mrows_s"],
            ratios=[
                Ratio("bundle_array", "raw", "in memory: predict(bundle, dask array) vs raw model(x) in one process",
                      target=">= 0.9", headline=True),
                Ratio("model_array", "raw", "in memory: predict(live model, dask array) vs raw model(x)"),
                Ratio("bundle_frame", "raw", "in memory: predict(bundle, dask DataFrame of features) vs raw model(x)"),
            ],
        )

        # the full pipeline in memory: user transform + one-hot + model
        ddf = dd.from_pandas(df, npartitions=16).persist()
        wait(ddf)
        full = load_bundle(bundle_path)
        bench.compare(
            "full_pipeline", f"in memory, full pipeline (user transform + one-hot + model), {rows:,} rows",
            [
                Variant("single", _rows_per_s(lambda: model_in_batches(pre.transform(df)[0]), rows),
                        "one process: Preprocessor.transform + model(x)", {**raw_settings, "data": "pandas DataFrame"}),
                Variant("ours", _rows_per_s(lambda: run_predict(full, ddf), rows),
                        "predict(bundle, dask DataFrame), 2 workers", {**ours_settings, "data": "raw rows persisted"}),
            ],
            show=["mrows_s"],
            ratios=[Ratio("ours", "single", "in memory, full pipeline: predict() vs one process")],
        )
        client.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bench.write()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
