"""Data benchmark: read generated CSV shards and preprocess them to float32 arrays.

daskml_scale on a 2-worker LocalCluster (read_csv + a fitted Preprocessor applied
partition by partition on the workers) against the same work in one process with
pandas (``engine="pyarrow"``), in the same run. Also times the one-pass
``Preprocessor.fit`` and compares partition sizes (the ``io.blocksize`` default).

Every side runs once as a warm-up, then in interleaved rounds (``benchmarks/_method.py``);
the figures are medians over the rounds, with min and max, and the results go to
``benchmarks/results/data.json``.

Run:  .venv/bin/python benchmarks/bench_data.py [--gb 1.0] [--blocksizes 16MiB,64MiB,256MiB] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import daskml_scale  # noqa: E402
from _method import Benchmark, Ratio, Variant, add_arguments  # noqa: E402
from daskml_scale.datasets import FLIGHTS_CATEGORICAL, FLIGHTS_NUMERIC, flights, flights_transform


def preprocessor():
    return daskml_scale.Preprocessor(
        target="arr_delay", numeric=FLIGHTS_NUMERIC, categorical=FLIGHTS_CATEGORICAL, transform=flights_transform,
    )


def make_shards(directory: str, gb: float, n_files: int) -> tuple[list[str], int]:
    """Copies of the flights table, lightly jittered, as CSV shards totalling ~gb GB."""
    base = flights()
    table = pa.Table.from_pandas(base, preserve_index=False)
    buf = pa.BufferOutputStream()
    pacsv.write_csv(table, buf)
    one = buf.getvalue().size
    copies = max(1, int(round(gb * 1e9 / one)))
    per_file = max(1, copies // n_files)
    paths = []
    rng = np.random.default_rng(0)
    rows = 0
    for i in range(n_files):
        frames = []
        for _ in range(per_file):
            c = base.copy()
            c["dep_delay"] = c["dep_delay"] + rng.integers(-2, 3, len(c))
            frames.append(c)
        df = pd.concat(frames, ignore_index=True)
        path = os.path.join(directory, f"part-{i:03d}.csv")
        pacsv.write_csv(pa.Table.from_pandas(df, preserve_index=False), path)
        paths.append(path)
        rows += len(df)
    return paths, rows


def single_process(paths: list[str], pre) -> dict:
    """The baseline: pandas' pyarrow reader (multi-threaded parse) and the transform, file by file."""
    cpu = time.process_time()
    n = 0
    for p in paths:
        df = pd.read_csv(p, engine="pyarrow")
        X, y = pre.transform(df)
        n += len(X)
    return {"rows": n, "cpu_s": time.process_time() - cpu}  # CPU of this process: every thread


def _workers_cpu(client) -> float:
    return sum(client.run(time.process_time).values())


def _rows(part, pre) -> int:
    X, y = pre.transform(part)
    return len(X)


def distributed(client, pattern: str, pre, blocksize: str) -> dict:
    import dask

    before = _workers_cpu(client)
    ddf = daskml_scale.read_csv(pattern, blocksize=blocksize)
    counts = [dask.delayed(_rows)(p, pre) for p in ddf.to_delayed()]
    n = sum(client.compute(counts, sync=True))
    return {"rows": n, "partitions": ddf.npartitions, "cpu_s": _workers_cpu(client) - before}


