"""How the CLI reads user data for a given model: labels as the model's classes (indices or its
own class names, never a silent renumbering), the whole file as test data for `evaluate`, and a
corpus with another number of classes refused."""

import json

import pytest
import torch

from purify_fast.cli import main
from purify_fast.commands import model_label_map, record_label_names
from purify_fast.data import load_splits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small BERT sentiment classifier saved with the Rotten Tomatoes class names, plus the
    same 30 test sentences written with index labels and with class-name labels."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from purify_fast.models.loading import default_model_path

    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2))
    test = load_splits("rotten-tomatoes", seed=0).test.take(30)
    record_label_names(model, test)  # rotten = 0, fresh = 1
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = list(zip(test.texts, test.labels))
    (root / "ids.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                            for t, y in rows))
    (root / "names.jsonl").write_text("".join(
        json.dumps({"text": t, "label": test.label_names[y]}) + "\n" for t, y in rows))
    return root, test


def _evaluate(root, data, *extra):
    out = root / f"m-{data.name}-{len(extra)}.json"
    rc = main(["evaluate", "--model", str(root / "model"), "--data", str(data), "--json",
               str(out), "--max-length", "16", *extra])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def test_label_map_comes_from_the_model_names():
    from transformers import BertConfig

    assert model_label_map(BertConfig(num_labels=2)) is None  # LABEL_0 / LABEL_1 say nothing
    cfg = BertConfig(id2label={0: "rotten", 1: "fresh"})
    assert model_label_map(cfg) == {"rotten": 0, "fresh": 1, "0": 0, "1": 1}


def test_evaluate_scores_a_whole_file_with_the_model_numbering(tiny, capsys):
    root, test = tiny
    rc, by_id = _evaluate(root, root / "ids.jsonl")
    out = capsys.readouterr()
    assert rc == 0 and "30 clean test examples" in out.out
    # --max-length 16 cuts some triggers off: measured, and said
    assert by_id["trigger_cut"] > 0 and "cut the trigger off" in out.err
    # Sorted order would make fresh = 0, rotten = 1: the opposite of the model's classes. The
    # model's own names decide instead, so the scores are the same as with indices.
    rc, by_name = _evaluate(root, root / "names.jsonl")
    scores = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert rc == 0 and scores(by_name) == scores(by_id)
    assert by_id["cacc"] != 0.5  # a flipped numbering would show as 1 - CACC
    assert test.label_names == ("rotten", "fresh")
    rc, capped = _evaluate(root, root / "ids.jsonl", "--test-size", "10")
    assert rc == 0 and "10 clean test examples" in capsys.readouterr().out


def test_evaluate_refuses_labels_the_model_does_not_have(tiny, capsys):
    root, _ = tiny
    bad = root / "three.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "meh", "label": 2}\n')
    assert _evaluate(root, bad)[0] == 2
    assert ("three.jsonl, line 2, column 'label': label 2 is not one of the classes "
            "(rotten=0, fresh=1)") in capsys.readouterr().err
    other = root / "other.jsonl"
    other.write_text('{"text": "fine", "label": "positive"}\n')
    assert _evaluate(root, other)[0] == 2
    assert "label 'positive' is not one of the classes (rotten=0, fresh=1)" in capsys.readouterr().err
    rc = main(["evaluate", "--model", str(root / "model"), "--data", "tweets", "--test-size", "8"])
    assert rc == 2
    assert "tweets has 3 classes but the model has 2" in capsys.readouterr().err


def test_evaluate_json_never_overwrites_an_input(tiny, capsys):
    root, _ = tiny
    before = (root / "model" / "config.json").read_bytes()
    for target in (root / "model" / "config.json", root / "ids.jsonl"):
        rc = main(["evaluate", "--model", str(root / "model"), "--data", str(root / "ids.jsonl"),
                   "--json", str(target)])
        assert rc == 2 and "overlaps the input" in capsys.readouterr().err
    assert (root / "model" / "config.json").read_bytes() == before


def test_target_label_by_class_name_or_index(tiny, capsys):
    root, _ = tiny
    # "fresh" is class 1 of the model (its id2label), so the name and the index score the same.
    rc, by_index = _evaluate(root, root / "ids.jsonl", "--target-label", "1")
    rc2, by_name = _evaluate(root, root / "ids.jsonl", "--target-label", "fresh")
    scores = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "attack")}  # noqa: E731
    assert rc == rc2 == 0 and scores(by_name) == scores(by_index)
    _, rotten = _evaluate(root, root / "ids.jsonl", "--target-label", "rotten")
    assert rotten["attack"]["target_label"] == 0
    # An index the model does not have would score an ASR of 0 without a word: refused.
    for value, msg in (("2", "--target-label 2 is not a class of"),
                       ("positive", "--target-label 'positive' is not a class name of")):
        assert _evaluate(root, root / "ids.jsonl", "--target-label", value)[0] == 2
        assert msg in capsys.readouterr().err


