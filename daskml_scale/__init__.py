"""daskml_scale: train and serve pandas + Keras models at scale on Dask.

Everything a user imports lives in this namespace; ``__all__`` is kept honest by
``tests/test_api.py``. This module only re-exports: the Keras backend default and
the ``dask.config`` defaults are set by :mod:`daskml_scale.config`, imported first.
"""

from __future__ import annotations

from daskml_scale import config
from daskml_scale import exceptions as _exceptions
from daskml_scale._version import __version__
from daskml_scale.bundle import Bundle, load_bundle, save_bundle
from daskml_scale.cluster import KerasWorkerPlugin, connect
from daskml_scale.features import model_inputs
from daskml_scale.exceptions import *  # noqa: F403  (the names of exceptions.__all__)
from daskml_scale.io import bad_rows_report, read_csv, read_parquet
from daskml_scale.predict import PredictReport, predict, predict_files
from daskml_scale.preprocessing import Preprocessor
from daskml_scale.serving import create_app, serve
from daskml_scale.training import AllReduce, EpochRunner, ModelAveraging, ParameterServer, Strategy, fit

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
    "model_inputs",
    # training
    "fit",
    "Strategy",
    "EpochRunner",
    "AllReduce",
    "ModelAveraging",
    "ParameterServer",
    # prediction
    "Bundle",
    "save_bundle",
    "load_bundle",
    "predict",
    "predict_files",
    "PredictReport",
    # serving
    "create_app",
    "serve",
    # errors
    *_exceptions.__all__,
]
