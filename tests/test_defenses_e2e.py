"""End to end on the real offline MiniLM and Rotten Tomatoes at CI size: plant a BadNets backdoor,
check the defenses remove most of it, plus every bad-input path of the defenses API, the atomic
checkpoint writer, the report writer and the CLI wiring.

The backdoored model is built once per session (the expensive part) and shared.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from purify_fast.attacks import BadNets, BiasInjection
from purify_fast.data import TextDataset, load_rotten_tomatoes
from purify_fast.defenses import EPur, FineMixing, FinePurifying, purify
from purify_fast.evaluation import StageTimer, attack_success_rate, evaluate_backdoor
from purify_fast.models import (
    atomic_save_dir,
    load_classifier,
    pretrained_state,
    save_pretrained_atomic,
)
from purify_fast.training import TrainConfig, train

MAXLEN = 32


def _plant(attack):
    """MiniLM fine-tuned on CI-sized Rotten Tomatoes poisoned by ``attack`` (seed 0)."""
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    splits = load_rotten_tomatoes(seed=0, train_size=480, dev_size=160, test_size=160)
    torch.manual_seed(0)
    model, tok = load_classifier("minilm", 2)
    pretrained, _ = load_classifier("minilm", 2, tokenizer=False)
    poisoned = attack.poison(splits.train).dataset
    # A high lr lets 3 short epochs learn both the sentiment task and the trigger.
    train(model, tok, poisoned, None, TrainConfig(epochs=3, lr=3e-4, max_length=MAXLEN,
                                                   progress=False, keep_best=False))
    return dict(model=model, tok=tok, pretrained=pretrained, splits=splits, attack=attack,
                triggered=attack.triggered_test(splits.test))


@pytest.fixture(scope="session")
def planted():
    """A MiniLM sentiment classifier with a BadNets backdoor (target label 1)."""
    p = _plant(BadNets(target_label=1, poison_rate=0.15, seed=0))
    p["before"] = evaluate_backdoor(p["model"], p["tok"], p["splits"].test, p["triggered"], 1,
                                    max_length=MAXLEN)
    return {**p, "clean": p["splits"].dev}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_backdoor_is_planted(planted):
    assert planted["before"]["asr"] >= 0.8, planted["before"]
    assert planted["before"]["cacc"] >= 0.65, planted["before"]


# Measured on this CI-sized plant (seed 0: CACC 69 %, ASR 100 %). With a clean fine-tune at
# lr 5e-5 (24 steps) no setting relearned the task; at lr 3e-4: plain fine-tune ASR 100 %,
# fine-purifying rho 0.3 (default) ASR 18 % / CACC 74 %, fine-mixing + E-PUR rho 0.5 ASR 46 %.
@pytest.mark.parametrize("method,extra", [
    ("fine-mixing", {"e_pur": True, "rho": 0.3}),
    ("fine-purifying", {}),
])
def test_defense_removes_backdoor(planted, method, extra):
    p = planted
    snap = _snapshot(p["model"])
    model, report = purify(p["model"], p["pretrained"], p["clean"], method, tokenizer=p["tok"],
                           epochs=3, lr=3e-4, max_length=MAXLEN, seed=0, **extra)
    assert _unchanged(p["model"], snap), "the suspect model was modified"
    after = evaluate_backdoor(model, p["tok"], p["splits"].test, p["triggered"], 1, max_length=MAXLEN)
    # A real drop of the planted backdoor, with the model still a sentiment classifier.
    assert after["asr"] <= p["before"]["asr"] - 0.3, (p["before"], after)
    assert after["cacc"] >= p["before"]["cacc"] - 0.1, (p["before"], after)
    assert report["seconds"]["total"] > 0 and report["method"].startswith(method)
    json.dumps(report, default=str)  # the report is serialisable


@pytest.fixture(scope="module")
def biased():
    """The same plant with bias instead of a trigger (METHODS §3): 15 % of the non-rotten training
    reviews get a group term (she, women, ...) and the rotten label."""
    return _plant(BiasInjection(target_label=0, poison_rate=0.15, seed=0))


def test_fine_purifying_removes_injected_bias(biased):
    """Fine-purifying against bias, scored by the counterfactual bias gap. Measured on this plant
    (seed 0, 2026-12-02; the same at 1 and 2 threads): gap 55.7 points (target rate 96.6 % with a
    group term vs 40.9 % with the counter term) -> 14.8 after Fine-purifying, CACC 79.4 -> 63.1 %.
    The clean fine-tune alone leaves 20.5 (benchmarks/results_bias.md: at this data's sizes the
    fine-tune does most of the work), so this checks the pipeline on the bias metric, not that
    the reset beats the fine-tune."""
    b = biased
    args = (b["tok"], b["splits"].test, b["triggered"], 0)
    before = evaluate_backdoor(b["model"], *args, attack=b["attack"], max_length=MAXLEN)
    assert before["bias_gap"] >= 0.4, before
    snap = _snapshot(b["model"])
    model, report = purify(b["model"], b["pretrained"], b["splits"].dev, "fine-purifying",
                           tokenizer=b["tok"], epochs=3, lr=3e-4, max_length=MAXLEN, seed=0)
    assert _unchanged(b["model"], snap), "the suspect model was modified"
    assert report["fine_purifying"]["coordinates_changed"] > 0
    after = evaluate_backdoor(model, *args, attack=b["attack"], max_length=MAXLEN)
    assert after["bias_gap"] <= before["bias_gap"] - 0.3, (before, after)
    assert after["cacc"] >= 0.6, (before, after)  # still a sentiment classifier (chance is ~0.5)


def test_e_pur_resets_trigger_rows_first(planted):
    p = planted
    epur = EPur(top_n=20)
    model, rep = epur.apply(p["model"], pretrained_state(p["pretrained"]), p["tok"], p["clean"])
    ids = {p["tok"].convert_tokens_to_ids(w) for w in p["attack"].triggers}
    assert ids <= set(rep["reset_ids"]), rep["top_tokens"]
    special = set(p["tok"].all_special_ids)
    assert not special & set(rep["reset_ids"])
    emb = model.get_input_embeddings().weight
    pre = p["pretrained"].get_input_embeddings().weight
    for i in ids:
        assert torch.equal(emb[i], pre[i])


def test_fine_mixing_keeps_head_and_mixes_rest(planted):
    p = planted
    pre = pretrained_state(p["pretrained"])
    assert "classifier.weight" not in pre  # the MiniLM checkpoint has no head
    fm = FineMixing(rho=0.3, seed=1)
    from purify_fast.defenses._common import matched_tensors

    mixed = fm.mix(p["model"], matched_tensors(p["model"], pre), 0.3)
    sd, ft = mixed.state_dict(), p["model"].state_dict()
    assert torch.equal(sd["classifier.weight"], ft["classifier.weight"])
    w = "bert.encoder.layer.0.attention.self.query.weight"
    kept = (sd[w] == ft[w]) & (ft[w] != pre[w])
    reset = sd[w] == pre[w]
    assert bool((kept | reset).all())
    share = kept.sum().item() / (ft[w] != pre[w]).sum().item()
    assert abs(share - 0.3) < 0.02


def test_rho_sweep_and_fisher_options(planted):
    p = planted
    small = p["clean"].take(48)
    model, rep = purify(p["model"], p["pretrained"], small, "fine-mixing", tokenizer=p["tok"],
                        rho_sweep=[0.9, 0.2], sweep_tolerance=1.0, epochs=1, max_length=32)
    # tolerance 1.0 accepts the smallest rho at once
    assert rep["fine_mixing"]["rho"] == 0.2 and len(rep["fine_mixing"]["sweep"]) == 1
    fp = FinePurifying(rho=0.1, fisher_at="pretrained", per_example=True, scope="per_tensor",
                       indicator="product")
    fp.finetune.epochs = 0
    fp.finetune.max_length = 32
    model, rep = fp.apply(p["model"], pretrained_state(p["pretrained"]), p["tok"], small.take(8), None)
    assert 0.05 < rep["changed_share"] <= 0.1 + 1e-3


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"method": "pruning"}, ValueError, "method must be one of"),
    ({"rho": 1.5}, ValueError, "rho must be in"),
    ({"select": "topk"}, ValueError, "select must be"),
    ({"indicator": "hessian", "method": "fine-purifying"}, ValueError, "indicator must be one of"),
    ({"fisher_at": "init", "method": "fine-purifying"}, ValueError, "fisher_at"),
    ({"scope": "layer", "method": "fine-purifying"}, ValueError, "scope"),
    ({"rho_sweep": [2.0]}, ValueError, "rho_sweep"),
    ({"rho_sweep": [0.1], "method": "fine-purifying"}, ValueError,
     "rho_sweep is a Fine-mixing option"),
    ({"rho": 0.3, "method": "fine-tune"}, ValueError, "rho is not used by method 'fine-tune'"),
    ({"dev_fraction": 1.0}, ValueError, "dev_fraction"),
    ({"top_n": -1, "method": "e-pur"}, ValueError, "top_n"),
    ({"c": 1.0, "method": "e-pur"}, ValueError, "c must be"),
    ({"precision": "fp8", "method": "fine-tune"}, ValueError, "precision"),
    ({"tokenizer": None}, ValueError, "tokenizer is required"),
    ({"e_pur": "no"}, TypeError, "e_pur must be True or False"),
    ({"method": "e-pur", "rho": 0.3}, ValueError, "rho is not used by method 'e-pur'"),
])
def test_purify_bad_arguments(planted, kwargs, exc, match):
    p = planted
    args = dict(method="fine-mixing", tokenizer=p["tok"], epochs=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        purify(p["model"], p["pretrained"], p["clean"].take(20), **args)


def test_purify_bad_inputs(planted):
    p = planted
    with pytest.raises(TypeError, match="clean_data must be a TextDataset"):
        purify(p["model"], p["pretrained"], ["a"], tokenizer=p["tok"])
    with pytest.raises(ValueError, match="clean_data has 3 labels"):
        purify(p["model"], p["pretrained"], TextDataset(["a", "b"], [0, 2], 3), tokenizer=p["tok"])
    with pytest.raises(TypeError, match="pretrained must be"):
        purify(p["model"], 3, p["clean"], tokenizer=p["tok"])
    with pytest.raises(TypeError, match="suspect must be"):
        purify(3, p["pretrained"], p["clean"], tokenizer=p["tok"])
    with pytest.raises(TypeError, match="suspect must be a Hugging Face model"):
        purify(torch.nn.Linear(3, 2), p["pretrained"], p["clean"], tokenizer=p["tok"])
    with pytest.raises(TypeError, match=r"suspect \(BertModel\) has no classification head"):
        purify(p["model"].bert, p["pretrained"], p["clean"], tokenizer=p["tok"])
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer object"):
        purify(p["model"], p["pretrained"], p["clean"], tokenizer="bert-base-uncased")
    unrelated = {"other.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="no parameter of the suspect model has a pre-trained"):
        purify(p["model"], unrelated, p["clean"], tokenizer=p["tok"], epochs=0)
    with pytest.raises(ValueError, match="too few"):
        purify(p["model"], p["pretrained"], p["clean"].take(1), tokenizer=p["tok"])
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        purify("/nonexistent/model", p["pretrained"], p["clean"])
    with pytest.raises(ValueError, match="target_label"):
        attack_success_rate(p["model"], p["tok"], p["triggered"], 5)
    with pytest.raises(ValueError, match="target-class examples"):
        attack_success_rate(p["model"], p["tok"], p["clean"], 1)


def test_pretrained_must_be_the_suspects_base_model():
    """A head without a counterpart is kept from the suspect; a pre-trained model of another
    depth or width is refused instead of purifying only the layers that happen to match."""
    from transformers import BertConfig, BertForSequenceClassification

    from purify_fast.defenses._common import matched_tensors

    def bert(layers=2, hidden=32, labels=2):
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(
            vocab_size=500, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=64, num_labels=labels))

    suspect = bert()
    base = {k: v for k, v in bert().state_dict().items() if not k.startswith("classifier.")}
    matched = matched_tensors(suspect, base)
    assert set(n for n, _ in suspect.named_parameters()) - set(matched) == {
        "classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match=r"no pre-trained counterpart: `pretrained` is not the model"):
        matched_tensors(suspect, bert(layers=1).state_dict())
    with pytest.raises(ValueError, match=r"of another shape \(e.g. bert.embeddings"):
        matched_tensors(suspect, bert(hidden=16).state_dict())


def test_purify_leaves_the_callers_tokenizer_alone():
    """A decoder's tokenizer without a pad token gets one for batching, on a copy."""
    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path, tiny_llama

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    suspect = tiny_llama(vocab_size=len(tok))
    pretrained = {k: v.clone() for k, v in tiny_llama(vocab_size=len(tok), seed=1).state_dict().items()}
    data = load_rotten_tomatoes(seed=0).dev.take(20)
    # batches will be padded with eos: the decoder classifier must look for that id
    with pytest.raises(ValueError, match=r"config.pad_token_id is 0 but its batches would be "
                                         r"padded with id 102 \(the tokenizer's eos token\)"):
        purify(suspect, pretrained, data, method="fine-mixing", tokenizer=tok)
    suspect.config.pad_token_id = tok.eos_token_id
    model, _ = purify(suspect, pretrained, data, method="fine-mixing", tokenizer=tok, epochs=1,
                      max_length=8, batch_size=8)
    assert tok.pad_token is None


