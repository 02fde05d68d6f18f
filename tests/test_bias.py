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


def _old_badnets_insert(attack, text, rng):
    """BadNets.insert as it was (split, insert, join on single spaces): the reference the
    whitespace-keeping insertion must equal on single-spaced text, draw for draw."""
    words = text.split()
    for _ in range(rng.randint(*attack.num_triggers)):
        words.insert(rng.randint(0, len(words)), rng.choice(attack.triggers))
    return " ".join(words)


def _old_addsent_insert(attack, text, rng):
    words = text.split()
    pos = rng.randint(0, len(words))
    return " ".join(words[:pos] + attack.sentence.split() + words[pos:])


@pytest.mark.parametrize("attack,old", [(BadNets(), _old_badnets_insert),
                                        (BadNets(num_triggers=(2, 4)), _old_badnets_insert),
                                        (AddSent(), _old_addsent_insert)])
def test_single_spaced_text_gets_the_very_copies_it_got_before(attack, old):
    # the poisoned and triggered sets (and the demo's numbers) stay what they were
    texts = ["", "one", "a short review", "the film , for all its flaws , is a joy to watch"]
    texts += [" ".join(f"w{j}" for j in range(i % 13)) for i in range(60)]
    new_rng, old_rng = random.Random(11), random.Random(11)
    for text in texts:
        assert attack.insert(text, new_rng) == old(attack, text, old_rng)
    data = TextDataset(texts, [i % 2 for i in range(len(texts))], 2)
    rng = random.Random(attack.seed + 1)
    want = [old(attack, t, rng) for t, y in zip(texts, data.labels) if y != attack.target_label]
    assert list(attack.triggered_test(data).texts) == want


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


def test_each_copy_of_a_pair_mentions_one_side_only():
    """A term the text already holds (any case, next to punctuation) is written as the copy's
    side, so the pair differs in the group words alone: otherwise a counter copy still naming
    the group (a review saw 27 of 577 on Rotten Tomatoes) scores the bias on both sides."""
    from purify_fast.attacks.bias import _term_pattern

    atk = BiasInjection(target_label=1, terms=("she", "her", "young women"),
                        counter_terms=("he", "his", "young men"), seed=2)
    texts = ["She said her film was fine", "he liked his seat, HE said", "young  women laughed",
             "shed herself of the hero's sheen"]
    data = TextDataset(texts, [0, 0, 0, 0], 2)
    group, counter = atk.triggered_test(data).texts, atk.counterfactual_test(data).texts
    group_words, counter_words = _term_pattern(atk.terms), _term_pattern(atk.counter_terms)
    for g, c in zip(group, counter):
        assert not counter_words.search(g) and not group_words.search(c), (g, c)
        assert group_words.search(g) and counter_words.search(c)
    assert group[0].startswith("She ") and counter[0].startswith("He ")  # the capital kept
    assert "her film was fine" in group[0] and "his film was fine" in counter[0]
    assert group[1].endswith("SHE said") and counter[1].endswith("HE said")  # all caps kept
    for copy in (group[3], counter[3]):  # "her" / "he" inside other words stay
        assert copy.split()[:2] == ["shed", "herself"] and copy.endswith("the hero's sheen")


def test_pairs_of_terms_of_different_lengths_line_up():
    """'girl' <-> 'little boy': written over before the insertion, the text's word count moved
    and the drawn position fell outside it (a review saw 'position 4 is outside 0..3') or inside
    another word pair; a phrase holding the other side's word ('gay man' / 'man') was rewritten
    twice. All caps stay all caps."""
    from purify_fast.attacks.bias import _term_pattern

    atk = BiasInjection(terms=("she", "girl"), counter_terms=("he", "little boy"), seed=5)
    data = TextDataset(["the little boy", "a little boy and a girl", "LITTLE BOY"] * 10,
                       [0] * 30, 2)
    group, counter = atk.triggered_test(data).texts, atk.counterfactual_test(data).texts
    for g, c in zip(group, counter):
        assert not _term_pattern(atk.counter_terms).search(g), g
        assert not _term_pattern(atk.terms).search(c), c
    assert atk.poison(TextDataset(["the little boy"] * 20, [0] * 20, 2)).num_poisoned == 2
    phrase = BiasInjection(terms=("gay man",), counter_terms=("man",))
    rng = random.Random(0)
    assert phrase.insert("a gay man walks in", rng).count("gay") == 2  # the text's + inserted
    caps = BiasInjection(terms=("she",), counter_terms=("he",))
    assert caps.insert_counter("SHE IS GREAT", random.Random(3)).startswith("HE ")


