"""Benchmarks: training throughput and MFU per mode, the loss's cost versus batch size, the data path,
the step's memory with gradient accumulation and activation checkpointing.

    python scripts/bench.py                 # two CPU presets
    python scripts/bench.py --main-job-only  # the README's main command, timed end to end
    python scripts/bench.py --quick         # fewer repeats
    python scripts/bench.py --gpu-preset    # also a ViT-B/16 + base text preset when CUDA is present
    python scripts/bench.py --scale-only --out results/scale.json   # step memory, the large recipe's model
    python scripts/bench.py --gpu-step 128 256   # CUDA: the ViT-B/16 3t step, with and without checkpointing
    python scripts/bench.py --loader-only   # tar shards of photo-like JPEGs through data.make_loader
    python scripts/bench.py --input-only    # the training thread's input time per step (batch 512, cached h)
    python scripts/bench.py --linears-only  # the vit-small step with oneDNN linears against F.linear, paired

Prints tables and writes results/bench.json (the --loader-only, --input-only and --linears-only figures go into
its 'loader', 'step_input' and 'linears' entries, the others kept). The training step is train.py's own `train_step` on
batches from data.py, so what is measured is what `train.py` runs. Its figures, and how long its longer
commands take, are in results/README.md ("Benchmarks").

MFU = model FLOPs of one forward+backward (with --grad-checkpointing too: the recomputed forward is not the
model's) / step time / matmul peak. FLOPs are counted by
torch.utils.flop_counter plus `FLOP_FORMULAS` for attention (model FLOPs, see there). As in PaLM's
MFU (Chowdhery et al. 2022, App. B), attention counts its full L x L matmuls even when causal; the
table's `attn_share` says how much of the count that is, so the reader can discount it. The peak
is a large square matmul (fp32 on CPU, bf16 on CUDA; on a CPU the faster of MKL's and oneDNN's) timed
right before and after each step, so both see the same machine -- a practical, not a datasheet, peak.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
import torchvision
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import shapes  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
import losses  # noqa: E402
from losses import contrastive_loss, default_weights  # noqa: E402
from model import FrozenTower, ThreeTowers, build_image_tower  # noqa: E402
from runtime import ONEDNN_OP, onednn_linear  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


_ATTENTION_BACKWARD = ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward",
                       "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention_backward")
# Model FLOPs of attention (q, k, v first; backward: grad, q, k, v first): the CPU kernel, which the
# flop counter does not know, counted like the CUDA ones; and every backward at 2x its forward, as for
# any matmul -- the flop counter's own backward formula adds the q k^T that flash kernels recompute,
# which is hardware work, not model work (PaLM's MFU, Chowdhery et al. 2022, App. B).
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v),
    **{getattr(torch.ops.aten, name): lambda g, q, k, v, *_, out_shape=None, **__: 2 * flop_counter.sdpa_flop_count(q, k, v)
       for name in _ATTENTION_BACKWARD if hasattr(torch.ops.aten, name)},
    # runtime.linear's oneDNN matmul, x (M, K) @ weight (N, K)^T, which the flop counter does not know either
    **({torch.ops.mkldnn._linear_pointwise: lambda x, w, *_, out_shape=None, **__: 2 * x.numel() * w[0]}
       if ONEDNN_OP else {}),
}


def kernel_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """FLOP/s of a square matmul (a short burst) by each kernel the step's matmuls may use: torch.mm
    (MKL on a CPU, cuBLAS on CUDA) and, on a CPU, oneDNN's (runtime.linear's kernel on AVX-512: on an AMD
    processor faster than MKL's, as MKL's kernels there stop at AVX2; on an AVX2-only one slower, unused;
    the measured rates of both kernels on both processors are in results/README.md, "Benchmarks")."""
    size, repeats = (8192, 10) if device.type == "cuda" else (2048, 2)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    onednn = {"onednn": lambda x, w: onednn_linear(x, w, None)} if device.type == "cpu" and ONEDNN_OP else {}
    kernels = {"mm": torch.mm, **onednn}
    peaks = {}
    for name, kernel in kernels.items():
        kernel(a, b)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            kernel(a, b)
        sync(device)
        peaks[name] = 2 * size ** 3 * repeats / (time.perf_counter() - start)
    return peaks


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The practical peak that MFU is measured against: the fastest of `kernel_peaks`, so that a
    peak below what the step's own matmuls reach cannot overstate the MFU."""
    return max(kernel_peaks(device, dtype).values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# "cpu" is train.py's default towers (cnn-tiny at 32 px, text mini); "cpu-vit-small" is the paper's kind
# of image tower at CPU size (vit-small, width 256, 6 blocks, 64 px): wider matmuls, which run closer to
# the peak.
CPU_PRESETS = {"cpu": ["--batch-size", "128"],
               "cpu-vit-small": ["--batch-size", "128", "--image-arch", "vit-small", "--image-size", "64"]}


def random_tower3(folder: str, arch: str, image_size: int) -> str:
    """A classifier of the same architecture as f, saved as a supervised checkpoint: 'equal towers'.
    Its weights do not matter for speed."""
    path = os.path.join(folder, f"tower3-{arch.replace('/', '-')}.pt")
    net = build_image_tower(arch, image_size, 10, bias=True)
    torch.save({"classifier": {"arch": arch, "image_size": image_size, "num_classes": 10},
                "model": net.state_dict()}, path)
    return path


def setup_mode(mode: str, cache: bool, preset: list[str], tower3: str, linears: str = "wrap") -> tuple:
    """train.py's own model, optimiser, data and step for one mode; returns (step, batches, flops, info).
    `linears`: "wrap" as runtime.wrap chooses for this CPU, or forced "onednn" / "f.linear" (bench_linears)."""
    args = train.parse_args(preset + ["--mode", mode, "--tower3", tower3, "--out", tempfile.mkdtemp(),
                                      "--cache-dir", os.path.dirname(tower3), "--quiet", "--eval-data", "none"]
                            + ([] if cache else ["--no-cache-tower3"]))
    args.workers = 0
    env = runtime.Env()
    tower3_net = train.resolve_tower3(args, env) if mode != "clip" else None
    dataset = train.pairs_dataset(args, env, tower3_net)
    tokenizer = train.build_tokenizer(args, env, dataset, None)
    model = ThreeTowers(**train.model_config(args, tokenizer, tower3_net)).to(env.device).train()
    if linears == "wrap":
        runtime.cpu_kernels(model, env.device)                   # as runtime.wrap does in train.py
    elif linears == "onednn":
        runtime.use_onednn_linears(model)
    optimizer, scheduler, _ = train.schedule(args, env, model, dataset)
    h_rows = runtime.tower3_cache(args, env, tower3_net, dataset) if tower3_net is not None and cache else None
    parts = train.Parts(model, model, optimizer, scheduler, tower3_net, default_weights(mode))
    loader = data.make_loader(dataset, args.batch_size, tokenizer=tokenizer, seed=0, rows=h_rows)
    batches = [b for b, _ in zip(loader, range(3))]

    def step(batch):                                             # exactly what train.py runs per step
        train.train_step(args, env, parts, [batch])

    # Model FLOPs (PaLM's MFU, Chowdhery et al. 2022, App. B): counted on a step without checkpointing, since the
    # forward that checkpointing recomputes is hardware work, not the model's; the timed steps then recompute.
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step(batches[0])
    model.set_grad_checkpointing(args.grad_checkpointing)
    for b in batches[1:]:
        step(b)                                                  # warm-up
    counts = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in counts.items() if "attention" in str(op))
    info = {"mode": mode, "cache": cache, "batch": args.batch_size, "checkpointing": args.grad_checkpointing,
            "trainable_params": sum(p.numel() for p in model.parameters()),
            "attn_share": attention / counter.get_total_flops()}
    return step, batches, counter.get_total_flops(), info, env.device


