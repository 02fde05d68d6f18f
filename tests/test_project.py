"""Project-level checks: the README's commands and CI agree, and the CLI starts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    test_cmds = [c for c in _readme_commands() if "pytest" in c]
    assert test_cmds, "README.md shows no test command"
    assert test_cmds[0] in ci_lines, f"{test_cmds[0]!r} is not a line of .ci/run"


def test_readme_demo_command_names_a_real_subcommand():
    from purify_fast.cli import COMMANDS

    demo = [c for c in _readme_commands() if "purify-fast demo" in c]
    assert demo, "README.md shows no demo command"
    assert "demo" in COMMANDS


def test_env_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "purify_fast.cli", "env"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("torch", "triton", "cpp", "cuda"):
        assert re.search(rf"^\s+{name}\s+(yes|no)", out, flags=re.M), out


def test_gpu_suite_plans_every_op_family():
    # On a CPU machine the suite can only plan; the plan must hold the weight-space ops, the
    # MuScleLoRA forward and MIMIC's attention-map loss, so a GPU session times all of them in
    # its one call.
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    ops = re.search(r"ops=(\S+)", out).group(1).split(",")
    for name in ("mix_weights", "fisher_accumulate_", "score+reset", "embedding_drift_scores",
                 "multiscale_lora_fwd", "attention_map_loss_fwd_bwd"):
        assert name in ops, out


def test_gpu_suite_self_check_and_outputs_run_here(tmp_path, monkeypatch):
    """What the GPU session would meet first, checked on the CPU: the self-check (it crashed
    comparing fp32 with fp64 scores whenever a kernel backend existed) runs on the cpp backend
    and passes, multi-scale LoRA included; results default to $OUT (where the device tool
    fetches them); pytest's arguments are shell-quoted, with the GPU cases by default."""
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)  # its dataclasses look themselves up
    spec.loader.exec_module(suite)
    if "cpp" in __import__("purify_fast.backend", fromlist=["x"]).available("cpu"):
        assert suite.self_check(["cpp"], lambda msg: None, device="cpu") == {"cpp": "ok"}
    monkeypatch.setenv("OUT", str(tmp_path))
    args = suite.parse_args([])
    assert args.out == str(tmp_path / "RESULTS_gpu.md")
    assert shlex.split(args.pytest_args) == ["-k", "cuda or triton or gpu"]


def test_muscle_lora_summary_keeps_scalings_and_attacks_apart(tmp_path):
    # benchmarks/run_muscle_lora.py --summarize writes the tables of results_muscle_lora.md: runs
    # of the two MSLR scalings and of the two attacks must never be averaged together.
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("run_muscle_lora",
                                                  ROOT / "benchmarks" / "run_muscle_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = [("badnets", "muscle", "fft", 0, 0.70, 0.50), ("badnets", "muscle", "fft", 1, 0.60, 0.30),
            ("badnets", "muscle", "radial", 0, 0.65, 0.90), ("addsent", "muscle", "fft", 0, 0.75, 0.20),
            ("badnets", "vanilla", "radial", 0, 0.80, 1.00)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(dict(attack=a, mode=m, scaling=sc, seed=s, cacc=c, asr=x,
                                            fpr=0.1, wall=10.0)) + "\n"
                            for a, m, sc, s, c, x in runs))
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line
            for line in mod.summarize(str(path)).splitlines()[2:]}
    assert set(rows) == {("badnets", "muscle (fft)", "0,1"), ("badnets", "muscle (radial)", "0"),
                         ("addsent", "muscle (fft)", "0"), ("badnets", "vanilla", "0")}
    assert "| 65.0 ± 7.1 | 40.0 ± 14.1 |" in rows[("badnets", "muscle (fft)", "0,1")]

    # A file comparing learning rates of one mode keeps them apart; one lr adds nothing.
    lr_runs = [("muscle", 0, 0.002, 0.5), ("muscle", 0, 0.0005, 0.3), ("muscle", 1, 0.0005, 0.4),
               ("vanilla", 0, 0.0002, 1.0)]
    path.write_text("".join(json.dumps(dict(attack="badnets", mode=m, scaling="fft", seed=s,
                                            lr=lr, cacc=0.7, asr=x, fpr=0.1, wall=10.0)) + "\n"
                            for m, s, lr, x in lr_runs))
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line
            for line in mod.summarize(str(path)).splitlines()[2:]}
    assert set(rows) == {("badnets", "muscle (fft), lr 0.002", "0"),
                         ("badnets", "muscle (fft), lr 0.0005", "0,1"),
                         ("badnets", "vanilla", "0")}
    assert "| 35.0 ± 7.1 |" in rows[("badnets", "muscle (fft), lr 0.0005", "0,1")]


