"""Multi-process paths with 2 CPU processes joined by gloo: the streaming engine split over ranks
writes the same bytes as one process, and a fine-tuning stage under `accelerate launch` trains
the same weights as one process on the global batch."""

import hashlib
import json
import socket
import subprocess
import textwrap

import pytest
import torch

from purify_fast.distributed import (
    accelerate_launch_argv,
    purify_checkpoint_local,
    run_local,
)
from purify_fast.streaming import llama_specs, purify_checkpoint, write_synthetic_llama

SPECS = llama_specs(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=96,
                    dtype=torch.bfloat16)


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {"pre": write_synthetic_llama(root / "pre", SPECS, role="pretrained",
                                          max_shard_bytes=12_000),
                "ft": write_synthetic_llama(root / "ft", SPECS, role="suspect",
                                         max_shard_bytes=12_000),
                "h": write_synthetic_llama(root / "h", SPECS, role="hessian")}


def test_two_gloo_ranks_write_the_single_process_bytes(model, tmp_path):
    freqs = torch.arange(96, dtype=torch.float32) * 10
    kw = {"method": "fine-purifying", "rho": 0.1, "e_pur": True, "top_n": 4}
    single = purify_checkpoint(model["pre"], model["ft"], tmp_path / "one", hessian=model["h"],
                               token_freqs=freqs, **kw)
    ranks = purify_checkpoint_local(model["pre"], model["ft"], tmp_path / "two", world_size=2,
                                    hessian=str(model["h"]), token_freqs=freqs, **kw)
    assert _digest(tmp_path / "two") == _digest(single.out)
    # both ranks worked, on disjoint shares that cover the model, and agreed on the threshold
    assert all(r["tensors"] > 0 for r in ranks)
    assert sum(r["tensors"] for r in ranks) == len(SPECS)
    assert {r["threshold"] for r in ranks} == {single.threshold}


def test_two_gloo_ranks_mix(model, tmp_path):
    single = purify_checkpoint(model["pre"], model["ft"], tmp_path / "one", method="mix",
                               rho=0.7, seed=11)
    purify_checkpoint_local(model["pre"], model["ft"], tmp_path / "two", world_size=2,
                            method="mix", rho=0.7, seed=11)
    assert _digest(tmp_path / "two") == _digest(single.out)


class ShardFault(RuntimeError):
    pass


def _fault_after_two_shards(name, n_done):
    if n_done == 2:
        raise ShardFault(f"injected after {name}")


def test_two_ranks_killed_then_resumed_match_single_process(model, tmp_path):
    kw = {"method": "fine-purifying", "rho": 0.2, "hessian": str(model["h"])}
    single = purify_checkpoint(model["pre"], model["ft"], tmp_path / "one", **kw)
    with pytest.raises(Exception, match="injected after"):
        purify_checkpoint_local(model["pre"], model["ft"], tmp_path / "two", world_size=2,
                                on_shard_done=_fault_after_two_shards, **kw)
    assert not (tmp_path / "two").exists()
    assert len(list((tmp_path / "two.partial").glob(".*.done"))) == 2
    purify_checkpoint_local(model["pre"], model["ft"], tmp_path / "two", world_size=2,
                            resume=True, **kw)
    assert _digest(tmp_path / "two") == _digest(single.out)


def _fails_on_rank_1(comm):
    if comm.rank == 1:
        raise RuntimeError("rank 1 failed")
    return comm.rank


def _fails_on_rank_1_after_rank_0_waits(comm):
    if comm.rank == 1:
        raise KeyError("rank 1 failed first")
    comm.barrier()  # fails once rank 1 is gone: a consequence, not the cause
    return comm.rank


def _rank_1_exits_without_an_exception(comm):
    import os

    if comm.rank == 1:
        os._exit(3)
    return comm.rank


