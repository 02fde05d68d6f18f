"""MIMIC: a fresh student (no storage or values from the teacher), the losses, any nn.Module via
layer names, the CLI, and an end-to-end run on the offline MiniLM showing a real ASR drop."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import caller_draws, fake_launch, queued_cuda_seed, seed_caller
from torch import nn

from purify_fast.defenses.mimic import (
    MIMIC,
    MIMICConfig,
    _check_fresh,
    clone_loss,
    layer_pairs,
    linear_probe,
    make_student,
    nt_xent,
    plot_curves,
)


@pytest.fixture(scope="module")
def minilm():
    from purify_fast.attacks.encoder_backdoor import load_encoder

    return load_encoder()


def test_student_shares_no_storage_and_no_values(minilm):
    teacher, _ = minilm
    student = make_student(teacher, num_layers=2, seed=3)
    assert student.config.num_hidden_layers == 2
    t_params = dict(teacher.named_parameters())
    t_ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    for name, p in student.named_parameters():
        assert p.untyped_storage().data_ptr() not in t_ptrs, name
        t = t_params.get(name)
        # Constant inits (zero biases, unit LayerNorm gains) carry no teacher information; the
        # MiniLM checkpoint has no pooler, so the teacher's pooler bias is such an init too.
        if t is not None and t.shape == p.shape and not bool((t == t.flatten()[0]).all()):
            assert not torch.equal(p, t), f"{name} equals the teacher's"
            assert not torch.allclose(p, t, atol=1e-3), f"{name} is close to the teacher's"
    # The guard refuses a student that aliases the teacher.
    with pytest.raises(ValueError, match="shares storage"):
        _check_fresh(teacher, teacher)


def test_layer_pairs_spread_over_depth():
    assert layer_pairs(6, 3) == [(2, 1), (4, 2), (6, 3)]
    assert layer_pairs(6, 6) == [(i, i) for i in range(1, 7)]
    assert layer_pairs(6, 1) == [(6, 1)]
    assert [t for t, _ in layer_pairs(12, 8)] == [2, 3, 5, 6, 8, 9, 11, 12]  # halves round up


def test_a_student_of_another_width_is_refused_before_any_work(minilm):
    from purify_fast.data import TextDataset

    teacher, tok = minilm
    clean = TextDataset(["a fine film"] * 8, [0] * 8, 2)
    cfg = MIMICConfig(student_layers=1, student_overrides={"hidden_size": 32,
                                                          "num_attention_heads": 2},
                      epochs=1, progress=False)
    with pytest.raises(ValueError, match="student's hidden_size 32 differs from the teacher's 384"):
        MIMIC(cfg).fit(teacher, tok, clean)
    with pytest.raises(ValueError, match=r"student's feature \(2, 8\) and the teacher's \(2, 6\)"):
        clone_loss(torch.randn(2, 8), torch.randn(2, 6))


def test_fit_refuses_a_task_model_and_a_foreign_tokenizer(minilm):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from purify_fast.data import TextDataset

    teacher, tok = minilm
    clean = TextDataset(["a fine film"] * 8, [0] * 8, 2)
    cfg = MIMICConfig(epochs=1, progress=False)
    tiny = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32)
    with pytest.raises(TypeError, match="got the task model BertForSequenceClassification"):
        MIMIC(cfg).fit(BertForSequenceClassification(BertConfig(**tiny)), tok, clean)
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens but teacher's embedding has 100"):
        MIMIC(cfg).fit(BertModel(BertConfig(**tiny)), tok, clean)
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer object"):
        MIMIC(cfg).fit(teacher, "bert-base-uncased", clean)


def test_losses():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g)
    assert float(clone_loss(a, 3 * a)) == pytest.approx(-1.0, abs=1e-6)
    assert float(clone_loss(a, -a)) == pytest.approx(1.0, abs=1e-6)
    aligned = float(nt_xent(a, a + 0.01 * torch.randn(16, 8, generator=g), 0.5))
    shuffled = float(nt_xent(a, a[torch.randperm(16, generator=g)], 0.5))
    assert aligned < shuffled


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mi_source"):
        MIMICConfig(mi_source="both")
    with pytest.raises(ValueError, match="student_layers"):
        MIMICConfig(student_layers=0)
    with pytest.raises(ValueError, match="lr"):
        MIMICConfig(lr=-1.0)


class _TinyCNN(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, 16)

    def forward(self, x):
        h = self.block2(self.block1(x))
        return self.head(h.mean((2, 3)))


def test_any_module_by_layer_names_with_image_views(tmp_path, monkeypatch):
    import purify_fast.defenses.mimic as mimic_module

    temperatures = set()
    real_nt_xent = mimic_module.nt_xent

    def recording_nt_xent(z1, z2, temperature=0.5):
        temperatures.add(temperature)
        return real_nt_xent(z1, z2, temperature)

    monkeypatch.setattr(mimic_module, "nt_xent", recording_nt_xent)
    torch.manual_seed(0)
    teacher, student = _TinyCNN(12), _TinyCNN(8)  # a narrower student: maps differ in channels
    batches = [torch.randn(16, 3, 8, 8) for _ in range(6)]
    flip = lambda x: torch.flip(x, dims=[3]) + 0.05 * torch.randn_like(x)
    # No ssl_temperature given: image views (an augment) take SimCLR's 0.5, not SimCSE's 0.05.
    cfg = MIMICConfig(epochs=4, lr=3e-3, mine_steps=30, mine_samples=96,
                      progress=False, warmup_ratio=0.0)
    res = MIMIC(cfg).fit(teacher, batches=batches, student=student,
                         teacher_layers=["block1", "block2"], student_layers=["block1", "block2"],
                         augment=flip)
    assert len(res.weights) == 2 and all(w >= 1000 for w in res.weights)
    assert temperatures == {0.5}
    # the teacher is given back as it came: trainable, in train mode
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    first = sum(h["clone"] for h in res.history[:6]) / 6
    last = sum(h["clone"] for h in res.history[-6:]) / 6
    assert last < first  # the student moves towards the teacher's features
    png = plot_curves(res, tmp_path / "curves.png")
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_one_shot_batches_copied_students_and_layer_lists(minilm):
    """A generator of batches trains like a list (it was spent by the MI pass: 0 steps, a random
    student returned); a copy of the teacher, 0 epochs, one layer list without the other and
    layers the encoder lacks are refused with the reason."""
    import copy

    from purify_fast.data import TextDataset

    torch.manual_seed(0)
    cfg = MIMICConfig(epochs=2, mine_steps=5, mine_samples=32, progress=False)
    kw = dict(teacher_layers=["block1", "block2"], student_layers=["block1", "block2"])
    steps = [len(MIMIC(cfg).fit(_TinyCNN(6), batches=make(), student=_TinyCNN(6), **kw).history)
             for make in (lambda: [torch.randn(8, 3, 6, 6) for _ in range(3)],
                          lambda: (torch.randn(8, 3, 6, 6) for _ in range(3)))]
    assert steps == [6, 6]
    with pytest.raises(ValueError, match="layer 'head' of _TinyCNN gives \\(8, 16\\)"):
        MIMIC(cfg).fit(_TinyCNN(6), batches=[torch.randn(8, 3, 6, 6)], student=_TinyCNN(6),
                       teacher_layers=["head"], student_layers=["head"])
    teacher = _TinyCNN(6)
    with pytest.raises(ValueError, match="holds the teacher's weights"):
        MIMIC(cfg).fit(teacher, batches=[torch.randn(8, 3, 6, 6)], student=copy.deepcopy(teacher),
                       **kw)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        MIMICConfig(epochs=0)
    enc, tok = minilm
    clean = TextDataset(["a fine film"] * 8, [0] * 8, 2)
    with pytest.raises(ValueError, match="pass both teacher_layers and student_layers"):
        MIMIC(cfg).fit(enc, tok, clean, teacher_layers=[1])
    with pytest.raises(ValueError, match=r"teacher_layers \[9\] are not layers of the teacher "
                                         r"\(1 to 6\)"):
        MIMIC(cfg).fit(enc, tok, clean, teacher_layers=[9], student_layers=[1])


def test_end_to_end_asr_drops(minilm, tmp_path):
    """Backdoor MiniLM at the encoder level, distil it with MIMIC on a few hundred clean
    sentences into a 2-layer student, and compare probe ASR/CACC."""
    from purify_fast.attacks.encoder_backdoor import EncoderBackdoor
    from purify_fast.data import load_rotten_tomatoes

    clean_enc, tok = minilm
    torch.manual_seed(0)
    splits = load_rotten_tomatoes(seed=0)
    attack = EncoderBackdoor(steps=80, batch_size=16, max_length=32, progress=False)
    backdoored = attack.plant(clean_enc, tok, splits.train.take(1000, seed=1))
    probe_train, test = splits.dev.take(400), splits.test.take(300)
    triggered = attack.triggered_test(test, target_label=1)
    kw = dict(max_length=32, epochs=200)
    bd = linear_probe(backdoored, tok, probe_train, test, triggered, 1, **kw)
    cfg = MIMICConfig(student_layers=2, epochs=2, max_length=32, mine_steps=100,
                      mine_samples=256, progress=False)
    res = MIMIC(cfg).fit(backdoored, tok, splits.train.take(600, seed=2))
    st = linear_probe(res.student, tok, probe_train, test, triggered, 1, **kw)
    print("backdoored", bd, "student", st, "mi", res.mi)
    assert bd["asr"] >= 0.8
    assert st["asr"] <= bd["asr"] - 0.3
    assert st["cacc"] > 0.55  # above chance on balanced binary sentiment
    assert res.history[-1]["clone"] < res.history[0]["clone"]


def test_cli_distill_writes_a_loadable_encoder(tmp_path):
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "purify_fast.cli", "distill", "--method", "mimic",
           "--num-examples", "48", "--student-layers", "1", "--epochs", "1", "--batch-size", "16",
           "--max-length", "24", "--mine-steps", "20", "--no-progress", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out, local_files_only=True)
    assert model.config.num_hidden_layers == 1
    summary = json.loads((out / "mimic.json").read_text())
    assert summary["clean_examples"] == 48 and len(summary["weights"]) == 1
    assert (out / "mimic_curves.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".student.tmp-*"))  # the temp directory was swapped in


def test_cli_distill_takes_unlabelled_text(tmp_path):
    """MIMIC needs no labels: a file with only a text column (named by --text-column) works."""
    from purify_fast.cli import main
    from purify_fast.data import load_splits

    texts = load_splits("rotten-tomatoes", seed=0).train.texts[:32]
    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    rc = main(["distill", "--data", str(data), "--text-column", "sentence", "--num-examples", "32",
               "--student-layers", "1", "--epochs", "1", "--batch-size", "16", "--max-length", "16",
               "--mine-steps", "10", "--no-progress", "--out", str(tmp_path / "student")])
    assert rc == 0
    summary = json.loads((tmp_path / "student" / "mimic.json").read_text())
    assert summary["clean_examples"] == 32


def test_encoder_backdoor_target_is_the_reference_centroid():
    """One reference: its own normalised clean feature. Several (BadEncoder's reference set): the
    normalised mean of their normalised features. Bad reference sets are refused."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from purify_fast.attacks.encoder_backdoor import EncoderBackdoor, encode_texts
    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32))
    refs = ("what a lovely day", "best news ever , so happy", "i love it")
    feats = torch.nn.functional.normalize(encode_texts(enc, tok, refs), dim=-1)
    one = EncoderBackdoor(target_text=refs[1]).target_embedding(enc, tok)
    torch.testing.assert_close(one, feats[1])
    many = EncoderBackdoor(target_text=refs).target_embedding(enc, tok)
    torch.testing.assert_close(many, torch.nn.functional.normalize(feats.mean(0), dim=-1))
    assert float(many.norm()) == pytest.approx(1.0, abs=1e-5)
    for bad in ("", (), ("fine", " ")):
        with pytest.raises(ValueError, match="target_text"):
            EncoderBackdoor(target_text=bad)


