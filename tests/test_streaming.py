"""purify_fast.streaming: streamed purification equals the in-memory ops, bad inputs fail before
any output exists, and a killed run resumes to byte-identical output."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from purify_fast import checkpoint as ck
from purify_fast import ops
from purify_fast.checkpoint import Checkpoint, CheckpointError, write_checkpoint
from purify_fast.cli import main as cli_main
from purify_fast.streaming import (
    DiskFisher,
    PurifyConfig,
    assign_ranks,
    llama_specs,
    purify_checkpoint,
    purify_state_dict,
    write_synthetic_llama,
)

VOCAB = 96
SPECS = llama_specs(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=VOCAB,
                    dtype=torch.float32)
SHARD = 24_000  # a few tensors per shard: 5 shards


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    pre = write_synthetic_llama(root / "pre", SPECS, role="pretrained", max_shard_bytes=SHARD)
    ft = write_synthetic_llama(root / "ft", SPECS, role="suspect", max_shard_bytes=SHARD)
    hes = write_synthetic_llama(root / "h", SPECS, role="hessian", max_shard_bytes=3 * SHARD)
    (ft / "config.json").write_text('{"model_type": "llama"}')
    freqs = torch.randint(0, 5000, (VOCAB,), generator=torch.Generator().manual_seed(0))
    return {"root": root, "pre": pre, "ft": ft, "h": hes, "freqs": freqs, "P": _load(pre),
            "F": _load(ft), "H": _load(hes)}


def _load(out):
    c = Checkpoint.open(out)
    return {k: c.load(k) for k in c}


CASES = [
    {"method": "mix", "rho": 0.3, "seed": 7},
    {"method": "mix", "rho": 0.5, "select": "magnitude"},
    {"method": "fine-purifying", "rho": 0.05},
    {"method": "fine-purifying", "rho": 0.2, "scope": "tensor"},
    {"method": "fine-purifying", "rho": 0.1, "indicator": "drift"},
    {"method": "e-pur", "top_n": 10, "special_ids": (0, 1)},
    {"method": "mix", "rho": 0.5, "e_pur": True, "top_n": 5},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_streaming_equals_in_memory(model, tmp_path, case):
    uses_h = case["method"] == "fine-purifying" and case.get("indicator") != "drift"
    hessian = model["h"] if uses_h else None
    res = purify_checkpoint(model["pre"], model["ft"], tmp_path / "out", hessian=hessian,
                            token_freqs=model["freqs"], **case)
    got = _load(res.out)
    want = purify_state_dict(model["P"], model["F"], hessian=model["H"] if hessian else None,
                             token_freqs=model["freqs"], **case)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the output keeps the suspect's layout and side files
    assert sorted(p.name for p in res.out.glob("*.safetensors")) == \
        sorted(p.name for p in model["ft"].glob("*.safetensors"))
    assert (res.out / "config.json").read_text() == '{"model_type": "llama"}'
    assert not (tmp_path / "out.partial").exists()


def test_side_files_carried_and_the_rest_named(model, tmp_path, capsys):
    """Config / tokenizer files travel with the purified weights; a subdirectory, other weight
    files (they hold the suspect's unpurified values) and unknown files do not, and the CLI says
    which ones instead of leaving the user to find them missing."""
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(model["ft"], ft)
    (ft / "tokenizer_config.json").write_text("{}")
    (ft / "original").mkdir()
    (ft / "original" / "consolidated.00.pth").write_bytes(b"x")
    (ft / "pytorch_model.bin").write_bytes(b"x")
    (ft / "training_args.dat").write_bytes(b"x")
    (ft / "purify_fast_attack.json").write_text("{}")
    (ft / ".cache").mkdir()
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--rho", "0.5", "--pretrained",
                   str(model["pre"]), "--suspect", str(ft), "--out", str(tmp_path / "out"),
                   "--no-progress"])
    assert rc == 0
    out = tmp_path / "out"
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert (out / "config.json").exists()
    for name in ("original", "pytorch_model.bin", "training_args.dat", ".cache",
                 "purify_fast_attack.json"):
        assert not (out / name).exists(), name
    err = capsys.readouterr()
    note = next(line for line in err.err.splitlines() if line.startswith("note: not copied"))
    assert "original: a subdirectory" in note
    assert "pytorch_model.bin: weights outside the checkpoint" in note
    assert "training_args.dat: not a config / tokenizer file type" in note
    assert ".cache" not in note and "config.json" not in note and "safetensors" not in note
    summary = json.loads(err.out[err.out.index("{"):])
    assert "purify_fast_attack.json: a purify_fast report about the suspect" in note
    assert len(summary["side_files_left_out"]) == 4


def test_against_the_ops_directly(model, tmp_path):
    """Independent of purify_state_dict: the per-key mix, and one global threshold + reset."""
    P, F, H = model["P"], model["F"], model["H"]
    got = _load(purify_checkpoint(model["pre"], model["ft"], tmp_path / "m", method="mix",
                                  rho=0.4, seed=3).out)
    for k in P:
        assert torch.equal(got[k], ops.mix_weights(P[k], F[k], 0.4, seed=3, key=k)), k
    got = _load(purify_checkpoint(model["pre"], model["ft"], tmp_path / "f", hessian=model["h"],
                                  method="fine-purifying", rho=0.1).out)
    thr = ops.global_score_threshold(lambda: [(P[k], F[k], H[k]) for k in P], 0.1)
    reset = 0
    for k in P:
        want = ops.reset_by_score(P[k], F[k], H[k], thr)
        assert torch.equal(got[k], want), k
        reset += int((got[k] != F[k]).sum())
    total = sum(t.numel() for t in P.values())
    # ~10% of coordinates go back to pre-trained (ties and coordinates with no drift aside)
    assert 0.09 * total <= reset <= 0.11 * total
    # the planted large-drift coordinates are among the reset ones far more often than chance
    planted = sum(int(((F[k] - P[k]).abs() > 0.03).sum()) for k in P)
    planted_reset = sum(int((((F[k] - P[k]).abs() > 0.03) & (got[k] != F[k])).sum()) for k in P)
    assert planted > 0 and planted_reset / planted > 0.5


def test_epur_resets_the_rows_that_drifted(model, tmp_path):
    P, F = dict(model["P"]), dict(model["F"])
    emb = "model.embed_tokens.weight"
    F[emb] = F[emb].clone()
    F[emb][[5, 40]] += 1.0  # two trigger rows
    ft = write_checkpoint(F, tmp_path / "ft")
    freqs = torch.full((VOCAB,), 1000.0)
    res = purify_checkpoint(model["pre"], ft, tmp_path / "o", method="e-pur", top_n=2,
                            token_freqs=freqs)
    assert res.reset_rows == [5, 40]
    got = _load(res.out)
    assert torch.equal(got[emb][[5, 40]], P[emb][[5, 40]])
    assert torch.equal(got[emb][6], F[emb][6])
    res = purify_checkpoint(model["pre"], ft, tmp_path / "o2", method="e-pur", top_n=2,
                            token_freqs=freqs, special_ids=(5,))
    assert 5 not in res.reset_rows and 40 in res.reset_rows
    # a score threshold instead of a row count: trigger rows score ~0.8, ordinary ones ~0.002
    res = purify_checkpoint(model["pre"], ft, tmp_path / "o3", method="e-pur",
                            score_threshold=0.1, token_freqs=freqs)
    assert res.reset_rows == [5, 40]


def test_single_file_inputs_and_new_head(model, tmp_path):
    P, F = model["P"], dict(model["F"])
    F["score.weight"] = torch.randn(2, 32)
    pre = write_checkpoint(P, tmp_path / "pre")
    ft = write_checkpoint(F, tmp_path / "ft")
    with pytest.raises(CheckpointError, match=r"only in the suspect.*'score\.weight'"):
        purify_checkpoint(pre, ft, tmp_path / "o", method="mix")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    out = purify_checkpoint(pre / "model.safetensors", ft, tmp_path / "o", method="mix",
                            allow_new_keys=True).out
    got = _load(out)
    assert torch.equal(got["score.weight"], F["score.weight"])
    assert not (out / ck.INDEX_NAME).exists()  # single file in, single file out


def test_a_base_model_pairs_with_its_task_model_under_the_prefix(model, tmp_path):
    """A base model saved without the task model's prefix (the offline MiniLM, most hub base
    checkpoints) against a classifier saved as ``model.`` + base keys + ``score.weight``: paired
    under the prefix, the head kept, the same bytes as with a prefixed pre-trained checkpoint."""
    P, F = model["P"], model["F"]
    wrapped = {"model." + k: v for k, v in F.items()}
    wrapped["score.weight"] = torch.randn(2, 32)
    base = dict(P)
    base["rotary.inv_freq"] = torch.arange(4)  # a buffer the task model does not save: ignored
    pre = write_checkpoint(base, tmp_path / "pre")
    ft = write_checkpoint(wrapped, tmp_path / "ft")
    res = purify_checkpoint(pre, ft, tmp_path / "o", method="fine-purifying", rho=0.1,
                            indicator="drift")
    assert res.base_prefix == "model." and res.kept == ["score.weight"]
    got = _load(res.out)
    want = purify_state_dict({"model." + k: v for k, v in P.items()}, wrapped,
                             method="fine-purifying", rho=0.1, indicator="drift")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["score.weight"], wrapped["score.weight"])
    assert any(not torch.equal(got["model." + k], F[k]) for k in F)  # some coordinates reset


def test_cli_pretrained_minilm_pairs_with_a_minilm_classifier(tmp_path, capsys):
    """`--pretrained minilm` is the offline base MiniLM (keys without `bert.`), which pairs with a
    classifier fine-tuned from it."""
    from purify_fast.models import load_classifier
    from purify_fast.models.loading import default_model_path

    suspect, tok = load_classifier("minilm", 2)
    with torch.no_grad():
        for p in suspect.parameters():
            p.add_(0.01 * torch.randn_like(p))
    suspect.save_pretrained(tmp_path / "suspect")
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--rho", "0.5", "--pretrained",
                   "minilm", "--suspect", str(tmp_path / "suspect"), "--out",
                   str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    assert "is a base model: its tensors were paired with the suspect's under 'bert.'" in \
        capsys.readouterr().err
    base, ft = Checkpoint.open(default_model_path()), Checkpoint.open(tmp_path / "suspect")
    out = Checkpoint.open(tmp_path / "out")
    assert out.keys() == ft.keys()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    want = ops.mix_weights(base.load(name[len("bert."):]), ft.load(name), 0.5, seed=0, key=name)
    assert torch.equal(out.load(name), want)
    assert torch.equal(out.load("classifier.weight"), ft.load("classifier.weight"))


def test_a_zero_threshold_never_resets_zero_scores(model, tmp_path):
    """`product` scores δ²·H are 0 wherever H is 0; with 80 % of H zero, the rho 0.3 threshold
    lands on 0, and taking every tie there would reset all coordinates. Only positive scores go
    (at most the top 20 % here), in the streamed and in-memory paths alike."""
    gen = torch.Generator().manual_seed(3)
    H = {k: torch.where(torch.rand(v.shape, generator=gen) < 0.8, 0.0, v)
         for k, v in model["H"].items()}
    hes = write_checkpoint(H, tmp_path / "h")
    case = dict(method="fine-purifying", rho=0.3, indicator="product")
    res = purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", hessian=hes, **case)
    got = _load(res.out)
    want = purify_state_dict(model["P"], model["F"], hessian=H, **case)
    moved = total = 0
    for k, f in model["F"].items():
        assert torch.equal(got[k], want[k]), k
        if f.is_floating_point():
            moved += int((got[k] != f).sum())
            total += f.numel()
    assert res.threshold > 0 and 0.1 * total < moved <= 0.2 * total
    # the same with denormals flushed to zero (a denormal floor would become 0 again)
    torch.set_flush_denormal(True)
    try:
        again = purify_state_dict(model["P"], model["F"], hessian=H, **case)
    finally:
        torch.set_flush_denormal(False)
    assert all(torch.equal(again[k], want[k]) for k in want)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_rho_zero_resets_nothing_even_where_scores_overflow(model, tmp_path, scope):
    """A drift of 1 over a zero Hessian and eps 1e-40 scores 1e40, +inf in fp32; rho 0 has the
    threshold +inf, which those scores meet, yet a target of 0 coordinates must reset none."""
    F = {k: v + 1 if v.is_floating_point() else v for k, v in model["P"].items()}
    H = {k: torch.zeros_like(v) for k, v in model["H"].items()}
    ft, hes = write_checkpoint(F, tmp_path / "ft"), write_checkpoint(H, tmp_path / "h")
    case = dict(method="fine-purifying", rho=0.0, eps=1e-40, scope=scope)
    got = _load(purify_checkpoint(model["pre"], ft, tmp_path / "o", hessian=hes, **case).out)
    want = purify_state_dict(model["P"], F, hessian=H, **case)
    for k, f in F.items():
        assert torch.equal(got[k], f) and torch.equal(want[k], f), k


def test_same_seed_same_bytes_other_seed_other_bytes(model, tmp_path):
    a = purify_checkpoint(model["pre"], model["ft"], tmp_path / "a", method="mix", seed=1).out
    b = purify_checkpoint(model["pre"], model["ft"], tmp_path / "b", method="mix", seed=1).out
    c = purify_checkpoint(model["pre"], model["ft"], tmp_path / "c", method="mix", seed=2).out
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_inputs_never_modified(model, tmp_path):
    before = [_digest(model[k]) for k in ("pre", "ft", "h")]
    purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", hessian=model["h"],
                      method="fine-purifying", e_pur=True, token_freqs=model["freqs"])
    assert [_digest(model[k]) for k in ("pre", "ft", "h")] == before


# --------------------------------------------------------------------------- bad inputs

def _no_output(tmp_path):
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "o.partial").exists()


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_inputs_fail_before_any_output(model, tmp_path, monkeypatch):
    def run(ft, **kw):
        return purify_checkpoint(model["pre"], ft, tmp_path / "o", **kw)

    # truncated shard
    bad = _copy(model["ft"], tmp_path / "trunc")
    shard = sorted(bad.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"suspect checkpoint: .*{shard.name}.*truncated"):
        run(bad, method="mix")
    _no_output(tmp_path)
    # missing shard
    bad = _copy(model["ft"], tmp_path / "missing")
    sorted(bad.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(CheckpointError, match="shard\\(s\\) missing"):
        run(bad, method="mix")
    _no_output(tmp_path)
    # shape / dtype mismatch between the checkpoints
    F = dict(model["F"])
    F["model.norm.weight"] = F["model.norm.weight"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight': dtype I32 .* F32"):
        run(write_checkpoint(F, tmp_path / "dt"), method="mix")
    F = dict(model["F"])
    F["model.norm.weight"] = torch.ones(33)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight': shape \[33\]"):
        run(write_checkpoint(F, tmp_path / "sh"), method="mix")
    _no_output(tmp_path)
    # Hessian missing, lacking a key, or misshapen
    with pytest.raises(ValueError, match="needs a Hessian"):
        run(model["ft"], method="fine-purifying")
    H = dict(model["H"])
    del H["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"no Hessian for tensor 'model\.norm\.weight'"):
        run(model["ft"], method="fine-purifying", hessian=write_checkpoint(H, tmp_path / "h1"))
    H["model.norm.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"Hessian 'model\.norm\.weight' has shape \[3\]"):
        run(model["ft"], method="fine-purifying", hessian=write_checkpoint(H, tmp_path / "h2"))
    with pytest.raises(ValueError, match="only used by fine-purifying"):
        run(model["ft"], method="mix", hessian=model["h"])
    # E-PUR without / with wrong frequencies
    with pytest.raises(ValueError, match="E-PUR needs token_freqs"):
        run(model["ft"], method="e-pur")
    with pytest.raises(ValueError, match="token_freqs has 3 entries but the embedding has 96"):
        run(model["ft"], method="e-pur", token_freqs=torch.ones(3))
    # not enough disk
    monkeypatch.setattr(ck, "free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointError, match="not enough disk space"):
        run(model["ft"], method="mix")
    _no_output(tmp_path)
    monkeypatch.undo()
    # bad options
    with pytest.raises(ValueError, match="method must be one of"):
        run(model["ft"], method="bogus")
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\]"):
        run(model["ft"], method="mix", rho=1.5)
    with pytest.raises(ValueError, match="select must be"):
        run(model["ft"], method="mix", select="largest")
    with pytest.raises(ValueError, match="indicator must be one of"):
        run(model["ft"], method="fine-purifying", indicator="hessian", hessian=model["h"])
    with pytest.raises(ValueError, match="eps must be a positive"):
        run(model["ft"], method="fine-purifying", eps=0.0, hessian=model["h"])
    _no_output(tmp_path)


def test_nan_in_a_tensor_names_it_and_leaves_no_output(model, tmp_path):
    F = dict(model["F"])
    F["model.layers.1.mlp.up_proj.weight"] = F["model.layers.1.mlp.up_proj.weight"].clone()
    F["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    ft = write_checkpoint(F, tmp_path / "ft", max_shard_bytes=SHARD)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*NaN.*"
                                         r"the unfinished o\.partial, with any shards it had finished, was removed"):
        purify_checkpoint(model["pre"], ft, tmp_path / "o", method="mix")
    # Shards before the bad tensor were finished, but no rerun could complete them: nothing is
    # left that would block the next run (e.g. with --no-check-finite, the CLI's spelling).
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(model["pre"]),
                   "--suspect", str(ft), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and not (tmp_path / "o.partial").exists()
    assert cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(model["pre"]),
                     "--suspect", str(ft), "--out", str(tmp_path / "o"), "--no-progress",
                     "--no-check-finite"]) == 0
    # --resume keeps every --out check (an output inside an input is refused with it too)
    assert cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(model["pre"]),
                     "--suspect", str(ft), "--out", str(ft / "sub"), "--resume",
                     "--no-progress"]) == 2
    assert not (ft / "sub").exists() and not (ft / "sub.partial").exists()


def test_nan_in_the_embedding_with_e_pur_leaves_no_partial(model, tmp_path):
    F = dict(model["F"])
    F["model.embed_tokens.weight"] = F["model.embed_tokens.weight"].clone()
    F["model.embed_tokens.weight"][5, 0] = float("nan")
    ft = write_checkpoint(F, tmp_path / "ft", max_shard_bytes=SHARD)
    for _ in range(2):  # the first run leaves nothing that would block the second
        with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight'.*NaN"):
            purify_checkpoint(model["pre"], ft, tmp_path / "o", method="mix", e_pur=True,
                              top_n=3, token_freqs=model["freqs"])
        assert not (tmp_path / "o.partial").exists()


def test_cli_names_its_own_option_for_nan_inputs(model, tmp_path, capsys):
    F = dict(model["F"])
    F["model.norm.weight"] = F["model.norm.weight"].clone()
    F["model.norm.weight"][0] = float("inf")
    ft = write_checkpoint(F, tmp_path / "ft", max_shard_bytes=SHARD)
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(model["pre"]),
                   "--suspect", str(ft), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "pass --no-check-finite" in err and "check_finite=False" not in err


def test_existing_output_is_never_touched(model, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", method="mix")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- faults and resume

class _Boom(RuntimeError):
    pass


def test_fault_after_n_shards_then_resume_is_byte_identical(model, tmp_path):
    kw = {"hessian": model["h"], "method": "fine-purifying", "rho": 0.1, "e_pur": True, "top_n": 4,
              "token_freqs": model["freqs"]}
    clean = purify_checkpoint(model["pre"], model["ft"], tmp_path / "clean", **kw).out

    def fault(name, n):
        if n == 3:
            raise _Boom(name)
    with pytest.raises(_Boom):
        purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", on_shard_done=fault, **kw)
    assert not (tmp_path / "o").exists()
    partial = tmp_path / "o.partial"
    assert len(list(partial.glob(".*.done"))) == 3
    manifest = json.loads((partial / ck.MANIFEST_NAME).read_text())
    assert "threshold_bits" in manifest["state"] and len(manifest["state"]["reset_rows"]) == 4
    with pytest.raises(CheckpointError, match="pass resume=True"):
        purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", **kw)
    with pytest.raises(CheckpointError, match="differs in: config"):
        purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", resume=True,
                          **{**kw, "rho": 0.2})
    # Another fine-tune of the same architecture (identical headers and sizes) in the suspect's
    # place must not be spliced onto the shards already written from the first one.
    other = write_synthetic_llama(tmp_path / "other", SPECS, role="suspect", max_shard_bytes=SHARD,
                                  seed=99)
    assert [ck.read_header(f)[2] for f in Checkpoint.open(other).files] == \
        [ck.read_header(f)[2] for f in Checkpoint.open(model["ft"]).files]
    with pytest.raises(CheckpointError, match="differs in: suspect"):
        purify_checkpoint(model["pre"], other, tmp_path / "o", resume=True, **kw)
    # ... nor one that differs in a single tensor (a fine-tune that touched only q_proj)
    one = dict(model["F"])
    one["model.layers.0.self_attn.q_proj.weight"] = one["model.layers.0.self_attn.q_proj.weight"] + 0.01
    one_off = Checkpoint.open(write_checkpoint(one, tmp_path / "one_off", max_shard_bytes=SHARD))
    same = Checkpoint.open(write_checkpoint(model["F"], tmp_path / "same", max_shard_bytes=SHARD))
    assert one_off.header_digest == same.header_digest  # headers cannot tell them apart
    assert one_off.fingerprint() != same.fingerprint()
    # a manifest of another purify_fast version is refused with that reason
    manifest = json.loads((partial / ck.MANIFEST_NAME).read_text())
    (partial / ck.MANIFEST_NAME).write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(CheckpointError, match="manifest version 1, this one writes 3"):
        purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", resume=True, **kw)
    (partial / ck.MANIFEST_NAME).write_text(json.dumps(manifest))
    res = purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", resume=True, **kw)
    assert res.resumed and res.shards_skipped == 3
    assert _digest(res.out) == _digest(clean)
    with pytest.raises(CheckpointError, match="is a complete output of an earlier run"):
        purify_checkpoint(model["pre"], model["ft"], tmp_path / "o", resume=True, **kw)


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import purify_fast.streaming as S
    calls = [0]
    real = S.pwrite_all
    def pwrite_then_die(fd, data, offset):
        real(fd, data, offset)
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AFTER_WRITES"]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
    S.pwrite_all = pwrite_then_die
    from purify_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("kill_after", [3, 15])  # 21 tensors in 5 shards
def test_sigkill_mid_shard_then_resume_is_byte_identical(model, tmp_path, kill_after):
    args = ["purify-checkpoint", "--method", "mix", "--rho", "0.3", "--seed", "5",
            "--pretrained", str(model["pre"]), "--suspect", str(model["ft"]), "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "clean")]) == 0
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    env = {**os.environ, "KILL_AFTER_WRITES": str(kill_after)}
    proc = subprocess.run([sys.executable, str(script), *args, "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "o.partial").is_dir()
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "o.partial").iterdir())
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--resume"]) == 0
    assert _digest(tmp_path / "o") == _digest(tmp_path / "clean")


# --------------------------------------------------------------------------- CLI

def test_cli_epur_with_json_freqs(model, tmp_path, capsys):
    freqs = tmp_path / "freqs.json"
    freqs.write_text(json.dumps(model["freqs"].tolist()))
    rc = cli_main(["purify-checkpoint", "--method", "e-pur", "--pretrained", str(model["pre"]),
                   "--suspect", str(model["ft"]), "--out", str(tmp_path / "o"), "--top-n", "3",
                   "--token-freqs", str(freqs), "--special-ids", "0,1", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reset_rows"] == 3
    assert summary["shards_total"] == len(list(model["ft"].glob("*.safetensors")))
    want = purify_state_dict(model["P"], model["F"], method="e-pur", top_n=3, special_ids=(0, 1),
                             token_freqs=model["freqs"])
    got = _load(tmp_path / "o")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_cli_takes_the_purify_command_spellings(model, tmp_path):
    """`--method fine-mixing` / `--scope per_tensor` (as `purify-fast purify` says) are the same
    runs as `mix` / `tensor`, byte for byte."""
    base = ["purify-checkpoint", "--pretrained", str(model["pre"]), "--suspect", str(model["ft"]),
            "--no-progress", "--rho", "0.4"]
    for i, (a, b) in enumerate([(["--method", "mix"], ["--method", "fine-mixing"]),
                                (["--method", "fine-purifying", "--scope", "tensor"],
                                 ["--method", "fine-purifying", "--scope", "per_tensor"])]):
        extra = [] if "mix" in a else ["--hessian", str(model["h"])]
        assert cli_main(base + a + extra + ["--out", str(tmp_path / f"a{i}")]) == 0
        assert cli_main(base + b + extra + ["--out", str(tmp_path / f"b{i}")]) == 0
        assert _digest(tmp_path / f"a{i}") == _digest(tmp_path / f"b{i}")


def test_cli_errors_exit_2(model, tmp_path, capsys):
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(tmp_path / "nope"),
                   "--suspect", str(model["ft"]), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "pre-trained checkpoint" in capsys.readouterr().err
    for name, text, message in [("f.txt", "3 4\n5 many\n", "f.txt, line 2: 'many' is not a count"),
                                ("f.json", "[1, 2,", "f.json: not valid JSON"),
                                ("g.json", '[1, "x"]', "g.json: expected a JSON list of counts")]:
        (tmp_path / name).write_text(text)
        rc = cli_main(["purify-checkpoint", "--method", "e-pur", "--pretrained", str(model["pre"]),
                       "--suspect", str(model["ft"]), "--out", str(tmp_path / "o"),
                       "--token-freqs", str(tmp_path / name), "--no-progress"])
        assert rc == 2 and message in capsys.readouterr().err, name


def _find_key(obj, key):
    """The value under ``key`` anywhere in nested JSON."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        obj = list(obj.values())
    for item in obj if isinstance(obj, list) else []:
        found = _find_key(item, key)
        if found is not None:
            return found
    return None


