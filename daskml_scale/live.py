"""The live training view: :class:`LivePlot`, a Keras callback.

In a Jupyter kernel (JupyterLab, classic Notebook, VS Code) it shows one widget that
grows as the fit runs: a progress bar of the epochs and one of the rounds inside the
epoch, the loss and metric curves (train and validation) redrawn at every epoch end, and
the rows per second of each worker. Elsewhere it prints one line per epoch.

``daskml_scale.fit(..., verbose="auto")`` (the default) adds one in a notebook instead of
Keras's text progress bar; pass ``LivePlot()`` in ``callbacks=`` to get it anywhere, or
with ``keras.Model.fit`` (rows per second are then unknown: the view shows seconds per
epoch).

The class implements the interface of ``keras.callbacks.Callback`` (``set_model``,
``set_params`` and the ``on_*`` hooks: :class:`CallbackInterface`) without importing Keras,
so that ``import daskml_scale`` stays light; Keras's ``CallbackList`` calls it like any
callback.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from daskml_scale.exceptions import ArgumentError

__all__ = ["LivePlot", "CallbackInterface", "in_notebook"]

DISPLAYS = ("auto", "widget", "text", "none")


def in_notebook() -> bool:
    """True inside a running Jupyter kernel that can show widgets (ipywidgets installed)."""
    if "IPython" not in sys.modules or "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or getattr(shell, "kernel", None) is None:
            return False
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class CallbackInterface:
    """The interface of ``keras.callbacks.Callback`` (``set_model``, ``set_params``, the
    ``on_*`` hooks, all no-ops) without importing Keras: ``CallbackList`` and
    ``Model.fit`` call it like any callback."""

    async_safe = False  # read by keras's CallbackList: run the hooks in the training thread

    def __init__(self) -> None:
        self.model: Any = None
        self.params: dict[str, Any] = {}

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = dict(params or {})


def _ignored(self: Any, *args: Any, **kwargs: Any) -> None:
    """A hook the callback does not use (Keras's ``Callback`` has the same defaults)."""
    return None


# every hook of keras.callbacks.Callback; subclasses override the ones they use
for _hook in (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
    "on_train_batch_end", "on_batch_begin", "on_batch_end", "on_test_begin", "on_test_end",
    "on_test_batch_begin", "on_test_batch_end", "on_predict_begin", "on_predict_end",
    "on_predict_batch_begin", "on_predict_batch_end",
):
    setattr(CallbackInterface, _hook, _ignored)
del _hook


class LivePlot(CallbackInterface):
    """Watch a fit: epoch and round progress, train/validation curves, rows/s per worker.

    Parameters
    ----------
    metrics : list of str, optional
        The curves' panels (default: every metric the fit logs, without the strategy's
        counters), as in :func:`daskml_scale.plot_history`.
    display : {"auto", "widget", "text", "none"}
        ``"auto"``: a widget in a notebook kernel, else a line per epoch on stdout.
        ``"none"`` only records (the attributes below).
    figsize : tuple of float, optional
        Inches of the curves' figure (default: 4 per panel x 3).

    Attributes
    ----------
    history : dict of str to list of float
        The epoch logs so far.
    rates : list of dict
        Per epoch: ``seconds`` (epoch begin to its last round), ``rows_per_s`` (all
        workers) and ``workers`` (worker address -> rows/s of its stream), when the fit
        says how many rows each worker trains on (:func:`daskml_scale.fit` does).
    widget : ipywidgets.VBox or None
        The view, once shown.

    Examples
    --------
    >>> live = daskml_scale.LivePlot()
    >>> daskml_scale.fit(model, ddf, preprocessor=pre, epochs=5, callbacks=[live])  # doctest: +SKIP
    >>> live.history["val_loss"]                                                    # doctest: +SKIP
    """

    def __init__(self, metrics: Sequence[str] | None = None, *, display: str = "auto",
                 figsize: tuple[float, float] | None = None) -> None:
        if display not in DISPLAYS:
            raise ArgumentError(f"Expected display to be one of {DISPLAYS}. Received: display={display!r}")
        super().__init__()
        self.metrics = list(metrics) if metrics is not None else None
        self.display = display
        self.figsize = figsize
        self.history: dict[str, list[float]] = {}
        self.rates: list[dict[str, Any]] = []
        self.widget: Any = None
        self._parts: dict[str, Any] = {}
        self._mode = "none"
        self._epoch = 0
        self._round = 0
        self._round_loss: float | None = None
        self._t_epoch = 0.0
        self._t_last_round: float | None = None
        self._fig: Any = None

    # ------------------------------------------------------------ keras's callback hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.history = {}
        self.rates = []
        mode = self.display
        if mode == "auto":
            mode = "widget" if in_notebook() else "text"
        self._mode = mode
        if mode == "widget":
            self._build_widget()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._round = 0
        self._round_loss = None
        self._t_epoch = time.perf_counter()
        self._t_last_round = None
        self._update_progress()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._round = batch + 1
        self._t_last_round = time.perf_counter()
        if logs and "loss" in logs:
            self._round_loss = float(logs["loss"])
        self._update_progress()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for k, v in (logs or {}).items():
            try:
                self.history.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                continue
        end = self._t_last_round or time.perf_counter()
        self.rates.append(self._rates(max(end - self._t_epoch, 1e-9)))
        self._epoch = epoch + 1
        if self._mode == "widget":
            self._update_progress()
            self._draw()
        elif self._mode == "text":
            print(self.epoch_line(epoch, logs or {}), flush=True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._mode == "widget":
            self._update_progress(done=True)

    # ------------------------------------------------------------ what is shown
    def _rates(self, seconds: float) -> dict[str, Any]:
        info = self.params.get("daskml") or {}
        rows = [int(r) for r in info.get("stream_rows") or []]
        workers = list(info.get("workers") or [])
        out: dict[str, Any] = {"epoch": self._epoch + 1, "seconds": seconds}
        if rows:
            out["rows_per_s"] = sum(rows) / seconds
            out["workers"] = {workers[i] if i < len(workers) else f"stream {i}": r / seconds
                              for i, r in enumerate(rows)}
        return out

    def epoch_line(self, epoch: int, logs: dict[str, Any]) -> str:
        """The text view of one epoch: ``epoch 2/5 - 1.23 s - loss: ... - 12,345 rows/s``."""
        epochs = self.params.get("epochs")
        parts = [f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"]
        rate = self.rates[-1] if self.rates else {}
        if rate:
            parts.append(f"{rate['seconds']:.2f} s")
        for k, v in logs.items():
            base = k[4:] if k.startswith("val_") else k
            if self.metrics is None or base in self.metrics:
                try:
                    parts.append(f"{k}: {float(v):.4g}")
                except (TypeError, ValueError):
                    continue
        if "rows_per_s" in rate:
            per = ", ".join(f"{_short(w)} {r:,.0f}" for w, r in rate["workers"].items())
            parts.append(f"{rate['rows_per_s']:,.0f} rows/s ({per})")
        return " - ".join(parts)

    def _build_widget(self) -> None:
        import ipywidgets as w
        from IPython.display import display

        epochs = int(self.params.get("epochs") or 1)
        steps = int(self.params.get("steps") or 1)
        p = {
            "title": w.HTML(value="<b>daskml_scale.fit</b>: starting"),
            "epochs": w.IntProgress(value=0, min=0, max=epochs, description="epochs", bar_style="info"),
            "rounds": w.IntProgress(value=0, min=0, max=max(steps, 1), description="rounds"),
            "curves": w.Image(format="png", layout=w.Layout(max_width="100%")),
            "workers": w.HTML(value=""),
        }
        self._parts = p
        self.widget = w.VBox([p["title"], w.HBox([p["epochs"], p["rounds"]]), p["curves"], p["workers"]])
        display(self.widget)

    def _update_progress(self, done: bool = False) -> None:
        if self._mode != "widget" or not self._parts:
            return
        p = self._parts
        epochs = int(self.params.get("epochs") or 1)
        p["epochs"].value = min(self._epoch, p["epochs"].max)
        p["rounds"].value = min(self._round, p["rounds"].max)
        text = f"<b>daskml_scale.fit</b>: epoch {min(self._epoch + (0 if done else 1), epochs)}/{epochs}"
        if not done and self._round:
            text += f", round {self._round}/{p['rounds'].max}"
            if self._round_loss is not None:
                text += f" (loss {self._round_loss:.4g})"
        if done:
            text += " - done"
            p["epochs"].bar_style = "success"
        p["title"].value = text

    def _draw(self) -> None:
        from daskml_scale.plots import _matplotlib, curve_names, draw_history, figure_png

        _matplotlib()
        if self._fig is None:
            from matplotlib.figure import Figure

            n = len(curve_names(self.history, self.metrics))
            self._fig = Figure(figsize=self.figsize or (4.0 * n, 3.0), layout="constrained")
        draw_history(self._fig, self.history, self.metrics)
        self._parts["curves"].value = figure_png(self._fig, dpi=80)
        rate = self.rates[-1] if self.rates else {}
        rows = [f"<tr><td>{_short(a)}</td><td style='text-align:right'>{r:,.0f}</td></tr>"
                for a, r in rate.get("workers", {}).items()]
        head = f"epoch {rate.get('epoch', '?')}: {rate.get('seconds', 0.0):.2f} s"
        if "rows_per_s" in rate:
            head += f", {rate['rows_per_s']:,.0f} rows/s in all"
        table = ("<table><tr><th>worker</th><th>rows/s</th></tr>" + "".join(rows) + "</table>") if rows else ""
        self._parts["workers"].value = f"<div>{head}</div>{table}"


def _short(address: str) -> str:
    return address.split("://", 1)[-1]