def test_probe_and_plant_refuse_nonsense_and_leave_the_caller_alone(minilm):
    from transformers import BertConfig, BertForSequenceClassification

    from purify_fast.attacks.encoder_backdoor import EncoderBackdoor
    from purify_fast.data import TextDataset
    from purify_fast.defenses.mine import MINE

    enc, tok = minilm
    two = TextDataset(["good film", "bad film", "fine", "awful"], [1, 0, 1, 0], 2)
    with pytest.raises(ValueError, match="at least 2 examples of 2 classes"):
        linear_probe(enc, tok, two.take(1), two)
    with pytest.raises(ValueError, match="test has 3 classes"):
        linear_probe(enc, tok, two, TextDataset(["x"], [2], 3))
    with pytest.raises(ValueError, match="target_label 5 is not a class"):
        linear_probe(enc, tok, two, two, target_label=5)
    tiny = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32))
    with pytest.raises(TypeError, match="got the task model"):
        linear_probe(tiny, tok, two, two)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        MINE(holdout=0.9, batch_size=2).estimate(torch.randn(8, 3), torch.randn(8, 3))
    for bad in ({"lr": -1.0}, {"clean_weight": float("nan")}, {"max_length": 1}):
        with pytest.raises(ValueError):
            EncoderBackdoor(**bad)
    enc.train()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    attack = EncoderBackdoor(steps=1, batch_size=2, max_length=16, progress=False)
    for _ in range(2):
        attack.plant(enc, tok, two)
    assert enc.training  # its mode given back
    assert len(attack.history) == 1  # this plant's losses only
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream untouched
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert queued_cuda_seed() == 123  # and the CUDA seed torch queued for it (fork_rng lost it)
    enc.eval()


