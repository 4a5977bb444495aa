"""daskml_scale: train and serve pandas + Keras models at scale on Dask.

Everything a user imports lives in this namespace; ``__all__`` is kept honest by
``tests/test_api.py``.
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from daskml_scale import config  # noqa: E402  (registers the dask.config defaults)
from daskml_scale.cluster import KerasWorkerPlugin, connect  # noqa: E402
from daskml_scale.exceptions import (  # noqa: E402
    BadRowError,
    BundleError,
    ClusterError,
    DaskmlScaleError,
    DaskmlScaleWarning,
    DataError,
    EmptyFileError,
    GPUUnavailableError,
    MissingColumnError,
    NonFiniteValueError,
    NotFittedError,
    TrainingError,
    UnsafeBundleError,
    WorkersLostError,
)

from daskml_scale.io import bad_rows_report, read_csv, read_parquet  # noqa: E402
from daskml_scale.preprocessing import Preprocessor  # noqa: E402

# serving (imports starlette only when an app is built)
from daskml_scale.serving import create_app, serve  # noqa: E402
from daskml_scale.training import ModelAveraging, ParameterServer, fit  # noqa: E402

# prediction
from daskml_scale.bundle import Bundle, load_bundle, save_bundle  # noqa: E402
from daskml_scale.predict import PredictReport, predict, predict_files  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "config",
    "connect",
    "KerasWorkerPlugin",
    # data
    "read_csv",
    "read_parquet",
    "bad_rows_report",
    "Preprocessor",
    # serving
    "create_app",
    "serve",
    # training
    "fit",
    "ModelAveraging",
    "ParameterServer",
    # prediction
    "Bundle",
    "save_bundle",
    "load_bundle",
    "predict",
    "predict_files",
    "PredictReport",
    # errors
    "DaskmlScaleError",
    "DaskmlScaleWarning",
    "ClusterError",
    "GPUUnavailableError",
    "DataError",
    "MissingColumnError",
    "BadRowError",
    "EmptyFileError",
    "NonFiniteValueError",
    "NotFittedError",
    "BundleError",
    "UnsafeBundleError",
    "TrainingError",
    "WorkersLostError",
]
