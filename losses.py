"""Contrastive losses of CLIP, LiT and Three Towers (3T), on one process or many.

The whole method lives in two functions, read top to bottom:

1. `contrastive_loss(a, b, t)`: the symmetric softmax (InfoNCE) loss between two batches of
   L2-normalised embeddings (CLIP, Radford et al. 2021; 3T paper Eq. 1):
       logits = t * a @ b.T                    (N x N, float32)
       L(a, b) = ( CE(logits, arange N) + CE(logits.T, arange N) ) / 2
   It is also the distributed loss: under torchrun each rank computes the rows of its own
   samples against the columns of the global batch (memory O(B_local x B_global)); on one
   process those rows are the whole N x N matrix above.
2. `tower_loss(out, mode)`: the loss of a training mode, built from the pairs in `PAIRS`. For 3T
   (Kossen et al. 2023, Sec. 3, Eq. 2) it is
       L_3T = ( L(f, g) + L(f_h, h_f) + L(g_h, h_g) ) / 3
   f, g: the image and text towers trained from scratch; h: the frozen pretrained tower;
   f_h, g_h: linear heads on f and g; h_f, h_g: linear heads on h, one per pairing
   (see model.py and the README's "Where this project chooses" for which head sits where).

`--loss sigmoid` swaps the softmax for the pairwise sigmoid loss of SigLIP (Zhai et al. 2023).
That is an extension of this project, not part of the 3T paper.

Distributed convention (tested in tests/test_losses_dist.py): every rank returns the loss of its
own rows, `L_r`; the mean of `L_r` over ranks is the global-batch loss. The gather's backward
*sums* every rank's gradient into the shard it came from, so a shard's gradient is
`world_size x` its slice of the global-batch gradient, and DDP's default gradient averaging
(divide by world_size) then gives exactly the single-process gradient of the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# Which embeddings each mode compares; names are the keys of ThreeTowers.forward's output.
# The term name ("fg", "fh", ...) also names the temperature t_<term> that scales it.
PAIRS: dict[str, dict[str, tuple[str, str]]] = {
    "clip": {"fg": ("f", "g")},                      # from scratch: image f vs text g
    "lit": {"hg": ("h", "g")},                       # LiT: frozen h vs text g mapped into D_h
    "3t": {"fg": ("f", "g"),                         # 3T Eq. 2: the CLIP term ...
           "fh": ("f_h", "h_f"),                     # ... image tower aligned with the third tower
           "gh": ("g_h", "h_g")},                    # ... text tower aligned with the third tower
}


# ----------------------------------------------------------------------------------------------
# 1. Gathering the global batch: one collective, gradient flows back to each rank's shard
# ----------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# scripts/gpu_dist_check.py sets this: the gather below runs even in a 1-rank process group (where
# it is the identity), so one GPU exercises NCCL and the gather's backward. Off, one process skips
# the collective.
GATHER_ON_ONE_RANK = False

# torch >= 2.10 renames all_gather_into_tensor to all_gather_single; requirements allow torch 2.4.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0. Backward: each rank's gradient w.r.t. the gathered tensor is
    summed over ranks (all_reduce SUM) and the rows of the local shard are returned -- the
    gradient of sum_r L_r w.r.t. this shard, with no 1/world_size factor."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = _world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate x (B_local, ...) over ranks -> (B_global, ...); identity on one process.
    All ranks must pass the same B_local (the loaders drop the last incomplete batch)."""
    return _GatherRows.apply(x) if _world()[1] > 1 or GATHER_ON_ONE_RANK else x


def gather_many(tensors: list[Tensor]) -> list[Tensor]:
    """Gather several (B_local, D_i) tensors in ONE collective: concatenate along the feature
    dimension (float32), gather, split. One process: returns the inputs themselves."""
    if _world()[1] == 1 and not GATHER_ON_ONE_RANK:
        return tensors
    widths = [t.shape[1] for t in tensors]
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    gathered = gather_rows(torch.cat([t.to(dtype) for t in tensors], dim=1))
    return list(gathered.split(widths, dim=1))


