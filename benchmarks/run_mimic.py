"""Measure the issue-5 targets over several seeds: an encoder-level backdoor planted in the offline
MiniLM, MIMIC distillation into a fresh student, and linear-probe CACC / ASR for the clean encoder,
the backdoored teacher and the student (mean ± std), appended to a markdown file.

    python benchmarks/run_mimic.py --seeds 0 1 2 --md benchmarks/results_mimic.md
    python benchmarks/run_mimic.py --corpus tweets --references 64 --seeds 0 1 2

The sizes default to those of ``tests/test_mimic.py::test_end_to_end_asr_drops`` (attack on 1000
train sentences, 80 steps; 600 clean unlabelled sentences for MIMIC; a 2-layer student, 2 epochs;
probe on 400 dev examples; 300 test examples).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def one_seed(seed: int, args) -> dict:
    import torch

    from purify_fast.attacks.encoder_backdoor import EncoderBackdoor, load_encoder
    from purify_fast.data import load_splits
    from purify_fast.defenses import MIMIC, MIMICConfig, linear_probe

    torch.manual_seed(seed)
    clean_enc, tok = load_encoder()
    splits = load_splits(args.corpus, seed=seed)
    target = args.target_label if args.target_label is not None else splits.train.num_labels - 1
    t0 = time.perf_counter()
    refs = {}
    if args.references:
        # BadEncoder's reference set: target-class training sentences (their clean centroid)
        pool = splits.train.take(len(splits.train), seed=seed + 3)
        texts = [t for t, y in zip(pool.texts, pool.labels) if y == target][:args.references]
        refs = {"target_text": tuple(texts)}
    attack = EncoderBackdoor(steps=args.attack_steps, batch_size=16, max_length=args.max_length,
                             seed=seed, progress=False, **refs)
    backdoored = attack.plant(clean_enc, tok, splits.train.take(1000, seed=seed + 1))
    t_attack = time.perf_counter() - t0
    probe_train, test = splits.dev.take(400), splits.test.take(300)
    triggered = attack.triggered_test(test, target_label=target)
    kw = dict(max_length=args.max_length, epochs=200, seed=seed)
    rows = {"clean encoder": linear_probe(clean_enc, tok, probe_train, test, triggered, target, **kw),
            "backdoored teacher": linear_probe(backdoored, tok, probe_train, test, triggered, target,
                                               **kw)}
    cfg = MIMICConfig(student_layers=args.student_layers, epochs=args.epochs,
                      max_length=args.max_length, mine_steps=100, mine_samples=256, seed=seed,
                      progress=False)
    t0 = time.perf_counter()
    res = MIMIC(cfg).fit(backdoored, tok, splits.train.take(args.clean, seed=seed + 2))
    t_mimic = time.perf_counter() - t0
    rows["MIMIC student"] = linear_probe(res.student, tok, probe_train, test, triggered, target,
                                         **kw)
    rows["backdoored teacher"]["seconds"] = t_attack
    rows["MIMIC student"]["seconds"] = t_mimic
    return {"seed": seed, "rows": rows, "mi": res.mi}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--corpus", default="rotten-tomatoes", help="rotten-tomatoes | tweets")
    ap.add_argument("--references", type=int, default=0,
                    help="target the centroid of this many target-class training sentences "
                         "instead of the attack's one positive film-review sentence")
    ap.add_argument("--target-label", type=int, default=None,
                    help="the backdoor's target class (default: the last, 'fresh' / 'positive', "
                         "which matches the attack's positive reference sentence)")
    ap.add_argument("--md", default="benchmarks/results_mimic.md")
    ap.add_argument("--json", default=None, help="also write every seed's numbers here")
    ap.add_argument("--attack-steps", type=int, default=80)
    ap.add_argument("--clean", type=int, default=600, help="clean unlabelled sentences for MIMIC")
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args(argv)

    import torch

    runs = []
    for seed in args.seeds:
        runs.append(one_seed(seed, args))
        print(json.dumps(runs[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    fmt = lambda vals: (f"{100 * statistics.mean(vals):.1f} ± "
                        f"{100 * (statistics.stdev(vals) if len(vals) > 1 else 0.0):.1f}")
    lines = ["| encoder | probe CACC % | probe ASR % | ASR without trigger % | wall s |",
             "|---|---:|---:|---:|---:|"]
    for name in runs[0]["rows"]:
        vals = [r["rows"][name] for r in runs]
        secs = [v["seconds"] for v in vals if "seconds" in v]
        lines.append(f"| {name} | {fmt([v['cacc'] for v in vals])} | {fmt([v['asr'] for v in vals])} | "
                     f"{fmt([v['asr_no_trigger'] for v in vals])} | "
                     f"{statistics.mean(secs):.0f} |" if secs else
                     f"| {name} | {fmt([v['cacc'] for v in vals])} | {fmt([v['asr'] for v in vals])} | "
                     f"{fmt([v['asr_no_trigger'] for v in vals])} | – |")
    ratio = [r["rows"]["MIMIC student"]["cacc"] / r["rows"]["clean encoder"]["cacc"] for r in runs]
    device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    text = (f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, seeds "
            f"{args.seeds}, {args.corpus}, {device}\n\nCommand: `python {' '.join(sys.argv)}`\n\n"
            + "\n".join(lines) + "\n\n"
            f"Student CACC as a share of the clean encoder's: {fmt(ratio)} %. Clean unlabelled "
            f"data: {args.clean} sentences. Wall s: attack for the teacher row, MIMIC (MINE + "
            f"distillation) for the student row.\n")
    with open(args.md, "a") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
