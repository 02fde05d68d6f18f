"""``purify-fast demo``: the whole story on the offline MiniLM and Rotten Tomatoes.

1. a clean fine-tune (reference CACC) and a BadNets-backdoored fine-tune (dirty label, rare-word
   triggers) of all-MiniLM-L6-v2;
2. on the backdoored model, with a small clean set: plain clean fine-tuning (the contrast),
   Fine-mixing + E-PUR, Fine-purifying;
3. an EP attack (trigger embedding rows only) on the clean model, and E-PUR against it;
4. the CACC/ASR table printed, and report.json / report.md / defenses.png written to ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from purify_fast.commands import add_device_arg, check_output_dir, pick_device, seed_int
from purify_fast.validation import int_at_least, real_in, seed_value

SIZES = {  # train, dev, test, clean set, attack epochs
    "full": dict(train_size=1500, dev_size=300, test_size=400, clean_size=240, epochs=2),
    "quick": dict(train_size=480, dev_size=160, test_size=160, clean_size=160, epochs=3),
    # More accurate models (a clean fine-tune's own error on negatives is the floor under ASR) and
    # a 1000-example test set; several times the full demo's time, for benchmarks/run_defenses.py.
    "large": dict(train_size=6000, dev_size=800, test_size=1000, clean_size=480, epochs=2),
}


def add_parser(sub):
    p = sub.add_parser("demo", help="backdoor MiniLM on Rotten Tomatoes, run the weight-space "
                                    "defenses, print the table")
    p.add_argument("--out", default="purify_demo", help="directory for report.json/.md/.png")
    p.add_argument("--quick", action="store_true", help="smaller sizes (CI); same as --size quick")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="data sizes: quick (CI), full (default, under 10 min on 2 CPU cores), "
                        "large (6000 train / 1000 test, several times longer)")
    p.add_argument("--seed", type=seed_int, default=0)
    add_device_arg(p)
    p.add_argument("--backend", default=None, help="kernel backend for the ops")
    p.add_argument("--attack-lr", type=float, default=3e-4)
    p.add_argument("--defense-lr", type=float, default=3e-4,
                   help="clean fine-tune lr (MiniLM with ~200 clean examples needs more than the "
                        "2e-5 of larger models)")
    p.add_argument("--defense-epochs", type=int, default=5,
                   help="clean fine-tune epochs after mixing / reset")
    p.add_argument("--mixing-rho", type=float, default=0.3,
                   help="Fine-mixing reserve ratio (0.3 here; the library default is 0.5)")
    p.add_argument("--purifying-rho", type=float, default=None,
                   help="Fine-purifying reset share (default: 0.3)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run_demo(out: str | None = "purify_demo", quick: bool = False, seed: int = 0,
             device: str | None = None, backend: str | None = None, attack_lr: float = 3e-4,
             defense_lr: float = 3e-4, defense_epochs: int = 5, progress: bool = True,
             mixing_rho: float | None = 0.3, purifying_rho: float | None = None,
             log=print, size: str | None = None) -> dict:
    """Run the demo; returns ``{"rows": [...], "details": {...}}`` (and writes ``out``).
    ``size`` (a key of :data:`SIZES`) overrides ``quick``."""
    from purify_fast.attacks import BadNets, embedding_poison
    from purify_fast.commands.attack import build_backdoor
    from purify_fast.data import load_rotten_tomatoes
    from purify_fast.defenses import purify
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier
    from purify_fast.report import markdown_table, write_report
    from purify_fast.training import TrainConfig, seed_everything, train

    size_name = size or ("quick" if quick else "full")
    if size_name not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size_name!r}")
    size = SIZES[size_name]
    # Every option is checked before the first minute of training, not where it is first used.
    for name, rho in (("mixing_rho", mixing_rho), ("purifying_rho", purifying_rho)):
        real_in(name, rho, 0.0, 1.0, optional=True)
    seed = seed_value(seed)
    real_in("attack_lr", attack_lr, 0.0, lo_open=True)
    real_in("defense_lr", defense_lr, 0.0, lo_open=True)
    int_at_least("defense_epochs", defense_epochs, 0)
    if out:
        check_output_dir(out, "minilm", replace=False)  # the demo reads the offline MiniLM
        if Path(out).is_dir() and any(Path(out).iterdir()) and not (Path(out) / "report.json").exists():
            raise FileExistsError(f"--out {out} is a non-empty directory that holds no earlier "
                                  f"report.json; the demo writes report.json / report.md / "
                                  f"defenses.png there, so choose a new or empty directory")
    device = pick_device(device)
    t_all = time.perf_counter()
    splits = load_rotten_tomatoes(seed=seed, train_size=size["train_size"],
                                  dev_size=size["dev_size"], test_size=size["test_size"])
    clean = splits.dev.take(size["clean_size"])
    attack = BadNets(target_label=1, poison_rate=0.1, seed=seed)
    triggered = attack.triggered_test(splits.test)
    ev = lambda m, tok: evaluate_backdoor(m, tok, splits.test, triggered, attack.target_label)
    rows, details = [], {"size": size_name, "sizes": size, "seed": seed, "device": device}

    def add(name, model, tok, seconds):
        m = ev(model, tok)
        rows.append({"name": name, "cacc": m["cacc"], "asr": m["asr"],
                     "asr_no_trigger": m["asr_no_trigger"], "seconds": seconds})
        log(f"  {name:<28} CACC {100 * m['cacc']:5.1f}%  ASR {100 * m['asr']:5.1f}% "
            f"(without trigger {100 * m['asr_no_trigger']:4.1f}%)  ({seconds:.1f} s)")

    log(f"[1/4] clean and backdoored fine-tunes of MiniLM ({len(splits.train)} train examples)")
    t0 = time.perf_counter()
    seed_everything(seed)
    clean_model, tok = load_classifier("minilm", 2, device=device)
    cfg = TrainConfig(epochs=size["epochs"], lr=attack_lr, seed=seed, progress=progress)
    details["clean_train"] = train(clean_model, tok, splits.train, splits.dev, cfg).to_dict()
    add("clean fine-tune (reference)", clean_model, tok, time.perf_counter() - t0)
    t0 = time.perf_counter()
    args = SimpleNamespace(model="minilm", device=device, epochs=size["epochs"], lr=attack_lr,
                           batch_size=32, max_length=64, precision="fp32", seed=seed, attack="badnets")
    suspect, tok, details["badnets"] = build_backdoor(args, splits, attack, progress=progress)
    add("BadNets backdoored", suspect, tok, time.perf_counter() - t0)

    pretrained, _ = load_classifier("minilm", 2, device=device, tokenizer=False)
    common = dict(tokenizer=tok, seed=seed, backend=backend, lr=defense_lr, epochs=defense_epochs,
                  progress=progress)
    log(f"[2/4] defenses on the BadNets model ({len(clean)} clean examples)")
    for name, method, extra in [("clean fine-tune only", "fine-tune", {}),
                                ("Fine-mixing + E-PUR", "fine-mixing",
                                 {"e_pur": True, "rho": mixing_rho}),
                                ("Fine-purifying", "fine-purifying", {"rho": purifying_rho})]:
        model, rep = purify(suspect, pretrained, clean, method, **common, **extra)
        details[name] = rep
        add(name, model, tok, rep["seconds"]["total"])
        del model

    log("[3/4] EP attack (trigger embedding rows only) and E-PUR")
    t0 = time.perf_counter()
    ep = embedding_poison(clean_model, tok, splits.train, attack, seed=seed, progress=progress)
    details["ep"] = {"trigger_ids": list(ep.trigger_ids), "train": ep.train.to_dict()}
    add("EP backdoored", ep.model, tok, time.perf_counter() - t0)
    model, rep = purify(ep.model, pretrained, clean, "e-pur", tokenizer=tok, seed=seed, backend=backend)
    details["E-PUR vs EP"] = rep
    rep["triggers_reset"] = sorted(set(ep.trigger_ids) & set(rep["e_pur"]["reset_ids"]))
    add("E-PUR (vs EP)", model, tok, rep["seconds"]["total"])

    details["total_seconds"] = time.perf_counter() - t_all
    log("[4/4] results")
    table = markdown_table(rows, title=f"MiniLM / Rotten Tomatoes / BadNets, seed {seed}")
    log(table)
    log(f"total {details['total_seconds']:.0f} s on {device}")
    result = {"rows": rows, "details": details}
    if out:
        paths = write_report(out, rows, details, title="purify_fast demo")
        log("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


def run(args) -> int:
    run_demo(args.out, quick=args.quick, size=args.size, seed=args.seed, device=args.device,
             backend=args.backend, attack_lr=args.attack_lr, defense_lr=args.defense_lr,
             defense_epochs=args.defense_epochs, progress=not args.no_progress,
             mixing_rho=args.mixing_rho, purifying_rho=args.purifying_rho)
    return 0