def test_defense_tuning_table_and_its_held_out_seeds(tmp_path, capsys):
    # benchmarks/tune_defenses.py: settings are compared on seeds other than the reported 0-2,
    # and the table leaves out a setting not yet run on every seed.
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("tune_defenses",
                                                  ROOT / "benchmarks" / "tune_defenses.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [(3, "suspect", 0.80, 1.0), (4, "suspect", 0.70, 1.0), (3, "FP base", 0.75, 0.2),
            (4, "FP base", 0.69, 0.4), (3, "FM base", 0.7, 0.3)]
    path = tmp_path / "tune.jsonl"
    path.write_text("".join(json.dumps({"seed": s, "name": n, "cacc": c, "asr": a,
                                        "asr_no_trigger": 0.25}) + "\n" for s, n, c, a in rows))
    table = mod.table(path)
    assert "| FP base | 75.0 / 20.0 / 25.0 | 69.0 / 40.0 / 25.0 | 30.0 | 3.0 |" in table
    assert "FM base" not in table
    with pytest.raises(SystemExit):
        mod.main(["--seed", "1"])
    assert "tune on others" in capsys.readouterr().err


def test_benchmark_tables_take_their_columns_and_append_dated_sections(tmp_path):
    # benchmarks/run_defenses.py's aggregate / table / append_section, which run_bias.py shares
    # with its own columns (the bias gap's)
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("run_bias",
                                                      ROOT / "benchmarks" / "run_bias.py")
        bias = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bias)
        import run_defenses
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = lambda gap: {"name": "FP", "cacc": 0.7, "asr": 0.2 + gap,  # noqa: E731
                       "target_rate_counter": 0.2, "bias_gap": gap, "bias_flips": gap,
                       "seconds": 10.0}
    runs = [{"rows": [row(0.1)]}, {"rows": [row(0.3)]}, {"rows": [dict(row(0.2), cacc=None)]}]
    agg = run_defenses.aggregate(runs, keys=[k for k, _, _ in bias.COLUMNS])
    text = run_defenses.table(agg, 3, bias.COLUMNS)
    assert "| model / defense | CACC % | bias gap (points) |" in text
    assert "| FP | 70.0 ± 0.0 (n=2) | 20.0 ± 10.0 | 40.0 ± 10.0 | 20.0 ± 0.0 |" in text
    md = tmp_path / "r.md"
    run_defenses.append_section(md, "seeds [0, 1, 2], full sizes", text)
    run_defenses.append_section(md, "seeds [3], full sizes", text)
    written = md.read_text()
    assert written.count("Command: `python") == 2 and "seeds [3], full sizes, " in written


def test_methods_doc_is_in_the_repo_and_current():
    # The docstrings cite "METHODS.md §N"; a clone must carry the file (docs/METHODS.md). Where the
    # project's shared notes sit beside the checkout (CI, development), the copy must match them.
    ours = ROOT / "docs" / "METHODS.md"
    assert ours.is_file(), "docs/METHODS.md is missing"
    assert "MuScleLoRA" in ours.read_text() and "MIMIC" in ours.read_text()
    shared = ROOT.parent / "shared" / "METHODS.md"
    if shared.is_file():
        assert ours.read_text() == shared.read_text(), "docs/METHODS.md differs from ../shared/METHODS.md"


