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
from daskml_scale.live import LivePlot
from daskml_scale.groups import GroupBundle, GroupModels, fit_groups
from daskml_scale.plots import plot_history, plot_predictions
from daskml_scale.predict import PredictReport, predict, predict_files
from daskml_scale.preprocessing import Preprocessor
from daskml_scale.search import HyperParameters, SearchResult, search
from daskml_scale.seeding import seeded
from daskml_scale.serving import create_app, serve
from daskml_scale.training import (
    AllReduce, EpochRunner, Federated, Gossip, ModelAveraging, ParameterServer, Strategy, fit,
)

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
    "seeded",
    # training
    "fit",
    "Strategy",
    "EpochRunner",
    "AllReduce",
    "ModelAveraging",
    "ParameterServer",
    "Gossip",
    "Federated",
    # many models
    "fit_groups",
    "GroupModels",
    "GroupBundle",
    # hyperparameter search
    "search",
    "SearchResult",
    "HyperParameters",
    # prediction
    "Bundle",
    "save_bundle",
    "load_bundle",
    "predict",
    "predict_files",
    "PredictReport",
    # pictures and the live view (matplotlib and ipywidgets: the notebook extra)
    "plot_history",
    "plot_predictions",
    "LivePlot",
    # serving
    "create_app",
    "serve",
    # errors
    *_exceptions.__all__,
]

# the scikit-learn estimators, imported on first use: scikit-learn adds ~0.6 s to an import
_LAZY = {"KerasRegressor": "daskml_scale.sklearn", "KerasClassifier": "daskml_scale.sklearn",
         "dask_ml_compat": "daskml_scale.sklearn"}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'daskml_scale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
