"""Safetensors checkpoints in and out, for models that do not fit twice in memory.

Reading
-------
:class:`Checkpoint` opens a single ``.safetensors`` file, a directory holding ``model.safetensors``,
or a sharded directory with the Hugging Face ``model.safetensors.index.json``. Opening parses and
validates every header (never the tensor bytes): the 8-byte little-endian header length, the JSON,
each entry's dtype, shape and ``data_offsets``, that the offsets tile the data region with no gap or
overlap, and that the file is exactly as long as the header says (a truncated download fails here,
naming the file and the first tensor that lies past the end). Tensors are then read one at a time
through ``safetensors.safe_open`` (mmap), and copied out of the mapping so the mapped pages can be
dropped right away: host memory holds a few tensors, never a shard.

Writing
-------
The output of a purification has exactly the suspect checkpoint's keys, shapes, dtypes and shard
layout, so every output header is known before any tensor is computed. A shard is written into a
temporary file in the same directory (header first, then each tensor's bytes at its known offset,
which also lets several processes fill one shard), fsynced, hashed (sha256) and ``os.replace``-d to
its final name. Everything goes into ``<out>.partial/``; only when every shard, the index and the
manifest are in place is that directory renamed to ``<out>``, so ``<out>`` either does not exist or
is complete. The manifest (JSON, fsynced) records the run's parameters, the inputs' fingerprints and
each finished shard's sha256: a killed run restarted with ``resume=True`` skips finished shards
(after re-hashing them) and produces byte-identical output. Inputs are only ever opened read-only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from purify_fast.fileio import atomic_write_bytes, fsync_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "purify_manifest.json"
MANIFEST_VERSION = 3  # 2: input fingerprints sample every tensor's bytes; 3: start, middle and end
# A header larger than this is not a real safetensors header (the Rust library caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Files next to the weights that a loadable model directory needs (config, tokenizer, ...).
_SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".py", ".tiktoken", ".jinja", ".md")

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _dt = getattr(torch, _name)
        DTYPES[_code] = (_dt, torch.empty(0, dtype=_dt).element_size())
DTYPE_CODES = {dt: code for code, (dt, _) in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint is unreadable, inconsistent, or incompatible with another one."""


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` bytes ``[data_start + begin, data_start + end)``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int
    data_start: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse and validate one safetensors file's header.

    Returns (tensors by key in file order, ``__metadata__``, the raw header bytes). Raises
    :class:`CheckpointError` naming the file (and the key) for anything a loader would trip on.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file "
                              f"(truncated?)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n == 0 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} is not plausible (corrupted file, "
                                  f"or not safetensors)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size - 8} "
                                  f"after the length word (truncated)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the file is corrupted")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupted")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object; the file is corrupted")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {entry!r}")
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {key!r} has invalid shape {list(shape)}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {key!r} has invalid data_offsets {[begin, end]}")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {key!r} spans {end - begin} bytes but dtype "
                                  f"{dtype} and shape {list(shape)} need {expected} (corrupted)")
        infos[key] = TensorInfo(key, dtype, shape, path, begin, end, data_start)
    # The offsets must tile [0, data_len) exactly: a gap or overlap means a damaged header, and a
    # data region longer than the file means a truncated file.
    cursor = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != cursor:
            raise CheckpointError(f"{path}: tensor {info.key!r} starts at byte {info.begin} of the "
                                  f"data region, expected {cursor} (gap or overlap: corrupted "
                                  f"header)")
        cursor = info.end
        if data_start + cursor > size:
            raise CheckpointError(f"{path}: tensor {info.key!r} ends at byte {data_start + cursor} "
                                  f"but the file has only {size} bytes (truncated)")
    if data_start + cursor != size:
        raise CheckpointError(f"{path}: {size - data_start - cursor} trailing bytes after the last "
                              f"tensor (corrupted or wrongly concatenated file)")
    return infos, {str(k): str(v) for k, v in meta.items()}, raw


@dataclass
class Checkpoint:
    """A validated, lazily read safetensors checkpoint (single file or sharded with an index)."""

    path: Path
    files: list[Path]                       # shard files in index order
    tensors: dict[str, TensorInfo]          # every tensor, shard order then file order
    sharded: bool
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # per shard file name
    header_digest: dict[str, str] = field(default_factory=dict)        # sha256 of each header
    index_metadata: dict = field(default_factory=dict)  # the index's "metadata" (sharded only)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        if path.is_file():
            if path.name.endswith(".index.json"):
                return cls._open_index(path)
            return cls._open_files(path, [path], sharded=False)
        if path.is_dir():
            if (path / INDEX_NAME).is_file():
                return cls._open_index(path / INDEX_NAME)
            if (path / SINGLE_NAME).is_file():
                return cls._open_files(path, [path / SINGLE_NAME], sharded=False)
            found = sorted(path.glob("*.safetensors"))
            if len(found) == 1:
                return cls._open_files(path, found, sharded=False)
            if found:
                raise CheckpointError(f"{path}: {len(found)} .safetensors files but no "
                                      f"{INDEX_NAME} to say how they fit together")
            raise CheckpointError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or other .safetensors "
                                  f"file in this directory")
        raise CheckpointError(f"{path}: no such file or directory")

    @classmethod
    def _open_index(cls, index_path: Path) -> Checkpoint:
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})")
        root = index_path.parent
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            keys = [k for k, v in weight_map.items() if v == missing[0]][:3]
            raise CheckpointError(f"{index_path}: shard(s) missing: {', '.join(missing)} "
                                  f"(e.g. {missing[0]} should hold {', '.join(keys)})")
        ckpt = cls._open_files(root, [root / n for n in names], sharded=True)
        for key, name in weight_map.items():
            info = ckpt.tensors.get(key)
            if info is None:
                raise CheckpointError(f"{index_path}: index maps {key!r} to {name} but {name} has "
                                      f"no such tensor")
            if info.file.name != name:
                raise CheckpointError(f"{index_path}: index maps {key!r} to {name} but it is in "
                                      f"{info.file.name}")
        extra = [k for k in ckpt.tensors if k not in weight_map]
        if extra:
            raise CheckpointError(f"{index_path}: tensor {extra[0]!r} in "
                                  f"{ckpt.tensors[extra[0]].file.name} is not in the index")
        meta = index.get("metadata")
        ckpt.index_metadata = dict(meta) if isinstance(meta, dict) else {}
        return ckpt

    @classmethod
    def _open_files(cls, root: Path, files: Sequence[Path], sharded: bool) -> Checkpoint:
        tensors: dict[str, TensorInfo] = {}
        metadata, digests = {}, {}
        for f in files:
            infos, meta, raw = read_header(f)
            for key, info in infos.items():
                if key in tensors:
                    raise CheckpointError(f"{f}: tensor {key!r} also appears in "
                                          f"{tensors[key].file}")
                tensors[key] = info
            metadata[f.name] = meta
            digests[f.name] = hashlib.sha256(raw).hexdigest()
        return cls(root, list(files), tensors, sharded, metadata, digests)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def keys_in(self, file: Path) -> list[str]:
        return [k for k, i in self.tensors.items() if i.file == file]

    def __iter__(self):
        return iter(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def load(self, key: str, *, pin_memory: bool = False) -> torch.Tensor:
        """Read one tensor into its own host memory (pinned if asked), leaving no mapping open."""
        return load_tensor(self[key], pin_memory=pin_memory)

    def fingerprint(self) -> dict:
        """What identifies these inputs for resuming: file names, sizes, header digests, and a
        digest of 4 KiB samples from the start, middle and end of every tensor. Two fine-tunes of one
        architecture have identical headers, and a resume must not splice their outputs; a
        sample of every tensor tells them apart even when a fine-tune touched only some tensors
        (LoRA merged into q/v, a frozen embedding), at ~3 MB of reads for a 7B model, where
        hashing every byte would read the whole model. An edit outside the samples goes
        unnoticed: a resume is for the same files, not a check of them."""
        return {f.name: {"size": f.stat().st_size, "header_sha256": self.header_digest[f.name],
                         "sample_sha256": _sample_digest(f, [self.tensors[k]
                                                             for k in self.keys_in(f)])}
                for f in self.files}

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def under_prefix(self, prefix: str) -> Checkpoint:
        """The same tensors named as a task model wrapping this (base) model names them:
        ``prefix + key`` (``bert.embeddings...``). The files are not touched; reads still use
        each tensor's own name in its file."""
        return replace(self, tensors={prefix + k: v for k, v in self.tensors.items()})


_SAMPLE_BYTES = 1 << 12


def _sample_digest(path: Path, infos: Sequence[TensorInfo]) -> str:
    """sha256 of up to ``_SAMPLE_BYTES`` from the start, the middle and the end of each tensor's
    bytes in ``path`` (the first rows, where an embedding's special and trigger tokens often are;
    the last, where a grown vocabulary's new tokens are)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for info in sorted(infos, key=lambda i: i.begin):
            size = info.end - info.begin
            base = info.data_start + info.begin
            for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2),
                                  max(0, size - _SAMPLE_BYTES)}):
                fh.seek(base + offset)
                digest.update(fh.read(min(size, _SAMPLE_BYTES)))
    return digest.hexdigest()


def load_tensor(info: TensorInfo, *, pin_memory: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Read ``info``'s tensor through ``safetensors.safe_open`` into ``out`` (a preallocated
    tensor of the right shape and dtype, e.g. a view of a reusable buffer) or a new tensor.

    safe_open hands back a view of the mmap; copying it out and closing the file at once keeps
    the mapped pages from piling up in the process (a shard can be several GB).
    """
    from safetensors import safe_open

    if out is not None and (tuple(out.shape) != info.shape or out.dtype != info.torch_dtype):
        raise ValueError(f"out is {out.dtype} {list(out.shape)} but {info.key!r} is "
                         f"{info.torch_dtype} {list(info.shape)}")
    try:
        with safe_open(str(info.file), framework="pt", device="cpu") as fh:
            view = fh.get_tensor(info.key)
            if out is None:
                out = torch.empty(view.shape, dtype=view.dtype, pin_memory=pin_memory)
            out.copy_(view)
            del view
    except Exception as exc:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.key!r} ({exc})") from exc
    return out


def _wrapper_prefix(suspect_only: list[str], pretrained_only: list[str]) -> str | None:
    """``"bert."`` when most pre-trained-only keys reappear in the suspect under that one first
    component (a task model wrapping its base model, as Hugging Face classifiers do)."""
    if not suspect_only or not pretrained_only:
        return None
    counts: dict[str, int] = {}
    for key in suspect_only:
        head, dot, rest = key.partition(".")
        if dot:
            counts[head + "."] = counts.get(head + ".", 0) + 1
    gone = set(pretrained_only)
    for prefix in sorted(counts, key=counts.get, reverse=True)[:3]:
        hits = sum(1 for k in suspect_only if k.startswith(prefix) and k[len(prefix):] in gone)
        if hits >= 0.9 * len(gone):
            return prefix
    return None


def base_model_prefix(pretrained: Checkpoint, suspect: Checkpoint) -> str | None:
    """The prefix under which ``suspect`` (a task model: ``bert.`` + base keys + a head) holds
    the tensors of ``pretrained`` (its base model, saved without the prefix, as the offline MiniLM
    and many hub checkpoints are), or None when the two name their tensors alike."""
    new = [k for k in suspect.tensors if k not in pretrained.tensors]
    gone = [k for k in pretrained.tensors if k not in suspect.tensors]
    prefix = _wrapper_prefix(new, gone)
    if prefix is None or len(suspect.tensors) - len(new) >= len(new):
        return None
    return prefix


# The share of the suspect's floating-point weights that may lack a pre-trained counterpart: a new
# classifier head (and a pooler the base checkpoint lacks) is well under 1 % of any real encoder or
# decoder; more means the pre-trained model is another model (or names its tensors otherwise), and
# purifying only the part that matches would silently leave the rest of the suspect (and any
# backdoor in it) untouched.
MAX_UNMATCHED_SHARE = 0.05


def compare(pretrained: Checkpoint, suspect: Checkpoint, *, allow_new_keys: bool = False,
            base_prefix: str | None = None) -> tuple[list[str], list[str]]:
    """Check two checkpoints describe the same model; returns (shared keys, suspect-only keys).

    Shape differences, and dtype differences other than between two floating-point dtypes (the
    pre-trained tensor is then cast to the suspect's, as the in-memory defenses do), are always
    errors. Keys present on one side only are errors unless ``allow_new_keys`` (a fine-tuned model
    with a new head: those tensors are kept as they are); suspect-only tensors holding more than
    :data:`MAX_UNMATCHED_SHARE` of its floating-point weights are an error even then.
    ``base_prefix`` says ``pretrained`` is the suspect's base model, already renamed with
    :meth:`Checkpoint.under_prefix` (see :func:`base_model_prefix`): the suspect's tensors outside
    the prefix are its task head, kept as they are, and the base's non-float buffers that the
    suspect does not save (``position_ids``) are ignored.
    """
    shared, new = [], []
    for key, info in suspect.tensors.items():
        other = pretrained.tensors.get(key)
        if other is None:
            new.append(key)
            continue
        if other.shape != info.shape:
            raise CheckpointError(f"tensor {key!r}: shape {list(info.shape)} in {info.file} but "
                                  f"{list(other.shape)} in {other.file}")
        if other.dtype != info.dtype and not (other.is_float and info.is_float):
            raise CheckpointError(f"tensor {key!r}: dtype {info.dtype} in {info.file} but "
                                  f"{other.dtype} in {other.file}")
        shared.append(key)
    gone = [k for k in pretrained.tensors if k not in suspect.tensors]
    if base_prefix is None:
        prefix = _wrapper_prefix(new, gone)
        if prefix is not None and len(shared) < len(new):
            raise CheckpointError(
                f"the suspect's tensors are the pre-trained ones under the prefix {prefix!r} (e.g. "
                f"{prefix + gone[0]!r} vs {gone[0]!r}): {pretrained.path} is a base model and "
                f"{suspect.path} a task model built on it. purify_checkpoint pairs them by itself; "
                f"to compare them, pass pretrained.under_prefix({prefix!r}) and "
                f"base_prefix={prefix!r}")
        unmatched, missing = new, gone
    else:
        unmatched = [k for k in new if k.startswith(base_prefix)]
        missing = [k for k in gone if pretrained.tensors[k].is_float]
    if not allow_new_keys and (unmatched or missing):
        parts = []
        if unmatched:
            parts.append(f"{len(unmatched)} key(s) only in the suspect checkpoint {suspect.path} "
                         f"(e.g. {unmatched[0]!r})")
        if missing:
            parts.append(f"{len(missing)} key(s) only in the pre-trained checkpoint "
                         f"{pretrained.path} (e.g. {missing[0]!r})")
        raise CheckpointError("the checkpoints do not match: " + "; ".join(parts) +
                              ". Pass allow_new_keys=True (--allow-new-keys) to keep suspect-only "
                              "tensors unchanged and ignore pre-trained-only ones.")
    if not shared:
        raise CheckpointError(f"{pretrained.path} and {suspect.path} share no tensor names")
    # Even with allow_new_keys: keeping a new head is one thing, keeping most of the model
    # unpurified (a pre-trained checkpoint of another naming scheme) is another.
    total = sum(i.numel for i in suspect.tensors.values() if i.is_float)
    kept = sum(suspect.tensors[k].numel for k in unmatched if suspect.tensors[k].is_float)
    if kept > MAX_UNMATCHED_SHARE * total:
        raise CheckpointError(
            f"{len(unmatched)} suspect tensor(s) ({100 * kept / total:.0f} % of its floating-point "
            f"weights; e.g. {unmatched[0]!r}) have no counterpart in {pretrained.path}: they would "
            f"be written unpurified. allow_new_keys (--allow-new-keys) keeps a new head (at most "
            f"{MAX_UNMATCHED_SHARE:.0%} of the weights), not the rest of the model; is the "
            f"pre-trained checkpoint the model the suspect was fine-tuned from, saved under the "
            f"same tensor names?")
    return shared, new


# --------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class ShardLayout:
    """One output shard: its name, header bytes, and where each tensor's bytes go."""

    name: str
    header: bytes                                   # length word + JSON, padded to 8 bytes
    offsets: dict[str, tuple[int, int]]             # key -> absolute [start, end) in the file
    size: int

    @classmethod
    def build(cls, name: str, infos: Iterable[TensorInfo], metadata: dict[str, str] | None
              ) -> ShardLayout:
        """Deterministic header for ``infos`` in the given order (same inputs, same bytes)."""
        entries: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
        cursor, rel = 0, {}
        for info in infos:
            entries[info.key] = {"dtype": info.dtype, "shape": list(info.shape),
                                 "data_offsets": [cursor, cursor + info.nbytes]}
            rel[info.key] = (cursor, cursor + info.nbytes)
            cursor += info.nbytes
        body = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        body += b" " * (-len(body) % 8)  # the data region starts 8-byte aligned, like safetensors
        header = struct.pack("<Q", len(body)) + body
        start = len(header)
        return cls(name, header, {k: (start + a, start + b) for k, (a, b) in rel.items()},
                   start + cursor)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().view(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # os.pwrite may write less than asked (signals, 2 GB caps on some systems): loop.
    view = data.cast("B") if data.format != "B" else data
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (tests replace this to fake a full disk)."""
    return shutil.disk_usage(path).free


def check_free_space(where: Path, needed: int) -> None:
    free = free_bytes(where)
    if free < needed:
        raise CheckpointError(f"not enough disk space in {where}: the output needs {needed:,} "
                              f"bytes but only {free:,} are free")


def dumps_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


class OutputDir:
    """``<out>.partial/`` while running, renamed to ``<out>`` when complete.

    The manifest holds ``run`` (parameters and input fingerprints: a resumed run must match it),
    ``state`` (values computed once, e.g. a global threshold, reused on resume so the bytes match)
    and ``shards`` (finished shard name -> sha256 and size). Finished shards are also recorded as
    ``.<shard>.done`` files, so several processes can each finish shards without racing on one
    manifest; the manifest is rebuilt from them.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).absolute()
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.manifest_path = self.partial / MANIFEST_NAME
        self.manifest: dict = {}

    def check_target(self) -> None:
        if self.out.exists():
            try:
                complete = json.loads(self.manifest_path_final.read_text()).get("complete")
            except (OSError, ValueError, AttributeError):
                complete = False
            if complete:
                raise CheckpointError(f"{self.out} already exists and is a complete output of an "
                                      f"earlier run; purification never overwrites: choose "
                                      f"another --out or remove it")
            raise CheckpointError(f"{self.out} already exists; purification never overwrites: "
                                  f"choose another --out or remove it")
        if not self.out.parent.is_dir():
            raise CheckpointError(f"{self.out.parent}: parent directory of the output does not "
                                  f"exist")

    @property
    def manifest_path_final(self) -> Path:
        return self.out / MANIFEST_NAME

    def start(self, run: dict, *, resume: bool) -> bool:
        """Create or reopen the partial directory; returns True if resuming an earlier run."""
        self.check_target()
        if self.partial.exists():
            if not resume:
                raise CheckpointError(f"{self.partial} holds an interrupted run: pass resume=True "
                                      f"(--resume) to finish it, or remove it to start over")
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{self.manifest_path}: cannot resume, manifest unreadable "
                                      f"({exc}); remove {self.partial} to start over")
            if manifest.get("version") != MANIFEST_VERSION:
                raise CheckpointError(f"{self.partial} was started by another version of "
                                      f"purify_fast (manifest version {manifest.get('version')}, "
                                      f"this one writes {MANIFEST_VERSION}) and cannot be resumed "
                                      f"by it; remove it to start over")
            if manifest.get("run") != run:
                diff = sorted(k for k in set(run) | set(manifest.get("run", {}))
                              if run.get(k) != manifest.get("run", {}).get(k))
                raise CheckpointError(f"{self.partial} was started with different settings or "
                                      f"inputs (differs in: {', '.join(diff)}); remove it or "
                                      f"rerun with the original settings")
            self.manifest = manifest
            return True
        self.partial.mkdir()
        self.manifest = {"version": MANIFEST_VERSION, "run": run, "state": {}, "shards": {}}
        self.save_manifest()
        fsync_path(self.out.parent)
        return False

    def adopt(self) -> None:
        """Re-read the manifest written by another process (rank 0) of the same run."""
        self.manifest = json.loads(self.manifest_path.read_text())

    def save_manifest(self) -> None:
        atomic_write_bytes(self.manifest_path, dumps_json(self.manifest))

    @property
    def state(self) -> dict:
        return self.manifest.setdefault("state", {})

    def _done_marker(self, name: str) -> Path:
        return self.partial / f".{name}.done"

    def shard_path(self, name: str) -> Path:
        return self.partial / name

    def tmp_path(self, name: str) -> Path:
        return self.partial / f".{name}.tmp"

    def finished(self, layout: ShardLayout) -> bool:
        """True if ``layout``'s shard was completed by an earlier (or another) process and its
        bytes still hash to what was recorded."""
        marker = self._done_marker(layout.name)
        path = self.shard_path(layout.name)
        if not marker.is_file() or not path.is_file():
            return False
        try:
            rec = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if rec.get("size") != layout.size or path.stat().st_size != layout.size:
            return False
        return sha256_file(path) == rec.get("sha256")

    def begin_shard(self, layout: ShardLayout) -> int:
        """Create the temp file with its header at full length; returns an fd for pwrite."""
        tmp = self.tmp_path(layout.name)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        pwrite_all(fd, memoryview(layout.header), 0)
        os.ftruncate(fd, layout.size)
        return fd

    def open_shard(self, layout: ShardLayout) -> int:
        """Open a temp shard created by :meth:`begin_shard` in another process."""
        return os.open(self.tmp_path(layout.name), os.O_RDWR)

    def commit_shard(self, layout: ShardLayout) -> str:
        """fsync, hash and atomically rename the temp shard; record it as finished."""
        tmp = self.tmp_path(layout.name)
        fsync_path(tmp)
        if tmp.stat().st_size != layout.size:
            raise CheckpointError(f"{tmp}: {tmp.stat().st_size} bytes written, expected "
                                  f"{layout.size}")
        digest = sha256_file(tmp)
        os.replace(tmp, self.shard_path(layout.name))
        fsync_path(self.partial)
        atomic_write_bytes(self._done_marker(layout.name),
                           dumps_json({"sha256": digest, "size": layout.size}))
        return digest

    def finalize(self, layouts: Sequence[ShardLayout], index: dict | None,
                 side_files: Sequence[Path] = ()) -> Path:
        """Write the index and the final manifest, copy side files, and rename into place."""
        shards = {}
        for layout in layouts:
            rec = json.loads(self._done_marker(layout.name).read_text())
            shards[layout.name] = rec
        self.manifest["shards"] = shards
        self.manifest["complete"] = True
        for src in side_files:
            dst = self.partial / src.name
            if not dst.exists():
                tmp = dst.with_name(f".{dst.name}.tmp")
                shutil.copyfile(src, tmp)
                fsync_path(tmp)
                os.replace(tmp, dst)
        if index is not None:
            atomic_write_bytes(self.partial / INDEX_NAME, dumps_json(index))
        self.save_manifest()
        for layout in layouts:
            self._done_marker(layout.name).unlink()
        fsync_path(self.partial)
        os.replace(self.partial, self.out)
        fsync_path(self.out.parent)
        return self.out


SIDE_FILE_MAX_BYTES = 64 << 20


def _side_file_verdicts(ckpt: Checkpoint) -> list[tuple[Path, str | None]]:
    """Each entry of the checkpoint directory with None when it is carried into the output, ""
    when it is skipped as a matter of course, otherwise why it is left out (for the user to
    hear)."""
    shards = {f.name for f in ckpt.files}
    if ckpt.path.is_dir():
        return [(p, _side_file_verdict(p, shards)) for p in sorted(ckpt.path.iterdir())]
    # A weights file given by itself: the directory around it may be anything (Downloads, /tmp),
    # so nothing is carried from it, but what a directory argument would have carried is named.
    why = (f"the suspect was given as the file {ckpt.path.name}, not its directory: pass the "
           f"directory to carry its config / tokenizer files")
    return [(p, why if _side_file_verdict(p, shards) is None else "")
            for p in sorted(ckpt.path.parent.iterdir())]


def _side_file_verdict(p: Path, shards: set[str]) -> str | None:
    # The weights themselves are written purified; the index and manifest are written anew.
    if p.name in (INDEX_NAME, MANIFEST_NAME) or p.name.startswith(".") or p.name in shards:
        return ""
    if p.name == "report.json" or p.name.startswith("purify_fast_"):
        return "a purify_fast report about the suspect (its attack, its ASR), not the output"
    if p.is_dir():
        return "a subdirectory (not copied; it may hold other copies of the suspect's weights)"
    if not p.is_file():
        return "not a regular file"
    if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                    ".gguf", ".pkl", ".npz"):
        return "weights outside the checkpoint read (they would carry the suspect's unpurified values)"
    if p.suffix not in _SIDE_FILE_SUFFIXES:
        return f"not a config / tokenizer file type ({', '.join(_SIDE_FILE_SUFFIXES)})"
    if p.stat().st_size >= SIDE_FILE_MAX_BYTES:
        return f"over {SIDE_FILE_MAX_BYTES >> 20} MiB"
    return None


def side_files(ckpt: Checkpoint) -> list[Path]:
    """Small files next to a checkpoint's weights (config, tokenizer) to carry into the output."""
    return [p for p, why in _side_file_verdicts(ckpt) if why is None]


def side_files_left_out(ckpt: Checkpoint) -> list[str]:
    """``"name: why"`` for every entry next to the weights that :func:`side_files` does not carry
    (subdirectories, other weight files, large or unknown files), so the caller can say so
    instead of the output silently lacking them."""
    return [f"{p.name}: {why}" for p, why in _side_file_verdicts(ckpt) if why]


def write_checkpoint(tensors: dict[str, torch.Tensor], out: str | os.PathLike, *,
                     max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None
                     ) -> Path:
    """Write an in-memory state dict as a (sharded) safetensors checkpoint with the same atomic
    protocol as the streaming engine: handy for tests and small models."""
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    return write_checkpoint_streaming(specs, lambda k: tensors[k], out,
                                      max_shard_bytes=max_shard_bytes, metadata=metadata)


def write_checkpoint_streaming(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                               make: Callable[[str], torch.Tensor], out: str | os.PathLike, *,
                               max_shard_bytes: int | None = None,
                               metadata: dict[str, str] | None = None) -> Path:
    """Write a checkpoint whose tensors are produced one at a time by ``make(key)``, so a model
    larger than memory can be written (synthetic benchmarks, conversions).

    ``specs`` lists ``(key, dtype, shape)`` in order; with ``max_shard_bytes`` they are split
    greedily into ``model-0000i-of-0000n.safetensors`` files plus the index, as Hugging Face does.
    """
    infos = []
    for key, dtype, shape in specs:
        if dtype not in DTYPE_CODES:
            raise CheckpointError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        infos.append(TensorInfo(key, DTYPE_CODES[dtype], tuple(shape), Path(), 0, nbytes, 0))
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if max_shard_bytes and groups[-1] and size + info.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(info)
        size += info.nbytes
    if len(groups) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    meta = {"format": "pt", **(metadata or {})}
    layouts = [ShardLayout.build(n, g, meta) for n, g in zip(names, groups)]
    od = OutputDir(out)
    od.check_target()
    check_free_space(od.out.parent, sum(lay.size for lay in layouts))
    od.start({"writer": "write_checkpoint"}, resume=False)
    for layout, group in zip(layouts, groups):
        fd = od.begin_shard(layout)
        try:
            for info in group:
                t = make(info.key)
                if tuple(t.shape) != info.shape or DTYPE_CODES.get(t.dtype) != info.dtype:
                    raise CheckpointError(f"make({info.key!r}) returned {t.dtype} "
                                          f"{list(t.shape)}, spec says {info.dtype} "
                                          f"{list(info.shape)}")
                pwrite_all(fd, tensor_bytes(t.cpu()), layout.offsets[info.key][0])
        finally:
            os.close(fd)
        od.commit_shard(layout)
    index = None
    if len(layouts) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in infos)},
                 "weight_map": {i.key: n for n, g in zip(names, groups) for i in sorted(
                     g, key=lambda i: i.key)}}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
    return od.finalize(layouts, index)
