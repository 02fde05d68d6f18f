"""`attack` and `train-clean` fine-tune a checkpoint in its own class numbering: a model that names
its classes fresh = 0, rotten = 1 (trained on a file of names, numbered in sorted order) given the
Rotten Tomatoes corpus (rotten = 0, fresh = 1), or a rotten = 0 model given a file of names, is
trained, scored and written with the model's numbering, not the data's by index (which taught its
class 0 the other class and wrote names contradicting what it does). Unnamed classes, a head of
another size and the offline MiniLM keep the data's numbering."""

import json

import pytest
import torch

from purify_fast.cli import main
from purify_fast.data import load_splits

SIZES = ["--train-size", "40", "--dev-size", "20", "--test-size", "20", "--max-length", "16",
         "--batch-size", "8", "--device", "cpu"]


def _tiny_bert(path, names=None, num_labels=2, says=None):
    """A small BERT classifier saved to ``path`` (id2label ``names``, else LABEL_i); ``says``: a
    head that predicts that class index for every input (zero weights, a large bias)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    extra = {}
    if names:
        num_labels = len(names)
        extra = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels, **extra))
    if says is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.fill_(-5.0)
            model.classifier.bias[says] = 5.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fresh_first(tmp_path_factory):
    """Names its classes fresh = 0, rotten = 1 and says 'fresh' (its class 0) for every input."""
    return _tiny_bert(tmp_path_factory.mktemp("fresh_first") / "model", ("fresh", "rotten"), says=0)


def _id2label(out):
    return json.loads((out / "config.json").read_text())["id2label"]


def _spy(monkeypatch, module, name):
    """Record the datasets handed to ``module.name`` (the fine-tuning step) and call it."""
    seen = []
    real = getattr(module, name)

    def spy(model, tok, train, dev, *args, **kwargs):
        seen.append((train, dev))
        return real(model, tok, train, dev, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_attack_trains_and_scores_in_the_models_class_numbering(fresh_first, tmp_path, capsys,
                                                                monkeypatch):
    import purify_fast.training

    corpus = load_splits("rotten-tomatoes", seed=0, train_size=40, dev_size=20, test_size=20)
    fresh_share = sum(y == 1 for y in corpus.test.labels) / len(corpus.test)
    assert 0.2 < fresh_share < 0.8  # so that a flipped numbering shows as 1 - CACC
    seen = _spy(monkeypatch, purify_fast.training, "train")
    out = tmp_path / "att"
    # --epochs 0: the model is written as it came, so its scores are the input model's.
    assert main(["attack", "--model", fresh_first, "--data", "rotten-tomatoes", "--out", str(out),
                 "--epochs", "0", "--target-label", "fresh", *SIZES]) == 0
    err = capsys.readouterr().err
    info = json.loads((out / "purify_fast_attack.json").read_text())
    # The model says fresh for everything: right on the fresh test examples, and every triggered
    # input lands on the target class fresh, the model's class 0.
    assert info["attack"]["target_label"] == 0
    assert info["metrics"]["cacc"] == pytest.approx(fresh_share)
    assert info["metrics"]["asr"] == 1.0
    assert _id2label(out) == {"0": "fresh", "1": "rotten"}  # still true of what it does
    # What it was fine-tuned and selected on: fresh (corpus class 1) is the model's class 0.
    (train, dev), = seen
    assert train.label_names == dev.label_names == ("fresh", "rotten")
    assert dev.labels == [1 - y for y in corpus.dev.labels]
    by_text = dict(zip(corpus.train.texts, corpus.train.labels))
    clean = [(y, by_text[t]) for t, y in zip(train.texts, train.labels) if t in by_text]
    assert len(clean) > 30 and all(y == 1 - corpus_y for y, corpus_y in clean)
    assert ("rotten-tomatoes numbered as the model's classes (fresh=0, rotten=1), not in its own "
            "order (rotten=0, fresh=1)") in err
    # evaluate (which numbers the corpus by the model's names) agrees on the checkpoint written.
    assert main(["evaluate", "--model", str(out), "--data", "rotten-tomatoes", "--test-size",
                 "20", "--max-length", "16", "--target-label", "fresh", "--json",
                 str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert (ev["cacc"], ev["asr"]) == (info["metrics"]["cacc"], info["metrics"]["asr"])
    # An index is the model's class (as for evaluate), and said so.
    out1 = tmp_path / "att1"
    assert main(["attack", "--model", fresh_first, "--data", "rotten-tomatoes", "--out",
                 str(out1), "--epochs", "0", "--target-label", "1", *SIZES]) == 0
    assert "--target-label 1 is the class 'rotten' (fresh=0, rotten=1)" in capsys.readouterr().err
    info1 = json.loads((out1 / "purify_fast_attack.json").read_text())
    assert info1["attack"]["target_label"] == 1 and info1["metrics"]["asr"] == 0.0


def test_attack_numbers_a_file_of_names_as_the_model(tmp_path, capsys, monkeypatch):
    """A rotten = 0 model given a file labelled rotten / fresh (sorted: fresh = 0)."""
    import purify_fast.training

    model = _tiny_bert(tmp_path / "model", ("rotten", "fresh"))
    corpus = load_splits("rotten-tomatoes", seed=0).test.take(30)
    data = tmp_path / "names.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": corpus.label_names[y]}) + "\n"
                            for t, y in zip(corpus.texts, corpus.labels)))
    by_text = dict(zip(corpus.texts, corpus.labels))
    seen = _spy(monkeypatch, purify_fast.training, "train")
    out = tmp_path / "att"
    assert main(["attack", "--model", model, "--data", str(data), "--out", str(out), "--epochs",
                 "0", "--attack", "badnets", "--poison-rate", "0.01", *SIZES]) == 0
    err = capsys.readouterr().err
    assert _id2label(out) == {"0": "rotten", "1": "fresh"}
    (train, dev), = seen
    assert train.label_names == ("rotten", "fresh")
    assert dev.labels == [by_text[t] for t in dev.texts]  # the model's (and corpus's) numbering
    assert "numbered as the model's classes (rotten=0, fresh=1)" in err


def test_train_clean_trains_and_scores_in_the_models_class_numbering(fresh_first, tmp_path,
                                                                     capsys, monkeypatch):
    import purify_fast.defenses.muscle_lora as muscle_lora

    corpus = load_splits("rotten-tomatoes", seed=0, train_size=40, dev_size=20, test_size=20)
    fresh_share = sum(y == 1 for y in corpus.test.labels) / len(corpus.test)
    seen = _spy(monkeypatch, muscle_lora, "train_clean")
    out = tmp_path / "tc"
    assert main(["train-clean", "--model", fresh_first, "--data", "rotten-tomatoes", "--out",
                 str(out), "--epochs", "1", "--ref-pool-size", "8", "--attack", "badnets",
                 "--target-label", "fresh", "--no-progress", *SIZES]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    # One LoRA epoch leaves the head's "fresh for everything" as it was.
    assert report["eval"]["cacc"] == pytest.approx(fresh_share)
    assert report["eval"]["asr"] == 1.0  # the target class is fresh, the model's class 0
    assert _id2label(out) == {"0": "fresh", "1": "rotten"}
    (train, dev), = seen
    assert train.label_names == ("fresh", "rotten")
    assert dev.labels == [1 - y for y in corpus.dev.labels]
    assert "numbered as the model's classes (fresh=0, rotten=1)" in err


def test_train_clean_numbers_files_of_names_as_the_model(tmp_path, capsys, monkeypatch):
    """A rotten = 0 model given --data / --dev files labelled rotten / fresh (sorted: fresh = 0)."""
    import purify_fast.defenses.muscle_lora as muscle_lora

    model = _tiny_bert(tmp_path / "model", ("rotten", "fresh"), says=0)
    corpus = load_splits("rotten-tomatoes", seed=0, train_size=40, dev_size=20)
    for part, name in ((corpus.train, "train.jsonl"), (corpus.dev, "dev.jsonl")):
        (tmp_path / name).write_text("".join(
            json.dumps({"text": t, "label": part.label_names[y]}) + "\n"
            for t, y in zip(part.texts, part.labels)))
    seen = _spy(monkeypatch, muscle_lora, "train_clean")
    out = tmp_path / "tc"
    assert main(["train-clean", "--model", model, "--data", str(tmp_path / "train.jsonl"),
                 "--dev", str(tmp_path / "dev.jsonl"), "--out", str(out), "--epochs", "1",
                 "--ref-pool-size", "8", "--no-progress", *SIZES]) == 0
    err = capsys.readouterr().err
    assert _id2label(out) == {"0": "rotten", "1": "fresh"}
    # The model says rotten (its class 0) for everything: its dev accuracy (on what the
    # reference pool leaves) is the share of rotten there.
    _, select = muscle_lora.split_reference_pool(corpus.dev, 8, seed=0)
    rotten_share = select.labels.count(0) / len(select)
    assert rotten_share != 0.5
    assert json.loads((out / "report.json").read_text())["best_dev_acc"] == pytest.approx(
        rotten_share)
    (train, dev), = seen
    assert train.labels == corpus.train.labels and dev.labels == corpus.dev.labels
    assert train.label_names == ("rotten", "fresh")
    assert "numbered as the model's classes (rotten=0, fresh=1)" in err


@pytest.mark.parametrize("kind", ["unnamed", "three-classes", "minilm"])
def test_models_without_the_datas_class_names_keep_its_numbering(kind, tmp_path, capsys,
                                                                  monkeypatch):
    """LABEL_0 / LABEL_1, a head of another size (drawn afresh) and the offline MiniLM (no head):
    nothing to renumber by, as before; the checkpoint written takes the corpus's names."""
    import purify_fast.training

    model = {"unnamed": lambda: _tiny_bert(tmp_path / "model"),
             "three-classes": lambda: _tiny_bert(tmp_path / "model",
                                                 ("negative", "neutral", "positive")),
             "minilm": lambda: "minilm"}[kind]()
    corpus = load_splits("rotten-tomatoes", seed=0, train_size=40, dev_size=20, test_size=20)
    seen = _spy(monkeypatch, purify_fast.training, "train")
    out = tmp_path / "att"
    assert main(["attack", "--model", model, "--data", "rotten-tomatoes", "--out", str(out),
                 "--epochs", "0", "--target-label", "fresh", *SIZES]) == 0
    assert "numbered as the model's classes" not in capsys.readouterr().err
    (train, dev), = seen
    assert train.label_names == ("rotten", "fresh") and dev.labels == corpus.dev.labels
    info = json.loads((out / "purify_fast_attack.json").read_text())
    assert info["attack"]["target_label"] == 1
    assert _id2label(out) == {"0": "rotten", "1": "fresh"}
