"""purify(): what it validates up front, what it reports, and what it leaves alone (the caller's
flags and RNG streams), on a tiny random BERT with the offline MiniLM tokenizer (seconds)."""

import copy
import math
import random

import numpy as np
import pytest
import torch

from purify_fast.data import TextDataset
from purify_fast.defenses import purify
from purify_fast.defenses.e_pur import EPur

KW = dict(epochs=1, batch_size=8, max_length=16)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _bert(tok, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=2))


@pytest.fixture(scope="module")
def pair(tok):
    """(pre-trained state, suspect): the suspect is the pre-trained model plus noise."""
    pre = _bert(tok)
    sus = copy.deepcopy(pre)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sus.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.clone() for k, v in pre.state_dict().items()}, sus


def _data(n=20, name="clean"):
    pos, neg = ["good", "great", "fine", "nice", "superb"], ["bad", "awful", "poor", "dull", "weak"]
    texts = [f"a {(pos if i % 2 else neg)[i % 5]} movie {i}" for i in range(n)]
    return TextDataset(texts, [i % 2 for i in range(n)], 2, name)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_sweep_compares_with_the_suspects_dev_accuracy_after_e_pur(pair, tok, monkeypatch):
    """With e_pur=True the rho sweep's bar is the suspect's dev accuracy (METHODS §1.3), not that
    of E-PUR's output. E-PUR's output is made to predict class 0 everywhere here, the suspect
    class 1, on a dev set of 3 positives in 4: the bar must be 0.75, not 0.25."""
    pre, sus = pair
    sus = copy.deepcopy(sus)
    with torch.no_grad():
        sus.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))
    real_apply = EPur.apply

    def apply(self, *args, **kwargs):
        model, rep = real_apply(self, *args, **kwargs)
        with torch.no_grad():
            model.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
        return model, rep

    monkeypatch.setattr(EPur, "apply", apply)
    dev = TextDataset(["a good movie", "a great movie", "a nice movie", "a bad movie"],
                      [1, 1, 1, 0], 2, "dev")
    _, rep = purify(sus, pre, _data(), "fine-mixing", tokenizer=tok, dev_data=dev, e_pur=True,
                    top_n=5, rho_sweep=[0.5], sweep_tolerance=0.0, epochs=0, max_length=16)
    assert rep["suspect_dev_acc"] == pytest.approx(0.75)
    assert rep["fine_mixing"]["suspect_dev_acc"] == pytest.approx(0.75)


