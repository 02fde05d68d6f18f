"""Measure the issue-3 targets: the demo pipeline (MiniLM / Rotten Tomatoes / BadNets + EP) over
several seeds, written as mean ± std to a markdown table.

    python benchmarks/run_defenses.py --seeds 0 1 2 --out benchmarks/defenses_runs \
        --md benchmarks/results_defenses.md [--quick | --size large]

Each seed's full report (JSON/MD/PNG) goes to ``--out/seed<N>``; the aggregate table is appended
to ``--md`` under a header naming the command, the device and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path


# (row key, column header, scale): the backdoor table's columns
COLUMNS = (("cacc", "CACC %", 100), ("asr", "ASR %", 100),
           ("asr_no_trigger", "ASR without trigger %", 100), ("seconds", "wall time s", 1))


def aggregate(runs: list[dict], keys=tuple(c[0] for c in COLUMNS)) -> list[dict]:
    names = [r["name"] for r in runs[0]["rows"]]
    out = []
    for name in names:
        rows = [next(r for r in run["rows"] if r["name"] == name) for run in runs]
        agg = {"name": name}
        for key in keys:
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                # sample standard deviation (n - 1); None with one value (no spread measured)
                agg[key] = (statistics.mean(vals),
                            statistics.stdev(vals) if len(vals) > 1 else None, len(vals))
        out.append(agg)
    return out


def table(agg: list[dict], seeds: int, columns=COLUMNS) -> str:
    """Mean ± sample standard deviation (n - 1) over the seeds; a cell over fewer seeds (a value
    missing) says its n."""
    def fmt(v, scale) -> str:
        if v is None:
            return "–"
        mean, std, n = v
        text = f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if std is not None else "")
        return text if n == seeds else f"{text} (n={n})"
    lines = ["| model / defense | " + " | ".join(head for _, head, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for a in agg:
        lines.append(f"| {a['name']} | "
                     + " | ".join(fmt(a.get(key), scale) for key, _, scale in columns) + " |")
    return "\n".join(lines) + "\n"


def append_section(md: str, what: str, body: str) -> str:
    """Append ``body`` to the markdown file ``md`` under a header naming the date, ``what`` was
    run (seeds, sizes), the device and the command line; returns the section's text."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    text = (f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {what}, "
            f"{device}\n\nCommand: `python {' '.join(sys.argv)}`\n\n{body}")
    with open(md, "a") as fh:
        fh.write(text)
    return text


def main(argv=None) -> int:
    from purify_fast.commands.demo import SIZES, run_demo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/defenses_runs")
    ap.add_argument("--md", default="benchmarks/results_defenses.md")
    ap.add_argument("--quick", action="store_true", help="same as --size quick")
    ap.add_argument("--size", default=None, choices=sorted(SIZES),
                    help="the demo's SIZES (default full)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    runs = []
    for seed in args.seeds:
        res = run_demo(str(Path(args.out) / f"seed{seed}"), quick=args.quick, size=args.size,
                       seed=seed, device=args.device, progress=False)
        runs.append(res)
        (Path(args.out) / f"seed{seed}" / "rows.json").write_text(json.dumps(res["rows"], indent=2))
    size_name = runs[0]["details"]["size"]
    print(append_section(args.md, f"seeds {args.seeds}, {size_name} sizes",
                         table(aggregate(runs), len(runs))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