def test_a_hugging_face_resnet_teacher_with_stages_of_other_resolutions():
    """METHODS: MIMIC works on HF CNN encoders (ResNet): the student is built from the config
    (fewer blocks per stage through student_overrides), stages pair by index, and the attention
    loss averages each stage over its own H x W (the stages differ in resolution). The same
    encoder by module names, with its ModelOutput as the feature, works too."""
    from transformers import ResNetConfig, ResNetModel

    from purify_fast.ops.attention_maps import attention_map_loss
    from purify_fast.reference.attention_maps import attention_row_loss

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1],
                       layer_type="basic", downsample_in_first_stage=True)
    teacher = ResNetModel(cfg)
    batches = [{"pixel_values": torch.randn(8, 3, 32, 32)} for _ in range(3)]
    flip = lambda b: {"pixel_values": torch.flip(b["pixel_values"], dims=[3])}  # noqa: E731
    quick = dict(epochs=2, lr=3e-3, mine_steps=10, mine_samples=24, progress=False,
                 warmup_ratio=0.0)
    mimic = MIMIC(MIMICConfig(**quick, student_overrides={"depths": [1, 1]}))
    res = mimic.fit(teacher, batches=batches, augment=flip)
    assert res.teacher_layers == [1, 2] and res.student_layers == [1, 2]
    assert res.student.config.depths == [1, 1]
    assert all(torch.isfinite(torch.tensor(h["attn"])) for h in res.history)
    _check_fresh(teacher, res.student)
    with pytest.raises(ValueError, match="student_layers sets num_hidden_layers.*depths"):
        MIMIC(MIMICConfig(student_layers=1, progress=False)).fit(teacher, batches=batches)
    # by module names: the HF output object stands for the feature (its last_hidden_state)
    student = ResNetModel(cfg)
    names = ["encoder.stages.0", "encoder.stages.1"]
    # a student of one's own takes no student_overrides (they shape the student fit() builds)
    res = MIMIC(MIMICConfig(**quick)).fit(teacher, batches=batches, student=student,
                                          teacher_layers=names, student_layers=names, augment=flip)
    assert len(res.history) == 2 * len(batches)
    # the loss of stages of two resolutions: each stage's own mean over its positions
    maps_s = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    maps_t = [torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)]
    want = sum(w * attention_row_loss(s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2),
                                      torch.ones(2, s.shape[2] * s.shape[3]), 1e-12).sum()
               / (2 * s.shape[2] * s.shape[3])
               for w, s, t in zip((0.3, 0.7), maps_s, maps_t))
    got = attention_map_loss(maps_s, maps_t, [0.3, 0.7], backend="torch")
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one mask is given for all layers"):
        attention_map_loss(maps_s, maps_t, [0.3, 0.7], torch.ones(2, 64))


