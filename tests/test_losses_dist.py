"""A real 2-process run (torch.multiprocessing + gloo on CPU): the distributed losses equal the
single-process losses on the concatenated batch, in value and in gradient.

Convention under test (losses.py docstring): rank r returns L_r, the loss of its own rows; the
mean over ranks is the global loss. A shard's gradient is world_size x its slice of the
global-batch gradient, and DDP's averaging divides that back: parameter gradients after DDP
equal the single-process gradients of the global batch.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import losses
from losses import contrastive_loss, gather_rows, tower_loss
from conftest import run_ranks
from test_losses import tiny_batch, tiny_model, unit

WORLD, N_LOCAL = 2, 4


def global_pair():
    return unit(WORLD * N_LOCAL, 6, 20, torch.float64), unit(WORLD * N_LOCAL, 6, 21, torch.float64)


def worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    res = {}

    # 1. contrastive_loss on shards of a global batch
    a, b = global_pair()
    t = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    a_loc, b_loc = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    loss = contrastive_loss(a_loc, b_loc, t)
    loss.backward()
    res["loss"], res["grad_a"], res["grad_b"], res["grad_t"] = loss.detach(), a_loc.grad, b_loc.grad, t.grad

    # 2. the gather's backward is a plain sum over ranks: no 1/world_size, no x world_size
    x = torch.ones(N_LOCAL, 3, requires_grad=True)
    weights = torch.arange(WORLD * N_LOCAL * 3, dtype=torch.float32).view(-1, 3) * (rank + 1)
    (gather_rows(x) * weights).sum().backward()
    res["gather_grad"] = x.grad

    # 3. the full 3T model under DDP, softmax and sigmoid, with one collective per loss call
    calls = []
    real_gather = losses._all_gather

    def counting_gather(*args, **kw):
        calls.append(1)
        return real_gather(*args, **kw)

    for kind in ("softmax", "sigmoid"):
        model = tiny_model("3t", loss=kind).double()
        ddp = DDP(model)
        image, text, h = tiny_batch(WORLD * N_LOCAL, seed=3)
        losses._all_gather = counting_gather
        out = ddp(image[rows].double(), text[rows], h[rows].double())
        total, _ = tower_loss(out, "3t")
        losses._all_gather = real_gather
        total.backward()
        res[f"3t_{kind}_loss"] = total.detach()
        res[f"3t_{kind}_grads"] = {n: p.grad for n, p in model.named_parameters()}
        res[f"3t_{kind}_gathers"] = len(calls)
        calls.clear()
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(worker, str(tmp_path_factory.mktemp("dist")), WORLD)


def test_loss_value_is_global_loss(results):
    a, b = global_pair()
    full = contrastive_loss(a, b, torch.tensor(8.0, dtype=torch.float64))
    mean = sum(r["loss"] for r in results) / WORLD
    assert mean.item() == pytest.approx(full.item(), rel=1e-10)
    # each rank's own value differs: it is the loss of its rows only
    assert results[0]["loss"].item() != pytest.approx(results[1]["loss"].item(), rel=1e-6)


def test_shard_gradients_are_world_size_times_global_slice(results):
    a, b = global_pair()
    a.requires_grad_(), b.requires_grad_()
    t = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    contrastive_loss(a, b, t).backward()
    for rank, r in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(r["grad_a"] / WORLD, a.grad[rows], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r["grad_b"] / WORLD, b.grad[rows], rtol=1e-9, atol=1e-12)
    # a replicated parameter (the temperature): DDP's average of the rank gradients
    torch.testing.assert_close(sum(r["grad_t"] for r in results) / WORLD, t.grad, rtol=1e-9, atol=1e-12)


def test_gather_backward_sums_over_ranks(results):
    for rank, r in enumerate(results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        base = torch.arange(WORLD * N_LOCAL * 3, dtype=torch.float32).view(-1, 3)[rows]
        expected = base * sum(k + 1 for k in range(WORLD))       # rank weights 1 and 2 -> 3x
        torch.testing.assert_close(r["gather_grad"], expected)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_3t_under_ddp_equals_single_process(results, kind):
    model = tiny_model("3t", loss=kind).double()
    image, text, h = tiny_batch(WORLD * N_LOCAL, seed=3)
    total, _ = tower_loss(model(image.double(), text, h.double()), "3t")
    total.backward()
    mean = sum(r[f"3t_{kind}_loss"] for r in results) / WORLD
    assert mean.item() == pytest.approx(total.item(), rel=1e-9)
    for name, p in model.named_parameters():
        for r in results:   # DDP leaves the same averaged gradient on every rank
            torch.testing.assert_close(r[f"3t_{kind}_grads"][name], p.grad, rtol=1e-7, atol=1e-10,
                                       msg=lambda m: f"{name}: {m}")
    assert all(r[f"3t_{kind}_gathers"] == 1 for r in results)
