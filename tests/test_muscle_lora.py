"""MuScleLoRA: the MSLR module (merge/unmerge), injection into BERT / RoBERTa / LLaMA, the
gradient-alignment math, and an end-to-end planted-backdoor run on the offline MiniLM."""

import math

import pytest
import torch
from conftest import caller_draws, fake_launch, seed_caller
from torch import nn

from purify_fast.defenses.muscle_lora import (
    MuscleLoRATrainConfig,
    align_gradients,
    raw_grad_ratio,
    split_reference_pool,
    train_muscle_lora,
)
from purify_fast.nn import (
    MSLRClassificationHead,
    MultiScaleLoRALinear,
    MuscleLoRAConfig,
    inject_muscle_lora,
    merge_muscle_lora,
)

# --------------------------------------------------------------------------- module


@pytest.mark.parametrize("mode", ["radial", "fft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_exact(mode, dtype):
    torch.manual_seed(0)
    base = nn.Linear(48, 20).to(dtype)
    w0 = base.weight.detach().clone()
    layer = MultiScaleLoRALinear(base, scales=[1, 4, 8], r_in=2, alpha=6.0, mode=mode)
    assert not base.weight.requires_grad and layer.lora_l.requires_grad
    x = torch.randn(7, 48).to(dtype)
    with torch.no_grad():
        y_unmerged = layer(x)
        layer.merge()
        y_merged = layer(x)
        layer.merge()  # idempotent
        layer.unmerge()
        y_back = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale = y_unmerged.float().abs().max().item()
    assert (y_merged.float() - y_unmerged.float()).abs().max().item() <= tol * scale
    assert torch.equal(base.weight, w0), "unmerge must restore the base weight bit for bit"
    assert torch.equal(y_back, y_unmerged)
    # Not a no-op: the update is non-zero from init (L and R both Kaiming-uniform).
    assert (y_unmerged.float() - base(x).float()).abs().max() > 1e-3
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear)
    torch.testing.assert_close(lin(x).float(), y_merged.float(), rtol=0, atol=tol * scale)


def test_training_a_merged_layer_warns_once():
    """Merged, L and R are outside the forward: a training step would update nothing, so the
    layer says so (once), and stays quiet under no_grad or with frozen factors."""
    import warnings

    torch.manual_seed(0)
    layer = MultiScaleLoRALinear(nn.Linear(6, 4), scales=[1, 2])
    layer.merge()
    x = torch.randn(3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            layer(x)
    with pytest.warns(RuntimeWarning, match="call unmerge\\(\\) before training"):
        y = layer(x)
    assert not y.requires_grad  # the base is frozen: nothing at all would train
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer
        quiet = MultiScaleLoRALinear(nn.Linear(6, 4), scales=[1, 2])
        quiet.merge()
        quiet.requires_grad_(False)
        quiet(x)


def test_merged_state_survives_state_dict_round_trips():
    """A merged layer's state loaded into a fresh (unmerged) layer is not updated twice, an
    unmerged state loaded into a merged layer drops the old merge, and unmerge() after loading a
    merged state gives W0 back to rounding."""
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    a = MultiScaleLoRALinear(nn.Linear(12, 7), scales=[1, 2], mode="fft")
    w0 = a.base.weight.detach().clone()
    with torch.no_grad():
        want = a(x)
        a.merge()
        merged_state = {k: v.clone() for k, v in a.state_dict().items()}
        b = MultiScaleLoRALinear(nn.Linear(12, 7), scales=[1, 2], mode="fft")
        b.load_state_dict(merged_state)
        assert b.merged
        torch.testing.assert_close(b(x), want, rtol=1e-5, atol=1e-5)
        b.unmerge()
        torch.testing.assert_close(b.base.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(b(x), want, rtol=1e-5, atol=1e-5)
        c = MultiScaleLoRALinear(nn.Linear(12, 7), scales=[1, 2], mode="fft")
        c.merge()
        c.load_state_dict(b.state_dict())  # b is unmerged again
        assert not c.merged
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5)
        c.unmerge()  # a no-op: the earlier merge's W0 must not come back
        torch.testing.assert_close(c.base.weight, w0, rtol=0, atol=1e-6)
        # adapters only (strict=False) into a merged layer: it stays merged, no double update
        a.load_state_dict({"lora_l": a.lora_l.detach().clone(),
                           "lora_r": a.lora_r.detach().clone()}, strict=False)
        assert a.merged
        torch.testing.assert_close(a(x), want, rtol=1e-5, atol=1e-5)


def test_train_clean_refuses_what_cannot_train_before_any_work():
    from purify_fast.data import TextDataset
    from purify_fast.defenses.muscle_lora import train_clean
    from purify_fast.models import load_classifier
    from purify_fast.models.loading import tiny_llama

    model, tok = load_classifier("minilm", 2, tokenizer=True)
    three = TextDataset(["a", "b", "c"], [0, 1, 2], 3)
    two = TextDataset(["a", "b"], [0, 1], 2)
    with pytest.raises(ValueError, match="train_data has 3 labels but the model has 2"):
        train_clean(model, tok, three, three)
    with pytest.raises(TypeError, match="dev_data must be a TextDataset"):
        train_clean(model, tok, two, [("a", 0)])
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens but model's embedding has 512"):
        train_clean(tiny_llama(), tok, two, two)
    with pytest.raises(TypeError, match=r"model \(BertModel\) has no classification head"):
        train_clean(model.bert, tok, two, two)


def test_module_gradients_reach_only_adapters():
    torch.manual_seed(0)
    layer = MultiScaleLoRALinear(nn.Linear(16, 8), scales=[1, 2], mode="fft")
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_l.grad is not None and layer.lora_r.grad is not None
    assert layer.base.weight.grad is None


def test_module_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        MultiScaleLoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="scales is empty"):
        MultiScaleLoRALinear(nn.Linear(4, 4), scales=[])
    with pytest.raises(ValueError, match="positive"):
        MultiScaleLoRALinear(nn.Linear(4, 4), scales=[1, 0])
    with pytest.raises(ValueError, match="mode"):
        MultiScaleLoRALinear(nn.Linear(4, 4), mode="dct")
    with pytest.raises(TypeError, match="got the string '124'"):
        MultiScaleLoRALinear(nn.Linear(4, 4), scales="124")


# --------------------------------------------------------------------------- injection

def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _check_injected(model, inputs, mslr_path):
    mslr = model.get_submodule(mslr_path)
    assert isinstance(mslr, MultiScaleLoRALinear)
    names = _trainable(model)
    assert names, "nothing trainable"
    assert all(("lora_A" in n or "lora_B" in n or n.endswith(("lora_l", "lora_r"))) for n in names)
    assert any("lora_A" in n for n in names) and f"{mslr_path}.lora_l" in names
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    # Training signal reaches the attention LoRA and the MSLR factors.
    model.train()
    model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names
               and ("lora_B" in n or "lora_l" in n or "lora_r" in n))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    model.zero_grad()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # peft starts B at zero: make the merge test non-trivial
    model.eval()
    with torch.no_grad():
        unmerged = model(**inputs).logits
    merge_muscle_lora(model)
    with torch.no_grad():
        merged = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, MultiScaleLoRALinear) for m in model.modules())
    assert not any("lora" in n for n, _ in model.named_parameters())
    return before


