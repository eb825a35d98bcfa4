"""scripts/bench.py's MFU. Numerator: the CPU attention kernel, which torch.utils.flop_counter
does not know, must be counted with the same formula as the CUDA kernels (2 matmuls of
2*B*H*L*L*d FLOPs forward, twice that backward: model FLOPs, without the scores that a flash
kernel recomputes) -- no more, no less, and with --grad-checkpointing not the recomputed forward. Denominator:
each step against the peak around it. Memory: a case's peak holds no earlier case. The loader and step-input
measurements run on tiny sizes."""
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_script


def test_cpu_attention_flops_match_the_cuda_formula():
    bench = load_script("bench")
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


def test_onednn_linear_flops_are_counted_as_f_linear_s(monkeypatch):
    """runtime.linear's oneDNN matmul, unknown to the flop counter, counts what F.linear's matmuls do:
    2*M*K*N forward, twice that backward (input and weight gradients)."""
    import runtime
    bench = load_script("bench")
    if not runtime.ONEDNN_OP:
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(runtime, "ONEDNN_MIN_MACS", 0)
    x, w = torch.randn(2, 5, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=bench.FLOP_FORMULAS) as counter:
        y = runtime.linear(x, w)
        assert y.grad_fn.name() == "_OneDNNLinearBackward"
        y.sum().backward()
    assert counter.get_total_flops() == 3 * 2 * (10 * 6 * 4)
    with FlopCounterMode(display=False) as plain:                        # without the formulas: the mm only
        runtime.linear(x, w).sum().backward()
    assert plain.get_total_flops() == 2 * (10 * 6 * 4)


def test_each_step_is_paired_with_the_peak_around_it(monkeypatch):
    """MFU of a step = FLOPs / its time / mean(peak just before, peak just after). A fake clock and
    a fake peak that halves halfway (a neighbour starts using the machine) check the pairing: a
    step that also ran at half speed must keep the same MFU, not look twice as bad."""
    bench = load_script("bench")
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    peaks = iter([100.0] * 9 + [50.0] * 8)          # 1 before + 4 modes x 4 rounds after; halves at round 3

    def fake_setup(mode, cache, preset, tower3):
        seconds = {"clip": 1.0, "lit": 0.5, "3t": 0.8 if cache else 1.2}[mode]

        def step(batch):
            slow = 1 if len(consumed) < 8 else 2     # the neighbour also halves the step's speed
            consumed.append(mode)
            clock[0] += seconds * slow
        return step, [None], 60.0 * seconds, {"mode": mode, "cache": cache, "batch": 4}, torch.device("cpu")

    consumed: list[str] = []
    monkeypatch.setattr(bench, "setup_mode", fake_setup)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: next(peaks))
    rows, peak = bench.bench_modes([], "", 4, torch.float32)
    assert [r["mode"] for r in rows] == ["clip", "lit", "3t", "3t"]
    for r in rows:
        # rounds 1-2 at (peak 100, full speed): 60/100 = 0.6; rounds 3-4 at (50, half speed): 0.6,
        # except the first step of round 3, which sits between a 100 and a 50 peak: 60/2/75 = 0.4
        expected = sorted([0.6, 0.6, 0.6, 0.4 if r["mode"] == "clip" else 0.6])
        assert r["mfu_range"] == pytest.approx([min(expected), max(expected)])
        assert r["mfu"] == pytest.approx((expected[1] + expected[2]) / 2)
    assert [r["step_ms"] for r in rows] == pytest.approx([1500, 750, 1200, 1800])   # medians of 1x, 2x
    assert peak == 87.5                        # median over all steps of the peak around them