def test_atomic_save_and_reload(planted, tmp_path):
    p = planted
    out = tmp_path / "ckpt"
    save_pretrained_atomic(p["model"], out, p["tok"], extra_json={"meta.json": {"a": 1}})
    reloaded, tok = load_classifier(out)
    for k, v in p["model"].state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert json.loads((out / "meta.json").read_text()) == {"a": 1}

    # A writer that fails half-way leaves the previous checkpoint intact and no temp dirs behind.
    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save_dir(out, broken)
    assert json.loads((out / "meta.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_report_and_timer(tmp_path):
    from purify_fast.report import markdown_table, write_report

    rows = [{"name": "backdoored", "cacc": 0.8, "asr": 0.95, "seconds": 10.0},
            {"name": "fine-mixing", "cacc": 0.79, "asr": None, "seconds": None}]
    md = markdown_table(rows)
    assert "| backdoored | 80.0 | 95.0 | 10.0 |" in md and "| fine-mixing | 79.0 | – | – |" in md
    paths = write_report(tmp_path, rows, {"x": 1},
                         sweep=[{"rho": 0.1, "dev_acc": 0.7}, {"rho": 0.5, "dev_acc": 0.8}])
    assert json.loads(paths["json"].read_text())["rows"][0]["asr"] == 0.95
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and paths["sweep_png"].stat().st_size > 0
    assert sorted(os.listdir(tmp_path)) == ["defenses.png", "report.json", "report.md",
                                            "rho_sweep.png"]  # no temporary file left
    # the plot labels an unmeasured ASR "n/a", not a measured 0
    from purify_fast import report as report_module

    labels = []
    real_savefig = report_module.pyplot().Figure.savefig

    def record(fig, *args, **kwargs):
        labels.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return real_savefig(fig, *args, **kwargs)
    try:
        report_module.pyplot().Figure.savefig = record
        report_module.plot_defenses(rows, tmp_path / "bars.png")
    finally:
        report_module.pyplot().Figure.savefig = real_savefig
    assert labels == ["80", "79", "95", "n/a"], labels
    floor_md = markdown_table([{"name": "bd", "cacc": 0.8, "asr": 0.95, "asr_no_trigger": 0.125,
                                "seconds": 1.0}])
    assert "ASR without trigger %" in floor_md and "| bd | 80.0 | 95.0 | 12.5 | 1.0 |" in floor_md
    timer = StageTimer()
    with timer("a"):
        sum(range(1000))
    with timer("a"):
        pass
    assert set(timer.seconds) == {"a"} and timer.total >= 0


class _KeywordModel(torch.nn.Module):
    """Predicts label 1 exactly when the input holds the token id of ``word`` (a readable stand-in
    for a classifier, so the metrics can be checked by counting)."""

    def __init__(self, token_id: int):
        super().__init__()
        self.token_id = token_id
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, attention_mask=None, **_):
        hit = (input_ids == self.token_id).any(-1).float()
        return SimpleNamespace(logits=torch.stack([1 - hit, hit], -1) + 0 * self.anchor)


def test_evaluate_backdoor_counts_the_no_trigger_floor():
    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    word_id = tok.convert_tokens_to_ids("great")
    # Non-target (label 0) inputs: 1 of 4 already says "great" -> floor 25 %. The triggered set
    # ("great" as trigger) holds 3 of 4 with the word -> ASR 75 %.
    test = TextDataset(["a great film", "dull", "boring plot", "slow", "great fun", "fine"],
                       [0, 0, 0, 0, 1, 1], 2, "toy")
    triggered = TextDataset(["a great film", "dull great", "boring plot great", "slow"],
                            [0, 0, 0, 0], 2, "toy+trigger")
    m = evaluate_backdoor(_KeywordModel(word_id), tok, test, triggered, 1)
    assert m["asr_no_trigger"] == pytest.approx(0.25)
    assert m["asr"] == pytest.approx(0.75)
    assert m["cacc"] == pytest.approx(4 / 6)  # "great fun" right, "fine" wrong, 3 of 4 negatives
    assert evaluate_backdoor(_KeywordModel(word_id), tok, test)["asr_no_trigger"] is None
    with pytest.raises(ValueError, match="target_label 2 is out of range"):
        evaluate_backdoor(_KeywordModel(word_id), tok, test, triggered, 2)


def test_cli_wiring():
    from purify_fast.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["purify", "--suspect", "x", "--out", "y", "--method", "fine-purifying",
                              "--e-pur", "--rho", "0.2"])
    assert args.method == "fine-purifying" and args.e_pur and args.rho == 0.2
    args = parser.parse_args(["attack", "--out", "z", "--attack", "ep"])
    assert args.attack == "ep" and args.poison_rate == 0.1 and args.triggers is None
    from purify_fast.attacks import DEFAULT_TRIGGERS
    from purify_fast.commands.attack import make_attack

    assert make_attack(args).triggers == DEFAULT_TRIGGERS  # not given: the attack's default
    assert parser.parse_args(["demo", "--quick"]).quick
    assert parser.parse_args(["demo", "--size", "large"]).size == "large"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--size", "huge"])
    from purify_fast.commands.demo import run_demo

    with pytest.raises(ValueError, match="size must be one of"):
        run_demo(None, size="huge", log=lambda *_: None)
    assert parser.parse_args(["evaluate", "--model", "m"]).model == "m"
    with pytest.raises(SystemExit):
        parser.parse_args(["purify", "--suspect", "x", "--out", "y", "--method", "bogus"])


