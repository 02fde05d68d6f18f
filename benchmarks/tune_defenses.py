"""Tuning sweep for the issue-3 defenses on seeds kept apart from the reported table.

The 3-seed table (``run_defenses.py``) uses seeds 0-2; choosing options by their test ASR would
tune on the test set, so settings are compared here on other seeds (default 3 and 4: their own
data split, poison and suspect), with the demo's full sizes. Each seed's BadNets suspect is built
once and cached (``--cache``); each setting is one ``purify`` call evaluated on that seed's test
split. Results append to ``--jsonl`` (a rerun skips settings already there) and the table prints
as markdown.

    python benchmarks/tune_defenses.py --seed 3 --jsonl runs/tune.jsonl   # one process per seed
    python benchmarks/tune_defenses.py --seed 4 --jsonl runs/tune.jsonl
    python benchmarks/tune_defenses.py --table runs/tune.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

FM = dict(method="fine-mixing", e_pur=True, rho=0.3, lr=3e-4, epochs=5)  # the demo's settings
FP = dict(method="fine-purifying", rho=0.3, lr=3e-4, epochs=5)


def settings() -> list[dict]:
    out = []
    for tag, base in (("FM", FM), ("FP", FP)):
        out += [{**base, "name": f"{tag} base"},
                {**base, "lr": 1e-4, "name": f"{tag} lr1e-4"},
                {**base, "lr": 1e-4, "epochs": 10, "name": f"{tag} lr1e-4 ep10"},
                {**base, "dev_fraction": 0.4, "name": f"{tag} devfrac0.4"},
                {**base, "batch_size": 32, "epochs": 10, "name": f"{tag} bs32 ep10"}]
    out += [{**FM, "select": "magnitude", "name": "FM magnitude"},
            {**FM, "rho": 0.2, "name": "FM rho0.2"},
            {**FP, "rho": 0.4, "name": "FP rho0.4"},
            {**FP, "rho": 0.25, "name": "FP rho0.25"},
            {"method": "fine-tune", "lr": 3e-4, "epochs": 5, "name": "FT only"}]
    return out


def run_seed(seed: int, jsonl: Path, cache: Path, only: list[str] | None = None) -> None:
    import torch

    from purify_fast.attacks import BadNets
    from purify_fast.commands.attack import build_backdoor
    from purify_fast.commands.demo import SIZES
    from purify_fast.data import load_rotten_tomatoes
    from purify_fast.defenses import purify
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier

    size = SIZES["full"]
    splits = load_rotten_tomatoes(seed=seed, train_size=size["train_size"],
                                  dev_size=size["dev_size"], test_size=size["test_size"])
    clean = splits.dev.take(size["clean_size"])
    attack = BadNets(target_label=1, poison_rate=0.1, seed=seed)
    triggered = attack.triggered_test(splits.test)
    cached = cache / f"suspect_seed{seed}.pt"
    if cached.exists():
        suspect, tok = load_classifier("minilm", 2)
        suspect.load_state_dict(torch.load(cached))
    else:  # as the demo builds it
        args = SimpleNamespace(model="minilm", device="cpu", epochs=size["epochs"], lr=3e-4,
                               batch_size=32, max_length=64, precision="fp32", seed=seed,
                               attack="badnets")
        suspect, tok, _ = build_backdoor(args, splits, attack, progress=False)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(suspect.state_dict(), cached)
    pretrained, _ = load_classifier("minilm", 2, tokenizer=False)
    done = set()
    if jsonl.exists():
        done = {(r["seed"], r["name"]) for r in map(json.loads, jsonl.read_text().splitlines())}

    def record(name, model, seconds):
        m = evaluate_backdoor(model, tok, splits.test, triggered, attack.target_label)
        with jsonl.open("a") as fh:
            fh.write(json.dumps({"seed": seed, "name": name, **m, "seconds": seconds}) + "\n")
        print(f"seed {seed} {name}: CACC {100 * m['cacc']:.1f} ASR {100 * m['asr']:.1f} "
              f"no-trigger {100 * m['asr_no_trigger']:.1f} ({seconds:.0f} s)", flush=True)

    if (seed, "suspect") not in done:
        record("suspect", suspect, 0.0)
    for setting in settings():
        name = setting.pop("name")
        if (seed, name) in done or (only and name not in only):
            continue
        method = setting.pop("method")
        t0 = time.perf_counter()
        model, _ = purify(suspect, pretrained, clean, method, tokenizer=tok, seed=seed, **setting)
        record(name, model, time.perf_counter() - t0)


def table(jsonl: Path) -> str:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    seeds = sorted({r["seed"] for r in rows})
    suspect = {r["seed"]: r for r in rows if r["name"] == "suspect"}
    cell = lambda r: f"{100 * r['cacc']:.1f} / {100 * r['asr']:.1f} / {100 * r['asr_no_trigger']:.1f}"
    lines = ["| setting | " + " | ".join(f"seed {s} CACC / ASR / no-trigger %" for s in seeds)
             + " | mean ASR % | mean CACC drop vs suspect, points |",
             "|---|" + "---|" * len(seeds) + "---:|---:|"]
    for name in dict.fromkeys(r["name"] for r in rows):
        by_seed = {r["seed"]: r for r in rows if r["name"] == name}
        if set(by_seed) != set(seeds):
            continue  # unfinished
        drop = statistics.mean(100 * (suspect[s]["cacc"] - by_seed[s]["cacc"]) for s in seeds)
        asr = statistics.mean(100 * r["asr"] for r in by_seed.values())
        lines.append(f"| {name} | " + " | ".join(cell(by_seed[s]) for s in seeds)
                     + f" | {asr:.1f} | {drop:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="run every setting on this seed")
    ap.add_argument("--jsonl", type=Path, default=Path("runs/tune_defenses.jsonl"))
    ap.add_argument("--cache", type=Path, default=Path("runs/tune_defenses_cache"))
    ap.add_argument("--table", type=Path, default=None, help="print the table of this jsonl")
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="run only this setting (repeatable), e.g. --only 'FP base'")
    args = ap.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    if args.seed is None:
        ap.error("give --seed (or --table)")
    if args.seed in (0, 1, 2):
        ap.error("seeds 0-2 are the reported table's; tune on others")
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    names = {s["name"] for s in settings()}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        ap.error(f"unknown --only {unknown}; settings: {sorted(names)}")
    run_seed(args.seed, args.jsonl, args.cache, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
