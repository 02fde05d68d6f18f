"""``purify-fast fisher``: the inputs that ``purify-checkpoint`` takes from a clean set, written to
disk: the diagonal Fisher of the suspect (``--hessian`` of Fine-purifying) and, optionally, the
token counts of the clean texts (``--token-freqs`` of E-PUR).

Example (then ``purify-checkpoint --method fine-purifying --hessian fisher-dir --token-freqs
counts.json --e-pur ...``)::

    purify-fast fisher --model llama-suspect --clean-data clean.jsonl --out fisher-dir \\
        --token-counts counts.json --device cuda --dtype bf16

The Fisher is accumulated straight into memory-mapped fp32 files (:class:`DiskFisher`), one
gradient tensor at a time, so no full-model gradient or fp32 copy of the model is ever held; its
keys are those of the suspect's safetensors checkpoint (a tied weight stored twice gets its
parameter's Fisher under both names, a saved buffer a Fisher of 0); a model that transformers
renames on load (mixture-of-experts weights) is refused before the pass.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from purify_fast.commands import (
    add_clean_data_args,
    add_device_arg,
    check_output_dir,
    check_output_file,
    load_clean_set,
    max_length_arg,
    pick_device,
    positive_int,
    seed_int,
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(sub):
    p = sub.add_parser(
        "fisher",
        help="diagonal Fisher of a suspect on clean data (and clean token counts) for "
             "purify-checkpoint",
        description="Accumulate the diagonal Fisher H = mean over clean batches of grad^2 of a "
                    "suspect into a safetensors directory (the --hessian of purify-checkpoint), "
                    "written as <out>.partial and renamed when complete; optionally also write "
                    "the clean token counts (its --token-freqs). The loss is the suspect's own: "
                    "cross-entropy on the clean labels for a sequence classifier, the next-token "
                    "loss of the clean text for a causal LM (config.json architectures).")
    p.add_argument("--model", required=True,
                   help="suspect checkpoint directory: a *ForSequenceClassification or a "
                        "*ForCausalLM")
    p.add_argument("--out", required=True, type=Path, help="new Fisher directory")
    add_clean_data_args(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per Fisher batch (16)")
    p.add_argument("--max-length", type=max_length_arg, default=64)
    p.add_argument("--token-counts", type=Path, default=None,
                   help="also write the clean texts' count per vocabulary row (and the tokenizer's "
                        "special ids) to this .json, the --token-freqs of purify-checkpoint")
    add_device_arg(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights' dtype for the forward/backward (the Fisher is fp32)")
    p.add_argument("--backend", default=None, help="auto|torch|triton|cpp|cuda")
    p.add_argument("--seed", type=seed_int, default=0, help="which clean examples are taken")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def model_kind(model: str) -> str:
    """``"causal-lm"`` or ``"classifier"`` from the checkpoint's ``config.json`` architectures:
    the loss whose Fisher is taken. Anything else (a bare encoder, a masked LM) has no loss of
    the model's own to take it of, and is refused (loading it as a classifier would add a random
    head and give the Fisher of that head's loss)."""
    from purify_fast.models.loading import resolve_model_path

    path = Path(resolve_model_path(model)) / "config.json"
    try:
        archs = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {model}: cannot read {path} ({exc})") from None
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if not archs or any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    raise ValueError(f"--model {model} is a {', '.join(archs)}: the Fisher needs the suspect's "
                     f"own loss, of a sequence classifier (*ForSequenceClassification) or a "
                     f"causal language model (*ForCausalLM); without one, use purify-checkpoint "
                     f"--indicator drift, which needs no Hessian")


def _load_clean_text(args):
    """The clean texts alone (a language model's Fisher needs no labels)."""
    from purify_fast.data import CORPORA, load_splits, load_text_file

    if args.clean_data in CORPORA:
        return load_splits(args.clean_data, seed=args.seed).dev.take(args.clean_size)
    texts = load_text_file(args.clean_data, text_column=args.text_column, label_column=None)
    return texts.take(args.clean_size, seed=args.seed)


