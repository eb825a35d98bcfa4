"""Shared test set-up: make the top-level modules importable and keep CPU threads modest
(CI has 2 cores; several tests start two processes); `load_script` for what scripts/ holds;
`run_ranks` for the tests that spawn gloo ranks."""
import importlib.util
import os
import sys

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(worker, tmp: str, world: int) -> list[dict]:
    """Spawn `world` processes running worker(rank, tmp), each of which saves its results to
    tmp/rank{rank}.pt; return them in rank order."""
    mp.spawn(worker, args=(tmp,), nprocs=world, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]
