"""What every run needs besides the method, each behind one call from train.py: processes and
devices (`Env`, and `Env.phase` where ranks drift apart), run folders and locks (`claim_folders`,
`exclusive`), where a run stands and its checkpoints (`save`, `find_checkpoint`, `resume`), the
third tower's cache (`tower3_cache`), the metrics log (`MetricsLog`), and the optional oneDNN
routing of linear layers on AVX-512 CPUs, applied to a built model as --compile is (`wrap`).

Read `Env` first, then `wrap`, `save` / `resume` and `tower3_cache`, in the order `train.run`
calls them. train.run (CLIP, LiT, 3T) and train.pretrain (a third tower's pretraining) share all
of it, so both resume exactly, write checkpoints atomically and stop together on every rank.
Nothing here is on the step's path: the step (forward, loss, backward, update) is train.py,
model.py and losses.py.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from checkpoints import CHECKPOINT_FORMAT, checkpoint_pieces, checksum, read_checkpoint, tower3_digest
from model import FrozenTower, precision


# ----------------------------------------------------------------------------------------------
# The project's own errors: one line each, no traceback (the entry points catch data.ProjectError); writes that
# leave nothing half-written and say a full disk in one line
# ----------------------------------------------------------------------------------------------


class RunError(data.ProjectError):
    """A run that cannot go on for a reason its message names (a checkpoint's stored part that does not load)."""


class NonFinite(RunError, FloatingPointError):
    """--max-nonfinite non-finite steps in a row: the run stops (a FloatingPointError too)."""


class DiskFull(RunError):
    """A write under --out or --cache-dir found its disk (or quota) full; nothing half-written is left."""


def raise_if_disk_full(error: OSError, flag: str, folder: str, what: str, needed: int) -> None:
    """DiskFull naming the folder, what was written and about how many bytes it needs, when `error` says the disk
    or quota is full (ENOSPC, EDQUOT); otherwise return, and the caller re-raises `error`."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    try:
        free = f", {shutil.disk_usage(folder).free:,} bytes free"
    except OSError:
        free = ""
    raise DiskFull(f"{flag} {folder!r}: no space left on the device for {what}: it needs about {needed:,} bytes"
                   f"{free}; free some space there or give another {flag}") from None


def append_whole(f: BinaryIO, line: bytes) -> None:
    """Append `line` to the unbuffered binary file `f` whole or not at all: a write that fails part-way is cut
    back off, so the file never ends in half a record. Re-raises the error."""
    start = f.seek(0, os.SEEK_END)
    try:
        view, done = memoryview(line), 0          # slices of a view copy nothing
        while done < len(view):
            done += os.write(f.fileno(), view[done:])
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(f.fileno(), start)
        raise


def checkpoint_to(path: str, ckpt: dict, flag: str) -> None:
    """Write a checkpoint whole or not at all (write_file): a failed save leaves the previous file
    intact and no temporary file, and a full disk is said in one line (DiskFull) naming the folder
    `flag` gave and the bytes needed. It is serialised in memory first (model.checkpoint_pieces,
    whose docstring gives the memory cost), so that a full disk reaches us as an OSError."""
    write_file(path, checkpoint_pieces(ckpt), flag)


def write_file(path: str, content: bytes | list[bytes], flag: str) -> None:
    """Write a file whole or not at all: a temporary file beside it (this host's name: one writer
    per path, since --out and the auto tower are locked, so a writer killed mid-write leaves a file
    that the next write here replaces), written in full, flushed to the disk, then renamed into
    place. A full disk is said in one line (DiskFull) naming the folder `flag` gave. A list of
    pieces is consumed, each freed once written, so the content is held in memory at most until the
    write."""
    pieces = [content] if isinstance(content, (bytes, bytearray)) else content
    size = sum(len(p) for p in pieces)
    tmp = f"{path}.tmp.{socket.gethostname()}"
    try:
        with open(tmp, "wb", buffering=0) as f:
            pieces.reverse()
            while pieces:
                append_whole(f, pieces.pop())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        pieces.clear()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise_if_disk_full(e, flag, os.path.dirname(path) or ".", os.path.basename(path), size)
        raise


def one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker reaches the main process
    with the worker's traceback in its message; its last line is the message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def take_lock(f: Any, flag: str, folder: str) -> bool:
    """An exclusive flock on the open file `f`, without waiting: True when this process now holds
    it, False when another process does -- which only EWOULDBLOCK (BlockingIOError) means. Any other
    error says the filesystem cannot lock at all (Lustre mounted without -o flock answers ENOSYS;
    others EOPNOTSUPP or ENOLCK): RunError naming `folder`, since such a folder cannot keep two runs
    apart."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        raise RunError(f"{flag} {folder!r}: the filesystem does not support file locks (flock: "
                       f"{e}); mount it with -o flock or use another {flag}") from None
    return True


# ----------------------------------------------------------------------------------------------
# Flags: one range per numeric flag, checked at parse time
# ----------------------------------------------------------------------------------------------


def check_ranges(p: argparse.ArgumentParser, args: argparse.Namespace, ranges: dict[str, str]) -> None:
    """p.error naming the first flag (or list element) outside its interval in `ranges`."""
    for name, interval in ranges.items():
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not ((lo < v if interval[0] == "(" else lo <= v) and
                                      (v < hi if interval[-1] == ")" else v <= hi)):
                p.error(f"--{name.replace('_', '-')} {v if isinstance(v, int) else f'{v:g}'}: "
                        f"expected a value in {interval}")


# ----------------------------------------------------------------------------------------------
# Processes and devices (torchrun's RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run is rank 0)
# ----------------------------------------------------------------------------------------------


DIST_TIMEOUT = 1800.0       # seconds: --dist-timeout's default, torch's for gloo (NCCL's is 600)
WAIT_LOG_EVERY = 60.0       # seconds between rank 0's lines about the ranks it waits for


class Env:
    def __init__(self, dist_timeout: float = DIST_TIMEOUT):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = max(1, (os.cpu_count() or 1) // local_world)       # this process's share of the CPU
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
            if "OMP_NUM_THREADS" not in os.environ:
                torch.set_num_threads(cores)
        self.default_workers = 0 if self.device.type == "cpu" else min(8, cores)
        self.agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None   # torchrun's agent process
        self.locks = contextlib.ExitStack()                                           # run folders held
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=dist_timeout))
        self.master = self.rank == 0
        self.dist_timeout = dist_timeout
        self.phases: Counter = Counter()                   # how often each phase began (Env.phase)

    def workers(self, args: argparse.Namespace) -> int:
        """DataLoader workers per rank: --workers, else 0 on CPU and up to 8 per GPU."""
        return self.default_workers if args.workers is None else args.workers

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def stop_together(self, problem: str | None) -> None:
        """SystemExit on every rank when any rank has a problem: one all_reduce, so no rank is left
        waiting in a collective for one that stopped. A rank says its own problem, else whose it was."""
        if self.world == 1:
            if problem:
                raise SystemExit(problem)
            return
        flags = torch.zeros(self.world, device=self.device)
        flags[self.rank] = problem is not None
        dist.all_reduce(flags)
        if flags.any():
            raise SystemExit(problem or f"rank {self.rank}: stopping with rank(s) "
                                        f"{flags.nonzero().flatten().tolist()}, see their error")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Callable[[], None]]:
        """A stretch of the run in which the ranks may drift further apart than a collective waits
        (each decodes its share of the h cache; rank 0 waits for another run's lock). It yields
        `meet`: call it where the stretch ends, before the next collective. Ranks meet through the
        process group's store, polling it rather than waiting inside a backend collective (NCCL's
        watchdog ends a collective that waits past its timeout with a traceback). The meeting's
        outcome is decided once for all ranks: met, or the first stop note -- from a rank that
        waited --dist-timeout seconds (naming the phase and whom it waited for), or from a rank
        that failed inside, so the others stop at once rather than at the timeout. A collective
        that fails inside (a peer died) ends in one line naming the phase."""
        self.phases[name] += 1
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")   # apart from earlier attempts'
        key = f"3t-phase/{restart}/{name}/{self.phases[name]}"
        try:
            yield lambda: self._meet(name, key)
        except BaseException as e:
            note = one_line(e) or type(e).__name__
            own = note if note.startswith(f"rank {self.rank}:") else f"rank {self.rank}: {note}"
            if self.world > 1:
                with contextlib.suppress(Exception):
                    self._decide(dist.distributed_c10d._get_default_store(), key, own)
            if isinstance(e, dist.DistError) or type(e) is RuntimeError and "gloo" in str(e):
                detail = re.sub(r"^\[[^\]]*\]\s*", "", note).split(". ")[0][:200]  # no "[file:N] "
                raise RunError(f"rank {self.rank}: lost the other ranks in {name!r} ({detail}); "
                               f"a peer stopped, or waited past --dist-timeout "
                               f"{self.dist_timeout:g} s") from None
            raise

    @staticmethod
    def _decide(store: dist.Store, key: str, outcome: str) -> str:
        """The meeting's outcome, 'met' or a stop note: the first offered, alike for all ranks."""
        return store.compare_set(f"{key}/state", "", outcome).decode()

    def _meet(self, name: str, key: str) -> None:
        """A phase's meeting: mark this rank arrived (the last to arrive decides 'met'), then poll
        the outcome; after --dist-timeout offer a stop note instead."""
        if self.world == 1:
            return
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{key}/rank{self.rank}", "")
        if store.add(f"{key}/arrived", 1) == self.world:
            self._decide(store, key, "met")
        start, pause, said = time.monotonic(), 0.01, 0.0
        while True:
            state = store.get(f"{key}/state").decode() if store.check([f"{key}/state"]) else ""
            waited = time.monotonic() - start
            if not state and waited >= self.dist_timeout:
                state = self._decide(store, key, f"rank {self.rank}: timed out after "
                                                 f"{self.dist_timeout:g} s waiting for "
                                                 f"{self._absent(store, key)} in {name!r} "
                                                 f"(--dist-timeout)")
            if state == "met":
                return
            if state:
                raise RunError(state if state.startswith(f"rank {self.rank}:") else
                               f"rank {self.rank}: stopping in {name!r} with the others; {state}")
            if self.master and waited - said >= WAIT_LOG_EVERY:
                said = waited
                log(self, f"[wait] {name}: waiting for {self._absent(store, key)} ({waited:.0f} s "
                          f"of --dist-timeout {self.dist_timeout:g} s)")
            time.sleep(pause)
            pause = min(2 * pause, 1.0)

    def _absent(self, store: dist.Store, key: str) -> str:
        """The ranks that have not reached the meeting `key`: 'rank 1', 'ranks 1, 3 and 9 more'."""
        missing = [r for r in range(self.world) if not store.check([f"{key}/rank{r}"])]
        return (("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing[:8]))
                + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    def orphaned(self) -> str | None:
        """Why this worker should stop when torchrun's agent died (it was re-parented), else None."""
        if self.agent is not None and os.getppid() != self.agent:
            return f"rank {self.rank}: the torchrun agent (pid {self.agent}) is gone, stopping this orphaned worker"
        return None

    def lock(self, folder: str) -> str | None:
        """Hold an exclusive flock on folder/.lock (it names the holder) until close(); or say who
        holds it, or that the folder's filesystem cannot lock (take_lock). The kernel drops the lock
        when its process dies: no stale locks after a crash."""
        f = open(os.path.join(folder, ".lock"), "a+")
        try:
            held = take_lock(f, "--out", folder)
        except RunError as e:
            f.close()
            return str(e)
        if not held:
            f.seek(0)
            holder = f.read().strip() or "holder unknown"
            f.close()
            return f"--out {folder!r} is in use by another run ({holder}); give this run its own --out"
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.locks.enter_context(f)
        return None

    def close(self) -> None:
        self.locks.close()
        if self.owns_group:
            dist.destroy_process_group()


def every_rank(env: Env, flag: bool) -> bool:
    """Whether `flag` holds on every rank (one all_reduce), so that all ranks take the same branch."""
    if env.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def log(env: Env, message: str) -> None:
    if env.master:
        tqdm.write(message)


def wrap(model: torch.nn.Module, args: argparse.Namespace, env: Env) -> torch.nn.Module:
    """What the step calls: the model in DDP when there are several processes, then compiled if
    asked. Compiling the DDP module, not wrapping a compiled one, is the order PyTorch's DDP and
    torch.compile notes give: the compiler then splits the graph at DDP's gradient buckets
    (DDPOptimizer), so each bucket's all-reduce overlaps the rest of backward. Checkpoints,
    evaluation and the no-grad pass of --accum-freq use the raw model, so no '_orig_mod.' or
    'module.' prefix reaches a checkpoint. `cpu_kernels` first puts the raw model's linear layers
    on this CPU's faster kernel, in place (the same state_dict)."""
    cpu_kernels(model, env.device)
    if env.world > 1:
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


@contextlib.contextmanager
def exclusive(lock_path: str, env: Env, holder_busy: str) -> Iterator[None]:
    """Rank 0 holds an exclusive flock on `lock_path` for the block; while another run holds it,
    rank 0 says so (`holder_busy` and who) and waits, and the other ranks wait for it through the
    store (Env.phase), not in a collective, for up to --dist-timeout. The kernel drops the lock when
    its holder dies, so a crashed run never blocks the next one; a filesystem that cannot lock stops
    the run with one line (take_lock)."""
    f = open(lock_path, "a+") if env.master else None
    try:
        with env.phase("waiting for the third tower's lock") as meet:
            if f is not None and not take_lock(f, "--cache-dir", os.path.dirname(lock_path)):
                f.seek(0)
                log(env, f"{holder_busy} ({f.read().strip() or 'holder unknown'}): waiting for it")
                fcntl.flock(f, fcntl.LOCK_EX)
            if f is not None:
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            meet()
            env.barrier()
        yield
    finally:
        if f is not None:
            f.close()


# ----------------------------------------------------------------------------------------------
# CPU kernels: linear layers through oneDNN on an AVX-512 CPU (a speed choice; the same function as nn.Linear)
# ----------------------------------------------------------------------------------------------
ONEDNN_OP = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")   # the kernel exists
ONEDNN_MIN_MACS = 2 ** 26        # multiply-adds of one call below which F.linear is faster (see `linear`)


def prefers_onednn(capability: str) -> bool:
    """Whether oneDNN's matmul beats MKL's on a CPU of this vector capability (PyTorch's
    torch.backends.cpu.get_cpu_capability()): only with AVX-512, which MKL leaves unused on AMD
    processors. On an AVX2-only processor MKL's AVX2 kernel is the faster one (results/README.md)."""
    return capability.startswith("AVX512")


def cpu_kernels(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` with every linear layer on oneDNN (`use_onednn_linears`, in place) when it runs on a CPU whose
    capability prefers it (`prefers_onednn`); otherwise untouched. Called by `wrap` on the built model."""
    if device.type == "cpu" and ONEDNN_OP and prefers_onednn(torch.backends.cpu.get_cpu_capability()):
        use_onednn_linears(net)
    return net


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias by oneDNN's matmul, for x of any leading shape."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    """Forward and input gradient by oneDNN; the weight gradient (a long inner dimension, which
    oneDNN runs slower here) and the bias gradient as nn.Linear computes them."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = onednn_linear(grad, weight.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through oneDNN for large float32 matmuls on the CPU. Why: PyTorch's float32 matmul
    calls MKL, whose kernels on AMD processors stop at AVX2, while oneDNN (inside PyTorch already; it
    runs the convolutions) uses the AVX-512 the processor has (results/README.md has the measurements).
    Below ONEDNN_MIN_MACS multiply-adds oneDNN's per-call cost eats the gain, so small layers keep
    F.linear. Results agree with F.linear to float rounding (tests/test_model.py). CUDA, other dtypes
    and torch.compile take F.linear."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS and not torch.compiler.is_compiling()):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, bias)
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear through `linear`: the same parameters, names and state_dict."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(net: torch.nn.Module) -> torch.nn.Module:
    """Run every nn.Linear of a built `net` (towers, heads, the fused q/k/v projections; torchvision's
    layers too) through `linear`, in place, by switching its class to OneDNNLinear, as torch.compile is
    applied to a built model; parameters and state_dict are untouched."""
    for m in net.modules():
        if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward:
            m.__class__ = OneDNNLinear
    return net


# ----------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------


def unwritable(flag: str, folder: str) -> str | None:
    """Why `folder` (created if missing) cannot take a new file, or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"{flag} {folder!r}: cannot write there ({e.strerror or e})"
    return None


def claim_folders(args: argparse.Namespace, env: Env) -> None:
    """Before any work: create --out (and --cache-dir where this run writes) and prove them writable;
    then rank 0 locks --out for the run's lifetime, so a second run given the same folder stops at once
    instead of interleaving metrics.jsonl and overwriting ckpt.pt."""
    folders = [("--out", args.out)]
    if args.mode in ("lit", "3t") and (args.tower3 == "auto" or args.cache_tower3):
        folders.append(("--cache-dir", args.cache_dir))
    problem = next(filter(None, (unwritable(flag, folder) for flag, folder in folders)), None)
    if problem is None and env.master:
        problem = env.lock(args.out)
    env.stop_together(problem)


# ----------------------------------------------------------------------------------------------
# The host's view of the steps: non-finite steps counted, and the steps at which it reads the device
# ----------------------------------------------------------------------------------------------
class NonFiniteSteps:
    """Non-finite steps, counted on the device and read by the host only at sync steps (`sync_step`):
    a warning with their number, and NonFinite after --max-nonfinite in a row. The flag is
    rank-identical (train.adamw_update), so every rank stops at the same step."""

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.streak, self.longest, self.count = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))

    def add(self, finite: Tensor) -> None:
        bad = (~finite).long()
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        self.count = self.count + bad

    def check(self, env: Env, step: int) -> None:
        longest, count = torch.stack([self.longest, self.count]).tolist()
        self.longest, self.count = self.streak.clone(), torch.zeros_like(self.count)
        if count:
            log(env, f"[warn] up to step {step}: {count} step(s) with a non-finite loss/gradient made no update")
        if longest >= self.limit:
            raise NonFinite(f"{longest} non-finite steps in a row by step {step}: lower --lr, "
                            f"check the data, or use --precision fp32")


def sync_step(step: int, first: int, total: int, args: argparse.Namespace) -> bool:
    """Whether the step after `step` is one at which the host reads device values and the ranks agree
    to go on: the run's first step, and those that end with a log line, a checkpoint, an evaluation
    or the run. Between them a CUDA step never waits for the GPU."""
    done = step + 1
    return (step == first or done == total or done % args.log_every == 0 or done % args.save_every == 0
            or bool(args.eval_every) and done % args.eval_every == 0)


# ----------------------------------------------------------------------------------------------
# Where a run stands, and its checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where a run stands: optimiser steps, and this rank's epoch and batch within it (streaming
    shards may put ranks at different points of an epoch); skipped samples so far."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    data_errors: Counter = field(default_factory=Counter)


def endless(loader, position: Position) -> Iterator[dict | None]:
    """The loader's batches, epoch after epoch, from `position` on; position follows along. None after
    an epoch that gave no batch at all (more epochs would not help: StepBatches stops the run)."""
    while True:
        data.set_epoch(loader, position.epoch)
        for batch in loader:
            position.batch += 1
            position.data_errors.update(batch.get("data_errors", {}))
            yield batch
        if position.batch == 0:
            yield None
        position.epoch, position.batch = position.epoch + 1, 0


class StepBatches:
    """Each step's batches of `endless` (--accum-freq of them), with the ranks' agreement to go on at
    sync steps only (Env.stop_together, one collective): a rank whose epoch held no full batch
    (too little usable data), or whose torchrun agent died, stops every rank there. Map-style data
    gives every rank the same batches, so only streaming shards can run out; a rank that does so
    between sync steps repeats its last batch until the next one, which comes before any checkpoint,
    so no checkpoint holds such a step."""

    def __init__(self, batches: Iterator[dict | None], args: argparse.Namespace, env: Env):
        self.batches, self.args, self.env = batches, args, env
        self.problem: str | None = None
        self.last: dict | None = None

    def take(self, count: int, agree: bool) -> list[dict]:
        out = []
        for _ in range(count):
            batch = next(self.batches)
            if batch is None and self.problem is None:
                self.problem = (f"--train-data {self.args.train_data!r}: an epoch gave rank {self.env.rank} no full "
                                f"batch of --batch-size {self.args.batch_size}; each rank (and, for tar shards, each "
                                f"loader worker) needs at least that many usable samples per epoch")
            self.last = batch if batch is not None else self.last
            out.append(self.last)
        if agree:
            self.env.stop_together(self.problem or self.env.orphaned())
        elif self.last is None:
            raise SystemExit(self.problem)
        return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(args: argparse.Namespace, env: Env, model: torch.nn.Module, optimizer, scheduler, position: Position,
         **extra) -> None:
    """ckpt.pt: the trainable model, optimiser, schedule, step, and every rank's RNG state and data
    position (gathered, so one file resumes every rank exactly); `extra` says what the model is."""
    mine = {"rng": rng_state(), "epoch": position.epoch, "batch_in_epoch": position.batch}
    ranks = [mine]
    if env.world > 1:
        ranks = [None] * env.world
        dist.all_gather_object(ranks, mine)
    if env.master:
        checkpoint_to(os.path.join(args.out, "ckpt.pt"),
                      {"format": CHECKPOINT_FORMAT, "mode": args.mode, "args": vars(args),
                       "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "step": position.step, "ranks": ranks,
                       "data_errors": dict(position.data_errors), **extra}, "--out")


# What a resumed run may set otherwise than the run that wrote its checkpoint: how long it runs (--steps, --epochs:
# the schedule follows the new total), where and how often it saves, logs and evaluates (and on what data), how
# many loader workers read map-style data (each sample's crop is seeded by the sample, so the order and the pixels stay the same), and
# where the third tower's cache lives. How long ranks wait for each other (--dist-timeout) may
# change too.
# Everything else decides which samples come in which order, or how a step computes, and must match,
# or the resumed run would not continue the one it resumes.
RESUME_MAY_CHANGE = ("steps", "epochs", "save_every", "eval_every", "log_every", "quiet", "workers", "out",
                     "eval_data", "eval_images", "max_nonfinite", "compile", "cache_dir", "cache_tower3",
                     "grad_checkpointing", "zeroshot_data", "retrieval_data", "dist_timeout")
# Flags judged by the model they build instead (check_resumable: the model's configuration and the frozen tower's
# weights, so a third tower moved to another path still resumes); the learned temperature replaces the initial one.
RESUME_BY_MODEL = ("mode", "image_arch", "image_size", "text_arch", "embed_dim", "no_tower3_heads", "loss",
                   "init_temperature", "tower3", "tower3_label", "tower3_steps", "tower3_batch_size", "tower3_size",
                   "tower3_resize", "tower3_interpolation", "tower3_mean", "tower3_std")


def changed_settings(ckpt: dict, args: argparse.Namespace, path: str) -> list[str]:
    """The flags in RESUME_MAY_CHANGE that differ from the checkpoint's ("--steps 4 -> 8"), for the log; SystemExit
    naming every other flag that differs. --workers may not change for tar shards: the number of readers decides
    which reader streams which shard."""
    recorded = ckpt["args"]
    free = set(RESUME_MAY_CHANGE) - ({"workers"} if data.streamed(args.train_data, args.mode) else set())
    changed, refused = [], []
    for name, now in sorted(vars(args).items()):
        if name in RESUME_BY_MODEL or name == "resume" or recorded.get(name) == now:
            continue
        flag = f"--{name.replace('_', '-')}"
        (changed if name in free else refused).append((flag, recorded.get(name), now))
    if refused:
        raise SystemExit(f"--resume {path!r} was written with other settings: "
                         + "; ".join(f"{flag} {was!r} there, {now!r} now" for flag, was, now in refused)
                         + f". Resume with the checkpoint's values (only "
                           f"{', '.join('--' + n.replace('_', '-') for n in sorted(free))} may change), "
                           f"or start a new run with another --out")
    return [f"{flag} {was!r} -> {now!r}" for flag, was, now in changed]


def find_checkpoint(args: argparse.Namespace) -> dict | None:
    """The checkpoint to resume from: --resume PATH, or with --resume latest the run folder's ckpt.pt
    if there is one; also after an elastic restart by torchrun (--max-restarts), so a restarted worker
    continues instead of starting over. Its settings must match these flags (changed_settings)."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    path = args.resume
    if args.resume == "latest" or (args.resume is None and restarted):
        path = os.path.join(args.out, "ckpt.pt")
        if not os.path.exists(path):
            return None
    elif path is None:
        return None
    elif not os.path.exists(path):
        raise SystemExit(f"--resume {path!r}: no such checkpoint")
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"--resume {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("mode") != args.mode:
        raise SystemExit(f"--resume {path!r}: not a {CHECKPOINT_FORMAT} checkpoint of mode {args.mode}")
    missing = [k for k in ("args", "model", "optimizer", "scheduler", "step", "ranks") if k not in ckpt]
    if missing:
        raise SystemExit(f"--resume {path!r}: an incomplete checkpoint, without {', '.join(missing)}")
    return {**ckpt, "path": path, "changed": changed_settings(ckpt, args, path)}


def check_resumable(ckpt: dict | None, config: dict, tower3_digest: str | None = None) -> None:
    """A resumed run must rebuild the model its checkpoint holds, with the same frozen tower: SystemExit
    naming every setting that differs (but the initial temperature, which the checkpoint's learned one
    replaces)."""
    if ckpt is None:
        return
    recorded = {**ckpt.get("model_config", ckpt.get("classifier", {})), "tower3 weights": ckpt.get("tower3_digest")}
    diff = [f"{k}: {recorded.get(k)!r} in the checkpoint, {v!r} now" for k, v in {**config, "tower3 weights": tower3_digest}.items()
            if k != "init_temperature" and recorded.get(k) != v]
    if diff:
        raise SystemExit(f"--resume {ckpt['path']!r} holds another model than these flags build: {'; '.join(diff)}"
                         + (f" (its third tower was --tower3 {ckpt['tower3']!r})" if ckpt.get("tower3") else ""))


def resume(env: Env, ckpt: dict | None, model: torch.nn.Module, optimizer, scheduler) -> Position:
    """Restore the model, optimiser, schedule, this rank's RNG state and data position from ckpt."""
    if ckpt is None:
        return Position()
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"--resume {ckpt['path']!r}: its state does not fit the model these flags build "
                         f"({' '.join(str(e).split())[:300]})") from None
    if len(ckpt["ranks"]) != env.world:
        raise SystemExit(f"--resume {ckpt['path']!r} was written by {len(ckpt['ranks'])} processes; resume it "
                         f"with the same number (now {env.world}) to continue exactly")
    mine = ckpt["ranks"][env.rank]
    set_rng_state(mine["rng"])
    log(env, f"[resume] {ckpt['path']}: step {ckpt['step']}, epoch {mine['epoch']}, batch {mine['batch_in_epoch']}"
             + (f"; changed: {', '.join(ckpt['changed'])}" if ckpt.get("changed") else ""))
    return Position(ckpt["step"], mine["epoch"], mine["batch_in_epoch"], Counter(ckpt.get("data_errors", {})))


# ----------------------------------------------------------------------------------------------
# The metrics log
# ----------------------------------------------------------------------------------------------


class MetricsLog:
    """The progress bar and metrics.jsonl (rank 0): running means of the step metrics over ranks,
    one record every --log-every steps; evaluation records as they come. It also counts the non-finite
    steps (NonFiniteSteps) and reads their streak at sync steps."""

    def __init__(self, args: argparse.Namespace, env: Env, total: int, position: Position, scheduler):
        self.args, self.env, self.position, self.total, self.scheduler = args, env, position, total, scheduler
        self.nonfinite = NonFiniteSteps(args.max_nonfinite, env.device)
        self.file = open(os.path.join(args.out, "metrics.jsonl"), "ab", buffering=0) if env.master else None
        self.bar = tqdm(total=total, initial=position.step, desc=args.mode, disable=not env.master or args.quiet,
                        dynamic_ncols=True)
        self.running: Counter = Counter()
        self.t_last, self.n_last = time.time(), position.step

    def step(self, metrics: dict[str, torch.Tensor], finite: Tensor, sync: bool) -> None:
        """Add a step's metrics (device tensors: no host sync) unless it was not finite; every --log-every
        steps, average over steps and ranks and write a record. At a sync step, NonFinite after
        --max-nonfinite non-finite steps in a row."""
        self.nonfinite.add(finite)
        self.record(metrics, finite)
        if sync:
            self.nonfinite.check(self.env, self.position.step)

    def record(self, metrics: dict[str, torch.Tensor], finite: Tensor) -> None:
        """Add the step to the running means; every --log-every steps, average and write them (one all_reduce)."""
        for k, v in metrics.items():
            self.running[k] += torch.where(finite, v, 0.0)
        self.running["n"] += finite.float()
        self.bar.update(1)
        step = self.position.step
        if step % self.args.log_every and step != self.total:
            return
        keys = sorted(k for k in self.running if k != "n")       # one all_reduce per log line
        values = torch.stack([torch.as_tensor(self.running[k], dtype=torch.float32, device=self.env.device)
                              for k in keys]) / torch.as_tensor(self.running["n"], device=self.env.device).clamp(min=1)
        if self.env.world > 1:
            dist.all_reduce(values)
            values /= self.env.world
        now = time.time()
        record = dict(zip(keys, values.tolist()), step=step, epoch=self.position.epoch,
                      lr=self.scheduler.get_last_lr()[0],
                      samples_per_s=(step - self.n_last) * self.args.batch_size * self.env.world
                      * self.args.accum_freq / (now - self.t_last),
                      data_errors=dict(self.position.data_errors))
        self.t_last, self.n_last, self.running = now, step, Counter()
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "lr", "samples_per_s")
                              or k.startswith("t/")})
        self.write(record)

    def write(self, record: dict) -> None:
        if self.file:
            line = (json.dumps(record) + "\n").encode()
            try:
                append_whole(self.file, line)
            except OSError as e:
                raise_if_disk_full(e, "--out", self.args.out, "metrics.jsonl", len(line))
                raise

    def close(self) -> None:
        self.bar.close()
        if self.position.data_errors:
            log(self.env, f"[data] skipped samples: {dict(self.position.data_errors)}")
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------
# The third tower's cache: h(x_i) of every sample of a finite dataset, one RowTable file named by its fingerprint
# ----------------------------------------------------------------------------------------------


class RowTable:
    """A float32 table (rows x dim) in one file: a JSON header padded to 4 KiB, the rows, then a sha256 digest of
    every block of BLOCK rows. Rows are written and read by offset (os.pwrite / os.pread), so a process holds only
    the rows it touches, and the OS page cache (one per node, shared by its processes) keeps the hot part. Holds the
    third tower's cache (tower3_cache), which `seal`s it once written and checks it (`damaged`) before reuse:
    a damaged file is recomputed, never read."""

    HEADER = 4096
    BLOCK = 1024          # rows per digest
    DIGEST = 32           # bytes of a sha256 digest

    def __init__(self, path: str, fd: int, rows: int, dim: int):
        self.path, self.fd, self.rows, self.dim = path, fd, rows, dim
        self.blocks = -(-rows // self.BLOCK)

    @classmethod
    def size(cls, rows: int, dim: int) -> int:
        """Bytes of the file: header, rows, one digest per block."""
        return cls.HEADER + rows * dim * 4 + -(-rows // cls.BLOCK) * cls.DIGEST

    @classmethod
    def create(cls, path: str, rows: int, dim: int, **meta: Any) -> None:
        header = json.dumps({"rows": rows, "dim": dim, "block": cls.BLOCK, **meta}).encode()
        with open(path, "wb") as f:
            f.write(header.ljust(cls.HEADER))
            f.truncate(cls.size(rows, dim))                        # sparse until written

    @classmethod
    def open(cls, path: str, rows: int, dim: int, writable: bool = False, **meta: Any) -> RowTable | None:
        """The table at `path`, or None when it is missing, unreadable, or its header or size is not `rows`,
        `dim` and `meta`."""
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError:
            return None
        try:
            header = json.loads(os.pread(fd, cls.HEADER, 0))
        except ValueError:
            header = None
        if header != {"rows": rows, "dim": dim, "block": cls.BLOCK, **meta} or os.fstat(fd).st_size != cls.size(rows, dim):
            os.close(fd)
            return None
        return cls(path, fd, rows, dim)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: Tensor | Sequence[int]) -> Tensor:
        """Rows (B,) -> float32 (B, dim), one read per row."""
        width, index = 4 * self.dim, [int(i) for i in index]
        if index and not 0 <= min(index) <= max(index) < self.rows:
            raise IndexError(f"{self.path}: rows {min(index)}..{max(index)} outside [0, {self.rows})")
        data = bytearray(b"".join(os.pread(self.fd, width, self.HEADER + i * width) for i in index))
        return torch.frombuffer(data, dtype=torch.float32).view(len(index), self.dim) if index \
            else torch.empty(0, self.dim)

    def write(self, start: int, rows: Tensor) -> None:
        """Write rows (B, dim) at rows start..start+B-1."""
        os.pwrite(self.fd, rows.float().contiguous().numpy().tobytes(), self.HEADER + start * 4 * self.dim)

    def flush(self) -> None:
        """Flush what this process wrote to the disk (fsync), so that processes on other nodes of a
        shared filesystem read it, and a crash after the rename cannot leave a table with holes."""
        os.fsync(self.fd)

    def _digest(self, block: int) -> bytes:
        width, lo = 4 * self.dim, block * self.BLOCK
        count = min(self.BLOCK, self.rows - lo)
        return hashlib.sha256(os.pread(self.fd, count * width, self.HEADER + lo * width)).digest()

    def _digest_at(self, block: int) -> int:
        return self.HEADER + self.rows * self.dim * 4 + block * self.DIGEST

    def seal(self, rank: int = 0, world: int = 1) -> None:
        """Store the digests of blocks rank, rank + world, ... (every rank its share, once all rows are written)."""
        for block in range(rank, self.blocks, world):
            os.pwrite(self.fd, self._digest(block), self._digest_at(block))

    def damaged(self, rank: int = 0, world: int = 1) -> list[int]:
        """The blocks among rank, rank + world, ... whose rows no longer match their digest (each rank checks
        its share, so together the ranks read the file once)."""
        return [block for block in range(rank, self.blocks, world)
                if os.pread(self.fd, self.DIGEST, self._digest_at(block)) != self._digest(block)]

    def __del__(self) -> None:
        os.close(self.fd)


def uses_tower3_cache(args: argparse.Namespace, env: Env) -> bool:
    """Whether h's embeddings come from the cache (tower3_cache) rather than from h at every step: with
    --cache-tower3 and a finite dataset (tar shards stream). Decided before the dataset is built, so that
    its items carry h's own view only when h runs every step."""
    if args.mode == "clip" or not args.cache_tower3:
        return False
    if data.streamed(args.train_data, args.mode):
        log(env, "[tower3] streaming data: no cache, h runs every step")
        return False
    return True


def tower3_cache(args: argparse.Namespace, env: Env, tower3: FrozenTower, dataset) -> RowTable:
    """h(x_i) of every sample i of a finite dataset whose items carry h's own view ('image_h',
    data.with_tower3_view), computed once and then read by row (LiT Sec. 5.6). The table is a file under
    --cache-dir named by its fingerprint (cache_key); a file whose header does not match, or whose rows no
    longer match the digests stored when it was built (a damaged file; each rank checks its share of the
    blocks), is recomputed, never used. Training reads the rows of its batch: memory O(batch) per rank;
    the OS page cache holds what is read often.

    Stale files: a file of another tower, view or data is not deleted by a run (another run may still use
    it); it is just never opened again. Remove h-*.bin files (or the whole --cache-dir) to reclaim the
    space: a run reading one keeps its open file. A recomputed file replaces the old one by a rename, and
    the temporary files of builds on this host whose process died are removed by the next build."""
    key = cache_key(args, tower3, dataset)
    path = os.path.join(args.cache_dir, f"h-{key['fingerprint']}.bin")
    table = RowTable.open(path, **key)
    damaged = table.damaged(env.rank, env.world) if table is not None else []
    if every_rank(env, table is not None and not damaged):
        log(env, f"[tower3] reusing cached embeddings {path}")
        return table
    if damaged:
        log(env, f"[tower3] cache {path}: rows of block(s) {damaged[:5]} (of {RowTable.BLOCK} rows each) do not match "
                 f"the checksum stored when it was built, a damaged file: recomputing")
    elif os.path.exists(path):
        log(env, f"[tower3] cache {path} is stale: recomputing")
    del table
    try:
        return build_cache(args, env, tower3, dataset, path, key)
    except OSError as e:
        raise_if_disk_full(e, "--cache-dir", args.cache_dir, f"the third tower's cache {os.path.basename(path)}",
                           RowTable.size(key["rows"], key["dim"]))
        raise


def cache_key(args: argparse.Namespace, tower3: FrozenTower, dataset) -> dict[str, Any]:
    """The cache's RowTable header: rows, D_h and a fingerprint (checkpoints.checksum, the checkpoints' own) of
    everything h's rows depend on -- the tower's weights and view (FrozenTower.digest), and the data (for files: every
    image's size and modification time, the dataset's `stamp`)."""
    fingerprint = checksum([tower3_digest(tower3), args.train_data, len(dataset), args.seed, args.image_size,
                            getattr(dataset, "stamp", None)])[:16]
    return dict(rows=len(dataset), dim=tower3.dim, fingerprint=fingerprint)


def build_cache(args: argparse.Namespace, env: Env, tower3: FrozenTower, dataset, path: str,
                key: dict) -> RowTable:
    """Compute the table at `path` and return it, open. Rank r of W computes only rows [r N/W, (r+1)
    N/W) into a temporary file that every rank writes and flushes to disk, each rank seals
    (checksums) its share of the blocks, and rank 0 renames the file into place once each rank sees
    the others' rows -- so --cache-dir must be on a filesystem that all nodes share. Every rank
    keeps the descriptor it wrote through, which the rename carries along, rather than opening the
    path again (on a shared filesystem another node's view of a fresh name may lag). A failed build
    leaves no file behind."""
    token = [f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"]     # rank 0's: every rank names one file
    if env.world > 1:
        dist.broadcast_object_list(token, src=0)
    tmp = f"{path}.{token[0]}.tmp"
    try:
        if env.master:
            os.makedirs(args.cache_dir, exist_ok=True)
            remove_dead_builds(args.cache_dir)
            RowTable.create(tmp, **key)
        env.barrier()
        table = RowTable.open(tmp, writable=True, **key)     # None where rank 0's file is not visible
        if not every_rank(env, table is not None):
            raise SystemExit(f"--cache-dir {args.cache_dir}: not every rank could open {tmp}, "
                             f"which rank 0 created; use a folder on a filesystem that every node "
                             f"shares, or --no-cache-tower3")
        with env.phase("building the h cache") as meet:     # shares may take unequal times
            first = cache_share(args, env, tower3, dataset, table)
            table.flush()
            meet()
            check_rows_seen(args, env, table, first, tmp)
            table.seal(env.rank, env.world)         # balanced: each digests 1/W of the blocks
            table.flush()
            env.barrier()
            if env.master:
                os.replace(tmp, path)
            env.barrier()
        table.path = path
        return table
    finally:
        if env.master and os.path.exists(tmp):
            os.remove(tmp)


def check_rows_seen(args: argparse.Namespace, env: Env, table: RowTable,
                    first: tuple[int, Tensor] | None, tmp: str) -> None:
    """SystemExit on every rank unless every rank sees every rank's rows: each compares the first
    row of every share (`first`, gathered) in its own view of the file."""
    firsts = [first]
    if env.world > 1:
        firsts = [None] * env.world
        dist.all_gather_object(firsts, first)
    seen = all(torch.equal(table[[i]][0], row) for i, row in filter(None, firsts))
    if not every_rank(env, seen):
        raise SystemExit(f"--cache-dir {args.cache_dir}: the ranks do not see each other's rows of "
                         f"{tmp}; use a folder on a filesystem that every node shares, or "
                         f"--no-cache-tower3")


def cache_share(args: argparse.Namespace, env: Env, tower3: FrozenTower, dataset, table: RowTable
                ) -> tuple[int, torch.Tensor] | None:
    """Compute this rank's share of the rows, [r N/W, (r+1) N/W), into `table`, batch by batch; return
    (index, row) of its first row, or None for an empty share."""
    lo, hi = len(dataset) * env.rank // env.world, len(dataset) * (env.rank + 1) // env.world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), 256,   # in order, no
                                         num_workers=env.workers(args), collate_fn=data.collate)  # index list
    row, first = lo, None
    for batch in tqdm(loader, desc="caching h", disable=not env.master or args.quiet):
        with precision(args.precision, env.device):
            h = tower3(batch["image_h"].to(env.device, non_blocking=True)).float().cpu()
        table.write(row, h)
        first, row = first or (lo, h[0].clone()), row + len(h)
    return first


def remove_dead_builds(folder: str) -> None:
    """Remove the temporary cache files (h-*.bin.HOST-PID-*.tmp) of builds on this host whose process is gone."""
    for stale in glob.glob(os.path.join(glob.escape(folder), "h-*.bin.*.tmp")):
        owner = re.fullmatch(r"h-\w+\.bin\.(.+)-(\d+)-[0-9a-f]{8}\.tmp", os.path.basename(stale))
        if owner and owner[1] == socket.gethostname() and not alive(int(owner[2])):
            with contextlib.suppress(OSError):
                os.remove(stale)


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