def _checked(fn, expected: dict):
    """``fn``, failing the round when its rows differ from the first side's (the single process)."""

    def run() -> dict:
        out = fn()
        want = expected.setdefault("rows", out["rows"])
        if out["rows"] != want:
            return {**out, "errors": 1, "error": f"{out['rows']:,} rows, the single process {want:,}"}
        return out

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=None, help="CSV size (default 1.0; --quick: 0.05)")
    ap.add_argument("--files", type=int, default=None, help="CSV shards (default 8; --quick: 4)")
    ap.add_argument("--blocksizes", default="16MiB,64MiB,256MiB")
    add_arguments(ap)
    args = ap.parse_args()
    args.gb = args.gb if args.gb is not None else (0.05 if args.quick else 1.0)
    args.files = args.files if args.files is not None else (4 if args.quick else 8)
    import dask

    default_bs = str(dask.config.get("daskml_scale.io.blocksize", "64MiB"))
    bench = Benchmark.from_args("data", args, description="read + preprocess CSV shards to float32 arrays")

    workdir = tempfile.mkdtemp(prefix="daskml-bench-data-")
    try:
        t = time.perf_counter()
        paths, rows = make_shards(workdir, args.gb, args.files)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"{len(paths)} CSV shards, {size / 1e9:.2f} GB, {rows:,} rows (written in {time.perf_counter() - t:.0f} s)")
        bench.fact("csv_bytes", size)
        bench.fact("rows", rows)
        pre = preprocessor().fit(flights())

        client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None, plugin=False)
        try:
            pattern = os.path.join(workdir, "*.csv")
            blocksizes = args.blocksizes.split(",")
            expected: dict = {}  # rows out of the transform (its row filter drops some), set by the single process
            single = Variant(
                "single", _checked(lambda: single_process(paths, pre), expected),
                "one process: pandas read_csv(engine='pyarrow') + Preprocessor.transform, file by file",
                {"processes": 1, "reader": "pandas.read_csv(engine='pyarrow'), multi-threaded parse",
                 "transform": "Preprocessor.transform per file", "files": len(paths)},
            )
            ours = [
                Variant(
                    f"ours_{bs}", _checked(lambda bs=bs: distributed(client, pattern, pre, bs), expected),
                    f"daskml_scale.read_csv + transform per partition, 2 workers x 1 thread, blocksize {bs}",
                    {"workers": 2, "threads_per_worker": 1, "reader": "daskml_scale.read_csv", "blocksize": bs},
                )
                for bs in blocksizes
            ]
            headline = default_bs if default_bs in blocksizes else blocksizes[0]
            read = bench.compare(
                "read_preprocess", f"read + preprocess {size / 1e9:.2f} GB of CSV ({rows:,} rows) to float32 arrays",
                [single, *ours], show=["cpu_s", "partitions"],
                ratios=[
                    Ratio(f"ours_{bs}", "single", f"read + preprocess, blocksize {bs}"
                          + (" (the default)" if bs == default_bs else "") + ", vs one process",
                          target=">= 1.6x", headline=bs == headline)
                    for bs in blocksizes
                ],
            )
            # two cores: no schedule finishes in less than half the CPU work it has to do
            sp, sp_cpu = read.median("single"), read.median("single", "cpu_s")
            ours_cpu = read.median(f"ours_{headline}", "cpu_s")
            if sp and sp_cpu and ours_cpu:
                bench.fact("ceiling_single_cpu", sp / (sp_cpu / 2))
                bench.fact("ceiling_ours_cpu", sp / (ours_cpu / 2))
                bench.note(
                    f"ceiling on 2 workers: the single process needs {sp_cpu:.2f} CPU-s (median), so no 2-core "
                    f"schedule of the same work beats it by more than {sp / (sp_cpu / 2):.2f}x; with our "
                    f"workers' own CPU work ({ours_cpu:.2f} CPU-s at {headline}) {sp / (ours_cpu / 2):.2f}x"
                )

            bench.compare(
                "preprocessor_fit", "Preprocessor.fit: one pass over the CSV shards",
                [
                    Variant("pandas", lambda: preprocessor().fit(pd.concat([pd.read_csv(p, engine="pyarrow") for p in paths])),
                            "one process: pandas read_csv(engine='pyarrow') of every file, concat, fit",
                            {"processes": 1, "reader": "pandas.read_csv(engine='pyarrow')"}),
                    Variant("ours", lambda: preprocessor().fit(daskml_scale.read_csv(pattern), client=client),
                            "Preprocessor.fit(daskml_scale.read_csv(...)), 2 workers x 1 thread",
                            {"workers": 2, "threads_per_worker": 1, "blocksize": default_bs}),
                ],
                ratios=[Ratio("ours", "pandas", "one-pass Preprocessor.fit vs pandas on the concatenated frame")],
            )
        finally:
            client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bench.write()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
