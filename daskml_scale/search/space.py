"""The search space: Keras Tuner's ``hp`` object on top of Optuna's distributions, and
plain dict spaces.

A Keras Tuner user's ``build_model(hp)`` calls ``hp.Int``, ``hp.Float``, ``hp.Choice``,
``hp.Boolean`` and ``hp.Fixed``; :class:`HyperParameters` answers those calls without
Keras Tuner installed. As in Keras Tuner, the space is what the calls declare: the
driver builds the model once with every parameter at its default (that is how the
space is found), then each trial's values are drawn by Optuna from the declared
distributions and the model is built again with them on a worker. A parameter that a
build declares for the first time (under a branch the defaults did not take) takes its
default in that trial and joins the space for the next ones, as in Keras Tuner.

A dict space (``space={"units": {"type": "int", "low": 16, "high": 128}, ...}``, the
same in YAML for the CLI) is read by :func:`parse_space`; ``build_model(params)`` then
gets a plain dict.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from daskml_scale.exceptions import ArgumentError

__all__ = ["HyperParameters", "Param", "parse_space", "parse_entry", "describe_space"]


@dataclass(frozen=True)
class Param:
    """One declared parameter: its Optuna distribution (``None`` for a fixed value) and default."""

    name: str
    distribution: Any
    default: Any
    kind: str  # int | float | choice | bool | fixed
    log: bool = False

    def same_as(self, other: "Param") -> bool:
        return self.kind == other.kind and self.distribution == other.distribution


def _number(name: str, what: str, value: Any, integer: bool) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and int(value) != value):
        kind = "an integer" if integer else "a finite number"
        raise ArgumentError(f"Expected {what} of the parameter {name!r} to be {kind}. Received: {what}={value!r}")
    return int(value) if integer else float(value)


def _geometric(name: str, low: float, high: float, step: float, integer: bool) -> list[Any]:
    """``low, low*step, low*step**2, ... <= high``: Keras Tuner's log sampling with a step."""
    if step <= 1:
        raise ArgumentError(f"Expected step > 1 for the log-sampled parameter {name!r} (its values are multiplied "
                            f"by step). Received: step={step!r}")
    values, v = [], low
    while v <= high * (1 + 1e-12):
        values.append(int(round(v)) if integer else v)
        v *= step
    return sorted(set(values))


def numeric_param(
    name: str, low: Any, high: Any, *, step: Any = None, sampling: str = "linear", default: Any = None,
    integer: bool,
) -> Param:
    """The distribution of ``hp.Int`` / ``hp.Float`` (and of dict entries of type int/float)."""
    import optuna.distributions as od

    low = _number(name, "min_value", low, integer)
    high = _number(name, "max_value", high, integer)
    if low > high:
        raise ArgumentError(f"Expected min_value <= max_value for the parameter {name!r}. Received: "
                            f"min_value={low!r}, max_value={high!r}")
    if sampling not in ("linear", "log"):
        raise ArgumentError(f"Expected sampling='linear' or 'log' for the parameter {name!r}. Received: "
                            f"sampling={sampling!r} ('reverse_log' is not supported: use 'log' or 'linear')")
    log = sampling == "log"
    if log and low <= 0:
        raise ArgumentError(f"Expected min_value > 0 for the log-sampled parameter {name!r}. Received: min_value={low!r}")
    kind = "int" if integer else "float"
    if step is not None:
        step = _number(name, "step", step, integer)
        if step <= 0:
            raise ArgumentError(f"Expected step > 0 for the parameter {name!r}. Received: step={step!r}")
    if log and step is not None:
        values = _geometric(name, low, high, step, integer)
        dist: Any = od.CategoricalDistribution(values)
    elif integer:
        dist = od.IntDistribution(low, high, log=log, step=int(step or 1))
    else:
        dist = od.FloatDistribution(low, high, log=log, step=step)
    if default is None:
        default = low
    default = _number(name, "default", default, integer)
    if not low <= default <= high:
        raise ArgumentError(f"Expected the default of the parameter {name!r} within [{low}, {high}]. "
                            f"Received: default={default!r}")
    return Param(name, dist, default, kind, log)


