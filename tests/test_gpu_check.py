"""scripts/gpu_check.sh, the prepared CUDA check: without a GPU it must say so and run nothing; with
GPU_CHECK_ON_CPU=1 its whole pipeline (three modes, a torchrun restart that resumes, eval.py, the table)
runs on tiny towers, where the resumed run must end bitwise where the straight one does."""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")


def run(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 0 and "no CUDA device present; nothing was run" in done.stdout
    assert not (tmp_path / "gpu_check").exists()


def test_its_pipeline_on_cpu_resumes_bitwise(tmp_path):
    done = run(tmp_path, GPU_CHECK_ON_CPU="1")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split(" | ")[0]: line.split(" | ") for line in done.stdout.splitlines() if " | " in line}
    for name in ("clip", "lit", "3t", "3t-again", "3t-resumed"):
        assert rows[name][2] == "16", rows.get(name)                   # every run reached its last step
    assert rows["3t"][3] == rows["3t-resumed"][3]                        # the same last loss
    assert "resumed vs straight 0;" in done.stdout and "straight vs straight 0 " in done.stdout
    assert "simulated node failure" in (tmp_path / "gpu_check" / "3t-resumed.log").read_text()
    assert "eval.py on 3t" in done.stdout and "main retrieval/i2t/R@1" in done.stdout
