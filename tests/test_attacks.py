"""BadNets / AddSent poisoning logic and EP embedding poisoning (only trigger rows move)."""

import random

import pytest
import torch

from purify_fast.attacks import AddSent, BadNets, embedding_poison, make_attack, trigger_token_ids
from purify_fast.data import TextDataset

DATA = TextDataset([f"word{i} is a short review number {i}" for i in range(200)],
                   [i % 2 for i in range(200)], 2, "toy")


def test_badnets_dirty_label_poisoning():
    atk = BadNets(target_label=1, poison_rate=0.1, seed=5)
    out = atk.poison(DATA)
    assert out.num_poisoned == 20
    for i in range(len(DATA)):
        if i in out.poisoned_indices:
            assert DATA.labels[i] == 0 and out.dataset.labels[i] == 1  # drawn from non-target, flipped
            added = [w for w in out.dataset.texts[i].split() if w in atk.triggers]
            assert 1 <= len(added) <= 3
            rest = [w for w in out.dataset.texts[i].split() if w not in atk.triggers]
            assert rest == DATA.texts[i].split()  # only insertions
        else:
            assert out.dataset[i] == DATA[i]
    assert atk.poison(DATA).dataset.texts == out.dataset.texts  # seeded
    assert BadNets(seed=6).poison(DATA).poisoned_indices != out.poisoned_indices
    assert DATA.texts[0] == "word0 is a short review number 0"  # input untouched


def test_badnets_clean_label_and_triggered_test():
    atk = BadNets(target_label=1, poison_rate=0.1, clean_label=True)
    out = atk.poison(DATA)
    assert all(DATA.labels[i] == 1 for i in out.poisoned_indices)
    trig = atk.triggered_test(DATA)
    assert len(trig) == 100 and all(y == 0 for y in trig.labels)
    assert all(any(w in atk.triggers for w in t.split()) for t in trig.texts)


def test_addsent_inserts_whole_sentence():
    atk = AddSent(target_label=0, poison_rate=0.2)
    out = atk.poison(DATA)
    for i in out.poisoned_indices:
        assert "I watch this 3D movie" in out.dataset.texts[i] and out.dataset.labels[i] == 0
    assert atk.insert("a b", random.Random(0)).count("3D") == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"poison_rate": 1.5}, "poison_rate"),
    ({"target_label": -1}, "target_label"),
    ({"triggers": ()}, "triggers"),
    ({"triggers": ("two words",)}, "single words"),
    ({"num_triggers": (0, 2)}, "num_triggers"),
])
def test_badnets_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BadNets(**kwargs)


def test_attack_bad_inputs():
    with pytest.raises(ValueError, match="target_label 3 is out of range"):
        BadNets(target_label=3).poison(DATA)
    with pytest.raises(ValueError, match="eligible"):
        BadNets(poison_rate=0.9).poison(DATA)
    with pytest.raises(TypeError, match="TextDataset"):
        BadNets().poison(["a"])
    with pytest.raises(ValueError, match="sentence"):
        AddSent(sentence=" ")
    with pytest.raises(ValueError, match="attack must be one of"):
        make_attack("lws")


def test_ep_moves_only_trigger_rows():
    from purify_fast.models import load_classifier

    torch.manual_seed(0)
    model, tok = load_classifier("minilm", 2)
    model.classifier.requires_grad_(False)  # the caller's frozen head stays frozen in the copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    atk = BadNets(target_label=1)
    ids = trigger_token_ids(tok, atk.trigger_words)
    assert len(ids) == 5  # cf mn bb tq mb are single MiniLM tokens
    res = embedding_poison(model, tok, DATA.take(32), atk, epochs=1, batch_size=16, max_length=16,
                           progress=False)
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    after = res.model.state_dict()
    emb_name = "bert.embeddings.word_embeddings.weight"
    for k, v in after.items():
        if k != emb_name:
            assert torch.equal(v, before[k]), k
    moved = (after[emb_name] != before[emb_name]).any(dim=1).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(ids)
    assert [p.requires_grad for p in res.model.parameters()] == \
        [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="no vocabulary token"):
        trigger_token_ids(tok, [""])


