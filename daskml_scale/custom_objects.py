"""Custom Keras objects carried from a fit's driver to its workers.

A Keras model can name custom objects (losses, metrics, layers, activations, ...)
that only the user's code defines; Keras finds them by their registered name, so a
worker must have them before it loads the model. The driver is the user's own
process, so a fit carries every custom object it finds (:func:`ship_model`): those of
Keras's registry (``keras.saving.get_custom_objects()``, which
``@keras.saving.register_keras_serializable`` fills) and those the model's config
names, looked up on the live model (so unregistered ones, and ones defined in
``__main__`` or a notebook, count too). Each travels by reference (a worker that can
import its module uses it) and, unless its module belongs to an installed
distribution, also by value (cloudpickle) for workers that cannot.
:func:`load_shipped_model` registers them on the worker, then loads the model.

A bundle records where the objects its model needs are defined (:func:`references`,
imported by :func:`resolve` at load time) and may carry their source files: see
:mod:`daskml_scale.bundle_code`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import sys
import threading
from typing import Any, Iterable

import numpy as np

from daskml_scale import backend
from daskml_scale.backend.base import Backend
from daskml_scale.exceptions import TrainingError

__all__ = ["ship_model", "load_shipped_model", "custom_objects_of", "install_objects", "references", "resolve"]

_MAGIC = b"daskml_scale.model+objects/1\n"
_PICKLE_LOCK = threading.Lock()


# ------------------------------------------------------------- finding the objects
def _is_keras(module: str | None) -> bool:
    return module is not None and (module == "keras" or module.startswith("keras."))


def _keras_types() -> tuple[type, ...]:
    import keras

    return (
        keras.layers.Layer, keras.losses.Loss, keras.metrics.Metric, keras.optimizers.Optimizer,
        keras.initializers.Initializer, keras.regularizers.Regularizer, keras.constraints.Constraint,
    )


def _names_in_config(config: Any) -> tuple[set[str], set[str]]:
    """(names of the serialized objects in a Keras config that are not Keras's own,
    every plain string of it): what a loader looks up in the custom objects."""
    names: set[str] = set()
    strings: set[str] = set()
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "class_name" in node and "config" in node:
                if node["class_name"] == "function" and isinstance(node["config"], str):
                    names.add(node["config"])
                elif not _is_keras(node.get("module")):
                    names.add(node.get("registered_name") or node["class_name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            strings.add(node)
    return names, strings


def _live_objects(model: Any) -> dict[str, Any]:
    """Registered name -> class or function, for the user's objects reachable from the
    live model: layer classes, their activations, initializers, ..., the compiled loss
    and metrics. Unregistered objects are serialized under their ``__name__``."""
    import keras

    types = _keras_types()
    found: dict[str, Any] = {}
    compiled = getattr(model, "_compile_config", None)  # what compile() was given
    stack: list[Any] = [model, getattr(compiled, "config", None)]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif inspect.isfunction(obj) or inspect.isclass(obj) or isinstance(obj, types):
            target = obj if (inspect.isfunction(obj) or inspect.isclass(obj)) else type(obj)
            if not _is_keras(getattr(target, "__module__", None)):
                found.setdefault(keras.saving.get_registered_name(target), target)
            if isinstance(obj, types):
                stack.extend(
                    v for v in vars(obj).values()
                    if isinstance(v, (dict, list, tuple, *types)) or inspect.isfunction(v) or inspect.isclass(v)
                )
    return found


def custom_objects_of(model: Any, saved: bytes | dict[str, Any]) -> dict[str, tuple[Any, bool]]:
    """Name -> (object, whether the model's config needs it): the objects of Keras's
    global registry and those that the saved model (``.keras`` bytes, or its config)
    names."""
    import io
    import json
    import zipfile

    import keras

    if isinstance(saved, dict):
        config = saved
    else:
        with zipfile.ZipFile(io.BytesIO(saved)) as zf:
            config = json.loads(zf.read("config.json"))
    names, strings = _names_in_config(config)
    registry = keras.saving.get_custom_objects()
    live = _live_objects(model)
    out: dict[str, tuple[Any, bool]] = {name: (obj, False) for name, obj in registry.items()}
    for name in names | (strings & set(registry)):
        obj = keras.saving.get_registered_object(name) or live.get(name)  # registry and custom_object_scope first
        if obj is not None:
            out[name] = (obj, True)
    return out


# ------------------------------------------------------------------ shipping a fit
@functools.lru_cache(maxsize=1)
def _installed_packages() -> frozenset[str]:
    import importlib.metadata

    return frozenset(importlib.metadata.packages_distributions())


def _lookup(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _dumps_by_value(obj: Any) -> bytes:
    import cloudpickle

    mod = sys.modules.get(getattr(obj, "__module__", None) or "")
    # cloudpickle sends a function or class of an importable module by reference: force it by value
    force = mod is not None and mod.__name__ != "__main__"
    force = force and mod.__name__ not in cloudpickle.list_registry_pickle_by_value()
    with _PICKLE_LOCK:
        if force:
            cloudpickle.register_pickle_by_value(mod)
        try:
            return cloudpickle.dumps(obj)
        finally:
            if force:
                cloudpickle.unregister_pickle_by_value(mod)


def _by_reference(obj: Any) -> bool:
    """Whether ``obj`` is its module's attribute ``__qualname__`` (``__main__`` is not a
    module that another process can import)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return False
    try:
        return sys.modules[module].__name__ == module and _lookup(module, qualname) is obj
    except (KeyError, AttributeError, ImportError):
        return False