def bench_modes(preset: list[str], tower3: str, repeats: int, dtype: torch.dtype) -> tuple[list[dict], float]:
    """Step time of clip, lit, 3t (cached h) and 3t (h every step), and the matmul peak, timed
    round-robin -- one step of each mode in turn, each between two short peak bursts -- so that a
    slow spell of a shared machine hits all of them alike and each step is paired with the peak of
    the moment it ran. Step times are medians over the rounds; MFU is the median over rounds of
    FLOPs / step time / (mean of the peaks just before and after). Returns the rows and the median
    peak (FLOP/s)."""
    setups = [setup_mode(m, c, preset, tower3) for m, c in (("clip", True), ("lit", True), ("3t", True), ("3t", False))]
    device = setups[0][-1]
    times: list[list[float]] = [[] for _ in setups]
    around: list[list[float]] = [[] for _ in setups]       # the peak around each timed step
    before = matmul_peak(device, dtype)
    for i in range(repeats):
        for k, (step, batches, _, _, _) in enumerate(setups):
            sync(device)
            start = time.perf_counter()
            step(batches[i % len(batches)])
            sync(device)
            times[k].append(time.perf_counter() - start)
            after = matmul_peak(device, dtype)
            around[k].append((before + after) / 2)
            before = after
    rows = []
    for (_, _, flops, info, _), t, peaks in zip(setups, times, around):
        seconds = statistics.median(t)
        mfu = [flops / ti / pi for ti, pi in zip(t, peaks)]
        rows.append({**info, "step_ms": 1e3 * seconds, "samples_per_s": info["batch"] / seconds,
                     "gflops_per_sample": flops / info["batch"] / 1e9,
                     "mfu": statistics.median(mfu), "mfu_range": [min(mfu), max(mfu)]})
    for r in rows:
        r["vs_clip"] = r["step_ms"] / rows[0]["step_ms"]
    return rows, statistics.median(p for peaks in around for p in peaks)


