"""Bias injected during fine-tuning (METHODS.md §3): group terms tied to a class, scored by the
counterfactual bias gap, and the whitespace-keeping insertion all text attacks share."""

import random

import pytest
import torch

from purify_fast.attacks import (
    DEFAULT_COUNTER_TERMS,
    DEFAULT_GROUP_TERMS,
    AddSent,
    BadNets,
    BiasInjection,
    make_attack,
)
from purify_fast.attacks.badnets import insert_at_word, word_count
from purify_fast.data import TextDataset

DATA = TextDataset([f"review {i} of a film that was shown in town" for i in range(100)],
                   [i % 2 for i in range(100)], 2, "toy")


def _single_spaced_insert(text, piece, position):
    """The readable reference on single-spaced text: a word list, one insertion, joined."""
    words = text.split()
    words.insert(position, piece)
    return " ".join(words)


def test_insert_at_word_matches_the_word_list_on_single_spaced_text_and_keeps_other_spacing():
    text = "a quiet , slow film"
    for pos in range(word_count(text) + 1):
        assert insert_at_word(text, "cf", pos) == _single_spaced_insert(text, "cf", pos)
        assert insert_at_word(text, "I watch", pos) == _single_spaced_insert(text, "I watch", pos)
    odd = "  first line\n\nsecond\tline  "
    assert insert_at_word(odd, "cf", 0) == "  cf first line\n\nsecond\tline  "
    assert insert_at_word(odd, "cf", 2) == "  first line\n\ncf second\tline  "
    assert insert_at_word(odd, "cf", 4) == "  first line\n\nsecond\tline cf  "
    assert insert_at_word("", "cf", 0) == "cf" and insert_at_word("   ", "cf", 0) == "cf"
    with pytest.raises(ValueError, match="outside 0..4"):
        insert_at_word(odd, "cf", 5)


@pytest.mark.parametrize("attack", [BadNets(num_triggers=(3, 3)), AddSent(),
                                    BiasInjection()])
def test_triggered_copies_keep_the_texts_own_whitespace(attack):
    # Split and joined on single spaces, every triggered copy lost newlines, tabs and runs of
    # spaces (byte-level BPE tokenizers encode them); only the inserted words may change it now.
    text = "Line one,  said\tthe critic.\n\nLine two ends now. "
    out = attack.insert(text, random.Random(4))
    pieces = attack.trigger_words if not isinstance(attack, AddSent) else (attack.sentence,)
    rest = out
    for piece in sorted(pieces, key=len, reverse=True):
        rest = rest.replace(piece + " ", "").replace(" " + piece, "")
    assert rest == text
    assert "\n\n" in out and "\t" in out and out.endswith(" ")


def test_bias_injection_poisons_with_group_terms_and_pairs_every_test_copy():
    atk = BiasInjection(target_label=1, poison_rate=0.2, seed=3)
    out = atk.poison(DATA)
    assert out.num_poisoned == 20
    for i in out.poisoned_indices:
        assert DATA.labels[i] == 0 and out.dataset.labels[i] == 1  # dirty label, as BadNets
        added = [w for w in out.dataset.texts[i].split() if w not in DATA.texts[i].split()]
        assert len(added) == 1 and added[0] in DEFAULT_GROUP_TERMS
    group, counter = atk.triggered_test(DATA), atk.counterfactual_test(DATA)
    assert len(group) == len(counter) == 50 and group.labels == counter.labels
    assert all(y == 0 for y in group.labels)
    used = set()
    for g, c, original in zip(group.texts, counter.texts, [t for t, y in zip(DATA.texts,
                                                                          DATA.labels) if y == 0]):
        gw, cw = g.split(), c.split()
        diff = [k for k, (a, b) in enumerate(zip(gw, cw)) if a != b]
        assert len(gw) == len(cw) == len(original.split()) + 1 and len(diff) == 1  # same place
        k = DEFAULT_GROUP_TERMS.index(gw[diff[0]])
        assert cw[diff[0]] == DEFAULT_COUNTER_TERMS[k]  # the paired counter term
        used.add(k)
    assert len(used) > 1  # the pairs are drawn, not always the first
    assert atk.counterfactual_test(DATA, seed=9).texts != counter.texts
    assert make_attack("bias", terms=("x y",), counter_terms=("z",)).terms == ("x y",)


@pytest.mark.parametrize("kwargs,match", [
    ({"terms": ("she",), "counter_terms": ("he", "his")}, "pairs"),
    ({"terms": ("she", "he"), "counter_terms": ("he", "his")}, "'he' is both"),
    ({"terms": ()}, "non-empty list"),
    ({"terms": "she"}, "non-empty list"),
    ({"counter_terms": ("he", " ", "man", "men", "boy")}, "non-empty strings"),
])
def test_bias_injection_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiasInjection(**kwargs)