def test_cli_fisher_feeds_purify_checkpoint(tmp_path, capsys):
    """`purify-fast fisher` on a small BERT classifier checkpoint: the Fisher directory holds the
    suspect's checkpoint keys with the in-memory diagonal Fisher of the same clean batches, the
    token counts are the clean texts' counts, and both are accepted by purify-checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from purify_fast.data import load_splits
    from purify_fast.data.text_dataset import token_frequencies
    from purify_fast.defenses.fine_purifying import diagonal_fisher
    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    net = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2))
    for name, state in (("pre", None), ("suspect", 0.02)):
        if state:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(state * torch.randn_like(p))
        net.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    args = ["fisher", "--model", str(tmp_path / "suspect"), "--out", str(tmp_path / "fisher"),
            "--clean-size", "40", "--batch-size", "8", "--max-length", "16",
            "--token-counts", str(tmp_path / "counts.json"), "--no-progress"]
    assert cli_main(args) == 0
    assert not (tmp_path / "fisher.partial").exists()

    clean = load_splits("rotten-tomatoes", seed=0).dev.take(40)
    net.eval()
    want = diagonal_fisher(net, tok, clean, [n for n, _ in net.named_parameters()], batch_size=8,
                           max_length=16)
    got = Checkpoint.open(tmp_path / "fisher")
    assert sorted(got.keys()) == sorted(Checkpoint.open(tmp_path / "suspect").keys())
    for name, h in want.items():
        torch.testing.assert_close(got.load(name), h, rtol=1e-4, atol=1e-12)
    written = json.loads((tmp_path / "counts.json").read_text())
    counts = written["counts"]
    # whole texts, as the in-memory E-PUR counts them, not cut at the Fisher's --max-length 16
    assert counts == [int(c) for c in token_frequencies(clean, tok, tok.vocab_size).tolist()]
    assert sum(counts) > token_frequencies(clean, tok, tok.vocab_size, 16).sum()
    assert sum(counts) > 0 and written["special_ids"] == sorted(tok.all_special_ids)

    capsys.readouterr()
    rc = cli_main(["purify-checkpoint", "--method", "fine-purifying", "--e-pur", "--rho", "0.2",
                   "--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"),
                   "--hessian", str(tmp_path / "fisher"), "--token-freqs",
                   str(tmp_path / "counts.json"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["threshold"] is not None and summary["reset_rows"] == 200
    assert summary["backend"] in ("cpp", "torch")
    manifest = json.loads((tmp_path / "out" / "purify_manifest.json").read_text())
    reset = set(_find_key(manifest, "reset_rows"))
    assert len(reset) == 200 and not reset & set(tok.all_special_ids)  # [CLS], [SEP] never reset

    # refused before anything is written: E-PUR counts without E-PUR, an output inside an input,
    # a device this machine does not have
    base = ["purify-checkpoint", "--method", "fine-purifying", "--pretrained",
            str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"), "--hessian",
            str(tmp_path / "fisher"), "--no-progress"]
    for extra, message in [
            (["--token-freqs", str(tmp_path / "counts.json"), "--out", str(tmp_path / "o2")],
             "--token-freqs is for E-PUR"),
            (["--out", str(tmp_path / "suspect" / "purified")], "overlaps the input"),
            (["--out", str(tmp_path / "fisher" / "x")], "overlaps the input"),
            (["--device", "mps", "--out", str(tmp_path / "o3")], "runs on cpu or cuda")]:
        assert cli_main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counts.json", "fisher", "out", "pre", "suspect"]

    capsys.readouterr()
    assert cli_main(args) == 2  # never overwrites a Fisher
    assert "already exists; the Fisher needs a new directory" in capsys.readouterr().err


def _llama_lm_pair(root, tie: bool, edit=None):
    """A tiny LLaMA language model saved twice, as ``root/pre`` and (with a small drift)
    ``root/suspect``, with the offline MiniLM tokenizer; ``edit(path, net)`` after each save."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tie, pad_token_id=0)
    torch.manual_seed(0)
    net = LlamaForCausalLM(cfg)
    for name, noise in (("pre", 0.0), ("suspect", 0.02)):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(noise * torch.randn_like(p))
        net.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        if edit is not None:
            edit(root / name, net)
    return tok, net