@pytest.mark.parametrize("method", ["fine-mixing", "fine-purifying", "fine-tune"])
def test_a_frozen_suspect_is_fine_tuned_as_a_whole_and_keeps_its_flags(pair, tok, method):
    """A suspect prepared for inference (requires_grad False everywhere) used to fail after mixing
    / the Fisher pass ("no parameter of the model requires grad"): purify's copy trains every
    parameter; the suspect's flags stay as they were, and the returned model carries them."""
    pre, sus = pair
    frozen = copy.deepcopy(sus).requires_grad_(False)
    model, _ = purify(frozen, pre, _data(), method, tokenizer=tok, lr=1e-3, **KW)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_a_partly_frozen_suspect_is_fine_tuned_everywhere(pair, tok):
    """Only the head trainable: the plain clean fine-tune used to move the head alone, silently."""
    pre, sus = pair
    part = copy.deepcopy(sus)
    for n, p in part.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    flags = {n: p.requires_grad for n, p in part.named_parameters()}
    model, _ = purify(part, pre, _data(), "fine-tune", tokenizer=tok, lr=1e-3, **KW)
    moved = {n for (n, a), b in zip(model.named_parameters(), part.parameters())
             if not torch.equal(a, b)}
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert "classifier.weight" in moved
    assert {n: p.requires_grad for n, p in part.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("bad", [None, "x", 1.0, math.nan])
def test_dev_fraction_is_checked_by_name(pair, tok, bad):
    pre, sus = pair
    with pytest.raises(ValueError, match=r"^dev_fraction must be in \[0, 1\), got "):
        purify(sus, pre, _data(), tokenizer=tok, dev_fraction=bad, **KW)


def test_an_empty_e_pur_corpus_is_refused_not_replaced_by_the_clean_set(pair, tok):
    pre, sus = pair
    empty = TextDataset([], [], 2, "empty")
    for method, extra in (("e-pur", {}), ("fine-mixing", {"e_pur": True})):
        with pytest.raises(ValueError, match="non-empty clean corpus"):
            purify(sus, pre, _data(), method, tokenizer=tok, corpus=empty, **extra)
    # a corpus given is what E-PUR counts; None means the clean set
    _, rep = purify(sus, pre, _data(), "e-pur", tokenizer=tok, corpus=_data(6, "mine"), top_n=3)
    assert rep["e_pur"]["corpus"] == {"name": "mine", "texts": 6}
    _, rep = purify(sus, pre, _data(), "e-pur", tokenizer=tok, top_n=3)
    assert rep["e_pur"]["corpus"]["name"] == "clean"


def test_the_report_holds_the_options_used(pair, tok):
    """Every method records the options it ran with, checked and normalised (lr given as a
    string is the float used), dev_fraction included."""
    pre, sus = pair
    _, rep = purify(sus, pre, _data(), "fine-tune", tokenizer=tok, lr="1e-4", epochs=1,
                    batch_size=4, seed=7, max_length=16, weight_decay=0.0, dev_fraction=0.25)
    opts = rep["options"]
    assert opts["lr"] == 1e-4 and isinstance(opts["lr"], float)
    assert {k: opts[k] for k in ("epochs", "batch_size", "seed", "max_length", "precision",
                                 "weight_decay", "dev_fraction")} == {
        "epochs": 1, "batch_size": 4, "seed": 7, "max_length": 16, "precision": "fp32",
        "weight_decay": 0.0, "dev_fraction": 0.25}
    _, rep = purify(sus, pre, _data(), "fine-mixing", tokenizer=tok, rho=0.4, select="magnitude",
                    e_pur=True, top_n=3, **KW)
    opts = rep["options"]
    assert (opts["rho"], opts["select"], opts["e_pur"], opts["top_n"], opts["dev_fraction"]) == (
        0.4, "magnitude", True, 3, 0.2)
    _, rep = purify(sus, pre, _data(), "e-pur", tokenizer=tok, score_threshold="0.5", c=10,
                    seed=3, max_length=16)
    opts = rep["options"]
    assert (opts["score_threshold"], opts["c"], opts["seed"], opts["corpus"]) == (
        0.5, 10.0, 3, "clean")
    assert "lr" not in opts  # E-PUR alone fine-tunes nothing
    _, rep = purify(sus, pre, _data(), "fine-purifying", tokenizer=tok, indicator="drift",
                    scope="per_tensor", epochs=0, max_length=16)
    opts = rep["options"]
    assert (opts["rho"], opts["indicator"], opts["scope"], opts["epochs"]) == (
        0.3, "drift", "per_tensor", 0)


def test_fine_purifying_measures_dev_accuracy_without_a_fine_tune(pair, tok):
    """epochs=0 with a dev set: the stage's dev_acc is measured, as Fine-mixing's is."""
    pre, sus = pair
    for method, key in (("fine-purifying", "fine_purifying"), ("fine-mixing", "fine_mixing")):
        _, rep = purify(sus, pre, _data(), method, tokenizer=tok, epochs=0, max_length=16)
        assert rep[key]["dev_acc"] is not None, method
        assert rep[key]["dev_acc"] == rep["dev_acc"], method


def test_product_rho_is_an_upper_bound_and_the_report_says_so(pair, tok):
    """Under 'product' a coordinate with zero Hessian (an embedding row no clean text uses)
    scores 0 and is never reset: rho 1.0 resets far less than everything. The report gives the
    share requested, the share changed and a note."""
    pre, sus = pair
    _, rep = purify(sus, pre, _data(), "fine-purifying", tokenizer=tok, rho=1.0,
                    indicator="product", epochs=0, max_length=16, dev_fraction=0)
    fp = rep["fine_purifying"]
    assert fp["requested_share"] == 1.0
    assert fp["changed_share"] < 0.5
    assert "upper bound" in fp["share_note"] and "Hessian" in fp["share_note"]


def test_purify_leaves_the_callers_global_rng_streams_alone(pair, tok):
    """purify seeds the global RNGs for its own determinism and puts them back: the caller's
    later draws are those it would have made without the call."""
    pre, sus = pair

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    for method in ("e-pur", "fine-tune"):
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        expected = draws()
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        kw = dict(top_n=3) if method == "e-pur" else KW
        purify(sus, pre, _data(), method, tokenizer=tok, **kw)
        assert draws() == expected, method


def test_purify_stays_deterministic_inside(pair, tok):
    pre, sus = pair
    outs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        model, _ = purify(sus, pre, _data(), "fine-mixing", tokenizer=tok, lr=1e-3, **KW)
        outs.append(_state(model))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_a_bad_weight_decay_is_refused_before_any_work(pair, tok, monkeypatch):
    pre, sus = pair
    import purify_fast.defenses.api as api

    def no_work(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(api, "_pretrained_state", no_work)
    for bad in (math.nan, -1.0):
        with pytest.raises(ValueError, match="^weight_decay must be a finite number >= 0"):
            purify(sus, pre, _data(), tokenizer=tok, weight_decay=bad, **KW)


def test_a_diverging_fine_tune_stops_instead_of_being_kept(pair, tok):
    """lr 1e8 turns the fine-tune NaN; NaN logits argmax to class 0, so such an epoch could win
    keep-best and come back as an 'improvement'. It stops with an error naming the epoch."""
    pre, sus = pair
    with pytest.raises(FloatingPointError, match=r"epoch 1.*lower lr"):
        purify(sus, pre, _data(), "fine-mixing", tokenizer=tok, lr=1e8, epochs=2, batch_size=4,
               max_length=16)


def test_fine_purifying_stores_its_checked_options_and_checks_per_example(pair, tok, monkeypatch):
    """The checked values are the ones used and reported: eps="1e-8" is 1e-8, a numpy int batch
    size an int (make_loader refused np.int64 after the model work began), and per_example is a
    flag: "no" is refused, not taken as True (which ran the per-example Fisher)."""
    from purify_fast.defenses.fine_purifying import FinePurifying

    fp = FinePurifying(eps="1e-8", fisher_batch_size=np.int64(4), per_example=np.bool_(False))
    assert (fp.eps, fp.fisher_batch_size, fp.per_example) == (1e-8, 4, False)
    assert [type(v) for v in (fp.eps, fp.fisher_batch_size, fp.per_example)] == [float, int, bool]
    pre, sus = pair
    _, rep = purify(sus, pre, _data(), "fine-purifying", tokenizer=tok, eps="1e-8",
                    fisher_batch_size=np.int64(4), per_example=np.bool_(False), epochs=0,
                    max_length=16)
    opts = rep["options"]
    assert (opts["eps"], opts["fisher_batch_size"], opts["per_example"]) == (1e-8, 4, False)
    assert [type(opts[k]) for k in ("eps", "fisher_batch_size", "per_example")] == [
        float, int, bool]
    assert rep["fine_purifying"]["options"]["eps"] == 1e-8
    import purify_fast.defenses.api as api

    def no_work(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(api, "_pretrained_state", no_work)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="^per_example must be True or False"):
            purify(sus, pre, _data(), "fine-purifying", tokenizer=tok, per_example=bad, **KW)


@pytest.mark.parametrize("c", [1 + 1e-9, 1e39])
def test_an_e_pur_c_the_kernels_cannot_take_is_refused_before_any_work(pair, tok, monkeypatch, c):
    """c is applied in float32: 1 + 1e-9 rounds to 1.0 there (log 0) and 1e39 to inf. The op
    refused them, but only after the model work began; the option check does it up front."""
    pre, sus = pair
    import purify_fast.defenses.api as api

    def no_work(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(api, "_pretrained_state", no_work)
    with pytest.raises(ValueError, match=r"^c must be a finite number > 1 .*in float32"):
        purify(sus, pre, _data(), "e-pur", tokenizer=tok, c=c, top_n=3, max_length=16)
    assert EPur(c=1 + 1e-6).c == 1 + 1e-6  # above 1 in float32 too: kept as given
