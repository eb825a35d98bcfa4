"""The runtime where ranks and files meet, before the GPU path first runs: ranks that drift apart
meet through the store and stop with one line naming the phase (--dist-timeout, Env.phase);
--compile wraps the DDP module and trains like eager; the h cache is used through the descriptor
that built it, flushed to disk, and every rank agrees it opened; a filesystem without locks is said,
not read as 'in use'. Multi-rank cases run 2 gloo processes (conftest.run_ranks), each calling
train.main as torchrun would."""
import argparse
import contextlib
import errno
import fcntl
import functools
import json
import os
import time

import pytest
import torch

import runtime
import train
from conftest import run_ranks
from losses import default_weights
from model import build_image_tower
from runtime import Env, RunError
from test_accumulation import grads, inputs_of, model_of, plain_step
from test_train import free_port

WORLD = 2
LIT = ["--mode", "lit", "--image-arch", "vit-micro", "--image-size", "16", "--text-arch", "micro",
       "--embed-dim", "16", "--batch-size", "8", "--train-samples", "32", "--workers", "0",
       "--tokenizer", "bytes", "--steps", "1", "--warmup", "1", "--eval-data", "none", "--quiet",
       "--dist-timeout", "120"]     # a rank that fails cannot keep the other waiting for long
CLIP = ["--mode", "clip", "--image-arch", "vit-micro", "--image-size", "16", "--text-arch", "micro",
        "--embed-dim", "16", "--batch-size", "8", "--train-samples", "64", "--workers", "0",
        "--tokenizer", "bytes", "--steps", "3", "--warmup", "2", "--eval-data", "none", "--quiet",
        "--dist-timeout", "120"]


