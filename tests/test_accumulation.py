"""Gradient accumulation that keeps the contrastive batch whole (train.accumulated_backward, --accum-freq)
and activation checkpointing (model.Blocks, --grad-checkpointing), against the plain step on the whole
batch: loss and every parameter gradient, float64, on one process and on 2 gloo ranks under DDP.

The reference is the one-batch path (tower_loss on the model's output, then backward): K micro-batches
of B must give the loss and gradients of one batch of K x B, which no per-micro-batch loss does (its
negatives are K times fewer -- test_per_micro_batch_losses_differ shows the test can tell)."""
import argparse
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import train
from losses import default_weights, tower_loss
from model import ThreeTowers
from runtime import Env
from conftest import run_ranks
from test_losses import tiny_batch

MODES = ("clip", "lit", "3t")
WORLD, K, B = 2, 2, 3


def model_of(mode: str, loss: str = "softmax", image_arch: str = "vit-micro") -> ThreeTowers:
    torch.manual_seed(0)
    return ThreeTowers(mode, image_arch=image_arch, image_size=16, text_arch="micro", context_length=12,
                       embed_dim=8, tower3_dim=6, loss=loss).double()


def inputs_of(mode: str, n: int, seed: int = 3) -> tuple:
    image, text, h = tiny_batch(n, seed=seed)
    return (None if mode == "lit" else image.double()), text, (None if mode == "clip" else h.double())


def rows(x: tuple, lo: int, hi: int) -> tuple:
    return tuple(None if t is None else t[lo:hi] for t in x)


def plain_step(forward, mode: str, x: tuple) -> torch.Tensor:
    loss, _ = tower_loss(forward(*x), mode, default_weights(mode))
    loss.backward()
    return loss.detach()


def accumulated_step(model, forward, mode: str, x: tuple, k: int) -> torch.Tensor:
    args = argparse.Namespace(mode=mode, precision="fp32")
    parts = train.Parts(model, forward, None, None, None, default_weights(mode))
    n = len(x[1]) // k
    loss, _ = train.accumulated_backward(args, Env(), parts, [rows(x, i * n, (i + 1) * n) for i in range(k)])
    return loss


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss_kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", MODES)
def test_accumulation_equals_one_batch_of_k_times_b(mode, loss_kind):
    x = inputs_of(mode, K * B)
    reference = model_of(mode, loss_kind)
    want_loss, want = plain_step(reference, mode, x), grads(reference)
    model = model_of(mode, loss_kind)
    got_loss = accumulated_step(model, model, mode, x, K)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert_same(grads(model), want)


def test_per_micro_batch_losses_differ():
    """Accumulating each micro-batch's own loss (fewer negatives) is measurably another gradient."""
    x = inputs_of("3t", K * B)
    reference = model_of("3t")
    plain_step(reference, "3t", x)
    split = model_of("3t")
    for i in range(K):
        loss, _ = tower_loss(split(*rows(x, i * B, (i + 1) * B)), "3t")
        (loss / K).backward()
    diff = max((split.text.proj.weight.grad - reference.text.proj.weight.grad).abs().max().item(), 0.0)
    assert diff > 1e-4


def test_accumulation_keeps_batchnorm_statistics_of_one_pass():
    """With a BatchNorm tower, the no-grad pass leaves the running statistics alone: they move once per
    micro-batch, as K plain forward passes of B would move them."""
    x = inputs_of("clip", K * B)
    model = model_of("clip", image_arch="cnn-micro")
    accumulated_step(model, model, "clip", x, K)
    plain = model_of("clip", image_arch="cnn-micro")
    for i in range(K):
        plain(*rows(x, i * B, (i + 1) * B))
    for (name, got), want in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_grad_checkpointing_gives_the_same_gradients_and_recomputes(mode):
    x = inputs_of(mode, K * B)
    reference = model_of(mode)
    plain_step(reference, mode, x)
    model = model_of(mode)
    switched = model.set_grad_checkpointing(True)
    assert switched == (["text.blocks"] if mode == "lit" else ["image.blocks", "text.blocks"])
    calls = []
    for name in switched:
        for block in model.get_submodule(name):
            block.register_forward_pre_hook(lambda *_: calls.append(1))   # recomputes may stop early
    plain_step(model, mode, x)
    blocks = sum(len(model.get_submodule(name)) for name in switched)
    assert len(calls) == 2 * blocks                 # each block ran again in backward
    assert_same(grads(model), grads(reference))
    with torch.no_grad():                            # evaluation: nothing to recompute
        calls.clear()
        model(*x)
    assert len(calls) == blocks


# ----------------------------------------------------------------------------------------------
# 2 gloo ranks under DDP: K micro-batches of B per rank == one process on the global batch of W K B
# ----------------------------------------------------------------------------------------------
def worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    res = {}
    for mode in MODES:
        x = rows(inputs_of(mode, WORLD * K * B), rank * K * B, (rank + 1) * K * B)
        model = model_of(mode)
        res[f"{mode}_loss"] = accumulated_step(model, DDP(model), mode, x, K)
        res[f"{mode}_grads"] = grads(model)
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(worker, str(tmp_path_factory.mktemp("accum")), WORLD)


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_on_two_ranks_equals_one_process_on_the_global_batch(ranks, mode):
    reference = model_of(mode)
    want_loss = plain_step(reference, mode, inputs_of(mode, WORLD * K * B))
    # losses.py's convention: the mean of the ranks' losses is the global-batch loss
    assert (sum(r[f"{mode}_loss"] for r in ranks) / WORLD).item() == pytest.approx(want_loss.item(), rel=1e-10)
    for r in ranks:                                  # DDP leaves the same averaged gradient on every rank
        assert_same(r[f"{mode}_grads"], grads(reference))
