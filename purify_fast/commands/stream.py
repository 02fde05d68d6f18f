"""``purify-fast purify-checkpoint``: streaming weight-space purification of a whole safetensors
checkpoint (single file or sharded with the Hugging Face index), for models too big to hold twice.

Example::

    purify-fast purify-checkpoint --method fine-purifying --pretrained llama-base \\
        --suspect llama-suspect --hessian fisher-dir --out llama-purified --device cuda

Under ``torchrun --nproc-per-node N -m purify_fast.cli purify-checkpoint ...`` the tensors are split
over the N processes (see :mod:`purify_fast.distributed`); the output bytes are the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from purify_fast.commands import refuse_unread_options, seed_int


# `purify-fast purify`'s spellings of the same choices, accepted here so one vocabulary works
# for both commands (the checkpoint manifest records the canonical name).
SAME_AS_PURIFY = {"fine-mixing": "mix", "per_tensor": "tensor"}


def add_parser(sub):
    p = sub.add_parser(
        "purify-checkpoint",
        help="purify a (sharded) safetensors checkpoint tensor by tensor: mix, e-pur or "
             "fine-purifying, atomic and resumable",
        description="Stream a pre-trained and a suspect safetensors checkpoint tensor by tensor, "
                    "purify, and write a new checkpoint atomically (the output directory appears "
                    "only when complete; --resume finishes a killed run with identical bytes).")
    p.add_argument("--method", required=True, choices=["mix", "e-pur", "fine-purifying", "fine-mixing"],
                   help="fine-mixing is another name for mix (the name `purify-fast purify` uses)")
    p.add_argument("--pretrained", required=True, type=Path,
                   help="clean pre-trained checkpoint (dir with index or model.safetensors, "
                        "or a file; 'minilm' for the offline MiniLM). A base model saved "
                        "without the suspect's prefix (bert.) is paired under it, and the "
                        "suspect's task head is kept as it is")
    p.add_argument("--suspect", required=True, type=Path, help="suspect fine-tuned checkpoint")
    p.add_argument("--out", required=True, type=Path, help="new output directory")
    p.add_argument("--hessian", type=Path, default=None,
                   help="fp32 diagonal Hessian/Fisher checkpoint with the suspect's keys "
                        "(fine-purifying)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted run found in <out>.partial")
    p.add_argument("--rho", type=float, default=None,
                   help="mix: share of fine-tuned coordinates kept (default 0.5); fine-purifying: "
                        "share reset to pre-trained (default 0.1 here; `purify-fast purify` "
                        "defaults to 0.3, the value measured on MiniLM)")
    p.add_argument("--seed", type=seed_int, default=None, help="mix: mask seed (default 0)")
    p.add_argument("--select", choices=["random", "magnitude"], default=None,
                   help="mix: which coordinates keep their fine-tuned value (default random)")
    p.add_argument("--indicator", default=None,
                   choices=["drift_over_hessian", "drift", "inv_hessian", "product"],
                   help="fine-purifying: the score ranking coordinates (default "
                        "drift_over_hessian; drift needs no --hessian)")
    p.add_argument("--eps", type=float, default=None,
                   help="fine-purifying: added to the Hessian in the score (default 1e-8)")
    p.add_argument("--scope", choices=["global", "tensor", "per_tensor"], default=None,
                   help="fine-purifying threshold over the whole model or per tensor "
                        "(per_tensor = tensor, as `purify-fast purify` spells it)")
    p.add_argument("--e-pur", action="store_true",
                   help="run E-PUR on the embedding first (implied by --method e-pur)")
    p.add_argument("--token-freqs", type=Path, default=None,
                   help="E-PUR: clean-corpus count per vocabulary row: .json list (or the "
                        "object `purify-fast fisher --token-counts` writes, whose special ids "
                        "are then used), .txt (one per line), .pt/.npy tensor, or .safetensors "
                        "with one tensor")
    p.add_argument("--embedding-key", default=None, help="embedding tensor name (auto-detected)")
    p.add_argument("--top-n", type=int, default=None, help="E-PUR rows to reset (default 200)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="E-PUR: reset every row scoring at least this instead of --top-n")
    p.add_argument("--c", type=float, default=None, help="E-PUR frequency floor (default 20)")
    p.add_argument("--special-ids", default=None,
                   help="comma-separated token ids E-PUR never resets (e.g. 101,102; default: "
                        "those in a --token-freqs file from `purify-fast fisher`, else none)")
    p.add_argument("--allow-new-keys", action="store_true",
                   help="keep suspect-only tensors (a new head) unpurified instead of failing; "
                        "refused when they hold more than 5 %% of the suspect's weights")
    p.add_argument("--backend", default=None, help="auto|torch|triton|cpp|cuda")
    p.add_argument("--no-check-finite", action="store_true",
                   help="skip the NaN/Inf check of every tensor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def load_token_freqs(path: Path):
    """Token counts from a file, as a 1-D tensor, and the special token ids the file names (the
    JSON object ``purify-fast fisher --token-counts`` writes carries them), else None."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"--token-freqs {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--token-freqs {path}: not valid JSON ({exc})") from None
        special = None
        if isinstance(data, dict):
            ids = data.get("special_ids")
            special = [int(i) for i in ids] if isinstance(ids, list) else None
            data = data.get("freqs", data.get("counts"))
        if not isinstance(data, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
            raise ValueError(f"--token-freqs {path}: expected a JSON list of counts (or an object "
                             f"with a 'freqs' list)")
        return torch.tensor(data, dtype=torch.float64), special
    if suffix == ".txt":
        counts = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            for word in line.split():
                try:
                    counts.append(float(word))
                except ValueError:
                    raise ValueError(f"--token-freqs {path}, line {line_no}: {word!r} is not a "
                                     f"count (expected numbers, one per vocabulary row)") from None
        return torch.tensor(counts, dtype=torch.float64), None
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path)), None
    if suffix in (".pt", ".pth"):
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"--token-freqs {path}: expected a saved tensor, got "
                             f"{type(t).__name__}")
        return t, None
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"--token-freqs {path}: expected one tensor, found {len(tensors)}")
        return next(iter(tensors.values())), None
    raise ValueError(f"--token-freqs {path}: unknown format {suffix!r} (use .json, .txt, .npy, "
                     f".pt or .safetensors)")