def test_cli_fisher_of_a_causal_lm_feeds_purify_checkpoint(tmp_path, capsys):
    """A LLaMA language model (untied lm_head) as the suspect: the Fisher is that of its own
    next-token loss on the clean text, with every checkpoint key (lm_head included), and
    purify-checkpoint takes it. A bare encoder (no loss of its own) is refused up front."""
    tok, net = _llama_lm_pair(tmp_path, tie=False)
    texts = ["a clean sentence number %d for the fisher" % i for i in range(6)]
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rc = cli_main(["fisher", "--model", str(tmp_path / "suspect"), "--out", str(tmp_path / "f"),
                   "--clean-data", str(tmp_path / "clean.jsonl"), "--clean-size", "6",
                   "--batch-size", "3", "--max-length", "12", "--no-progress"])
    assert rc == 0
    got = Checkpoint.open(tmp_path / "f")
    assert sorted(got.keys()) == sorted(Checkpoint.open(tmp_path / "suspect").keys())
    # the same Fisher by hand: the mean over the two batches of each squared gradient
    net.eval()
    want = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    from purify_fast.data import load_text_file

    clean = load_text_file(tmp_path / "clean.jsonl", label_column=None).take(6, seed=0)
    for start in (0, 3):
        enc = tok(clean.texts[start:start + 3], padding=True, truncation=True, max_length=12,
                  return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        net.zero_grad()
        net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            labels=labels).loss.backward()
        for n, p in net.named_parameters():
            want[n] += p.grad.float() ** 2 / 2
    for n, h in want.items():
        torch.testing.assert_close(got.load(n), h, rtol=1e-4, atol=1e-12)
    assert float(got.load("lm_head.weight").sum()) > 0
    rc = cli_main(["purify-checkpoint", "--method", "fine-purifying", "--rho", "0.1",
                   "--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"),
                   "--hessian", str(tmp_path / "f"), "--out", str(tmp_path / "out"),
                   "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    rc = cli_main(["fisher", "--model", "minilm", "--out", str(tmp_path / "f2"), "--no-progress"])
    assert rc == 2 and "is a BertModel: the Fisher needs the suspect's own loss" in \
        capsys.readouterr().err
    assert not (tmp_path / "f2").exists()
    # a checkpoint without its lm_head would get a random one: refused
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "suspect" / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "suspect" / "model.safetensors"), metadata={"format": "pt"})
    rc = cli_main(["fisher", "--model", str(tmp_path / "suspect"), "--out", str(tmp_path / "f3"),
                   "--clean-data", str(tmp_path / "clean.jsonl"), "--no-progress"])
    assert rc == 2 and "'lm_head.weight'" in capsys.readouterr().err
    assert not (tmp_path / "f3").exists()


