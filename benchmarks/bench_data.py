"""Data benchmark: read generated CSV shards and preprocess them to float32 arrays.

daskml_scale on a 2-worker LocalCluster (read_csv + a fitted Preprocessor applied
partition by partition on the workers) against the same work in one process with
pandas (``engine="pyarrow"``), in the same run. Also times the one-pass
``Preprocessor.fit`` and compares partition sizes (the ``io.blocksize`` default).

Run:  .venv/bin/python benchmarks/bench_data.py [--gb 1.0] [--blocksizes 16MiB,64MiB,256MiB]
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

import daskml_scale
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


def single_process(paths: list[str], pre) -> tuple[float, int, float]:
    """(wall seconds, rows, CPU seconds of this process: every thread)."""
    t, cpu = time.perf_counter(), time.process_time()
    n = 0
    for p in paths:
        df = pd.read_csv(p, engine="pyarrow")
        X, y = pre.transform(df)
        n += len(X)
    return time.perf_counter() - t, n, time.process_time() - cpu


def _workers_cpu(client) -> float:
    return sum(client.run(time.process_time).values())


def _rows(part, pre) -> int:
    X, y = pre.transform(part)
    return len(X)


def distributed(client, pattern: str, pre, blocksize: str) -> tuple[float, int, int]:
    import dask

    t = time.perf_counter()
    ddf = daskml_scale.read_csv(pattern, blocksize=blocksize)
    counts = [dask.delayed(_rows)(p, pre) for p in ddf.to_delayed()]
    n = sum(client.compute(counts, sync=True))
    return time.perf_counter() - t, n, ddf.npartitions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--blocksizes", default="16MiB,64MiB,256MiB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="daskml-bench-data-")
    try:
        t = time.perf_counter()
        paths, rows = make_shards(workdir, args.gb, args.files)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"{len(paths)} CSV shards, {size / 1e9:.2f} GB, {rows:,} rows (written in {time.perf_counter() - t:.0f} s)")
        pre = preprocessor().fit(flights())

        client = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=None, plugin=False)
        try:
            pattern = os.path.join(workdir, "*.csv")
            blocksizes = args.blocksizes.split(",")
            for bs in blocksizes:  # warm up: the workers' imports, the page cache
                distributed(client, pattern, pre, bs)
            # the variants take turns, so that a slow spell of this shared machine hits them all
            times: dict[str, list[float]] = {"single": []}
            cpu: dict[str, list[float]] = {"single": []}
            nparts: dict[str, int] = {}
            for _ in range(args.repeat):
                secs, n_single, cpu_s = single_process(paths, pre)
                times["single"].append(secs)
                cpu["single"].append(cpu_s)
                for bs in blocksizes:
                    before = _workers_cpu(client)
                    secs, n, nparts[bs] = distributed(client, pattern, pre, bs)
                    cpu.setdefault(bs, []).append(_workers_cpu(client) - before)
                    assert n == n_single, (n, n_single)  # the same rows came out
                    times.setdefault(bs, []).append(secs)
            sp = min(times["single"])
            sp_cpu = min(cpu["single"])
            print(f"single process (pandas pyarrow engine + transform): {sp:.2f} s, {rows / sp:,.0f} rows/s, "
                  f"{sp_cpu:.2f} CPU-s (runs: {', '.join(f'{t:.2f}' for t in times['single'])})")
            best = None
            for bs in blocksizes:
                secs = min(times[bs])
                print(f"daskml_scale 2x1, blocksize {bs:>6} ({nparts[bs]} partitions): {secs:.2f} s = {sp / secs:.2f}x single, "
                      f"{min(cpu[bs]):.2f} CPU-s on the workers (runs: {', '.join(f'{t:.2f}' for t in times[bs])})")
                if best is None or secs < best[1]:
                    best = (bs, secs)
            # two cores: no schedule finishes in less than half the CPU work it has to do
            print(f"ceiling on 2 cores with the single process's own CPU work ({sp_cpu:.2f} CPU-s / 2): "
                  f"{sp / (sp_cpu / 2):.2f}x; with ours ({min(cpu[best[0]]):.2f} CPU-s / 2): {sp / (min(cpu[best[0]]) / 2):.2f}x")
            t = time.perf_counter()
            preprocessor().fit(daskml_scale.read_csv(pattern), client=client)
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            preprocessor().fit(pd.concat([pd.read_csv(p, engine="pyarrow") for p in paths]))
            fit_sp = time.perf_counter() - t
            print(f"Preprocessor.fit (one pass): daskml_scale {fit_s:.2f} s, single process {fit_sp:.2f} s = {fit_sp / fit_s:.2f}x")
            print(f"RESULT read+preprocess: best blocksize {best[0]}: {sp / best[1]:.2f}x the single process (target >= 1.6x)")
        finally:
            client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
