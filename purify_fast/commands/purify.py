"""``purify-fast purify``: run a defense on a suspect checkpoint with a small clean set and write
the purified checkpoint (atomically) plus a JSON report (and, with --rho-sweep, a plot of clean
dev accuracy against rho)."""

from __future__ import annotations

from pathlib import Path

from purify_fast.commands import (
    add_clean_data_args,
    add_device_arg,
    backend_arg,
    check_output_dir,
    load_clean_set,
    max_length_arg,
    pick_device,
    positive_int,
    refuse_unread_options,
    seed_int,
)
from purify_fast.validation import int_at_least, real_in

SWEEP_PLOT = "purify_fast_rho_sweep.png"


def add_parser(sub):
    p = sub.add_parser("purify", help="purify a suspect checkpoint (fine-mixing / e-pur / "
                                      "fine-purifying / fine-tune)")
    p.add_argument("--suspect", required=True, help="suspect checkpoint directory")
    p.add_argument("--pretrained", default="minilm", help="pre-trained checkpoint dir or 'minilm'")
    p.add_argument("--method", default="fine-mixing",
                   choices=["fine-mixing", "e-pur", "fine-purifying", "fine-tune"])
    p.add_argument("--e-pur", action="store_true", help="run E-PUR first (composes with any method)")
    add_clean_data_args(p)
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--rho", type=float, default=None,
                   help="fine-mixing reserve ratio (0.5) / fine-purifying reset share (0.3)")
    p.add_argument("--select", choices=["random", "magnitude"], default=None,
                   help="fine-mixing: keep coordinates at random (Bernoulli rho, the default) or "
                        "the rho share with the largest |drift| in each tensor")
    p.add_argument("--rho-sweep", default=None, help="comma-separated rhos, e.g. 0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--sweep-tolerance", type=float, default=None,
                   help="rho sweep: dev accuracy a rho may lose against the suspect (0.01)")
    p.add_argument("--top-n", type=int, default=None, help="E-PUR: embedding rows reset (200)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="E-PUR: reset every row scoring at least this instead of --top-n")
    p.add_argument("--c", type=float, default=None,
                   help="E-PUR: frequency floor c in drift / log(max(f, c)) (20)")
    p.add_argument("--e-pur-corpus", default=None,
                   help="E-PUR: clean text whose token counts give the frequencies f (a corpus "
                        "name or a CSV/TSV/JSONL file, its --text-column; labels not needed); "
                        "default: the clean set")
    p.add_argument("--indicator", default=None,
                   choices=["drift_over_hessian", "drift", "inv_hessian", "product"],
                   help="fine-purifying score: drift^2 / Fisher (default), |drift|, 1 / Fisher, "
                        "drift^2 * Fisher")
    p.add_argument("--fisher-at", choices=["finetuned", "pretrained"], default=None,
                   help="fine-purifying: diagonal Fisher at the suspect's weights (default) or "
                        "the pre-trained ones")
    p.add_argument("--per-example", action="store_true", default=None,
                   help="fine-purifying: per-example gradients for the Fisher (slower)")
    p.add_argument("--scope", choices=["global", "per_tensor"], default=None,
                   help="fine-purifying: one threshold over the whole model (default), or rho in "
                        "each tensor")
    p.add_argument("--epochs", type=int, default=None, help="clean fine-tune epochs (3)")
    p.add_argument("--lr", type=float, default=None, help="clean fine-tune learning rate (2e-5)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="clean fine-tune batch size (16)")
    p.add_argument("--max-length", type=max_length_arg, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="clean fine-tune precision (fp32)")
    p.add_argument("--backend", type=backend_arg, default=None,
                   help="kernels of the weight-space ops (fine-mixing, fine-purifying, E-PUR): "
                        "auto | torch | triton | cpp | cuda")
    p.add_argument("--seed", type=seed_int, default=0)
    add_device_arg(p)
    p.set_defaults(run=run)


# Options read by one method or stage only. Their parser default is None, so that one given on
# the command line (even at its default value) is known, and refused where nothing would read it;
# the defaults are filled in afterwards.
OPTION_DEFAULTS = {"select": "random", "sweep_tolerance": 0.01, "top_n": 200, "c": 20.0,
                   "indicator": "drift_over_hessian", "fisher_at": "finetuned",
                   "per_example": False, "scope": "global", "epochs": 3, "lr": 2e-5,
                   "batch_size": 16, "precision": "fp32"}


def check_method_options(args) -> None:
    """Refuse an option the chosen method would ignore without a word (a rho sweep asked of
    fine-purifying ran at rho 0.3), then fill in the defaults of those not given."""
    given = lambda name: getattr(args, name) is not None  # noqa: E731
    method, epur = args.method, args.method == "e-pur" or args.e_pur
    if args.rho is not None and args.rho_sweep:
        raise ValueError("--rho and --rho-sweep: the sweep chooses rho among its values; give one "
                         "of them")
    if given("top_n") and given("score_threshold"):
        raise ValueError("--top-n and --score-threshold: E-PUR resets the rows over the "
                         "threshold, not a count; give one of them")
    indicator = args.indicator or OPTION_DEFAULTS["indicator"]
    fm, fp = method == "fine-mixing", method == "fine-purifying"
    fisher = fp and indicator != "drift"
    fine_tunes = method != "e-pur"
    ep_owner = "E-PUR (--e-pur or --method e-pur)"
    fisher_owner = "fine-purifying's Fisher (not computed for --indicator drift)"
    ft_owner = "the clean fine-tune (fine-mixing, fine-purifying, fine-tune)"
    readers = {  # option -> (who reads it, whether this run does)
        "select": ("fine-mixing", fm), "rho_sweep": ("fine-mixing", fm),
        "sweep_tolerance": ("the rho sweep (--rho-sweep)", bool(args.rho_sweep)),
        "indicator": ("fine-purifying", fp), "scope": ("fine-purifying", fp),
        "fisher_at": (fisher_owner, fisher), "per_example": (fisher_owner, fisher),
        "top_n": (ep_owner, epur), "score_threshold": (ep_owner, epur), "c": (ep_owner, epur),
        "e_pur_corpus": (ep_owner, epur),
        "epochs": (ft_owner, fine_tunes), "lr": (ft_owner, fine_tunes),
        "batch_size": (ft_owner, fine_tunes), "precision": (ft_owner, fine_tunes),
        # plain fine-tuning runs no kernel op
        "backend": ("the weight-space ops (fine-mixing, fine-purifying, E-PUR)",
                    method != "fine-tune" or epur),
    }
    refuse_unread_options(args, readers, OPTION_DEFAULTS)


def check_clean_size(args, clean) -> None:
    """The defenses hold out a dev share of the clean set; too few examples for that is said in
    the CLI's terms (the API's message asks for dev_data, which the CLI has no option for)."""
    import inspect

    from purify_fast.defenses import purify
    from purify_fast.defenses._common import clean_dev_split

    share = inspect.signature(purify).parameters["dev_fraction"].default
    try:
        clean_dev_split(clean, None, share, args.seed)
    except ValueError:
        raise ValueError(f"--clean-data {args.clean_data} gives {len(clean)} clean examples "
                         f"(--clean-size {args.clean_size}): too few to hold out {100 * share:g} % "
                         f"of each class as the dev set and fine-tune on the rest; raise "
                         f"--clean-size (or give a larger --clean-data file)") from None


def run(args) -> int:
    from purify_fast.defenses import purify
    from purify_fast.models import load_classifier, save_pretrained_atomic
    from purify_fast.models.loading import is_writer_rank

    # Options first: a typo must not cost a model load (the defenses check them again).
    check_output_dir(args.out, args.suspect, args.pretrained, args.clean_data, args.e_pur_corpus)
    device = pick_device(args.device)
    real_in("--rho", args.rho, 0.0, 1.0, optional=True)
    if args.method == "e-pur" and (args.rho is not None or args.rho_sweep):
        raise ValueError("--rho / --rho-sweep are not used by --method e-pur (it resets "
                         "embedding rows: --top-n / --score-threshold); use fine-mixing or "
                         "fine-purifying with --e-pur to combine them")
    if args.method == "fine-tune" and args.rho is not None:
        raise ValueError("--rho is not used by --method fine-tune (plain clean fine-tuning, "
                         "nothing mixed or reset)")
    check_method_options(args)
    real_in("--lr", args.lr, 0.0, lo_open=True)
    real_in("--sweep-tolerance", args.sweep_tolerance, 0.0)
    real_in("--score-threshold", args.score_threshold, 0.0, optional=True)
    real_in("--c", args.c, 1.0, lo_open=True)
    int_at_least("--top-n", args.top_n, 0)
    int_at_least("--epochs", args.epochs, 0)
    sweep = None
    if args.rho_sweep:
        sweep = tuple(real_in("--rho-sweep value", r.strip(), 0.0, 1.0)
                      for r in args.rho_sweep.split(","))
    corpus = None
    if args.e_pur_corpus:  # read before the model: a bad file must not cost a model load
        from purify_fast.data import CORPORA, load_corpus, load_text_file

        corpus = (load_corpus(args.e_pur_corpus) if args.e_pur_corpus in CORPORA else
                  load_text_file(args.e_pur_corpus, text_column=args.text_column,
                                 label_column=None))
    suspect, tok = load_classifier(args.suspect, device=device)
    clean = load_clean_set(args, suspect)
    check_clean_size(args, clean)
    model, report = purify(
        suspect, args.pretrained, clean, args.method, tokenizer=tok, e_pur=args.e_pur,
        rho=args.rho, select=args.select, rho_sweep=sweep, sweep_tolerance=args.sweep_tolerance,
        top_n=args.top_n, score_threshold=args.score_threshold, c=args.c, corpus=corpus,
        indicator=args.indicator, fisher_at=args.fisher_at, per_example=args.per_example,
        scope=args.scope,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        precision=args.precision, seed=args.seed, backend=args.backend, progress=True)
    report["suspect"] = str(args.suspect)
    fm = report.get("fine_mixing", {})
    sweep_plot = None
    if sweep and fm.get("sweep"):
        from purify_fast.report import plot_rho_sweep

        # written inside the atomic output, beside the report
        sweep_plot = lambda tmp: plot_rho_sweep(  # noqa: E731
            fm["sweep"], tmp / SWEEP_PLOT, suspect_dev_acc=fm.get("suspect_dev_acc"),
            tolerance=args.sweep_tolerance, chosen=fm.get("rho"))
    save_pretrained_atomic(model, args.out, tok, extra_json={"purify_fast_report.json": report},
                           extra=sweep_plot)
    if not is_writer_rank():  # the other ranks of an `accelerate launch` run hold the same model
        return 0
    print(f"purified ({report['method']}) -> {args.out}; dev acc "
          f"{report.get('suspect_dev_acc', float('nan')):.3f} -> {report.get('dev_acc', float('nan')):.3f}; "
          f"{report['seconds']['total']:.1f} s")
    if sweep_plot is not None:
        print(f"rho sweep: kept rho {fm['rho']:g} of {[p['rho'] for p in fm['sweep']]} tried; "
              f"plot {Path(args.out) / SWEEP_PLOT}")
    return 0