def test_inject_bert_minilm():
    from purify_fast.models import load_classifier

    model, tok = load_classifier("minilm", 2)
    inputs = tok(["a fine film", "dull and slow"], padding=True, return_tensors="pt")
    inject_muscle_lora(model)
    mslr = model.bert.pooler.dense
    assert mslr.scales == (1.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0) and mslr.alpha == 6.0
    assert model.bert.encoder.layer[0].attention.self.query.r["default"] == 8
    keys = set(load_classifier("minilm", 2, tokenizer=False)[0].state_dict())
    _check_injected(model, inputs, "bert.pooler.dense")
    assert set(model.state_dict()) == keys, "merged model must have the original parameter names"


def test_inject_roberta_random_init():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, max_position_embeddings=64)
    model = RobertaForSequenceClassification(cfg)
    inject_muscle_lora(model, MuscleLoRAConfig(mode="fft"))
    assert model.classifier.dense.scales == (1.0, 2.0, 4.0, 8.0, 16.0)
    ids = torch.randint(3, 120, (2, 9))
    _check_injected(model, {"input_ids": ids}, "classifier.dense")


def test_inject_tiny_llama_head_and_save_roundtrip(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from purify_fast.models import tiny_llama

    model = tiny_llama(num_labels=3)
    inject_muscle_lora(model)
    assert isinstance(model.score, MSLRClassificationHead)
    assert model.score.dense.out_features == 16 and model.score.dense.alpha == 4.0
    assert model.score.dense.scales == (1.0, 2.0, 3.0, 4.0)
    assert model.model.layers[0].self_attn.q_proj.r["default"] == 2
    assert not model.score.out_proj.weight.requires_grad  # classifier head frozen
    ids = torch.randint(3, 500, (2, 7))
    _check_injected(model, {"input_ids": ids}, "score.dense")
    assert isinstance(model.score, nn.Linear) and model.score.weight.shape == (3, 64)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_merged_model_keeps_no_adapter_config_and_takes_a_new_injection_quietly():
    """merge_muscle_lora folds every peft LoRA layer; peft's config of them went too (left in
    place, the next injection warned of "multiple adapters" in the model)."""
    import warnings

    from purify_fast.models import tiny_llama

    model = tiny_llama()
    merge_muscle_lora(inject_muscle_lora(model))
    assert not hasattr(model, "peft_config") and not hasattr(model, "muscle_lora_config")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_muscle_lora(model)
    assert model.model.layers[0].self_attn.q_proj.r["default"] == 2


def test_inject_rejects_unknown_models_and_double_injection():
    with pytest.raises(ValueError, match="supports BERT"):
        inject_muscle_lora(nn.Sequential(nn.Linear(2, 2)))
    from purify_fast.models import tiny_llama

    model = tiny_llama()
    inject_muscle_lora(model, MuscleLoRAConfig(use_lora=False))
    with pytest.raises(ValueError, match="inject once"):
        inject_muscle_lora(model, MuscleLoRAConfig(use_lora=False))


# --------------------------------------------------------------------------- GA math

def test_align_gradients_math():
    g = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, -1.0]])]
    gc = [torch.tensor([1.0, 0.0]), torch.tensor([[-2.0, 0.0]])]
    upd, pure = align_gradients(g, gc, ref_loss=0.9, mu=0.05)
    # |<g,gc>|/|gc|^2 * gc: tensor 1: 3/1*[1,0]; tensor 2: |-2|/4*[-2,0] = [-1, 0].
    torch.testing.assert_close(upd[0], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(upd[1], torch.tensor([[-1.0, 0.0]]))
    assert pure == [True, True]
    # Low reference loss: blend (1-mu)·g_a + mu·g.
    upd, pure = align_gradients(g, gc, ref_loss=0.1, mu=0.1)
    torch.testing.assert_close(upd[0], 0.9 * torch.tensor([3.0, 0.0]) + 0.1 * g[0])
    assert pure == [False, False]
    # Tiny reference-gradient norm: blend too, per tensor.
    gc_small = [torch.tensor([1e-8, 0.0]), gc[1]]
    upd, pure = align_gradients(g, gc_small, ref_loss=0.9, mu=0.1)
    assert pure == [False, True]
    torch.testing.assert_close(upd[0], 0.9 * torch.tensor([3.0, 0.0]) + 0.1 * g[0])
    # The aligned update never points against the reference gradient.
    torch.manual_seed(0)
    for _ in range(20):
        a, c = torch.randn(50), torch.randn(50)
        (u,), _ = align_gradients([a], [c], 1.0, 0.0)
        assert float(u @ c) >= 0
        assert math.isclose(float(u.norm()), abs(float(a @ c)) / float(c.norm()), rel_tol=1e-4)
    zero, _ = align_gradients([torch.ones(3)], [torch.zeros(3)], 1.0, 0.0)
    assert torch.equal(zero[0], torch.zeros(3))
    with pytest.raises(ValueError, match="reference"):
        align_gradients([torch.ones(2)], [], 1.0, 0.0)


def test_raw_grad_ratio_schedule_and_pool_split():
    assert [raw_grad_ratio(e, 4, 0.1) for e in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    with pytest.raises(ValueError):
        raw_grad_ratio(4, 4)
    from purify_fast.data import TextDataset

    dev = TextDataset([f"t{i}" for i in range(40)], [i % 2 for i in range(40)], 2, "dev")
    pool, rest = split_reference_pool(dev, 16, seed=0)
    assert len(pool) == 16 and len(rest) == 24
    assert set(pool.texts).isdisjoint(rest.texts) and pool.label_counts() == [8, 8]
    with pytest.raises(ValueError, match="reference pool"):
        split_reference_pool(dev, 40)
    with pytest.raises(ValueError, match="lr"):
        MuscleLoRATrainConfig(lr=-1)


def test_train_config_keeps_its_checked_values():
    """The checks passed a string lr or a numpy batch size through unconverted, and took
    keep_best="no" / gradient_alignment="no" (truthy) or eval_batch_size=0 without a word."""
    import numpy as np

    cfg = MuscleLoRATrainConfig(lr="2e-3", batch_size=np.int64(4), seed=np.uint8(3),
                                gradient_alignment=np.bool_(False), loss_threshold=1)
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.gradient_alignment) == (2e-3, 4, 3, False)
    assert [type(v) for v in (cfg.lr, cfg.batch_size, cfg.seed, cfg.gradient_alignment,
                              cfg.loss_threshold)] == [float, int, int, bool, float]
    for name in ("keep_best", "progress", "gradient_alignment"):
        with pytest.raises(TypeError, match=name):
            MuscleLoRATrainConfig(**{name: "no"})
    with pytest.raises(ValueError, match="eval_batch_size"):
        MuscleLoRATrainConfig(eval_batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        MuscleLoRATrainConfig(seed=-1)


class _CharTok:  # a deterministic stand-in tokenizer over a tiny LLaMA's vocabulary
    pad_token, eos_token = "<pad>", "<eos>"

    def __call__(self, texts, padding=True, truncation=True, max_length=16, return_tensors="pt"):
        ids = [[3 + (ord(c) % 400) for c in t[:max_length]] for t in texts]
        n = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


def test_ga_training_step_uses_aligned_gradient_on_tiny_llama():
    """One GA epoch on a tiny random LLaMA: the LLaMA path end to end, and the per-step counters
    show the aligned gradient was used."""
    from purify_fast.data import TextDataset
    from purify_fast.models import tiny_llama

    texts = [("good " if i % 2 else "bad ") + "x" * (i % 5) for i in range(64)]
    data = TextDataset(texts, [i % 2 for i in range(64)], 2, "toy")
    model = tiny_llama(num_labels=2)
    inject_muscle_lora(model)
    res = train_muscle_lora(model, _CharTok(), data, data, epochs=1, lr=1e-3, batch_size=16,
                            ref_pool_size=16, progress=False)
    assert res.ga_steps + res.blended_steps == 4
    assert len(res.history) == 2 and res.history[1]["ref_loss"] is not None
    merged = merge_muscle_lora(model)
    assert isinstance(merged.score, nn.Linear)


def test_a_failed_training_gives_the_model_back_in_its_mode_and_releases_the_stage(monkeypatch):
    """As train(): a forward that raises midway left the caller's eval-mode model training and
    skipped release_stage (accelerate's autocast patch stayed on its forward); both are undone
    on every exit path, and a finished run releases the stage once, in eval mode."""
    import purify_fast.defenses.muscle_lora as muscle_module
    from purify_fast.data import TextDataset
    from purify_fast.models import tiny_llama

    released = fake_launch(monkeypatch, muscle_module)
    data = TextDataset([("good " if i % 2 else "bad ") + "x" * (i % 5) for i in range(32)],
                       [i % 2 for i in range(32)], 2, "toy")
    kw = dict(epochs=1, lr=1e-3, batch_size=8, ref_pool_size=8, progress=False)
    model = tiny_llama(num_labels=2)
    inject_muscle_lora(model)
    model.eval()
    real_forward = model.forward

    def interrupted(*args, **kwargs):
        if model.training:  # the first training step (the dev pass before it runs in eval)
            raise KeyboardInterrupt("stop")
        return real_forward(*args, **kwargs)

    model.forward = interrupted
    with pytest.raises(KeyboardInterrupt, match="stop"):
        train_muscle_lora(model, _CharTok(), data, data, **kw)
    assert not model.training  # its own mode, not left training
    assert released == [(model, False)]
    model.forward = real_forward
    model.train()
    released.clear()
    train_muscle_lora(model, _CharTok(), data, data, **kw)
    assert not model.training and released == [(model, False)]


def test_a_failed_train_clean_takes_the_adapters_out_again(monkeypatch):
    """train_clean injects the adapters into the caller's model in place; a run stopped in
    training (Ctrl-C here) left them in (and every other parameter frozen), so the retry was
    refused ("inject once"). The model comes back as passed, and the retry trains."""
    import purify_fast.defenses.muscle_lora as muscle_module
    from purify_fast.data import TextDataset
    from purify_fast.defenses.muscle_lora import train_clean
    from purify_fast.models import tiny_llama

    data = TextDataset([("good " if i % 2 else "bad ") + "x" * (i % 5) for i in range(32)],
                       [i % 2 for i in range(32)], 2, "toy")
    model = tiny_llama(num_labels=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    real_train = muscle_module.train_muscle_lora

    def stopped(model, *args, **kwargs):
        assert hasattr(model, "muscle_lora_config")  # injected by now
        raise KeyboardInterrupt("stop")

    monkeypatch.setattr(muscle_module, "train_muscle_lora", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_clean(model, _CharTok(), data, data, epochs=1, batch_size=8, ref_pool_size=8,
                    progress=False)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(k) is m for k, m in modules.items() if k)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "muscle_lora_config") and not hasattr(model, "peft_config")
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    monkeypatch.setattr(muscle_module, "train_muscle_lora", real_train)
    merged = train_clean(model, _CharTok(), data, data, epochs=1, batch_size=8, ref_pool_size=8,
                         progress=False)
    assert isinstance(merged.score, nn.Linear)

    # with train_head the caller's own head trains in place: a failed run puts it back too
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2))
    state = {k: v.clone() for k, v in bert.state_dict().items()}

    def half_trained(model, *args, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)  # a step of training, on the adapters and the head
        raise KeyboardInterrupt("stop")

    monkeypatch.setattr(muscle_module, "train_muscle_lora", half_trained)
    with pytest.raises(KeyboardInterrupt):
        train_clean(bert, _CharTok(), data, data, inject=MuscleLoRAConfig(train_head=True),
                    epochs=1, batch_size=8, ref_pool_size=8, progress=False)
    after = bert.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