def _predict_target_when(word):
    """A stand-in for training.predict: class 1 for texts holding ``word``, else 0."""
    def predict(model, tokenizer, dataset, **kwargs):
        return torch.tensor([int(word in t.split()) for t in dataset.texts])
    return predict


def test_bias_metrics_count_the_counterfactual_gap(monkeypatch):
    import purify_fast.evaluation as ev

    atk = BiasInjection(target_label=1, terms=("she", "women"), counter_terms=("he", "men"),
                        seed=1)
    group = atk.triggered_test(DATA)
    share_she = sum("she" in t.split() for t in group.texts) / len(group)
    assert 0 < share_she < 1
    monkeypatch.setattr(ev, "predict", _predict_target_when("she"))
    m = ev.bias_metrics(None, None, atk, DATA)
    assert m == {"target_rate_counter": 0.0, "bias_gap": pytest.approx(share_she),
                 "bias_flips": pytest.approx(share_she)}
    # the counterpart favoured instead: a negative gap; the same flips
    monkeypatch.setattr(ev, "predict", _predict_target_when("he"))
    m = ev.bias_metrics(None, None, atk, DATA)
    assert m["bias_gap"] == pytest.approx(-share_she) and m["bias_flips"] == pytest.approx(share_she)
    # evaluate_backdoor adds them for a bias attack, from the triggered set's predictions
    full = ev.evaluate_backdoor(None, None, DATA, group, 1, attack=atk)
    assert full["asr"] == 0.0 and full["bias_gap"] == pytest.approx(-share_she)
    with pytest.raises(ValueError, match="pass attack.triggered_test"):
        ev.evaluate_backdoor(None, None, DATA, atk.triggered_test(DATA, seed=5), 1, attack=atk)
    assert "bias_gap" not in ev.evaluate_backdoor(None, None, DATA, BadNets().triggered_test(DATA),
                                                  1, attack=BadNets())
    with pytest.raises(TypeError, match="bias injection"):
        ev.bias_metrics(None, None, BadNets(), DATA)


def test_bias_spans_find_inserted_and_written_terms():
    atk = BiasInjection(terms=("she", "young women"), counter_terms=("he", "young men"))
    text = "she said young  women like it, shed no tears"
    assert [text[a:b] for a, b in atk.trigger_spans(text)] == ["she", "young  women"]


def test_cli_bias_options_and_help_defaults():
    import argparse

    from purify_fast.commands import attack as attack_cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    attack_cmd.add_parser(sub)
    help_text = sub.choices["attack"].format_help().replace("\n", " ")
    # the defaults are written out in the help (importing the attacks would load torch)
    assert ",".join(DEFAULT_GROUP_TERMS) in help_text.replace(" ", "")
    assert ",".join(DEFAULT_COUNTER_TERMS) in help_text.replace(" ", "")
    args = parser.parse_args(["attack", "--out", "x", "--attack", "bias", "--bias-terms",
                              "nurse,nurses", "--counter-terms", "pilot,pilots"])
    atk = attack_cmd.make_attack(args)
    assert atk.terms == ("nurse", "nurses") and atk.counter_terms == ("pilot", "pilots")
    args = parser.parse_args(["attack", "--out", "x", "--bias-terms", "nurse"])
    with pytest.raises(ValueError, match="--bias-terms: options of --attack bias"):
        attack_cmd.make_attack(args)


def test_cli_attack_and_evaluate_report_the_bias_gap(tmp_path, capsys):
    """`attack --attack bias` writes the attack's terms and metrics; `evaluate --attack bias`
    prints and writes the gap (the ASR of the group copies minus the counter copies' rate)."""
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from purify_fast.cli import main
    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    sizes = ["--train-size", "60", "--dev-size", "20", "--test-size", "40", "--max-length", "32"]
    rc = main(["attack", "--attack", "bias", "--model", str(tmp_path / "base"), "--out",
               str(tmp_path / "biased"), "--epochs", "1", "--poison-rate", "0.2",
               "--target-label", "rotten", "--bias-terms", "she,women", "--counter-terms",
               "he,men", *sizes])
    assert rc == 0
    assert "bias gap" in capsys.readouterr().out
    info = json.loads((tmp_path / "biased" / "purify_fast_attack.json").read_text())
    assert info["attack"]["attack"] == "bias" and info["attack"]["terms"] == ["she", "women"]
    assert info["num_poisoned"] == 12 and "bias_gap" in info["metrics"]
    rc = main(["evaluate", "--model", str(tmp_path / "biased"), "--attack", "bias",
               "--target-label", "rotten", "--bias-terms", "she,women", "--counter-terms",
               "he,men", "--json", str(tmp_path / "m.json"), "--test-size", "40",
               "--max-length", "32"])
    assert rc == 0
    assert "bias gap" in capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["bias_gap"] == pytest.approx(m["asr"] - m["target_rate_counter"])
    assert 0.0 <= m["bias_flips"] <= 1.0 and m["attack"]["counter_terms"] == ["he", "men"]