# --------------------------------------------------------------------------- property tests

@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.lists(st.integers(1, 17), min_size=1, max_size=3), min_size=1,
                       max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       method=st.sampled_from(["mix", "fine-purifying"]),
       rho=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1),
       shard=st.sampled_from([None, 64, 400]))
def test_property_streaming_matches_ops(tmp_path_factory, shapes, dtype, method, rho, seed,
                                        shard):
    tmp = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(seed % 1000)
    P = {f"t{i}": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}
    F = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in P.items()}
    H = {k: torch.rand(v.shape, generator=g) for k, v in P.items()}
    pre = write_checkpoint(P, tmp / "pre", max_shard_bytes=shard)
    ft = write_checkpoint(F, tmp / "ft", max_shard_bytes=shard)
    hes = write_checkpoint(H, tmp / "h") if method == "fine-purifying" else None
    res = purify_checkpoint(pre, ft, tmp / "o", hessian=hes, method=method, rho=rho, seed=seed)
    got = _load(res.out)
    if method == "mix":
        want = {k: ops.mix_weights(P[k], F[k], rho, seed=seed, key=k) for k in P}
    else:
        thr = ops.global_score_threshold(lambda: [(P[k], F[k], H[k]) for k in P], rho)
        want = {k: ops.reset_by_score(P[k], F[k], H[k], thr) for k in P}
    for k, p in P.items():
        assert got[k].dtype == dtype and got[k].shape == p.shape
        assert torch.equal(got[k], want[k]), k