def choice_param(name: str, values: Any, default: Any = None, kind: str = "choice") -> Param:
    import optuna.distributions as od

    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ArgumentError(f"Expected a list of values for the choice {name!r}. Received: values={values!r}")
    values = list(values)
    if not values:
        raise ArgumentError(f"Expected at least one value for the choice {name!r}. Received: values=[]")
    bad = [v for v in values if not (v is None or isinstance(v, (bool, int, float, str)))]
    if bad:
        raise ArgumentError(f"Expected choices of {name!r} to be numbers, strings, booleans or None. "
                            f"Received: {bad[0]!r}")
    if default is None:
        default = values[0]
    elif default not in values:
        raise ArgumentError(f"Expected the default of {name!r} to be one of {values}. Received: default={default!r}")
    return Param(name, od.CategoricalDistribution(values), default, kind)


class HyperParameters:
    """Keras Tuner's ``hp``: ``build_model(hp)`` works unchanged.

    ``hp.Int(name, min_value, max_value, step=None, sampling="linear", default=None)``,
    ``hp.Float(...)`` (``sampling="log"``), ``hp.Choice(name, values, ordered=None,
    default=None)``, ``hp.Boolean(name, default=False)``, ``hp.Fixed(name, value)``,
    ``hp.get(name)``, ``hp[name]``, ``name in hp``, ``hp.values`` and
    ``hp.conditional_scope(parent_name, parent_values)``. Each call returns the trial's
    value: the one drawn for this trial, or the parameter's default.

    ``parent_name`` / ``parent_values`` are accepted; every parameter is drawn in every
    trial and a build uses the ones its branches reach.
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._given = dict(values or {})
        self.declared: dict[str, Param] = {}  # in the order of the calls
        self._current: dict[str, Any] = {}

    # -- what a build declared
    def _declare(self, param: Param) -> Any:
        known = self.declared.get(param.name)
        if known is not None:
            if not known.same_as(param):
                raise ArgumentError(f"The parameter {param.name!r} is declared twice with different ranges "
                                    f"({known.distribution} and {param.distribution}): give each its own name")
            return self._current[param.name]
        self.declared[param.name] = param
        value = self._given.get(param.name, param.default)
        self._current[param.name] = value
        return value

    @property
    def values(self) -> dict[str, Any]:
        """Name -> the value of each parameter this build declared."""
        return dict(self._current)

    def get(self, name: str) -> Any:
        if name in self._current:
            return self._current[name]
        if name in self._given:
            return self._given[name]
        raise KeyError(f"{name!r} has not been declared (call hp.Int / hp.Float / hp.Choice / hp.Boolean first)")

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._current or name in self._given

    # -- Keras Tuner's methods
    def Int(self, name: str, min_value: int, max_value: int, step: int | None = None, sampling: str = "linear",
            default: int | None = None, parent_name: str | None = None, parent_values: Any = None) -> int:
        return self._declare(numeric_param(name, min_value, max_value, step=step, sampling=sampling or "linear",
                                           default=default, integer=True))

    def Float(self, name: str, min_value: float, max_value: float, step: float | None = None,
              sampling: str = "linear", default: float | None = None, parent_name: str | None = None,
              parent_values: Any = None) -> float:
        return self._declare(numeric_param(name, min_value, max_value, step=step, sampling=sampling or "linear",
                                           default=default, integer=False))

    def Choice(self, name: str, values: Any, ordered: bool | None = None, default: Any = None,
               parent_name: str | None = None, parent_values: Any = None) -> Any:
        return self._declare(choice_param(name, values, default))

    def Boolean(self, name: str, default: bool = False, parent_name: str | None = None,
                parent_values: Any = None) -> bool:
        return bool(self._declare(choice_param(name, [False, True], bool(default), kind="bool")))

    def Fixed(self, name: str, value: Any, parent_name: str | None = None, parent_values: Any = None) -> Any:
        return self._declare(Param(name, None, value, "fixed"))

    @contextlib.contextmanager
    def conditional_scope(self, parent_name: str, parent_values: Any) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def name_scope(self, name: str) -> Iterator[None]:
        yield

    def __repr__(self) -> str:
        return f"HyperParameters({self._current})"


# ----------------------------------------------------------------------- dict spaces
_TYPES = ("int", "float", "choice", "bool", "fixed")


def parse_entry(name: str, spec: Any) -> Param:
    import optuna.distributions as od

    if isinstance(spec, od.BaseDistribution):
        default = getattr(spec, "low", None)
        if isinstance(spec, od.CategoricalDistribution):
            default = spec.choices[0]
        return Param(name, spec, default, "optuna", bool(getattr(spec, "log", False)))
    if isinstance(spec, (list, tuple)):
        return choice_param(name, spec)
    if not isinstance(spec, Mapping):
        return Param(name, None, spec, "fixed")  # a constant
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        kind = "choice" if "values" in spec else ("float" if any(isinstance(spec.get(k), float) for k in ("low", "high"))
                                                  else "int")
    if kind not in _TYPES:
        raise ArgumentError(f"Expected the type of the parameter {name!r} to be one of {', '.join(_TYPES)}. "
                            f"Received: type={kind!r}")
    allowed = {"int": {"low", "high", "step", "log", "default"}, "float": {"low", "high", "step", "log", "default"},
               "choice": {"values", "default"}, "bool": {"default"}, "fixed": {"value"}}[kind]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ArgumentError(f"Unknown key(s) {unknown} for the {kind} parameter {name!r}; expected some of "
                            f"{sorted(allowed)}")
    if kind in ("int", "float"):
        for key in ("low", "high"):
            if key not in spec:
                raise ArgumentError(f"Expected {key!r} for the {kind} parameter {name!r}. Received: {spec}")
        return numeric_param(name, spec["low"], spec["high"], step=spec.get("step"),
                             sampling="log" if spec.get("log") else "linear", default=spec.get("default"),
                             integer=kind == "int")
    if kind == "choice":
        if "values" not in spec:
            raise ArgumentError(f"Expected 'values' for the choice {name!r}. Received: {spec}")
        return choice_param(name, spec["values"], spec.get("default"))
    if kind == "bool":
        return choice_param(name, [False, True], bool(spec.get("default", False)), kind="bool")
    if "value" not in spec:
        raise ArgumentError(f"Expected 'value' for the fixed parameter {name!r}. Received: {spec}")
    return Param(name, None, spec["value"], "fixed")


def parse_space(space: Any, source: str = "space") -> dict[str, Param]:
    """A dict space -> its parameters.

    Each entry is ``name: {"type": "int"|"float", "low": .., "high": .., "step": .., "log": bool,
    "default": ..}``, ``name: {"type": "choice", "values": [...]}``, ``name: {"type": "bool"}``,
    a list (a choice), an Optuna distribution, or a plain value (fixed).

    Raises
    ------
    ArgumentError
        The space is empty or not a mapping, or an entry is malformed (the message names it).
    """
    if not isinstance(space, Mapping):
        raise ArgumentError(f"Expected {source} to be a mapping of parameter names to ranges. "
                            f"Received: {type(space).__name__}")
    params = {str(name): parse_entry(str(name), spec) for name, spec in space.items()}
    if not any(p.distribution is not None for p in params.values()):
        raise ArgumentError(f"Expected {source} to have at least one parameter to search. Received: "
                            + ("an empty space" if not params else f"only fixed values {sorted(params)}"))
    return params


def describe_space(params: Mapping[str, Param]) -> dict[str, str]:
    """Name -> a short text of each parameter's range (for the progress line and the docs)."""
    out = {}
    for name, p in params.items():
        d = p.distribution
        if d is None:
            out[name] = f"fixed {p.default!r}"
        elif hasattr(d, "choices"):
            out[name] = f"one of {list(d.choices)}"
        else:
            out[name] = f"{p.kind} in [{d.low}, {d.high}]" + (" (log)" if p.log else "")
    return out