# Options read by one method only. Their parser default is None, so that one given on the command
# line (even at its default value) is known, and refused where nothing would read it (it would
# still be recorded in the manifest, and a --resume differing only in it refused); the defaults are
# filled in afterwards.
OPTION_DEFAULTS = {"seed": 0, "select": "random", "indicator": "drift_over_hessian", "eps": 1e-8,
                   "scope": "global", "top_n": 200, "c": 20.0, "special_ids": ""}


def check_method_options(args) -> None:
    """Refuse an option the chosen method would ignore without a word, then fill in the
    defaults of those not given."""
    given = lambda name: getattr(args, name) is not None  # noqa: E731
    method = SAME_AS_PURIFY.get(args.method, args.method)
    epur = method == "e-pur" or args.e_pur
    if given("top_n") and given("score_threshold"):
        raise ValueError("--top-n and --score-threshold: E-PUR resets the rows over the "
                         "threshold, not a count; give one of them")
    if args.token_freqs is not None and not epur:
        raise ValueError("--token-freqs is for E-PUR: add --e-pur (or use --method e-pur)")
    ep_owner = "E-PUR (--e-pur or --method e-pur)"
    readers = {  # option -> (who reads it, whether this run does)
        "rho": ("mix and fine-purifying", method != "e-pur"),
        "seed": ("mix", method == "mix"), "select": ("mix", method == "mix"),
        "indicator": ("fine-purifying", method == "fine-purifying"),
        "eps": ("fine-purifying", method == "fine-purifying"),
        "scope": ("fine-purifying", method == "fine-purifying"),
        "top_n": (ep_owner, epur), "score_threshold": (ep_owner, epur), "c": (ep_owner, epur),
        "special_ids": (ep_owner, epur), "embedding_key": (ep_owner, epur),
    }
    refuse_unread_options(args, readers, OPTION_DEFAULTS)