# --------------------------------------------------------------------------- helpers

def test_assign_ranks_balances_and_is_deterministic(model):
    infos = list(Checkpoint.open(model["ft"]).tensors.values())
    a = assign_ranks(infos, 3)
    assert a == assign_ranks(infos, 3) and set(a.values()) == {0, 1, 2}
    loads = [sum(i.nbytes for i in infos if a[i.key] == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(i.nbytes for i in infos)


def test_config_record_excludes_backend():
    rec = PurifyConfig(method="mix", backend="torch").record()
    assert "backend" not in rec and rec["rho"] == 0.5


def test_disk_fisher_matches_in_memory_and_feeds_fine_purifying(model, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    batches = [(torch.randn(5, 8), torch.randint(0, 3, (5,))) for _ in range(4)]
    want = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for x, y in batches:
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        for n, p in net.named_parameters():
            want[n] += p.grad ** 2 / len(batches)
    net.zero_grad(set_to_none=True)
    fisher = DiskFisher(net, tmp_path / "fisher", max_shard_bytes=200)
    with fisher:
        for x, y in batches:
            torch.nn.functional.cross_entropy(net(x), y).backward()
            assert all(p.grad is None for p in net.parameters())  # folded in and freed
            fisher.step()
            # filled beside the target: the target appears only complete
            assert not (tmp_path / "fisher").exists() and (tmp_path / "fisher.partial").is_dir()
    out = fisher.finish()
    assert out == tmp_path / "fisher" and not (tmp_path / "fisher.partial").exists()
    with pytest.raises(CheckpointError, match="already exists"):
        DiskFisher(net, out)
    (tmp_path / "g.partial").mkdir()  # what a killed run leaves
    with pytest.raises(CheckpointError, match=r"g\.partial is left from an interrupted Fisher run"):
        DiskFisher(net, tmp_path / "g")
    ckpt = Checkpoint.open(out)
    assert ckpt.sharded
    for n, w in want.items():
        torch.testing.assert_close(ckpt.load(n), w, rtol=1e-5, atol=1e-9)
    # the Fisher directory is directly a --hessian input
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    pre = write_checkpoint(sd, tmp_path / "pre")
    ft = write_checkpoint({k: v + 0.01 for k, v in sd.items()}, tmp_path / "ft")
    res = purify_checkpoint(pre, ft, tmp_path / "o", hessian=out, method="fine-purifying", rho=0.5)
    assert res.threshold is not None and res.threshold > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [
    {"method": "mix", "rho": 0.3},
    {"method": "fine-purifying", "rho": 0.1, "e_pur": True, "top_n": 4},
])
def test_cuda_device_writes_the_cpu_bytes(model, tmp_path, case):
    hessian = model["h"] if case["method"] == "fine-purifying" else None
    cpu = purify_checkpoint(model["pre"], model["ft"], tmp_path / "cpu", hessian=hessian,
                            token_freqs=model["freqs"], **case)
    gpu = purify_checkpoint(model["pre"], model["ft"], tmp_path / "gpu", hessian=hessian,
                            token_freqs=model["freqs"], device="cuda", **case)
    assert _digest(gpu.out) == _digest(cpu.out)


def test_buffer_pool_blocks_instead_of_growing():
    import threading

    from purify_fast.streaming import _Cancelled, _carve, _Pool

    pool = _Pool(1024, 2, pin=False)
    a, b = pool.take(), pool.take()
    stop = threading.Event()
    stop.set()
    with pytest.raises(_Cancelled):
        pool.take(stop)  # a third buffer would exceed the bound: wait, and honour cancellation
    pool.give(a)
    assert pool.take() is a
    infos = [ck.TensorInfo("x", "BF16", (3, 5), None, 0, 30, 0), None,
             ck.TensorInfo("y", "F32", (7,), None, 0, 28, 0)]
    x, none, y = _carve(b, infos)
    assert none is None and x.shape == (3, 5) and x.dtype == torch.bfloat16
    assert y.data_ptr() % 64 == 0 and y.data_ptr() >= x.data_ptr() + 30


def test_output_loads_with_transformers(tmp_path):
    """A real Hugging Face sharded checkpoint in, a checkpoint `from_pretrained` loads out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "pre", max_shard_size="20KB")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    assert (tmp_path / "ft" / ck.INDEX_NAME).is_file()
    res = purify_checkpoint(tmp_path / "pre", tmp_path / "ft", tmp_path / "out", method="mix",
                            rho=0.5, seed=4)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    pre = Checkpoint.open(tmp_path / "pre")
    ft = Checkpoint.open(tmp_path / "ft")
    for name, p in loaded.state_dict().items():
        want = ops.mix_weights(pre.load(name), ft.load(name), 0.5, seed=4, key=name)
        assert torch.equal(p, want), name
    assert res.shards_total == len(ft.files) > 1


# --------------------------------------------------------------------------- unusual checkpoints

def test_fp8_empty_and_index_metadata(model, tmp_path):
    """An fp8 tensor is checked for NaN (torch has no isfinite for it) and purified; an empty one
    is copied as it is (nothing to purify); the suspect index's metadata is kept."""
    P, F = dict(model["P"]), dict(model["F"])
    for key, value in (("extra.fp8", torch.randn(5, 7)), ("extra.empty", torch.zeros(0))):
        P[key] = value.to(torch.float8_e4m3fn) if key == "extra.fp8" else value
        F[key] = (value + 0.5).to(torch.float8_e4m3fn) if key == "extra.fp8" else value
    pre = write_checkpoint(P, tmp_path / "pre", max_shard_bytes=SHARD)
    ft = write_checkpoint(F, tmp_path / "ft", max_shard_bytes=SHARD)
    index = json.loads((ft / ck.INDEX_NAME).read_text())
    index["metadata"]["total_parameters"] = 12345
    (ft / ck.INDEX_NAME).write_text(json.dumps(index))
    out = purify_checkpoint(pre, ft, tmp_path / "o", method="mix", rho=0.5, seed=3).out
    got = _load(out)
    want = purify_state_dict(P, F, method="mix", rho=0.5, seed=3)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8))
               if got[k].dtype == torch.float8_e4m3fn else torch.equal(got[k], want[k])
               for k in want)
    assert got["extra.empty"].shape == (0,)
    mixed = got["extra.fp8"].float()
    assert 0 < int((mixed != P["extra.fp8"].float()).sum()) < mixed.numel()  # really mixed
    assert json.loads((out / ck.INDEX_NAME).read_text())["metadata"]["total_parameters"] == 12345
    # NaN in an fp8 tensor: named, and no .partial left to block the rerun
    F["extra.fp8"] = F["extra.fp8"].clone()
    F["extra.fp8"].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn's NaN
    bad = write_checkpoint(F, tmp_path / "bad", max_shard_bytes=SHARD)
    with pytest.raises(ValueError, match=r"'extra\.fp8'.*1 NaN/Inf"):
        purify_checkpoint(pre, bad, tmp_path / "o2", method="mix")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()


