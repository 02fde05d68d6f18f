"""Multi-process runs: the streaming engine split over ranks, and launching fine-tuning stages.

Streaming purification over ranks
---------------------------------
:func:`purify_fast.streaming.purify_checkpoint` takes a ``comm``. With :class:`TorchComm` (over
``torch.distributed``: gloo on CPU, nccl on GPU) every rank opens and validates the same inputs,
tensors are assigned to ranks by a deterministic byte-balancing rule
(:func:`purify_fast.streaming.assign_ranks`), Fine-purifying's score histogram is built by each rank
over its own tensors and summed with ``all_reduce`` (integer counts: the sum is exact, so the
threshold is the single-process one), and each rank ``pwrite``-s its tensors into the shared
temporary shard at their precomputed offsets; rank 0 creates, fsyncs, hashes and renames each
shard and writes the index and manifest. The output bytes equal a single-process run's. Ranks must
share the output filesystem (one node, or a shared filesystem across nodes).

Run it with ``torchrun --nproc-per-node N -m purify_fast.cli purify-checkpoint ...`` (the CLI calls
:func:`comm_from_env`), or from Python with :func:`run_local` (spawns N local processes).

Fine-tuning stages under ``accelerate``
--------------------------------------
The clean fine-tuning of Fine-mixing / Fine-purifying, MuScleLoRA training and MIMIC distillation
are ordinary PyTorch loops; :func:`prepare_stage` wraps a stage's model, optimizer and data loaders
with ``accelerate.Accelerator`` (DDP, or FSDP for models that do not fit one GPU) and
:func:`accelerate_launch_argv` builds the ``accelerate launch`` command line (multi-GPU,
multi-node, or ``--cpu`` with gloo, as CI uses with two processes).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist


class TorchComm:
    """The collective operations the streaming engine needs, over a ``torch.distributed`` group.

    ``all_reduce_sum_`` takes CPU tensors; under nccl they travel through the current CUDA device
    and come back, since nccl only reduces device memory.
    """

    def __init__(self, *, owns_group: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "init_process_group first, or use comm_from_env()")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        self._owns = owns_group

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        dev = self._device()
        moved = t.to(dev)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved.to(t.device))
        return t

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0,
                                   device=self._device() if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()


def comm_from_env(device: str | torch.device = "cpu") -> TorchComm | None:
    """A :class:`TorchComm` when launched by torchrun / ``accelerate launch`` (``WORLD_SIZE`` > 1),
    else None (single process). nccl when the work runs on ``device`` CUDA (each rank on GPU
    ``LOCAL_RANK``), gloo otherwise: CPU purification on a GPU machine must not need one GPU per
    rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if dist.is_initialized():
        return TorchComm()
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_device(device))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return TorchComm(owns_group=True)


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) under a launcher."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _entry(rank: int, world_size: int, init_file: str, backend: str, fn: Callable, args: tuple,
           results: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    comm = TorchComm(owns_group=True)
    try:
        value = fn(comm, *args)
        torch.save(value, Path(results) / f"rank{rank}.pt")
    except BaseException as exc:
        # Recorded with the time it happened: when one rank fails, the others fail next in their
        # collectives ("connection closed by peer"), and run_local reports the first failure.
        import pickle
        import traceback

        try:
            blob = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an unpicklable exception travels as text
            blob = None
        record = {"time": time.time(), "rank": rank, "exception": blob,
                  "text": "".join(traceback.format_exception(exc))}
        # Whole or not at all: the spawner may SIGTERM this process at any moment now.
        tmp = Path(results) / f".rank{rank}.err.tmp"
        tmp.write_bytes(pickle.dumps(record))
        os.replace(tmp, Path(results) / f"rank{rank}.err")
        raise
    finally:
        comm.close()


def _first_failure(results: str):
    """The exception of the rank that failed first, or None (see ``_entry``)."""
    import pickle

    records = []
    for path in Path(results).glob("rank*.err"):
        try:
            records.append(pickle.loads(path.read_bytes()))
        except Exception:  # noqa: BLE001 - an unreadable record must not hide the others
            continue
    if not records:
        return None
    first = min(records, key=lambda r: r["time"])
    exc = None
    if first["exception"] is not None:
        try:
            exc = pickle.loads(first["exception"])
        except Exception:  # noqa: BLE001
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(first["text"])
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(f"(raised on rank {first['rank']} of the local process group; the traceback "
                     f"there:\n{first['text']})")
    return exc


