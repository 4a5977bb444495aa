from __future__ import annotations

import importlib
import inspect

import daskml_scale
import daskml_scale.exceptions as exc


def test_all_is_honest():
    public = {n for n in dir(daskml_scale) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(daskml_scale, n))}
    public.discard("annotations")  # from __future__ import annotations
    assert set(daskml_scale.__all__) - {"__version__"} <= public
    # every public non-module name is in __all__ (submodules may be exposed as modules)
    assert public - modules - set(daskml_scale.__all__) == set()
    for name in daskml_scale.__all__:
        assert hasattr(daskml_scale, name), name


def test_every_error_is_also_a_builtin():
    # the roots: the error derives from Exception alone, the warning from UserWarning
    assert exc.DaskmlScaleError.__bases__ == (Exception,)
    assert issubclass(exc.DaskmlScaleWarning, UserWarning)
    assert not issubclass(exc.DaskmlScaleWarning, exc.DaskmlScaleError)
    defined = {
        n for n, v in vars(exc).items()
        if inspect.isclass(v) and issubclass(v, BaseException) and v.__module__ == exc.__name__ and not n.startswith("_")
    }
    assert set(exc.__all__) == defined, "exceptions.__all__ lists every error class it defines"
    assert set(exc.__all__) <= set(daskml_scale.__all__), "every error is exported by the package"
    for name in exc.__all__:
        cls = getattr(exc, name)
        if name in ("DaskmlScaleWarning", "DaskmlScaleError"):
            continue
        assert issubclass(cls, exc.DaskmlScaleError) and not issubclass(cls, Warning), name
        builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (object, Exception, BaseException)]
        assert builtins, f"{name} is not also a built-in exception"


def test_data_error_keeps_attributes_through_pickle():
    import pickle

    e = exc.BadRowError("bad row", path="a.csv", line=3, column="x")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.line, e2.column, str(e2)) == ("a.csv", 3, "x", "bad row")
    m = exc.MissingColumnError("column 'y' is missing", column="y")
    assert str(pickle.loads(pickle.dumps(m))) == "column 'y' is missing"


def test_py_typed_is_shipped():
    spec = importlib.util.find_spec("daskml_scale")
    import pathlib

    assert (pathlib.Path(spec.origin).parent / "py.typed").exists()