def test_linears_ab_forces_each_kernel_and_pairs_the_rounds(monkeypatch, tmp_path):
    """bench_linears (what runtime's oneDNN routing buys on this CPU, on train.py's own step): the
    "onednn" case runs its linears through runtime's oneDNN matmul and the "f.linear" case never does,
    whatever this CPU's capability; each mode's speedup is the median of per-round ratios F.linear
    time / oneDNN time, the warm-up round dropped."""
    import runtime
    bench = load_script("bench")
    if not runtime.ONEDNN_OP:
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(runtime, "ONEDNN_MIN_MACS", 0)                    # tiny layers take oneDNN too
    calls = []
    real = runtime.onednn_linear
    monkeypatch.setattr(runtime, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    tower3 = bench.random_tower3(str(tmp_path), "vit-micro", 16)
    preset = TINY_GPU_PRESET + ["--batch-size", "4", "--train-samples", "16", "--cache-dir", str(tmp_path)]
    for linears, used in (("onednn", True), ("f.linear", False), ("wrap", runtime.prefers_onednn(
            torch.backends.cpu.get_cpu_capability()))):
        step, batches, *_ = bench.setup_mode("3t", True, preset, tower3, linears)
        calls.clear()
        step(batches[0])
        assert bool(calls) is used, linears

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    seconds = iter([9, 9, 9, 9] + [1, 2, 1, 3] * 2 + [1, 4, 1, 1])     # warm-up round, then 3 rounds
    cases = []

    def fake_setup(mode, cache, preset, tower3, linears):
        cases.append((mode, cache, linears))

        def step(batch):
            clock[0] += next(seconds)
        return step, [None], 1.0, {"mode": mode, "batch": 4}, torch.device("cpu")

    monkeypatch.setattr(bench, "setup_mode", fake_setup)
    rows = bench.bench_linears([], "", pairs=3)
    assert cases == [("clip", True, "onednn"), ("clip", True, "f.linear"), ("3t", True, "onednn"),
                     ("3t", True, "f.linear")]
    clip, three = rows                                     # clip ratios 2, 2, 4; 3t ratios 3, 3, 1
    assert (clip["onednn_speedup"], clip["speedup_min"], clip["speedup_max"]) == (2, 2, 4)
    assert (three["onednn_speedup"], three["speedup_min"], three["speedup_max"]) == (3, 1, 3)
    assert (clip["onednn_ms"], clip["f_linear_ms"], three["f_linear_ms"]) == (1000, 2000, 3000)


def test_data_path_figures_are_positive_rates():
    """bench_data runs what it names (renderer, tokenising loader, tar reader) and reports rates; a
    name clash with an imported module once broke it without any other test noticing."""
    figures = load_script("bench").bench_data(16, count=8)
    assert set(figures) == {"shapes_render_per_s_per_core", "shapes_pairs_loader_per_s_per_core",
                            "tar_256px_jpeg_to_224_per_s_per_core"}
    assert all(v > 0 for v in figures.values())


TINY_GPU_PRESET = ["--image-arch", "vit-micro", "--image-size", "16", "--text-arch", "micro", "--embed-dim", "16",
                   "--context-length", "16"]


def test_gpu_step_rows_on_the_cpu_with_tiny_towers_count_model_flops(monkeypatch):
    """bench_gpu_step (what scripts/gpu_check.sh prints as its step table) on tiny towers: one row per batch size
    and checkpointing setting, checkpointing really switched on where the row says so -- and, since MFU counts
    model FLOPs (PaLM, App. B), not the forward that checkpointing recomputes, the FLOPs per sample behind each
    row's MFU are the same with and without it."""
    bench = load_script("bench")
    monkeypatch.setattr(bench, "GPU_PRESET", TINY_GPU_PRESET)
    switched = []
    real = bench.ThreeTowers.set_grad_checkpointing
    monkeypatch.setattr(bench.ThreeTowers, "set_grad_checkpointing",
                        lambda self, enabled=True: switched.append(enabled) or real(self, enabled))
    rows = bench.bench_gpu_step([4, 8], repeats=1, device=torch.device("cpu"))
    assert [(r["batch"], r["checkpointing"]) for r in rows] == [(4, False), (4, True), (8, False), (8, True)]
    assert switched == [False, True, False, True]
    assert all(r["samples_per_s"] > 0 and 0 < r["mfu_measured_peak"] < 2 and r["peak_mem_gib"] is None for r in rows)
    used = [r["mfu_measured_peak"] * r["matmul_peak_tflops"] * 1e12 * r["step_ms"] / 1e3 / r["batch"]
            for r in rows]                                             # FLOPs/sample = MFU x peak x step time
    for plain, checkpointed in ((0, 1), (2, 3)):
        assert used[checkpointed] == pytest.approx(used[plain], rel=1e-9) and used[plain] > 0
        assert rows[checkpointed]["gflops_per_sample"] == rows[plain]["gflops_per_sample"] == \
            pytest.approx(used[plain] / 1e9)


def test_gpu_step_memory_of_a_case_holds_no_earlier_case(monkeypatch):
    """Each case's peak memory is counted once the previous case's model and optimiser are gone. The CPU has
    no allocator peaks, so a fake stands in for torch.cuda's: the bytes of the ThreeTowers alive when the
    count starts and when it is read. A case that still held the previous case's model would count two."""
    bench = load_script("bench")
    monkeypatch.setattr(bench, "GPU_PRESET", TINY_GPU_PRESET)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: 1e12)
    live = weakref.WeakSet()

    class Counted(bench.ThreeTowers):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)

    held = lambda: sum(p.numel() * p.element_size() for m in list(live) for p in m.parameters())  # noqa: E731
    peak = [0]
    monkeypatch.setattr(bench, "ThreeTowers", Counted)
    monkeypatch.setattr(bench, "reset_peak_memory", lambda device: peak.__setitem__(0, held()))
    monkeypatch.setattr(bench, "peak_memory_gib", lambda device: max(peak[0], held()) / 2**30)
    rows = bench.bench_gpu_step([8], repeats=1, device=torch.device("cpu"))
    assert [r["checkpointing"] for r in rows] == [False, True]
    assert [r["peak_mem_gib"] * 2**30 for r in rows] == [4 * r["trainable_params"] for r in rows]   # one model, fp32


