"""Reports: a JSON file, a markdown table, and PNG plots (CACC/ASR per defense; rho sweep).

Rows are dicts with at least ``name``, ``cacc``, ``asr`` (fractions; ``asr`` may be None) and
optionally ``asr_no_trigger`` (the same rate on the clean non-target inputs, see
:mod:`purify_fast.evaluation`) and ``seconds``. Plots use matplotlib's Agg backend (no display needed).

JSON is written strictly: a non-finite float (NaN, ±Infinity) becomes ``null``, since bare
``NaN`` / ``Infinity`` tokens are not JSON and strict parsers (JavaScript's, jq) reject the file.
numpy scalars and 0-d tensors are written as the numbers they hold, so the same rule applies.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from pathlib import Path

from purify_fast.fileio import atomic_write_bytes, atomic_write_files

# write_report's optional sweep plot: removed when a later report in the same directory has none
SWEEP_PNG = "rho_sweep.png"


def _missing(x) -> bool:
    return x is None or (isinstance(x, numbers.Real) and math.isnan(x))


def _pct(x) -> str:
    return "–" if _missing(x) else f"{100 * x:.1f}"


def _cell(text) -> str:
    # a '|' would end the cell, a newline the row
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _plain(obj):
    """A numpy scalar or 0-d array / tensor as the Python number it holds (``str()`` would write
    ``"nan"`` or ``"tensor(inf)"``); anything else as it is. Only modules already loaded are
    looked at: an object of one not loaded cannot be here."""
    np = sys.modules.get("numpy")
    if np is not None and (isinstance(obj, np.generic)
                           or (isinstance(obj, np.ndarray) and obj.ndim == 0)):
        value = obj.item()
        # longdouble's item() stays a numpy scalar: a Python float then (JSON has no wider one)
        return float(value) if isinstance(value, np.floating) else value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor) and obj.dim() == 0:
        return obj.item()
    return obj


def _key(k) -> str:
    """The string a key is written as in JSON, as ``json.dumps`` spells it (1 -> "1", 1.0 ->
    "1.0", True -> "true", None -> "null"), so that two keys written alike are caught before one
    silently shadows the other. JSON has no non-finite number, so a non-finite float key is
    "nan", "inf", "-inf" (as ``str()`` writes them) rather than refusing the whole report; a key
    of another type (a tuple, a path) is its ``str()``, as other values are, where ``json``
    itself would raise."""
    k = _plain(k)
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, bool):
        return json.dumps(k)
    if isinstance(k, int):
        return int.__repr__(k)
    if isinstance(k, float):
        return float.__repr__(k) if math.isfinite(k) else str(k)
    return str(k)


def finite_or_null(obj):
    """``obj`` with every non-finite float inside dicts, lists and tuples replaced by None (numpy
    scalars and 0-d tensors first taken as Python numbers) and every dict key written as the
    string JSON will hold (:func:`_key`); two keys that would be written alike are refused."""
    obj = _plain(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = _key(k)
            if key in out:  # 1 beside "1", NaN beside "nan": one would be lost silently
                raise ValueError(f"two keys are written as {key!r} in JSON: {list(obj)[:8]}")
            out[key] = finite_or_null(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps_json(obj) -> str:
    """Indented, strict JSON: non-finite floats as ``null``, other objects as ``str()``."""
    return json.dumps(finite_or_null(obj), indent=2, default=str, allow_nan=False)


def markdown_table(rows: list[dict], title: str | None = None) -> str:
    """A markdown table: defense | CACC % | ASR % | [ASR without trigger %] | wall s. The
    no-trigger column appears when any row has ``asr_no_trigger``. A missing or NaN value shows
    as ``–``; a ``|`` in a name is escaped; every row needs a ``name`` (not None)."""
    for i, r in enumerate(rows):
        if r.get("name") is None:
            raise ValueError(f"row {i} has no name (rows need a 'name': the model / defense)")
    lines = []
    if title:
        lines += [f"### {title}", ""]
    floor = any(r.get("asr_no_trigger") is not None for r in rows)
    head = "| model / defense | CACC % | ASR % |" + (" ASR without trigger % |" if floor else "")
    lines += [head + " wall time s |", "|---|---:|---:|" + ("---:|" if floor else "") + "---:|"]
    for r in rows:
        secs = r.get("seconds")
        cells = [_cell(r["name"]), _pct(r.get("cacc")), _pct(r.get("asr"))]
        if floor:
            cells.append(_pct(r.get("asr_no_trigger")))
        cells.append("–" if _missing(secs) else f"{secs:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as strict JSON (:func:`dumps_json`: non-finite floats as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, dumps_json(obj).encode())
    return path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_png(fig, dpi: int = 120) -> bytes:
    """``fig`` as PNG bytes; the figure is closed."""
    import io

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render ``fig`` to PNG in memory, write it atomically to ``path`` and close the figure."""
    data = render_png(fig, dpi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, data)


def plot_defenses(rows: list[dict], path: str | os.PathLike, title: str = "CACC and ASR") -> Path:
    """Grouped bars: CACC and ASR (in %) per model / defense."""
    return save_figure(_defenses_figure(rows, title), path)


# x tick labels: a long name is wrapped (and cut after a few lines; the table has it in full),
# so it cannot squeeze the bars into a corner of the figure
_NAME_WIDTH, _NAME_LINES = 28, 3


def _tick_label(name) -> str:
    import textwrap

    lines = [w for part in str(name).splitlines() or [""]
             for w in (textwrap.wrap(part, _NAME_WIDTH) or [""])]
    if len(lines) > _NAME_LINES:
        lines = lines[:_NAME_LINES]
        lines[-1] = lines[-1][:_NAME_WIDTH - 1] + "…"
    return "\n".join(lines)


