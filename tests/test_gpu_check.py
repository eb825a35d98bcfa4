"""scripts/gpu_check.sh, the prepared CUDA check: without a GPU it must say so and run nothing; with
GPU_CHECK_ON_CPU=1 its whole pipeline (three modes, a torchrun restart that resumes, eval.py, the distributed
path in a 1-rank gloo group, the table) runs on tiny towers, where the resumed run must end bitwise where the
straight one does and the distributed step must match the plain one; its whole record comes back as one
archive. scripts/gpu_dist_check.py's parity check itself must fail on a faulty gather."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import losses
from conftest import load_script

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")


def run(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0 and "no CUDA device present; nothing was run" in done.stdout
    assert not any(tmp_path.iterdir())


def test_its_pipeline_on_cpu_resumes_bitwise_and_runs_the_distributed_path(tmp_path):
    done = run(tmp_path, GPU_CHECK_ON_CPU="1")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split(" | ")[0]: line.split(" | ") for line in done.stdout.splitlines() if " | " in line}
    for name in ("clip", "lit", "3t", "3t-again", "3t-resumed"):
        assert rows[name][2] == "16", rows.get(name)                   # every run reached its last step
    assert rows["3t"][3] == rows["3t-resumed"][3]                        # the same last loss
    assert "resumed vs straight 0;" in done.stdout and "straight vs straight 0 " in done.stdout
    assert "eval.py on 3t" in done.stdout and "main retrieval/i2t/R@1" in done.stdout
    # the distributed path: DDP + the gather match the plain step, with and without checkpointing + accumulation
    for variant in ("ddp+gather", "ddp+gather --grad-checkpointing --accum-freq 2"):
        assert rows[f"parity ({variant})"][1] == "PASS", rows.get(f"parity ({variant})")
        assert "gather fwd/bwd 1/1" in rows[f"parity ({variant})"][2]
        assert rows[f"no host sync ({variant})"][1:] == ["SKIP", "steps [4, 5, 6]: skipped: no CUDA"]
    assert done.stdout.rindex("## gpu_check on") > len(done.stdout) - 4000     # the table comes last
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.md", "gpu_check.tar.gz"]
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        read = lambda name: tar.extractfile(name).read().decode()     # noqa: E731
        assert "simulated node failure" in read("gpu_check/3t-resumed.log")
        assert all(r["ok"] is not False for r in json.loads(read("gpu_check/dist.json"))["rows"])
        assert "## gpu_check on" in read("gpu_check/summary.md")
    assert {"gpu_check/dist.log", "gpu_check/eval.log", "runs/3t/metrics.jsonl"} <= set(names)
    assert not any(n.endswith((".pt", ".bin")) for n in names)             # logs, not weights


@pytest.mark.parametrize("fault", ["gradient doubled in the gather's backward", "gather skipped"])
def test_the_parity_check_fails_on_a_faulty_gather(tmp_path, monkeypatch, fault):
    if fault == "gather skipped":
        monkeypatch.setattr(losses, "gather_many", lambda tensors: tensors)
    else:
        real = losses._GatherRows.backward
        monkeypatch.setattr(losses._GatherRows, "backward", staticmethod(lambda ctx, grad: 2 * real(ctx, grad)))
    status = load_script("gpu_dist_check").main([
        "--result", str(tmp_path / "dist.json"), "--sync-free-steps", "1", "--mode", "clip", "--image-arch",
        "vit-micro", "--image-size", "16", "--text-arch", "micro", "--batch-size", "8", "--train-samples", "64",
        "--precision", "fp32", "--steps", "8", "--quiet", "--eval-data", "none", "--cache-dir", str(tmp_path / "cache")])
    rows = json.loads((tmp_path / "dist.json").read_text())["rows"]
    assert status == 1 and [r["ok"] for r in rows if r["check"] == "parity"] == [False, False]
    assert not losses.GATHER_ON_ONE_RANK                                   # switched off again
