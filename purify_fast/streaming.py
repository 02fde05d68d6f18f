"""Streaming weight-space purification of whole checkpoints (7B-70B), tensor by tensor.

:func:`purify_checkpoint` runs Fine-mixing (``mix``), E-PUR (``e-pur``) or Fine-purifying
(``fine-purifying``) over a pre-trained and a suspect safetensors checkpoint and writes the purified
checkpoint with the suspect's layout (see :mod:`purify_fast.checkpoint` for the atomic, resumable
output protocol). Every per-tensor computation is a :mod:`purify_fast.ops` call, keyed by the
parameter name, so the streaming result equals the in-memory one bit for bit.

Pipeline and memory
-------------------
Three stages run concurrently:

1. a reader thread copies the next tensors (pre-trained, suspect, Hessian) out of the mmap'd files
   into a slot of a fixed input buffer pool (pinned when the device is CUDA);
2. the main thread moves them to the device (on a side CUDA stream, so the copy of tensor i+1
   overlaps the kernels of tensor i), runs the op, and puts the result in an output buffer;
3. a writer thread ``pwrite``-s the result at its precomputed offset in the output shard and
   hands the buffer back.

The pools are the memory bound: two input slots on CPU (three on CUDA), each big enough for the
largest tensor's inputs, and two output buffers; a stage that runs ahead waits for a free buffer
instead of allocating. Steady-state streaming allocates no tensor-sized host memory, so peak host
memory is a small multiple of the largest tensor whatever the model size (measured flat from 0.46
to 2.69 GB models in ``benchmarks/results_streaming.md``). The ops add their own per-call
temporaries on top: none on the compiled backends (their NaN/Inf check is a scan), and on the
readable ``torch`` backend a bool tensor per input for that check plus about ten int64 words per
element for the Philox mask, over 1M-element chunks (``ops.weight_space.TORCH_CHUNK``).

Fine-purifying's global threshold needs every score before any reset: pass 1 streams every tensor
through :func:`purify_fast.ops.score_histogram` (65,536 int64 bins, never the scores), a second
histogram pass runs only if the boundary bin needs refining, and the reset pass follows (a tied
head stored as a copy of the embedding is one parameter: it is scored once). The threshold is
stored in the manifest, so a resumed run does not recompute it and resets exactly the
same coordinates.

Diagonal Fisher for large models
--------------------------------
:class:`DiskFisher` accumulates ``H = mean_b g_b²`` with bounded memory. The choice: fp32
accumulators live in safetensors side files on disk (sharded and indexed like a checkpoint),
memory-mapped shared, and updated in place by :func:`purify_fast.ops.fisher_accumulate_` from a
post-accumulate-grad hook that frees each gradient as soon as it is folded in. RAM holds only the
page cache the kernel chooses to keep (it may evict it), the full-model gradient never exists at
once, and the finished files are directly a ``--hessian`` input for :func:`purify_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from purify_fast import ops
from purify_fast.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    CheckpointError,
    OutputDir,
    ShardLayout,
    TensorInfo,
    atomic_write_bytes,
    base_model_prefix,
    check_free_space,
    compare,
    dumps_json,
    fsync_path,
    load_tensor,
    pwrite_all,
    side_files,
    side_files_left_out,
    tensor_bytes,
)
from purify_fast.fileio import fsync_dir_if_possible
from purify_fast.ops.weight_space import NUM_BINS
from purify_fast.validation import int_at_least, one_of, real_in, seed_value

METHODS = ("mix", "e-pur", "fine-purifying")
DEFAULT_RHO = {"mix": 0.5, "fine-purifying": 0.1, "e-pur": 0.0}
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight",
                      "tok_embeddings.weight", "embed_in.weight")
_SCOPES = ("global", "tensor")


# --------------------------------------------------------------------------- configuration

@dataclass
class PurifyConfig:
    """What to do to a checkpoint. Every field is recorded in the manifest: resuming with other
    values is refused, because it would splice two different purifications together.

    * ``method``: ``mix`` (Fine-mixing: keep a share ``rho`` of the fine-tuned coordinates),
      ``fine-purifying`` (reset the top ``rho`` share by ``indicator`` to pre-trained) or ``e-pur``
      (only the embedding-row reset).
    * ``rho``: None takes the method default (mix 0.5, fine-purifying 0.1).
    * ``select``: mix selection, ``random`` (Philox keyed by seed and parameter name) or
      ``magnitude`` (largest ``|δ|`` inside each tensor).
    * ``indicator``/``eps``/``scope``: Fine-purifying score, and whether the threshold is one over
      the whole model (``global``) or one per tensor.
    * ``e_pur``: run E-PUR on the embedding first (implied by ``method="e-pur"``); ``top_n`` rows,
      or every row with score >= ``score_threshold``; ``special_ids`` are never ranked; ``c`` is the
      frequency floor in the log.
    * ``allow_new_keys``: tensors only in the suspect (a new head) are kept; otherwise an error.
      Either way, suspect-only tensors holding more than
      :data:`purify_fast.checkpoint.MAX_UNMATCHED_SHARE` of its weights are an error (an untied
      ``lm_head`` over a base that ties it pairs with the base's embedding instead).
    """

    method: str
    rho: float | None = None
    seed: int = 0
    select: str = "random"
    indicator: str = "drift_over_hessian"
    eps: float = 1e-8
    scope: str = "global"
    e_pur: bool = False
    embedding_key: str | None = None
    top_n: int = 200
    score_threshold: float | None = None
    c: float = 20.0
    special_ids: tuple[int, ...] = ()
    allow_new_keys: bool = False
    backend: str | None = None
    check_finite: bool = True

    def __post_init__(self):
        one_of("method", self.method, METHODS)
        if self.rho is None:
            self.rho = DEFAULT_RHO[self.method]
        self.rho = real_in("rho", self.rho, 0.0, 1.0)
        one_of("scope", self.scope, _SCOPES)
        one_of("select", self.select, ("random", "magnitude"))
        one_of("indicator", self.indicator, ops.INDICATORS)
        real_in("eps", self.eps, 0.0, lo_open=True)
        real_in("c", self.c, 1.0, lo_open=True)
        if self.method == "e-pur":
            self.e_pur = True
        int_at_least("top_n", self.top_n, 0)
        real_in("score_threshold", self.score_threshold, 0.0, optional=True)
        seed_value(self.seed)
        self.special_ids = tuple(sorted({int(i) for i in self.special_ids}))

    def record(self) -> dict:
        rec = asdict(self)
        rec["special_ids"] = list(self.special_ids)
        # The backend changes speed, not bytes: every backend must draw the reference's mask
        # and histogram bits (see purify_fast.reference.weight_space), so a run may resume on
        # another backend or device.
        rec.pop("backend")
        return rec


@dataclass
class PurifyResult:
    out: Path
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    resumed: bool
    shards_total: int
    shards_skipped: int
    threshold: float | None = None
    reset_rows: list[int] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    base_prefix: str | None = None  # the pre-trained base model's tensors were paired under it
    kept: list[str] = field(default_factory=list)  # suspect tensors without a counterpart, as they were
    cast: list[str] = field(default_factory=list)  # pre-trained tensors cast to the suspect's dtype
    tied: dict[str, str] = field(default_factory=dict)  # suspect head -> pre-trained embedding it pairs with
    # suspect head stored as a bitwise copy of its tied embedding -> that embedding
    tied_copies: dict[str, str] = field(default_factory=dict)
    # "name: why" for what sits beside the suspect's weights but was not carried into the output
    side_files_left_out: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- communication

class LocalComm:
    """The single-process stand-in for :class:`purify_fast.distributed.TorchComm`."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        pass

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj):
        return obj


