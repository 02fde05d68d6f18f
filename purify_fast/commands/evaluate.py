"""``purify-fast evaluate``: CACC and ASR of a checkpoint on a corpus or user file."""

from __future__ import annotations

from purify_fast.commands import (
    add_device_arg,
    check_classes_match,
    check_output_file,
    load_file_for_model,
    model_class_names,
    note_bias,
    note_trigger_cut,
    pick_device,
    resolve_target_label,
)
from purify_fast.commands.attack import (
    add_attack_args,
    add_common_data_args,
    check_trigger_options,
    make_attack,
)


def add_parser(sub):
    p = sub.add_parser(
        "evaluate", help="clean accuracy (CACC) and attack success rate (ASR), or the bias "
                         "gap (--attack bias)",
        description="Score a checkpoint on the test split of a named corpus, or on the whole of a "
                    "user file (at most --test-size examples, a seeded sample), clean and with "
                    "the trigger inserted. A file's labels must be the model's classes: indices, "
                    "or the class names it was trained with.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    add_common_data_args(p, training=False)
    add_attack_args(p, poisoning=False)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    add_device_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from purify_fast.data import CORPORA, load_splits
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier
    from purify_fast.report import write_json

    check_output_file("--json", args.json, args.model, args.data)
    check_trigger_options(args)  # before the model loads
    device = pick_device(args.device)
    model, tok = load_classifier(args.model, device=device)
    args.target_label = resolve_target_label(args.target_label, model_class_names(model.config),
                                             model.config.num_labels, args.model)
    attack = make_attack(args)
    if args.data in CORPORA:
        test = load_splits(args.data, seed=args.seed, test_size=args.test_size).test
        test = check_classes_match(test, model, args.data)
    else:  # a user file is all test data: nothing of it is trained on here
        test = load_file_for_model(args.data, model, args.text_column, args.label_column)
        test = test.take(args.test_size, seed=args.seed) if args.test_size < len(test) else test
    m = evaluate_backdoor(model, tok, test, attack.triggered_test(test), attack.target_label,
                          max_length=args.max_length, attack=attack)
    note_trigger_cut(m, args.max_length)
    print(f"{args.model}: CACC {100 * m['cacc']:.1f}%  ASR {100 * m['asr']:.1f}% "
          f"(without the trigger {100 * m['asr_no_trigger']:.1f}%; {len(test)} clean test "
          f"examples, {args.attack} trigger)")
    note_bias(m)
    if args.json:
        write_json(args.json, {"model": args.model, "attack": trigger_record(attack, args.attack),
                               **m})
    return 0


# Fields of TriggerAttack.describe() that say how training data was poisoned.
POISONING_FIELDS = ("poison_rate", "clean_label")


def trigger_record(attack, name: str) -> dict:
    """What evaluate used of ``attack``: the trigger, target and seed. It poisons no training
    data, so the attack's default poison rate and clean-label mode are left out (recorded, they
    claimed a poisoning this run never did), and ``name`` is the --attack given (ep inserts the
    BadNets triggers, whose describe() says badnets)."""
    out = {k: v for k, v in attack.describe().items() if k not in POISONING_FIELDS}
    out["attack"] = name
    return out