def test_cpu_threads_follow_the_container_quota(tmp_path, monkeypatch):
    import torch

    from purify_fast.commands import cpu_quota, limit_cpu_threads, pick_device

    cpu_max = tmp_path / "cpu.max"
    for text, want in [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000", 1),
                       ("400000 100000", 4), ("garbage", None)]:
        cpu_max.write_text(text)
        assert cpu_quota(str(cpu_max)) == want, text
    assert cpu_quota(str(tmp_path / "absent")) is None

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        cpu_max.write_text("100000 100000")  # one CPU's worth of time
        assert limit_cpu_threads(str(cpu_max)) == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit choice stands
        assert limit_cpu_threads(str(cpu_max)) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        cpu_max.write_text("max 100000")
        assert limit_cpu_threads(str(cpu_max)) == 2
    finally:
        torch.set_num_threads(before)

    assert pick_device("cpu") == "cpu"
    assert pick_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, message in [("bogus", "is not a device"), ("mps", "runs on cpu or cuda"),
                         ("cuda:99", "CUDA device")]:
        with pytest.raises(ValueError, match=message):
            pick_device(bad)
    if torch.cuda.is_available():
        assert pick_device("cuda:0") == "cuda:0"
    else:
        with pytest.raises(ValueError, match="torch sees no CUDA device here"):
            pick_device("cuda")


def test_every_model_command_takes_a_device():
    from purify_fast.cli import build_parser

    parser = build_parser()
    for cmd in ("attack", "purify", "evaluate", "train-clean", "distill", "fisher", "demo",
                "purify-checkpoint"):
        sub = parser._subparsers._group_actions[0].choices[cmd]
        assert "--device" in sub._option_string_actions, cmd