def run_local(fn: Callable, world_size: int, *args, backend: str = "gloo") -> list:
    """Run ``fn(comm, *args)`` in ``world_size`` fresh local processes joined by a process group;
    returns each rank's return value (which must be picklable). ``fn`` must be importable (a
    module-level function). An exception on any rank raises here: the first one raised (the
    other ranks' failures in their collectives follow from it), with that rank's traceback."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="purify_dist_") as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            mp.spawn(_entry, args=(world_size, init_file, backend, fn, args, tmp),
                     nprocs=world_size, join=True)
        except mp.ProcessExitedException:
            # A rank died without a Python exception (a signal, the OOM killer, os._exit): it
            # left no record, so spawn's own report, which names it, is the cause.
            raise
        except Exception as spawn_error:
            # mp.spawn reports whichever process it saw die first, often a rank that only lost
            # its peer; raise the first exception raised instead.
            first = _first_failure(tmp)
            if first is None:
                raise
            raise first from spawn_error
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]


def _purify_rank(comm: TorchComm, pretrained, suspect, out, kwargs: dict):
    from purify_fast.streaming import purify_checkpoint

    res = purify_checkpoint(pretrained, suspect, out, comm=comm, **kwargs)
    return {"tensors": res.tensors, "bytes_written": res.bytes_written,
            "threshold": res.threshold, "seconds": res.seconds}


def purify_checkpoint_local(pretrained, suspect, out, *, world_size: int = 2,
                            backend: str = "gloo", **kwargs) -> list[dict]:
    """:func:`purify_fast.streaming.purify_checkpoint` split over ``world_size`` local processes;
    returns per-rank summaries (tensors processed, bytes written, seconds)."""
    return run_local(_purify_rank, world_size, str(pretrained), str(suspect), str(out), kwargs,
                     backend=backend)


# --------------------------------------------------------------------------- accelerate stages

def accelerate_launch_argv(script: str | os.PathLike, script_args: Sequence[str] = (), *,
                           num_processes: int = 1, num_machines: int = 1, machine_rank: int = 0,
                           main_process_ip: str | None = None, main_process_port: int = 29500,
                           cpu: bool = False, mixed_precision: str = "no",
                           fsdp: bool = False, module: bool = False) -> list[str]:
    """The ``accelerate launch`` command line that runs a fine-tuning stage script (or, with
    ``module=True``, a module such as ``purify_fast.cli``, as ``python -m`` would).

    ``cpu=True`` runs ``num_processes`` CPU processes joined with gloo (how CI proves the
    multi-process path); otherwise one process per GPU, on ``num_machines`` nodes reaching rank 0
    at ``main_process_ip:main_process_port``. Several processes are always started through
    ``--multi_gpu`` (accelerate's ``--cpu`` flag starts a single process whatever
    ``--num_processes`` says); on a machine without GPUs :func:`prepare_stage` then asks
    accelerate for the CPU, which joins the processes with gloo. ``fsdp=True``
    shards parameters, gradients and optimizer state (full sharding, transformer-layer auto-wrap)
    for models that do not fit one GPU. Use :func:`prepare_stage` inside the script.
    """
    if num_processes < 1 or num_machines < 1:
        raise ValueError("num_processes and num_machines must be >= 1")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    if cpu and fsdp:
        raise ValueError("FSDP needs GPUs; use cpu=False or fsdp=False")
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(num_processes), "--num_machines", str(num_machines),
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if num_processes > 1 or num_machines > 1:
        # `--cpu` would make accelerate start a single process; `--multi_gpu` starts them all and
        # prepare_stage() then picks gloo on a machine without GPUs.
        argv.append("--multi_gpu")
    elif cpu:
        argv.append("--cpu")
    if num_machines > 1:
        if not main_process_ip:
            raise ValueError("multi-node runs need main_process_ip (the rank-0 node's address)")
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip,
                 "--main_process_port", str(main_process_port)]
    else:
        argv += ["--main_process_port", str(main_process_port)]
    if fsdp:
        argv += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
                 "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    if module:
        argv.append("--module")
    return argv + [str(script), *map(str, script_args)]


def prepare_stage(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *loaders,
                  scheduler=None, accelerator=None):
    """Wrap one fine-tuning stage for whatever ``accelerate launch`` set up (single process, DDP
    over gloo/nccl, or FSDP): returns ``(accelerator, model, optimizer, *loaders[, scheduler])``.

    In the stage's loop use ``accelerator.backward(loss)`` instead of ``loss.backward()``,
    ``accelerator.gather_for_metrics`` for evaluation, and ``accelerator.unwrap_model(model)``
    (with ``accelerator.is_main_process``) to save. Data loaders are split across ranks, so the
    global batch is ``world_size`` times the per-process one.
    """
    from accelerate import Accelerator

    if accelerator is None:
        from accelerate.utils import DistributedDataParallelKwargs

        # Without a GPU, accelerate only forms a (gloo) process group when asked for the CPU
        # explicitly; otherwise each launched process would train alone on its data split.
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # Frozen-backbone stages (LoRA, a reset head) can leave trainable parameters without a
        # gradient in some step; DDP must not wait for them.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        accelerator = Accelerator(cpu=multi and not torch.cuda.is_available(),
                                  kwargs_handlers=[ddp])
    prepared = accelerator.prepare(model, optimizer, *loaders,
                                   *([scheduler] if scheduler is not None else []))
    return (accelerator, *prepared)