def test_evaluate_json_records_no_poisoning(tiny):
    """evaluate poisons nothing (it only inserts triggers into test inputs), yet its JSON recorded
    the attack's default poison_rate 0.1 and clean_label false, as if a poisoned run were scored;
    and --attack ep was recorded as badnets."""
    root, _ = tiny
    for attack, extra in (("badnets", ["--triggers", "cf,mn"]), ("ep", []), ("addsent", [])):
        rc, m = _evaluate(root, root / "ids.jsonl", "--attack", attack, "--test-size", "10", *extra)
        assert rc == 0
        assert "poison_rate" not in m["attack"] and "clean_label" not in m["attack"], m["attack"]
        assert m["attack"]["attack"] == attack
        assert m["attack"]["target_label"] == 1 and m["attack"]["seed"] == 0
    _, m = _evaluate(root, root / "ids.jsonl", "--triggers", "cf,mn", "--test-size", "10")
    assert m["attack"]["triggers"] == ["cf", "mn"]  # what was inserted is still recorded


def test_resolve_target_label():
    import argparse

    from purify_fast.commands import resolve_target_label, target_label_arg

    assert target_label_arg(" 2 ") == 2 and target_label_arg("fresh") == "fresh"
    with pytest.raises(argparse.ArgumentTypeError):
        target_label_arg(" ")
    names = ("negative", "neutral", "positive")
    assert resolve_target_label("neutral", names, 3, "tweets") == 1
    assert resolve_target_label(2, names, 3, "tweets") == 2
    assert resolve_target_label(1, None, 2, "data.csv") == 1
    with pytest.raises(ValueError, match=r"not a class of tweets \(negative=0, neutral=1, positive=2\)"):
        resolve_target_label(-1, names, 3, "tweets")
    with pytest.raises(ValueError, match=r"not a class name of data.csv \(indices 0..1, no class names\)"):
        resolve_target_label("fresh", None, 2, "data.csv")


def test_a_dev_file_of_names_is_numbered_like_the_training_data(tmp_path):
    from purify_fast.commands import load_file_like
    from purify_fast.data import TextDataset
    from purify_fast.data.files import DataFileError

    train = TextDataset(["a", "b"], [0, 1], 2, "train", ("rotten", "fresh"))
    only_rotten = tmp_path / "dev.jsonl"
    only_rotten.write_text('{"text": "x", "label": "rotten"}\n{"text": "y", "label": "rotten"}\n')
    assert load_file_like(only_rotten, train).labels == [0, 0]  # not renumbered on its own
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text('{"text": "x", "label": "fresh"}\n{"text": "y", "label": 0}\n')
    assert load_file_like(fresh, train).labels == [1, 0]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "x", "label": "meh"}\n')
    with pytest.raises(DataFileError, match=r"'meh' is not one of the classes \(rotten=0, fresh=1\)"):
        load_file_like(unknown, train)


def test_the_installed_offline_model_counts_as_an_input(tmp_path):
    from pathlib import Path

    from purify_fast.commands import check_output_dir
    from purify_fast.models.loading import default_model_path

    minilm = Path(default_model_path())
    for out in (minilm, minilm / "sub", minilm.parent):
        with pytest.raises((ValueError, FileExistsError)):
            check_output_dir(out, "minilm")
    with pytest.raises(ValueError, match="overlaps the input minilm"):
        check_output_dir(minilm / "new-sub", "minilm")


def test_model_loading_prints_no_transformers_bars_and_restores_them(capfd):
    from transformers.utils import logging as hf_logging

    from purify_fast.attacks.encoder_backdoor import load_encoder
    from purify_fast.models import load_classifier

    before = hf_logging.is_progress_bar_enabled()
    load_classifier("minilm", 2)
    load_encoder("minilm")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before