def test_pretrained_of_another_float_dtype_is_cast_as_in_memory(model, tmp_path, capsys):
    """An fp16 base under a bf16 fine-tune (LLaMA-2's pairing): the pre-trained tensors are cast to
    the suspect's dtype, as the in-memory defenses do, and the CLI says so."""
    P = {k: v.half() for k, v in model["P"].items()}
    F = {k: v.bfloat16() for k, v in model["F"].items()}
    pre = write_checkpoint(P, tmp_path / "pre", max_shard_bytes=SHARD)
    ft = write_checkpoint(F, tmp_path / "ft", max_shard_bytes=SHARD)
    for i, opts in enumerate([{"method": "mix", "rho": 0.4, "seed": 1},
                              {"method": "fine-purifying", "rho": 0.2, "e_pur": True,
                               "top_n": 4}]):
        extra = ({"hessian": model["h"], "token_freqs": model["freqs"]}
                 if opts["method"] != "mix" else {})
        result = purify_checkpoint(pre, ft, tmp_path / f"o{i}", **opts, **extra)
        assert len(result.cast) == len(F)
        want = purify_state_dict(P, F, **opts,
                                 **({"hessian": model["H"], "token_freqs": model["freqs"]}
                                    if extra else {}))
        got = _load(result.out)
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(pre), "--suspect",
                   str(ft), "--out", str(tmp_path / "cli"), "--no-progress"])
    err = capsys.readouterr()
    assert rc == 0 and f"{len(F)} pre-trained tensor(s) of another dtype" in err.err
    assert json.loads(err.out)["pretrained_cast"] == len(F)


def test_a_suspect_given_as_a_file_names_the_files_beside_it(model, tmp_path, capsys):
    P, F = model["P"], model["F"]
    pre = write_checkpoint(P, tmp_path / "pre")
    ft = write_checkpoint(F, tmp_path / "ft")
    (ft / "config.json").write_text("{}")
    rc = cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(pre), "--suspect",
                   str(ft / "model.safetensors"), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr()
    assert rc == 0 and not (tmp_path / "o" / "config.json").exists()
    assert json.loads(err.out)["side_files_left_out"] == [
        "config.json: the suspect was given as the file model.safetensors, not its directory: "
        "pass the directory to carry its config / tokenizer files"]
    assert "note: not copied" in err.err


def test_the_fingerprint_sees_an_edit_of_a_tensors_first_rows(model, tmp_path):
    """The resume fingerprint samples every tensor's start, middle and end: editing the first
    rows of the embedding in place (where a trigger token's row may sit) changes it."""
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(model["ft"], ft)
    before = Checkpoint.open(ft).fingerprint()
    info = Checkpoint.open(ft)["model.embed_tokens.weight"]
    with open(info.file, "r+b") as fh:
        fh.seek(info.data_start + info.begin)
        first = fh.read(4)
        fh.seek(info.data_start + info.begin)
        fh.write(bytes(b ^ 0xFF for b in first))
    assert Checkpoint.open(ft).fingerprint() != before


def test_cli_refuses_options_the_method_never_reads(model, tmp_path, capsys):
    """An option nothing in the run reads is refused (it would also be recorded in the manifest
    and make an otherwise identical --resume fail), even given at its default value."""
    base = ["purify-checkpoint", "--pretrained", str(model["pre"]), "--suspect", str(model["ft"]),
            "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, message in [
            (["--method", "mix", "--indicator", "drift"], "--indicator is an option of fine-purifying"),
            (["--method", "mix", "--scope", "global"], "--scope is an option of fine-purifying"),
            (["--method", "mix", "--eps", "1e-8"], "--eps is an option of fine-purifying"),
            (["--method", "mix", "--top-n", "3"], "--top-n is an option of E-PUR"),
            (["--method", "mix", "--special-ids", "1,2"], "--special-ids is an option of E-PUR"),
            (["--method", "mix", "--c", "7"], "--c is an option of E-PUR"),
            (["--method", "fine-purifying", "--indicator", "drift", "--seed", "0"],
             "--seed is an option of mix"),
            (["--method", "fine-purifying", "--indicator", "drift", "--select", "random"],
             "--select is an option of mix"),
            (["--method", "e-pur", "--rho", "0.3"], "--rho is an option of mix and fine-purifying"),
            (["--method", "e-pur", "--top-n", "3", "--score-threshold", "1"],
             "--top-n and --score-threshold")]:
        assert cli_main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    # the defaults still apply when the options are left out
    assert cli_main(base + ["--method", "fine-purifying", "--indicator", "drift"]) == 0


