"""``purify-fast distill --method mimic``: distil a suspect encoder into a fresh student on clean
unlabelled text and write the student as a loadable Hugging Face encoder directory (atomically),
with the MI/loss curves as a PNG and a JSON summary."""

from __future__ import annotations

import json

from purify_fast.commands import (
    add_device_arg,
    check_output_dir,
    max_length_arg,
    pick_device,
    positive_int,
    seed_int,
)


def add_parser(sub):
    p = sub.add_parser("distill", help="purify a suspect encoder by MI-guided distillation (MIMIC)")
    p.add_argument("--method", choices=["mimic"], default="mimic")
    p.add_argument("--teacher", default="minilm",
                   help="suspect encoder: a local HF directory, or 'minilm' (offline default)")
    p.add_argument("--data", default="rotten-tomatoes",
                   help="clean unlabelled text: a corpus name (rotten-tomatoes, tweets) or a "
                        "CSV/TSV/JSONL file / save_to_disk dir (any label column is ignored)")
    p.add_argument("--text-column", default="text", help="text column of a --data file")
    p.add_argument("--num-examples", type=positive_int, default=2000,
                   help="how many clean sentences to use (a seeded sample)")
    p.add_argument("--out", required=True, help="output directory for the student encoder")
    p.add_argument("--student-layers", type=int, default=None,
                   help="student depth (default: the teacher's)")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=max_length_arg, default=64)
    p.add_argument("--mi-source", choices=["teacher", "student"], default="teacher")
    p.add_argument("--mine-steps", type=positive_int, default=300)
    p.add_argument("--backend", default=None, help="attention-kernel backend (auto by default)")
    add_device_arg(p)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from purify_fast.attacks.encoder_backdoor import load_encoder
    from purify_fast.commands.train_clean import hf_progress_bars
    from purify_fast.data import CORPORA, load_dataset
    from purify_fast.defenses.mimic import MIMIC, MIMICConfig, plot_curves
    from purify_fast.defenses.mine import MIN_SAMPLES
    from purify_fast.models.loading import atomic_save_dir, is_writer_rank

    check_output_dir(args.out, args.teacher, args.data)
    if args.num_examples < MIN_SAMPLES:  # MINE's statistics networks need paired samples
        raise ValueError(f"--num-examples must be at least {MIN_SAMPLES} (MINE estimates the "
                         f"layer weights from them), got {args.num_examples}")
    # Errors here (a bad file, option or model) reach the CLI's one handler for user errors,
    # which also honours PURIFY_FAST_TRACEBACK. The options first (the config checks them on
    # construction), the data next, the model last: a typo costs no model load.
    cfg = MIMICConfig(student_layers=args.student_layers, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                      mi_source=args.mi_source, mine_steps=args.mine_steps,
                      backend=args.backend, seed=args.seed, progress=not args.no_progress)
    kw = {} if args.data in CORPORA else {"text_column": args.text_column, "label_column": None}
    data = load_dataset(args.data, **kw).take(args.num_examples, seed=args.seed)
    if len(data) < MIN_SAMPLES:  # a small file: named here, not by MINE after the model loads
        raise ValueError(f"--data {args.data} has {len(data)} examples; MIMIC needs at least "
                         f"{MIN_SAMPLES} (MINE estimates the layer weights from them)")
    teacher, tok = load_encoder(args.teacher, device=pick_device(args.device))
    result = MIMIC(cfg).fit(teacher, tok, data)

    def write(tmp):
        result.student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        summary = result.summary()
        summary.update(teacher=str(args.teacher), data=args.data,
                       config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
        (tmp / "mimic.json").write_text(json.dumps(summary, indent=2, default=str))
        plot_curves(result, tmp / "mimic_curves.png")

    if not is_writer_rank():  # under `accelerate launch` every rank holds the same student
        return 0
    with hf_progress_bars(not args.no_progress):
        out = atomic_save_dir(args.out, write)
    print(f"student written to {out} ({result.seconds:.0f}s; MI {[f'{m:.2f}' for m in result.mi]}; "
          f"weights {[f'{w:.0f}' for w in result.weights]})")
    return 0