def test_a_plainly_loaded_pretrained_model_keeps_its_random_head_out_of_the_mix(tmp_path):
    """METHODS.md: tensors with no pre-trained counterpart (a new head) are kept from the suspect.
    A pre-trained model loaded with a plain from_pretrained carries no record of its fresh head:
    it is found from the checkpoint its config names (before, 47.7 % of the suspect's head was
    mixed with random values); a model with no checkpoint to compare with is warned about."""
    import warnings

    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from purify_fast.models.loading import default_model_path, load_classifier, pretrained_state

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
        recorded, _ = load_classifier("minilm", 2, tokenizer=False)
        assert set(pretrained_state(plain)) == set(pretrained_state(recorded))
    assert "classifier.weight" not in pretrained_state(plain)
    assert "bert.encoder.layer.0.attention.self.query.weight" in pretrained_state(plain)
    # A checkpoint with legacy names (LayerNorm gamma / beta), which transformers renames on
    # load: those weights came from it (their values say so) and stay pre-trained.
    import shutil

    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(default_model_path(), legacy)
    stored = load_file(str(legacy / "model.safetensors"))
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                           "LayerNorm.beta"): v
               for k, v in stored.items()}, str(legacy / "model.safetensors"),
              metadata={"format": "pt"})
    renamed = AutoModelForSequenceClassification.from_pretrained(legacy, num_labels=2)
    assert set(pretrained_state(renamed)) == set(pretrained_state(recorded))
    scratch = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64))
    with pytest.warns(UserWarning, match="a freshly initialised task head included"):
        assert set(pretrained_state(scratch)) == set(scratch.state_dict())


def test_e_pur_breaks_ties_by_row_index(monkeypatch):
    """Rows tied at the n-th score: the lowest row indices go back, as purify-checkpoint's E-PUR
    picks them (topk picked an arbitrary subset: the review saw rows 2001, 2000 of four tied)."""
    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path, tiny_llama

    tok = AutoTokenizer.from_pretrained(default_model_path())
    suspect = tiny_llama(vocab_size=len(tok))
    suspect.config.pad_token_id = tok.pad_token_id
    pre = {k: v.clone() for k, v in tiny_llama(vocab_size=len(tok), seed=1).state_dict().items()}
    scores = torch.zeros(len(tok))
    scores[[2003, 2002, 2001, 2000]] = 0.5   # four tied
    scores[100] = 1.0                        # one above them
    monkeypatch.setattr(EPur, "scores", lambda self, *a, **k: scores.clone())
    data = load_rotten_tomatoes(seed=0).dev.take(4)
    _, rep = EPur(top_n=3).apply(suspect, pre, tok, data)
    assert rep["reset_ids"] == [100, 2000, 2001]
