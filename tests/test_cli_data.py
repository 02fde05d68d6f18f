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