def test_a_rank_that_dies_without_an_exception_is_named(tmp_path):
    """No Python exception, no record: spawn's own report (which names the rank) stands; and a
    record cut short by the spawner's SIGTERM never hides a readable one."""
    import pickle
    import time

    import torch.multiprocessing as mp

    from purify_fast.distributed import _first_failure

    with pytest.raises(mp.ProcessExitedException, match="process 1 terminated with exit code 3"):
        run_local(_rank_1_exits_without_an_exception, 2)
    (tmp_path / "rank0.err").write_bytes(b"")  # killed mid-write (before records were atomic)
    (tmp_path / "rank1.err").write_bytes(pickle.dumps(
        {"time": time.time(), "rank": 1, "exception": pickle.dumps(KeyError("cause")),
         "text": "Traceback ..."}))
    assert isinstance(_first_failure(str(tmp_path)), KeyError)


def test_a_failing_rank_raises_in_the_caller():
    with pytest.raises(Exception, match="rank 1 failed"):
        run_local(_fails_on_rank_1, 2)
    for _ in range(3):  # whichever process the spawner sees die first, the cause is reported
        with pytest.raises(KeyError, match="rank 1 failed first") as info:
            run_local(_fails_on_rank_1_after_rank_0_waits, 2)
        assert any("rank 1" in note for note in getattr(info.value, "__notes__", []))