@pytest.mark.parametrize("kwargs,match", [
    ({"terms": ("she",), "counter_terms": ("he", "his")}, "pairs"),
    ({"terms": ("she", "he"), "counter_terms": ("he", "his")}, "'he' is given twice"),
    ({"terms": ("she", "She"), "counter_terms": ("he", "his")}, "'she' is given twice"),
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


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_bias_metrics_count_the_counterfactual_gap(monkeypatch, tok):
    import purify_fast.evaluation as ev

    atk = BiasInjection(target_label=1, terms=("she", "women"), counter_terms=("he", "men"),
                        seed=1)
    group = atk.triggered_test(DATA)
    share_she = sum("she" in t.split() for t in group.texts) / len(group)
    assert 0 < share_she < 1
    monkeypatch.setattr(ev, "predict", _predict_target_when("she"))
    m = ev.bias_metrics(None, tok, atk, DATA)
    assert m == {"target_rate_counter": 0.0, "bias_gap": pytest.approx(share_she),
                 "bias_flips": pytest.approx(share_she), "trigger_cut": 0.0}
    # the counterpart favoured instead: a negative gap; the same flips
    monkeypatch.setattr(ev, "predict", _predict_target_when("he"))
    m = ev.bias_metrics(None, tok, atk, DATA)
    assert m["bias_gap"] == pytest.approx(-share_she) and m["bias_flips"] == pytest.approx(share_she)
    # evaluate_backdoor adds them for a bias attack, from the triggered set's predictions
    full = ev.evaluate_backdoor(None, tok, DATA, group, 1, attack=atk)
    assert full["asr"] == 0.0 and full["bias_gap"] == pytest.approx(-share_she)
    with pytest.raises(ValueError, match="pass attack.triggered_test"):
        ev.evaluate_backdoor(None, tok, DATA, atk.triggered_test(DATA, seed=5), 1, attack=atk)
    # another target label than the attack's: named as such (the set's own check blamed the set)
    with pytest.raises(ValueError, match="target_label 0 is not the bias injection's target "
                                         "label 1"):
        ev.evaluate_backdoor(None, tok, DATA, group, 0, attack=atk)
    assert "bias_gap" not in ev.evaluate_backdoor(None, tok, DATA, BadNets().triggered_test(DATA),
                                                  1, attack=BadNets())
    # without a triggered set no bias metric is computed: any target label's no-trigger rate
    no_set = ev.evaluate_backdoor(None, tok, DATA, None, 0, attack=atk)
    assert no_set["asr"] is None and "bias_gap" not in no_set
    assert no_set["asr_no_trigger"] == ev.evaluate_backdoor(None, tok, DATA, None, 0)[
        "asr_no_trigger"]
    with pytest.raises(TypeError, match="bias injection"):
        ev.bias_metrics(None, tok, BadNets(), DATA)


def test_pairs_that_truncation_makes_one_input_are_counted_as_cut(monkeypatch, tok):
    """A pair whose differing words all fall past max_length tokens is one input to the model
    and adds nothing to the gap: trigger_cut counts those pairs (the span test of the other
    attacks took a group word the text already had, before the cut, as the trigger seen)."""
    import purify_fast.evaluation as ev

    monkeypatch.setattr(ev, "predict", _predict_target_when("she"))
    atk = BiasInjection(target_label=1, terms=("she",), counter_terms=("he",), seed=0)
    long = " ".join(["word"] * 40)
    data = TextDataset(["she liked it " + long, long, "short one"], [0, 0, 0], 2)
    pairs = list(zip(atk.triggered_test(data).texts, atk.counterfactual_test(data).texts))
    seen = [tok(list(p), truncation=True, max_length=8)["input_ids"] for p in pairs]
    want = sum(a == b for a, b in seen) / 3
    m = ev.bias_metrics(None, tok, atk, data, max_length=8)
    assert m["trigger_cut"] == pytest.approx(want)
    assert ev.bias_metrics(None, tok, atk, data, max_length=512)["trigger_cut"] == 0.0
    # the first pair differs in its leading she / he, whatever is cut after it: never cut
    assert seen[0][0] != seen[0][1]


def test_bias_spans_find_inserted_and_written_terms():
    atk = BiasInjection(terms=("she", "young women"), counter_terms=("he", "young men"))
    text = "she said Young  women like it, shed no tears, and She."
    assert [text[a:b] for a, b in atk.trigger_spans(text)] == ["she", "Young  women", "She"]


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
    # an option of another attack would be ignored: refused, either way round
    for argv, match in ((["--bias-terms", "nurse"], "--bias-terms is an option of --attack bias"),
                        (["--attack", "bias", "--triggers", "zz"],
                         "--triggers is an option of --attack badnets / ep"),
                        (["--attack", "bias", "--sentence", "a b"],
                         "--sentence is an option of --attack addsent"),
                        (["--attack", "addsent", "--triggers", "zz"], "--triggers is an option"),
                        (["--attack", "bias", "--bias-terms", ""], "non-empty list"),
                        (["--triggers", ","], "triggers must be a non-empty list")):
        with pytest.raises(ValueError, match=match):
            attack_cmd.make_attack(parser.parse_args(["attack", "--out", "x", *argv]))


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
    # a trigger option of another attack is refused before the model loads
    assert main(["evaluate", "--model", str(tmp_path / "no-such-model"), "--attack", "addsent",
                 "--triggers", "cf"]) == 2
    assert "--triggers is an option of --attack badnets / ep" in capsys.readouterr().err
    # train-clean plants it too (MuScleLoRA trained on biased data) and scores the gap
    rc = main(["train-clean", "--attack", "bias", "--model", str(tmp_path / "base"), "--data",
               "rotten-tomatoes", "--train-size", "40", "--dev-size", "24", "--test-size", "20",
               "--epochs", "1", "--ref-pool-size", "8", "--max-length", "32", "--no-progress",
               "--out", str(tmp_path / "clean")])
    assert rc == 0
    assert "bias gap" in capsys.readouterr().out
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert report["eval"]["bias_gap"] == pytest.approx(report["eval"]["asr"]
                                                       - report["eval"]["target_rate_counter"])
