"""Streaming checkpoint purification benchmark: time, throughput against the disk, peak memory.

CPU (runs anywhere)::

    nice -n 10 python benchmarks/streaming_bench.py cpu --layers 2,8,24 --work /tmp/stream_bench

builds synthetic LLaMA-shaped bf16 checkpoints (hidden 2048, intermediate 5504, vocab 32000, so the
largest tensor, the embedding, is the same 131 MB at every size) with 2, 8 and 24 layers, then for
each size and method (mix, e-pur, fine-purifying with an fp32 Hessian) runs
``purify_checkpoint`` in a fresh subprocess, with the inputs' pages evicted from the page cache
first (``posix_fadvise(DONTNEED)``), and records wall time, bytes read/written, the peak resident
set (``VmHWM``) and the peak anonymous resident memory (``RssAnon``, sampled every 5 ms: what the
process itself allocated, as opposed to file pages the kernel can drop). The disk's cold sequential
read speed is measured on the same files the same way. Writes ``results_streaming.json``,
``results_streaming_table.md`` and ``streaming_memory.png`` next to this script (the prose
around them is ``results_streaming.md``), and deletes the
checkpoints unless ``--keep``.

GPU suite (needs a CUDA machine with ~60 GB free disk)::

    python benchmarks/streaming_bench.py gpu-7b --work /scratch/bench7b

generates a LLaMA-2-7B-shaped bf16 pre-trained/suspect pair and a bf16 Hessian, and purifies it
end to end on ``cuda`` with each weight-space defense, recording the time per stage, peak GPU
memory (``torch.cuda.max_memory_allocated``) and peak host memory; writes
``results_streaming_gpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1e9


def _evict(paths) -> None:
    """Drop these files' pages from the page cache so the next read comes from the disk."""
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_read_speed(paths, block: int = 16 << 20) -> dict:
    """Cold sequential read of every file under ``paths`` (after eviction): bytes/s."""
    _evict(paths)
    buf = bytearray(block)
    total, t0 = 0, time.perf_counter()
    for root in paths:
        for f in sorted(Path(root).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "bytes_per_s": total / dt}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def child(args) -> int:
    """One purification in this (fresh) process; prints a JSON line of measurements."""
    import torch

    from purify_fast.streaming import purify_checkpoint

    torch.set_num_threads(args.threads)
    base = _status()
    peak = {"RssAnon": base["RssAnon"], "RssFile": base["RssFile"]}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            s = _status()
            peak["RssAnon"] = max(peak["RssAnon"], s["RssAnon"])
            peak["RssFile"] = max(peak["RssFile"], s["RssFile"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    kw = json.loads(args.options)
    freqs = None
    if kw.pop("e_pur_freqs", False) or kw.get("method") == "e-pur" or kw.get("e_pur"):
        freqs = torch.arange(kw.pop("vocab"), dtype=torch.float32)
    kw.pop("vocab", None)
    t0 = time.perf_counter()
    res = purify_checkpoint(args.pretrained, args.suspect, args.out, hessian=args.hessian,
                            token_freqs=freqs, device=args.device, **kw)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    end = _status()
    rec = {"wall_s": wall, "bytes_read": res.bytes_read, "bytes_written": res.bytes_written,
           "stage_s": res.stage_seconds, "baseline_rss": base["VmRSS"],
           "baseline_anon": base["RssAnon"], "peak_rss": end["VmHWM"],
           "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"]}
    if args.device.startswith("cuda"):
        rec["peak_gpu"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


def _run_child(pre, ft, out, hessian, device, options: dict, threads: int) -> dict:
    cmd = [sys.executable, __file__, "_child", "--pretrained", str(pre), "--suspect", str(ft),
           "--out", str(out), "--device", device, "--threads", str(threads),
           "--options", json.dumps(options)]
    if hessian:
        cmd += ["--hessian", str(hessian)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _make(work: Path, specs, shard_bytes: int, hessian_dtype) -> dict:
    import torch

    from purify_fast.checkpoint import write_checkpoint_streaming
    from purify_fast.streaming import synthetic_tensor, write_synthetic_llama

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = {"pre": write_synthetic_llama(work / "pre", specs, role="pretrained",
                                          max_shard_bytes=shard_bytes),
             "ft": write_synthetic_llama(work / "ft", specs, role="suspect",
                                         max_shard_bytes=shard_bytes)}
    shapes = {k: s for k, _, s in specs}
    hspecs = [(k, hessian_dtype, s) for k, _, s in specs]
    paths["h"] = write_checkpoint_streaming(
        hspecs, lambda k: synthetic_tensor(k, torch.float32, shapes[k], seed=0,
                                           role="hessian").to(hessian_dtype),
        work / "h", max_shard_bytes=shard_bytes * 2)
    paths["gen_s"] = time.perf_counter() - t0
    return paths


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


METHODS = {
    "mix": {"method": "mix", "rho": 0.5},
    "e-pur": {"method": "e-pur", "top_n": 200},
    "fine-purifying": {"method": "fine-purifying", "rho": 0.1},
}


def cpu(args) -> int:
    import torch

    from purify_fast import backend
    from purify_fast.streaming import llama_specs

    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"{work} exists; pass a new --work directory")
    rows = []
    disk = None
    try:
        for layers in [int(x) for x in args.layers.split(",")]:
            specs = llama_specs(args.hidden, args.intermediate, layers, 16, 16, args.vocab,
                                torch.bfloat16)
            largest = max(torch.Size(s).numel() * 2 for _, _, s in specs)
            d = work / f"L{layers}"
            paths = _make(d, specs, args.shard_mb << 20, torch.float32)
            model_bytes = _size(paths["pre"])
            print(f"layers={layers}: model {model_bytes / GB:.2f} GB, generated in "
                  f"{paths['gen_s']:.0f} s", flush=True)
            if disk is None or layers == max(int(x) for x in args.layers.split(",")):
                disk = disk_read_speed([paths["pre"], paths["ft"]])
                print(f"  cold read {disk['bytes'] / GB:.2f} GB at "
                      f"{disk['bytes_per_s'] / GB:.2f} GB/s", flush=True)
            for name, opts in METHODS.items():
                opts = dict(opts, vocab=args.vocab)
                hessian = paths["h"] if name == "fine-purifying" else None
                inputs = [paths["pre"], paths["ft"]] + ([hessian] if hessian else [])
                _evict(inputs)
                out = d / f"out-{name}"
                rec = _run_child(paths["pre"], paths["ft"], out, hessian, "cpu", opts,
                                 args.threads)
                rec.update(layers=layers, method=name, model_bytes=model_bytes,
                           largest_tensor_bytes=largest,
                           input_bytes=sum(_size(p) for p in inputs))
                rows.append(rec)
                print(f"  {name:15s} {rec['wall_s']:7.1f} s  read "
                      f"{rec['bytes_read'] / rec['wall_s'] / GB:.2f} GB/s  peak RSS "
                      f"{rec['peak_rss'] / GB:.2f} GB  peak anon {rec['peak_anon'] / GB:.2f} GB",
                      flush=True)
                shutil.rmtree(out)
            if not args.keep:
                shutil.rmtree(d)
    finally:
        if not args.keep and work.exists():
            shutil.rmtree(work)
    meta = {"backend": backend.resolve(None, torch.device("cpu"), torch.bfloat16),
            "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count(),
            "disk_cold_read": disk,
            "shape": {"hidden": args.hidden, "intermediate": args.intermediate,
                      "vocab": args.vocab, "dtype": "bfloat16", "shard_mb": args.shard_mb}}
    (HERE / "results_streaming.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=2))
    _plot(rows, HERE / "streaming_memory.png")
    _table(meta, rows, HERE / "results_streaming_table.md")
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for name, marker in zip(METHODS, "osd"):
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["model_bytes"])
        x = [r["model_bytes"] / GB for r in rs]
        ax.plot(x, [r["peak_rss"] / GB for r in rs], marker=marker, label=f"{name}: peak RSS")
        ax.plot(x, [r["peak_anon"] / GB for r in rs], marker=marker, linestyle="--",
                label=f"{name}: peak anonymous RSS")
    rs = sorted((r for r in rows if r["method"] == "mix"), key=lambda r: r["model_bytes"])
    x = [r["model_bytes"] / GB for r in rs]
    if rs:  # a run of other methods only has no mix rows to take these from
        ax.plot(x, x, color="grey", linestyle=":", label="model size (one copy)")
        ax.axhline(rs[0]["largest_tensor_bytes"] / GB, color="black", linewidth=0.8,
                   label="largest tensor")
    ax.set_xlabel("checkpoint size (GB, bf16)")
    ax.set_ylabel("GB")
    ax.set_title("Streaming purification: peak host memory vs model size (CPU)")
    # beside the axes: inside, its eight entries covered the measured lines
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _table(meta, rows, path: Path) -> None:
    disk = meta["disk_cold_read"]
    lines = [(f"Cold sequential disk read: {disk['bytes_per_s'] / GB:.2f} GB/s "
              f"({disk['bytes'] / GB:.2f} GB in {disk['seconds']:.1f} s). Backend "
              f"`{meta['backend']}`, {meta['threads']} torch threads, {meta['cpus']} CPUs."), "",
             ("| layers | model GB | method | wall s | read GB | read GB/s | read / disk | "
              "written GB | peak RSS GB | peak anon GB | baseline anon GB | stages s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["bytes_read"] / r["wall_s"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_s"].items())
        lines.append(f"| {r['layers']} | {r['model_bytes'] / GB:.2f} | {r['method']} | "
                     f"{r['wall_s']:.1f} | {r['bytes_read'] / GB:.2f} | {rate / GB:.2f} | "
                     f"{rate / disk['bytes_per_s']:.2f} | {r['bytes_written'] / GB:.2f} | "
                     f"{r['peak_rss'] / GB:.2f} | {r['peak_anon'] / GB:.2f} | "
                     f"{r['baseline_anon'] / GB:.2f} | {stages} |")
    path.write_text("\n".join(lines) + "\n")


def gpu_7b(args) -> int:
    import torch

    from purify_fast.streaming import LLAMA_PRESETS, llama_specs

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu-7b needs a CUDA device (--device cpu only to smoke-test the script)")
    if args.preset not in LLAMA_PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(LLAMA_PRESETS)}")
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"{work} exists; pass a new --work directory")
    specs = llama_specs(*LLAMA_PRESETS[args.preset], dtype=torch.bfloat16)
    # A bf16 Hessian keeps the three inputs and the output within ~55 GB of disk for 7B.
    paths = _make(work, specs, 5 << 30, torch.bfloat16)
    rows = []
    try:
        for name, opts in METHODS.items():
            opts = dict(opts, vocab=LLAMA_PRESETS[args.preset][5])
            hessian = paths["h"] if name == "fine-purifying" else None
            out = work / f"out-{name}"
            rec = _run_child(paths["pre"], paths["ft"], out, hessian, args.device, opts,
                             args.threads)
            rec.update(method=name, model_bytes=_size(paths["pre"]), preset=args.preset,
                       gen_s=paths["gen_s"])
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    (Path(args.results) / "results_streaming_gpu.json").write_text(json.dumps(
        {"device": name, "preset": args.preset, "rows": rows}, indent=2))
    lines = ["| method | wall s | stages s | read GB/s | peak GPU GB | peak RSS GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['wall_s']:.1f} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_s"].items())
                     + f" | {r['bytes_read'] / r['wall_s'] / GB:.2f} | "
                     f"{r.get('peak_gpu', float('nan')) / GB:.2f} | {r['peak_rss'] / GB:.2f} |")
    (Path(args.results) / "results_streaming_gpu.md").write_text(
        f"{name}, preset {args.preset}\n\n" + "\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--layers", default="2,8,24")
    c.add_argument("--hidden", type=int, default=2048)
    c.add_argument("--intermediate", type=int, default=5504)
    c.add_argument("--vocab", type=int, default=32000)
    c.add_argument("--shard-mb", type=int, default=512)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--work", default="/tmp/stream_bench")
    c.add_argument("--keep", action="store_true")
    g = sub.add_parser("gpu-7b")
    g.add_argument("--preset", default="llama-2-7b")
    g.add_argument("--device", default="cuda")
    g.add_argument("--results", default=str(HERE), help="directory for the result files")
    g.add_argument("--threads", type=int, default=8)
    g.add_argument("--work", default="/tmp/stream_bench_7b")
    g.add_argument("--keep", action="store_true")
    ch = sub.add_parser("_child")
    for a in ("--pretrained", "--suspect", "--out", "--device", "--options"):
        ch.add_argument(a, required=True)
    ch.add_argument("--hessian", default=None)
    ch.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    return {"cpu": cpu, "gpu-7b": gpu_7b, "_child": child}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
