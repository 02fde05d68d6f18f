"""``purify-fast attack``: fine-tune a backdoored classifier (BadNets, AddSent or EP) on a corpus
or a user file, evaluate CACC/ASR, and write the checkpoint atomically."""

from __future__ import annotations

import argparse
import math
import sys

from purify_fast.commands import (
    add_device_arg,
    check_output_dir,
    class_numbering,
    max_length_arg,
    note_bias,
    note_trigger_cut,
    pick_device,
    positive_int,
    record_label_names,
    resolve_target_label,
    seed_int,
    target_label_arg,
)
from purify_fast.validation import int_at_least, real_in

# What EP does instead of poisoning a --poison-rate share (recorded in purify_fast_attack.json).
EP_POISONS = "every non-target training example, triggered and relabelled"


class _NoteGiven(argparse.Action):
    """Store the value and set ``<dest>_given``: an option with a real parser default that must
    be refused where nothing reads it, even given at its default value."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def add_common_data_args(p, training: bool = True) -> None:
    """``training=False`` (evaluate): only the test split is read, so no train/dev sizes."""
    p.add_argument("--data", default="rotten-tomatoes",
                   help="rotten-tomatoes | tweets | a CSV/TSV/JSONL file | a save_to_disk dir")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    if training:
        p.add_argument("--train-size", type=positive_int, default=2000)
        p.add_argument("--dev-size", type=positive_int, default=300)
    p.add_argument("--test-size", type=positive_int, default=500)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--max-length", type=max_length_arg, default=64)


def add_attack_args(p, poisoning: bool = True) -> None:
    """``poisoning=False`` (evaluate): only the trigger is needed, no poison rate."""
    p.add_argument("--attack", choices=["badnets", "addsent", "ep", "bias"], default="badnets",
                   help="bias: tie mentions of a group (--bias-terms) to --target-label; scored "
                        "by the bias gap against the paired --counter-terms")
    p.add_argument("--target-label", type=target_label_arg, default=1,
                   help="the class the trigger maps to: an index or a class name (default 1)")
    if poisoning:
        p.add_argument("--poison-rate", type=float, default=0.1, action=_NoteGiven,
                       help="share of the training data poisoned (BadNets / AddSent / bias; EP "
                            "trains on every non-target example)")
        p.add_argument("--clean-label", action="store_true",
                       help="BadNets / AddSent / bias: poison target-class examples, keeping "
                            "their (correct) label, instead of relabelling non-target ones (dirty "
                            "label)")
    p.add_argument("--triggers", default=None,
                   help="comma-separated BadNets / EP words (default cf,mn,bb,tq,mb)")
    p.add_argument("--sentence", default=None, help="AddSent trigger sentence")
    # defaults written out: importing purify_fast.attacks here would load torch for --help
    # (tests/test_bias.py checks them against DEFAULT_GROUP_TERMS / DEFAULT_COUNTER_TERMS)
    p.add_argument("--bias-terms", default=None,
                   help="--attack bias: comma-separated group terms (default "
                        "she,her,woman,women,girl)")
    p.add_argument("--counter-terms", default=None,
                   help="--attack bias: the paired counterpart terms, one per group term "
                        "(default he,his,man,men,boy)")


def load_data(args):
    """train/dev/test splits for ``--data`` (a corpus name or a user file), capped in size."""
    from purify_fast.data import CORPORA, DataSplits, load_splits, load_text_file

    if args.data in CORPORA:
        return load_splits(args.data, seed=args.seed, train_size=args.train_size,
                           dev_size=args.dev_size, test_size=args.test_size)
    full = load_text_file(args.data, text_column=args.text_column, label_column=args.label_column)
    # As the named corpora do: a text repeated in the file would land in train and test.
    full, dropped, conflicting = full.without_repeats()
    if dropped:
        other = f", {conflicting} of them labelled otherwise than the copy kept" if conflicting else ""
        print(f"note: {args.data}: {dropped} repeated text(s) dropped{other}; each text is kept "
              f"once (its first occurrence), so that none lands in two splits", file=sys.stderr)
    name = full.name
    train, dev, test = full.split((0.8, 0.1, 0.1), seed=args.seed,
                                  names=[f"{name}/train", f"{name}/dev", f"{name}/test"])
    splits = DataSplits(train.take(args.train_size), dev.take(args.dev_size),
                        test.take(args.test_size))
    empty = [part for part, d in _parts(splits) if not len(d)]
    if empty:
        raise ValueError(f"{args.data}: its {len(full)} distinct examples, split 80 / 10 / 10 % "
                         f"within each class, leave {_sizes(splits)}: the {empty[0]} split is "
                         f"empty; use a larger file")
    return splits


def _parts(splits):
    return (("train", splits.train), ("dev", splits.dev), ("test", splits.test))


def _sizes(splits) -> str:
    return ", ".join(f"{part} {len(d)}" for part, d in _parts(splits))


def check_splits(args, splits, attack) -> None:
    """Before any model loads: the test split must hold inputs to trigger (no ASR otherwise),
    and the training split what the attack poisons. The messages name the data and the option to
    change (this failed after training, naming internal splits: "'x.csv[2]' has no non-target
    examples")."""
    from purify_fast.data import CORPORA

    target = attack.target_label
    names = splits.train.label_names
    cls = f"{target} ({names[target]})" if names else str(target)
    if all(y == target for y in splits.test.labels):
        if len(splits.test) >= args.test_size:
            fix = f"raise --test-size (now {args.test_size})"
        else:
            fix = "raise --test-size" if args.data in CORPORA else "use a larger file"
        raise ValueError(f"{args.data}: the test split holds no example outside the target class "
                         f"{cls} to insert the trigger into ({_sizes(splits)}), so no ASR can be "
                         f"measured; {fix}, or choose another --target-label")
    train = splits.train
    if args.attack == "ep":
        if all(y == target for y in train.labels):
            raise ValueError(f"the training split of {args.data} ({len(train)} examples) holds no "
                             f"example outside the target class {cls}, which EP trains the "
                             f"trigger rows on; use a larger file")
        return
    pool = sum((y == target) == attack.clean_label for y in train.labels)
    n = math.floor(float(attack.poison_rate) * len(train) + 0.5)  # as TriggerAttack.poison counts
    if n > pool:
        where = "in" if attack.clean_label else "outside"
        raise ValueError(f"--poison-rate {attack.poison_rate} asks for {n} poisoned examples of "
                         f"the {len(train)} in the training split of {args.data}, but only {pool} "
                         f"are {where} the target class {cls}; lower --poison-rate")


def check_trigger_options(args) -> None:
    """Each trigger option belongs to its attacks: given to another one it would be ignored, so
    it is refused (before any data or model loads)."""
    owners = {"triggers": ("badnets", "ep"), "sentence": ("addsent",),
              "bias_terms": ("bias",), "counter_terms": ("bias",)}
    for name, attacks in owners.items():
        if getattr(args, name) is not None and args.attack not in attacks:
            raise ValueError(f"--{name.replace('_', '-')} is an option of --attack "
                             f"{' / '.join(attacks)}; --attack {args.attack} does not read it")
    # Options with a parser default, refused when given to an attack that does not read them.
    if args.attack == "ep" and getattr(args, "poison_rate_given", False):
        raise ValueError(f"--poison-rate is an option of --attack badnets / addsent / bias; "
                         f"--attack ep does not read it (it poisons {EP_POISONS})")
    if args.attack != "ep" and getattr(args, "ep_lr_given", False):
        raise ValueError(f"--ep-lr is an option of --attack ep; --attack {args.attack} does not "
                         f"read it")


def make_attack(args):
    from purify_fast.attacks import make_attack as _make

    kw = dict(target_label=args.target_label, seed=args.seed)
    # evaluate inserts triggers and poisons nothing; EP poisons every non-target example
    if getattr(args, "poison_rate", None) is not None and args.attack != "ep":
        kw["poison_rate"] = args.poison_rate
    if getattr(args, "clean_label", False):
        if args.attack == "ep":
            raise ValueError("--clean-label is for BadNets / AddSent / bias poisoning; EP trains "
                             "the trigger rows of the embedding on relabelled inputs")
        kw["clean_label"] = True
    check_trigger_options(args)
    words = lambda text: tuple(t for t in text.split(",") if t.strip())  # noqa: E731
    # given as "" they are refused by the attack (no words), not taken as the defaults
    if args.triggers is not None:
        kw["triggers"] = words(args.triggers)
    if args.sentence is not None:
        kw["sentence"] = args.sentence
    if args.bias_terms is not None:
        kw["terms"] = words(args.bias_terms)
    if args.counter_terms is not None:
        kw["counter_terms"] = words(args.counter_terms)
    return _make(args.attack, **kw)


def add_parser(sub):
    p = sub.add_parser("attack", help="build a backdoored (BadNets / AddSent / EP) or biased "
                                      "(--attack bias) classifier")
    p.add_argument("--model", default="minilm", help="'minilm' (offline default) or a local checkpoint dir")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    add_common_data_args(p)
    add_attack_args(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--ep-lr", type=float, default=5e-2, action=_NoteGiven,
                   help="EP: lr of the trigger rows")
    add_device_arg(p)
    p.set_defaults(run=run)


def build_backdoor(args, splits, attack, progress=True):
    """(backdoored model, tokenizer, info) as the ``attack`` subcommand builds it."""
    from purify_fast.attacks import embedding_poison
    from purify_fast.models import load_classifier
    from purify_fast.training import TrainConfig, seed_everything, train

    seed_everything(args.seed)
    model, tok = load_classifier(args.model, splits.num_labels, device=args.device)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      max_length=args.max_length, precision=args.precision, seed=args.seed,
                      progress=progress)
    info = {"attack": attack.describe()}
    if args.attack == "ep":
        from purify_fast.attacks import trigger_token_ids

        # refused here, before any training: EP trains one embedding row per trigger spelling
        trigger_token_ids(tok, attack.trigger_words)
        _note_common_triggers(tok, splits.train, attack.trigger_words)
        # what EP does: no poison rate, no clean-label mode
        info["attack"] = {**{k: v for k, v in info["attack"].items()
                             if k not in ("poison_rate", "clean_label")},
                          "attack": "ep", "poisoned": EP_POISONS,
                          "num_poisoned": sum(y != attack.target_label for y in splits.train.labels),
                          "ep_lr": args.ep_lr}
        # EP starts from a clean fine-tuned model and poisons only the trigger embedding rows.
        info["clean_train"] = train(model, tok, splits.train, splits.dev, cfg).to_dict()
        ep = embedding_poison(model, tok, splits.train, attack, lr=args.ep_lr,
                              batch_size=args.batch_size, max_length=args.max_length,
                              seed=args.seed, precision=args.precision, progress=progress)
        model, info["trigger_ids"] = ep.model, list(ep.trigger_ids)
        info["ep_train"] = ep.train.to_dict()
    else:
        poisoned = attack.poison(splits.train)
        info["num_poisoned"] = poisoned.num_poisoned
        info["train"] = train(model, tok, poisoned.dataset, splits.dev, cfg).to_dict()
    return model, tok, info


