"""End-to-end demo on a local cluster (grows as the project does)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd

import daskml_scale


def main() -> int:
    out = os.path.abspath("demo-output")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        pd.DataFrame({"x": rng.normal(size=1000), "y": rng.integers(0, 5, 1000)}).to_csv(
            os.path.join(out, f"part-{i}.csv"), index=False
        )
    with daskml_scale.connect() as client:
        print("cluster:", client)
        print("dashboard:", client.dashboard_link)
        import dask.dataframe as dd

        ddf = dd.read_csv(os.path.join(out, "part-*.csv"))
        print(f"read {len(ddf)} rows in {ddf.npartitions} partitions, columns {list(ddf.columns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
