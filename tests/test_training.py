"""purify_fast.training.train: which weights it keeps."""

import dataclasses

import pytest
import torch
from conftest import fake_launch, queued_cuda_seed

from purify_fast.data import TextDataset
from purify_fast.training import TrainConfig, train


def _tiny_classifier():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=2))
    return model, tok


def test_the_kept_epoch_is_a_fine_tuned_one_even_when_the_untouched_model_ties():
    """With a step too small to change any prediction every epoch ties with the untouched
    weights; the clean fine-tune must still be kept (the earliest fine-tuned epoch), not skipped.
    The dev accuracy before training stays in the history as epoch 0."""
    model, tok = _tiny_classifier()
    data = TextDataset(["a good film", "a bad film", "great", "awful"] * 4, [1, 0, 1, 0] * 4, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train(model, tok, data, data, TrainConfig(epochs=2, lr=1e-6, batch_size=8, max_length=8,
                                                    progress=False, warmup_ratio=0.0))
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    accs = [h["dev_acc"] for h in res.history]
    assert len(set(accs)) == 1  # a three-way tie
    assert res.best_epoch == 1  # the earliest fine-tuned epoch, not the untouched weights
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # No epoch to run: the untouched weights are all there is.
    model, tok = _tiny_classifier()
    res = train(model, tok, data, data, TrainConfig(epochs=0, progress=False))
    assert res.best_epoch == 0 and len(res.history) == 1


def test_a_bf16_model_trains_in_fp32_and_is_rounded_back_once():
    """A bf16 model's clean fine-tune follows the fp32 one (it trains in fp32, then is rounded
    back to bf16 once) instead of steps below a bf16 weight's spacing being lost; the model
    stays bf16 and a caller's gradient hook still applies. fp32_weights=False trains in bf16."""
    data = TextDataset(["a good film", "a bad film", "great", "awful"] * 4, [1, 0, 1, 0] * 4, 2)
    # 40 steps of ~2e-5 each: together well above a bf16 weight's spacing here (~1e-4),
    # one by one below half of it
    cfg = TrainConfig(epochs=20, lr=2e-5, batch_size=8, max_length=8, progress=False,
                      warmup_ratio=0.0, keep_best=False, weight_decay=0.0)
    ends = {}
    for dtype, fp32_weights in ((torch.float32, True), (torch.bfloat16, True), ("bf16", False)):
        cfg = dataclasses.replace(cfg, fp32_weights=fp32_weights)
        if dtype == "bf16":
            dtype, key = torch.bfloat16, "bf16 weights"
        else:
            key = dtype
        model, tok = _tiny_classifier()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        model.to(dtype)
        emb = model.get_input_embeddings().weight
        emb.register_hook(lambda g: torch.zeros_like(g))  # freeze the embedding by its gradient
        train(model, tok, data, None, cfg)
        assert all(p.dtype == dtype for p in model.parameters())
        assert torch.equal(emb, start["bert.embeddings.word_embeddings.weight"].to(dtype))
        ends[key] = {k: v.float() for k, v in model.state_dict().items()
                     if v.dim() == 2 and "embeddings" not in k}
    # The bf16 run's update (from its rounded start) points where the fp32 run's does: with
    # fp32 weights only the rounding of the end separates them; without, the many steps below a
    # weight's spacing are lost (cosine 0.41 on this model in bf16, 0.95 in fp32).
    keys = list(ends[torch.float32])
    moved = {key: torch.cat([(ends[key][k] - start[k].to(
        torch.float32 if key == torch.float32 else torch.bfloat16).float()).flatten()
        for k in keys]) for key in ends}

    def cosine(key):
        return float(torch.nn.functional.cosine_similarity(moved[key], moved[torch.float32],
                                                           dim=0))
    assert cosine(torch.bfloat16) > 0.8, cosine(torch.bfloat16)
    assert cosine("bf16 weights") < 0.6, cosine("bf16 weights")
    # a call that fails midway gives the model back in its own dtypes
    model, tok = _tiny_classifier()
    model.to(torch.bfloat16)
    bad = TextDataset(["a", "b"], [0, 2], 3)  # 3 classes for a 2-class head: refused inside
    with pytest.raises(ValueError, match="model has 2 labels"):
        train(model, tok, bad, None, cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}



def test_the_lr_schedule_spans_the_steps_a_multi_process_stage_takes(monkeypatch):
    """accelerate steps a stage's schedule once per process per optimizer step, and each of N
    processes takes ceil(B / N) steps per epoch: 4 batches on 2 processes over 4 epochs is 16
    schedule steps (as on one process), 15 batches on 2 processes 16 per epoch, not 15 (the
    audit saw the last step at lr 0, and half the epochs of a 4-batch run on 4 processes)."""
    from purify_fast.training import scheduler_steps

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert scheduler_steps(4, 4) == 16 and scheduler_steps(0, 4) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert scheduler_steps(4, 4) == 16
    assert scheduler_steps(1, 15) == 16
    assert scheduler_steps(2, 5, per_rank=True) == 20  # MIMIC's batches=: already per rank
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert scheduler_steps(4, 4) == 16 and scheduler_steps(1, 5) == 8


def test_a_failed_train_gives_the_model_back_in_its_mode_and_releases_the_stage(monkeypatch):
    """A forward that raises midway (KeyboardInterrupt here) left the caller's eval-mode model in
    train mode and skipped release_stage, so accelerate's wrappers (a mixed-precision launch's
    autocast forward) stayed on it. Both are undone on every exit path; a finished run still
    ends in eval mode and releases the stage once."""
    import purify_fast.training as training

    released = fake_launch(monkeypatch, training)
    data = TextDataset(["a good film", "a bad film", "great", "awful"], [1, 0, 1, 0], 2)
    cfg = TrainConfig(epochs=2, batch_size=2, max_length=8, progress=False)
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = _tiny_classifier()
        model.to(dtype).eval()
        calls = []
        real_forward = model.forward

        def interrupted(*args, _real=real_forward, _calls=calls, **kwargs):
            _calls.append(1)
            if len(_calls) == 2:  # the dev pass before training, then the first training step
                raise KeyboardInterrupt("stop")
            return _real(*args, **kwargs)

        model.forward = interrupted
        released.clear()
        with pytest.raises(KeyboardInterrupt, match="stop"):
            train(model, tok, data, data, cfg)
        assert len(calls) == 2
        assert not model.training, dtype  # its own mode, not left training
        assert released == [(model, False)], dtype
        assert {p.dtype for p in model.parameters()} == {dtype}
    # a finished run: released once, the model in eval mode (also from train mode)
    model, tok = _tiny_classifier()
    model.train()
    released.clear()
    train(model, tok, data, data, cfg)
    assert not model.training and released == [(model, False)]


_DATA = TextDataset(["a good film", "a bad film", "great", "awful"] * 4, [1, 0, 1, 0] * 4, 2)


def test_gradients_left_on_the_model_do_not_fold_into_the_first_step():
    """A model carrying .grad from earlier work (a saliency pass, a probe) trains exactly as a
    clean one: train() clears them before its loop."""
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=16, max_length=8, progress=False,
                      keep_best=False)
    clean, tok = _tiny_classifier()
    stale, _ = _tiny_classifier()
    for p in stale.parameters():
        p.grad = torch.full_like(p, 100.0)
    train(clean, tok, _DATA, None, cfg)
    train(stale, tok, _DATA, None, cfg)
    assert all(torch.equal(a, b) for a, b in zip(clean.parameters(), stale.parameters()))
    assert all(p.grad is None for p in stale.parameters())


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step():
    """NaN logits argmax to class 0, so a NaN epoch could win keep-best and come back as an
    improvement: a non-finite loss stops the run, naming where, and suggesting a lower lr."""
    model, tok = _tiny_classifier()
    calls = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if model.training:
            calls.append(1)
            if len(calls) == 3:  # epoch 2, step 1 of 2
                out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    cfg = TrainConfig(epochs=3, batch_size=8, max_length=8, progress=False)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, step 1/2.*lower lr"):
        train(model, tok, _DATA, _DATA, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN step was taken
    # bf16 autocast: fp32 is suggested as well
    model, tok = _tiny_classifier()
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 2/2.*precision='fp32'"):
        train(model, tok, _DATA, _DATA, dataclasses.replace(cfg, lr=1e8, precision="bf16"))


def test_a_huge_lr_is_stopped_not_kept():
    """lr 1e8: the old loop kept the NaN epoch 1 as the best (dev accuracy of all-class-0)."""
    model, tok = _tiny_classifier()
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train(model, tok, _DATA, _DATA, TrainConfig(epochs=2, lr=1e8, batch_size=8, max_length=8,
                                                     progress=False))


def test_weights_turned_non_finite_by_the_last_step_are_caught():
    """A non-finite gradient at an epoch's last step never shows in a loss; the weights are
    checked before the epoch is scored."""
    model, tok = _tiny_classifier()
    steps = []

    def poison(grad):
        steps.append(1)
        return grad * float("nan") if len(steps) == 2 else grad  # step 2 of 2

    model.classifier.weight.register_hook(poison)
    cfg = TrainConfig(epochs=2, batch_size=8, max_length=8, progress=False, clip_norm=None)
    with pytest.raises(FloatingPointError, match=r"weight is not finite at epoch 1, after its "
                                                 r"last step"):
        train(model, tok, _DATA, _DATA, cfg)


def test_a_distributed_run_stops_on_every_rank_together(monkeypatch):
    """Under a launch the non-finite flag is reduced over the ranks before anyone raises."""
    import purify_fast.training as training

    fake_launch(monkeypatch, training)
    from conftest import RecordingAccelerator

    reduced = []
    real_reduce = RecordingAccelerator.reduce

    def reduce(self, tensor, reduction="mean"):
        reduced.append(reduction)
        return real_reduce(self, tensor, reduction)

    monkeypatch.setattr(RecordingAccelerator, "reduce", reduce)
    model, tok = _tiny_classifier()
    with pytest.raises(FloatingPointError, match="epoch 1, step 2/2"):
        train(model, tok, _DATA, None, TrainConfig(epochs=1, lr=1e8, batch_size=8, max_length=8,
                                                    progress=False))
    assert reduced and set(reduced) == {"sum"}


def test_train_leaves_the_callers_global_rng_streams_alone():
    """train() seeds the global RNGs with config.seed (dropout, deterministic runs) and puts the
    caller's states back afterwards; the run itself does not depend on the caller's seed."""
    import random

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=8, max_length=8, progress=False)
    ends = []
    for caller_seed in (5, 6):
        model, tok = _tiny_classifier()
        torch.manual_seed(caller_seed), random.seed(caller_seed), np.random.seed(caller_seed)
        expected = draws()
        torch.manual_seed(caller_seed), random.seed(caller_seed), np.random.seed(caller_seed)
        train(model, tok, _DATA, _DATA, cfg)
        assert draws() == expected
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_initialized(),
                    reason="CUDA already started: seeds are applied at once, not queued")
def test_rng_preserved_keeps_the_callersqueued_cuda_seed():
    """Before CUDA starts, the caller's torch.manual_seed is only queued for it; the seeding
    inside train() / purify() replaced it, so the caller's first CUDA draws came from ours."""
    from purify_fast.training import rng_preserved, seed_everything

    if not hasattr(torch.cuda, "_lazy_seed_tracker"):
        pytest.skip("this torch keeps no queued CUDA seed")
    torch.manual_seed(123)
    assert queued_cuda_seed() == 123
    with rng_preserved():
        seed_everything(0)
        assert queued_cuda_seed() == 0
    assert queued_cuda_seed() == 123
    with pytest.raises(KeyError):  # also on the way out of a failure
        with rng_preserved():
            seed_everything(5)
            raise KeyError("boom")
    assert queued_cuda_seed() == 123
