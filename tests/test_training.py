"""purify_fast.training.train: which weights it keeps."""

import torch

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


def test_a_bf16_model_trains_through_fp32_master_weights():
    """A bf16 model's clean fine-tune follows the fp32 one (the steps accumulate in fp32 masters,
    rounded once per step into the bf16 weights) instead of most coordinates never moving; the
    model stays bf16 and a caller's gradient hook still applies."""
    data = TextDataset(["a good film", "a bad film", "great", "awful"] * 4, [1, 0, 1, 0] * 4, 2)
    cfg = TrainConfig(epochs=3, lr=1e-4, batch_size=8, max_length=8, progress=False,
                      warmup_ratio=0.0, keep_best=False, weight_decay=0.0)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = _tiny_classifier()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        model.to(dtype)
        emb = model.get_input_embeddings().weight
        emb.register_hook(lambda g: torch.zeros_like(g))  # freeze the embedding by its gradient
        train(model, tok, data, None, cfg)
        assert all(p.dtype == dtype for p in model.parameters())
        assert torch.equal(emb.float(), start["bert.embeddings.word_embeddings.weight"].to(dtype).float())
        weights = [k for k, v in model.state_dict().items() if v.dim() == 2 and "embeddings" not in k]
        moved = sum(int((model.state_dict()[k].float() != start[k].to(dtype).float()).sum())
                    for k in weights)
        runs[dtype] = (moved / sum(start[k].numel() for k in weights),
                       {k: model.state_dict()[k].float() for k in weights})
    assert runs[torch.bfloat16][0] > 0.5, runs[torch.bfloat16][0]  # was ~0.1 without masters
    for k, want in runs[torch.float32][1].items():  # the bf16 run ends where the fp32 one does
        torch.testing.assert_close(runs[torch.bfloat16][1][k], want, rtol=0.02, atol=2e-3)