def _defenses_figure(rows: list[dict], title: str):
    plt = pyplot()
    names = [_tick_label(r["name"]) for r in rows]
    # A value that was not measured (None or NaN) is an empty bar labelled n/a, not a measured 0.
    cacc_known = [not _missing(r.get("cacc")) for r in rows]
    asr_known = [not _missing(r.get("asr")) for r in rows]
    cacc = [100 * r["cacc"] if ok else 0.0 for r, ok in zip(rows, cacc_known)]
    asr = [100 * r["asr"] if ok else 0.0 for r, ok in zip(rows, asr_known)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.0))
    xs = range(len(rows))
    w = 0.38
    b1 = ax.bar([x - w / 2 for x in xs], cacc, w, label="CACC", color="#4c72b0")
    b2 = ax.bar([x + w / 2 for x in xs], asr, w, label="ASR", color="#dd8452")
    # The floor under each ASR bar: the same rate without the trigger (what the trigger adds is
    # the gap, not the bar).
    floor = {x: 100 * r["asr_no_trigger"] for x, r, ok in zip(xs, rows, asr_known)
             if ok and not _missing(r.get("asr_no_trigger"))}
    for bars, known, floors in ((b1, cacc_known, {}), (b2, asr_known, floor)):
        for x, bar, ok in zip(xs, bars, known):
            # a floor above its bar would strike through the bar's number: the number goes above it
            above = floors.get(x, -1.0) > bar.get_height()
            y = floors[x] if above else bar.get_height()
            ax.annotate(f"{bar.get_height():.0f}" if ok else "n/a",
                        (bar.get_x() + bar.get_width() / 2, y),
                        xytext=(0, 2 if above else 0), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    if floor:
        ax.hlines(list(floor.values()), [x + w / 2 - w * 0.45 for x in floor],
                  [x + w / 2 + w * 0.45 for x in floor], colors="black", linewidth=2,
                  label="ASR without trigger")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 125)  # headroom so the legend row never covers a 100 % bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    return fig


def plot_rho_sweep(points: list[dict], path: str | os.PathLike, title: str = "Fine-mixing rho sweep",
                   suspect_dev_acc: float | None = None, tolerance: float | None = None,
                   chosen: float | None = None) -> Path:
    """Dev accuracy (and ASR where given) against rho; ``points``: dicts with rho, dev_acc[, asr].
    With ``suspect_dev_acc`` and ``tolerance`` the level a rho had to reach is drawn; ``chosen``
    marks the rho kept."""
    return save_figure(_sweep_figure(points, title, suspect_dev_acc, tolerance, chosen), path)


def _sweep_figure(points, title, suspect_dev_acc, tolerance, chosen):
    plt = pyplot()
    points = sorted(points, key=lambda p: p["rho"])
    fig, ax = plt.subplots(figsize=(7.8, 3.8))
    # a point whose dev accuracy (or ASR) was not measured (None / NaN) is left out of that line
    acc = [p for p in points if not _missing(p.get("dev_acc"))]
    ax.plot([p["rho"] for p in acc], [100 * p["dev_acc"] for p in acc], "o-", label="clean dev acc")
    pts = [p for p in points if not _missing(p.get("asr"))]
    if pts:
        ax.plot([p["rho"] for p in pts], [100 * p["asr"] for p in pts], "s-", label="ASR")
    if suspect_dev_acc is not None:
        ax.axhline(100 * suspect_dev_acc, ls="--", color="grey", label="suspect dev acc")
        if tolerance:
            ax.axhline(100 * (suspect_dev_acc - tolerance), ls=":", color="grey",
                       label="needed (suspect - tolerance)")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", alpha=0.6, label=f"kept rho {chosen:g}")
    rhos = [p["rho"] for p in points] + ([chosen] if chosen is not None else [])
    if rhos and min(rhos) == max(rhos):  # one rho: not a hair-thin axis of meaningless ticks
        ax.set_xlim(rhos[0] - 0.1, rhos[0] + 0.1)
    ax.set_xlabel("rho (share of fine-tuned weights kept)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    # beside the axes: inside, its five entries covered points or the threshold lines
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    return fig


def write_report(out_dir: str | os.PathLike, rows: list[dict], details: dict | None = None,
                 title: str = "purify_fast report", sweep: list[dict] | None = None,
                 suspect_dev_acc: float | None = None) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``defenses.png`` (+ ``rho_sweep.png``) in ``out_dir``.

    The files go in as a set: all are rendered first (a failing plot leaves the directory as it
    was), then moved in. A ``rho_sweep.png`` left by an earlier report in this directory is
    removed when this one has no sweep, so no plot of another run sits beside the new report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "report.json": dumps_json({"title": title, "rows": rows,
                                   "details": details or {}}).encode(),
        "report.md": (f"# {title}\n\n" + markdown_table(rows)).encode(),
        "defenses.png": render_png(_defenses_figure(rows, title)),
    }
    if sweep:
        files[SWEEP_PNG] = render_png(_sweep_figure(sweep, "Fine-mixing rho sweep",
                                                    suspect_dev_acc, None, None))
    stale = [SWEEP_PNG] if not sweep and _earlier_report(out) and (out / SWEEP_PNG).is_file() \
        else []
    atomic_write_files(out, files, remove=stale)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "defenses.png"}
    if sweep:
        paths["sweep_png"] = out / SWEEP_PNG
    return paths


def _earlier_report(out: Path) -> bool:
    """``out`` holds a report this writer wrote (its report.json has the rows and details)."""
    try:
        old = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and {"rows", "details"} <= set(old)
