"""``daskml-scale train --group-by COL ...``: one model per group, one bundle.

The options are added to the ``train`` command by :func:`add_arguments`; the command
calls :func:`train_groups` when ``--group-by`` is given. Like the rest of the CLI, a
thin layer over :func:`~daskml_scale.groups.fit_groups` and ``save_bundle``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

__all__ = ["add_arguments", "train_groups", "describe"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("many models (one per group)")
    g.add_argument("--group-by", nargs="+", metavar="COL",
                   help="train one model per group of these columns (fit_groups) and write a group bundle")
    g.add_argument("--min-rows", type=int, default=10, metavar="N",
                   help="groups with fewer rows get no model of their own (default 10)")
    g.add_argument("--no-fallback", action="store_true",
                   help="no model on all rows: rows of other groups get empty predictions with a reason")
    g.add_argument("--group-mode", choices=("auto", "stacked", "loop"), default="auto",
                   help="stacked: a worker's groups as one compiled program; loop: one traced step reused")
    g.add_argument("--per-group-scaling", action="store_true",
                   help="standardize each group's numeric features with its own training rows' statistics")
    g.add_argument("--max-group-rows", type=_max_rows, default=None, metavar="N|off",
                   help="a group over N raw rows trains data-parallel over its rows where they are instead of "
                        "in one partition (default: the configuration's groups.max-group-rows, 1,000,000; "
                        "off: no counting pass)")


def _max_rows(value: str) -> int | str:
    if value == "off":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'off', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'off', got {value!r}")
    return n


def train_groups(args: argparse.Namespace, data: Any, pre: Any, client: Any, build: Callable[[int], Any],
                 say: Callable[[str], None]) -> int:
    """Fit one model per group of ``args.group_by`` and save the group bundle at ``args.out``."""
    from daskml_scale.bundle import save_bundle
    from daskml_scale.exceptions import ArgumentError
    from daskml_scale.groups.fit import fit_groups

    if getattr(args, "validation", None):
        raise ArgumentError("--group-by takes --validation-fraction F (held out per group), not --validation URL")
    t0 = time.perf_counter()
    say(f"training one model per {', '.join(args.group_by)} ({args.epochs} epochs, min {args.min_rows} rows) ...")
    models = fit_groups(
        build, data, by=args.group_by, preprocessor=pre, epochs=args.epochs, batch_size=args.batch_size,
        validation_fraction=args.validation_fraction, min_rows=args.min_rows,
        fallback=None if args.no_fallback else "global", client=client, seed=args.seed, mode=args.group_mode,
        per_group_scaling=args.per_group_scaling, max_group_rows=args.max_group_rows,
    )
    save_bundle(models, pre, args.out, storage_options=args.storage_options or None)
    d = models.describe()
    say(f"trained {d['groups']:,} group models ({d['mode']}; {d['small_groups']:,} groups under {args.min_rows} rows"
        f"{', fallback: a model on all rows' if d['fallback'] else ', no fallback'}) in {time.perf_counter() - t0:.1f}s")
    if d.get("final_val_loss_mean") is not None:
        say(f"  mean final val_loss over the groups: {d['final_val_loss_mean']:.4g}")
    say(f"bundle written to {args.out}")
    return 0


def describe(info: dict[str, Any]) -> list[str]:
    """Lines for ``daskml-scale info`` about a group bundle (``Bundle.info()["groups"]``)."""
    g = info.get("groups")
    if not g:
        return []
    return [
        f"groups: {g['count']:,} models by {', '.join(g['by'])} ({g.get('mode')}); "
        f"{g.get('small_groups', 0):,} groups under min_rows={g.get('min_rows')}; "
        f"fallback: {g.get('fallback') or 'none (empty predictions with a reason)'}",
    ]