def run(args) -> int:
    import torch

    from purify_fast import backend, distributed
    from purify_fast.commands import Terminated, check_output_dir, pick_device
    from purify_fast.models.loading import DEFAULT_MODEL, resolve_model_path
    from purify_fast.streaming import PurifyConfig, purify_checkpoint

    # Everything that can be checked is checked before the output's .partial directory exists:
    # a refused run leaves nothing that a rerun would take for an interrupted one.
    check_method_options(args)
    try:
        special = tuple(int(x) for x in args.special_ids.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--special-ids must be comma-separated integers, got "
                         f"{args.special_ids!r}") from None
    pick_device(args.device)
    if str(args.pretrained) == DEFAULT_MODEL:
        args.pretrained = Path(resolve_model_path(DEFAULT_MODEL))
    check_output_dir(args.out, args.pretrained, args.suspect, args.hessian, args.token_freqs,
                     replace=False)
    cfg = PurifyConfig(method=SAME_AS_PURIFY.get(args.method, args.method), rho=args.rho,
                       seed=args.seed, select=args.select, indicator=args.indicator,
                       eps=args.eps, scope=SAME_AS_PURIFY.get(args.scope, args.scope),
                       e_pur=args.e_pur, embedding_key=args.embedding_key, top_n=args.top_n,
                       score_threshold=args.score_threshold, c=args.c, special_ids=special,
                       allow_new_keys=args.allow_new_keys, backend=args.backend,
                       check_finite=not args.no_check_finite)
    freqs = None
    if args.token_freqs is not None:
        freqs, carried = load_token_freqs(args.token_freqs)
        if freqs.dim() != 1 or not bool(torch.isfinite(freqs).all()) or bool((freqs < 0).any()):
            raise ValueError(f"--token-freqs {args.token_freqs}: expected one finite, "
                             f"non-negative count per vocabulary row")
        if not special and carried:
            cfg.special_ids = tuple(sorted(set(carried)))
    comm = distributed.comm_from_env(args.device)
    device = distributed.local_device(args.device) if comm is not None else args.device
    try:
        result = purify_checkpoint(args.pretrained, args.suspect, args.out, cfg,
                                   hessian=args.hessian, token_freqs=freqs, device=device,
                                   resume=args.resume, progress=not args.no_progress, comm=comm)
    except ValueError as exc:
        if "check_finite=False" in str(exc):  # the ops' API spelling of this command's option
            raise ValueError(str(exc).replace("check_finite=False", "--no-check-finite")) from None
        raise
    except (KeyboardInterrupt, Terminated):
        if Path(f"{args.out}.partial").is_dir():
            print(f"stopped; the work so far is kept in {args.out}.partial: run the same command "
                  f"with --resume to finish it", file=sys.stderr)
        raise
    finally:
        if comm is not None:
            comm.close()
    if comm is None or comm.rank == 0:
        if result.base_prefix is not None:
            print(f"note: {args.pretrained} is a base model: its tensors were paired with the "
                  f"suspect's under {result.base_prefix!r}", file=sys.stderr)
        if result.kept:
            print(f"note: the suspect's {len(result.kept)} tensor(s) without a pre-trained "
                  f"counterpart (e.g. its task head, {result.kept[0]!r}) are written as they are, "
                  f"unpurified", file=sys.stderr)
        for head, emb in result.tied.items():
            print(f"note: the suspect's {head!r} has no counterpart in {args.pretrained}, which "
                  f"ties it to its embedding: it was paired with {emb!r}", file=sys.stderr)
        for head, emb in result.tied_copies.items():
            print(f"note: the suspect stores its tied {head!r} as a copy of {emb!r}: both names "
                  f"got the one purified tensor", file=sys.stderr)
        if result.cast:
            print(f"note: {len(result.cast)} pre-trained tensor(s) of another dtype (e.g. "
                  f"{result.cast[0]!r}) were cast to the suspect's before purifying",
                  file=sys.stderr)
        if result.side_files_left_out:
            print(f"note: not copied from {args.suspect} into {result.out}: "
                  + "; ".join(result.side_files_left_out), file=sys.stderr)
        summary = {"out": str(result.out), "method": result.method,
                   "seconds": round(result.seconds, 3), "bytes_read": result.bytes_read,
                   "bytes_written": result.bytes_written, "resumed": result.resumed,
                   "shards_total": result.shards_total, "shards_skipped": result.shards_skipped,
                   "threshold": result.threshold, "reset_rows": len(result.reset_rows),
                   "kept_unpurified": len(result.kept), "pretrained_cast": len(result.cast),
                   "side_files_left_out": result.side_files_left_out,
                   # what the ops ran on (auto falls back to torch quietly, e.g. without the
                   # C++ extension: slower)
                   "backend": backend.resolve(args.backend, torch.device(device), torch.float32),
                   "stage_seconds": {k: round(v, 3) for k, v in result.stage_seconds.items()}}
        print(json.dumps(summary, indent=2))
    return 0