def assign_ranks(infos: Sequence[TensorInfo], world_size: int) -> dict[str, int]:
    """Deterministic split of tensors over ranks, balancing bytes: biggest first to the least
    loaded rank (ties to the lowest rank)."""
    loads = [0] * world_size
    owner = {}
    for info in sorted(infos, key=lambda i: (-i.nbytes, i.key)):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[info.key] = r
        loads[r] += info.nbytes
    return owner


# --------------------------------------------------------------------------- pipeline helpers

_DONE = object()


def _prefetch(produce: Callable[[threading.Event], Iterable], depth: int = 1) -> Iterator:
    """Iterate ``produce(stop)`` in a background thread, at most ``depth`` items ahead; its
    exceptions are re-raised here, and abandoning the iteration sets ``stop``, which the producer
    must honour wherever it blocks."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in produce(stop):
                if not put(item):
                    return
        except _Cancelled:
            return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            errors.append(exc)
        put(_DONE)

    thread = threading.Thread(target=run, name="purify-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                if errors:
                    raise errors[0]
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


class _Writer:
    """pwrite results in a background thread so disk writes overlap the next tensor's compute."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="purify-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            job = self.q.get()
            try:
                if job is None:
                    return
                fd, tensor, offset, release = job
                try:
                    if self.error is None:
                        pwrite_all(fd, tensor_bytes(tensor), offset)
                finally:
                    release()
            except BaseException as exc:  # noqa: BLE001 - re-raised by check()
                self.error = exc
            finally:
                self.q.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, fd: int, tensor: torch.Tensor, offset: int,
            release: Callable[[], None] = lambda: None) -> None:
        """Queue a write; ``release()`` runs once the bytes are written (or the write failed)."""
        self.check()
        self.q.put((fd, tensor, offset, release))

    def drain(self) -> None:
        """Wait until every queued write has finished (or failed); raises nothing."""
        self.q.join()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


class _Cancelled(Exception):
    pass


class _Pool:
    """A fixed set of reusable host buffers (pinned when feeding a GPU).

    Steady-state streaming allocates nothing, so memory cannot creep up through allocator
    fragmentation as the model grows, and a reader that runs ahead blocks in :meth:`take` instead
    of queueing more tensors: the pool size *is* the memory bound. Buffers are allocated on first
    use, so a pool never costs more than the tensors that actually went through it.
    """

    def __init__(self, nbytes: int, count: int, pin: bool):
        self.nbytes = max(int(nbytes), 1)
        self.pin = pin
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(None)

    def take(self, stop: threading.Event | None = None) -> torch.Tensor:
        while True:
            try:
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    raise _Cancelled() from None
        if buf is None:
            buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


def _carve(buf: torch.Tensor, infos: Sequence[TensorInfo | None]) -> list[torch.Tensor | None]:
    """Views of ``buf`` shaped like ``infos`` (64-byte aligned, one after the other)."""
    views, cursor = [], 0
    for info in infos:
        if info is None:
            views.append(None)
            continue
        cursor += -cursor % 64
        raw = buf[cursor:cursor + info.nbytes]
        views.append(raw.view(info.torch_dtype).view(info.shape) if info.nbytes else
                      torch.empty(info.shape, dtype=info.torch_dtype))
        cursor += info.nbytes
    return views


def _carved_size(infos: Sequence[TensorInfo | None]) -> int:
    return sum(i.nbytes + 64 for i in infos if i is not None)


