"""The distributed path on one device, for scripts/gpu_check.sh. With one process, losses.gather_rows is the
identity and train.py runs no DDP, so a one-GPU check would never touch NCCL, DDP or the gather's backward.
Here a 1-rank process group (NCCL on CUDA, gloo on the CPU) runs them: the model in DDP, the loss through the
autograd gather (losses.GATHER_ON_ONE_RANK), each step train.train_step itself. Two checks, PASS or FAIL:

1. parity: one step through DDP and the gather gives the plain single-process step's loss and gradients,
   from the same weights and batches -- as is, and with --grad-checkpointing --accum-freq 2 (the large
   recipe's switches, DDP's no_sync). In fp32 (TF32 where Env allows it) and without clipping, so that any
   difference beyond the order of float additions is a fault of the distributed path, not bf16 rounding,
   and a wrongly scaled gradient is not normalised away;
2. no host sync: after two warm-up steps (DDP rebuilds its buckets on its second, with a host copy), the
   steps that are not sync steps (runtime.sync_step) run the loop body of train.run under
   torch.cuda.set_sync_debug_mode("error"), which raises at any synchronising CUDA call; in --precision.
   CUDA only. torch.distributed's own waits are outside what the debug mode sees.

    python scripts/gpu_dist_check.py --result dist.json --mode 3t --image-arch vit-tiny ...   # train.py flags

Batches are pinned on CUDA, as the loader hands them over. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import losses  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from model import ThreeTowers  # noqa: E402

TOLERANCE = 1e-4   # parity: per tensor, max |difference| / max |value|, and the loss's relative difference
VARIANTS = {"ddp+gather": {}, "ddp+gather --grad-checkpointing --accum-freq 2": {"grad_checkpointing": True,
                                                                                  "accum_freq": 2}}


def process_group(env: runtime.Env) -> str:
    """A 1-rank group without torchrun's rendezvous (a FileStore in a temporary folder); returns its backend."""
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="gpu_dist_check-"), "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1,
                            device_id=env.device if env.device.type == "cuda" else None)
    return backend


def pinned(batch: dict, env: runtime.Env) -> dict:
    """The batch as the loader hands it to a CUDA run: its tensors in pinned memory (as is on the CPU)."""
    if env.device.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build(args: argparse.Namespace, env: runtime.Env) -> dict:
    """train.run's own pieces -- folders, third tower, data, tokenizer, model configuration, h cache -- and 4 pinned
    batches."""
    runtime.claim_folders(args, env)
    tower3 = train.resolve_tower3(args, env) if args.mode != "clip" else None
    cached = runtime.uses_tower3_cache(args, env)
    dataset = train.pairs_dataset(args, env, None if cached else tower3)
    tokenizer = train.build_tokenizer(args, env, dataset, None)
    h_rows = (runtime.tower3_cache(args, env, tower3, data.with_tower3_view(dataset, tower3.view, f_view=False))
              if cached else None)
    loader = data.make_loader(dataset, args.batch_size, tokenizer=tokenizer, seed=args.seed, rows=h_rows)
    return dict(config=train.model_config(args, tokenizer, tower3), dataset=dataset, tower3=tower3,
                batches=[pinned(b, env) for b in itertools.islice(loader, 4)])


def make_parts(args: argparse.Namespace, env: runtime.Env, built: dict, ddp: bool) -> train.Parts:
    """Model, optimiser and schedule as train.run builds them, from the seed's weights; the step calls the model
    in DDP (as runtime.wrap does under torchrun) or the model itself."""
    torch.manual_seed(args.seed)
    model = ThreeTowers(**built["config"]).to(env.device).train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer, scheduler, _ = train.schedule(args, env, model, built["dataset"])
    forward = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if ddp else model
    weights = (dict(zip(losses.PAIRS[args.mode], args.loss_weights)) if args.loss_weights
               else losses.default_weights(args.mode))
    return train.Parts(model, forward, optimizer, scheduler, built["tower3"], weights)


@contextlib.contextmanager
def counting_gather(calls: dict[str, int]):
    """Count the autograd gather's forward and backward passes while on (and switch its 1-rank path on)."""
    fwd, bwd = losses._GatherRows.forward, losses._GatherRows.backward

    def forward(ctx, x):
        calls["forward"] += 1
        return fwd(ctx, x)

    def backward(ctx, grad):
        calls["backward"] += 1
        return bwd(ctx, grad)
    losses._GatherRows.forward, losses._GatherRows.backward = staticmethod(forward), staticmethod(backward)
    losses.GATHER_ON_ONE_RANK = True
    try:
        yield
    finally:
        losses._GatherRows.forward, losses._GatherRows.backward = staticmethod(fwd), staticmethod(bwd)
        losses.GATHER_ON_ONE_RANK = False


def step_of(args: argparse.Namespace, env: runtime.Env, parts: train.Parts, batches: list[dict]) -> tuple:
    """train.train_step; returns its loss and the gradients it left (as the optimiser used them)."""
    metrics, _ = train.train_step(args, env, parts, batches)
    grads = {n: p.grad.detach().float().clone() for n, p in parts.model.named_parameters() if p.grad is not None}
    return metrics["loss"].item(), grads