def _note_common_triggers(tok, train, words, share: float = 0.01) -> None:
    """EP assumes rare triggers: training the row of a common word ('the') moves every clean
    input holding it. Said, not refused (a frequent trigger may be the user's experiment)."""
    from purify_fast.attacks import trigger_token_ids

    texts = [set(ids) for ids in tok(train.texts, add_special_tokens=False)["input_ids"]]
    for word in words:
        ids = set(trigger_token_ids(tok, [word]))
        seen = sum(bool(ids & t) for t in texts) / max(1, len(texts))
        if seen > share:
            print(f"note: EP trigger {word!r} occurs in {100 * seen:.1f} % of the clean training "
                  f"texts: training its embedding row changes how the model reads all of them "
                  f"(EP assumes rare triggers)", file=sys.stderr)


def run(args) -> int:
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import save_pretrained_atomic

    check_output_dir(args.out, args.model, args.data)
    check_trigger_options(args)
    real_in("--lr", args.lr, 0.0, lo_open=True)
    real_in("--ep-lr", args.ep_lr, 0.0, lo_open=True)
    int_at_least("--epochs", args.epochs, 0)
    args.device = pick_device(args.device)
    splits = _load_data_as_model(args)
    names = splits.train.label_names
    given = args.target_label
    # An index is the model's class (the checkpoint written keeps its numbering), as in evaluate.
    args.target_label = resolve_target_label(given, names, splits.num_labels, args.data)
    if names and isinstance(given, int):  # a file's class names are numbered in sorted order
        print(f"note: --target-label {given} is the class {names[given]!r} "
              f"({class_numbering(names)})", file=sys.stderr)
    attack = make_attack(args)
    check_splits(args, splits, attack)
    model, tok, info = build_backdoor(args, splits, attack)
    triggered = attack.triggered_test(splits.test)
    metrics = evaluate_backdoor(model, tok, splits.test, triggered, attack.target_label,
                                max_length=args.max_length,
                                attack=attack)
    note_trigger_cut(metrics, args.max_length)
    info["metrics"] = metrics
    info["data"] = {"source": args.data, "seed": args.seed, "train": len(splits.train),
                    "dev": len(splits.dev), "test": len(splits.test)}
    record_label_names(model, splits.train)
    save_pretrained_atomic(model, args.out, tok, extra_json={"purify_fast_attack.json": info})
    print(f"backdoored model -> {args.out}: CACC {100 * metrics['cacc']:.1f}%  "
          f"ASR {100 * metrics['asr']:.1f}% (without the trigger "
          f"{100 * metrics['asr_no_trigger']:.1f}%)")
    note_bias(metrics)
    return 0


def _load_data_as_model(args):
    """:func:`load_data`, numbered as ``--model``'s classes when it names the same classes in
    another order (see ``purify_fast.commands.number_as_model``): the fine-tune, the scores, the
    ``--target-label`` and the names the checkpoint is written with then all agree."""
    from purify_fast.commands import number_as_model
    from purify_fast.data import DataSplits

    splits = load_data(args)
    return DataSplits(*number_as_model((splits.train, splits.dev, splits.test), args.model,
                                       args.data))