# ----------------------------------------------------------------------------------------------
# 2. The two losses: this rank's rows against the columns of the global batch
# ----------------------------------------------------------------------------------------------
def _logits(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """t * a @ b.T in float32, even inside a bf16 autocast region (softmax over thousands of
    logits in bf16 loses the small differences contrastive learning lives on)."""
    dtype = torch.promote_types(a.dtype, torch.float32)     # float64 stays float64 (tests)
    with torch.autocast(a.device.type, enabled=False):
        return logit_scale.to(dtype) * (a.to(dtype) @ b.to(dtype).T)


def positive_columns(n: int, device: torch.device) -> Tensor:
    """Global column of each local row's positive: rank r's row i is pair r * n + i of the global
    batch (0..n-1 on one process)."""
    offset = _world()[0] * n
    return torch.arange(offset, offset + n, device=device)


def contrastive_loss(a: Tensor, b: Tensor, logit_scale: Tensor,
                     a_all: Tensor | None = None, b_all: Tensor | None = None) -> Tensor:
    """Symmetric softmax contrastive loss; pair i is (a_i, b_i), embeddings L2-normalised.

    a, b: (n, D), this rank's rows; a_all, b_all: (N, D), the global batch of all ranks (gathered
    here when not given; on one process they are a and b, and N = n). The a->b rows are
    t * a @ b_all.T and the b->a rows t * b @ a_all.T -- (n, N) each, never N x N -- and each
    row's label is the global column of its positive. The temperature multiplies each logit
    once. On one process this is exactly ( CE(t a b^T, I) + CE(t b a^T, I) ) / 2.
    """
    if a_all is None or b_all is None:
        a_all, b_all = gather_many([a, b])
    labels = positive_columns(a.shape[0], a.device)
    a_to_b = _logits(a, b_all, logit_scale)                          # (n, N)
    b_to_a = _logits(b, a_all, logit_scale)                          # (n, N)
    return (F.cross_entropy(a_to_b, labels) + F.cross_entropy(b_to_a, labels)) / 2


def sigmoid_loss(a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                 b_all: Tensor | None = None) -> Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, Eq. 1) -- an extension, not 3T's loss.

    Every (a_i, b_j) is an independent binary problem: positive iff i == j. This rank's rows of a
    against all N columns b_all (every pair is counted once over the ranks), normalised by the
    number of rows, as in SigLIP.
    """
    b_all = gather_rows(b) if b_all is None else b_all
    logits = _logits(a, b_all, logit_scale) + logit_bias                 # (n, N)
    signs = -torch.ones_like(logits)                                    # -1 off the positives
    signs[torch.arange(a.shape[0], device=a.device), positive_columns(a.shape[0], a.device)] = 1
    return -F.logsigmoid(signs * logits).sum() / a.shape[0]


# ----------------------------------------------------------------------------------------------
# 3. The loss of each mode
# ----------------------------------------------------------------------------------------------
def default_weights(mode: str) -> dict[str, float]:
    """Equal weights summing to one: 3T's 1/3 each (Eq. 2), 1 for the single-term modes."""
    return {term: 1.0 / len(PAIRS[mode]) for term in PAIRS[mode]}


def tower_loss(out: dict[str, Tensor], mode: str, weights: dict[str, float] | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of `mode` ("clip", "lit", "3t") from ThreeTowers.forward's output.

    out holds L2-normalised embeddings (keys of PAIRS[mode]), temperatures `t_<term>` and, for
    the sigmoid extension, biases `b_<term>`. Works unchanged on one process or under torchrun:
    all of a step's embeddings are gathered in a single collective.

    Returns (total, metrics): total = sum_k w_k L_k; metrics hold loss/<term>, acc/<term>
    (local rows, a->b top-1) and t/<term>, all detached.
    """
    pairs = PAIRS[mode]
    weights = default_weights(mode) if weights is None else weights
    names = sorted({name for pair in pairs.values() for name in pair})
    gathered = dict(zip(names, gather_many([out[name] for name in names])))
    total, metrics = 0.0, {}
    for term, (a, b) in pairs.items():
        if f"b_{term}" in out:
            loss = sigmoid_loss(out[a], out[b], out[f"t_{term}"], out[f"b_{term}"], gathered[b])
        else:
            loss = contrastive_loss(out[a], out[b], out[f"t_{term}"], gathered[a], gathered[b])
        total = total + weights[term] * loss
        metrics[f"loss/{term}"] = loss.detach()
        with torch.no_grad():      # a->b top-1 of this rank's rows
            best = (out[a] @ gathered[b].T).argmax(dim=1)
            hits = best == positive_columns(len(out[a]), out[a].device)
        metrics[f"acc/{term}"] = hits.float().mean()
        metrics[f"t/{term}"] = out[f"t_{term}"].detach()
    return total, metrics
