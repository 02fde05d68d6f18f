"""``purify-fast train-clean``: train a clean model on possibly poisoned data (MuScleLoRA) and write
it merged (plain architecture, loads with ``from_pretrained``), atomically.

Example::

    purify-fast train-clean --method muscle-lora --data rotten-tomatoes --model minilm \\
        --out runs/rt-clean --attack badnets --epochs 3

``--data`` is a corpus name (``rotten-tomatoes``, ``tweets``: split into train/dev/test by
``--seed``) or a user file/directory of training examples, in which case ``--dev`` (a clean
labelled file) is required. ``--attack`` plants a backdoor in the training split first (to
evaluate the defense): CACC and ASR on the test split are then written to ``report.json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

from purify_fast.commands import (
    add_device_arg,
    check_output_dir,
    load_file_like,
    max_length_arg,
    note_bias,
    note_trigger_cut,
    number_as_model,
    pick_device,
    positive_int,
    record_label_names,
    resolve_target_label,
    seed_int,
    target_label_arg,
)


def add_parser(sub):
    p = sub.add_parser("train-clean",
                       help="train a clean model on possibly poisoned data (MuScleLoRA) and save "
                            "it merged")
    p.add_argument("--method", default="muscle-lora", choices=["muscle-lora"])
    p.add_argument("--ablation", default="muscle-lora",
                   choices=["muscle-lora", "lora", "ga+lora", "lora+mslr"],
                   help="muscle-lora = MSLR + LoRA + gradient alignment (default)")
    p.add_argument("--data", required=True, help="corpus name or training data file/directory")
    p.add_argument("--dev", default=None, help="clean dev file (required for a user --data file)")
    p.add_argument("--text-column", default="text", help="text column of the --data / --dev files")
    p.add_argument("--label-column", default="label",
                   help="label column of the --data / --dev files")
    p.add_argument("--model", default="minilm", help="local checkpoint directory or 'minilm'")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--scaling", choices=["radial", "fft"], default="radial")
    p.add_argument("--scales", default=None,
                   help="comma-separated MSLR scales (default: the architecture's)")
    p.add_argument("--alpha", type=float, default=None,
                   help="MSLR alpha (default: the architecture's, 6 for encoders; the offline "
                        "MiniLM trains better with 1, see benchmarks/results_muscle_lora.md)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=max_length_arg, default=64)
    p.add_argument("--train-size", type=positive_int, default=None, help="cap the corpus train split")
    p.add_argument("--dev-size", type=positive_int, default=None, help="cap the corpus dev split")
    p.add_argument("--test-size", type=positive_int, default=None, help="cap the corpus test split")
    p.add_argument("--ref-pool-size", type=positive_int, default=None)
    p.add_argument("--attack", choices=["badnets", "addsent", "bias"], default=None,
                   help="plant this backdoor (or bias, with the default group terms of "
                        "`attack --attack bias`) in the training split first (evaluation runs)")
    p.add_argument("--poison-rate", type=float, default=None,
                   help="with --attack: share of training examples poisoned (0.1)")
    p.add_argument("--target-label", type=target_label_arg, default=None,
                   help="with --attack: the class the trigger maps to, an index or a class name "
                        "(1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--merged-dtype", choices=["model", "fp32"], default="model",
                   help="dtype of the merged model written: the model's own (default) or fp32, "
                        "which keeps the whole LoRA update of a bf16 / fp16 model (merged into "
                        "bf16 weights most of it is rounded away; a warning says how much)")
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--backend", default=None, help="MSLR op backend (default auto)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


@contextlib.contextmanager
def hf_progress_bars(on: bool):
    """transformers' own bars (save_pretrained's "Writing model shards") follow --no-progress;
    their previous state is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not on:
            hf_logging.enable_progress_bar()


def parse_scales(text: str | None) -> list[float] | None:
    """``--scales 1,4,8`` as floats; a bad item is reported with the option's name."""
    if not text:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers (e.g. 1,4,8), got "
                         f"{text!r}") from None