# --------------------------------------------------------------------------- CLI

def test_cli_train_clean_writes_loadable_merged_model(tmp_path, capsys):
    import json
    import warnings

    from transformers import AutoModelForSequenceClassification

    from purify_fast.cli import main

    out = tmp_path / "clean"
    shown = warnings.showwarning
    rc = main(["train-clean", "--method", "muscle-lora", "--data", "rotten-tomatoes",
               "--model", "minilm", "--out", str(out), "--train-size", "32", "--dev-size", "40",
               "--test-size", "16", "--ref-pool-size", "16", "--epochs", "1", "--lr", "1e-3",
               "--max-length", "16", "--batch-size", "16", "--attack", "badnets",
               "--scaling", "fft", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ablation"] == "muscle-lora" and report["config"]["inject"]["mode"] == "fft"
    assert report["tanh_saturation"] > 0.5  # METHODS' α 6 on MiniLM's pooler
    # ... which the command says in one line, as its notes and errors, without Python's
    # file / line / source prefix; the caller's warning display is given back
    err = capsys.readouterr().err
    assert "warning: the MSLR layer starts saturated" in err and "UserWarning" not in err
    assert warnings.showwarning is shown
    assert 0.0 <= report["eval"]["asr"] <= 1.0 and 0.0 <= report["eval"]["cacc"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not list(tmp_path.glob(".clean.tmp-*")), "temporary directory left behind"
    with pytest.raises(SystemExit):
        main(["train-clean", "--data", "rotten-tomatoes"])  # --out is required


def test_cli_train_clean_reads_user_files_with_their_own_column_names(tmp_path):
    import csv

    from purify_fast.cli import main
    from purify_fast.data import load_rotten_tomatoes

    splits = load_rotten_tomatoes(seed=0, train_size=32, dev_size=24, test_size=8)
    for name, data in (("train.csv", splits.train), ("dev.csv", splits.dev)):
        with open(tmp_path / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sentence", "y"])
            w.writerows(zip(data.texts, data.labels))
    def args(out):
        return ["train-clean", "--data", str(tmp_path / "train.csv"), "--dev",
                str(tmp_path / "dev.csv"), "--model", "minilm", "--out", str(tmp_path / out),
                "--ref-pool-size", "8", "--epochs", "1", "--max-length", "16", "--batch-size", "16",
                "--no-progress"]

    assert main(args("clean") + ["--text-column", "sentence", "--label-column", "y"]) == 0
    assert (tmp_path / "clean" / "config.json").exists()
    assert main(args("c2")) == 2  # the default column 'text' is not in these files
    assert not (tmp_path / "c2").exists()


def test_cli_train_clean_on_a_tiny_llama_checkpoint_directory(tmp_path):
    """The LLaMA path end to end through the CLI (correctness, not accuracy): a random-init
    LLaMA classifier saved as a local checkpoint directory (with the offline MiniLM tokenizer,
    whose vocabulary it is sized for) is trained with MuScleLoRA on poisoned Rotten Tomatoes and
    written back merged: a plain LlamaForSequenceClassification whose outputs match the merged
    in-memory model's report."""
    import json

    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from purify_fast.cli import main
    from purify_fast.models import tiny_llama
    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    base = tiny_llama(num_labels=2, vocab_size=tok.vocab_size)
    base.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    out = tmp_path / "clean"
    rc = main(["train-clean", "--method", "muscle-lora", "--data", "rotten-tomatoes",
               "--model", str(tmp_path / "llama"), "--out", str(out), "--train-size", "48",
               "--dev-size", "160", "--test-size", "32", "--epochs", "1", "--lr", "1e-3",
               "--max-length", "16", "--batch-size", "16", "--attack", "badnets",
               "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["inject"]["family"] == "decoder"
    assert report["config"]["ref_pool_size"] == 128  # the decoder default (METHODS.md §4)
    assert [h["steps"] for h in report["history"]] == [0, 3]
    assert math.isfinite(report["history"][1]["loss"]) and report["history"][1]["ref_loss"] > 0
    model = LlamaForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert isinstance(model.score, nn.Linear)
    trained = {k for k, v in model.state_dict().items()
               if not torch.equal(v, base.state_dict()[k])}
    # the merged adapters changed the attention q/v projections and the score layer, nothing else
    assert trained and all(("q_proj" in k or "v_proj" in k or k.startswith("score"))
                           for k in trained), sorted(trained)[:5]


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_end_to_end_muscle_lora_keeps_asr_below_vanilla():
    """Plant a BadNets backdoor (15 % dirty-label, target "fresh") in 400 Rotten Tomatoes
    training examples and train the offline MiniLM on it twice: vanilla full fine-tuning and
    MuScleLoRA (MSLR + LoRA q/v + gradient alignment, classifier head frozen). MuScleLoRA must
    keep the ASR well below vanilla while still being a working sentiment classifier.

    Setting (benchmarks/results_muscle_lora.md, 2026-12-01): batch 16, max length 32, 4 epochs;
    vanilla lr 2e-4; MuScleLoRA lr 2e-3, FFT scaling, default scales, MSLR alpha 1 (the default
    alpha 6 saturates MiniLM's tanh pooler and the model barely learns). Measured over seeds 0-4:
    vanilla ASR 0.926-1.000; MuScleLoRA ASR 0.378-0.651, CACC 0.650-0.725; smallest ASR gap
    0.325. Both margins below hold for every measured seed. Seed 0 runs here, in one thread as
    measured (vanilla CACC 0.730 / ASR 0.926, MuScleLoRA CACC 0.655 / ASR 0.511).
    """
    from purify_fast.attacks import BadNets
    from purify_fast.data import load_rotten_tomatoes
    from purify_fast.defenses.muscle_lora import train_clean
    from purify_fast.evaluation import evaluate_backdoor
    from purify_fast.models import load_classifier
    from purify_fast.training import seed_everything, train

    seed, maxlen = 0, 32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as measured: the same reduction order, the same numbers
    try:
        splits = load_rotten_tomatoes(seed=seed, train_size=400, dev_size=200, test_size=200)
        attack = BadNets(target_label=1, poison_rate=0.15, seed=seed)
        poisoned = attack.poison(splits.train).dataset
        triggered = attack.triggered_test(splits.test)
        # A balanced test set: a one-class model scores about 0.5 CACC, so the CACC floor below
        # means the MuScleLoRA model really separates the classes.
        assert 0.4 <= sum(splits.test.labels) / len(splits.test) <= 0.6

        seed_everything(seed)  # MiniLM's fresh classifier head is drawn at load time
        vanilla, tok = load_classifier("minilm", 2)
        train(vanilla, tok, poisoned, splits.dev, epochs=4, lr=2e-4, batch_size=16,
              max_length=maxlen, seed=seed, progress=False)
        van = evaluate_backdoor(vanilla, tok, splits.test, triggered, 1, max_length=maxlen)
        del vanilla

        seed_everything(seed)  # the same (frozen) random head as the vanilla run started from
        model, tok = load_classifier("minilm", 2)
        model, res = train_clean(model, tok, poisoned, splits.dev,
                                 inject=MuscleLoRAConfig(alpha=1.0, mode="fft"),
                                 config=MuscleLoRATrainConfig(epochs=4, lr=2e-3, batch_size=16,
                                                              max_length=maxlen, seed=seed,
                                                              progress=False),
                                 return_result=True)
        mus = evaluate_backdoor(model, tok, splits.test, triggered, 1, max_length=maxlen)
    finally:
        torch.set_num_threads(threads)
    print("vanilla", van, "muscle-lora", mus, "history", res.history)
    assert res.ga_steps > 0 and res.config["inject"]["mode"] == "fft"
    # The plant worked (vanilla ASR >= 0.926 on every measured seed).
    assert van["asr"] >= 0.85, van
    # MuScleLoRA keeps the ASR well below vanilla (smallest measured gap 0.325).
    assert mus["asr"] <= van["asr"] - 0.25, (van, mus)
    # ... and is a working classifier, not a collapsed one (smallest measured CACC 0.650).
    assert mus["cacc"] >= 0.6, mus


def test_half_precision_base_trains_fp32_factors():
    """Over a bf16 base the MSLR and LoRA factors are fp32 master weights: an AdamW step of 1e-5
    moves every element (in bf16 most would round back), and the merge equals the forward."""
    from purify_fast.models import tiny_llama
    from purify_fast.nn import inject_muscle_lora, merge_muscle_lora

    torch.manual_seed(0)
    layer = MultiScaleLoRALinear(nn.Linear(16, 8).to(torch.bfloat16), scales=[1, 2])
    assert layer.lora_l.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    before = layer.lora_l.detach().clone()
    opt = torch.optim.AdamW([layer.lora_l, layer.lora_r], lr=1e-5)
    layer(x).float().square().sum().backward()
    opt.step()
    assert bool((layer.lora_l != before).all())
    with torch.no_grad():
        want = layer(x)
        plain = layer.to_linear()  # what merge_muscle_lora saves
        layer.merge()
        torch.testing.assert_close(layer(x), want, rtol=1.6e-2, atol=1e-2)
        assert torch.equal(plain.weight, layer.base.weight)  # the same factors as forward

    model = tiny_llama(num_labels=2, vocab_size=64).to(torch.bfloat16)
    inject_muscle_lora(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values()), \
        {n: p.dtype for n, p in trainable.items()}
    ids = torch.randint(3, 64, (2, 6))
    model(input_ids=ids).logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    merge_muscle_lora(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_train_clean_checks_everything_before_changing_the_model():
    """A call refused for its data or options leaves the model as it was (it used to be
    injected first, so the retry failed with 'inject once'); the ablation's own settings are not
    silently overridden; the reference pool has exactly the size asked for."""
    from purify_fast.data import TextDataset, load_rotten_tomatoes
    from purify_fast.defenses.muscle_lora import (
        MuscleLoRATrainConfig,
        split_reference_pool,
        train_clean,
    )
    from purify_fast.models import load_classifier

    splits = load_rotten_tomatoes(seed=0, train_size=16, dev_size=20, test_size=8)
    model, tok = load_classifier("minilm", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = MuscleLoRATrainConfig(epochs=1, batch_size=8, max_length=16, progress=False)
    with pytest.raises(ValueError, match="reference pool needs 96"):
        train_clean(model, tok, splits.train, splits.dev, config=small)
    with pytest.raises(ValueError, match="gradient alignment is set by ablation='lora'"):
        train_clean(model, tok, splits.train, splits.dev, ablation="lora", config=small,
                    gradient_alignment=True)
    with pytest.raises(ValueError, match="the MSLR layer is set by ablation='muscle-lora'"):
        train_clean(model, tok, splits.train, splits.dev, config=small,
                    inject=MuscleLoRAConfig(use_mslr=False))
    assert not any(isinstance(m, MultiScaleLoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    trained = train_clean(model, tok, splits.train, splits.dev, config=small, ref_pool_size=8)
    assert not any(isinstance(m, MultiScaleLoRALinear) for m in trained.modules())  # merged

    three = TextDataset([f"text {i}" for i in range(97)], [i % 3 for i in range(97)], 3)
    for n, size in ((97, 96), (30, 8), (5, 4)):
        pool, rest = split_reference_pool(three.take(n), size)
        assert (len(pool), len(rest)) == (size, n - size)
        assert sorted(pool.texts + rest.texts) == sorted(three.take(n).texts)


def test_merging_into_bf16_warns_of_the_lost_update_and_fp32_keeps_it():
    """A small trained LoRA update folded into bf16 q / v weights is mostly rounded away (an audit
    measured 64-71 % lost): merge_muscle_lora says how much; merged in fp32 the model computes
    what the unmerged one did."""
    import warnings

    from peft.tuners.lora import LoraLayer

    from purify_fast.models import tiny_llama

    ids = torch.randint(3, 500, (2, 7))
    outputs = {}
    for merged_dtype in (None, torch.float32):
        model = tiny_llama(num_labels=2).to(torch.bfloat16)
        torch.manual_seed(1)
        inject_muscle_lora(model)
        with torch.no_grad():  # a trained-like update: B away from its zero init, small
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for b in m.lora_B.values():
                        b.weight.normal_(0, 1e-4)
        model.eval()
        with torch.no_grad():
            unmerged = model(input_ids=ids).logits.float()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge_muscle_lora(model, merged_dtype)
        lost = [w for w in caught if "merging the adapters' updates into" in str(w.message)]
        with torch.no_grad():
            outputs[merged_dtype] = (unmerged, model(input_ids=ids).logits.float(), lost)
    unmerged, merged, lost = outputs[None]
    assert len(lost) == 1 and "torch.bfloat16" in str(lost[0].message)
    unmerged, merged, lost = outputs[torch.float32]
    assert not lost
    torch.testing.assert_close(merged, unmerged, rtol=0.02, atol=0.02)
    # MSLR-only (no LoRA): the pooler's update is measured too (the review saw 12 % lost, silently)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=128, num_labels=2)).to(torch.bfloat16)
    inject_muscle_lora(net, MuscleLoRAConfig(use_lora=False))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(1e-3 * torch.randn_like(p))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_muscle_lora(net)
    assert any("bert.pooler.dense" in str(w.message) for w in caught), [str(w.message) for w in caught]



# --------------------------------------------------------------------------- audit fixes

def _tiny_bert_classifier(vocab_size=512):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2))


def _toy(n):
    from purify_fast.data import TextDataset

    return TextDataset([("good " if i % 2 else "bad ") + "x" * (i % 5) for i in range(n)],
                       [i % 2 for i in range(n)], 2, "toy")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_new_modules_follow_the_mode_of_what_they_replace(family):
    """Injected into an eval-mode model, peft's LoRA modules (their dropout included) and the
    MSLR layers were in training mode: dropout ran in eval forwards. merge's plain layers were
    built in training mode too (score.training on an eval model), which a re-injection copied.
    Every new module takes the mode of the layer it replaces; a training model stays training."""
    from purify_fast.models import tiny_llama

    make = _tiny_bert_classifier if family == "bert" else lambda: tiny_llama(num_labels=2)
    batch = _CharTok()(["hello world", "abc"])
    model = make().eval()
    inject_muscle_lora(model, MuscleLoRAConfig(lora_dropout=0.5))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero LoRA update, so its dropout would show
        first, second = model(**batch).logits, model(**batch).logits
    assert [n for n, m in model.named_modules() if m.training] == []
    assert torch.equal(first, second)
    merge_muscle_lora(model)
    assert [n for n, m in model.named_modules() if m.training] == []
    inject_muscle_lora(model)
    assert [n for n, m in model.named_modules() if m.training] == []
    training = make().train()
    inject_muscle_lora(training, MuscleLoRAConfig(lora_dropout=0.5))
    assert all(m.training for m in training.modules())
    merge_muscle_lora(training)
    assert all(m.training for m in training.modules())


def test_train_clean_gives_back_the_callers_requires_grad_flags():
    """The merge made every parameter trainable, a frozen embedding included (a failed run
    already restored the flags)."""
    from purify_fast.defenses.muscle_lora import train_clean

    model = _tiny_bert_classifier()
    model.bert.embeddings.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(flags.values())
    train_clean(model, _CharTok(), _toy(24), _toy(20), epochs=1, batch_size=8, ref_pool_size=8,
                progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _train_clean_args(tmp_path):
    """A tiny random BERT checkpoint (with the offline MiniLM tokenizer) and toy CSV files."""
    import csv

    from transformers import AutoTokenizer

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    _tiny_bert_classifier(tok.vocab_size).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for name, n in (("train.csv", 24), ("dev.csv", 20)):
        data = _toy(n)
        with open(tmp_path / name, "w", newline="") as fh:
            csv.writer(fh).writerows([["text", "label"]] + list(zip(data.texts, data.labels)))
    return ["train-clean", "--data", str(tmp_path / "train.csv"), "--dev",
            str(tmp_path / "dev.csv"), "--model", str(tmp_path / "model"), "--ref-pool-size", "8",
            "--epochs", "1", "--max-length", "16", "--batch-size", "8", "--no-progress"]


def test_cli_train_clean_names_bad_scales_before_loading_the_model(tmp_path, capsys,
                                                                   monkeypatch):
    """--scales 1,,4 printed "could not convert string to float: ''": the option is named, and
    before the model is loaded."""
    import purify_fast.models as models

    from purify_fast.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --scales was checked")

    args = _train_clean_args(tmp_path)
    monkeypatch.setattr(models, "load_classifier", no_load)
    capsys.readouterr()
    assert main(args + ["--scales", "1,,4", "--out", str(tmp_path / "o")]) == 2
    assert "--scales must be comma-separated numbers (e.g. 1,4,8), got '1,,4'" in \
        capsys.readouterr().err


def test_cli_train_clean_no_progress_silences_the_shard_bar(tmp_path, capfd):
    """--no-progress left transformers' "Writing model shards" bar of save_pretrained on."""
    from purify_fast.cli import main

    args = _train_clean_args(tmp_path)
    capfd.readouterr()  # the checkpoint's own save
    assert main(args + ["--scales", "1,2,4", "--out", str(tmp_path / "clean")]) == 0
    err = capfd.readouterr().err
    assert "Writing model shards" not in err, err[-500:]
    assert (tmp_path / "clean" / "config.json").exists()


# --------------------------------------------------------------------------- caller's RNG streams

def test_tiny_llama_is_seeded_without_reseeding_the_caller():
    """tiny_llama(seed=s) holds the weights of a LLaMA built right after torch.manual_seed(s),
    whatever the caller's seed, and the caller's streams go on as if it had not been called."""
    from transformers import LlamaForSequenceClassification

    from purify_fast.models import tiny_llama

    states = []
    for caller_seed in (5, 6):
        seed_caller(caller_seed)
        expected = caller_draws()
        seed_caller(caller_seed)
        model = tiny_llama(num_labels=3, seed=4)
        assert caller_draws() == expected
        states.append(model.state_dict())
    with torch.random.fork_rng():
        torch.manual_seed(4)
        want = LlamaForSequenceClassification(model.config).state_dict()
    for state in states:
        assert state.keys() == want.keys() and all(torch.equal(state[k], v) for k, v in want.items())


def test_training_leaves_the_callers_global_rng_streams_alone(monkeypatch):
    """train_clean and train_muscle_lora seed the global RNGs with config.seed (adapter init,
    dropout) and put the caller's states back, also when the run fails; the trained weights do
    not depend on the caller's seed."""
    import purify_fast.defenses.muscle_lora as muscle_module
    from purify_fast.defenses.muscle_lora import train_clean
    from purify_fast.models import tiny_llama

    data = _toy(32)
    kw = dict(epochs=1, lr=1e-3, batch_size=8, ref_pool_size=8, progress=False)
    ends = {"train_clean": [], "train_muscle_lora": []}
    for caller_seed in (5, 6):
        for name in ends:
            model = tiny_llama(num_labels=2)
            if name == "train_muscle_lora":
                with torch.random.fork_rng():
                    torch.manual_seed(1)
                    inject_muscle_lora(model)
            seed_caller(caller_seed)
            expected = caller_draws()
            seed_caller(caller_seed)
            if name == "train_clean":
                train_clean(model, _CharTok(), data, data, **kw)
            else:
                train_muscle_lora(model, _CharTok(), data, data, **kw)
            assert caller_draws() == expected, name
            ends[name].append({k: v.clone() for k, v in model.state_dict().items()})
    for name, (a, b) in ends.items():
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def stopped(*args, **kwargs):
        torch.rand(5)  # draws from the seeded stream, then fails
        raise KeyboardInterrupt("stop")

    monkeypatch.setattr(muscle_module, "train_muscle_lora", stopped)
    seed_caller(7)
    expected = caller_draws()
    seed_caller(7)
    with pytest.raises(KeyboardInterrupt):
        train_clean(tiny_llama(num_labels=2), _CharTok(), data, data, **kw)
    assert caller_draws() == expected


def test_a_saturated_mslr_layer_is_measured_and_warned_of(monkeypatch):
    """At METHODS' α 6 the offline MiniLM's MSLR pooler starts with most of its tanh outputs
    pinned at ±1, where training barely moves them (the README's measured runs use α 1); the run
    says so instead of training a model that hardly changes. α 1 trains quietly; a decoder head
    has no tanh to measure. The measuring forward draws nothing: the seeded run is unchanged."""
    import warnings

    from purify_fast.data import load_rotten_tomatoes
    from purify_fast.defenses.muscle_lora import tanh_saturation
    from purify_fast.models import load_classifier, tiny_llama
    from purify_fast.training import seed_everything

    data = load_rotten_tomatoes(seed=0, train_size=24, dev_size=20, test_size=8)
    runs = {}
    for alpha in (6.0, 1.0):
        seed_everything(0)
        model, tok = load_classifier("minilm", 2)
        inject_muscle_lora(model, MuscleLoRAConfig(alpha=alpha))
        share = tanh_saturation(model, tok, data.train, max_length=32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = train_muscle_lora(model, tok, data.train, data.dev, epochs=1, lr=1e-3,
                                    batch_size=8, max_length=32, ref_pool_size=8, progress=False)
        said = [str(w.message) for w in caught if "starts saturated" in str(w.message)]
        runs[alpha] = (share, res, said, [p.detach().clone() for p in model.parameters()
                                          if p.requires_grad])
    share6, res6, said6, _ = runs[6.0]
    share1, res1, said1, _ = runs[1.0]
    assert share6 > 0.5 > share1 > 0.0
    assert res6.tanh_saturation == share6 and res1.tanh_saturation == share1
    assert len(said6) == 1 and f"{100 * share6:.0f} %" in said6[0] and "alpha 6" in said6[0]
    assert said1 == []

    # the measurement leaves the seeded run as it was: the same call with the check skipped
    import purify_fast.defenses.muscle_lora as ml

    seed_everything(0)
    model, tok = load_classifier("minilm", 2)
    inject_muscle_lora(model, MuscleLoRAConfig(alpha=1.0))
    with monkeypatch.context() as patched:
        patched.setattr(ml, "tanh_saturation", lambda *a, **k: None)
        train_muscle_lora(model, tok, data.train, data.dev, epochs=1, lr=1e-3, batch_size=8,
                          max_length=32, ref_pool_size=8, progress=False)
    trained = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(runs[1.0][3], trained))

    # each module's mode comes back as it was, a mixed model included
    model.train()
    model.bert.embeddings.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    tanh_saturation(model, tok, data.train, max_length=32)
    assert {n: m.training for n, m in model.named_modules()} == modes

    llama = tiny_llama(num_labels=2)
    inject_muscle_lora(llama)
    assert tanh_saturation(llama, _CharTok(), _toy(6), max_length=8) is None
    # a layer placed by hand may feed anything: not measured
    bert = _tiny_bert_classifier()
    bert.bert.pooler.dense = MultiScaleLoRALinear(bert.bert.pooler.dense, alpha=6.0)
    assert tanh_saturation(bert, _CharTok(), _toy(6), max_length=8) is None