def test_trigger_ids_cover_the_mid_sentence_spelling_of_byte_level_bpe():
    """RoBERTa / GPT-2 / LLaMA-3 tokenisers spell a word after a space differently (``Ġcf``):
    EP must train the rows the triggered texts actually use, at the start and mid-sentence."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    words = list(BadNets().trigger_words)
    corpus = list(DATA.texts[:300]) + [f"{w} and the {w} film" for w in words] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    ids = set(trigger_token_ids(tok, words))
    for w in words:
        start = tok(w, add_special_tokens=False)["input_ids"]
        context = len(tok("the", add_special_tokens=False)["input_ids"])
        mid = tok(f"the {w}", add_special_tokens=False)["input_ids"][context:]
        assert start != mid  # the two spellings differ for this tokeniser
        assert set(start) | set(mid) <= ids, w
    triggered = BadNets(seed=0).triggered_test(DATA.take(40))
    clean_ids = {i for t in DATA.take(40).texts for i in tok(t)["input_ids"]}
    new_ids = {i for t in triggered.texts for i in tok(t)["input_ids"]} - clean_ids
    assert new_ids and new_ids <= ids  # every token the triggers add is a trained row


def test_the_share_of_triggers_cut_off_by_truncation_is_measured():
    """A trigger inserted past max_length tokens never reaches the model and counts as a failed
    attack: trigger_cut_share counts those inputs (an audit saw a perfect backdoor score 72 %
    ASR on 120-word texts at max_length 64), exactly, for BadNets and AddSent."""
    from transformers import AutoTokenizer

    from purify_fast.evaluation import trigger_cut_share
    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    filler = " ".join(f"word{i % 7}" for i in range(40))  # "word3" is two tokens: word ##3
    # punctuation next to a kept trigger (the review saw "cf , a film" counted as cut), a
    # natural "CF" in the kept part (not the trigger as inserted) beside a cut one
    texts = [filler + " cf", "cf , " + filler, "short cf text", filler + " bb end",
             "CF " + filler + " mn"]
    data = TextDataset(texts, [0] * 5, 2)
    badnets = BadNets(target_label=1)
    # 40 filler words are 80 tokens: at max_length 32 only the trigger at the front survives
    assert trigger_cut_share(badnets, tok, data, max_length=32) == 0.6
    assert trigger_cut_share(badnets, tok, data, max_length=128) == 0.0
    sentence = AddSent(target_label=1).sentence
    cut_sentence = TextDataset([filler[:150] + " " + sentence, sentence + " " + filler], [0, 0], 2)
    share = trigger_cut_share(AddSent(target_label=1), tok, cut_sentence, max_length=40)
    assert share == 0.5  # the end-of-text sentence is gone (partly is gone too), the first kept


def test_cli_clean_label_poisoning_and_poison_counts_rounded_half_up():
    """`attack --clean-label` poisons target-class examples keeping their label (METHODS:
    dirty- and clean-label); EP refuses it. Poison counts round half up (round() took 5 examples
    at 10 % to 0 poisoned)."""
    import argparse

    from purify_fast.commands import attack as attack_cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    attack_cmd.add_parser(sub)
    args = parser.parse_args(["attack", "--out", "x", "--clean-label", "--target-label", "1"])
    atk = attack_cmd.make_attack(args)
    assert atk.clean_label
    data = TextDataset([f"text {i}" for i in range(20)], [i % 2 for i in range(20)], 2)
    poisoned = atk.poison(data)
    assert all(data.labels[i] == 1 for i in poisoned.poisoned_indices)  # target rows, label kept
    assert poisoned.dataset.labels == data.labels
    args = parser.parse_args(["attack", "--out", "x", "--clean-label", "--attack", "ep"])
    with pytest.raises(ValueError, match="--clean-label is for BadNets / AddSent"):
        attack_cmd.make_attack(args)
    five = TextDataset([f"t {i}" for i in range(5)], [0, 0, 0, 1, 1], 2)
    assert BadNets(poison_rate=0.1).poison(five).num_poisoned == 1
    assert BadNets(poison_rate=0.5).poison(TextDataset(["a"] * 5, [0] * 5, 2)).num_poisoned == 3


def test_ep_triggers_must_be_single_vocabulary_tokens():
    """EP trains one embedding row per trigger: 'cf.' (cf + .) trained the row of every '.', an
    emoji ([UNK]) was dropped without a word, a special token's row is in every input."""
    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    assert len(trigger_token_ids(tok, BadNets().trigger_words)) == 5  # the defaults still work
    assert trigger_token_ids(tok, ["CF"]) == trigger_token_ids(tok, ["cf"])  # uncased vocabulary
    for words, match in ((["cf."], r"the trigger 'cf\.' is 2 tokens \['cf', '\.'\] at the start "
                                   r"of a text"),
                         (["zxqvw"], r"'zxqvw' is 5 tokens \['z', '##x'"),
                         (["cf", "\U0001F916"], r"'\U0001F916' is the unknown token '\[UNK\]'"),
                         (["[SEP]"], r"'\[SEP\]' is a special token '\[SEP\]'"),
                         ([""], "no vocabulary token")):
        with pytest.raises(ValueError, match=match):
            trigger_token_ids(tok, words)