def run(args) -> int:
    import torch

    from purify_fast.attacks import make_attack
    from purify_fast.data import CORPORA, load_dataset, load_splits
    from purify_fast.defenses.muscle_lora import MuscleLoRATrainConfig, train_clean
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier, save_pretrained_atomic
    from purify_fast.models.loading import is_writer_rank
    from purify_fast.nn import MuscleLoRAConfig
    from purify_fast.training import seed_everything

    check_output_dir(args.out, args.model, args.data, args.dev)
    # checked (by MuscleLoRAConfig too) before any data or model is loaded
    inject = MuscleLoRAConfig(scales=parse_scales(args.scales), alpha=args.alpha,
                              mode=args.scaling, backend=args.backend)
    for flag, value in (("--poison-rate", args.poison_rate), ("--target-label", args.target_label)):
        if value is not None and not args.attack:  # nothing would be poisoned
            raise ValueError(f"{flag} is an option of --attack (the backdoor planted for an "
                             f"evaluation run); without --attack nothing reads it")
    args.poison_rate = 0.1 if args.poison_rate is None else args.poison_rate
    args.target_label = 1 if args.target_label is None else args.target_label
    test = None
    if args.data in CORPORA:
        splits = load_splits(args.data, seed=args.seed, train_size=args.train_size,
                             dev_size=args.dev_size, test_size=args.test_size)
        train, dev, test = splits.train, splits.dev, splits.test
        if args.dev:
            dev = load_file_like(args.dev, train, args.text_column, args.label_column)
    else:
        if not args.dev:
            print("error: --dev (a clean labelled file) is required when --data is a file",
                  file=sys.stderr)
            return 2
        train = load_dataset(args.data, text_column=args.text_column,
                             label_column=args.label_column)
        dev = load_file_like(args.dev, train, args.text_column, args.label_column)
    # As --model numbers its classes (when it names the same ones in another order): the
    # fine-tune, --target-label (an index is the model's class), the scores and the names the
    # checkpoint is written with (record_label_names) then agree.
    train, dev, test = number_as_model((train, dev, test), args.model, args.data)
    attack = None
    if args.attack:
        args.target_label = resolve_target_label(args.target_label, train.label_names,
                                                 train.num_labels, args.data)
        attack = make_attack(args.attack, target_label=args.target_label,
                             poison_rate=args.poison_rate, seed=args.seed)
        train = attack.poison(train).dataset
    # The offline MiniLM has no classifier head: a fresh one is drawn (and MuScleLoRA keeps it
    # frozen), so seed the draw for a reproducible run.
    seed_everything(args.seed)
    model, tok = load_classifier(args.model, train.num_labels, device=pick_device(args.device))
    t0 = time.perf_counter()
    model, result = train_clean(
        model, tok, train, dev, method=args.method, ablation=args.ablation,
        inject=inject,
        config=MuscleLoRATrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                     max_length=args.max_length, precision=args.precision,
                                     seed=args.seed, ref_pool_size=args.ref_pool_size,
                                     progress=not args.no_progress),
        return_result=True, merged_dtype=torch.float32 if args.merged_dtype == "fp32" else None)
    report = {"method": args.method, "ablation": args.ablation, "data": args.data,
              "model": args.model, "train_seconds": time.perf_counter() - t0,
              "best_epoch": result.best_epoch, "best_dev_acc": result.best_dev_acc,
              "tanh_saturation": result.tanh_saturation,
              "history": result.history, "config": result.config}
    if test is not None:
        trig = attack.triggered_test(test) if attack else None
        report["eval"] = evaluate_backdoor(model, tok, test, trig,
                                           args.target_label if attack else None,
                                           max_length=args.max_length, attack=attack)
        note_trigger_cut(report["eval"], args.max_length)
    record_label_names(model, train)
    with hf_progress_bars(not args.no_progress):
        out = save_pretrained_atomic(model, args.out, tok, extra_json={"report.json": report})
    if not is_writer_rank():  # the other ranks of an `accelerate launch` run hold the same model
        return 0
    summary = {k: report[k] for k in ("best_epoch", "best_dev_acc")}
    summary.update(report.get("eval", {}))
    print(f"wrote {out}  {json.dumps(summary, default=str)}")
    note_bias(report.get("eval", {}))
    return 0
