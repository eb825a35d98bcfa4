"""scripts/bench.py's FLOP count, the numerator of its MFU: the CPU attention kernel, which
torch.utils.flop_counter does not know, must be counted with the same formula as the CUDA kernels
(2 matmuls of 2*B*H*L*L*d FLOPs forward, twice that backward: model FLOPs, without the scores
that a flash kernel recomputes) -- no more, no less."""
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "scripts", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cpu_attention_flops_match_the_cuda_formula():
    bench = load_bench()
    B, H, L, d = 2, 3, 7, 8
    q, k, v = (torch.randn(B, H, L, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=bench.FLOP_FORMULAS) as fwd:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with FlopCounterMode(display=False, custom_mapping=bench.FLOP_FORMULAS) as bwd:
        y.sum().backward()
    ops = {str(op) for counter in (fwd, bwd) for op in counter.get_flop_counts()["Global"]}
    assert any("flash_attention_for_cpu" in op for op in ops), ops      # the CPU kernel did run
    assert fwd.get_total_flops() == 2 * (2 * B * H * L * L * d)          # q k^T and p v
    assert bwd.get_total_flops() == 4 * (2 * B * H * L * L * d)          # dv, dp, dq, dk; no recompute
    with FlopCounterMode(display=False) as plain:                        # without the formulas: 0
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert plain.get_total_flops() == 0