def _fake_command(monkeypatch, run):
    """Register a throwaway subcommand ``fake`` whose ``run`` is given (for main()'s handling)."""
    import types

    from purify_fast import cli

    mod = types.ModuleType("purify_fast.commands.fake")

    def add_parser(sub):
        p = sub.add_parser("fake")
        p.add_argument("--out", default=None)
        p.set_defaults(run=run)

    mod.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "purify_fast.commands.fake", mod)
    if "fake" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["fake"])
    return cli.main


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from purify_fast.fileio import atomic_save_dir

    def run(args):
        def write(tmp):
            (tmp / "config.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill`, a scheduler or torchrun sends
            (tmp / "never.bin").write_bytes(b"x")

        atomic_save_dir(args.out, write)
        return 0

    main = _fake_command(monkeypatch, run)
    assert main(["fake", "--out", str(tmp_path / "ckpt")]) == 128 + signal.SIGTERM
    assert "terminated" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no temporary directory, no half-written output
    from purify_fast.commands import raise_terminated

    assert signal.getsignal(signal.SIGTERM) is not raise_terminated  # handler restored


def test_user_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys):
    def run(args):
        raise FileNotFoundError(f"{args.out}: no such file or directory")

    main = _fake_command(monkeypatch, run)
    assert main(["fake", "--out", "data.csv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.csv: no such file or directory\n")
    assert "Traceback" not in err and "PURIFY_FAST_TRACEBACK=1" in err
    monkeypatch.setenv("PURIFY_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["fake", "--out", "data.csv"])

    def bug(args):
        raise KeyError("a bug, not a user error")

    main = _fake_command(monkeypatch, bug)
    with pytest.raises(KeyError):
        main(["fake"])


def test_the_commands_print_the_packages_warnings_as_one_line(monkeypatch, capsys):
    """A warning raised in purify_fast reads ``warning: ...`` (as ``note:`` / ``error:`` do),
    without the package file, line and source line Python prints; a warning from elsewhere
    keeps Python's format, as does everything with PURIFY_FAST_TRACEBACK=1 (developers want to
    know where it came from); the caller's warning display comes back after the command."""
    import warnings

    import purify_fast.defenses.muscle_lora as inside

    def run(args):
        warnings.warn_explicit("from the package", UserWarning, inside.__file__, 10)
        warnings.warn_explicit("from elsewhere", UserWarning, "/somewhere/else.py", 3)
        return 0

    main = _fake_command(monkeypatch, run)
    # record=True: what goes on to the display in force (Python's) is collected here
    with warnings.catch_warnings(record=True) as passed_on:
        warnings.simplefilter("always")
        shown = warnings.showwarning
        assert main(["fake"]) == 0
        err = capsys.readouterr().err
        assert err == "warning: from the package\n"
        assert [(str(w.message), w.filename) for w in passed_on] == [("from elsewhere",
                                                                      "/somewhere/else.py")]
        assert warnings.showwarning is shown
        monkeypatch.setenv("PURIFY_FAST_TRACEBACK", "1")
        assert main(["fake"]) == 0
        assert capsys.readouterr().err == ""
        assert [str(w.message) for w in passed_on[1:]] == ["from the package", "from elsewhere"]


def test_commands_refuse_a_bad_out_before_any_work(tmp_path, capsys):
    from purify_fast.cli import main
    from purify_fast.models.loading import default_model_path

    minilm = Path(default_model_path())

    precious = tmp_path / "notes.txt"
    precious.write_text("precious")
    suspect = tmp_path / "suspect"
    suspect.mkdir()
    (suspect / "config.json").write_text("{}")
    cases = [
        (["attack", "--out", str(precious)], "notes.txt exists and is not a directory"),
        (["purify", "--suspect", str(suspect), "--out", str(suspect)], "overlaps the input"),
        (["purify", "--suspect", str(suspect), "--out", str(suspect / "purified")],
         "overlaps the input"),
        (["train-clean", "--data", "rotten-tomatoes", "--out", str(tmp_path)],
         "is not an output directory"),
        (["demo", "--out", str(precious)], "notes.txt exists and is not a directory"),
        (["demo", "--mixing-rho", "1.5", "--out", str(tmp_path / "d")],
         "mixing_rho must be in [0, 1] or None, got 1.5"),
        (["distill", "--num-examples", "4", "--out", str(tmp_path / "s")],
         "--num-examples must be at least 8"),
        (["purify", "--suspect", str(suspect), "--rho-sweep", "0.1,abc", "--out",
          str(tmp_path / "p")], "--rho-sweep value must be in [0, 1], got 'abc'"),
        (["evaluate", "--model", str(suspect), "--device", "bogus"], "is not a device"),
        (["purify", "--suspect", str(suspect), "--method", "e-pur", "--rho", "0.3", "--out",
          str(tmp_path / "e")], "--rho / --rho-sweep are not used by --method e-pur"),
        (["attack", "--target-label", "positive", "--out", str(tmp_path / "a")],
         "--target-label 'positive' is not a class name of rotten-tomatoes (rotten=0, fresh=1)"),
        (["train-clean", "--data", "tweets", "--attack", "badnets", "--target-label", "3",
          "--out", str(tmp_path / "t")],
         "--target-label 3 is not a class of tweets (negative=0, neutral=1, positive=2)"),
        # options the method would ignore (a rho sweep asked of fine-purifying ran at rho 0.3)
        (["purify", "--suspect", str(suspect), "--method", "fine-purifying", "--rho-sweep",
          "0.1,0.2", "--out", str(tmp_path / "f")],
         "--rho-sweep is an option of fine-mixing; this run (--method fine-purifying) does not "
         "use it"),
        (["purify", "--suspect", str(suspect), "--indicator", "drift", "--out",
          str(tmp_path / "f")],
         "--indicator is an option of fine-purifying; this run (--method fine-mixing) does not "
         "use it"),
        (["purify", "--suspect", str(suspect), "--method", "fine-tune", "--rho", "0.3",
          "--out", str(tmp_path / "f")], "--rho is not used by --method fine-tune"),
        (["purify", "--suspect", str(suspect), "--method", "e-pur", "--epochs", "7", "--out",
          str(tmp_path / "f")], "--epochs is an option of the clean fine-tune"),
        (["purify", "--suspect", str(suspect), "--rho", "0.9", "--rho-sweep", "0.3", "--out",
          str(tmp_path / "f")], "--rho and --rho-sweep"),
        (["demo", "--out", str(minilm / "demo_out")], "overlaps the input"),  # it reads MiniLM
        (["train-clean", "--data", "rotten-tomatoes", "--poison-rate", "0.5", "--out",
          str(tmp_path / "t")], "--poison-rate is an option of --attack"),
        (["purify", "--suspect", str(suspect), "--top-n", "5", "--out", str(tmp_path / "f")],
         "--top-n is an option of E-PUR (--e-pur or --method e-pur); this run (--method "
         "fine-mixing) does not use it"),
        # given at its default value still counts as given; options read only in some settings
        (["purify", "--suspect", str(suspect), "--method", "e-pur", "--epochs", "3", "--out",
          str(tmp_path / "f")], "--epochs is an option of the clean fine-tune"),
        (["purify", "--suspect", str(suspect), "--sweep-tolerance", "0.05", "--out",
          str(tmp_path / "f")], "--sweep-tolerance is an option of the rho sweep"),
        (["purify", "--suspect", str(suspect), "--e-pur", "--top-n", "5", "--score-threshold",
          "0.5", "--out", str(tmp_path / "f")], "--top-n and --score-threshold"),
        (["purify", "--suspect", str(suspect), "--method", "fine-purifying", "--indicator",
          "drift", "--fisher-at", "pretrained", "--out", str(tmp_path / "f")],
         "--fisher-at is an option of fine-purifying's Fisher (not computed for --indicator drift)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert precious.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "suspect"]
    assert sorted(p.name for p in suspect.iterdir()) == ["config.json"]
    with pytest.raises(SystemExit):  # sizes are checked by argparse itself
        main(["attack", "--train-size", "0", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("cmd", ["attack", "purify", "purify-checkpoint", "fisher", "train-clean",
                                 "distill", "demo"])
def test_seed_out_of_range_is_refused_at_parse_time(cmd, tmp_path, capsys):
    """A seed the mask key cannot take (negative, >= 2**32) used to stop the demo after minutes
    of training; every command refuses it before any work."""
    from purify_fast.cli import main

    for seed in ("-1", str(2**32), "x"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--seed", seed, "--out", str(tmp_path / "o")])
        assert info.value.code == 2
        assert "--seed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_api_seed_checked_before_any_work():
    from purify_fast.commands.demo import run_demo
    from purify_fast.defenses import purify

    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\), got -1"):
        purify("/nonexistent-suspect", "minilm", None, seed=-1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\), got True"):
        run_demo(None, seed=True)


def test_outputs_never_replace_or_hold_an_input(tmp_path, capsys):
    """An earlier output directory that holds the E-PUR corpus is not replaced (the corpus would
    go with it), and fisher's --token-counts never overwrites a file."""
    from purify_fast.cli import main

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    (earlier / "corpus.csv").write_text("text\nclean words\n")
    suspect = tmp_path / "suspect"
    suspect.mkdir()
    (suspect / "config.json").write_text("{}")
    assert main(["purify", "--suspect", str(suspect), "--e-pur", "--e-pur-corpus",
                 str(earlier / "corpus.csv"), "--out", str(earlier)]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert (earlier / "corpus.csv").read_text() == "text\nclean words\n"
    counts = tmp_path / "counts.json"
    counts.write_text('{"precious": true}')
    assert main(["fisher", "--model", "minilm", "--out", str(tmp_path / "f"), "--token-counts",
                 str(counts)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert counts.read_text() == '{"precious": true}'


def test_evaluate_offers_only_what_it_reads_and_distill_errors_take_the_common_path(
        tmp_path, monkeypatch, capsys):
    from purify_fast.cli import main

    for flag in ("--train-size", "--dev-size", "--poison-rate"):  # evaluate trains nothing
        with pytest.raises(SystemExit):
            main(["evaluate", "--model", "m", flag, "1"])
        assert "unrecognized arguments" in capsys.readouterr().err
    argv = ["distill", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "set PURIFY_FAST_TRACEBACK=1" in capsys.readouterr().err
    monkeypatch.setenv("PURIFY_FAST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="missing.csv: no such file"):  # DataFileError
        main(argv)