def tower3_file(folder: str) -> str:
    """A third tower's file: a vit-micro classifier at 16 px, as --mode supervised writes it."""
    path = os.path.join(folder, "tower3.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        tower = build_image_tower("vit-micro", 16, 4, bias=True)
        torch.save({"classifier": {"arch": "vit-micro", "image_size": 16, "num_classes": 4},
                    "model": tower.state_dict()}, path)
    return path


def lit(folder: str, name: str, *extra: str) -> list[str]:
    return LIT + ["--tower3", tower3_file(folder), "--out", os.path.join(folder, name),
                  "--cache-dir", os.path.join(folder, f"cache-{name}"), *extra]


def outcome(argv: list[str]) -> str | None:
    """None when train.main(argv) finished, else the message it stopped with."""
    try:
        train.main(argv)
    except SystemExit as e:
        return str(e.code)
    return None


@contextlib.contextmanager
def watching_the_cache(patch: pytest.MonkeyPatch):
    """Record every RowTable.open (path, fd or None), every fsync of a cache file, and the table
    that runtime.tower3_cache hands to training (path, fd)."""
    seen = {"opened": [], "fsynced": [], "returned": []}
    real_open, real_fsync, real_cache = runtime.RowTable.open, os.fsync, train.tower3_cache

    def spy_open(cls, path, *args, **kwargs):
        table = real_open(path, *args, **kwargs)
        seen["opened"].append((path, None if table is None else table.fd))
        return table

    def spy_fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("h-"):
            seen["fsynced"].append(fd)
        real_fsync(fd)

    def spy_cache(*args, **kwargs):
        table = real_cache(*args, **kwargs)
        seen["returned"].append((table.path, table.fd))
        return table
    patch.setattr(runtime.RowTable, "open", classmethod(spy_open))
    patch.setattr(os, "fsync", spy_fsync)
    patch.setattr(train, "tower3_cache", spy_cache)
    yield seen


def assert_built_and_used_through_one_descriptor(seen: dict, cache_dir: str) -> None:
    """The one successful open is of the temporary file; training gets that table (same fd), now
    named by the final path; rows and digests were flushed to disk (two fsyncs of that fd)."""
    [(final, fd)] = seen["returned"]
    [(tmp, built_fd)] = [(p, f) for p, f in seen["opened"] if f is not None]   # one open, the tmp
    assert fd == built_fd and tmp.startswith(final + ".") and os.path.exists(final)
    assert seen["fsynced"].count(fd) >= 2
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# 2 gloo ranks: the cache through one descriptor; a rank that could not open it; a slow rank
# ----------------------------------------------------------------------------------------------
def join(rank: int, port: int) -> None:
    """torchrun's environment for rank `rank` of WORLD on this host; train.main's Env joins the
    group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def cache_worker(rank: int, tmp: str) -> None:
    ports, res = json.load(open(os.path.join(tmp, "ports.json"))), {}
    # 1. a build on both ranks: trained through the descriptor that built it, flushed
    join(rank, ports[0])
    with pytest.MonkeyPatch.context() as patch, watching_the_cache(patch) as seen:
        res["built"] = outcome(lit(tmp, "built"))
    res["seen"] = seen
    # 2. rank 1 cannot open rank 0's temporary file: both stop before computing any row
    join(rank, ports[1])
    with pytest.MonkeyPatch.context() as patch:
        shares = []
        if rank == 1:
            real = runtime.RowTable.open
            patch.setattr(runtime.RowTable, "open", classmethod(
                lambda cls, path, *a, **k: None if path.endswith(".tmp") else real(path, *a, **k)))
        patch.setattr(runtime, "cache_share", lambda *a, **k: shares.append(1))
        res["unopened"], res["shares"] = outcome(lit(tmp, "unopened")), len(shares)
    # 3. rank 1 computes its share for longer than --dist-timeout: one line each, naming the phase
    join(rank, ports[2])
    with pytest.MonkeyPatch.context() as patch:
        if rank == 0:    # rank 0's store serves on after its run, as torchrun's agent store does
            stores, real_store = [], torch.distributed.distributed_c10d._get_default_store
            patch.setattr(torch.distributed.distributed_c10d, "_get_default_store",
                          lambda: stores.append(real_store()) or stores[-1])
        else:
            real_share = runtime.cache_share
            patch.setattr(runtime, "cache_share",
                          lambda *a, **k: time.sleep(6) or real_share(*a, **k))
        res["slow"] = outcome(lit(tmp, "slow", "--dist-timeout", "4"))
        done = os.path.join(tmp, "rank1-done")
        if rank == 1:
            open(done, "w").close()
        for _ in range(600):
            if os.path.exists(done):
                break
            time.sleep(0.1)
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def cache_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cache_ranks"))
    tower3_file(tmp)
    json.dump([free_port() for _ in range(3)], open(os.path.join(tmp, "ports.json"), "w"))
    return tmp, run_ranks(cache_worker, tmp, WORLD)


def test_two_ranks_train_on_the_cache_through_the_descriptor_that_built_it(cache_ranks):
    tmp, ranks = cache_ranks
    for r in ranks:
        assert r["built"] is None
        assert_built_and_used_through_one_descriptor(r["seen"], os.path.join(tmp, "cache-built"))


def test_a_rank_that_cannot_open_the_cache_stops_every_rank_before_any_row(cache_ranks):
    _, ranks = cache_ranks
    for r in ranks:
        assert r["shares"] == 0
        assert "\n" not in r["unopened"]
        assert r["unopened"].startswith("--cache-dir ")
        assert "not every rank could open" in r["unopened"] and "cache-unopened" in r["unopened"]


def test_a_rank_slower_than_dist_timeout_in_the_cache_build_stops_both_with_one_line(cache_ranks):
    _, ranks = cache_ranks
    phase = "'building the h cache'"
    waited = f"rank 0: timed out after 4 s waiting for rank 1 in {phase} (--dist-timeout)"
    assert ranks[0]["slow"] == f"train.py: error: {waited}"
    assert ranks[1]["slow"] == (f"train.py: error: rank 1: stopping in {phase} with the others; "
                                f"{waited}")


def test_one_process_trains_on_the_cache_through_the_descriptor_that_built_it(tmp_path,
                                                                              monkeypatch):
    with watching_the_cache(monkeypatch) as seen:
        assert outcome(lit(str(tmp_path), "single")) is None
    assert_built_and_used_through_one_descriptor(seen, str(tmp_path / "cache-single"))


# ----------------------------------------------------------------------------------------------
# --dist-timeout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,message", [
    ("0", "--dist-timeout 0: expected a value in (0, inf)"),
    ("-5", "--dist-timeout -5: expected a value in (0, inf)"),
    ("inf", "--dist-timeout inf: expected a value in (0, inf)"),
    ("nan", "--dist-timeout nan: expected a value in (0, inf)"),
    ("soon", "argument --dist-timeout: invalid float value: 'soon'")])
def test_bad_dist_timeouts_are_one_line_errors(value, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--dist-timeout", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message)


def test_dist_timeout_may_change_on_resume():
    was, now = train.parse_args([]), train.parse_args(["--dist-timeout", "60"])
    assert was.dist_timeout == runtime.DIST_TIMEOUT and now.dist_timeout == 60
    changed = runtime.changed_settings({"args": vars(was)}, now, "ckpt.pt")
    assert changed == ["--dist-timeout 1800.0 -> 60.0"]


# ----------------------------------------------------------------------------------------------
# --compile after DDP; the no-grad pass of --accum-freq on the raw model
# ----------------------------------------------------------------------------------------------
def compile_worker(rank: int, tmp: str) -> None:
    from torch._dynamo.backends.distributed import DDPOptimizer
    ports, res, wrapped, splits = json.load(open(os.path.join(tmp, "ports.json"))), {}, [], []
    with pytest.MonkeyPatch.context() as patch:
        # aot_eager: dynamo's graphs, DDPOptimizer's split and AOT autograd's backward as inductor
        # has them, without generating and compiling C++, which is far slower on a small CPU runner
        patch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        real_wrap, real_split = runtime.wrap, DDPOptimizer.compile_fn
        patch.setattr(train, "wrap", lambda *a: wrapped.append(real_wrap(*a)) or wrapped[-1])
        patch.setattr(DDPOptimizer, "compile_fn", lambda *a: splits.append(1) or real_split(*a))
        for port, name, extra in zip(ports, ("eager", "compiled"), ([], ["--compile"])):
            join(rank, port)                # a fresh store per run: none of the last run's keys
            res[name] = outcome(CLIP + ["--out", os.path.join(tmp, name), *extra])
    compiled = wrapped[-1]
    res["layers"] = [type(compiled).__name__, type(getattr(compiled, "_orig_mod", None)).__name__]
    res["splits"] = len(splits)
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))


def test_compile_wraps_ddp_and_trains_like_eager_on_two_ranks(tmp_path):
    json.dump([free_port(), free_port()], open(tmp_path / "ports.json", "w"))
    ranks = run_ranks(compile_worker, str(tmp_path), WORLD)
    assert all(r["eager"] is None and r["compiled"] is None for r in ranks)
    assert ranks[0]["layers"] == ["OptimizedModule", "DistributedDataParallel"]  # compile(DDP(m))
    assert ranks[0]["splits"] > 0                       # dynamo compiled it as a DDP module's graph
    eager, compiled = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]
                       for name in ("eager", "compiled"))
    assert compiled.keys() == eager.keys()
    assert not [k for k in compiled if "_orig_mod." in k or k.startswith("module.")]
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{k}: {m}")


class NoGradCounter(torch.nn.Module):
    """What the step calls, counting the calls made without grad."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.no_grad_calls = model, 0

    def forward(self, *x):
        self.no_grad_calls += not torch.is_grad_enabled()
        return self.inner(*x)


def test_accumulation_embeds_without_grad_through_the_raw_model():
    """parts.forward may be compiled and/or DDP; the no-grad pass must use parts.model, the raw
    model, and the gradient is still that of the whole batch."""
    model, reference = model_of("3t"), model_of("3t")
    x = inputs_of("3t", 6)
    forward = NoGradCounter(model)
    parts = train.Parts(model, forward, None, None, None, default_weights("3t"))
    args = argparse.Namespace(mode="3t", precision="fp32")
    train.accumulated_backward(args, Env(), parts, [tuple(t[i:i + 3] for t in x) for i in (0, 3)])
    plain_step(reference, "3t", x)
    assert forward.no_grad_calls == 0
    got, want = grads(model), grads(reference)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Locks on filesystems that cannot lock
# ----------------------------------------------------------------------------------------------
def flock_failing_with(error: OSError):
    def flock(*_):
        raise error
    return flock


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_a_filesystem_without_locks_is_said_not_read_as_in_use(tmp_path, monkeypatch, code):
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(OSError(code, os.strerror(code))))
    env = Env()
    assert env.lock(str(tmp_path)) == (
        f"--out {str(tmp_path)!r}: the filesystem does not support file locks (flock: "
        f"[Errno {code}] {os.strerror(code)}); mount it with -o flock or use another --out")
    with pytest.raises(RunError, match=rf"^--cache-dir '.*{tmp_path.name}': the filesystem does "
                                       rf"not support file locks \(flock: \[Errno {code}\].*use "
                                       rf"another --cache-dir$"):
        with runtime.exclusive(str(tmp_path / "tower.pt.lock"), env, "busy"):
            pass
    with pytest.raises(SystemExit, match=r"^--out .*: the filesystem does not support file locks"):
        train.main(["--mode", "clip", "--steps", "1", "--out", str(tmp_path / "run")])


def test_a_lock_held_elsewhere_is_still_in_use(tmp_path, monkeypatch):
    busy = BlockingIOError(errno.EWOULDBLOCK, "busy")
    monkeypatch.setattr(fcntl, "flock", flock_failing_with(busy))
    assert "is in use by another run" in Env().lock(str(tmp_path))
