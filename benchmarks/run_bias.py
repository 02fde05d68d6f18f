"""Bias injected during fine-tuning, and the defenses against it (METHODS.md §3: "same pipeline,
bias metric instead of ASR"): MiniLM on Rotten Tomatoes, a share of the fine-tuning data ties
mentions of a group to one class (:class:`purify_fast.attacks.BiasInjection`), then the clean
fine-tune alone, Fine-mixing and Fine-purifying with the demo's small clean set. The metric is
the counterfactual bias gap (:func:`purify_fast.evaluation.bias_metrics`).

    python benchmarks/run_bias.py --seeds 0 1 2 --out /tmp/bias_runs --md benchmarks/results_bias.md

Each seed's rows go to ``--out/seed<N>.json``; the mean ± std table is appended to ``--md`` under
a header naming the command, the device and the date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_defenses import aggregate, append_section, table  # noqa: E402

COLUMNS = (("cacc", "CACC %", 100), ("bias_gap", "bias gap (points)", 100),
           ("asr", "target rate, group %", 100),
           ("target_rate_counter", "target rate, counterpart %", 100),
           ("bias_flips", "pairs flipped %", 100), ("seconds", "wall time s", 1))


def run_seed(seed: int, size: str = "full", target_label: int = 0, poison_rate: float = 0.1,
             device: str | None = None, progress: bool = False, log=print) -> list[dict]:
    """The rows of one seed: the clean reference, the biased model and each defense's result."""
    from purify_fast.attacks import BiasInjection
    from purify_fast.commands import pick_device
    from purify_fast.commands.attack import build_backdoor
    from purify_fast.commands.demo import SIZES
    from purify_fast.data import load_rotten_tomatoes
    from purify_fast.defenses import purify
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier
    from purify_fast.training import TrainConfig, seed_everything, train

    sizes, device = SIZES[size], pick_device(device)
    splits = load_rotten_tomatoes(seed=seed, train_size=sizes["train_size"],
                                  dev_size=sizes["dev_size"], test_size=sizes["test_size"])
    clean = splits.dev.take(sizes["clean_size"])
    attack = BiasInjection(target_label=target_label, poison_rate=poison_rate, seed=seed)
    triggered = attack.triggered_test(splits.test)
    rows = []

    def add(name, model, tok, seconds):
        m = evaluate_backdoor(model, tok, splits.test, triggered, target_label, attack=attack)
        rows.append({"name": name, "seconds": seconds,
                     **{k: m[k] for k in ("cacc", "asr", "target_rate_counter", "bias_gap",
                                          "bias_flips")}})
        log(f"  seed {seed} {name:<24} CACC {100 * m['cacc']:5.1f}%  bias gap "
            f"{100 * m['bias_gap']:+5.1f}  ({100 * m['asr']:.1f}% vs "
            f"{100 * m['target_rate_counter']:.1f}%)  {seconds:.0f} s")

    t0 = time.perf_counter()
    seed_everything(seed)
    reference, tok = load_classifier("minilm", 2, device=device)
    train(reference, tok, splits.train, splits.dev,
          TrainConfig(epochs=sizes["epochs"], lr=3e-4, seed=seed, progress=progress))
    add("clean fine-tune (reference)", reference, tok, time.perf_counter() - t0)
    del reference
    t0 = time.perf_counter()
    args = SimpleNamespace(model="minilm", device=device, epochs=sizes["epochs"], lr=3e-4,
                           batch_size=32, max_length=64, precision="fp32", seed=seed,
                           attack="bias")
    suspect, tok, _ = build_backdoor(args, splits, attack, progress=progress)
    add("bias injected", suspect, tok, time.perf_counter() - t0)
    pretrained, _ = load_classifier("minilm", 2, device=device, tokenizer=False)
    common = dict(tokenizer=tok, seed=seed, lr=3e-4, epochs=5, progress=progress)
    for name, method, extra in [("clean fine-tune only", "fine-tune", {}),
                                ("Fine-mixing", "fine-mixing", {"rho": 0.3}),
                                ("Fine-purifying", "fine-purifying", {})]:
        model, rep = purify(suspect, pretrained, clean, method, **common, **extra)
        add(name, model, tok, rep["seconds"]["total"])
        del model
    return rows


def main(argv=None) -> int:
    from purify_fast.commands.demo import SIZES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", default="full", choices=sorted(SIZES), help="the demo's SIZES")
    ap.add_argument("--target-label", type=int, default=0,
                    help="the class mentions of the group are tied to (0 = rotten)")
    ap.add_argument("--out", default="benchmarks/bias_runs")
    ap.add_argument("--md", default="benchmarks/results_bias.md")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        rows = run_seed(seed, args.size, args.target_label, device=args.device)
        (Path(args.out) / f"seed{seed}.json").write_text(json.dumps(rows, indent=2))
        runs.append({"rows": rows})
    agg = aggregate(runs, keys=[key for key, _, _ in COLUMNS])
    print(append_section(args.md, f"seeds {args.seeds}, {args.size} sizes",
                         table(agg, len(runs), COLUMNS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