class _Device:
    """Host <-> device moves. On CUDA the host->device copy runs on a side stream so the copy of
    the next tensor overlaps the current kernels; on CPU it is the identity."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def stage(self, tensors: Sequence[torch.Tensor | None]):
        if not self.cuda:
            return list(tensors), None
        with torch.cuda.stream(self.stream):
            moved = [None if t is None else t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def wait(self, staged):
        """Make the current stream wait for a staged copy; returns the device tensors."""
        moved, event = staged
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in moved:
                if t is not None:
                    # The tensors were allocated on the side stream but are used (and freed) on
                    # the current one: tell the caching allocator.
                    t.record_stream(current)
        return moved


# --------------------------------------------------------------------------- the engine

def _load_freqs(token_freqs, vocab: int) -> torch.Tensor:
    if token_freqs is None:
        raise ValueError("E-PUR needs token_freqs: clean-corpus counts, one per vocabulary row "
                         "(--token-freqs FILE)")
    freqs = torch.as_tensor(token_freqs).flatten().to(torch.float32)
    if freqs.numel() != vocab:
        raise ValueError(f"token_freqs has {freqs.numel()} entries but the embedding has {vocab} "
                         f"rows")
    return freqs


def _ties_embeddings(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's output head is its input embedding, as transformers reads its
    ``config.json`` (the config alone, no weights): ``tie_word_embeddings`` when given, else the
    config class's default, True for GPT-2 (the Hub's ``gpt2`` config.json has no such key, and
    transformers leaves keys equal to the default out when it saves) and False for LLaMA,
    Mistral, Qwen2. A model type transformers does not know has its config.json read as a
    generic config (the key when given, else that class's default); no config.json, or one that
    cannot be read, says nothing: False."""
    root = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    try:
        raw = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    from transformers import AutoConfig, PretrainedConfig

    from purify_fast.models.loading import quiet_loading

    try:
        with quiet_loading():
            try:
                # trust_remote_code=False: a config with auto_map is refused, not asked about
                config = AutoConfig.from_pretrained(str(root), local_files_only=True,
                                                    trust_remote_code=False)
            except Exception:  # noqa: BLE001 - an unknown model_type, remote code, a bad field
                config = PretrainedConfig.from_dict(raw)
            # Composite models (LLaVA, ...) keep the language model's flag in its text config.
            text = (config.get_text_config(decoder=True) if hasattr(config, "get_text_config")
                    else config)
    except Exception:  # noqa: BLE001 - no config object at all; get_text_config refuses an
        return raw.get("tie_word_embeddings") is True  # ambiguous composite: the key alone
    tied = getattr(text, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(config, "tie_word_embeddings", None)
    return bool(tied)


def _tied_head_pairs(pre: Checkpoint, ft: Checkpoint) -> tuple[Checkpoint, dict[str, str]]:
    """A base that ties its output head to the embedding (:func:`_ties_embeddings`: its
    ``config.json`` as transformers reads it) saves no ``lm_head.weight``; a fine-tune saved
    untied does (it started as that embedding). Pair it with the pre-trained embedding: kept as
    a new tensor, it would leave the head (and any backdoor in it) unpurified. A base that just
    has no head (an ``AutoModel`` of an untied family) pairs nothing. Returns ``pre`` with those
    names added (reads go to the embedding) and ``{head: embedding}``."""
    tied = {}
    heads = [k for k in ft.tensors if k not in pre.tensors and k.endswith("lm_head.weight")]
    if not heads or not _ties_embeddings(pre):  # read the config (imports transformers) only then
        return pre, tied
    for key in heads:
        info = ft.tensors[key]
        embeddings = [k for k, i in pre.tensors.items()
                      if k.endswith(EMBEDDING_SUFFIXES) and i.shape == info.shape]
        if len(embeddings) == 1:
            tied[key] = embeddings[0]
    if not tied:
        return pre, tied
    return replace(pre, tensors={**pre.tensors, **{h: pre.tensors[e] for h, e in tied.items()}}), tied


def _same_bytes(a: TensorInfo, b: TensorInfo, chunk: int = 1 << 24) -> bool:
    """Whether two stored tensors are bitwise equal, read in chunks (the first one small: copies
    that differ usually differ at once)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        done, step = 0, 1 << 12
        while done < a.nbytes:
            n = min(step, a.nbytes - done)
            fa.seek(a.data_start + a.begin + done)
            fb.seek(b.data_start + b.begin + done)
            if fa.read(n) != fb.read(n):
                return False
            done, step = done + n, chunk
    return True


def _tied_copies(ft: Checkpoint, paired: set[str], emb_key: str | None) -> dict[str, str]:
    """``{copy: original}`` (``{head: embedding}`` unless ``emb_key`` names the head) for a
    suspect that stores its tied weight twice: an ``lm_head.weight`` bitwise equal to the one
    embedding of its shape and dtype, both in ``paired``, and a config that ties them
    (:func:`_ties_embeddings`). The model loads them as one parameter, so the copy is purified
    as the original is (same inputs, same mask key, same E-PUR rows); purified separately,
    Fine-mixing would draw two masks and transformers keep one copy, or neither."""
    copies = {}
    for head, info in ft.tensors.items():
        if not head.endswith("lm_head.weight") or head not in paired:
            continue
        embeddings = [k for k, i in ft.tensors.items()
                      if k != head and (k == emb_key or k.endswith(EMBEDDING_SUFFIXES))
                      and i.shape == info.shape and i.dtype == info.dtype]
        if emb_key in embeddings:
            embeddings = [emb_key]
        if (len(embeddings) == 1 and embeddings[0] in paired
                and _same_bytes(info, ft[embeddings[0]])):
            if head == emb_key:  # E-PUR told to rank the head's rows: the head is the original
                copies[embeddings[0]] = head
            else:
                copies[head] = embeddings[0]
    # the config last: it imports transformers, and an untied head differs in its first bytes
    return copies if copies and _ties_embeddings(ft) else {}


def _find_embedding(cfg: PurifyConfig, suspect: Checkpoint) -> str:
    if cfg.embedding_key is not None:
        if cfg.embedding_key not in suspect:
            raise CheckpointError(f"embedding_key {cfg.embedding_key!r} is not a tensor of "
                                  f"{suspect.path}")
        return cfg.embedding_key
    for key, info in suspect.tensors.items():
        if key.endswith(EMBEDDING_SUFFIXES) and len(info.shape) == 2:
            return key
    raise CheckpointError(f"{suspect.path}: no embedding tensor found (looked for names ending "
                          f"in {', '.join(EMBEDDING_SUFFIXES)}); pass embedding_key "
                          f"(--embedding-key)")


def epur_rows(pre_emb: torch.Tensor, ft_emb: torch.Tensor, freqs: torch.Tensor,
              cfg: PurifyConfig) -> list[int]:
    """Rows E-PUR resets: top ``cfg.top_n`` by :func:`ops.embedding_drift_scores` (or all with
    score >= ``cfg.score_threshold``), never a special token. Ties break by row index so every
    device picks the same rows."""
    scores = ops.embedding_drift_scores(pre_emb, ft_emb, freqs.to(pre_emb.device), c=cfg.c,
                                        backend=cfg.backend, check_finite=cfg.check_finite).cpu()
    special = [i for i in cfg.special_ids if 0 <= i < scores.numel()]
    if special:
        scores[special] = -math.inf
    if cfg.score_threshold is not None:
        rows = torch.nonzero(scores >= float(cfg.score_threshold)).flatten()
    else:
        order = torch.sort(scores, descending=True, stable=True).indices
        n = min(cfg.top_n, scores.numel() - len(special))
        rows = order[:n]
    return sorted(int(r) for r in rows)


def _float_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


class _Plan:
    """Everything decided before any output byte: keys, actions, layouts, owners."""

    def __init__(self, cfg: PurifyConfig, pre: Checkpoint, ft: Checkpoint,
                 hessian: Checkpoint | None, world_size: int, base_prefix: str | None = None):
        shared, self.new = compare(pre, ft, allow_new_keys=cfg.allow_new_keys,
                                   base_prefix=base_prefix)
        shared_set = set(shared)
        if hessian is not None and cfg.method != "fine-purifying":
            raise ValueError(f"a Hessian is only used by fine-purifying, not {cfg.method!r}; "
                             f"drop --hessian")
        # An empty tensor has nothing to purify: it is copied as it is.
        self.processed = ([k for k in shared if ft[k].is_float and ft[k].numel > 0]
                          if cfg.method != "e-pur" else [])
        self.emb_key = _find_embedding(cfg, ft) if cfg.e_pur else None
        # each copy is computed from its embedding's inputs under that embedding's name
        self.copies = _tied_copies(ft, shared_set, self.emb_key)
        # Pre-trained tensors of another floating-point dtype (an fp16 base under a bf16
        # fine-tune) are cast to the suspect's as they are read, as the in-memory defenses do.
        self.cast = [k for k in shared if pre[k].dtype != ft[k].dtype
                     and (k in self.processed or k == self.emb_key)]
        if self.emb_key is not None and self.emb_key not in shared_set:
            raise CheckpointError(f"embedding {self.emb_key!r} has no pre-trained counterpart in "
                                  f"{pre.path}")
        if hessian is not None:
            for k in self.processed:
                if k not in hessian:
                    raise CheckpointError(f"{hessian.path}: no Hessian for tensor {k!r}")
                if hessian[k].shape != ft[k].shape:
                    raise CheckpointError(f"{hessian[k].file}: Hessian {k!r} has shape "
                                          f"{list(hessian[k].shape)}, the model "
                                          f"{list(ft[k].shape)}")
                if not hessian[k].is_float:
                    raise CheckpointError(f"{hessian[k].file}: Hessian {k!r} has non-float dtype "
                                          f"{hessian[k].dtype}")
        elif cfg.method == "fine-purifying" and cfg.indicator in ("drift_over_hessian",
                                                                   "inv_hessian", "product"):
            raise ValueError(f"fine-purifying with indicator {cfg.indicator!r} needs a Hessian "
                             f"checkpoint (--hessian DIR, written by `purify-fast fisher` or DiskFisher)")
        self.processed_set = set(self.processed)
        self.layouts = [ShardLayout.build(f.name, [ft[k] for k in ft.keys_in(f)],
                                          ft.metadata.get(f.name))
                        for f in ft.files]
        self.owner = assign_ranks(list(ft.tensors.values()), world_size)
        self.index = None
        if ft.sharded:
            # The suspect's index metadata (transformers also writes total_parameters) is kept;
            # total_size is recomputed from what is written.
            self.index = {"metadata": {**ft.index_metadata,
                                       "total_size": sum(i.nbytes for i in ft.tensors.values())},
                          "weight_map": {k: ft[k].file.name for k in sorted(ft.keys())}}


def purify_checkpoint(pretrained: str | os.PathLike | Checkpoint,
                      suspect: str | os.PathLike | Checkpoint,
                      out: str | os.PathLike,
                      config: PurifyConfig | None = None, *,
                      hessian: str | os.PathLike | Checkpoint | None = None,
                      token_freqs=None,
                      device: str | torch.device = "cpu",
                      resume: bool = False,
                      progress: bool = False,
                      comm=None,
                      on_shard_done: Callable[[str, int], None] | None = None,
                      **options) -> PurifyResult:
    """Purify ``suspect`` against ``pretrained`` into the new directory ``out``, streaming.

    ``config`` (or keyword ``options`` building one, e.g. ``method="mix", rho=0.3``) says what to
    do; ``hessian`` is a safetensors checkpoint with an fp32 diagonal Hessian per processed tensor
    (Fine-purifying); ``token_freqs`` the clean-corpus count of every vocabulary row (E-PUR).
    ``comm`` splits the work over processes (:mod:`purify_fast.distributed`); the bytes written do
    not depend on it, on ``device``, or on the backend. ``on_shard_done(name, n_done)`` is called
    after each shard is committed (progress hooks, fault-injection tests). A tied head that the
    suspect stores as a bitwise copy of its embedding gets the embedding's purified tensor
    (:func:`_tied_copies`, :attr:`PurifyResult.tied_copies`); a global threshold counts it once.

    Everything is validated before the first output byte; errors name the file and tensor.
    """
    t_start = time.perf_counter()
    cfg = config if config is not None else PurifyConfig(**options)
    if config is not None and options:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
    comm = comm or LocalComm()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but torch sees no CUDA device")
    stages: dict[str, float] = {}

    def opened(x, what):
        if x is None or isinstance(x, Checkpoint):
            return x
        try:
            return Checkpoint.open(x)
        except CheckpointError as exc:
            raise CheckpointError(f"{what} checkpoint: {exc}") from None

    pre = opened(pretrained, "pre-trained")
    ft = opened(suspect, "suspect")
    hes = opened(hessian, "hessian")
    # A base model saved on its own (no "bert." prefix) pairs with the task model built on it.
    base_prefix = base_model_prefix(pre, ft)
    if base_prefix is not None:
        pre = pre.under_prefix(base_prefix)
    pre, tied = _tied_head_pairs(pre, ft)
    plan = _Plan(cfg, pre, ft, hes, comm.world_size, base_prefix)
    freqs = None
    if cfg.e_pur:
        freqs = _load_freqs(token_freqs, ft[plan.emb_key].shape[0])

    od = OutputDir(out)
    run = {"config": cfg.record(), "pretrained": pre.fingerprint(), "suspect": ft.fingerprint(),
           "hessian": hes.fingerprint() if hes is not None else None,
           "token_freqs_sha256": (hashlib.sha256(tensor_bytes(freqs)).hexdigest()
                                  if freqs is not None else None)}
    if plan.copies:  # only then: runs without tied copies resume as before
        run["tied_copies"] = plan.copies
        if cfg.method == "fine-purifying" and cfg.scope == "global":
            # earlier runs stored a threshold that scored the copy twice: refuse to resume them
            run["copies_scored_once"] = True

    # Rank 0 owns the directory and the manifest; the others learn the outcome from it, so an
    # error on rank 0 (existing output, full disk) stops every rank instead of hanging them.
    status = None
    if comm.rank == 0:
        try:
            od.check_target()
            already = 0
            if od.partial.exists() and resume:
                already = sum((od.partial / lay.name).stat().st_size for lay in plan.layouts
                              if (od.partial / lay.name).is_file())
            needed = sum(lay.size for lay in plan.layouts) - already
            needed += sum(p.stat().st_size for p in side_files(ft))
            check_free_space(od.out.parent, needed)
            resumed = od.start(run, resume=resume)
            if cfg.e_pur and "reset_rows" not in od.state:
                t0 = time.perf_counter()
                try:
                    rows = epur_rows(pre.load(plan.emb_key).to(device, ft[plan.emb_key].torch_dtype),
                                     ft.load(plan.emb_key).to(device),
                                     freqs, cfg)
                except (ValueError, TypeError) as exc:
                    # An input error (NaN in the embedding) recurs on every rerun: leave no
                    # .partial behind that would block the next one (nothing was written yet).
                    if not resumed:
                        shutil.rmtree(od.partial, ignore_errors=True)
                    raise type(exc)(f"tensor {plan.emb_key!r} ({ft[plan.emb_key].file}): "
                                    f"{exc}") from exc
                od.state["reset_rows"] = rows
                od.save_manifest()
                stages["e-pur scores"] = time.perf_counter() - t0
            status = ("ok", resumed, od.manifest)
        except Exception as exc:  # noqa: BLE001 - forwarded to every rank, then re-raised
            status = ("error", exc, None)
    status = comm.broadcast_object(status)
    if status[0] == "error":
        raise status[1]
    resumed = status[1]
    od.manifest = status[2]
    reset_rows = torch.tensor(od.state.get("reset_rows", []), dtype=torch.int64)

    dev = _Device(device)
    mine = [k for k in ft.tensors if plan.owner[k] == comm.rank]
    bytes_read = 0
    emb_rows = reset_rows.to(device)

    def source(k: str) -> str:
        """The tensor whose inputs and name ``k`` is computed from (itself unless a tied copy)."""
        return plan.copies.get(k, k)

    def needs_pre(k: str) -> bool:
        return k in plan.processed_set or k == plan.emb_key

    def item_infos(k: str):
        k = source(k)
        h = hes[k] if (hes is not None and k in plan.processed_set) else None
        return (pre[k] if needs_pre(k) else None), ft[k], h

    # Buffers: on CPU one item is computed while the next is read (2 slots); on CUDA one more is
    # in flight host->device. Outputs: one being computed into, one being written.
    in_pool = _Pool(max((_carved_size(item_infos(k)) for k in mine), default=1),
                    3 if dev.cuda else 2, pin=dev.cuda)
    out_pool = _Pool(max((ft[k].nbytes for k in mine), default=1), 2, pin=dev.cuda)

    def read(keys: Sequence[str]):
        def produce(stop: threading.Event):
            nonlocal bytes_read
            for k in keys:
                infos = item_infos(k)
                slot = in_pool.take(stop)
                views = _carve(slot, infos)
                for info, view in zip(infos, views):
                    if info is not None:
                        load_tensor(info, out=view)
                        bytes_read += info.nbytes
                if infos[0] is not None and infos[0].dtype != infos[1].dtype:
                    views[0] = views[0].to(infos[1].torch_dtype)  # see _Plan.cast
                yield (k, slot, *views)
        return _prefetch(produce)

    def staged(items):
        """Yield ``(key, release, p, t, h)`` on the device. On CUDA item i+1's host->device copy
        is issued before item i is handed out, so it overlaps item i's kernels; ``release()``
        gives the host slot back once its copy has finished."""
        def entry(item):
            key, slot, *host = item
            st = dev.stage(host)

            def release():
                if st[1] is not None:
                    st[1].synchronize()
                in_pool.give(slot)
            return key, release, st
        if not dev.cuda:
            for key, slot, *host in items:
                yield (key, lambda slot=slot: in_pool.give(slot), *host)
            return
        it = iter(items)
        nxt = next(it, None)
        pending = None if nxt is None else entry(nxt)
        while pending is not None:
            key, release, st = pending
            nxt = next(it, None)
            pending = None if nxt is None else entry(nxt)
            yield (key, release, *dev.wait(st))

    def wrap(key, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, with the tensor and its file named in any input error.

        Such an error (NaN in a tensor, a negative Hessian) will recur on every rerun with these
        inputs and options, so the rank that meets it removes ``<out>.partial``: a resume could
        never finish it, and a fresh run would be refused while it exists. Any rank, not only
        rank 0: the tensor may be another rank's share, and the launcher stops rank 0 (waiting
        in a collective) when this rank exits. The other ranks' writes into the removed
        directory fail, which is the outcome anyway."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            note = ""
            if od.partial.exists():
                shutil.rmtree(od.partial, ignore_errors=True)
                note = (f" (the unfinished {od.partial.name}, with any shards it had finished, "
                        f"was removed: no rerun on these inputs and options could complete it)")
            raise type(exc)(f"tensor {key!r} ({ft[key].file}): {exc}{note}") from exc

    def epur_first(key: str, t: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        # E-PUR runs before everything else: the embedding's flagged rows go back to
        # pre-trained. `t` is this item's private buffer, so it is edited in place.
        if key == plan.emb_key and emb_rows.numel():
            t[emb_rows] = p[emb_rows]
        return t

    # ---- Fine-purifying global threshold (two histogram passes at most), shared by all ranks
    threshold = None
    # A global target of 0 coordinates (rho 0, or rho·N < 0.5) resets nothing: its threshold is
    # +inf, which an infinite score (δ² overflowing over H + eps) would still meet.
    reset_nothing = False
    global_fp = cfg.method == "fine-purifying" and cfg.scope == "global"
    if global_fp and "threshold_bits" in od.state:
        threshold = _bits_float(od.state["threshold_bits"])
        reset_nothing = bool(od.state.get("reset_nothing", False))
    elif global_fp:
        t0 = time.perf_counter()
        # a tied copy is its embedding's parameter: scored once, or rho·N would count it twice
        hist_keys = [k for k in mine if k in plan.processed_set and k not in plan.copies]

        def histogram_pass(hist):
            for key, release, p, t, h in staged(read(hist_keys)):
                try:
                    t = epur_first(source(key), t, p)
                    hist = wrap(key, ops.score_histogram, p, t, h, indicator=cfg.indicator,
                                eps=cfg.eps, hist=hist, backend=cfg.backend,
                                check_finite=cfg.check_finite)
                finally:
                    release()
            hist.counts = comm.all_reduce_sum_(hist.counts.cpu())
            return hist

        empty = ops.ScoreHistogram(cfg.indicator, cfg.eps,
                                   torch.zeros(NUM_BINS, dtype=torch.int64))
        hist = histogram_pass(empty)
        total = torch.tensor([hist.total], dtype=torch.int64)
        hist.total = int(comm.all_reduce_sum_(total).item())
        thr = ops.select_threshold(hist, cfg.rho)
        if not thr.exact:
            thr = ops.select_threshold(histogram_pass(thr.refine()), cfg.rho)
        threshold = thr.reset_value  # as ops.reset_by_score applies a Threshold: never 0
        reset_nothing = thr.target == 0
        if comm.rank == 0:
            od.state["threshold_bits"] = _float_bits(threshold)
            if reset_nothing:  # only then: other manifests stay as they were
                od.state["reset_nothing"] = True
            od.save_manifest()
        stages["threshold passes"] = time.perf_counter() - t0

    # ---- which shards remain (rank 0 re-hashes finished ones; everyone follows its answer)
    todo = None
    if comm.rank == 0:
        todo = [lay.name for lay in plan.layouts if not (resumed and od.finished(lay))]
    todo = comm.broadcast_object(todo)
    skipped = len(plan.layouts) - len(todo)

    def compute(key, p, t, h, out):
        """The purified tensor, written into ``out`` when computing on the CPU."""
        key = source(key)  # a tied copy draws its embedding's mask
        t = epur_first(key, t, p)
        if key not in plan.processed_set:
            return out.copy_(t) if out is not None else t
        common = {"backend": cfg.backend, "out": out}
        if cfg.method == "mix":
            return ops.mix_weights(p, t, cfg.rho, seed=cfg.seed, key=key, select=cfg.select,
                                   check_finite=cfg.check_finite, **common)
        if reset_nothing:
            return out.copy_(t) if out is not None else t
        if threshold is None:  # per-tensor scope
            thr = ops.global_score_threshold(lambda: [(p, t, h)], cfg.rho, indicator=cfg.indicator,
                                             eps=cfg.eps, backend=cfg.backend,
                                             check_finite=cfg.check_finite)
            return ops.reset_by_score(p, t, h, thr, check_finite=False, **common)
        return ops.reset_by_score(p, t, h, threshold, indicator=cfg.indicator, eps=cfg.eps,
                                  check_finite=cfg.check_finite, **common)

    t0 = time.perf_counter()
    bar = None
    if progress and comm.rank == 0:
        from tqdm.auto import tqdm

        total_bytes = sum(lay.size for lay in plan.layouts if lay.name in todo)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"{cfg.method} shards")
    layouts = {lay.name: lay for lay in plan.layouts}
    bytes_written = 0
    done = skipped
    writer = _Writer()
    try:
        for name in todo:
            lay = layouts[name]
            fd = od.begin_shard(lay) if comm.rank == 0 else None
            comm.barrier()
            if fd is None:
                fd = od.open_shard(lay)
            try:
                keys = [k for k in lay.offsets if plan.owner[k] == comm.rank]
                for key, release, p, t, h in staged(read(keys)):
                    buf = out_pool.take()
                    host = _carve(buf, [ft[key]])[0]
                    try:
                        if dev.cuda:
                            host.copy_(wrap(key, compute, key, p, t, h, None))
                        else:
                            wrap(key, compute, key, p, t, h, host)
                    except BaseException:
                        out_pool.give(buf)
                        raise
                    finally:
                        release()
                    writer.put(fd, host, lay.offsets[key][0],
                               release=lambda buf=buf: out_pool.give(buf))
                    bytes_written += host.nbytes
                    if bar is not None:
                        bar.update(host.nbytes)
            finally:
                # the fd must outlive every queued write, whether or not this shard succeeded
                writer.drain()
                os.close(fd)
            writer.check()
            comm.barrier()
            if comm.rank == 0:
                od.commit_shard(lay)
            done += 1
            if on_shard_done is not None:
                on_shard_done(name, done)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    stages["purify pass"] = time.perf_counter() - t0

    comm.barrier()
    if comm.rank == 0:
        od.finalize(plan.layouts, plan.index, side_files(ft))
    comm.barrier()
    return PurifyResult(out=od.out, method=cfg.method, tensors=len(mine), bytes_read=bytes_read,
                        bytes_written=bytes_written, seconds=time.perf_counter() - t_start,
                        resumed=resumed, shards_total=len(plan.layouts), shards_skipped=skipped,
                        threshold=threshold, reset_rows=[int(r) for r in reset_rows],
                        stage_seconds=stages, base_prefix=base_prefix, kept=list(plan.new),
                        cast=list(plan.cast), tied=dict(tied), tied_copies=dict(plan.copies),
                        side_files_left_out=side_files_left_out(ft))


# --------------------------------------------------------------------------- in-memory twin

def purify_state_dict(pretrained: dict[str, torch.Tensor], suspect: dict[str, torch.Tensor],
                      config: PurifyConfig | None = None, *, hessian=None, token_freqs=None,
                      tied_copies: dict[str, str] | None = None,
                      **options) -> dict[str, torch.Tensor]:
    """The same purification on in-memory state dicts (all tensors resident): what the streaming
    engine must reproduce byte for byte, and a convenience for small models. ``tied_copies``
    (``{head: embedding}``, :attr:`PurifyResult.tied_copies`) purifies each head as its
    embedding: from the embedding's inputs, under its name; a global threshold counts it once
    (one parameter), so ``rho`` is a share of the distinct parameters and the head's entries are
    reset exactly where the embedding's are."""
    cfg = config if config is not None else PurifyConfig(**options)
    out = {}
    emb_key = None
    ft = dict(suspect)
    pretrained = {k: (v.to(ft[k].dtype) if k in ft and v.is_floating_point()
                      and ft[k].is_floating_point() else v) for k, v in pretrained.items()}
    copies = dict(tied_copies or {})
    if copies:
        pretrained.update({h: pretrained[e] for h, e in copies.items()})
        if hessian is not None:
            hessian = {**hessian, **{h: hessian[e] for h, e in copies.items()}}
    if cfg.e_pur:
        emb_key = cfg.embedding_key or next(
            (k for k, v in ft.items() if k.endswith(EMBEDDING_SUFFIXES) and v.dim() == 2), None)
        if emb_key is None:
            raise ValueError("no embedding tensor found; pass embedding_key")
        freqs = _load_freqs(token_freqs, ft[emb_key].shape[0])
        rows = torch.tensor(epur_rows(pretrained[emb_key], ft[emb_key], freqs, cfg),
                            dtype=torch.int64)
        if rows.numel():
            e = ft[emb_key].clone()
            e[rows] = pretrained[emb_key][rows]
            ft[emb_key] = e
    ft.update({h: ft[e] for h, e in copies.items()})
    keys = [k for k in ft if k in pretrained and ft[k].is_floating_point() and ft[k].numel()
            and cfg.method != "e-pur"]
    threshold = None
    if cfg.method == "fine-purifying" and cfg.scope == "global":
        scored = [k for k in keys if k not in copies]  # a tied copy counts once, as in the engine
        threshold = ops.global_score_threshold(
            lambda: [(pretrained[k], ft[k], None if hessian is None else hessian[k])
                     for k in scored],
            cfg.rho, indicator=cfg.indicator, eps=cfg.eps, backend=cfg.backend)
    for k, t in ft.items():
        if k not in keys:
            out[k] = t
        elif cfg.method == "mix":
            out[k] = ops.mix_weights(pretrained[k], t, cfg.rho, seed=cfg.seed,
                                     key=copies.get(k, k), select=cfg.select, backend=cfg.backend)
        else:
            h = None if hessian is None else hessian[k]
            thr = threshold
            if thr is None:
                one = [(pretrained[k], t, h)]
                thr = ops.global_score_threshold(lambda one=one: one, cfg.rho,
                                                 indicator=cfg.indicator, eps=cfg.eps,
                                                 backend=cfg.backend)
            out[k] = ops.reset_by_score(pretrained[k], t, h, thr, backend=cfg.backend)
    return out


# --------------------------------------------------------------------------- diagonal Fisher

# Float buffers that older checkpoints saved and transformers now drops on load (it recomputes
# them): per-layer rotary ``inv_freq`` of LLaMA-family models, GPT-2's causal-mask buffers.
_DROPPED_BUFFERS = (".inv_freq", ".masked_bias", ".attn.bias")


def fisher_checkpoint_keys(model: torch.nn.Module, ckpt: Checkpoint
                           ) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """What a :class:`DiskFisher` of ``model`` needs beyond its parameters to cover every
    floating-point tensor of ``ckpt``, the checkpoint it was loaded from (``purify_checkpoint``
    wants a Hessian for each): ``(aliases, zeros)`` for DiskFisher's arguments of those names.
    A tied weight stored under a second name (``lm_head.weight`` beside the embedding) shares the
    parameter's Fisher (:func:`purify_checkpoint` then purifies the two copies as one); a tensor
    that gets no gradient (a saved float buffer, one transformers drops on load such as an old
    LLaMA's per-layer ``rotary_emb.inv_freq``, a frozen parameter) has Fisher 0.

    A checkpoint tensor that is none of these is an error, raised before any batch: transformers
    renamed or fused it on load (mixture-of-experts weights), so no Fisher key could name it."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # what the model class says transformers ignores on load (GPT-2: attn.bias, crossattention.bias)
    ignored = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or []
    owner_of = {id(p): n for n, p in trainable.items()}
    every = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    aliases, zeros, unknown = {}, {}, []
    for key, info in ckpt.tensors.items():
        if not info.is_float:
            continue
        if key in trainable:
            if tuple(trainable[key].shape) != tuple(info.shape):
                unknown.append(f"{key} (shape {list(info.shape)} stored, "
                               f"{list(trainable[key].shape)} loaded)")
            continue
        tensor = every.get(key, buffers.get(key))
        if tensor is None and (key.endswith(_DROPPED_BUFFERS)
                               or any(re.search(p, key) for p in ignored)):
            zeros[key] = tuple(info.shape)  # a buffer transformers drops on load: no gradient
        elif tensor is None or tuple(tensor.shape) != tuple(info.shape):
            unknown.append(key)
        elif id(tensor) in owner_of:
            aliases[key] = owner_of[id(tensor)]
        else:
            zeros[key] = tuple(info.shape)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} floating-point tensor(s) of {ckpt.path} have no counterpart in the "
            f"model as transformers loaded it (e.g. {', '.join(unknown[:3])}): it renamed or "
            f"reshaped them on load (mixture-of-experts weights are fused), so a Fisher keyed by "
            f"the loaded names could not feed purify-checkpoint. Use purify-checkpoint "
            f"--indicator drift, which needs no Hessian")
    return aliases, zeros


class DiskFisher:
    """Diagonal Fisher ``H_i = mean over batches of g_i²`` with fp32 accumulators on disk.

    ``DiskFisher(model, out_dir)`` lays out one safetensors file per group of parameters (groups
    of at most ``max_shard_bytes`` fp32 bytes, named and indexed like a Hugging Face checkpoint),
    filled with zeros, and maps each file shared into memory. While active (``with fisher:``),
    each trainable parameter's post-accumulate-grad hook folds its gradient into the mapped
    accumulator with :func:`purify_fast.ops.fisher_accumulate_` and then drops the gradient, so no
    full-model gradient or fp32 copy is ever resident; the page cache holding the mapped files is
    the operating system's to evict. Call :meth:`step` once per batch (after ``backward``) and
    :meth:`finish` at the end: it divides by the number of batches, flushes, fsyncs and returns the
    directory, a checkpoint ready for ``purify_checkpoint(..., hessian=...)``.

    The files are filled in ``<out_dir>.partial`` and renamed to ``out_dir`` by :meth:`finish`, so
    ``out_dir`` never holds a half-accumulated Fisher: a killed run leaves only the ``.partial``
    directory, which a new DiskFisher refuses (with its name) until it is removed.

    ``names`` maps parameters to checkpoint keys (default: ``model.named_parameters()`` names,
    which match ``model.state_dict()`` and so ``save_pretrained`` output). ``aliases`` adds
    entries holding another entry's Fisher (``{alias: parameter name}``: a tied weight the
    checkpoint stores twice), ``zeros`` entries that stay 0 (``{key: shape}``: a tensor with no
    gradient, such as a float buffer saved in the checkpoint); see :func:`fisher_checkpoint_keys`.
    """

    def __init__(self, model: torch.nn.Module, out_dir: str | os.PathLike, *,
                 max_shard_bytes: int = 2 << 30, names: dict[str, str] | None = None,
                 backend: str | None = None, aliases: dict[str, str] | None = None,
                 zeros: dict[str, tuple[int, ...]] | None = None):
        self.model = model
        self.backend = backend
        self.params = [(names.get(n, n) if names else n, p) for n, p in model.named_parameters()
                       if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True")
        shapes = {key: tuple(p.shape) for key, p in self.params}
        self.aliases = dict(aliases or {})
        bad = [a for a, owner in self.aliases.items() if owner not in shapes or a in shapes]
        if bad:
            raise ValueError(f"aliases must map new keys to trainable parameter names: {bad[:3]}")
        self.zeros = {k: tuple(v) for k, v in (zeros or {}).items()}
        clash = [k for k in self.zeros if k in shapes or k in self.aliases]
        if clash:
            raise ValueError(f"zeros must name new keys: {clash[:3]}")
        self.final = Path(out_dir)
        self.out = self.final.with_name(self.final.name + ".partial")
        self._create_files(max_shard_bytes)
        self.ckpt = Checkpoint.open(self.out)
        self._maps: list[torch.Tensor] = []
        self.acc: dict[str, torch.Tensor] = {}
        for f in self.ckpt.files:
            storage = torch.UntypedStorage.from_file(str(f), shared=True,
                                                     nbytes=f.stat().st_size)
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._maps.append(raw)
            for key in self.ckpt.keys_in(f):
                info = self.ckpt[key]
                start = info.data_start + info.begin
                self.acc[key] = raw[start:start + info.nbytes].view(torch.float32).view(info.shape)
        self.batches = 0
        self._handles: list = []

    def _create_files(self, max_shard_bytes: int) -> None:
        """Zero-filled safetensors files laid out like a sharded checkpoint. ``ftruncate`` past the
        header makes the zeros (sparse on most filesystems), so nothing model-sized is written or
        held in memory."""
        if self.final.exists():
            raise CheckpointError(f"{self.final} already exists; DiskFisher needs a new directory")
        if self.out.exists():
            raise CheckpointError(f"{self.out} is left from an interrupted Fisher run (a Fisher "
                                  f"cannot resume: its batches are not recorded); remove it and "
                                  f"start again")
        groups: list[list[TensorInfo]] = [[]]
        size = 0
        shapes = {name: tuple(p.shape) for name, p in self.params}
        entries = (list(shapes.items()) + [(a, shapes[o]) for a, o in self.aliases.items()]
                   + list(self.zeros.items()))
        for name, shape in entries:
            info = TensorInfo(name, "F32", shape, Path(), 0, math.prod(shape) * 4, 0)
            if groups[-1] and size + info.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += info.nbytes
        names = ([f"fisher-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                  for i in range(len(groups))] if len(groups) > 1 else ["model.safetensors"])
        layouts = [ShardLayout.build(n, g, {"format": "pt"}) for n, g in zip(names, groups)]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(self.out.parent, sum(lay.size for lay in layouts))
        self.out.mkdir()
        for lay in layouts:
            with open(self.out / lay.name, "wb") as fh:
                fh.write(lay.header)
                fh.truncate(lay.size)
        if len(layouts) > 1:
            index = {"metadata": {"total_size": sum(i.nbytes for g in groups for i in g)},
                     "weight_map": {i.key: n for n, g in zip(names, groups) for i in g}}
            atomic_write_bytes(self.out / INDEX_NAME, dumps_json(index))

    def _hook(self, key):
        acc = self.acc[key]

        def hook(p):
            if p.grad is None:
                return
            ops.fisher_accumulate_(acc, p.grad.detach().to("cpu"), backend=self.backend)
            p.grad = None
        return hook

    def __enter__(self):
        for key, p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(key)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def step(self) -> None:
        """Count one batch (call after each ``loss.backward()``)."""
        self.batches += 1

    def finish(self) -> Path:
        if self.batches == 0:
            raise ValueError("no batch was accumulated: call step() after each backward()")
        for key, _ in self.params:
            self.acc[key].div_(self.batches)
        for alias, owner in self.aliases.items():
            self.acc[alias].copy_(self.acc[owner])
        self.acc.clear()
        self._maps.clear()  # unmaps: dirty pages stay in the page cache; fsync makes them durable
        for f in self.ckpt.files:
            fsync_path(f)
        fsync_dir_if_possible(self.out)
        os.replace(self.out, self.final)
        fsync_dir_if_possible(self.final.parent)
        return self.final


# --------------------------------------------------------------------------- synthetic checkpoints

LLAMA_PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000),
    "llama-tiny": (256, 688, 2, 4, 4, 1000),  # for smoke tests of scripts and tests
}


def llama_specs(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                vocab: int, dtype: torch.dtype = torch.bfloat16
                ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(key, dtype, shape)`` of every tensor of a Hugging Face ``LlamaForCausalLM`` state dict,
    in the order ``save_pretrained`` writes them."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    kv = hidden // heads * kv_heads
    specs = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.q_proj.weight", dtype, (hidden, hidden)),
                  (p + "self_attn.k_proj.weight", dtype, (kv, hidden)),
                  (p + "self_attn.v_proj.weight", dtype, (kv, hidden)),
                  (p + "self_attn.o_proj.weight", dtype, (hidden, hidden)),
                  (p + "mlp.gate_proj.weight", dtype, (intermediate, hidden)),
                  (p + "mlp.up_proj.weight", dtype, (intermediate, hidden)),
                  (p + "mlp.down_proj.weight", dtype, (hidden, intermediate)),
                  (p + "input_layernorm.weight", dtype, (hidden,)),
                  (p + "post_attention_layernorm.weight", dtype, (hidden,))]
    specs += [("model.norm.weight", dtype, (hidden,)), ("lm_head.weight", dtype, (vocab, hidden))]
    return specs


def synthetic_tensor(key: str, dtype: torch.dtype, shape: tuple[int, ...], *, seed: int,
                     role: str) -> torch.Tensor:
    """A deterministic random tensor for synthetic checkpoints: ``role="pretrained"`` gives the
    weights (norm weights near 1, the rest N(0, 0.02²)); ``role="suspect"`` gives the same weights
    plus an N(0, 0.002²) fine-tuning drift and, on a 1/1000 share of coordinates, a 25x larger
    planted drift; ``role="hessian"`` gives a positive fp32 curvature estimate."""
    from purify_fast.reference.weight_space import key_hash

    def gen(salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((seed * 1_000_003 + key_hash(key) * 7 + salt)
                                             % (2**63))

    if role == "hessian":
        return torch.rand(shape, generator=gen(3), dtype=torch.float32).add_(1e-3).mul_(1e-4)
    norm = len(shape) == 1
    w = torch.randn(shape, generator=gen(0), dtype=torch.float32).mul_(0.02)
    if norm:
        w.add_(1.0)
    if role == "suspect":
        w.add_(torch.randn(shape, generator=gen(1), dtype=torch.float32).mul_(0.002))
        planted = torch.rand(shape, generator=gen(2)) < 1e-3
        w.add_(planted.to(torch.float32).mul_(0.05))
    elif role != "pretrained":
        raise ValueError(f"role must be 'pretrained', 'suspect' or 'hessian', got {role!r}")
    return w.to(dtype)


def write_synthetic_llama(out: str | os.PathLike, specs, *, role: str, seed: int = 0,
                          max_shard_bytes: int | None = None) -> Path:
    """Write a synthetic checkpoint for ``specs`` one tensor at a time (bounded memory)."""
    from purify_fast.checkpoint import write_checkpoint_streaming

    kinds = {k: (dt, shape) for k, dt, shape in specs}
    if role == "hessian":
        specs = [(k, torch.float32, shape) for k, _, shape in specs]
    return write_checkpoint_streaming(
        specs, lambda k: synthetic_tensor(k, kinds[k][0] if role != "hessian" else torch.float32,
                                          kinds[k][1], seed=seed, role=role),
        out, max_shard_bytes=max_shard_bytes)
