"""scikit-learn estimators over :func:`daskml_scale.fit`: :class:`KerasRegressor`, :class:`KerasClassifier`.

They work in scikit-learn's tooling (``clone``, ``Pipeline``, ``GridSearchCV``) and in
dask-ml's incremental searches (``HyperbandSearchCV`` drives ``partial_fit``); see
``docs/sklearn.md``.
"""

from __future__ import annotations

from daskml_scale.sklearn.dask_ml_compat import dask_ml_compat
from daskml_scale.sklearn.estimators import KerasClassifier, KerasRegressor

__all__ = ["KerasRegressor", "KerasClassifier", "dask_ml_compat"]