def test_cli_fisher_keys_tied_copies_and_buffers_like_the_checkpoint(tmp_path, capsys, monkeypatch):
    """A checkpoint storing a tied lm_head beside the embedding and an old LLaMA's float
    rotary_emb.inv_freq buffer: the Fisher has every one of its floating-point keys (the tied
    copy with the embedding's Fisher, the buffer 0) and purify-checkpoint takes it. A tensor
    transformers renames on load is refused before the pass, and a stopped run leaves neither
    the Fisher nor the token counts behind (fisher never overwrites them)."""
    from safetensors.torch import load_file, save_file

    def stored_as_older_checkpoints_did(path, net):
        weights = load_file(str(path / "model.safetensors"))
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        inv_freq = dict(net.named_buffers())["model.rotary_emb.inv_freq"]
        weights["model.rotary_emb.inv_freq"] = inv_freq.clone()
        # what older transformers saved per layer, and the current one drops on load
        weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok, net = _llama_lm_pair(tmp_path, tie=True, edit=stored_as_older_checkpoints_did)
    texts = ["a clean sentence number %d for the fisher" % i for i in range(6)]
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["fisher", "--model", str(tmp_path / "suspect"), "--clean-data",
            str(tmp_path / "clean.jsonl"), "--clean-size", "6", "--batch-size", "3",
            "--max-length", "12", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "f")]) == 0
    got = Checkpoint.open(tmp_path / "f")
    assert sorted(got.keys()) == sorted(Checkpoint.open(tmp_path / "suspect").keys())
    emb = got.load("model.embed_tokens.weight")
    assert float(emb.sum()) > 0 and torch.equal(got.load("lm_head.weight"), emb)
    assert not got.load("model.rotary_emb.inv_freq").any()
    assert not got.load("model.layers.0.self_attn.rotary_emb.inv_freq").any()
    assert cli_main(["purify-checkpoint", "--method", "fine-purifying", "--rho", "0.1",
                     "--pretrained", str(tmp_path / "pre"), "--suspect",
                     str(tmp_path / "suspect"), "--hessian", str(tmp_path / "f"), "--out",
                     str(tmp_path / "out"), "--no-progress"]) == 0
    capsys.readouterr()
    # stopped mid-pass: no Fisher, no counts
    from purify_fast import streaming

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(streaming.DiskFisher, "step", interrupted)
    counts = tmp_path / "counts.json"
    assert cli_main(args + ["--out", str(tmp_path / "f2"), "--token-counts", str(counts)]) == 130
    assert not counts.exists() and not (tmp_path / "f2").exists()
    assert not (tmp_path / "f2.partial").exists()
    monkeypatch.undo()
    # a stored tensor the loaded model names otherwise (fused experts): refused up front
    weights = load_file(str(tmp_path / "suspect" / "model.safetensors"))
    weights["model.layers.0.mlp.experts.0.w1.weight"] = torch.zeros(4, 4)
    save_file(weights, str(tmp_path / "suspect" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli_main(args + ["--out", str(tmp_path / "f3"), "--token-counts", str(counts)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.experts.0.w1.weight" in err and "renamed or reshaped" in err
    assert not counts.exists() and not (tmp_path / "f3").exists()
    assert not (tmp_path / "f3.partial").exists()


def test_an_untied_head_pairs_with_a_tied_bases_embedding(model, tmp_path, capsys):
    """A base that ties lm_head to its embedding saves no lm_head; a fine-tune saved untied does.
    The head pairs with the base's embedding (kept as new, it would stay unpurified; with the
    5 % limit on kept weights the review saw the pair refused)."""
    P = {k: v for k, v in model["P"].items() if k != "lm_head.weight"}
    F = dict(model["F"])
    pre = write_checkpoint(P, tmp_path / "pre")
    ft = write_checkpoint(F, tmp_path / "ft")
    # a base that just has no head (its config does not tie): nothing pairs, the head is new
    with pytest.raises(CheckpointError, match=r"only in the suspect.*'lm_head\.weight'"):
        purify_checkpoint(pre, ft, tmp_path / "untied", method="mix")
    (pre / "config.json").write_text('{"model_type": "llama", "tie_word_embeddings": true}')
    result = purify_checkpoint(pre, ft, tmp_path / "o", method="mix", rho=0.3, seed=2)
    assert result.tied == {"lm_head.weight": "model.embed_tokens.weight"} and not result.kept
    want = purify_state_dict({**P, "lm_head.weight": P["model.embed_tokens.weight"]}, F,
                             method="mix", rho=0.3, seed=2)
    got = _load(result.out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(pre),
                     "--suspect", str(ft), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert "paired with 'model.embed_tokens.weight'" in capsys.readouterr().err


@pytest.mark.parametrize("config, tied", [
    (None, False),  # no config.json: nothing says the head is the embedding
    ('{"model_type": "gpt2"}', True),  # the Hub's gpt2 config.json has no such key
    ('{"model_type": "gpt2", "tie_word_embeddings": false}', False),
    ('{"model_type": "llama"}', False),  # LlamaConfig's default
    ('{"model_type": "mistral"}', False),
    ('{"model_type": "qwen2"}', False),
    ('{"model_type": "llama", "tie_word_embeddings": true}', True),
    ('{"model_type": "no-such-model", "tie_word_embeddings": true}', True),
    ('{"model_type": "no-such-model", "tie_word_embeddings": false}', False),
    # no key and no class transformers knows: a generic config's default (False in transformers 5,
    # whose PreTrainedConfig has none; True in 4.x)
    ('{"model_type": "no-such-model"}', "generic"),
    # remote code is never run, nor asked about (transformers prompts [y/N] unless told)
    ('{"model_type": "x", "auto_map": {"AutoConfig": "m.C"}, "tie_word_embeddings": true}', True),
    ("{not json", False),
])
def test_tied_embeddings_read_as_transformers_reads_the_config(tmp_path, capfd, config, tied):
    """Whether the base ties its head is what transformers makes of its config.json: a key left
    out means the config class's default (True for GPT-2, False for LLaMA / Mistral / Qwen2), not
    False; a model type transformers does not know still has its explicit key read."""
    from transformers import PretrainedConfig

    from purify_fast.streaming import _ties_embeddings

    if tied == "generic":
        tied = bool(getattr(PretrainedConfig(), "tie_word_embeddings", False))
    write_checkpoint({"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "ck")
    if config is not None:
        (tmp_path / "ck" / "config.json").write_text(config)
    capfd.readouterr()
    assert _ties_embeddings(Checkpoint.open(tmp_path / "ck")) is tied
    assert "custom code" not in "".join(capfd.readouterr())


def test_an_untied_head_pairs_with_a_gpt2_base_whose_config_omits_the_key(tmp_path):
    """A GPT-2 base whose config.json has no tie_word_embeddings (as the Hub's gpt2; transformers
    reads it as tied) saves no lm_head: an untied fine-tune's head pairs with its wte (was
    refused: "only in the suspect", and with allow_new_keys "no counterpart")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kw = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
              eos_token_id=0)
    base = GPT2LMHeadModel(GPT2Config(**kw))
    base.save_pretrained(tmp_path / "pre")
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "pre" / "config.json").write_text(json.dumps(config))
    ft = GPT2LMHeadModel(GPT2Config(**kw, tie_word_embeddings=False))
    ft.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        ft.lm_head.weight.copy_(base.transformer.wte.weight + 0.01)
    ft.save_pretrained(tmp_path / "ft")
    P, F = _load(tmp_path / "pre"), _load(tmp_path / "ft")
    assert "lm_head.weight" not in P and "lm_head.weight" in F
    result = purify_checkpoint(tmp_path / "pre", tmp_path / "ft", tmp_path / "o", method="mix",
                               rho=0.5, seed=1)
    assert result.tied == {"lm_head.weight": "transformer.wte.weight"} and not result.kept
    want = purify_state_dict({**P, "lm_head.weight": P["transformer.wte.weight"]}, F,
                             method="mix", rho=0.5, seed=1)
    got = _load(result.out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_fisher_keys_of_buffers_gpt2_drops_on_load(tmp_path):
    """GPT-2's old checkpoints store causal-mask buffers that transformers ignores on load
    (the class lists them): their Fisher is 0, not a "renamed on load" refusal."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from purify_fast.streaming import fisher_checkpoint_keys

    net = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2))
    net.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)
    weights["transformer.h.0.crossattention.bias"] = torch.ones(1, 1, 16, 16)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    aliases, zeros = fisher_checkpoint_keys(loaded, Checkpoint.open(tmp_path))
    assert {"transformer.h.0.attn.bias", "transformer.h.0.crossattention.bias"} <= set(zeros)


def _gpt2_stored_twice(root, tie=True, copies_equal=True):
    """A tiny GPT-2 (pre-trained and a drifted suspect) with wte and lm_head both stored (older
    checkpoints, or ones saved without dropping tied duplicates) in separate shards, plus a Hessian
    whose two copies differ and the base saved without its head (as save_pretrained saves it)."""
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    g = torch.Generator().manual_seed(0)
    P = {"transformer.wte.weight": torch.randn(64, 16, generator=g),
         "transformer.wpe.weight": torch.randn(16, 16, generator=g),
         "transformer.h.0.attn.c_attn.weight": torch.randn(16, 48, generator=g),
         "transformer.h.0.mlp.c_fc.weight": torch.randn(16, 64, generator=g),
         "transformer.ln_f.weight": torch.ones(16)}
    F = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in P.items()}
    P["lm_head.weight"] = P["transformer.wte.weight"].clone()
    F["lm_head.weight"] = F["transformer.wte.weight"].clone()
    if not copies_equal:
        F["lm_head.weight"][3, 5] += 0.5
    H = {k: torch.rand(v.shape, generator=g) + 1e-3 for k, v in F.items()}
    paths = {}
    for name, sd in (("pre", P), ("ft", F), ("h", H),
                     ("pre_nohead", {k: v for k, v in P.items() if k != "lm_head.weight"})):
        paths[name] = write_checkpoint(sd, root / name,
                                       max_shard_bytes=None if name == "h" else 4200)
        if name != "h":
            cfg.save_pretrained(paths[name])
    ft = Checkpoint.open(paths["ft"])
    assert ft["lm_head.weight"].file != ft["transformer.wte.weight"].file
    return paths, P, F, H


TIED_CASES = [
    {"method": "mix", "rho": 0.5, "seed": 3},
    {"method": "fine-purifying", "rho": 0.1},
    {"method": "fine-purifying", "rho": 0.2, "scope": "tensor"},
    {"method": "e-pur", "top_n": 5},
    {"method": "mix", "rho": 0.4, "e_pur": True, "top_n": 3},
]
TIED = {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.parametrize("base", ["pre", "pre_nohead"])
@pytest.mark.parametrize("case", TIED_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_a_tied_weight_stored_twice_gets_one_purification(tmp_path, case, base):
    """A suspect whose config ties lm_head to wte and that stores both, bitwise equal: both names
    get the one purified tensor, the embedding's (it was two: Fine-mixing drew a mask per name,
    Fine-purifying read each name's Hessian, E-PUR reset only the embedding's rows), so the
    model transformers loads is the purified one. The other tensors are as before."""
    from transformers import GPT2LMHeadModel

    paths, P, F, H = _gpt2_stored_twice(tmp_path)
    kw = dict(case, token_freqs=torch.arange(64) * 7 % 50)
    if case["method"] == "fine-purifying":
        kw["hessian"] = paths["h"]
    res = purify_checkpoint(paths[base], paths["ft"], tmp_path / "out", **kw)
    got = _load(res.out)
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
    assert not torch.equal(got["lm_head.weight"], F["lm_head.weight"])
    assert res.tied_copies == TIED
    sd_kw = dict(kw, hessian=H if "hessian" in kw else None)
    want = purify_state_dict(P, F, tied_copies=TIED, **sd_kw)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if not (case["method"] == "fine-purifying" and case.get("scope", "global") == "global"):
        # no threshold shared across tensors: every other tensor is as it was before the fix
        old = purify_state_dict(P, F, **sd_kw)
        assert all(torch.equal(got[k], old[k]) for k in want if k != "lm_head.weight")
    loaded = GPT2LMHeadModel.from_pretrained(res.out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.transformer.wte.weight.detach(), got["transformer.wte.weight"])


def test_tied_copies_resume_and_the_cli_says_so(tmp_path, capsys):
    """The copies sit in different shards: a run stopped after the first resumes to the same
    bytes; the CLI names the copy."""
    paths, *_ = _gpt2_stored_twice(tmp_path)
    clean = purify_checkpoint(paths["pre"], paths["ft"], tmp_path / "clean", method="mix").out

    def fault(name, n):
        raise _Boom(name)
    with pytest.raises(_Boom):
        purify_checkpoint(paths["pre"], paths["ft"], tmp_path / "o", method="mix",
                          on_shard_done=fault)
    res = purify_checkpoint(paths["pre"], paths["ft"], tmp_path / "o", method="mix", resume=True)
    assert res.resumed and res.shards_skipped == 1 and _digest(res.out) == _digest(clean)
    assert cli_main(["purify-checkpoint", "--method", "mix", "--pretrained", str(paths["pre"]),
                     "--suspect", str(paths["ft"]), "--out", str(tmp_path / "cli"),
                     "--no-progress"]) == 0
    assert ("stores its tied 'lm_head.weight' as a copy of 'transformer.wte.weight'"
            in capsys.readouterr().err)


@pytest.mark.parametrize("tie, copies_equal", [(False, True), (True, False)],
                         ids=["untied-config", "copies-differ"])
@pytest.mark.parametrize("case", TIED_CASES[:2], ids=["mix", "fine-purifying"])
def test_untied_or_differing_copies_are_purified_as_two_tensors(tmp_path, case, tie,
                                                                 copies_equal):
    """A config that does not tie the head, or a head that is not a copy of the embedding: two
    parameters, purified one by one as before (no tied_copies in the run record either, so
    earlier unfinished runs still resume)."""
    paths, P, F, H = _gpt2_stored_twice(tmp_path, tie=tie, copies_equal=copies_equal)
    kw = dict(case, hessian=paths["h"] if case["method"] == "fine-purifying" else None)
    res = purify_checkpoint(paths["pre"], paths["ft"], tmp_path / "out", **kw)
    got = _load(res.out)
    want = purify_state_dict(P, F, **dict(kw, hessian=H if kw["hessian"] else None))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
    assert "tied_copies" not in json.loads((res.out / ck.MANIFEST_NAME).read_text())["run"]


@pytest.mark.parametrize("base", ["pre", "pre_nohead"])
def test_a_tied_copy_counts_once_in_the_global_threshold(tmp_path, base):
    """Global Fine-purifying resets a share rho of the model's parameters; a head stored as a
    copy of the tied embedding is the same parameter, so its entries count once: the threshold,
    the entries reset and every output tensor equal those of the checkpoint storing it once."""
    paths, P, F, H = _gpt2_stored_twice(tmp_path)
    once = {k: v for k, v in F.items() if k != "lm_head.weight"}
    p_once = {k: v for k, v in P.items() if k != "lm_head.weight"}
    paths["ft_once"] = write_checkpoint(once, tmp_path / "ft_once", max_shard_bytes=4200)
    (paths["ft_once"] / "config.json").write_bytes((paths["ft"] / "config.json").read_bytes())
    kw = {"method": "fine-purifying", "rho": 0.1}
    twice = purify_checkpoint(paths[base], paths["ft"], tmp_path / "twice", hessian=paths["h"],
                              **kw)
    single = purify_checkpoint(paths["pre_nohead"], paths["ft_once"], tmp_path / "once",
                               hessian=paths["h"], **kw)
    assert twice.tied_copies == TIED and not single.tied_copies
    assert twice.threshold == single.threshold
    got, ref = _load(twice.out), _load(single.out)
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    reset = sum(int((got[k] != F[k]).sum()) for k in once)
    assert reset == round(0.1 * sum(v.numel() for v in once.values()))
    # the in-memory reference counts it once too
    want = purify_state_dict(P, F, tied_copies=TIED, hessian=H, **kw)
    want_once = purify_state_dict(p_once, once, hessian=H, **kw)
    assert all(torch.equal(want[k], want_once[k]) for k in want_once)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_run_that_scored_the_tied_copy_twice_is_not_resumed(tmp_path):
    """An unfinished global Fine-purifying run with a tied copy, started before the copy was
    scored once, holds a threshold that counts it twice: resuming it is refused, not finished
    with that threshold."""
    paths, *_ = _gpt2_stored_twice(tmp_path)
    kw = {"method": "fine-purifying", "rho": 0.1, "hessian": paths["h"]}

    def fault(name, n):
        raise _Boom(name)
    with pytest.raises(_Boom):
        purify_checkpoint(paths["pre"], paths["ft"], tmp_path / "o", on_shard_done=fault, **kw)
    manifest = tmp_path / "o.partial" / ck.MANIFEST_NAME
    m = json.loads(manifest.read_text())
    assert m["run"].pop("copies_scored_once") is True
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="copies_scored_once"):
        purify_checkpoint(paths["pre"], paths["ft"], tmp_path / "o", resume=True, **kw)