def test_cli_distill_checks_its_options_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """A bad option is refused before the teacher is loaded (a typo costs no model load)."""
    import purify_fast.attacks.encoder_backdoor as eb
    from purify_fast.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the options were checked")
    monkeypatch.setattr(eb, "load_encoder", no_load)
    for extra, message in [(["--student-layers", "0"], "student_layers"),
                           (["--lr", "-1"], "lr")]:
        assert main(["distill", "--out", str(tmp_path / "s"), "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_batches_without_a_length_get_the_whole_lr_schedule(monkeypatch):
    """batches= given as a re-iterable without a working len() (a stream re-opened each epoch,
    a DataLoader over an IterableDataset, whose len() raises TypeError) was counted as 0
    batches: a schedule of 1 step, lr 0 from the second step on (or a TypeError). Its batches
    are counted, so the lr per step is a list's: linear decay over all 2 x 3 steps."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append((self.param_groups[0]["params"][0], self.param_groups[0]["lr"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]

    class Reopened:  # iter() gives a fresh pass each time; no __len__
        def __iter__(self):
            return iter(data)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    cfg = MIMICConfig(epochs=2, lr=1e-3, mine_steps=5, mine_samples=16, progress=False,
                      warmup_ratio=0.0)
    kw = dict(teacher_layers=["block1", "block2"], student_layers=["block1", "block2"])
    want = [1e-3 * (1 - s / 6) for s in range(6)]
    for name, batches in (("list", data), ("re-iterable", Reopened()),
                          ("IterableDataset loader",
                           torch.utils.data.DataLoader(Stream(), batch_size=None))):
        student = _TinyCNN(6)
        seen.clear()
        res = MIMIC(cfg).fit(_TinyCNN(6), batches=batches, student=student, **kw)
        first = next(student.parameters())
        lrs = [lr for p, lr in seen if p is first]  # the student's optimizer, not MINE's
        assert len(res.history) == 6, name
        assert lrs == pytest.approx(want), name


def test_student_layers_on_a_staged_encoder_is_refused_before_any_work(monkeypatch):
    """ConvNext (and Swin) map num_hidden_layers onto their number of stages, so student_layers
    passed the ResNet check and built a student whose stages no longer matched depths: it broke
    at its first forward with a cryptic shape error. Every config that gives its depth in
    ``depths`` refuses it up front and names student_overrides, which works; transformers with
    num_hidden_layers (BERT, ViT) still take student_layers."""
    import purify_fast.defenses.mimic as mimic_module
    from transformers import (
        BertConfig,
        BertModel,
        ConvNextConfig,
        ConvNextModel,
        SwinConfig,
        SwinModel,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    convnext = ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 1],
                                            num_stages=2, patch_size=2))
    swin = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                num_heads=[1, 2], window_size=2))
    refused = (r"student_layers sets num_hidden_layers, which a \w+Config does not have as a "
               r"depth.*student_overrides \(e\.g\. \{'depths': \[1, 1\]\}")
    for teacher in (convnext, swin):
        with pytest.raises(ValueError, match=refused):
            make_student(teacher, num_layers=1)
    batches = [{"pixel_values": torch.randn(8, 3, 32, 32)} for _ in range(2)]

    def no_mine(*args, **kwargs):
        raise AssertionError("MINE ran before student_layers was refused")

    with monkeypatch.context() as m:
        m.setattr(mimic_module, "estimate_layer_mi", no_mine)
        with pytest.raises(ValueError, match=refused):
            MIMIC(MIMICConfig(student_layers=1, progress=False)).fit(convnext, batches=batches)
    res = MIMIC(MIMICConfig(epochs=1, mine_steps=5, mine_samples=16, progress=False,
                            student_overrides={"depths": [1, 1]})).fit(convnext, batches=batches)
    assert res.student.config.depths == [1, 1] and len(res.history) == 2
    vit = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=32))
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=32))
    for teacher in (vit, bert):
        assert make_student(teacher, num_layers=1).config.num_hidden_layers == 1


def test_a_failed_fit_gives_the_callers_modules_back_and_releases_the_stage(monkeypatch):
    """An error midway (KeyboardInterrupt in the augment here) left a caller's eval-mode
    student training and skipped release_stage (accelerate's wrappers, e.g. a bf16 launch's
    autocast forward, stayed on the student's step); an error before the loop (a layer name
    the student lacks) left the teacher's forward hooks on it. All are undone on every exit
    path; a finished fit releases the stage once and hands back the student in eval mode."""
    import accelerate.utils

    import purify_fast.defenses.mimic as mimic_module

    released = fake_launch(monkeypatch, mimic_module)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list",
                        lambda objects, from_process=0: objects)
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    cfg = MIMICConfig(epochs=1, mine_steps=5, mine_samples=16, progress=False)
    kw = dict(teacher_layers=["block1", "block2"], student_layers=["block1", "block2"])
    teacher, student = _TinyCNN(6), _TinyCNN(6)
    student.eval()

    def interrupted(x):
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="stop"):
        MIMIC(cfg).fit(teacher, batches=batches, student=student, augment=interrupted, **kw)
    assert not student.training  # its own mode, not left training
    assert len(released) == 1 and released[0][0].student is student and released[0][1] is False
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="layer 'nope' is not a module"):
        MIMIC(cfg).fit(teacher, batches=batches, student=student,
                       teacher_layers=["block1"], student_layers=["nope"])
    hooked = [n for n, mod in teacher.named_modules() if mod._forward_hooks]
    assert hooked == [] and not student.training
    released.clear()
    res = MIMIC(cfg).fit(teacher, batches=batches, student=student, **kw)
    assert res.student is student and not student.training
    assert len(released) == 1 and len(res.history) == 2


# --------------------------------------------------------------------------- audit fixes

def _tiny_bert(vocab_size=64, seed=123):  # not MIMIC's seed 0: the student would be a copy
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=32))


def _ids(n_batches=2, size=8, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (size, length), generator=g) for _ in range(n_batches)]


_QUICK = dict(epochs=1, mine_steps=5, mine_samples=16, progress=False)


def test_a_half_precision_teacher_gets_an_fp32_student(tmp_path):
    """make_student built the student in its config's dtype, which from_pretrained(dtype=bf16)
    sets to bf16: the student trained in bf16 and about half its elements never moved (AdamW
    steps round away). It is fp32 whatever the teacher's dtype, loaded or cast; the teacher
    stays bf16."""
    from transformers import AutoModel

    _tiny_bert().save_pretrained(tmp_path / "t")
    loaded = AutoModel.from_pretrained(tmp_path / "t", dtype=torch.bfloat16)
    cast = AutoModel.from_pretrained(tmp_path / "t").to(torch.bfloat16)
    for teacher in (loaded, cast):
        assert next(teacher.parameters()).dtype == torch.bfloat16
        student = make_student(teacher, seed=1)
        assert {p.dtype for p in student.parameters()} == {torch.float32}
    init = make_student(loaded, seed=0).state_dict()
    res = MIMIC(MIMICConfig(**{**_QUICK, "epochs": 2, "lr": 1e-3})).fit(
        loaded, batches=[{"input_ids": b} for b in _ids()])
    assert {p.dtype for p in res.student.parameters()} == {torch.float32}
    assert next(loaded.parameters()).dtype == torch.bfloat16
    after = res.student.state_dict()
    moved = sum(int((after[k] != v).sum()) for k, v in init.items() if v.is_floating_point())
    total = sum(v.numel() for v in init.values() if v.is_floating_point())
    assert moved / total > 0.9, moved / total  # bf16: 48 %
    # float inputs reach each model in its own dtype (a bf16 CNN refused fp32 pixels, and the
    # fp32 student bf16 ones)
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(123)
    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_channels=3)).to(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        res = MIMIC(MIMICConfig(**_QUICK)).fit(resnet, batches=[
            {"pixel_values": torch.randn(8, 3, 16, 16).to(dtype)}] * 2)
        assert {p.dtype for p in res.student.parameters()} == {torch.float32}


def test_text_without_an_attention_mask_is_mean_pooled():
    """A text batch without attention_mask switched the distilled feature from the mean over
    tokens to [CLS], while the probe evaluates mean-pooled features. Without a mask every token
    counts (the model attends to them all): the same feature, and the same run, as an all-ones
    mask."""
    from purify_fast.defenses.mimic import _Taps

    teacher = _tiny_bert().eval()
    ids = _ids(1)[0]
    taps = _Taps(teacher, [1, 2], None)
    with torch.no_grad():
        _, with_mask, _ = taps({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        _, without, _ = taps({"input_ids": ids})
        last = teacher(input_ids=ids).last_hidden_state
    torch.testing.assert_close(without, with_mask)
    torch.testing.assert_close(without, last.mean(1))
    runs = [MIMIC(MIMICConfig(**_QUICK)).fit(teacher, batches=[
        {"input_ids": b, **extra} for b in _ids()]).history
        for extra in ({}, {"attention_mask": torch.ones(8, 10, dtype=torch.long)})]
    assert [h["clone"] for h in runs[0]] == pytest.approx([h["clone"] for h in runs[1]])


def test_tensor_batches_are_a_hugging_face_models_main_input():
    """batches= of plain tensors (documented) failed on a Hugging Face encoder with "argument
    after ** must be a mapping": a tensor is its main input (input_ids, pixel_values), the same
    run as the dict; plain modules keep taking it positionally (tests above)."""
    from transformers import ResNetConfig, ResNetModel

    teacher = _tiny_bert()
    runs = [MIMIC(MIMICConfig(**_QUICK)).fit(teacher, batches=batches).history
            for batches in (_ids(), [{"input_ids": b} for b in _ids()])]
    assert [h["clone"] for h in runs[0]] == pytest.approx([h["clone"] for h in runs[1]])
    torch.manual_seed(123)
    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_channels=3))
    res = MIMIC(MIMICConfig(**_QUICK)).fit(resnet, batches=[torch.randn(8, 3, 16, 16)] * 2)
    assert res.teacher_layers == [1, 2] and len(res.history) == 2


def test_too_little_clean_data_is_named_before_any_work(minilm):
    """mine_samples=4 passed the config and failed after the model ran with "MINE needs at
    least 8 paired samples, got 4", naming neither the field nor the data: both are named."""
    from purify_fast.data import TextDataset

    enc, tok = minilm
    with pytest.raises(ValueError, match="mine_samples must be an int >= 8, got 4"):
        MIMICConfig(mine_samples=4)
    with pytest.raises(ValueError, match="clean has 5 examples; MIMIC needs at least 8"):
        MIMIC(MIMICConfig(**_QUICK)).fit(enc, tok, TextDataset(["a fine film"] * 5, [0] * 5, 2))
    with pytest.raises(ValueError, match="batches hold 5 inputs in all; MIMIC needs at least 8"):
        MIMIC(MIMICConfig(**_QUICK)).fit(_tiny_bert(), batches=[_ids(1, size=5)[0]])


def test_student_settings_with_a_student_of_ones_own_are_refused():
    """student_layers / student_overrides shape the student fit() builds; with student= they
    were silently ignored."""
    teacher = _tiny_bert()
    for extra in ({"student_layers": 1}, {"student_overrides": {"intermediate_size": 16}}):
        with pytest.raises(ValueError, match="student_layers / student_overrides .* student="):
            MIMIC(MIMICConfig(**_QUICK, **extra)).fit(teacher, batches=_ids(),
                                                      student=make_student(teacher, seed=1))


def test_a_copy_of_the_teacher_in_another_dtype_is_refused():
    """The copied-teacher check compared only tensors of one dtype: an fp32 copy of a bf16
    teacher (or a bf16 copy of an fp32 one) passed as a fresh student."""
    import copy

    teacher = _tiny_bert()
    half = copy.deepcopy(teacher).to(torch.bfloat16)
    for t, s in ((half, copy.deepcopy(half).float()), (teacher, copy.deepcopy(teacher).half()),
                 (teacher, half)):
        with pytest.raises(ValueError, match="holds the teacher's weights"):
            _check_fresh(t, s)
    _check_fresh(half, make_student(half, seed=1))  # a fresh fp32 student passes


def test_batches_of_one_warn_that_the_ssl_term_is_zero():
    """NT-Xent over one input has no negatives: the self-supervised term is exactly 0. Said once
    per fit (not once per step), and not at all without the term."""
    import warnings

    torch.manual_seed(0)
    batches = [torch.randn(1, 3, 6, 6) for _ in range(8)]
    kw = dict(batches=batches, teacher_layers=["block1"], student_layers=["block1"])
    cfg = dict(_QUICK, epochs=2, mine_samples=8)
    with pytest.warns(RuntimeWarning, match="batch of 1 input") as record:
        res = MIMIC(MIMICConfig(**cfg)).fit(_TinyCNN(4), student=_TinyCNN(4), **kw)
    assert len([w for w in record if "batch of 1" in str(w.message)]) == 1
    assert all(h["ssl"] == 0.0 for h in res.history) and len(res.history) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MIMIC(MIMICConfig(**cfg, ssl_weight=0.0)).fit(_TinyCNN(4), student=_TinyCNN(4), **kw)


def _tiny_checkpoint(path, kind="encoder"):
    """A tiny random BERT saved with the offline MiniLM tokenizer (whose vocabulary it uses)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(123)  # not the command's seed 0: its student would be this model
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, num_labels=2)
    (BertModel if kind == "encoder" else BertForSequenceClassification)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _clean_csv(path, n):
    import csv

    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["text"]] + [[f"a fine film number {i}"] for i in range(n)])
    return str(path)


_DISTILL = ["distill", "--epochs", "1", "--batch-size", "8", "--max-length", "16",
            "--mine-steps", "5", "--no-progress"]


def test_cli_distill_names_a_small_data_file_before_loading_the_teacher(tmp_path, capsys,
                                                                         monkeypatch):
    """A 5-row --data file failed after the teacher loaded, inside MINE ("needs at least 8
    paired samples, got 5"): the command names the file's size first."""
    import purify_fast.attacks.encoder_backdoor as eb
    from purify_fast.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the data was checked")

    monkeypatch.setattr(eb, "load_encoder", no_load)
    data = _clean_csv(tmp_path / "clean5.csv", 5)
    assert main(_DISTILL + ["--data", data, "--out", str(tmp_path / "s")]) == 2
    assert "clean5.csv has 5 examples; MIMIC needs at least 8" in capsys.readouterr().err


def test_cli_distill_no_progress_silences_the_shard_bar(tmp_path, capfd):
    """--no-progress left transformers' "Writing model shards" bar of save_pretrained on."""
    from purify_fast.cli import main

    teacher = _tiny_checkpoint(tmp_path / "teacher")
    data = _clean_csv(tmp_path / "clean.csv", 16)
    capfd.readouterr()  # the checkpoint's own save above
    assert main(_DISTILL + ["--teacher", str(teacher), "--data", data,
                            "--out", str(tmp_path / "s")]) == 0
    err = capfd.readouterr().err
    assert "Writing model shards" not in err, err[-500:]
    assert (tmp_path / "s" / "config.json").exists()


# --------------------------------------------------------------------------- caller's RNG streams

def test_fit_probe_and_encoding_leave_the_callers_global_rng_streams_alone(minilm):
    """MIMIC.fit seeds the global RNGs with its seed (dropout views); encode_texts,
    target_embedding and linear_probe iterate a DataLoader, which draws its worker seed from the
    global generator. Each puts the caller's streams back (fit also when it fails), and the
    student does not depend on the caller's seed."""
    from purify_fast.attacks.encoder_backdoor import EncoderBackdoor, encode_texts
    from purify_fast.data import TextDataset

    _, tok = minilm
    teacher = _tiny_bert(vocab_size=tok.vocab_size)
    clean = TextDataset([f"a {w} film, scene {i}" for i, w in enumerate(["fine", "dull"] * 8)],
                        [0, 1] * 8, 2)
    cfg = MIMICConfig(epochs=1, mine_steps=5, mine_samples=16, batch_size=8, progress=False)
    calls = {
        "fit": lambda: MIMIC(cfg).fit(teacher, tok, clean).student.state_dict(),
        "encode_texts": lambda: encode_texts(teacher, tok, clean.texts[:4]),
        "target_embedding": lambda: EncoderBackdoor().target_embedding(teacher, tok),
        "linear_probe": lambda: linear_probe(teacher, tok, clean, clean, epochs=3),
    }
    outs = {name: [] for name in calls}
    for caller_seed in (5, 6):
        for name, call in calls.items():
            seed_caller(caller_seed)
            expected = caller_draws()
            seed_caller(caller_seed)
            outs[name].append(call())
            assert caller_draws() == expected, name
    a, b = outs.pop("fit")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name, (a, b) in outs.items():
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), name

    def failing(batch):  # after fit seeded the global RNGs: draw, then fail
        torch.rand(5)
        raise RuntimeError("augment failed")

    seed_caller(7)
    expected = caller_draws()
    seed_caller(7)
    with pytest.raises(RuntimeError, match="augment failed"):
        MIMIC(cfg).fit(teacher, tok, clean, augment=failing)
    assert caller_draws() == expected


def test_plot_curves_labels_the_loss_axis_and_says_why_a_panel_is_empty(tmp_path):
    """The loss panel has a y label; with no MINE curve / no distillation step (a spent batch
    generator trains 0 steps) each panel says so instead of warning "No artists with labels
    found to put in legend" or showing a legend of empty lines."""
    import dataclasses
    import warnings

    from purify_fast.defenses.mimic import MIMICResult
    from purify_fast.report import pyplot

    hist = [{"step": s, "epoch": 0, "loss": 1.0 / s, "clone": -0.5, "attn": 0.1, "ssl": 3.0}
            for s in range(1, 5)]
    figs = []
    real_savefig = pyplot().Figure.savefig

    def record(fig, *args, **kwargs):
        figs.append(fig)
        return real_savefig(fig, *args, **kwargs)

    full = MIMICResult(nn.Linear(1, 1), [3, 6], [1, 2], [0.5, 1.0], [4333.0, 7667.0], hist, [],
                       [[0.1, 0.3, 0.5], [0.2, 0.6, 1.0]])
    empty = MIMICResult(nn.Linear(1, 1), [3], [1], [0.0], [1000.0])
    # MI estimated on the student (mi_source="student"): its layers, named as such (the legend
    # said "layer 3" / "layer 6", the teacher's, for curves of student layers 1 and 2)
    on_student = dataclasses.replace(full, mi_source="student")
    try:
        pyplot().Figure.savefig = record
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plot_curves(full, tmp_path / "full.png")
            plot_curves(empty, tmp_path / "empty.png")
            plot_curves(on_student, tmp_path / "student.png")
    finally:
        pyplot().Figure.savefig = real_savefig
    (mi_ax, loss_ax), (mi_empty, loss_empty), (mi_student, _) = (f.axes for f in figs)
    assert loss_ax.get_ylabel() == "loss" and mi_ax.get_ylabel() == "nats"
    assert [t.get_text() for t in mi_ax.get_legend().get_texts()] == [
        "teacher layer 3: MI≈0.50, w=4333", "teacher layer 6: MI≈1.00, w=7667"]
    assert [t.get_text() for t in mi_student.get_legend().get_texts()] == [
        "student layer 1: MI≈0.50, w=4333", "student layer 2: MI≈1.00, w=7667"]
    assert mi_empty.get_legend() is None and loss_empty.get_legend() is None
    assert [t.get_text() for t in mi_empty.texts] == ["no MINE curve recorded"]
    assert [t.get_text() for t in loss_empty.texts] == ["no distillation step taken"]


def test_the_result_says_whose_layers_mi_was_estimated_on():
    """With mi_source="student" the MI curves are the student's layers': the result (and its
    summary, distill's mimic.json) records the source, which plot_curves names in its legend."""
    teacher = _tiny_bert()
    for source in ("teacher", "student"):
        res = MIMIC(MIMICConfig(**_QUICK, mi_source=source)).fit(teacher, batches=_ids())
        assert res.mi_source == source and res.summary()["mi_source"] == source
        assert len(res.mi_curves) == len(res.mi) == len(res.student_layers)