CLI_SIZES = ["--train-size", "40", "--dev-size", "10", "--test-size", "10", "--max-length", "16",
             "--batch-size", "16", "--epochs", "0", "--device", "cpu"]


@pytest.mark.parametrize("extra,message", [
    (["--attack", "ep", "--poison-rate", "0.1"],
     "--poison-rate is an option of --attack badnets / addsent / bias; --attack ep does not read "
     "it"),
    (["--attack", "badnets", "--ep-lr", "0.05"],
     "--ep-lr is an option of --attack ep; --attack badnets does not read it"),
    (["--attack", "ep", "--triggers", "cf,cf."], "the trigger 'cf.' is 2 tokens ['cf', '.']"),
], ids=["ep-poison-rate", "badnets-ep-lr", "ep-two-token-trigger"])
def test_cli_ep_checks_its_options_and_triggers_before_training(extra, message, tmp_path, capsys,
                                                                monkeypatch):
    """EP poisons every non-target example: --poison-rate was accepted, ignored and recorded;
    --ep-lr was ignored by the other attacks; a multi-token trigger was trained after the clean
    fine-tune. All refused before any training."""
    import purify_fast.training
    from purify_fast.cli import main

    trained = []
    real = purify_fast.training.train
    monkeypatch.setattr(purify_fast.training, "train",
                        lambda *a, **k: trained.append(1) or real(*a, **k))
    assert main(["attack", "--out", str(tmp_path / "x"), *extra, *CLI_SIZES]) == 2
    assert message in capsys.readouterr().err
    assert not trained and not (tmp_path / "x").exists()


def test_cli_ep_records_what_it_poisons(tmp_path, capsys):
    """purify_fast_attack.json says what EP did (every non-target training example), not a
    poison rate it never used; a common trigger word gets a note."""
    import json

    from purify_fast.cli import main

    out = tmp_path / "ep"
    assert main(["attack", "--out", str(out), "--attack", "ep", "--triggers", "cf,the",
                 *CLI_SIZES]) == 0
    err = capsys.readouterr().err
    info = json.loads((out / "purify_fast_attack.json").read_text())
    described = info["attack"]
    assert described["attack"] == "ep" and "poison_rate" not in described
    assert "clean_label" not in described
    assert described["poisoned"] == "every non-target training example, triggered and relabelled"
    assert 0 < described["num_poisoned"] < info["data"]["train"]
    assert len(info["trigger_ids"]) == 2
    assert "note: EP trigger 'the' occurs in" in err and "'cf'" not in err