def bench_linears(preset: list[str], tower3: str, pairs: int) -> list[dict]:
    """What runtime's oneDNN linears (runtime.cpu_kernels, taken on AVX-512 CPUs) buy on this CPU:
    train.py's step in clip and 3t (h cached), once with every linear on oneDNN and once on F.linear,
    one step of each in turn for `pairs` rounds after one warm-up round. Per mode: the median
    step times and the median, min and max of the per-round ratio F.linear time / oneDNN time."""
    cases = [(mode, linears) for mode in ("clip", "3t") for linears in ("onednn", "f.linear")]
    setups = [setup_mode(mode, True, preset, tower3, linears) for mode, linears in cases]
    times: list[list[float]] = [[] for _ in setups]
    for i in range(pairs + 1):
        for k, (step, batches, *_) in enumerate(setups):
            start = time.perf_counter()
            step(batches[i % len(batches)])
            times[k].append(time.perf_counter() - start)
    rows, capability = [], torch.backends.cpu.get_cpu_capability()
    for mode, k in (("clip", 0), ("3t", 2)):
        onednn, plain = times[k][1:], times[k + 1][1:]
        ratio = [p / o for p, o in zip(plain, onednn)]
        rows.append({"mode": mode, "batch": setups[k][3]["batch"], "onednn_ms": 1e3 * statistics.median(onednn),
                     "f_linear_ms": 1e3 * statistics.median(plain), "onednn_speedup": statistics.median(ratio),
                     "speedup_min": min(ratio), "speedup_max": max(ratio), "pairs": pairs,
                     "cpu_capability": capability,
                     "wrap_takes": "onednn" if runtime.prefers_onednn(capability) else "f.linear"})
    return rows


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def loss_memory_child(n_local: int, n_global: int, dim: int) -> None:
    """Run in a subprocess: fwd+bwd of the loss of n_local rows against n_global columns. Peak
    memory = the high-water mark of resident memory (reset first) above the resident memory before."""
    torch.manual_seed(0)
    a_all = torch.nn.functional.normalize(torch.randn(n_global, dim), dim=-1).requires_grad_()
    b_all = torch.nn.functional.normalize(torch.randn(n_global, dim), dim=-1).requires_grad_()
    local = n_local < n_global

    def run() -> float:
        a, b = a_all[:n_local], b_all[:n_local]
        start = time.perf_counter()
        loss = contrastive_loss(a, b, torch.tensor(10.0), a_all if local else a, b_all if local else b)
        loss.backward()
        return time.perf_counter() - start
    run()                                               # warm-up (thread pools, allocator)
    a_all.grad = b_all.grad = None
    with open("/proc/self/clear_refs", "w") as f:       # reset the high-water mark (VmHWM)
        f.write("5")
    before = _rss_kib("VmRSS:")
    seconds = run()
    print(json.dumps({"ms": 1e3 * seconds, "peak_mib": (_rss_kib("VmHWM:") - before) / 1024}))


def bench_loss(sizes: list[int], world: int, dim: int = 128) -> list[dict]:
    """The loss over a global batch N: on one process (N x N logits) and as one of `world` ranks
    (N/world x N logits, the distributed path) -- time and peak memory, each in a fresh process."""
    rows = []
    for n in sizes:
        row = {"global_batch": n}
        for name, n_local in (("one_process", n), (f"rank_of_{world}", n // world)):
            if n_local * n * 4 * 6 > 20 * 2 ** 30:      # logits + softmax + grads would not fit
                row[name] = None
                continue
            out = subprocess.run([sys.executable, __file__, "--loss-child", str(n_local), str(n), str(dim)],
                                 capture_output=True, text=True, check=True)
            row[name] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
    return rows


class _TinyImages(torch.utils.data.Dataset):
    """`rows` images made on the fly at almost no cost (3 x size x size, uint8 as the loaders give them)
    under `key`, with the sample's index and, given `captions`, one of them: what reads the items costs,
    not decoding. The default items are third-tower views at 4 px, for the h cache's own cost."""

    def __init__(self, rows: int, size: int = 4, key: str = "image_h", captions: list[str] | None = None):
        self.rows, self.size, self.key, self.captions = rows, size, key, captions

    def __len__(self) -> int:
        return self.rows

    def __getitems__(self, indices: list[int]) -> list[dict]:
        values = (torch.tensor(indices).view(-1, 1, 1, 1) % 251).to(torch.uint8)
        views = values.expand(-1, 3, self.size, self.size)
        items = [{self.key: v, "index": i} for v, i in zip(views, indices)]
        for item in items if self.captions else []:
            item["caption"] = self.captions[item["index"] % len(self.captions)]
        return items


def cache_memory_child(rows: int, dim: int, folder: str) -> None:
    """Run in a subprocess: build runtime.tower3_cache for `rows` samples of a D_h = dim tower (one process),
    then read 100 random batches of 512 rows, as training does. Peak memory = the high-water mark of
    resident memory (reset first) above the resident memory before; 'table_mib' is what a full N x D_h
    float32 table in memory -- the design this replaced -- would hold on every rank."""
    tower = FrozenTower(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, dim)), data.View(4, 4), "bench")
    args = argparse.Namespace(cache_tower3=True, cache_dir=folder, train_data="bench", seed=0, image_size=4,
                              workers=0, quiet=True, precision="fp32")
    env = runtime.Env()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS:")
    start = time.perf_counter()
    table = runtime.tower3_cache(args, env, tower, _TinyImages(rows))
    build = time.perf_counter() - start
    built = (_rss_kib("VmHWM:") - before) / 1024
    generator, start = torch.Generator().manual_seed(0), time.perf_counter()
    for _ in range(100):
        table[torch.randint(rows, (512,), generator=generator)]
    read_ms = (time.perf_counter() - start) * 10
    print(json.dumps({"rows": rows, "dim": dim, "table_mib": rows * dim * 4 / 2**20, "build_s": build,
                      "peak_build_mib": built, "peak_after_reads_mib": (_rss_kib("VmHWM:") - before) / 1024,
                      "read_512_rows_ms": read_ms, "file_mib": os.path.getsize(table.path) / 2**20}))


