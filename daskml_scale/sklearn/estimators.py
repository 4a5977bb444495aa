"""``KerasRegressor`` and ``KerasClassifier``: scikit-learn estimators over :func:`daskml_scale.fit`.

Thin shells, as xgboost.dask's estimators are over its ``train``: they map their
parameters onto a :class:`~daskml_scale.Preprocessor`, a compiled Keras model and the
arguments of :func:`daskml_scale.fit`, and turn the results of
:func:`daskml_scale.predict` (Dask input) or :meth:`Bundle.predict_frame` (in-memory
input) into the type that came in. Training is always :func:`daskml_scale.fit`,
data-parallel on the cluster, also when the estimator runs inside a task (a joblib Dask
backend, dask-ml's ``HyperbandSearchCV``): there it trains through the worker's client,
with its task seceded from the worker's thread pool.

scikit-learn's rules (``doc/developers/develop.rst``): ``__init__`` only stores its
arguments; ``fit`` returns ``self``; learned attributes end in ``_``; using an unfitted
estimator raises ``NotFittedError`` (scikit-learn's and daskml_scale's at once).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import weakref
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

from daskml_scale import backend
from daskml_scale._utils.client import default_client
from daskml_scale.exceptions import ArgumentError, NotFittedError
from daskml_scale.preprocessing import Preprocessor
from daskml_scale.sklearn import inputs
from daskml_scale.sklearn.classes import declare_classes, labels_of, typed_classes
from daskml_scale.sklearn.models import build_model, set_learning_rate

__all__ = ["KerasRegressor", "KerasClassifier"]


class _EstimatorNotFittedError(NotFittedError, _SklearnNotFittedError):
    """An estimator was used before ``fit``: both daskml_scale's and scikit-learn's ``NotFittedError``."""


#: model -> (training call, its bundle): what predictions load on the workers
_BUNDLES: "weakref.WeakKeyDictionary[Any, tuple[int, Any]]" = weakref.WeakKeyDictionary()
_TRAINED = itertools.count(1)


def _in_task() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def _cluster(client: Any, purpose: str) -> Iterator[Any]:
    """The client a fit uses: the given one; inside a Dask task the worker's, with the task
    seceded (its thread is free for the fit's own tasks); else the current client."""
    if client is not None:
        yield client
    elif not _in_task():
        yield default_client(None, purpose=purpose)
    else:
        from distributed import worker_client

        with worker_client() as c:
            yield c


class _KerasEstimator(BaseEstimator):
    """What the regressor and the classifier share (see :class:`KerasRegressor`)."""

    _task = "regression"

    def __init__(
        self,
        model: Any = None,
        *,
        model_kwargs: dict[str, Any] | None = None,
        learning_rate: float | None = None,
        preprocessor: Preprocessor | None = None,
        target: str | None = None,
        numeric: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        transform_fn: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        missing: str = "impute",
        max_categories: int = 1000,
        missing_target: str = "error",
        strategy: Any = None,
        epochs: int = 1,
        batch_size: int | None = None,
        validation_fraction: float | None = None,
        callbacks: Sequence[Any] | None = None,
        checkpoint: str | None = None,
        resume: bool = False,
        client: Any = None,
        seed: int | None = None,
        shuffle: bool = True,
        cache: bool | str = "auto",
        verbose: Any = "auto",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.model_kwargs = model_kwargs
        self.learning_rate = learning_rate
        self.preprocessor = preprocessor
        self.target = target
        self.numeric = numeric
        self.categorical = categorical
        self.transform_fn = transform_fn
        self.missing = missing
        self.max_categories = max_categories
        self.missing_target = missing_target
        self.strategy = strategy
        self.epochs = epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.callbacks = callbacks
        self.checkpoint = checkpoint
        self.resume = resume
        self.client = client
        self.seed = seed
        self.shuffle = shuffle
        self.cache = cache
        self.verbose = verbose
        self.storage_options = storage_options

    # ---------------------------------------------------------------- scikit-learn
    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # missing numbers are imputed with the mean (Preprocessor)
        tags.input_tags.categorical = True
        tags.input_tags.string = True
        tags.non_deterministic = True  # float sums on a cluster; with seed= and one model init, repeatable
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def __sklearn_clone__(self) -> "_KerasEstimator":
        """scikit-learn's clone, except that ``client`` is shared, not deep-copied."""
        from sklearn.base import clone

        params = self.get_params(deep=False)
        client = params.pop("client")
        return type(self)(**{k: clone(v, safe=False) for k, v in params.items()}, client=client)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (dask-ml ships estimators between tasks): the trained model as bytes,
        no client (a task uses its worker's)."""
        from daskml_scale.custom_objects import ship_model

        state = super().__getstate__()
        state = dict(state)
        state["client"] = None
        model = state.pop("model_", None)
        if model is not None:
            state["_model_bytes"] = ship_model(model, backend.model_to_bytes(model))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from daskml_scale.custom_objects import load_shipped_model

        state = dict(state)
        data = state.pop("_model_bytes", None)
        super().__setstate__(state)
        if data is not None:
            self.model_ = load_shipped_model(data)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise _EstimatorNotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call fit(X, y) before using it."
            )

    # ------------------------------------------------------------------ training
    def fit(self, X: Any, y: Any = None, *, validation_data: Any = None) -> "_KerasEstimator":
        """Train a new model on ``(X, y)`` with :func:`daskml_scale.fit`.

        Parameters
        ----------
        X : dask or pandas DataFrame, dask or NumPy array
            Raw rows (the Preprocessor's columns) or a 2-D array of features.
        y : str, Series or array
            The name of X's target column, or the targets (a Dask Series with a Dask
            DataFrame, a Dask array with a Dask array).
        validation_data : tuple (X, y), optional
            Rows to validate on after every epoch (``history_["val_loss"]``).

        Returns
        -------
        self
        """
        self._train(X, y, epochs=int(self.epochs), validation_data=validation_data, reset=True)
        return self

    def partial_fit(self, X: Any, y: Any = None) -> "_KerasEstimator":
        """One more epoch over ``(X, y)``, from the current weights and optimizer state.

        The epoch is one :func:`daskml_scale.fit` call, data-parallel over the cluster's
        workers (inside a Dask task, over the worker's client). The first call builds
        the model and fits the Preprocessor on this data; later calls keep both.
        ``checkpoint`` / ``resume`` do not apply here.

        Returns
        -------
        self
        """
        self._train(X, y, epochs=1, validation_data=None, reset=not hasattr(self, "model_"))
        return self

    def _train(self, X: Any, y: Any, *, epochs: int, validation_data: Any, reset: bool, classes: Any = None) -> None:
        from daskml_scale.training import fit

        pre_target = self.preprocessor.target if self.preprocessor is not None else None
        frame = inputs.training_frame(X, y, self.target or pre_target, missing_target=self.missing_target)
        if not reset:
            self._check_same_input(frame)
        val = None
        if validation_data is not None:
            Xv, yv = validation_data
            val = inputs.training_frame(Xv, yv, frame.target).data
        name = f"{type(self).__name__}.fit()"
        with _cluster(self.client, name) as client:
            if reset:
                pre = self._new_preprocessor(frame)
                if not hasattr(pre, "feature_names_"):
                    pre.fit(frame.data, client=client)
                if classes is not None:
                    declare_classes(pre, classes)
                self._check_task(pre)
                model = self._new_model(pre)
            else:
                pre, model = self.preprocessor_, self.model_
            history = fit(
                model, frame.data, preprocessor=pre, strategy=self.strategy, epochs=epochs,
                batch_size=self.batch_size, validation_data=val, validation_fraction=self.validation_fraction,
                callbacks=self.callbacks, checkpoint=self.checkpoint if reset else None,
                resume=bool(self.resume) if reset else False, client=client, seed=self.seed, shuffle=self.shuffle,
                cache=self.cache, verbose=self.verbose, storage_options=self.storage_options,
            )
        self._trained = next(_TRAINED)
        if reset:
            self.model_, self.preprocessor_ = model, pre
            self.history_ = {}
            self.n_features_in_ = len(frame.columns)
            if frame.kind in ("dask_frame", "pandas"):
                self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
            elif hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            self._fit_kind = frame.kind
            self._set_classes(pre, frame.target_dtype)
        for k, v in history.history.items():
            self.history_.setdefault(k, []).extend(float(x) for x in v)
        self.summary_ = dict(getattr(history, "daskml_summary", {}) or {})

    def _check_same_input(self, frame: inputs.TrainingFrame) -> None:
        if len(frame.columns) != self.n_features_in_:
            raise ArgumentError(
                f"X has {len(frame.columns)} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input (partial_fit continues the model fit built)"
            )

    def _new_preprocessor(self, frame: inputs.TrainingFrame) -> Preprocessor:
        if self.preprocessor is not None:
            pre = copy.deepcopy(self.preprocessor)
            if pre.target != frame.target:
                raise ArgumentError(
                    f"Expected the Preprocessor's target {pre.target!r} to be y's column. Received: {frame.target!r}"
                )
            if not hasattr(pre, "feature_names_") and pre.task == "auto":
                pre.task = self._task
            return pre
        numeric, categorical = inputs.feature_columns(
            None if self.numeric is None else list(self.numeric),
            None if self.categorical is None else list(self.categorical), frame.data, frame.columns,
        )
        if not numeric and not categorical:
            raise ArgumentError("Expected X with feature columns. Received: none besides the target")
        return Preprocessor(
            target=frame.target, numeric=numeric, categorical=categorical, transform=self.transform_fn,
            missing=self.missing, max_categories=self.max_categories, task=self._task,
            missing_target=self.missing_target,
        )

    def _check_task(self, pre: Preprocessor) -> None:
        if pre.task_ != self._task:
            raise ArgumentError(
                f"Expected a Preprocessor whose task is {self._task!r} for a {type(self).__name__}. "
                f"Received: task_={pre.task_!r}"
            )

    def _new_model(self, pre: Preprocessor) -> Any:
        n_classes = len(pre.classes_) if pre.classes_ is not None else None
        model = build_model(
            self.model, n_features=len(pre.feature_names_), task=self._task, n_classes=n_classes,
            kwargs=self.model_kwargs, seed=self.seed,
        )
        if self.learning_rate is not None:
            set_learning_rate(model, float(self.learning_rate))
        return model

    def _set_classes(self, pre: Preprocessor, dtype: Any) -> None:
        """Classifiers only: ``classes_``."""

    # ------------------------------------------------------------------ prediction
    def _bundle_of(self) -> Any:
        """The bundle of the fitted model, made once per training call (kept outside the
        estimator: predicting does not change it)."""
        from daskml_scale.bundle import Bundle, bundle_bytes

        held = _BUNDLES.get(self.model_)
        token = self.__dict__.get("_trained", 0)
        if held is not None and held[0] == token:
            return held[1]
        pre = self.preprocessor_
        # the estimator's own live model, not a file of unknown origin
        bundle = Bundle(bundle_bytes(self.model_, pre), safe_mode=False, transform=pre.transform_fn, lazy=True)
        _BUNDLES[self.model_] = (token, bundle)
        return bundle

    def _required_columns(self) -> list[str]:
        pre = self.preprocessor_
        if pre.transform_fn is None:
            return [*pre.numeric, *pre.categorical]
        return [str(c) for c in getattr(self, "feature_names_in_", [])]

    def _outputs(self, X: Any) -> tuple[Any, str]:
        """The prediction columns for ``X`` (a Dask DataFrame lazily, else pandas) and X's kind."""
        from daskml_scale.predict import predict

        self._check_fitted()
        kind = inputs.kind_of(X)
        frame = inputs.prediction_frame(X, kind, self.n_features_in_, self._required_columns(), type(self).__name__)
        bundle = self._bundle_of()
        if kind in ("dask_frame", "dask_array"):
            return predict(bundle, frame), kind
        return bundle.predict_frame(frame), kind

    def _as_input_kind(self, out: Any, kind: str, X: Any) -> Any:
        """A Series or DataFrame of outputs as the kind ``X`` was (1-D for one column)."""
        if kind in ("dask_frame", "pandas"):
            return out
        if kind == "numpy":
            return out.to_numpy()
        return out.to_dask_array(lengths=list(X.chunks[0]))

    def _true_and_predicted(self, X: Any, y: Any, method: Callable[[Any], Any]) -> tuple[np.ndarray, np.ndarray]:
        """(y, predictions) in memory, for a score."""
        import dask

        if isinstance(y, str) or y is None:
            name = y if isinstance(y, str) else self.preprocessor_.target
            if inputs.kind_of(X) not in ("dask_frame", "pandas") or name not in X.columns:
                raise inputs._missing_y_error()
            y = X[name]
        y_pred = method(X)
        y, y_pred = dask.compute(y, y_pred)
        return np.asarray(y), np.asarray(y_pred)

    # ------------------------------------------------------------------ the bundle
    def save(self, url: str, *, storage_options: dict[str, Any] | None = None, code: Any = None) -> str:
        """Write the fitted model and preprocessor as a bundle (:func:`daskml_scale.save_bundle`),
        ready for ``predict_files``, the CLI and the REST server; :meth:`load` reads it back."""
        from daskml_scale.bundle import save_bundle

        self._check_fitted()
        meta = {"estimator": {"class": type(self).__name__, "n_features_in": int(self.n_features_in_),
                              "feature_names_in": [str(c) for c in getattr(self, "feature_names_in_", [])] or None,
                              "kind": getattr(self, "_fit_kind", None), "params": self._json_params()}}
        classes = getattr(self, "classes_", None)
        if classes is not None:
            meta["estimator"]["classes"] = classes.tolist()
        return save_bundle(self.model_, self.preprocessor_, url, storage_options=storage_options,
                           training_summary=getattr(self, "summary_", None), metadata=meta, code=code)

    @classmethod
    def load(cls, url: str, *, storage_options: dict[str, Any] | None = None, safe_mode: bool = True,
             transform: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> "_KerasEstimator":
        """A fitted estimator from a bundle (:func:`daskml_scale.load_bundle`): it predicts and
        scores. Its model is loaded without its compile state, so training again starts
        with a new model (``fit``), or ``est.model_.compile(...)`` first for ``partial_fit``."""
        from daskml_scale.bundle import load_bundle

        bundle = load_bundle(url, storage_options=storage_options, safe_mode=safe_mode, transform=transform)
        info = ((bundle.metadata.get("user") or {}).get("estimator")) or {}
        est = cls(**{k: v for k, v in (info.get("params") or {}).items() if k in cls._get_param_names()})
        pre = bundle.preprocessor
        est.model_, est.preprocessor_ = bundle.model, pre
        est.n_features_in_ = int(info.get("n_features_in") or len(pre.input_schema_) - (pre.target in pre.input_schema_))
        names = info.get("feature_names_in")
        if names is None and info.get("kind") is None:
            names = [c for c in pre.input_schema_ if c != pre.target]
        if names:
            est.feature_names_in_ = np.asarray(names, dtype=object)
        est._fit_kind = info.get("kind") or "dask_frame"
        est.history_ = {}
        est.summary_ = dict(bundle.metadata.get("training_summary") or {})
        if "classes" in info:
            est.classes_ = np.asarray(info["classes"])
        elif pre.classes_ is not None:
            est.classes_ = np.asarray(pre.classes_, dtype=object)
        est._trained = next(_TRAINED)
        _BUNDLES[est.model_] = (est._trained, bundle)
        return est

    def _json_params(self) -> dict[str, Any]:
        simple = (str, int, float, bool, type(None))
        out = {}
        for k, v in self.get_params(deep=False).items():
            if isinstance(v, simple) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)):
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


class KerasRegressor(RegressorMixin, _KerasEstimator):
    """A scikit-learn regressor that trains a Keras model with :func:`daskml_scale.fit`.

    Parameters
    ----------
    model : keras.Model, callable or None
        A compiled Keras model (copied at every ``fit``: its weights are the starting
        point), or ``build_model(n_features, **model_kwargs)`` returning one, or ``None``
        for a small MLP (``hidden=(64, 64)``, ``activation="relu"``, Adam, MSE;
        ``model_kwargs`` may set those).
    model_kwargs : dict, optional
        Passed to the build function.
    learning_rate : float, optional
        Set on the built model's optimizer (a grid-search parameter).
    preprocessor : Preprocessor, optional
        Used (a copy) instead of the settings below; an unfitted one is fitted on the
        training data, a fitted one is used as it is.
    target : str, optional
        The target column's name (default: ``y``'s name, or ``"target"``).
    numeric, categorical : list of str, optional
        Feature columns of ``X``; with neither, every column of ``X``, numbers (and
        booleans) numeric, the rest categorical. Array columns are ``x0, x1, ...``.
    transform_fn : callable, optional
        The Preprocessor's ``transform=``: the user's pandas function.
    missing, max_categories, missing_target
        As in :class:`~daskml_scale.Preprocessor`.
    strategy, epochs, batch_size, validation_fraction, callbacks, checkpoint, resume,
    client, seed, shuffle, cache, verbose, storage_options
        As in :func:`daskml_scale.fit`. ``client=None``: the current client, or inside a
        Dask task the worker's.

    Attributes
    ----------
    model_ : keras.Model
        The trained model.
    preprocessor_ : Preprocessor
        The fitted preprocessor.
    history_ : dict of list of float
        Per-epoch ``loss`` (and ``val_*``), over ``fit`` and the ``partial_fit`` calls after it.
    summary_ : dict
        ``history.daskml_summary`` of the last training call (workers, partitions, rows, timings).
    n_features_in_ : int
        Columns of ``X`` seen in ``fit`` (the target excluded).
    feature_names_in_ : ndarray of str
        Their names, when ``X`` was a DataFrame.

    Examples
    --------
    >>> est = KerasRegressor(target="log_price", epochs=5).fit(ddf)  # doctest: +SKIP
    >>> est.predict(ddf)  # a lazy Dask Series  # doctest: +SKIP
    """

    _task = "regression"

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.regressor_tags.poor_score = True  # a small network after the default one epoch
        return tags

    def predict(self, X: Any) -> Any:
        """Predictions for ``X``, as its type: a Dask Series lazily for a Dask DataFrame, a pandas
        Series, a NumPy or Dask array (one column: 1-D; several outputs: 2-D)."""
        out, kind = self._outputs(X)
        if len(out.columns) == 1:
            out = out[out.columns[0]].rename(self.preprocessor_.target)
        return self._as_input_kind(out, kind, X)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """R² of the predictions (rows without a target or a prediction left out)."""
        from sklearn.metrics import r2_score

        y_true, y_pred = self._true_and_predicted(X, y, self.predict)
        y_true = y_true.astype(np.float64)
        y_pred = y_pred.astype(np.float64).reshape(len(y_true), -1)[:, 0] if y_pred.ndim > 1 else y_pred.astype(np.float64)
        ok = np.isfinite(y_true) & np.isfinite(y_pred)
        w = None if sample_weight is None else np.asarray(sample_weight)[ok]
        return float(r2_score(y_true[ok], y_pred[ok], sample_weight=w))


class KerasClassifier(ClassifierMixin, _KerasEstimator):
    """A scikit-learn classifier that trains a Keras model with :func:`daskml_scale.fit`.

    The parameters and attributes of :class:`KerasRegressor`, with: a build function
    is called as ``build_model(n_features, n_classes=..., **model_kwargs)`` when it takes
    ``n_classes``; the default MLP ends in one sigmoid output for two classes (binary
    cross-entropy), else a softmax over the classes (sparse categorical cross-entropy);
    the model is trained on class indices, in the order of ``classes_``.

    Attributes
    ----------
    classes_ : ndarray
        The class labels, sorted, of ``y``'s type.

    Examples
    --------
    >>> clf = KerasClassifier(epochs=5).fit(X, y)  # doctest: +SKIP
    >>> clf.predict_proba(X)  # doctest: +SKIP
    """

    _task = "classification"

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.poor_score = True  # a small network after the default one epoch
        return tags

    def fit(self, X: Any, y: Any = None, *, validation_data: Any = None) -> "KerasClassifier":
        inputs.check_labels(y)
        return super().fit(X, y, validation_data=validation_data)

    fit.__doc__ = _KerasEstimator.fit.__doc__

    def partial_fit(self, X: Any, y: Any = None, classes: Any = None) -> "KerasClassifier":
        """As :meth:`KerasRegressor.partial_fit`; ``classes`` (first call) declares every label
        that later calls may bring, when the first data does not hold them all."""
        inputs.check_labels(y)
        self._train(X, y, epochs=1, validation_data=None, reset=not hasattr(self, "model_"),
                    classes=classes if not hasattr(self, "model_") else None)
        return self

    def _set_classes(self, pre: Preprocessor, dtype: Any) -> None:
        self.classes_ = typed_classes(pre.classes_ or [], dtype)

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, one column per class of ``classes_``: a Dask or pandas DataFrame
        (columns ``proba_<class>``) for a DataFrame, a 2-D NumPy or Dask array for an array."""
        out, kind = self._outputs(X)
        return self._as_input_kind(out[out.columns[:-1]], kind, X)

    def predict(self, X: Any) -> Any:
        """The most probable class of every row, as a label of ``classes_``, in ``X``'s type."""
        out, kind = self._outputs(X)
        proba = out[out.columns[:-1]]
        name = self.preprocessor_.target
        if kind == "dask_frame" or kind == "dask_array":
            labels = proba.map_partitions(
                labels_of, self.classes_, name, meta=pd.Series(self.classes_[:0], name=name, dtype=self.classes_.dtype)
            )
        else:
            labels = labels_of(proba, self.classes_, name)
        return self._as_input_kind(labels, kind, X)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict`."""
        from sklearn.metrics import accuracy_score

        y_true, y_pred = self._true_and_predicted(X, y, self.predict)
        return float(accuracy_score(y_true, y_pred, sample_weight=sample_weight))