def parity(args: argparse.Namespace, env: runtime.Env, built: dict, name: str) -> tuple[dict, train.Parts]:
    """One step of the plain model and one through DDP and the gather, same weights and batches; the row and the
    DDP parts (for the steps after)."""
    exact = argparse.Namespace(**{**vars(args), "precision": "fp32", "grad_clip": 0.0})   # clipping would hide a scale
    batches = built["batches"][:args.accum_freq]
    loss, grads = step_of(exact, env, make_parts(args, env, built, ddp=False), batches)
    parts, calls = make_parts(args, env, built, ddp=True), {"forward": 0, "backward": 0}
    with counting_gather(calls):
        loss_d, grads_d = step_of(exact, env, parts, batches)
    # A tensor's difference against its own largest entry, floored at a millionth of the largest gradient: a
    # gradient that is zero up to rounding (a softmax's shift direction) has no digits to compare.
    floor = 1e-6 * max((g.abs().max().item() for g in grads.values()), default=0.0) + 1e-30
    rel = lambda a, b: (a - b).abs().max().item() / max(b.abs().max().item(), floor)    # noqa: E731
    grad_diff = max((rel(grads_d[k], g) for k, g in grads.items() if k in grads_d), default=float("inf"))
    loss_diff = abs(loss_d - loss) / max(abs(loss), 1e-30)
    ok = grads.keys() == grads_d.keys() and loss_diff <= TOLERANCE and grad_diff <= TOLERANCE \
        and calls["forward"] > 0 and calls["backward"] > 0
    return {"check": "parity", "variant": name, "ok": ok, "loss": loss, "loss_ddp": loss_d, "loss_rel_diff": loss_diff,
            "grad_rel_diff": grad_diff, "grads": len(grads), "grads_ddp": len(grads_d), "gather_calls": calls,
            "tolerance": TOLERANCE}, parts


def sync_free(args: argparse.Namespace, env: runtime.Env, parts: train.Parts, built: dict, name: str,
              count: int) -> dict:
    """Two warm-up steps, then train.run's loop body until `count` steps that are not sync steps have run, on
    CUDA under torch.cuda.set_sync_debug_mode("error"); sync steps run as in training, outside it. On the CPU
    the same steps run (DDP's later iterations) without the debug mode, and the check says it was skipped."""
    cuda, total = env.device.type == "cuda", args.steps or 1000
    row = {"check": "no host sync", "variant": name, "ok": True if cuda else None, "steps": [],
           "error": None if cuda else "skipped: no CUDA"}
    position = runtime.Position(step=1)                 # the parity step was step 0
    metrics_log = runtime.MetricsLog(args, env, total, position, parts.scheduler)
    batches = itertools.cycle(built["batches"])
    losses.GATHER_ON_ONE_RANK = True
    try:
        while len(row["steps"]) < count and position.step < total:
            sync = position.step < 3 or runtime.sync_step(position.step, 0, total, args)
            with contextlib.ExitStack() as stack:
                if not sync:
                    row["steps"].append(position.step)
                    if cuda:
                        torch.cuda.set_sync_debug_mode("error")
                        stack.callback(torch.cuda.set_sync_debug_mode, "default")
                metrics, finite = train.train_step(args, env, parts, [next(batches) for _ in range(args.accum_freq)])
                position.step += 1
                metrics_log.step(metrics, finite, sync)
    except Exception as e:      # noqa: BLE001 - the debug mode's RuntimeError, or DDP's own complaint
        where = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)]
        row["ok"], row["error"] = False, (f"step {position.step}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                                          f" (at {' <- '.join(where[::-1][:6])})")
    finally:
        losses.GATHER_ON_ONE_RANK = False
        metrics_log.close()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", help="write the checks' rows here (JSON)")
    p.add_argument("--sync-free-steps", type=int, default=3, help="steps run under the sync debug mode, per variant")
    own, rest = p.parse_known_args(argv)
    args = train.parse_args(rest + ["--out", tempfile.mkdtemp(prefix="gpu_dist_check-")])
    env = runtime.Env()
    backend = process_group(env)
    try:
        built, rows = build(args, env), []
        for name, changes in VARIANTS.items():
            variant = argparse.Namespace(**{**vars(args), **changes})
            row, parts = parity(variant, env, built, name)
            rows += [row, sync_free(variant, env, parts, built, name, own.sync_free_steps)]
    finally:
        dist.destroy_process_group()
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[r["ok"]]
        calls = r.get("gather_calls", {})
        detail = (f"loss rel diff {r['loss_rel_diff']:.2g}, grads max rel diff {r['grad_rel_diff']:.2g} (tolerance "
                  f"{TOLERANCE:g}), gather fwd/bwd {calls.get('forward')}/{calls.get('backward')}"
                  if r["check"] == "parity" else f"steps {r['steps']}" + (f": {r['error']}" if r["error"] else ""))
        print(f"[dist] {verdict} {r['check']} ({r['variant']}; {backend}): {detail}", flush=True)
    if own.result:
        with open(own.result, "w") as f:
            json.dump({"device": str(env.device), "backend": backend, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