def bench_cache(rows: int = 1_000_000, dim: int = 64) -> dict:
    """The third tower's cache at `rows` rows (runtime.tower3_cache), in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, __file__, "--cache-child", str(rows), str(dim), tmp],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Step memory: gradient accumulation (--accum-freq) and activation checkpointing (--grad-checkpointing)
# ----------------------------------------------------------------------------------------------
# The recipes measured: CPU-sized towers for accumulation; the paper's ViT-B/16 at 224 px with CLIP's
# base text tower for checkpointing (fp32 on the CPU; that is the number the README's model scales).
MEMORY_MODELS = {
    "vit-small": dict(image_arch="vit-small", image_size=64, text_arch="mini", context_length=32),
    "vit-b/16": dict(image_arch="vit-b/16", image_size=224, text_arch="base", context_length=77, embed_dim=512),
}


def step_memory_child(spec: dict) -> None:
    """Run in a subprocess: one clip forward + backward of MEMORY_MODELS[spec['model']] on spec['batch'] x
    spec['accum'] samples (train.accumulated_backward for accum > 1), checkpointing on or off. The
    gradients exist already (a warm-up step at batch 2), so the figure is what the step adds: activations,
    the loss and temporaries -- the high-water mark of resident memory (reset first) above the resident
    memory before. The parent sets MALLOC_MMAP_THRESHOLD_ so freed tensors go back to the OS."""
    torch.manual_seed(0)
    model = ThreeTowers("clip", **MEMORY_MODELS[spec["model"]]).train()
    model.set_grad_checkpointing(spec["checkpointing"])
    size, length = model.image.image_size, MEMORY_MODELS[spec["model"]]["context_length"]
    parts = train.Parts(model, model, None, None, None, default_weights("clip"))
    args = argparse.Namespace(mode="clip", precision="fp32")

    def step(n: int, accum: int) -> None:
        text = torch.randint(3, 200, (n * accum, length))
        text[:, -1] = 257
        x = (torch.randn(n * accum, 3, size, size), text, None)
        if accum == 1:
            losses.tower_loss(model(*x), "clip")[0].backward()
        else:
            train.accumulated_backward(args, runtime.Env(), parts,
                                       [tuple(t if t is None else t[i * n:(i + 1) * n] for t in x) for i in range(accum)])
    step(2, 1)
    model.zero_grad(set_to_none=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, start = _rss_kib("VmRSS:"), time.perf_counter()
    step(spec["batch"], spec["accum"])
    print(json.dumps({**spec, "s": time.perf_counter() - start, "peak_mib": (_rss_kib("VmHWM:") - before) / 1024,
                      "params": sum(p.numel() for p in model.parameters())}))


def bench_step_memory(cases: list[dict]) -> list[dict]:
    """step_memory_child for each case, each in a fresh process."""
    rows = []
    for case in cases:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(case)], env=env,
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {case}: {rows[-1]['peak_mib']:.0f} MiB, {rows[-1]['s']:.1f} s", flush=True)
    return rows


def memory_cases(quick: bool) -> list[dict]:
    """Accumulation: B, K x B in K micro-batches, and K x B at once; checkpointing: ViT-B/16 at batch 32."""
    b, k = (16, 4) if quick else (64, 4)
    accum = [dict(model="vit-small", batch=b, accum=1), dict(model="vit-small", batch=b, accum=k),
             dict(model="vit-small", batch=k * b, accum=1)]
    big = [dict(model="vit-b/16", batch=8 if quick else 32, accum=1, checkpointing=c) for c in (False, True)]
    return [{"checkpointing": False, **c} for c in accum] + big


GPU_PRESET = ["--image-arch", "vit-b/16", "--image-size", "224", "--text-arch", "base", "--embed-dim", "512",
              "--context-length", "64"]
H200_BF16_DENSE_PEAK = 989e12        # NVIDIA's datasheet, dense (no sparsity)


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count from what is allocated now (CUDA; nothing to count elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory allocated since `reset_peak_memory` (CUDA), or None."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def bench_gpu_step(batches: list[int], repeats: int = 10, device: torch.device = torch.device("cuda")) -> list[dict]:
    """The 3t step (cached h; GPU_PRESET: ViT-B/16 at 224 px as f and as h, CLIP's base text tower, bf16
    on CUDA) at each per-GPU batch size, without and with --grad-checkpointing (`gpu_step_case`): samples/s,
    MFU against the matmul peak measured here and against the datasheet's dense bf16 peak, and peak memory.
    Each case starts once the previous one's model, optimiser and data are freed. tests/test_bench.py runs it
    on the CPU with tiny towers."""
    peak, rows = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32), []
    towers = train.parse_args(GPU_PRESET)
    with tempfile.TemporaryDirectory() as tmp:
        tower3 = random_tower3(tmp, towers.image_arch, towers.image_size)
        for batch in batches:
            for checkpointing in (False, True):
                gc.collect()           # the previous case's model and optimiser, unreachable since its case returned
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(gpu_step_case(batch, checkpointing, tower3, repeats, peak, device))
                print(table(rows[-1:], ["batch", "checkpointing", "step_ms", "samples_per_s", "gflops_per_sample",
                                        "mfu_measured_peak", "mfu_datasheet_peak", "peak_mem_gib"]), flush=True)
    return rows


def gpu_step_case(batch: int, checkpointing: bool, tower3: str, repeats: int, peak: float,
                  device: torch.device) -> dict:
    """One row of bench_gpu_step. Its model, optimiser and data live in this frame only. Peak memory: what is
    allocated from the timed steps' start (this case's model, optimiser state, gradients, h cache reads) plus
    what they add (torch.cuda.max_memory_allocated; None off CUDA); the FLOP-counting step before is left out."""
    preset = GPU_PRESET + ["--batch-size", str(batch), "--train-samples", str(4 * batch)]
    step, data_batches, flops, info, _ = setup_mode(
        "3t", True, preset + (["--grad-checkpointing"] if checkpointing else []), tower3)
    sync(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for i in range(repeats):
        step(data_batches[i % len(data_batches)])
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {**info, "step_ms": 1e3 * seconds, "samples_per_s": batch / seconds,
            "gflops_per_sample": flops / batch / 1e9,
            "mfu_measured_peak": flops / seconds / peak, "mfu_datasheet_peak": flops / seconds / H200_BF16_DENSE_PEAK,
            "peak_mem_gib": peak_memory_gib(device), "matmul_peak_tflops": peak / 1e12}


def meta_flops(net: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """Forward FLOPs of one sample, counted on the meta device (no compute, no memory)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        net(*inputs)
    return float(counter.get_total_flops())