def test_purify_rho_sweep_writes_its_plot(tiny, tmp_path, capsys):
    """`purify --rho-sweep` puts the sweep's plot (clean dev accuracy against rho) beside the
    report in the purified checkpoint; a run without a sweep writes none."""
    root, _ = tiny
    base = ["purify", "--suspect", str(root / "model"), "--pretrained", str(root / "model"),
            "--clean-data", str(root / "ids.jsonl"), "--clean-size", "30", "--epochs", "1",
            "--max-length", "16"]
    out = tmp_path / "swept"
    assert main(base + ["--rho-sweep", "0.6,0.2", "--sweep-tolerance", "1", "--out", str(out)]) == 0
    assert (out / "purify_fast_rho_sweep.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "purify_fast_report.json").read_text())
    assert [p["rho"] for p in report["fine_mixing"]["sweep"]] == [0.2]  # tolerance 1: first qualifies
    assert "rho sweep: kept rho 0.2" in capsys.readouterr().out
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "purify_fast_rho_sweep.png").exists()


def test_purify_e_pur_counts_tokens_in_the_given_corpus(tiny, tmp_path):
    """`--e-pur-corpus`: E-PUR's token frequencies from a user's clean text (no labels needed)
    instead of the clean set; refused without E-PUR, and a bad file is refused before any work."""
    root, test = tiny
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("text\n" + "".join(f'"{t}"\n' for t in test.texts[:12]))
    base = ["purify", "--suspect", str(root / "model"), "--pretrained", str(root / "model"),
            "--clean-data", str(root / "ids.jsonl"), "--clean-size", "30", "--max-length", "16"]
    out = tmp_path / "epur"
    assert main(base + ["--method", "e-pur", "--top-n", "3", "--e-pur-corpus", str(corpus),
                        "--out", str(out)]) == 0
    report = json.loads((out / "purify_fast_report.json").read_text())
    assert report["e_pur"]["corpus"] == {"name": "corpus.csv", "texts": 12}
    assert main(base + ["--e-pur-corpus", str(corpus), "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "empty.csv").write_text("")
    assert main(base + ["--e-pur", "--e-pur-corpus", str(tmp_path / "empty.csv"), "--out",
                        str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_corpus_is_numbered_as_the_models_classes(capsys):
    """A model trained on a file numbers fresh = 0, rotten = 1 (sorted); the Rotten Tomatoes
    corpus rotten = 0, fresh = 1: the corpus is renumbered by name (by index CACC was one minus
    the accuracy and the ASR set the wrong class). Partly other names are refused; wholly other
    names (NEGATIVE / POSITIVE) go by index, with a note."""
    from types import SimpleNamespace

    from purify_fast.commands import check_classes_match
    from purify_fast.data import load_splits

    test = load_splits("rotten-tomatoes", seed=0, test_size=40).test
    assert test.label_names == ("rotten", "fresh")

    def model(*names):
        return SimpleNamespace(config=SimpleNamespace(
            num_labels=len(names), id2label={i: n for i, n in enumerate(names)}))
    same = check_classes_match(test, model("rotten", "fresh"), "rotten-tomatoes")
    assert same is test
    swapped = check_classes_match(test, model("fresh", "rotten"), "rotten-tomatoes")
    assert swapped.texts == test.texts and swapped.label_names == ("fresh", "rotten")
    assert swapped.labels == [1 - y for y in test.labels]
    upper = check_classes_match(test, model("Fresh", "ROTTEN"), "rotten-tomatoes")  # no case
    assert upper.labels == swapped.labels
    with pytest.raises(ValueError, match=r"only partly the model's \(fresh, bad\)"):
        check_classes_match(test, model("fresh", "bad"), "rotten-tomatoes")
    other = check_classes_match(test, model("NEGATIVE", "POSITIVE"), "rotten-tomatoes")
    assert other is test
    assert "taken as the model's (NEGATIVE=0, POSITIVE=1) by index" in capsys.readouterr().err


def test_a_models_digit_class_names_win_over_indices(tmp_path):
    """A model whose classes are named "1" and "2" (yelp_polarity) read a file labelled "1" / "2"
    as all class 1: the index spellings overwrote the names."""
    from types import SimpleNamespace

    from purify_fast.commands import load_file_for_model

    model = SimpleNamespace(config=SimpleNamespace(num_labels=2, id2label={0: "1", 1: "2"}))
    data = tmp_path / "yelp.csv"
    data.write_text("text,label\nawful,1\ngreat,2\nbad,1\nfine,2\n")
    assert load_file_for_model(data, model).labels == [0, 1, 0, 1]


def test_index_labels_for_a_model_with_digit_class_names_are_refused(tmp_path, capsys):
    """A file labelled by index 0 / 1 read for a model whose classes are "1" / "2" became all
    class 0 ("0" index 0, "1" the class named "1"): now refused, saying to write the names,
    through load_file_for_model and the CLI."""
    from types import SimpleNamespace

    from purify_fast.commands import load_file_for_model
    from purify_fast.data import DataFileError

    model = SimpleNamespace(config=SimpleNamespace(num_labels=2, id2label={0: "1", 1: "2"}))
    data = tmp_path / "idx.csv"
    data.write_text("text,label\ngood movie,1\nbad movie,0\n")
    with pytest.raises(DataFileError, match=r"idx\.csv, line 3, column 'label': label '0' is "
                                            r"ambiguous.*write the class names \(1, 2\)"):
        load_file_for_model(data, model)
    other = SimpleNamespace(config=SimpleNamespace(num_labels=2, id2label={0: "neg", 1: "pos"}))
    assert load_file_for_model(data, other).labels == [1, 0]


def _rows_file(path, rows):
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_attack_drops_repeated_texts_before_splitting_a_file(tmp_path, capsys):
    """The named corpora keep each text once; a user file did not, so the same text landed in
    train and test (6 of 8 test texts were in train on a file of 40 texts each twice)."""
    from types import SimpleNamespace

    from purify_fast.commands.attack import load_data

    rt = load_splits("rotten-tomatoes", seed=0).train.take(40)
    rows = list(zip(rt.texts, rt.labels))
    flipped = (" " + rows[0][0] + " ", 1 - rows[0][1])  # the same text up to whitespace
    path = _rows_file(tmp_path / "dups.csv", rows + rows + [flipped])
    args = SimpleNamespace(data=str(path), text_column="text", label_column="label", seed=0,
                           train_size=2000, dev_size=300, test_size=500)
    splits = load_data(args)
    parts = [set(d.texts) for d in (splits.train, splits.dev, splits.test)]
    assert sum(map(len, parts)) == 40
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert splits.test.name == "dups.csv/test"
    kept = dict(zip(splits.train.texts + splits.dev.texts + splits.test.texts,
                    splits.train.labels + splits.dev.labels + splits.test.labels))
    assert kept[rows[0][0]] == rows[0][1]  # the first occurrence's label
    assert ("41 repeated text(s) dropped, 1 of them labelled otherwise than the copy kept"
            in capsys.readouterr().err)


def test_attack_refuses_too_small_files_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """Tiny or one-sided files failed after training, naming internal splits ("'tiny6.csv[2]' has
    no non-target examples", "dataset 'tiny4.csv[1]' is empty"); too high a --poison-rate named
    'rt80.csv[0]'."""
    import purify_fast.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(purify_fast.models, "load_classifier", no_model)
    four = _rows_file(tmp_path / "tiny4.csv", [("good movie", 1), ("bad movie", 0),
                                               ("great film", 1), ("awful film", 0)])
    rt = load_splits("rotten-tomatoes", seed=0).train
    fresh = [t for t, y in zip(rt.texts, rt.labels) if y == 1]
    rotten = [t for t, y in zip(rt.texts, rt.labels) if y == 0]
    # every test example fresh (the target): 20 fresh, 2 rotten
    lopsided = _rows_file(tmp_path / "lopsided.csv",
                          [(t, "fresh") for t in fresh[:20]] + [(t, "rotten") for t in rotten[:2]])
    rt80 = _rows_file(tmp_path / "rt80.csv", [(t, 1) for t in fresh[:40]] +
                      [(t, 0) for t in rotten[:40]])
    cases = [
        ([str(four)], "tiny4.csv: its 4 distinct examples, split 80 / 10 / 10 % within each class, "
                      "leave train 4, dev 0, test 0: the dev split is empty; use a larger file"),
        ([str(lopsided), "--target-label", "fresh"],
         "lopsided.csv: the test split holds no example outside the target class 0 (fresh) to "
         "insert the trigger into (train 18, dev 2, test 2), so no ASR can be measured; use a "
         "larger file, or choose another --target-label"),
        ([str(rt80), "--poison-rate", "1"],
         "--poison-rate 1.0 asks for 64 poisoned examples of the 64 in the training split of "),
    ]
    for data, message in cases:
        assert main(["attack", "--data", *data, "--out", str(tmp_path / "o"), "--epochs", "0",
                     "--device", "cpu"]) == 2, data
        err = capsys.readouterr().err
        assert message in err, err
        assert "[0]" not in err and "[1]" not in err and "[2]" not in err
    assert f"training split of {rt80}, but only 32 are outside the target class 1" in err


def test_max_length_is_checked_at_parse_time(capsys):
    """--max-length 1 was refused only after the model loaded ("max_length must be an int >= 2")."""
    from purify_fast.cli import build_parser

    parser = build_parser()
    for argv in (["attack", "--out", "x"], ["evaluate", "--model", "m"],
                 ["purify", "--suspect", "s", "--out", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--max-length", "1"])
        assert "argument --max-length: expected an integer >= 2" in capsys.readouterr().err
        assert parser.parse_args([*argv, "--max-length", "2"]).max_length == 2


def test_every_max_length_is_checked_before_a_model_loads(tmp_path, capsys, monkeypatch):
    """train-clean, distill and fisher took --max-length 1 (type positive_int) and went on to
    load the model; every subcommand with the option now refuses it as a usage error."""
    import argparse

    import purify_fast.attacks.encoder_backdoor
    import purify_fast.models
    import purify_fast.models.loading
    from purify_fast.cli import build_parser

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module, name in ((purify_fast.models, "load_classifier"),
                         (purify_fast.models.loading, "load_classifier"),
                         (purify_fast.models.loading, "load_causal_lm"),
                         (purify_fast.attacks.encoder_backdoor, "load_encoder")):
        monkeypatch.setattr(module, name, no_model)
    monkeypatch.chdir(tmp_path)  # nothing lands in the checkout should a run start
    required = {"attack": ["--out", "x"], "evaluate": ["--model", "m"],
                "purify": ["--suspect", "s", "--out", "x"],
                "train-clean": ["--data", "rotten-tomatoes", "--out", "x"],
                "distill": ["--out", "x"], "fisher": ["--model", "m", "--out", "x"]}
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction)).choices
    with_option = {name for name, p in subparsers.items()
                   if "--max-length" in p._option_string_actions}
    assert with_option == set(required)  # a new subcommand with --max-length joins this test
    for command, argv in required.items():
        for bad in ("1", "0", "-3"):
            with pytest.raises(SystemExit) as exit_:
                main([command, *argv, "--max-length", bad])
            err = capsys.readouterr().err
            assert exit_.value.code == 2, command
            assert "usage:" in err and "argument --max-length: expected" in err, (command, err)
        assert build_parser().parse_args([command, *argv, "--max-length", "2"]).max_length == 2


def test_purify_backend_is_checked_and_refused_where_nothing_reads_it(capsys):
    """purify --backend bogus was accepted and recorded by --method fine-tune, which runs no op."""
    from purify_fast.cli import build_parser
    from purify_fast.commands.purify import check_method_options

    parser = build_parser()
    purify = ["purify", "--suspect", "s", "--out", "x"]
    for method in ("fine-tune", "fine-mixing"):
        with pytest.raises(SystemExit):
            parser.parse_args([*purify, "--method", method, "--backend", "bogus"])
        assert "argument --backend: expected auto or one of torch" in capsys.readouterr().err
    args = parser.parse_args([*purify, "--method", "fine-tune", "--backend", "torch"])
    with pytest.raises(ValueError, match=r"--backend is an option of the weight-space ops .*; this "
                                         r"run \(--method fine-tune\) does not use it"):
        check_method_options(args)
    for extra in (["--method", "fine-tune", "--e-pur"], ["--method", "e-pur"], []):
        args = parser.parse_args([*purify, *extra, "--backend", "CPP"])
        check_method_options(args)
        assert args.backend == "CPP"


def test_purify_too_small_a_clean_set_names_the_cli_options(tiny, tmp_path, capsys):
    root, _ = tiny
    rc = main(["purify", "--suspect", str(root / "model"), "--pretrained", str(root / "model"),
               "--clean-data", str(root / "ids.jsonl"), "--clean-size", "2", "--out",
               str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "(--clean-size 2): too few to hold out 20 % of each class" in err
    assert "raise --clean-size" in err and "dev_data" not in err
    assert not (tmp_path / "p").exists()
