"""``purify-fast evaluate``: CACC and ASR of a checkpoint on a corpus or user file."""

from __future__ import annotations

from purify_fast.commands import add_device_arg, pick_device
from purify_fast.commands.attack import (
    add_attack_args,
    add_common_data_args,
    load_data,
    make_attack,
)


def add_parser(sub):
    p = sub.add_parser("evaluate", help="clean accuracy (CACC) and attack success rate (ASR)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    add_common_data_args(p)
    add_attack_args(p)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier
    from purify_fast.report import write_json

    splits = load_data(args)
    attack = make_attack(args)
    model, tok = load_classifier(args.model, device=pick_device(args.device))
    m = evaluate_backdoor(model, tok, splits.test, attack.triggered_test(splits.test),
                          attack.target_label, max_length=args.max_length)
    print(f"{args.model}: CACC {100 * m['cacc']:.1f}%  ASR {100 * m['asr']:.1f}% "
          f"(without the trigger {100 * m['asr_no_trigger']:.1f}%; {len(splits.test)} clean test examples, {args.attack} trigger)")
    if args.json:
        write_json(args.json, {"model": args.model, "attack": attack.describe(), **m})
    return 0