def test_errors_on_rank_0_reach_every_rank(model, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(Exception, match="already exists"):
        purify_checkpoint_local(model["pre"], model["ft"], tmp_path / "taken", world_size=2,
                                method="mix")


def test_launch_argv():
    argv = accelerate_launch_argv("train.py", ["--x", 1], num_processes=4, fsdp=True,
                                  mixed_precision="bf16")
    assert argv[-3:] == ["train.py", "--x", "1"]
    assert "--multi_gpu" in argv and "--use_fsdp" in argv
    assert argv[argv.index("--num_processes") + 1] == "4"
    argv = accelerate_launch_argv("purify_fast.cli", ["env"], num_processes=2, module=True)
    assert argv[-3:] == ["--module", "purify_fast.cli", "env"]
    with pytest.raises(ValueError, match="main_process_ip"):
        accelerate_launch_argv("t.py", num_processes=8, num_machines=2)
    with pytest.raises(ValueError, match="FSDP needs GPUs"):
        accelerate_launch_argv("t.py", cpu=True, fsdp=True)
    with pytest.raises(ValueError, match="mixed_precision"):
        accelerate_launch_argv("t.py", mixed_precision="fp64")


_STAGE = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import DataLoader, TensorDataset
    from purify_fast.distributed import prepare_stage

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)

    def train(per_process_batch, prepare=True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dl = DataLoader(TensorDataset(*data()), batch_size=per_process_batch, shuffle=False)
        if prepare:
            acc, model, opt, dl = prepare_stage(model, opt, dl)
        for xb, yb in dl:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            acc.backward(loss) if prepare else loss.backward()
            opt.step()
        return (acc if prepare else None), model

    if __name__ == "__main__":
        acc, model = train(int(sys.argv[2]))
        if acc.is_main_process:
            torch.save({"world": acc.num_processes, "type": str(acc.distributed_type),
                        "state": acc.unwrap_model(model).state_dict()}, sys.argv[1])
""")


def _load_script(path, name):
    """Import a stage script written by a test, to run its function in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_under_accelerate_launch_two_cpu_processes(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(_STAGE)
    argv = accelerate_launch_argv(script, [tmp_path / "two.pt", 4], num_processes=2, cpu=True,
                                  main_process_port=_free_port())
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert two["world"] == 2 and "MULTI_CPU" in two["type"]
    # one process on the global batch (2 x 4) reaches the same weights: gradients were averaged
    _, one = _load_script(script, "stage").train(8, prepare=False)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-5, atol=1e-6)


def test_cli_under_torchrun_two_processes(model, tmp_path):
    """`torchrun -m purify_fast.cli purify-checkpoint` joins the ranks from the environment."""
    import sys

    args = ["purify-checkpoint", "--method", "mix", "--rho", "0.4", "--pretrained",
            str(model["pre"]), "--suspect", str(model["ft"]), "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "purify_fast.cli", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from purify_fast.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert _digest(tmp_path / "two") == _digest(tmp_path / "one")


_TRAIN = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from purify_fast.data import TextDataset
    from purify_fast.models.loading import default_model_path
    from purify_fast.training import train

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [("a good and lovely film " if i % 2 else "a bad and dull film ") + str(i)
             for i in range(48)]
    data = TextDataset(texts, [i % 2 for i in range(48)], 2, "toy")
    res = train(model, tok, data, data.take(16), epochs=2, lr=1e-3, batch_size=4, progress=False,
                keep_best=False)
    torch.save({"world": int(os.environ.get("WORLD_SIZE", "1")), "state": model.state_dict(),
                "init": init, "history": [(h["epoch"], h["dev_acc"]) for h in res.history],
                "steps": [h["steps"] for h in res.history], "loss": [h["loss"] for h in res.history],
                "best_epoch": res.best_epoch},
               os.path.join(sys.argv[1], "rank%s.pt" % os.environ.get("RANK", "0")))
""")


def _two_ranks(tmp_path, name: str, source: str, *args,
               mixed_precision: str = "no") -> tuple[dict, dict]:
    """Write ``source`` as a stage script, run it on 2 gloo CPU processes under
    ``accelerate launch`` (``sys.argv[1]`` = ``tmp_path``; ``--mixed_precision`` as given), and
    load what each rank saved there as ``rank{R}.pt``."""
    script = tmp_path / f"{name}.py"
    script.write_text(source)
    argv = accelerate_launch_argv(script, [tmp_path, *args], num_processes=2, cpu=True,
                                  main_process_port=_free_port(),
                                  mixed_precision=mixed_precision)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    return r0, r1


def _assert_same_trained_weights(r0: dict, r1: dict) -> None:
    """Both ranks hold bit-identical weights, and most tensors moved from their init."""
    for k, v in r0["state"].items():
        torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=0)
    moved = [k for k, v in r0["state"].items() if not torch.equal(v, r0["init"][k])]
    assert len(moved) > len(r0["state"]) // 2, moved


def test_train_loop_runs_data_parallel_under_accelerate_launch(tmp_path):
    """The fine-tune loop every defense uses joins the launched ranks (gloo, 2 CPU processes):
    both ranks end on the same weights and the same kept epoch, and the weights did train."""
    r0, r1 = _two_ranks(tmp_path, "train_stage", _TRAIN)
    assert r0["history"] == r1["history"] and r0["best_epoch"] == r1["best_epoch"]
    # each rank ran its half of the 12 batches of 4 per epoch, on different examples
    assert r0["steps"] == r1["steps"] == [6, 6]
    assert r0["loss"][1:] != r1["loss"][1:]
    _assert_same_trained_weights(r0, r1)


def test_only_rank_zero_writes_checkpoints(tmp_path, monkeypatch):
    from purify_fast.models.loading import save_pretrained_atomic

    class Saver:
        def save_pretrained(self, path, safe_serialization=True):
            (path / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setenv("RANK", "1")
    save_pretrained_atomic(Saver(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    save_pretrained_atomic(Saver(), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"


_MUSCLE = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from purify_fast.data import TextDataset
    from purify_fast.defenses.muscle_lora import train_muscle_lora
    from purify_fast.models.loading import default_model_path
    from purify_fast.nn import MuscleLoRAConfig, inject_muscle_lora

    def run(batch_size):
        tok = AutoTokenizer.from_pretrained(default_model_path())
        torch.manual_seed(0)
        # no dropout anywhere: the two-process run must be comparable with one process
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        inject_muscle_lora(model, MuscleLoRAConfig(alpha=1.0))
        texts = [("a good and lovely film " if i % 2 else "a bad and dull film ") + str(i)
                 for i in range(80)]
        data = TextDataset(texts, [i % 2 for i in range(80)], 2, "toy")
        train, dev = data.take(48, seed=0), data.take(32, seed=1)
        res = train_muscle_lora(model, tok, train, dev, epochs=2, lr=1e-3, batch_size=batch_size,
                                ref_pool_size=16, progress=False, keep_best=False)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return res, trained

    if __name__ == "__main__":
        res, trained = run(int(sys.argv[2]))
        torch.save({"world": int(os.environ.get("WORLD_SIZE", "1")), "trained": trained,
                    "steps": [h["steps"] for h in res.history], "ga": res.ga_steps,
                    "blended": res.blended_steps, "loss": [h["loss"] for h in res.history],
                    "ref_loss": [h.get("ref_loss") for h in res.history]},
                   os.path.join(sys.argv[1], "rank%s.pt" % os.environ.get("RANK", "0")))
""")


def test_muscle_lora_gradient_alignment_runs_data_parallel(tmp_path):
    """MuScleLoRA's GA trainer under `accelerate launch` (2 gloo processes, 4 examples each per
    step) lands on the weights one process reaches with the global batch of 8: both the training
    and the reference gradients (and the reference loss that picks the GA branch) are averaged
    over the ranks."""
    r0, r1 = _two_ranks(tmp_path, "muscle_stage", _MUSCLE, 4)
    # 48 training examples in batches of 4: each rank ran 6 of the 12 per epoch
    assert r0["steps"] == r1["steps"] == [6, 6]
    assert r0["ga"] + r0["blended"] == 12 and (r0["ga"], r0["blended"]) == (r1["ga"], r1["blended"])
    for k, v in r0["trained"].items():
        torch.testing.assert_close(r1["trained"][k], v, rtol=0, atol=0)
    one_res, one = _load_script(tmp_path / "muscle_stage.py", "muscle_stage").run(8)
    assert [h["steps"] for h in one_res.history] == [6, 6]
    assert (one_res.ga_steps, one_res.blended_steps) == (r0["ga"], r0["blended"])
    torch.testing.assert_close(r0["ref_loss"], [h["ref_loss"] for h in one_res.history],
                               rtol=1e-5, atol=1e-6)
    for k, v in one.items():
        torch.testing.assert_close(r0["trained"][k], v, rtol=1e-4, atol=1e-6, msg=k)


_MIMIC = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from purify_fast.data import TextDataset
    from purify_fast.defenses.mimic import MIMIC, MIMICConfig, make_student
    from purify_fast.models.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64))
    texts = ["a film about %s and %s, number %d" % (a, b, i) for i, (a, b) in
             enumerate(zip(["love", "war", "cats", "rain"] * 10, ["time", "fear", "hope"] * 14))]
    data = TextDataset(texts[:40], [0] * 40, 2, "toy")
    cfg = MIMICConfig(student_layers=1, epochs=2, batch_size=4, lr=1e-3, max_length=16,
                      mine_steps=20, mine_samples=32, progress=False)
    init = make_student(teacher, 1, None, cfg.seed).state_dict()
    res = MIMIC(cfg).fit(teacher, tok, data)
    torch.save({"world": int(os.environ.get("WORLD_SIZE", "1")), "state": res.student.state_dict(),
                "init": init, "steps": len(res.history), "weights": res.weights,
                "loss": [h["loss"] for h in res.history]},
               os.path.join(sys.argv[1], "rank%s.pt" % os.environ.get("RANK", "0")))