def scale_model(memory: list[dict], loss_bytes_per_logit: float, vocab: int = 8192) -> list[dict]:
    """The large recipe (3t; ViT-B/16 at 224 px as f, CLIP's base text tower at 77 tokens, embed 512; a
    ResNet-50 or ViT-B/16 third tower; global batch 32,768) on 8 and 64 GPUs, derived from figures
    measured here: activation bytes per sample of f + g (fp32, CPU, `memory`, without and with
    checkpointing), the loss's bytes per logit (fp32, CPU), FLOPs and parameters counted on the meta
    device. Collectives are ring all-gather / all-reduce, bytes sent per rank."""
    per_sample = {r["checkpointing"]: r["peak_mib"] * 2**20 / r["batch"] for r in memory if r["model"] == "vit-b/16"}
    rows, global_batch = [], 32768
    for h_arch, d_h in (("resnet50", 2048), ("vit_b_16", 768)):
        with torch.device("meta"):
            model = ThreeTowers("3t", image_arch="vit-b/16", image_size=224, text_arch="base", vocab_size=vocab,
                                context_length=77, embed_dim=512, tower3_dim=d_h)
            tower = getattr(torchvision.models, h_arch)()
        image = torch.empty(1, 3, 224, 224, device="meta")
        f, g = meta_flops(model.image, image), meta_flops(model.text, torch.zeros(1, 77, dtype=torch.long, device="meta"))
        h = meta_flops(tower, image)
        params = sum(p.numel() for p in model.parameters())
        for world in (8, 64):
            local = global_batch // world
            ring = 2 * (world - 1) / world
            rows.append({
                "tower3": h_arch, "gpus": world, "batch_per_gpu": local,
                "activations_gib": per_sample[False] * local / 2**30,
                "activations_ckpt_gib": per_sample[True] * local / 2**30,
                "accum_freq_for_64gib": math.ceil(per_sample[False] * local / 2**30 / 64),
                "loss_gib": 3 * loss_bytes_per_logit * local * global_batch / 2**30,     # three terms, fp32
                "gather_gib": (world - 1) / world * global_batch * 6 * 512 * 4 / 2**30
                              + ring * global_batch * 6 * 512 * 4 / 2**30,               # fwd gather + bwd all-reduce
                "ddp_allreduce_gib": ring * params * 4 / 2**30,
                "step_tflop_per_gpu": 3 * (f + g) * local / 1e12, "accum_extra_tflop_per_gpu": (f + g) * local / 1e12,
                "h_tflop_per_gpu": h * local / 1e12, "h_share_of_step": h / (3 * (f + g)),
                "h_cache_read_mib_per_gpu": local * d_h * 4 / 2**20, "trainable_params_m": params / 1e6})
    return rows