def test_loader_figures_and_the_bytes_each_view_ships():
    """bench_loader on two tiny shards (one per worker): every full batch of an epoch arrives, and the bytes a
    sample ships are its uint8 views (f's crop, h's view; h's alone for LiT) and its int64 token ids, cut
    after the batch's longest caption (at most 77)."""
    f = load_script("bench").bench_loader(shards=2, per_shard=10, short_side=(20, 28), image_size=16, h_size=8,
                                          batch=4, workers=2, epochs=1)
    assert 3 * 16 * 16 < f["f"]["bytes_per_sample"] < 3 * 16 * 16 + 77 * 8
    assert f["f+h"]["bytes_per_sample"] - f["f"]["bytes_per_sample"] == 3 * 8 * 8     # the same batches, plus h
    assert f["f+h"]["bytes_per_sample"] - f["h"]["bytes_per_sample"] == 3 * 16 * 16   # LiT: no f crop shipped
    for view in ("f", "f+h", "h"):
        assert f[view]["samples"] == 2 * 8                          # per worker: 10 samples, 2 full batches of 4
        assert f[view]["samples_per_s"] > 0
        assert f[view]["samples_per_s_per_worker"] == pytest.approx(f[view]["samples_per_s"] / 2)


def test_photo_like_jpegs_have_the_asked_short_side():
    bench = load_script("bench")
    rng = np.random.default_rng(0)
    for _ in range(4):
        image = decode_jpeg(torch.frombuffer(bytearray(bench.photo_jpeg(rng, (40, 48))), dtype=torch.uint8))
        assert image.shape[0] == 3 and 40 <= min(image.shape[1:]) <= 48
        assert max(image.shape[1:]) == min(image.shape[1:]) * 4 // 3
        assert image.float().std() > 10                               # not a flat image


def test_step_input_figures_are_positive():
    """bench_step_input on a tiny table: it runs the steps it names and reports positive medians."""
    f = load_script("bench").bench_step_input(rows=64, batch=8, image_size=8, dim=16, steps=4, workers=1)
    assert f["steps"] == 4 and f["device"] in ("cpu", "cuda")
    assert f["fetch_ms"] > 0 and f["step_inputs_ms"] > 0 and f["input_ms"] > 0
