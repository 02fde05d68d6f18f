"""purify_fast.checkpoint: reading/validating safetensors checkpoints and the atomic writer."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from purify_fast import checkpoint as ck
from purify_fast.checkpoint import Checkpoint, CheckpointError, OutputDir, write_checkpoint


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layer.0.w": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.0.b": torch.randn(16, generator=g).to(torch.float16),
        "layer.1.w": torch.randn(24, 16, generator=g),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("shard", [None, 2000])
def test_roundtrip_single_and_sharded(tmp_path, shard):
    state = _state()
    out = write_checkpoint(state, tmp_path / "ckpt", max_shard_bytes=shard)
    ckpt = Checkpoint.open(out)
    assert ckpt.sharded == (shard is not None)
    assert ckpt.keys() == list(state)
    for k, t in state.items():
        assert torch.equal(ckpt.load(k), t)
    # the files are plain safetensors that the reference library reads
    merged = {}
    for f in ckpt.files:
        merged.update(load_file(str(f)))
    assert merged.keys() == state.keys()
    if shard:
        index = json.loads((out / ck.INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(state)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                      for t in state.values())
        assert len(ckpt.files) > 1
    assert not (tmp_path / "ckpt.partial").exists()


def test_reads_files_written_by_safetensors(tmp_path):
    state = _state(1)
    save_file(state, str(tmp_path / "x.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "x.safetensors")
    for k, t in state.items():
        assert torch.equal(ckpt.load(k), t)
    assert Checkpoint.open(tmp_path).keys() == ckpt.keys()  # a dir with one file


def test_writer_is_deterministic(tmp_path):
    a = write_checkpoint(_state(), tmp_path / "a", max_shard_bytes=2000)
    b = write_checkpoint(_state(), tmp_path / "b", max_shard_bytes=2000)
    assert _digest(a) == _digest(b)


def test_load_returns_a_private_copy(tmp_path):
    out = write_checkpoint(_state(), tmp_path / "c")
    t = Checkpoint.open(out).load("layer.1.w")
    t.add_(1.0)  # a private copy: writing it must not touch the file
    assert torch.equal(Checkpoint.open(out).load("layer.1.w"), _state()["layer.1.w"])


# --------------------------------------------------------------------------- bad files

@pytest.fixture
def single(tmp_path):
    save_file(_state(), str(tmp_path / "m.safetensors"))
    return tmp_path / "m.safetensors"


def test_truncated_file_names_file_and_tensor(single):
    data = single.read_bytes()
    single.write_bytes(data[:-100])
    with pytest.raises(CheckpointError,
                       match=r"m\.safetensors: tensor '[^']+' ends at byte .*truncated"):
        Checkpoint.open(single)


def test_truncated_header(single):
    single.write_bytes(single.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*truncated"):
        Checkpoint.open(single)


def test_tiny_file(single):
    single.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        Checkpoint.open(single)


def test_corrupted_header_json(single):
    data = bytearray(single.read_bytes())
    data[8] = ord("#")  # the opening brace of the JSON header
    single.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint.open(single)


def test_implausible_header_length(single):
    data = bytearray(single.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    single.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length"):
        Checkpoint.open(single)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])


def test_offsets_with_a_gap(single):
    def edit(h):
        b, e = h["layer.0.b"]["data_offsets"]
        h["layer.0.b"]["data_offsets"] = [b + 2, e + 2]
    _rewrite_header(single, edit)
    with pytest.raises(CheckpointError, match="gap or overlap|spans|trailing|truncated"):
        Checkpoint.open(single)


def test_shape_does_not_match_bytes(single):
    _rewrite_header(single, lambda h: h["layer.1.w"].update(shape=[24, 17]))
    with pytest.raises(CheckpointError, match=r"'layer\.1\.w' spans .* need"):
        Checkpoint.open(single)


def test_unknown_dtype(single):
    _rewrite_header(single, lambda h: h["layer.1.w"].update(dtype="F12"))
    with pytest.raises(CheckpointError, match="unsupported dtype 'F12'"):
        Checkpoint.open(single)


def test_trailing_garbage(single):
    single.write_bytes(single.read_bytes() + b"\0" * 16)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        Checkpoint.open(single)


def test_missing_shard_names_it(tmp_path):
    out = write_checkpoint(_state(), tmp_path / "s", max_shard_bytes=2000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim.name}"):
        Checkpoint.open(out)


def test_index_and_shards_disagree(tmp_path):
    out = write_checkpoint(_state(), tmp_path / "s", max_shard_bytes=2000)
    index = json.loads((out / ck.INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = next(iter(index["weight_map"].values()))
    (out / ck.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost'"):
        Checkpoint.open(out)
    del index["weight_map"]["ghost"]
    del index["weight_map"]["layer.1.w"]
    (out / ck.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'layer\.1\.w'.*not in the index"):
        Checkpoint.open(out)


def test_corrupted_index(tmp_path):
    out = write_checkpoint(_state(), tmp_path / "s", max_shard_bytes=2000)
    (out / ck.INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Checkpoint.open(out)


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "two").mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "two" / "a.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "two" / "b.safetensors"))
    with pytest.raises(CheckpointError, match="2 .safetensors files but no"):
        Checkpoint.open(tmp_path / "two")


# --------------------------------------------------------------------------- compare

def test_compare_reports_shape_dtype_and_keys(tmp_path):
    a = Checkpoint.open(write_checkpoint(_state(), tmp_path / "a"))
    s = _state()
    s["layer.1.w"] = torch.zeros(24, 15)
    with pytest.raises(CheckpointError, match=r"'layer\.1\.w': shape \[24, 15\].*\[24, 16\]"):
        ck.compare(a, Checkpoint.open(write_checkpoint(s, tmp_path / "b")))
    # Two floating-point dtypes pair (the pre-trained tensor is cast, as in memory); a float
    # against an integer tensor does not.
    s = _state()
    s["layer.0.b"] = s["layer.0.b"].float()
    shared, _ = ck.compare(a, Checkpoint.open(write_checkpoint(s, tmp_path / "c")))
    assert "layer.0.b" in shared
    s["layer.0.b"] = s["layer.0.b"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"'layer\.0\.b': dtype I32.*F16"):
        ck.compare(a, Checkpoint.open(write_checkpoint(s, tmp_path / "c2")))
    s = _state()
    s["head.weight"] = torch.zeros(2, 16)
    d = Checkpoint.open(write_checkpoint(s, tmp_path / "d"))
    with pytest.raises(CheckpointError, match=r"only in the suspect.*'head\.weight'"):
        ck.compare(a, d)
    shared, new = ck.compare(a, d, allow_new_keys=True)
    assert new == ["head.weight"] and set(shared) == set(_state())
    # allow_new_keys keeps a head, not most of the model: a pre-trained checkpoint naming its
    # tensors otherwise would leave the suspect unpurified (the audit saw 4 of 5 tensors kept).
    s = {(k + "_renamed" if k != "layer.0.b" else k): v for k, v in _state().items()}
    g = Checkpoint.open(write_checkpoint(s, tmp_path / "g"))
    with pytest.raises(CheckpointError, match=r"\d+ % of its floating-point weights.*unpurified"):
        ck.compare(a, g, allow_new_keys=True)
    # A classifier saved by transformers wraps its base model's tensors under a prefix: say so
    # and how to pair them, instead of "share no tensor names".
    wrapped = {"bert." + k: v for k, v in _state().items()}
    wrapped["classifier.weight"] = torch.zeros(2, 16)
    e = Checkpoint.open(write_checkpoint(wrapped, tmp_path / "e"))
    for allow in (False, True):
        with pytest.raises(CheckpointError, match=r"under the prefix 'bert\.'.*base_prefix='bert\.'"):
            ck.compare(a, e, allow_new_keys=allow)
    # Paired under the prefix, the head outside it is new (kept) and needs no allow_new_keys.
    assert ck.base_model_prefix(a, e) == "bert." and ck.base_model_prefix(a, a) is None
    shared, new = ck.compare(a.under_prefix("bert."), e, base_prefix="bert.")
    assert new == ["classifier.weight"] and set(shared) == {"bert." + k for k in _state()}
    # ... but a base tensor the task model lacks is still a mismatch.
    del wrapped["bert.layer.0.b"]
    f = Checkpoint.open(write_checkpoint(wrapped, tmp_path / "f"))
    with pytest.raises(CheckpointError, match=r"only in the pre-trained checkpoint.*'bert\.layer\.0\.b'"):
        ck.compare(a.under_prefix("bert."), f, base_prefix="bert.")


# --------------------------------------------------------------------------- output protocol

def test_output_never_overwritten(tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(_state(), tmp_path / "o")
    with pytest.raises(CheckpointError, match="parent directory of the output does not exist"):
        write_checkpoint(_state(), tmp_path / "missing" / "o")


def test_full_disk_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "free_bytes", lambda path: 100)
    with pytest.raises(CheckpointError, match="not enough disk space.*100 are free"):
        write_checkpoint(_state(), tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_partial_run_needs_resume_and_same_settings(tmp_path):
    od = OutputDir(tmp_path / "o")
    od.start({"a": 1}, resume=False)
    with pytest.raises(CheckpointError, match="interrupted run: pass resume=True"):
        OutputDir(tmp_path / "o").start({"a": 1}, resume=False)
    with pytest.raises(CheckpointError, match=r"different settings or inputs \(differs in: a\)"):
        OutputDir(tmp_path / "o").start({"a": 2}, resume=True)
    assert OutputDir(tmp_path / "o").start({"a": 1}, resume=True) is True


def test_finished_rejects_a_damaged_shard(tmp_path):
    od = OutputDir(tmp_path / "o")
    od.start({}, resume=False)
    info = ck.TensorInfo("x", "F32", (4,), tmp_path, 0, 16, 0)
    lay = ck.ShardLayout.build("s.safetensors", [info], None)
    fd = od.begin_shard(lay)
    ck.pwrite_all(fd, ck.tensor_bytes(torch.arange(4.0)), lay.offsets["x"][0])
    import os
    os.close(fd)
    od.commit_shard(lay)
    assert od.finished(lay)
    path = od.shard_path(lay.name)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not od.finished(lay)
