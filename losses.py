"""Contrastive losses of CLIP, LiT and Three Towers (3T), on one process or many.

The whole method lives in three functions, read top to bottom:

1. `contrastive_loss(a, b, t)`: the symmetric softmax (InfoNCE) loss between two batches of
   L2-normalised embeddings (CLIP, Radford et al. 2021; 3T paper Eq. 1):
       logits = t * a @ b.T                    (N x N, float32)
       L(a, b) = ( CE(logits, arange N) + CE(logits.T, arange N) ) / 2
2. `distributed_contrastive_loss(a, b, t)`: the same loss over the *global* batch of all ranks,
   computed from each rank's local shard (memory O(B_local x B_global)).
3. `tower_loss(out, mode)`: the loss of a training mode, built from the pairs in `PAIRS`. For 3T
   (Kossen et al. 2023, Sec. 3, Eq. 2) it is
       L_3T = ( L(f, g) + L(f_h, h_f) + L(g_h, h_g) ) / 3
   f, g: the image and text towers trained from scratch; h: the frozen pretrained tower;
   f_h, g_h: linear heads on f and g; h_f, h_g: linear heads on h, one per pairing
   (see model.py and ../shared/DESIGN.md for which head sits where).

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
# 1. Single process
# ----------------------------------------------------------------------------------------------
def _logits(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """t * a @ b.T in float32, even inside a bf16 autocast region (softmax over thousands of
    logits in bf16 loses the small differences contrastive learning lives on)."""
    dtype = torch.promote_types(a.dtype, torch.float32)     # float64 stays float64 (tests)
    with torch.autocast(a.device.type, enabled=False):
        return logit_scale.to(dtype) * (a.to(dtype) @ b.to(dtype).T)


def contrastive_loss(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric softmax contrastive loss of L2-normalised a, b (N x D); pair i is (a_i, b_i).

    The temperature multiplies the logit matrix once; the b->a direction reads the transpose
    (a new view, never scaled again).
    """
    logits = _logits(a, b, logit_scale)                          # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss(a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023, Eq. 1) -- an extension, not 3T's loss.

    Every (a_i, b_j) is an independent binary problem: positive iff i == j. Normalised by N,
    the number of rows, as in SigLIP.
    """
    logits = _logits(a, b, logit_scale) + logit_bias
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1   # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


# ----------------------------------------------------------------------------------------------
# 2. Many processes: gather with gradient, local rows against all columns
# ----------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    return _GatherRows.apply(x) if _world()[1] > 1 else x


def _local_rows_loss(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, logit_scale: Tensor,
                     logit_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Loss of this rank's n rows against all N columns, and its a->b top-1 accuracy.

    a, b: (n, D) local shards; a_all, b_all: (N, D) gathered. Local row i's positive sits in
    global column rank * n + i. With softmax: the a->b rows are a @ b_all.T and the b->a rows
    b @ a_all.T -- (n, N) each, never N x N.
    """
    n, offset = a.shape[0], _world()[0] * a.shape[0]
    labels = torch.arange(offset, offset + n, device=a.device)
    if logit_bias is None:
        ab = _logits(a, b_all, logit_scale)                              # (n, N)
        ba = ab.T if a_all is a else _logits(b, a_all, logit_scale)       # one process: reuse
        loss = (F.cross_entropy(ab, labels) + F.cross_entropy(ba, labels)) / 2
    else:  # sigmoid: every pair once, rows = local a against all b
        ab = _logits(a, b_all, logit_scale) + logit_bias
        signs = -torch.ones_like(ab)
        signs[torch.arange(n, device=a.device), labels] = 1
        loss = -F.logsigmoid(signs * ab).sum() / n
    with torch.no_grad():
        accuracy = (ab.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def distributed_contrastive_loss(a_local: Tensor, b_local: Tensor, logit_scale: Tensor) -> Tensor:
    """`contrastive_loss` over the global batch, from this rank's shards (see the module
    docstring for the value and gradient convention). Equals `contrastive_loss` on one process."""
    a_all, b_all = _gather_many([a_local, b_local])
    return _local_rows_loss(a_local, b_local, a_all, b_all, logit_scale, None)[0]


def _gather_many(tensors: list[Tensor]) -> list[Tensor]:
    """Gather several (B_local, D_i) tensors in ONE collective: concatenate along the feature
    dimension (float32), gather, split. One process: returns the inputs themselves."""
    if _world()[1] == 1:
        return tensors
    widths = [t.shape[1] for t in tensors]
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    gathered = gather_rows(torch.cat([t.to(dtype) for t in tensors], dim=1))
    return list(gathered.split(widths, dim=1))


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
    gathered = dict(zip(names, _gather_many([out[name] for name in names])))
    total, metrics = 0.0, {}
    for term, (a, b) in pairs.items():
        loss, acc = _local_rows_loss(out[a], out[b], gathered[a], gathered[b],
                                     out[f"t_{term}"], out.get(f"b_{term}"))
        total = total + weights[term] * loss
        metrics[f"loss/{term}"] = loss.detach()
        metrics[f"acc/{term}"] = acc
        metrics[f"t/{term}"] = out[f"t_{term}"].detach()
    return total, metrics