def _check_args(args) -> None:
    if args.out.exists():
        raise FileExistsError(f"--out {args.out} already exists; the Fisher needs a new directory")
    check_output_dir(args.out, args.model, args.clean_data)
    if args.token_counts is not None and args.token_counts.exists():
        raise FileExistsError(f"--token-counts {args.token_counts} already exists; fisher never "
                              f"overwrites: name a new file")
    if args.token_counts is not None and args.token_counts.suffix != ".json":
        raise ValueError(f"--token-counts {args.token_counts}: the counts are written as .json")
    check_output_file("--token-counts", args.token_counts, args.model, args.clean_data, args.out)
    pick_device(args.device)
    model_kind(args.model)


def run(args) -> int:
    _check_args(args)  # before loading anything: a typo costs no model load
    import torch
    from tqdm.auto import tqdm

    from purify_fast.data.text_dataset import make_loader, token_frequencies
    from purify_fast.checkpoint import Checkpoint
    from purify_fast.fileio import atomic_write_bytes
    from purify_fast.models import load_classifier
    from purify_fast.models.loading import load_causal_lm, resolve_model_path
    from purify_fast.streaming import DiskFisher, fisher_checkpoint_keys

    device = torch.device(pick_device(args.device))
    dtype = getattr(torch, DTYPES[args.dtype])
    causal = model_kind(args.model) == "causal-lm"
    if causal:
        model, tok = load_causal_lm(args.model, device=device, dtype=dtype)
        clean = _load_clean_text(args)
    else:
        model, tok = load_classifier(args.model, device=device, dtype=dtype)
        clean = load_clean_set(args, model)
    loader = make_loader(clean, tok, args.batch_size, args.max_length)
    model.eval()  # no dropout: the Fisher of the model as it predicts
    # Keyed like the checkpoint purify-checkpoint will read, every floating-point tensor of it
    # (tied copies, saved buffers); refused here, not after the pass, when that cannot be done.
    aliases, zeros = fisher_checkpoint_keys(model, Checkpoint.open(resolve_model_path(args.model)))
    fisher = DiskFisher(model, args.out, backend=args.backend, aliases=aliases, zeros=zeros)
    wrote_counts = False
    try:
        if args.token_counts is not None:
            # Before the pass (seconds, where the Fisher takes minutes): a finished Fisher is
            # never left without the counts asked for beside it. The special tokens travel with
            # the counts: they occur in every example, so E-PUR must never rank their rows.
            # Whole texts, as the in-memory E-PUR counts them (--max-length cuts only the
            # Fisher's batches): a token past the cut-off still occurs in the clean corpus.
            counts = token_frequencies(clean, tok, model.get_input_embeddings().weight.shape[0])
            special = sorted(int(i) for i in getattr(tok, "all_special_ids", []) or [])
            args.token_counts.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(args.token_counts, json.dumps(
                {"counts": [int(c) for c in counts.tolist()], "special_ids": special}).encode())
            wrote_counts = True
            print(f"token counts of the clean texts ({int(counts.sum())} tokens; special ids "
                  f"{special}) -> {args.token_counts}", file=sys.stderr)
        with fisher:
            for batch in tqdm(loader, desc="fisher", unit="batch", disable=args.no_progress):
                if causal:  # the language-modelling loss of the clean text, padding left out
                    batch["labels"] = batch["input_ids"].masked_fill(
                        batch["attention_mask"] == 0, -100)
                model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
                fisher.step()
        out = fisher.finish()
    except BaseException:
        # A Fisher cannot resume (its batches are not recorded): a stopped run's files are
        # worthless, and would only block the next run (the counts too: fisher never
        # overwrites them).
        shutil.rmtree(fisher.out, ignore_errors=True)
        if wrote_counts:
            args.token_counts.unlink(missing_ok=True)
        raise
    print(f"diagonal Fisher of {args.model} over {len(clean)} clean examples "
          f"({fisher.batches} batches) -> {out}", file=sys.stderr)
    return 0