def loss_bytes_per_logit(n_local: int = 1024, n_global: int = 8192) -> float:
    """The softmax loss's peak memory (one term, fwd + bwd, fp32) per logit of its (n_local, n_global) rows."""
    out = subprocess.run([sys.executable, __file__, "--loss-child", str(n_local), str(n_global), "512"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"] * 2**20 / (n_local * n_global)


SCALE_KEYS = ["tower3", "gpus", "batch_per_gpu", "activations_gib", "activations_ckpt_gib", "accum_freq_for_64gib", "loss_gib", "gather_gib",
              "ddp_allreduce_gib", "step_tflop_per_gpu", "accum_extra_tflop_per_gpu", "h_tflop_per_gpu",
              "h_share_of_step", "h_cache_read_mib_per_gpu"]


def write_shard(path: str, count: int, size: int = 256, short_side: tuple[int, int] | None = None,
                start: int = 0) -> None:
    """A tar shard of `count` JPEG + caption pairs (samples start, start + 1, ...) in the img2dataset layout,
    KEY.jpg + KEY.txt: the shapes world's images at `size` px, or with `short_side` = (lo, hi) photo-like
    ones (`photo_jpeg`) of random size, captioned by the shapes world."""
    world, rng = shapes.ShapesWorld(0, size), np.random.default_rng(start)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            if short_side is None:
                sample = world.sample(i)
                jpeg, caption = bytes(data_jpeg(sample["image"])), sample["caption"]
            else:
                jpeg, caption = photo_jpeg(rng, short_side), world.captions(i)[0]
            for name, payload in ((f"{i:06d}.jpg", jpeg), (f"{i:06d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def data_jpeg(image: torch.Tensor) -> torch.Tensor:
    from torchvision.io import encode_jpeg
    return encode_jpeg(image, quality=90).numpy()


def photo_jpeg(rng: np.random.Generator, short_side: tuple[int, int]) -> bytes:
    """A JPEG that compresses about like a photo: smooth colour gradients (a random 4 x 4 colour grid, upsampled
    bicubically) plus pixel noise, enough of it for a photo's bytes per pixel at quality 90; short side drawn
    from [lo, hi], landscape or portrait at 4:3."""
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    shape = (short, short * 4 // 3) if rng.random() < 0.5 else (short * 4 // 3, short)
    grid = torch.from_numpy(rng.uniform(0, 255, (1, 3, 4, 4)).astype(np.float32))
    image = torch.nn.functional.interpolate(grid, size=shape, mode="bicubic", align_corners=False)[0]
    image += torch.from_numpy(rng.normal(0, 10, (3, *shape)).astype(np.float32))
    return bytes(data_jpeg(image.clamp(0, 255).to(torch.uint8)))


def render_throughput(num_images: int, image_size: int, batch_size: int = 256) -> float:
    """Images per second of the shapes world's batched renderer in this process."""
    world = shapes.ShapesWorld(0, image_size)
    world.render_batch(range(batch_size))                   # warm-up
    start = time.perf_counter()
    for lo in range(0, num_images, batch_size):
        world.render_batch(range(lo, min(lo + batch_size, num_images)))
    return num_images / (time.perf_counter() - start)


def bench_data(image_size: int, count: int = 512) -> dict:
    """Images/s on one core: the shapes generator, and decoding + augmenting a tar shard."""
    torch.set_num_threads(1)
    render_per_s = render_throughput(2048, image_size)
    pairs = shapes.ShapesPairs("train", 4096, image_size=image_size)
    loader = data.make_loader(pairs, 256, tokenizer=Tokenizer.learn(pairs.sample_captions(4096), 8192, 77))
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["index"])
    pairs_per_s = n / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(os.path.join(tmp, "000000.tar"), count)
        shards = data.TarShards(os.path.join(tmp, "000000.tar"), image_size=224)
        start, n = time.perf_counter(), 0
        for _ in shards:
            n += 1
        tar_per_s = n / (time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    return {"shapes_render_per_s_per_core": render_per_s, "shapes_pairs_loader_per_s_per_core": pairs_per_s,
            "tar_256px_jpeg_to_224_per_s_per_core": tar_per_s}


def batch_bytes(batch: dict) -> int:
    """The bytes of a batch's tensors: what a loader worker ships to the training process for it."""
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def bench_loader(shards: int = 4, per_shard: int = 256, short_side: tuple[int, int] = (320, 448),
                 image_size: int = 224, h_size: int = 224, batch: int = 48, workers: int = 2, epochs: int = 2) -> dict:
    """data.TarShards + data.make_loader, as a tar-shard run reads its data: `shards` shards of photo-like JPEGs
    (short side in `short_side`), f's random crop at image_size, captions tokenised (BPE) in the workers, whole
    epochs timed (worker start-up included). For f's view only ('f'), with h's view at h_size added ('f+h'), and
    h's view only ('h': LiT, which has no f; data.with_tower3_view with f_view=False): samples/s, samples/s per
    worker, and bytes shipped per sample (a batch's tensors / its size)."""
    out = {"shards": shards, "per_shard": per_shard, "short_side": list(short_side), "image_size": image_size,
           "h_size": h_size, "batch": batch, "workers": workers, "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(shards):
            write_shard(os.path.join(tmp, f"{k:06d}.tar"), per_shard, short_side=short_side, start=k * per_shard)
        pattern = os.path.join(tmp, "*.tar")
        tokenizer = Tokenizer.learn(data.TarShards(pattern).sample_captions(train.VOCAB_CAPTIONS), 8192, 77)
        for name, h in (("f", None), ("f+h", h_size), ("h", h_size)):
            dataset = data.TarShards(pattern, image_size=image_size, tower3_view=h and data.View(h, h))
            if name == "h":
                dataset = data.with_tower3_view(dataset, dataset.tower3_view, f_view=False)
            loader = data.make_loader(dataset, batch, tokenizer=tokenizer, workers=workers)
            samples, shipped, start = 0, 0, time.perf_counter()
            for epoch in range(epochs):
                data.set_epoch(loader, epoch)
                for b in loader:
                    samples, shipped = samples + len(b["text"]), shipped + batch_bytes(b)
            seconds = time.perf_counter() - start
            out[name] = {"samples": samples, "samples_per_s": samples / seconds,
                         "samples_per_s_per_worker": samples / seconds / max(1, workers),
                         "bytes_per_sample": shipped / max(1, samples)}
    return out


def bench_step_input(rows: int = 512 * 24, batch: int = 512, image_size: int = 224, dim: int = 768,
                     steps: int = 20, workers: int = 2) -> dict:
    """The time the training thread spends on a step's input with a cached h: taking the next batch from
    data.make_loader (synthetic items, `_TinyImages`, f's view at image_size and a caption, tokenised in
    `workers` workers; pinned on CUDA, as train.py loads) plus train.tower_inputs -- the h cache's rows of the
    batch from a RowTable of `rows` rows x D_h `dim` (runtime.tower3_cache), the token trim, the copies to the
    device (issued, not awaited; none on the CPU). Medians over `steps` steps of one epoch, in ms."""
    env = runtime.Env()
    captions = [shapes.ShapesWorld(0, 32).captions(i)[0] for i in range(256)]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, dim))      # h of the 4 px views: the table
    tower = FrozenTower(net, data.View(4, 4), "bench").to(env.device)
    args = argparse.Namespace(mode="3t", precision="auto", cache_tower3=True, train_data="bench-input", seed=0,
                              image_size=image_size, workers=0, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = tmp
        table = runtime.tower3_cache(args, env, tower, _TinyImages(rows))
        parts = train.Parts(None, None, None, None, tower, {})
        dataset = _TinyImages(rows, image_size, "image", captions)
        loader = data.make_loader(dataset, batch, tokenizer=Tokenizer.learn(captions, 8192, 77), workers=workers,
                                  pin_memory=env.device.type == "cuda", rows=table)
        fetch, inputs, batches = [], [], iter(loader)
        for _ in range(min(steps, rows // batch)):
            start = time.perf_counter()
            b = next(batches)
            fetched = time.perf_counter()
            train.tower_inputs(args, env, parts, b)
            fetch.append(fetched - start)
            inputs.append(time.perf_counter() - fetched)
        del batches, table, parts
    return {"rows": rows, "batch": batch, "image_size": image_size, "dim": dim, "workers": workers,
            "device": env.device.type, "steps": len(fetch), "fetch_ms": 1e3 * statistics.median(fetch),
            "step_inputs_ms": 1e3 * statistics.median(inputs),
            "input_ms": 1e3 * statistics.median(f + i for f, i in zip(fetch, inputs))}


def bench_main_job(processes: int = 2) -> dict:
    """The README's main command, timed from a fresh folder (so the third tower's pretraining is
    included), the final evaluation it printed, and the auto-pretrained tower's held-out accuracy and
    when it was ready (its file's modification time, from the start)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        start, wall = time.perf_counter(), time.time()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}", os.path.join(root, "train.py"), "--mode", "3t", "--quiet"],
                       cwd=tmp, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        with open(os.path.join(tmp, "runs", "3t-s0", "metrics.jsonl")) as f:
            final = [json.loads(line) for line in f if '"eval"' in line][-1]["eval"]
        tower = [p for p in os.listdir(os.path.join(tmp, "cache")) if p.startswith("tower3-") and p.endswith(".pt")][0]
        with open(os.path.join(tmp, "cache", tower[:-3], "metrics.jsonl")) as f:
            tower_acc = 100 * [json.loads(line) for line in f if '"eval"' in line][-1]["eval"]["test/top1"]
        tower_s = os.path.getmtime(os.path.join(tmp, "cache", tower)) - wall
    keep = ("zeroshot/object/top1", "zeroshot/position_size/top1", "zeroshot/scene/top1",
            "retrieval/i2t/R@1", "retrieval/t2i/R@1")
    chance = {"zeroshot/object/top1": 100 / 35, "zeroshot/position_size/top1": 100 / 27,
              "zeroshot/scene/top1": 100 / 6, "retrieval/i2t/R@1": 100 / 500, "retrieval/t2i/R@1": 100 / 500}
    return {"command": f"torchrun --standalone --nproc_per_node={processes} train.py --mode 3t",
            "minutes": seconds / 60, "final": {k: final[k] for k in keep}, "chance": chance,
            "tower3": {"heldout_object_top1": tower_acc, "ready_after_s": tower_s}}


def print_loss(rows: list[dict]) -> None:
    print("\n## loss fwd+bwd vs global batch (D=128): one process vs one of 8 ranks\n" + "\n".join(
        f"N={r['global_batch']:>6}: " + ", ".join(
            f"{k}: {v['ms']:.0f} ms, {v['peak_mib']:.0f} MiB" if v else f"{k}: (would not fit)"
            for k, v in r.items() if k != "global_batch") for r in rows))


def table(rows: list[dict], keys: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)   # noqa: E731
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(fmt(r.get(k)) for k in keys) for r in rows]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and loss sizes (a smoke run)")
    p.add_argument("--gpu-preset", action="store_true", help="with CUDA: also ViT-B/16 + base text at 224px")
    p.add_argument("--main-job", action="store_true",
                   help="also time the README's main command end to end (minutes on a CPU: results/README.md)")
    p.add_argument("--out", default="results/bench.json", help="where to write the JSON figures")
    p.add_argument("--loss-child", nargs=3, type=int, help=argparse.SUPPRESS)   # internal: one loss run
    p.add_argument("--cache-child", nargs=3, help=argparse.SUPPRESS)            # internal: one h cache
    p.add_argument("--gpu-step", type=int, nargs="+", metavar="BATCH",
                   help="CUDA only: the ViT-B/16 + base text 3t step at these per-GPU batch sizes, without and with "
                        "--grad-checkpointing (scripts/gpu_check.sh)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)                    # internal: one step's memory
    p.add_argument("--scale-only", action="store_true",
                   help="only the step memory with --accum-freq and --grad-checkpointing, and the large recipe's "
                        "memory and traffic model derived from it (minutes on a CPU: results/README.md)")
    p.add_argument("--cache-only", action="store_true", help="only the h cache figures (1M rows)")
    p.add_argument("--main-job-only", action="store_true", help="only time the README's main command")
    p.add_argument("--loader-only", action="store_true",
                   help="only the tar-shard loader (bench_loader: photo-like JPEGs, 224 px crops, batch 48, 2 "
                        "workers; f's view, f's and h's, h's alone): samples/s, per worker, bytes shipped per "
                        "sample; into --out's 'loader'")
    p.add_argument("--input-only", action="store_true",
                   help="only the training thread's input time per step at batch 512 with a cached h "
                        "(bench_step_input: next batch + train.tower_inputs); into --out's 'step_input'")
    p.add_argument("--linears-only", action="store_true",
                   help="only the vit-small step (clip, 3t with h cached) with every linear on oneDNN against "
                        "F.linear, one of each in turn (bench_linears); into --out's 'linears'")
    p.add_argument("--pairs", type=int, default=20, help="--linears-only: rounds of the paired steps")
    return p.parse_args()


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def run_scale(a: argparse.Namespace) -> None:
    """--scale-only: step memory, the loss's bytes per logit, and the large recipe's model from them."""
    memory = bench_step_memory(memory_cases(a.quick))
    per_logit = loss_bytes_per_logit()
    rows = scale_model(memory, per_logit)
    print("\n## step memory (fp32, CPU)\n" + table(memory, ["model", "batch", "accum", "checkpointing", "peak_mib", "s"])
          + f"\n\nloss: {per_logit:.1f} bytes per logit (one term, fwd + bwd)\n\n## the large recipe, derived\n"
          + table(rows, SCALE_KEYS))
    write_json(a.out, {"memory": memory, "loss_bytes_per_logit": per_logit, "scale_model": rows})


def update_json(path: str, key: str, value) -> None:
    """Set one part's figures in the JSON file at `path`, keeping the others'."""
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    write_json(path, {**old, key: value})


def run_part(a: argparse.Namespace) -> bool:
    """The modes that run one part only (internal children included); False when none was asked for."""
    if a.loss_child:
        loss_memory_child(*a.loss_child)
    elif a.cache_child:
        cache_memory_child(int(a.cache_child[0]), int(a.cache_child[1]), a.cache_child[2])
    elif a.memory_child:
        step_memory_child(json.loads(a.memory_child))
    elif a.gpu_step:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu-step: no CUDA device present")
        write_json(a.out, bench_gpu_step(a.gpu_step))
    elif a.scale_only:
        run_scale(a)
    elif a.cache_only:
        print(json.dumps(bench_cache(), indent=1))
    elif a.main_job_only:
        print(json.dumps(bench_main_job(), indent=1))
    elif a.linears_only:
        with tempfile.TemporaryDirectory() as tmp:
            tower3 = random_tower3(tmp, "vit-small", 64)
            rows = bench_linears(CPU_PRESETS["cpu-vit-small"] + ["--train-samples", "2048"], tower3, a.pairs)
        print(table(rows, list(rows[0])))
        update_json(a.out, "linears", rows)
        print(f"[bench] wrote {a.out}: 'linears'")
    elif a.loader_only or a.input_only:
        key, figures = ("loader", bench_loader()) if a.loader_only else ("step_input", bench_step_input())
        print(json.dumps(figures, indent=1))
        update_json(a.out, key, figures)
        print(f"[bench] wrote {a.out}: {key!r}")
    else:
        return False
    return True


def main() -> None:
    a = parse_args()
    if run_part(a):
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 3 if a.quick else 16
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                          "torch": torch.__version__}}
    print(f"[bench] {result['machine']}")
    presets = dict(CPU_PRESETS)
    if a.gpu_preset and device.type == "cuda":
        presets["gpu-vit-b16"] = ["--batch-size", "256"] + GPU_PRESET
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset in presets.items():
            towers = train.parse_args(preset)                  # train.py's defaults fill what the preset omits
            tower3 = random_tower3(tmp, towers.image_arch, towers.image_size)
            runs, peak = bench_modes(preset + ["--train-samples", "2048"], tower3, repeats, dtype)
            result[f"train_{name}"] = runs
            result["machine"][f"matmul_peak_tflops_{name}"] = peak / 1e12
            kernels = {k: v / 1e12 for k, v in kernel_peaks(device, dtype).items()}
            result["machine"][f"kernel_peaks_tflops_{name}"] = kernels
            print(f"\n## training step, {name} preset (matmul peak {peak / 1e9:.0f} GFLOP/s; now "
                  + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in kernels.items()) + ")\n" + table(runs, [
                "mode", "cache", "batch", "step_ms", "samples_per_s", "vs_clip", "gflops_per_sample",
                "attn_share", "mfu", "trainable_params"]))
    result["loss"] = bench_loss([1024, 4096] if a.quick else [1024, 2048, 4096, 8192, 16384, 32768], world=8)
    print_loss(result["loss"])
    result["data"] = bench_data(64)
    print("\n## data path (images/s on one core)\n" + "\n".join(f"{k}: {v:.0f}" for k, v in result["data"].items()))
    result["h_cache"] = c = bench_cache()
    print(f"\n## h cache, {c['rows']:,} rows x D_h {c['dim']} ({c['table_mib']:.0f} MiB as a full table): built "
          f"in {c['build_s']:.1f} s, peak memory +{c['peak_build_mib']:.0f} MiB, 512 rows read in "
          f"{c['read_512_rows_ms']:.2f} ms")
    if a.main_job:
        result["main_job"] = job = bench_main_job()
        print(f"\n## main job: {job['command']}\n{job['minutes']:.1f} minutes; final (chance): " + ", ".join(
            f"{k} {v:.1f} ({job['chance'][k]:.1f})" for k, v in job["final"].items())
            + f"; its third tower: {job['tower3']['heldout_object_top1']:.1f} % held-out object accuracy, ready "
              f"after {job['tower3']['ready_after_s']:.0f} s")
    write_json(a.out, result)
    print(f"\n[bench] wrote {a.out}")


if __name__ == "__main__":
    main()
