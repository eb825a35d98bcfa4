"""Shared test set-up: make the top-level modules importable and keep CPU threads modest
(CI has 2 cores; several tests start two processes)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