""")


def test_mimic_distillation_runs_data_parallel(tmp_path):
    """MIMIC under `accelerate launch` (2 gloo processes): each rank distils its half of the 10
    batches per epoch, on different inputs, and the two students end identical and trained."""
    r0, r1 = _two_ranks(tmp_path, "mimic_stage", _MIMIC)
    assert r0["steps"] == r1["steps"] == 2 * 5
    assert r0["weights"] == r1["weights"]
    assert r0["loss"] != r1["loss"]
    _assert_same_trained_weights(r0, r1)


def test_train_clean_cli_under_accelerate_launch_writes_once(tmp_path):
    """The README's `accelerate launch ... -m purify_fast.cli train-clean` command: two ranks
    train, one loadable merged model is written, once, with nothing temporary left behind."""
    args = ["train-clean", "--method", "muscle-lora", "--data", "rotten-tomatoes", "--model",
            "minilm", "--out", tmp_path / "clean", "--train-size", 32, "--dev-size", 40,
            "--test-size", 16, "--ref-pool-size", 16, "--epochs", 1, "--lr", "1e-3",
            "--max-length", 16, "--batch-size", 8, "--attack", "badnets", "--no-progress"]
    argv = accelerate_launch_argv("purify_fast.cli", args, num_processes=2, cpu=True,
                                  main_process_port=_free_port(), module=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert [h["steps"] for h in report["history"]] == [0, 2]  # 4 batches of 8, 2 per rank
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clean")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_an_input_error_on_another_rank_removes_the_partial(model, tmp_path):
    """A NaN in a tensor that rank 1 owns fails on every rerun; rank 1 removes <out>.partial
    itself (rank 0 never sees that tensor), so the next run with fixed inputs is not refused."""
    from purify_fast.checkpoint import Checkpoint, write_checkpoint
    from purify_fast.streaming import assign_ranks

    ft = Checkpoint.open(model["ft"])
    owner = assign_ranks(list(ft.tensors.values()), 2)
    key = next(k for k in ft.tensors if owner[k] == 1 and ft.tensors[k].is_float)
    tensors = {k: ft.load(k) for k in ft.tensors}
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    bad = write_checkpoint(tensors, tmp_path / "bad")
    # rank 1's own error, not rank 0's "connection closed" that follows it (run_local reports
    # the first failure)
    with pytest.raises(ValueError, match="was removed"):
        purify_checkpoint_local(model["pre"], bad, tmp_path / "out", world_size=2, method="mix",
                                rho=0.5)
    assert not (tmp_path / "out.partial").exists()
    assert not (tmp_path / "out").exists()
    purify_checkpoint_local(model["pre"], model["ft"], tmp_path / "out", world_size=2,
                            method="mix", rho=0.5)
    assert (tmp_path / "out").is_dir()


_RANK_STAGES = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel
    import purify_fast
    from purify_fast.data import TextDataset
    from purify_fast.defenses.mimic import MIMIC, MIMICConfig, make_student
    from purify_fast.defenses.muscle_lora import train_muscle_lora
    from purify_fast.models.loading import default_model_path
    from purify_fast.nn import MuscleLoRAConfig, inject_muscle_lora
    from purify_fast.training import train

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ARCH = dict(vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=2,
                intermediate_size=64, hidden_dropout_prob=0.5)
    # every text is 8 tokens long: each rank's batches of 4 have the same shape, and so do the
    # dropout masks drawn on them
    texts = [("a good and lovely film %d" if i % 2 else "a bad and dull film %d") % i
             for i in range(32)]
    data = TextDataset(texts, [i % 2 for i in range(32)], 2, "toy")
    probe = tok(["a good and lovely film 1", "a bad and dull film 2"], return_tensors="pt")

    def watch(model, dropout):
        # the first mask ``dropout`` draws in training mode, and the dtypes the Linear layers
        # compute in while training
        seen = {"training": set()}

        def on_dropout(mod, args, out):
            if mod.training and "mask" not in seen:
                seen["mask"] = out == 0

        def on_linear(mod, args, out):
            if mod.training:
                seen["training"].add(str(out.dtype))

        hooks = [dropout.register_forward_hook(on_dropout)]
        hooks += [m.register_forward_hook(on_linear) for m in model.modules()
                  if isinstance(m, torch.nn.Linear)]
        return seen, hooks

    def done(seen, hooks, model=None):
        for h in hooks:
            h.remove()
        seen["training"] = sorted(seen["training"])
        if model is not None:
            # a later evaluation of the caller's model: what its Linear layers compute in, and
            # whether autocast is on inside its forward
            after = set()
            hooks = [m.register_forward_hook(lambda m, a, o: after.add(
                         (str(o.dtype), torch.is_autocast_enabled("cpu"))))
                     for m in model.modules() if isinstance(m, torch.nn.Linear)]
            model.eval()
            with torch.no_grad():
                model(**probe)
            for h in hooks:
                h.remove()
            seen["after"] = sorted(after)
        return seen

    out = {"world": int(os.environ.get("WORLD_SIZE", "1")), "package": purify_fast.__file__}

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**ARCH, num_hidden_layers=1, num_labels=2))
    seen, hooks = watch(model, model.bert.embeddings.dropout)
    train(model, tok, data, None, epochs=1, lr=1e-3, batch_size=4, progress=False)
    out["train"] = done(seen, hooks, model)

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**ARCH, num_hidden_layers=1, num_labels=2))
    inject_muscle_lora(model, MuscleLoRAConfig(alpha=1.0))
    seen, hooks = watch(model, model.bert.embeddings.dropout)
    train_muscle_lora(model, tok, data.take(16, seed=0), data.take(16, seed=1), epochs=1,
                      lr=1e-3, batch_size=4, ref_pool_size=8, progress=False, keep_best=False)
    out["muscle_lora"] = done(seen, hooks, model)

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(**ARCH, num_hidden_layers=2))
    student = make_student(teacher, 1, None, 0)
    seen, hooks = watch(student, student.embeddings.dropout)
    MIMIC(MIMICConfig(epochs=1, batch_size=4, lr=1e-3, max_length=16, mine_steps=5,
                      mine_samples=16, progress=False)
          ).fit(teacher, tok, data.take(16), student=student)
    out["mimic"] = done(seen, hooks)

    torch.save(out, os.path.join(sys.argv[1], "rank%s.pt" % os.environ.get("RANK", "0")))
""")