def _entry(name: str, obj: Any, needed: bool) -> dict[str, Any]:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    by_ref = _by_reference(obj)
    entry = {"name": name, "module": module if by_ref else None, "qualname": qualname, "needed": needed,
             "value": None, "error": None}
    if not (by_ref and module.partition(".")[0] in _installed_packages()):
        try:
            entry["value"] = _dumps_by_value(obj)
        except Exception as exc:  # e.g. a global it uses cannot be pickled: by reference only
            entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


def ship_model(model: Any, keras_bytes: bytes | None = None) -> bytes:
    """What a fit sends its workers: the model together with the custom objects (see
    the module's docstring), the layout of the model's named inputs and the driver's
    Keras backend (a worker on another backend refuses it by name). Read by
    :func:`load_shipped_model`.

    The model travels as ``keras_bytes`` when given, else as its config, its weights and
    its optimizer's variables (:func:`_as_config`): what a ``.keras`` file holds, without
    writing and reading the zip and HDF5 (~25 ms on the driver and ~30 ms on each worker
    for a small model). A model holding state beyond its variables (the vocabulary of a
    lookup layer, a quantized layer, a layer with its own ``save_own_variables``)
    travels as ``.keras`` bytes."""
    saved = None if keras_bytes is not None else _as_config(model)
    if saved is None:
        keras_bytes = keras_bytes if keras_bytes is not None else backend.model_to_bytes(model)
        payload: dict[str, Any] = {"keras": keras_bytes}
        objects = custom_objects_of(model, keras_bytes)
    else:
        payload = saved
        objects = custom_objects_of(model, saved["config"])
    layout = backend.input_layout_of(model)  # how X is cut into named inputs travels with the model
    entries = [_entry(name, obj, needed) for name, (obj, needed) in sorted(objects.items())]
    payload.update(objects=entries, layout=layout, backend=backend.name())
    return _MAGIC + pickle.dumps(payload, protocol=5)


