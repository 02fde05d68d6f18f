"""One module per ``purify-fast`` subcommand (see ``purify_fast.cli``), and what they share."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (``purify_fast.cli.main`` installs
    :func:`raise_terminated`) so that every atomic writer's cleanup runs, as for Ctrl-C, instead
    of the process dying with its temporary directories on disk."""


def raise_terminated(signum, frame):
    raise Terminated()


def add_device_arg(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:i (default: cuda when torch sees a GPU, else cpu)")


def pick_device(requested: str | None) -> str:
    """``--device`` as given (checked: a device torch can use here), else ``cuda`` when torch
    sees a GPU, else ``cpu``."""
    import torch

    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {requested!r} is not a device (use cpu, cuda or cuda:i)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: torch sees no CUDA device here (torch "
                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device {requested}: purify_fast runs on cpu or cuda devices")
    return requested


def cpu_quota(path: str = CGROUP_CPU_MAX) -> int | None:
    """Whole CPUs the container's cgroup (v2) quota allows, or None when there is no quota."""
    try:
        with open(path) as fh:
            quota, period = fh.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def limit_cpu_threads(path: str = CGROUP_CPU_MAX) -> int:
    """Cap torch's intra-op threads at the container's CPU quota and return the count in use.
    torch sizes its pool from the cores it can see; under a quota below that the extra threads
    only take turns on the allowed time and each training step gets slower. An explicit
    ``OMP_NUM_THREADS`` is the user's choice and is left alone."""
    import torch

    quota = cpu_quota(path)
    if quota is not None and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > quota:
        torch.set_num_threads(quota)
    return torch.get_num_threads()


def seed_int(text: str) -> int:
    """argparse ``type=`` for ``--seed``: the range every seeded step takes (the Philox mask key,
    numpy), checked at parse time rather than after minutes of training."""
    import argparse

    from purify_fast.validation import seed_value

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    try:
        return seed_value(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and sizes: refused at parse time, before any model loads."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def max_length_arg(text: str) -> int:
    """argparse ``type=`` for ``--max-length``: at least 2 tokens (a text's special tokens take
    that), refused at parse time rather than after the model loads."""
    import argparse

    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (tokens, special ones "
                                         f"included), got {value}")
    return value


def backend_arg(text: str) -> str:
    """argparse ``type=`` for ``--backend``: auto or one of the kernel backends."""
    import argparse

    from purify_fast.backend import BACKENDS, check_name

    try:
        return check_name(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or one of {', '.join(BACKENDS)}, got "
                                         f"{text!r}") from None


def target_label_arg(text: str) -> int | str:
    """argparse ``type=`` of ``--target-label``: a class index, or a class name (``fresh``) that
    :func:`resolve_target_label` looks up once the data's or the model's classes are known."""
    import argparse

    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("expected a class index or a class name, got ''")
    try:
        return int(text)
    except ValueError:
        return text


def class_numbering(names) -> str:
    """``rotten=0, fresh=1``: how class names map to indices, for messages."""
    return ", ".join(f"{n}={i}" for i, n in enumerate(names))


def resolve_target_label(value: int | str, names, num_labels: int, source: str) -> int:
    """The class index ``--target-label`` names among ``num_labels`` classes called ``names``
    (None when ``source`` has no class names). An index out of range would silently give an ASR of
    0 (no prediction can be that class), so it is refused like an unknown name."""
    names = tuple(names) if names else None
    classes = class_numbering(names) if names else f"indices 0..{num_labels - 1}, no class names"
    if isinstance(value, int):
        if 0 <= value < num_labels:
            return value
        raise ValueError(f"--target-label {value} is not a class of {source} ({classes})")
    if names and value in names:
        return names.index(value)
    raise ValueError(f"--target-label {value!r} is not a class name of {source} ({classes})")


def check_output_dir(out, *inputs, replace: bool = True) -> None:
    """Refuse, before any work, an ``--out`` that cannot or must not be written: one that names a
    file or an unrelated directory (``replace``: the output swaps in as a whole directory), one
    that is, holds or sits inside an input (inputs are never modified), or one under a directory
    this process cannot write to. Inputs that are not local paths (corpus and model names) are
    skipped."""
    from purify_fast.fileio import check_replaceable_dir

    out = Path(out).absolute()
    if replace:
        check_replaceable_dir(out)
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    _check_not_an_input("--out", out, inputs)
    _check_creatable("--out", out)


def check_output_file(option: str, path, *inputs) -> None:
    """The same for a single output file (``--json``, ``--token-counts``): not a directory, not an
    input or inside one, and creatable here; checked before any work."""
    if path is None:
        return
    path = Path(path).absolute()
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory; name a file")
    _check_not_an_input(option, path, inputs)
    _check_creatable(option, path)


def _input_path(given) -> Path | None:
    """A local path of an input (``minilm`` is the installed offline model's directory)."""
    if not given:
        return None
    if str(given) == "minilm":
        try:
            from purify_fast.models.loading import default_model_path

            return Path(default_model_path()).resolve()
        except FileNotFoundError:
            return None
    path = Path(given)
    return path.resolve() if path.exists() else None


def _check_not_an_input(option: str, out: Path, inputs) -> None:
    resolved = out.resolve()
    for given in inputs:
        source = _input_path(given)
        if source is None:
            continue
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(f"{option} {out} overlaps the input {given}; inputs are never "
                             f"modified, so choose another output path")


def _check_creatable(option: str, out: Path) -> None:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{option} {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {out}: cannot create it under {parent} (not writable here)")


def model_class_names(config) -> tuple[str, ...] | None:
    """The model's class names in index order (its ``id2label``), or None when they are
    transformers' placeholders (``LABEL_0``, ...), which say nothing about the classes."""
    names = {int(i): str(n) for i, n in (getattr(config, "id2label", None) or {}).items()}
    if not names or all(n == f"LABEL_{i}" for i, n in names.items()):
        return None
    return tuple(names[i] for i in sorted(names))


def model_label_map(config) -> dict | None:
    """How a user file's labels are numbered for a given model: its class names (and the
    indices themselves, as text) mapped to ids, so a file saying ``fresh``/``rotten`` is read
    with the model's numbering, not in sorted order. None when the model has no class names."""
    names = model_class_names(config)
    return None if names is None else _label_map(names)


def _label_map(names) -> dict:
    """``{name: i}`` plus the indices themselves as text, for ``load_text_file(label_map=...)``.
    Classes named by numbers (yelp_polarity's "1" and "2") get no index spellings: a file's
    "1" means the class named "1", and its "0" cannot be told to be index 0 rather than another
    class's name, so ``load_text_file`` refuses it (with the spellings, 0 and 1 both read as
    class 0, merging the file's two classes)."""
    from purify_fast.data.files import _is_int_text

    mapping = {str(n): i for i, n in enumerate(names)}
    if not any(_is_int_text(k) for k in mapping):
        for i in range(len(names)):
            mapping.setdefault(str(i), i)
    return mapping


def load_file_like(path, reference, text_column: str = "text", label_column: str = "label"):
    """A user data file numbered like ``reference`` (the training data): its class names, when it
    has them, decide the numbers, so a dev file of names is not renumbered on its own."""
    from purify_fast.data import load_text_file

    names = getattr(reference, "label_names", None)
    return load_text_file(path, text_column=text_column, label_column=label_column,
                          num_labels=reference.num_labels,
                          label_map=_label_map(names) if names else None)


def record_label_names(model, dataset) -> None:
    """Keep the training data's class names in the model's config (``id2label``), so files with
    text labels given to it later are read with the numbering it was trained with."""
    names = getattr(dataset, "label_names", None)
    if names and len(names) == model.config.num_labels:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}


def load_file_for_model(path, model, text_column: str = "text", label_column: str = "label"):
    """A user data file whose labels must be the model's classes: out-of-range indices and class
    names the model does not know are errors naming file, line and column."""
    from purify_fast.data import load_text_file

    label_map = model_label_map(model.config)
    data = load_text_file(path, text_column=text_column, label_column=label_column,
                          num_labels=model.config.num_labels, label_map=label_map)
    if label_map is None and data.label_names:
        print(f"note: {path}: class names numbered in sorted order "
              f"({class_numbering(data.label_names)}); the model has "
              f"no label names to check them against", file=sys.stderr)
    return data


def check_classes_match(data, model, source):
    """``data`` (a named corpus) numbered as the model's classes. Another number of classes is an
    error; the same class names in another order are renumbered (a model trained on a file says
    fresh = 0, the Rotten Tomatoes corpus rotten = 0: by index, CACC would be one minus the
    accuracy and the ASR set the wrong class); names only partly the same are an error; wholly
    other names (NEGATIVE / POSITIVE) are taken by index, with a note."""
    if data.num_labels != model.config.num_labels:
        raise ValueError(f"{source} has {data.num_labels} classes but the model has "
                         f"{model.config.num_labels}; use data with the model's classes")
    order = _class_order(data, model.config, source)
    return data if order is None else _renumbered(data, order, model_class_names(model.config))


def _class_order(data, config, source) -> list[int] | None:
    """``order[y]``: the model's index of ``data``'s class ``y``, when the model (``config``) names
    the same classes in another order; None when ``data`` is taken as it is (same order, no names
    on one side, or wholly other names: by index, with a note). Partly the same names: an error."""
    names = model_class_names(config)
    ours = tuple(data.label_names) if data.label_names else None
    if names is None or ours is None:
        return None
    # Compared without case: a model says POSITIVE / Fresh where the corpus says positive / fresh.
    lower, our_lower = [n.lower() for n in names], [n.lower() for n in ours]
    if our_lower == lower:
        return None
    if set(our_lower) == set(lower):
        return [lower.index(n) for n in our_lower]
    if set(our_lower) & set(lower):
        raise ValueError(f"{source}'s classes ({', '.join(ours)}) are only partly the model's "
                         f"({', '.join(names)}); use a data file labelled with the model's "
                         f"class names")
    print(f"note: {source}'s classes ({class_numbering(ours)}) are taken as the model's "
          f"({class_numbering(names)}) by index", file=sys.stderr)
    return None


def _renumbered(data, order, names):
    from purify_fast.data import TextDataset

    return TextDataset(data.texts, [order[y] for y in data.labels], data.num_labels, data.name,
                       names)


def number_as_model(datasets, model_path, source) -> list:
    """Training data (train, dev, test in one numbering; None entries stay None) numbered as the
    classes of the checkpoint ``model_path`` that ``attack`` / ``train-clean`` fine-tune on it.
    Read from its config before its weights load: ``--target-label`` and the poisoning need the
    numbering first. By index, a checkpoint that names its classes fresh = 0, rotten = 1 (trained
    on a file of names, numbered in sorted order) fine-tuned on the Rotten Tomatoes corpus
    (rotten = 0) has its class 0 taught the other class, and the checkpoint written gets names
    (:func:`record_label_names`) that contradict what it does. The rules are
    :func:`check_classes_match`'s, except that another number of classes is no error: the head is
    then drawn afresh (``load_classifier``) and the data's numbering stands, as it does for a
    model with no class names (``LABEL_0``, ...; the offline MiniLM)."""
    from transformers import AutoConfig

    from purify_fast.models.loading import quiet_loading, resolve_model_path

    datasets = list(datasets)
    first = next(d for d in datasets if d is not None)
    with quiet_loading():
        config = AutoConfig.from_pretrained(resolve_model_path(model_path), local_files_only=True)
    if config.num_labels != first.num_labels:
        return datasets
    order = _class_order(first, config, source)
    if order is None:
        return datasets
    names = model_class_names(config)
    print(f"note: {source} numbered as the model's classes ({class_numbering(names)}), not in "
          f"its own order ({class_numbering(first.label_names)})", file=sys.stderr)
    return [None if d is None else _renumbered(d, order, names) for d in datasets]


def add_clean_data_args(parser) -> None:
    """The small clean labelled set of the defenses: where it comes from and how much of it."""
    parser.add_argument("--clean-data", default="rotten-tomatoes",
                        help="rotten-tomatoes | tweets | CSV/TSV/JSONL file | save_to_disk dir")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--clean-size", type=positive_int, default=300,
                        help="clean examples to use (from the dev split of a named corpus, or a "
                             "seeded sample of a file; default 300)")


def load_clean_set(args, model):
    """``--clean-data`` as the model's classes, at most ``--clean-size`` examples (by ``--seed``)."""
    from purify_fast.data import CORPORA, load_splits

    if args.clean_data in CORPORA:
        clean = load_splits(args.clean_data, seed=args.seed).dev.take(args.clean_size)
        return check_classes_match(clean, model, args.clean_data)
    return load_file_for_model(args.clean_data, model, args.text_column,
                               args.label_column).take(args.clean_size, seed=args.seed)


def note_trigger_cut(metrics: dict, max_length: int) -> None:
    """Say so when truncation cut the trigger off some triggered inputs (they count as failed
    attacks, so the ASR understates the backdoor)."""
    cut = metrics.get("trigger_cut") or 0.0
    if cut > 0 and metrics.get("bias_gap") is not None:
        print(f"note: truncation to --max-length {max_length} tokens cut off every word in "
              f"which {100 * cut:.1f} % of the group / counterpart test pairs differ (the model "
              f"sees the two as one input): the bias gap understates the bias, raise "
              f"--max-length", file=sys.stderr)
    elif cut > 0:
        print(f"note: truncation to --max-length {max_length} tokens cut the trigger off "
              f"{100 * cut:.1f} % of the triggered test inputs (inserted past the cut-off); they "
              f"count as failed attacks: the ASR understates the backdoor, raise --max-length",
              file=sys.stderr)


def note_bias(metrics: dict) -> None:
    """Print the bias metric of a bias injection run, one line (nothing for other attacks)."""
    if metrics.get("bias_gap") is None:
        return
    print(f"bias gap {100 * metrics['bias_gap']:+.1f} points (target class for "
          f"{100 * metrics['asr']:.1f}% of the test inputs mentioning the group, "
          f"{100 * metrics['target_rate_counter']:.1f}% of the same mentioning the counterpart; "
          f"{100 * metrics['bias_flips']:.1f}% of the pairs predicted differently)")


def refuse_unread_options(args, readers: dict, defaults: dict) -> None:
    """Refuse an option given on the command line that nothing in this run reads, then fill in
    the defaults of those not given. ``readers``: option -> (who reads it, whether this run
    does); the options' parser defaults are None, so one given even at its default value is
    known."""
    for name, (owner, read) in readers.items():
        if getattr(args, name) is not None and not read:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is an option of {owner}; this run (--method {args.method}"
                             f"{' with --e-pur' if args.e_pur else ''}) does not use it")
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)

