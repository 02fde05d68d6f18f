"""One MuScleLoRA (or vanilla / ablation) run on a planted BadNets or AddSent backdoor, as measured in
benchmarks/results_muscle_lora.md: one JSON line with CACC, ASR, the no-trigger rate and the
per-epoch history, printed and appended to ``--jsonl``.

    python benchmarks/run_muscle_lora.py --mode vanilla --lr 2e-4 --epochs 4 --bs 16 --pr 0.15 --seed 0
    python benchmarks/run_muscle_lora.py --mode muscle --alpha 1 --lr 2e-3 --epochs 4 --bs 16 \
        --pr 0.15 --scaling fft --seed 0

``python benchmarks/run_muscle_lora.py --summarize RUNS.jsonl`` prints mean ± std per attack and
mode of the lines appended with ``--jsonl``.

``--mode``: ``vanilla`` (full fine-tuning), ``muscle`` (MSLR + LoRA q/v + gradient alignment), or
an ablation of :func:`purify_fast.defenses.muscle_lora.train_clean` (``lora``, ``ga+lora``,
``lora+mslr``). One thread, as measured (the same reduction order gives the same numbers).
"""

import argparse
import json
import sys
import time

import torch


def summarize(jsonl: str) -> str:
    """A markdown table of mean ± std (over seeds) per attack and mode from a ``--jsonl`` file."""
    import statistics
    from collections import defaultdict

    runs = [json.loads(line) for line in open(jsonl)]
    lrs = defaultdict(set)  # a file that compares learning rates keeps them apart too
    for r in runs:
        lrs[r["mode"]].add(r.get("lr"))
    groups = defaultdict(list)
    for r in runs:
        mode = r["mode"]
        if mode in ("muscle", "lora+mslr"):  # runs with an MSLR layer: radial and FFT apart
            mode += f" ({r.get('scaling', 'radial')})"
        if len(lrs[r["mode"]]) > 1:
            mode += f", lr {r.get('lr')}"
        groups[(r.get("attack", "badnets"), mode)].append(r)
    pct = lambda vals: (f"{100 * statistics.mean(vals):.1f} ± "
                        f"{100 * (statistics.stdev(vals) if len(vals) > 1 else 0.0):.1f}")
    lines = ["| attack | run | seeds | CACC % | ASR % | ASR without trigger % | wall s |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (attack, mode), rows in groups.items():
        seeds = ",".join(str(r["seed"]) for r in rows)
        lines.append(f"| {attack} | {mode} | {seeds} | {pct([r['cacc'] for r in rows])} | "
                     f"{pct([r['asr'] for r in rows])} | {pct([r['fpr'] for r in rows])} | "
                     f"{statistics.mean(r['wall'] for r in rows):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="muscle", help="vanilla | muscle | lora | ga+lora | lora+mslr")
    ap.add_argument("--seed", type=int, default=0, help="model, adapters, batch order (and data)")
    ap.add_argument("--data-seed", type=int, default=None, help="data split / poison (default: --seed)")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--ml", type=int, default=32, help="max length")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bs", type=int, default=32, help="batch size")
    ap.add_argument("--pr", type=float, default=0.1, help="poison rate")
    ap.add_argument("--attack", default="badnets", help="badnets | addsent (dirty-label)")
    ap.add_argument("--scales", default=None, help="comma-separated MSLR scales")
    ap.add_argument("--alpha", type=float, default=None, help="MSLR alpha")
    ap.add_argument("--scaling", default="radial", help="radial | fft")
    ap.add_argument("--pool", type=int, default=None, help="GA reference pool size")
    ap.add_argument("--maxraw", type=float, default=0.1, help="max raw-gradient blend ratio")
    ap.add_argument("--nokeep", action="store_true", help="keep the last epoch, not the best")
    ap.add_argument("--jsonl", default=None, help="append the result line here")
    ap.add_argument("--summarize", default=None, metavar="JSONL",
                    help="only print the mean ± std table of a --jsonl file, run nothing")
    a = ap.parse_args(argv)
    if a.summarize:
        print(summarize(a.summarize))
        return 0
    torch.set_num_threads(1)

    from purify_fast.attacks import make_attack
    from purify_fast.data import load_rotten_tomatoes
    from purify_fast.defenses.muscle_lora import MuscleLoRATrainConfig, train_clean
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier
    from purify_fast.nn import MuscleLoRAConfig
    from purify_fast.training import seed_everything, train

    data_seed = a.seed if a.data_seed is None else a.data_seed
    t0 = time.perf_counter()
    splits = load_rotten_tomatoes(seed=data_seed, train_size=a.train, dev_size=a.dev,
                                  test_size=a.test)
    attack = make_attack(a.attack, target_label=1, poison_rate=a.pr, seed=data_seed)
    poisoned = attack.poison(splits.train).dataset
    triggered = attack.triggered_test(splits.test)
    seed_everything(a.seed)  # the offline MiniLM's fresh classifier head is drawn at load time
    model, tok = load_classifier("minilm", 2)
    if a.mode == "vanilla":
        res = train(model, tok, poisoned, splits.dev, epochs=a.epochs, lr=a.lr, batch_size=a.bs,
                    max_length=a.ml, seed=a.seed, progress=False, keep_best=not a.nokeep)
    else:
        scales = [float(s) for s in a.scales.split(",")] if a.scales else None
        model, res = train_clean(
            model, tok, poisoned, splits.dev, ablation="muscle-lora" if a.mode == "muscle" else a.mode,
            inject=MuscleLoRAConfig(scales=scales, alpha=a.alpha, mode=a.scaling),
            config=MuscleLoRATrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.bs,
                                         max_length=a.ml, seed=a.seed, ref_pool_size=a.pool,
                                         progress=False, max_raw_grad_ratio=a.maxraw,
                                         keep_best=not a.nokeep),
            return_result=True)
    m = evaluate_backdoor(model, tok, splits.test, triggered, 1, max_length=a.ml)
    rnd = lambda v: None if v is None else round(v, 3)
    out = dict(vars(a), cacc=rnd(m["cacc"]), asr=rnd(m["asr"]), fpr=rnd(m["asr_no_trigger"]),
               best_epoch=res.best_epoch, wall=round(time.perf_counter() - t0, 1),
               hist=[(h["epoch"], rnd(h["loss"]), rnd(h["dev_acc"]), rnd(h.get("ref_loss")))
                     for h in res.history])
    print(json.dumps(out), flush=True)
    if a.jsonl:
        with open(a.jsonl, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
