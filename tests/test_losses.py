"""The single-process losses against naive float64 references written with explicit loops."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import PAIRS, contrastive_loss, sigmoid_loss, tower_loss
from model import ThreeTowers


def unit(n: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def naive_direction(a, b, t) -> float:
    """-1/N sum_i log softmax_j(t <a_i, b_j>)[i], one Python loop per row and column."""
    n, total = len(a), 0.0
    for i in range(n):
        sims = [t * sum(float(x) * float(y) for x, y in zip(a[i], b[j])) for j in range(n)]
        top = max(sims)
        log_z = top + math.log(sum(math.exp(s - top) for s in sims))
        total += log_z - sims[i]
    return total / n


def naive_contrastive(a, b, t) -> float:
    return (naive_direction(a, b, t) + naive_direction(b, a, t)) / 2


def naive_sigmoid(a, b, t, bias) -> float:
    n, total = len(a), 0.0
    for i in range(n):
        for j in range(n):
            z = t * sum(float(x) * float(y) for x, y in zip(a[i], b[j])) + bias
            label = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-label * z))   # -log sigmoid(label * z)
    return total / n


@pytest.mark.parametrize("t", [1.0, 10.0, 37.5])
def test_contrastive_matches_naive_reference(t):
    a, b = unit(7, 5, 0), unit(7, 5, 1)
    got = contrastive_loss(a, b, torch.tensor(t, dtype=torch.float64))
    assert got.item() == pytest.approx(naive_contrastive(a, b, t), rel=1e-5)


def test_each_direction_scaled_exactly_once():
    """Pin both directions separately: a b->a direction that saw t twice (a transposed view
    scaled in place) or not at all would leave its half of the loss wrong."""
    a, b, t = unit(6, 4, 2), unit(6, 4, 3), 7.0
    loss = contrastive_loss(a, b, torch.tensor(t, dtype=torch.float64)).item()
    a_to_b = naive_direction(a, b, t)
    b_to_a = 2 * loss - a_to_b
    assert b_to_a == pytest.approx(naive_direction(b, a, t), rel=1e-5)
    assert b_to_a != pytest.approx(naive_direction(b, a, t * t), rel=1e-3)
    assert b_to_a != pytest.approx(naive_direction(b, a, 1.0), rel=1e-3)


def test_symmetric_in_its_arguments():
    a, b = unit(16, 8, 4), unit(16, 8, 5)
    t = torch.tensor(5.0, dtype=torch.float64)
    assert torch.allclose(contrastive_loss(a, b, t), contrastive_loss(b, a, t))


def test_random_embeddings_give_log_n():
    # Random unit vectors in 1024-d have cosines ~ N(0, 1/1024): at t = 1 every row is a
    # near-uniform softmax over N columns.
    n = 512
    loss = contrastive_loss(unit(n, 1024, 6), unit(n, 1024, 7), torch.tensor(1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(n), abs=0.01)


def test_aligned_embeddings_give_zero_at_high_temperature():
    a = torch.eye(32, dtype=torch.float64)              # orthonormal rows: cos = 1 or 0
    assert contrastive_loss(a, a.clone(), torch.tensor(100.0, dtype=torch.float64)).item() < 1e-30 + 1e-40
    assert contrastive_loss(a, a.flip(0), torch.tensor(100.0, dtype=torch.float64)).item() > 50


def test_gradcheck_float64():
    a = unit(5, 3, 8).requires_grad_()
    b = unit(5, 3, 9).requires_grad_()
    t = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(contrastive_loss, (a, b, t))
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sigmoid_loss, (a, b, t, bias))


def test_float32_logits_under_autocast():
    a, b = unit(8, 4, 10, torch.float32), unit(8, 4, 11, torch.float32)
    t = torch.tensor(10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(a.bfloat16(), b.bfloat16(), t)
    assert got.dtype == torch.float32
    ref = contrastive_loss(a.bfloat16().float(), b.bfloat16().float(), t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_sigmoid_matches_naive_reference():
    a, b = unit(6, 4, 12), unit(6, 4, 13)
    got = sigmoid_loss(a, b, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    assert got.item() == pytest.approx(naive_sigmoid(a, b, 10.0, -10.0), rel=1e-6)


def test_rows_of_each_rank_average_to_the_global_loss(monkeypatch):
    """The distributed form, without processes: rank r's rows against given global columns, with
    its positives at columns r * n + i. The mean over ranks is the one-process N x N loss."""
    a, b, t = unit(8, 4, 14), unit(8, 4, 15), torch.tensor(3.0, dtype=torch.float64)
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(losses, "_world", lambda rank=rank: (rank, 2))
        rows = slice(4 * rank, 4 * rank + 4)
        per_rank.append(contrastive_loss(a[rows], b[rows], t, a, b).item())
    monkeypatch.undo()
    assert sum(per_rank) / 2 == pytest.approx(naive_contrastive(a, b, 3.0), rel=1e-12)
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-6)


def tiny_model(mode: str, **kw) -> ThreeTowers:
    torch.manual_seed(0)
    return ThreeTowers(mode, image_arch="vit-micro", image_size=16, text_arch="micro",
                       context_length=12, embed_dim=8, tower3_dim=6, **kw)


def tiny_batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, 16, 16, generator=g)
    text = torch.randint(0, 256, (n, 12), generator=g)
    text[:, -1] = 257                                   # EOS
    h = torch.randn(n, 6, generator=g)
    return image, text, h


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_3t_loss_is_weighted_sum_of_its_terms(loss):
    model = tiny_model("3t", loss=loss)
    out = model(*tiny_batch())
    single = contrastive_loss if loss == "softmax" else sigmoid_loss
    terms = {}
    for term, (a, b) in PAIRS["3t"].items():
        extra = (out[f"b_{term}"],) if loss == "sigmoid" else ()
        terms[term] = single(out[a], out[b], out[f"t_{term}"], *extra)
    total, metrics = tower_loss(out, "3t")
    assert total.item() == pytest.approx(sum(terms.values()).item() / 3, rel=1e-6)
    weights = {"fg": 0.5, "fh": 0.2, "gh": 0.3}
    total_w, _ = tower_loss(out, "3t", weights)
    assert total_w.item() == pytest.approx(sum(weights[k] * v for k, v in terms.items()).item(), rel=1e-6)
    for term in terms:
        assert metrics[f"loss/{term}"].item() == pytest.approx(terms[term].item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["clip", "lit"])
def test_two_tower_modes_use_one_term(mode):
    model = tiny_model(mode)
    out = model(*tiny_batch())
    a, b = PAIRS[mode][next(iter(PAIRS[mode]))]
    total, metrics = tower_loss(out, mode)
    term = next(iter(PAIRS[mode]))
    assert total.item() == pytest.approx(contrastive_loss(out[a], out[b], out[f"t_{term}"]).item(), rel=1e-6)
    assert set(metrics) == {f"loss/{term}", f"acc/{term}", f"t/{term}"}
