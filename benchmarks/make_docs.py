"""Regenerate the docs' figures from ``benchmarks/results/*.json`` (``make bench-docs``).

    .venv/bin/python benchmarks/make_docs.py [--check] [--allow-quick]

* ``docs/benchmarks.md``: the text between ``<!-- bench:NAME:start -->`` and
  ``<!-- bench:NAME:end -->`` becomes the figures of ``results/NAME.json`` (run,
  machine, versions; per comparison a table of every side's median, min and max, the
  ratios median against median with best against best beside it, and the settings).
  A marker without a results file gets a line saying so.
* ``README.md``: the text between ``<!-- bench:speed:start -->`` and
  ``<!-- bench:speed:end -->`` becomes one bullet per results file with its headline
  ratios (those marked ``headline``; else the first ratio of each comparison).

Everything outside the markers is left as it is. Results of a ``--quick`` run are
refused (exit 2) unless ``--allow-quick``, which renders them under a warning.
``--check`` writes nothing and exits 1 when a file would change.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _method import _fmt  # noqa: E402

#: the README lists the benchmarks in this order, then any other results file by name
ORDER = ("training", "data", "predict", "parameter_server", "serving")
MARKER = re.compile(r"(<!-- bench:([a-z0-9_]+):start -->)(.*?)(<!-- bench:\2:end -->)", re.S)
QUICK_WARNING = "**QUICK RUN (`--quick`): a check that the script runs, not a figure.**"


class ResultsError(ValueError):
    """A results file that cannot be rendered."""


# ---------------------------------------------------------------------------- load
def load(directory: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}: not JSON ({exc})") from exc
        for key in ("name", "comparisons"):
            if key not in data:
                raise ResultsError(f"{path}: expected a results file of benchmarks/_method.py, with {key!r}")
        for c in data["comparisons"]:
            for key in ("title", "sides", "ratios", "metric"):
                if key not in c:
                    raise ResultsError(f"{path}: comparison {c.get('key')!r} has no {key!r}")
        if data["name"] != path.stem:
            raise ResultsError(f"{path}: its name is {data['name']!r}; expected {path.stem!r}")
        data["_path"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        out[data["name"]] = data
    return out


# -------------------------------------------------------------------------- render
def _date(iso: str | None) -> str:
    if not iso:
        return "unknown date"
    try:
        return _dt.datetime.fromisoformat(iso).astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _load(la: dict[str, Any] | None) -> str:
    la = la or {}
    s, e = la.get("start"), la.get("end")
    return f"{s[0] if s else '?'} -> {e[0] if e else '?'}"


def _run_line(data: dict[str, Any]) -> str:
    m, v, g = data.get("machine", {}), data.get("versions", {}), data.get("git") or {}
    versions = ", ".join(f"{k} {v[k]}" for k in ("python", "tensorflow", "keras", "dask", "distributed",
                                                  "pandas", "numpy", "pyarrow") if v.get(k))
    commit = g.get("commit")
    commit_text = f"; commit `{commit[:10]}`{' (uncommitted changes)' if g.get('dirty') else ''}" if commit else ""
    mem = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    dur = f", {data['duration_s']:.0f} s" if data.get("duration_s") is not None else ""
    return (f"Run {_date(data.get('date'))}: `{data.get('command', '?')}`{dur}. Machine: {m.get('cores', '?')} cores"
            f" ({m.get('cpu', '?')}){mem}; load average (1 min) {_load(data.get('loadavg'))}. "
            f"{versions}{commit_text}.")


def render_comparison(c: dict[str, Any]) -> list[str]:
    better = c.get("better", "lower")
    lines = [f"**{c['title']}**: {c['metric']} ({c.get('unit', '')}, {better} is better), "
             f"{c.get('rounds', '?')} interleaved rounds after one warm-up each; load average {_load(c.get('loadavg'))}.",
             ""]
    show = [k for k in c.get("show", []) if any(k in (s.get("summary") or {}) for s in c["sides"].values())]
    head = ["side", "what", "median", "min", "max", *[f"{k} (median)" for k in show]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in c["sides"].items():
        summ = s.get("summary") or {}
        m = summ.get(c["metric"])
        if s.get("status") != "ok" or m is None:
            cells = [f"FAILED in {s.get('failed_in') or '?'}: {s.get('error') or 'no rounds'}", "", ""]
            cells += [""] * len(show)
        else:
            cells = [f"**{_fmt(m['median'])}**", _fmt(m["min"]), _fmt(m["max"])]
            cells += [_fmt(summ[k]["median"]) if k in summ else "" for k in show]
        lines.append("| " + " | ".join(_cell(x) for x in [f"`{name}`", s.get("label", ""), *cells]) + " |")
    if c["ratios"]:
        lines += ["", "| ratio | median / median | best / best | target |", "|---|---|---|---|"]
        for r in c["ratios"]:
            if r.get("status") != "ok" or r.get("median") is None:
                vals = ["not computed: a side failed", "-"]
            else:
                vals = [f"**{_x(r['median'])}**", _x(r.get("best"))]
            lines.append("| " + " | ".join(_cell(x) for x in [r.get("label") or f"{r['subject']} vs {r['reference']}",
                                                              *vals, r.get("target") or ""]) + " |")
    settings = [(n, s.get("settings")) for n, s in c["sides"].items() if s.get("settings")]
    if settings:
        lines += ["", "<details><summary>Settings of each side</summary>", ""]
        lines += [f"- `{n}`: " + ", ".join(f"{k}={_cell(v)}" for k, v in st.items()) for n, st in settings]
        lines += ["", "</details>"]
    for n in c.get("notes", []):
        lines += ["", f"Note: {n}"]
    return lines


def render_block(data: dict[str, Any]) -> str:
    lines = [f"<!-- generated by benchmarks/make_docs.py from {data['_path']}: edit the results, not this text -->", ""]
    if data.get("quick"):
        lines += [QUICK_WARNING, ""]
    lines += [_run_line(data), ""]
    for c in data["comparisons"]:
        lines += render_comparison(c) + [""]
    for n in data.get("notes", []):
        lines += [f"Note: {n}", ""]
    return "\n".join(lines)


def _headlines(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    marked = [(c, r) for c in data["comparisons"] for r in c["ratios"] if r.get("headline")]
    if marked:
        return marked
    return [(c, c["ratios"][0]) for c in data["comparisons"] if c["ratios"]]


def render_speed(results: dict[str, dict[str, Any]]) -> str:
    names = [n for n in ORDER if n in results] + sorted(n for n in results if n not in ORDER)
    if not names:
        return "\n_No benchmark results yet: `make bench`, then `make bench-docs`._\n"
    cores = sorted({str(results[n].get("machine", {}).get("cores", "?")) for n in names})
    lines = ["", "<!-- generated by benchmarks/make_docs.py from benchmarks/results/*.json: edit the results -->",
             f"Each line is one benchmark's run on {'/'.join(cores)} cores: ratios of medians over interleaved "
             "rounds, best against best in brackets; the tables, settings and baselines are in "
             "`docs/benchmarks.md`.", ""]
    for n in names:
        data = results[n]
        parts = []
        heads = _headlines(data)
        labels = [r.get("label") or f"{r['subject']} vs {r['reference']}" for _, r in heads]
        for (c, r), label in zip(heads, labels):
            if labels.count(label) > 1:  # the same ratio in several comparisons: say which
                label = f"{c['title']}: {label}"
            if r.get("status") != "ok" or r.get("median") is None:
                parts.append(f"{label}: not computed (a side failed)")
                continue
            target = f", target {r['target']}" if r.get("target") else ""
            parts.append(f"{label}: **{_x(r['median'])}** (best {_x(r.get('best'))}; {c.get('rounds', '?')} rounds{target})")
        quick = " QUICK RUN, not a figure:" if data.get("quick") else ""
        desc = data.get("description") or ""
        first = desc.split(" ", 1)[0]
        # a sentence starts with a capital; a name from the code (daskml_scale.fit) keeps its case
        what = (desc if ("_" in first or "." in first) else desc[:1].upper() + desc[1:]) + " " if desc else ""
        lines.append(f"* {what}(`{n}`, {_date(data.get('date'))[:10]}):{quick} " + "; ".join(parts) + ".")
    lines.append("")
    return "\n".join(lines)


def fill(text: str, blocks: dict[str, str], path: Path) -> tuple[str, list[str]]:
    """``text`` with every marker pair's content replaced; returns it and the names filled."""
    seen: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        seen.append(name)
        body = blocks.get(name)
        if body is None:
            body = f"\n_No results file `benchmarks/results/{name}.json` yet: run `make bench`, then `make bench-docs`._\n"
        return f"{m.group(1)}\n{body.strip(chr(10))}\n{m.group(4)}"

    out = MARKER.sub(sub, text)
    dupes = {n for n in seen if seen.count(n) > 1}
    if dupes:
        raise ResultsError(f"{path}: markers {sorted(dupes)} appear more than once")
    return out, seen


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--allow-quick", action="store_true", help="render --quick results, under a warning")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = ap.parse_args(argv)

    try:
        results = load(Path(args.results))
    except ResultsError as exc:
        print(f"make_docs: {exc}", file=sys.stderr)
        return 2
    quick = sorted(n for n, d in results.items() if d.get("quick"))
    if quick and not args.allow_quick:
        print(f"make_docs: refusing results of --quick runs ({', '.join(f'{n}.json' for n in quick)}): they check that "
              "a script runs and are not figures. Run `make bench` (or the benchmark without --quick), or pass "
              "--allow-quick to render them under a warning.", file=sys.stderr)
        return 2
    failed = sorted(n for n, d in results.items() if d.get("status") == "failed")
    if failed:
        print(f"make_docs: warning: runs with failed sides: {', '.join(failed)} (rendered as FAILED)", file=sys.stderr)

    blocks = {n: render_block(d) for n, d in results.items()}
    changed = []
    try:
        for path, wanted in ((Path(args.docs), blocks), (Path(args.readme), {"speed": render_speed(results)})):
            text = path.read_text()
            new, seen = fill(text, wanted, path)
            missing = sorted(set(wanted) - set(seen))
            if missing:
                print(f"make_docs: warning: {path.name} has no markers for {missing} "
                      f"(add <!-- bench:NAME:start --> / <!-- bench:NAME:end -->)", file=sys.stderr)
            if not seen:
                raise ResultsError(f"{path}: no <!-- bench:NAME:start --> markers")
            if new != text:
                changed.append(str(path))
                if not args.check:
                    path.write_text(new)
    except ResultsError as exc:
        print(f"make_docs: {exc}", file=sys.stderr)
        return 2
    verb = "would change" if args.check else "updated"
    print(f"make_docs: {verb}: {', '.join(changed) or 'nothing'} (from {len(results)} results files)")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