def _variables_are_the_state(model: Any) -> bool:
    """Whether ``model`` (and its optimizer) is rebuilt whole from its config and the
    values of its variables: no layer saves assets or state of its own beyond them."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if hasattr(layer, "save_assets") or getattr(layer, "quantization_mode", None):
            return False
        for method in ("save_own_variables", "load_own_variables"):
            owner = getattr(type(layer), method, None)
            module = getattr(owner, "__module__", "") or ""
            if not _is_keras(module) or module.startswith("keras.src.layers.preprocessing"):
                return False
    opt = getattr(model, "optimizer", None)
    if opt is not None:
        for method in ("save_own_variables", "load_own_variables"):
            if not _is_keras(getattr(getattr(type(opt), method, None), "__module__", None)):
                return False
    return True


def _as_config(model: Any) -> dict[str, Any] | None:
    """The model as ``{"config", "weights", "optimizer"}``, or ``None`` where its
    variables are not its whole state (:func:`_variables_are_the_state`)."""
    import keras

    try:
        from keras.src.saving.serialization_lib import ObjectSharingScope
    except ImportError:  # pragma: no cover - another Keras layout: the .keras bytes
        return None
    if not getattr(model, "built", False) or not _variables_are_the_state(model):
        return None
    with ObjectSharingScope():  # an object the config names twice is one object again, as in a .keras file
        config = keras.saving.serialize_keras_object(model)
    opt = model.optimizer
    optimizer = [np.asarray(v) for v in opt.variables] if opt is not None and opt.built else None
    return {"config": config, "weights": [np.asarray(w) for w in model.get_weights()], "optimizer": optimizer}


def _from_config(payload: dict[str, Any]) -> Any:
    """The model of :func:`_as_config`'s payload, as ``keras.saving.load_model`` makes it
    from a ``.keras`` file: built and compiled from its config, then its values."""
    import keras
    from keras.src.saving.serialization_lib import ObjectSharingScope

    with ObjectSharingScope():
        model = keras.saving.deserialize_keras_object(payload["config"], safe_mode=False)
    model.set_weights(payload["weights"])  # Keras's own: it names the layer whose weights do not match
    state = payload.get("optimizer")
    opt = model.optimizer
    if state is not None and opt is not None:
        if not opt.built:
            opt.build(model.trainable_variables)
        variables = list(opt.variables)
        Backend._check_optimizer_state(variables, state)
        # eager, not backend.set_optimizer_state: its first call there would make the worker's
        # first epoch trace the graph assignment it saves for repeated calls
        backend.assign_values(variables, state)
    return model


def _register(name: str, obj: Any) -> None:
    import keras

    registry = keras.saving.get_custom_objects()
    if registry.get(name) is obj:
        return
    package, sep, short = name.partition(">")
    if sep:  # as the decorator does: both the object and its name are known to Keras
        keras.saving.register_keras_serializable(package=package, name=short)(obj)
    else:
        registry[name] = obj


def install_objects(entries: Iterable[dict[str, Any]]) -> None:
    """Register shipped custom objects in this process: imported by reference where
    their module imports here, else unpickled from their by-value copy."""
    problems = []
    for e in entries:
        obj, why = None, []
        if e["module"]:
            try:
                obj = _lookup(e["module"], e["qualname"])
            except Exception as exc:
                why.append(f"importing it by name from {e['module']!r} failed ({type(exc).__name__}: {exc})")
        if obj is None and e["value"] is not None:
            try:
                obj = pickle.loads(e["value"])
            except Exception as exc:
                why.append(f"its copy sent by value did not load ({type(exc).__name__}: {exc})")
        if obj is None and e["error"]:
            why.append(f"it could not be sent by value ({e['error']})")
        if obj is not None:
            _register(e["name"], obj)
        elif e["needed"]:
            problems.append(f"{e['name']!r} ({e['qualname']}): " + "; ".join(why or ["no copy of it was sent"]))
    if problems:
        raise TrainingError(
            "Expected every custom Keras object of the model to load on this worker. Received: "
            + " | ".join(problems)
            + ". Make its module importable on the workers (install it there, or client.upload_file('module.py')), "
            "or define it in a module whose globals can be pickled."
        )


def check_backend(driver: str | None) -> None:
    """Workers run the driver's Keras backend: a mismatch is an error that says how to fix it."""
    here = backend.name()
    if driver is not None and driver != here:
        where = ""
        try:
            from distributed import get_worker

            where = f" {get_worker().address}"
        except (ImportError, ValueError):
            pass
        raise TrainingError(
            f"Expected the workers to run the driver's Keras backend {driver!r}. Received: worker{where} runs "
            f"{here!r}. Start the workers with KERAS_BACKEND={driver} (daskml_scale.connect() does it for a local "
            "cluster), or run the driver with the workers' backend."
        )


def load_shipped_model(data: bytes) -> Any:
    """The model from :func:`ship_model`'s bytes, its custom objects registered first.
    Only for bytes made by our own driver: it unpickles and loads without safe mode."""
    if data[: len(_MAGIC)] != _MAGIC:
        return backend.model_from_bytes(data, safe_mode=False)
    payload = pickle.loads(memoryview(data)[len(_MAGIC) :])
    check_backend(payload.get("backend"))
    install_objects(payload["objects"])
    if "keras" in payload:
        model = backend.model_from_bytes(payload["keras"], safe_mode=False)
    else:
        model = _from_config(payload)
    backend.set_input_layout(model, payload.get("layout"))
    return model


# ------------------------------------------------------------ references for a bundle
def references(model: Any, keras_bytes: bytes) -> dict[str, str]:
    """Name -> ``"module:qualname"`` of the custom objects the saved model needs, for
    those importable by name: a bundle records them and :func:`resolve` imports them
    where it loads, so an installed (or bundled) module need not be imported first,
    and unregistered objects are found too."""
    return {
        name: f"{obj.__module__}:{obj.__qualname__}"
        for name, (obj, needed) in sorted(custom_objects_of(model, keras_bytes).items())
        if needed and _by_reference(obj)
    }


def resolve(refs: dict[str, str]) -> dict[str, Any]:
    """The objects of :func:`references` that import here (for
    ``keras.saving.custom_object_scope``); Keras names those that do not."""
    out = {}
    for name, ref in refs.items():
        module, _, qualname = ref.partition(":")
        try:
            out[name] = _lookup(module, qualname)
        except Exception:  # noqa: S112 - the load that needs it says which one is missing
            continue
    return out