@pytest.fixture(scope="module")
def bf16_stages(tmp_path_factory):
    """train(), MuScleLoRA's trainer and MIMIC, one after another in one
    `accelerate launch --mixed_precision bf16` of 2 gloo CPU processes: what each rank saw."""
    from pathlib import Path

    import purify_fast

    ranks = _two_ranks(tmp_path_factory.mktemp("bf16_stages"), "rank_stages", _RANK_STAGES,
                       mixed_precision="bf16")
    for r in ranks:  # the launched ranks ran the purify_fast under test (PYTHONPATH reached them)
        assert Path(r["package"]).resolve() == Path(purify_fast.__file__).resolve()
    return ranks


@pytest.mark.parametrize("stage", ["train", "muscle_lora", "mimic"])
def test_each_rank_draws_its_own_dropout_masks(bf16_stages, stage):
    """Each rank reseeds torch with seed + its process index once the stage is wrapped
    (training.rank_dropout_seed; MIMIC seeds its loop the same way): the first dropout mask the
    model's embedding dropout draws in a training step differs between the two ranks. Every
    rank used to seed alike and draw the very same masks."""
    m0, m1 = (r[stage]["mask"] for r in bf16_stages)
    assert m0.shape == m1.shape == (4, 8, 32)  # same-shaped batches: comparable masks
    assert 0.3 < m0.float().mean() < 0.7 and 0.3 < m1.float().mean() < 0.7  # p = 0.5
    assert not torch.equal(m0, m1), f"{stage}: both ranks drew the same dropout mask"


@pytest.mark.parametrize("stage", ["train", "muscle_lora"])
def test_a_bf16_launch_leaves_the_callers_model_computing_in_fp32(bf16_stages, stage):
    """Under `--mixed_precision bf16` accelerate patches the prepared model's forward with bf16
    autocast; the stage takes it off at the end (training.release_stage), so a later evaluation
    of the caller's model, outside any autocast, runs its matmuls in fp32. The patch used to stay
    (every later evaluation in bf16)."""
    for rank, r in enumerate(bf16_stages):
        # the launch did train in bf16: the Linear layers computed in bf16 during the stage
        assert r[stage]["training"] == ["torch.bfloat16"], (rank, r[stage]["training"])
        # afterwards: no autocast inside the forward, every Linear output fp32
        assert r[stage]["after"] == [("torch.float32", False)], (rank, r[stage]["after"])
