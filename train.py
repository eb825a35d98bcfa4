"""Train CLIP, LiT or Three Towers (3T) -- or pretrain a third tower -- from one file.

    python train.py --mode 3t                                       # one process, CPU or GPU
    torchrun --standalone --nproc_per_node=2 train.py --mode 3t      # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-backend=c10d
             --rdzv-endpoint=HOST:29500 train.py --mode 3t ...        # many nodes (one line)

The loop is visible in `run()`: data -> (cached) frozen tower h -> towers f, g and heads under
DDP -> losses.tower_loss -> AdamW. What 3T changes relative to CLIP is only which embeddings the
loss compares (losses.PAIRS) and that the frozen tower's embeddings enter the batch (Sec. 3 of
Kossen et al. 2023). `--mode supervised` trains an image classifier whose checkpoint `--tower3`
loads as a pretrained third tower; that is how an offline user gets one.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from losses import PAIRS, default_weights, tower_loss
from model import (CHECKPOINT_FORMAT, CNN_PRESETS, IMAGE_ARCHS, TEXT_PRESETS, VIT_PRESETS, FrozenTower, ThreeTowers, build_image_tower,
                   checksum, load_tower3, read_checkpoint, save_checkpoint, summary)


# ----------------------------------------------------------------------------------------------
# Flags. Defaults are the CPU preset: the embedded shapes world, small towers, minutes on 2 cores.
# ----------------------------------------------------------------------------------------------
SHAPES_TRAIN_SAMPLES = 40_000     # --train-samples on the shapes world; files are used whole


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", default="3t", choices=["clip", "lit", "3t", "supervised"],
      help="clip: f,g from scratch; lit: frozen h + text tower; 3t: f,g + third tower h (the paper); "
           "supervised: train an image classifier to use later as --tower3")
    # data
    a("--train-data", default="shapes",
      help="'shapes' (embedded synthetic world, no download), a .csv/.tsv of image paths + captions, "
           "or tar shards like 'data/{00000..00099}.tar' (img2dataset layout); for --mode supervised: "
           "'shapes' or an ImageFolder root")
    a("--train-samples", type=int, default=None,
      help=f"training pairs (scarce regime: fewer). Default: {SHAPES_TRAIN_SAMPLES:,} on the shapes world; a CSV or "
           f"ImageFolder is used whole (given N: a CSV's first N usable rows, a seeded subset of N images)")
    a("--caption-noise", type=float, default=0.0,
      help="shapes/CSV: fraction of pairs whose caption belongs to another image (noisy web regime)")
    a("--label", default="object", choices=["object", "scene", "position_size"],
      help="--mode supervised on shapes: which labels to learn (object ~ JFT-like, scene ~ Places-like)")
    a("--csv-img-key", default="filepath", help="CSV column with image paths (relative to the CSV file)")
    a("--csv-caption-key", default="title", help="CSV column with captions")
    a("--csv-separator", default=None, help="CSV separator (default: tab for .tsv, comma for .csv)")
    a("--max-bad-fraction", type=float, default=0.1,
      help="tar shards: stop with an error when more than this fraction of a shard's samples is unreadable")
    a("--max-image-pixels", type=int, default=data.MAX_IMAGE_PIXELS,
      help="files: an image whose header announces more pixels is skipped and counted (too_large), never decoded")
    a("--max-file-bytes", type=int, default=data.MAX_FILE_BYTES,
      help="files: an image file or tar member larger than this is skipped and counted (too_large), never read")
    a("--crop-scale", type=float, default=0.08,
      help="--mode supervised on an ImageFolder: random crops cover at least this fraction of the image (0.08: "
           "Inception-style, the default; 1: resize + centre crop, no random crop; small sets learn faster with more)")
    a("--flip", action=argparse.BooleanOptionalAction, default=True,
      help="--mode supervised on an ImageFolder: random horizontal flips (default on)")
    a("--workers", type=int, default=None,
      help="DataLoader worker processes per rank (default: 0 on CPU, where the shapes world costs ~2%% of a "
           "step and extra processes only compete for the cores; 8 per GPU, capped by the CPU count)")
    a("--eval-data", default="shapes", help="periodic evaluation: 'shapes' or 'none'")
    a("--eval-images", type=int, default=500, help="images per periodic zero-shot / retrieval evaluation")
    # towers
    a("--image-arch", default="cnn-tiny", choices=IMAGE_ARCHS,
      help="image tower f (or the classifier in supervised mode); the paper's are ViTs (vit-b/16, ...), the CPU "
           "default is a small conv net, which learns shapes within minutes on two cores")
    a("--image-size", type=int, default=32, help="input resolution of f (the shapes world renders at this size)")
    a("--text-arch", default="mini", choices=list(TEXT_PRESETS), help="text tower g (base = CLIP's 512x12)")
    a("--tokenizer", default="bpe", choices=["bpe", "bytes"],
      help="bpe: byte-level BPE whose merges are learned from the training captions at the start of a run "
           "and stored with it (captions ~5x shorter than bytes); bytes: one token per UTF-8 byte")
    a("--vocab-size", type=int, default=8192,
      help="bpe: most tokens (256 bytes + 3 specials + merges); learning stops earlier when no pair of tokens "
           "occurs twice (the shapes world needs ~460)")
    a("--context-length", type=int, default=None,
      help="tokens per caption incl. BOS/EOS, longer captions are cut (default: 77 with bpe, as CLIP; 128 with bytes)")
    a("--embed-dim", type=int, default=128, help="width of the shared embedding space of f, g and the heads")
    a("--tower3", default="auto",
      help="third tower h for lit/3t: torchvision:ARCH:WEIGHTS (e.g. torchvision:resnet50:IMAGENET1K_V2), "
           "torchvision:ARCH:/path/state_dict.pth, a --mode supervised checkpoint, or 'auto' (shapes only: "
           "pretrain one on the shapes world's --tower3-label labels on first use, then reuse it)")
    a("--tower3-label", default="object", choices=["object", "scene"], help="labels of the auto-pretrained tower")
    a("--tower3-steps", type=int, default=400, help="steps of the auto-pretrained tower")
    a("--tower3-batch-size", type=int, default=64, help="per rank, for the auto-pretrained tower")
    a("--no-tower3-heads", action="store_true",
      help="3t: drop the heads h_f, h_g on the frozen embedding; f_h, g_h then map straight into D_h")
    a("--cache-tower3", action=argparse.BooleanOptionalAction, default=True,
      help="compute the frozen tower's embeddings of a finite dataset once and reuse them (LiT Sec. 5.6)")
    a("--cache-dir", default="cache", help="where third-tower caches and auto-pretrained towers live")
    # loss
    a("--loss", default="softmax", choices=["softmax", "sigmoid"],
      help="softmax: the paper's contrastive loss; sigmoid: SigLIP's pairwise loss (an extension)")
    a("--loss-weights", default=None,
      help="3t: weights of the terms fg,fh,gh, e.g. '0.5,0.25,0.25' (default 1/3 each, Eq. 2)")
    a("--init-temperature", type=float, default=10.0, help="initial t = exp(s) of every term (clamped at 100)")
    # optimisation
    a("--batch-size", type=int, default=128, help="per rank; the contrastive batch is batch-size x world size")
    a("--steps", type=int, default=None, help="optimiser steps (default: --epochs over the data)")
    a("--epochs", type=float, default=3, help="passes over the data when --steps is not given")
    a("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    a("--wd", type=float, default=0.1, help="AdamW weight decay (not on biases, norms, embeddings, temperatures)")
    a("--beta2", type=float, default=0.98, help="AdamW beta2 (CLIP's 0.98 is steadier than 0.999)")
    a("--warmup", type=int, default=50, help="linear warm-up steps before the cosine decay")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    a("--max-nonfinite", type=int, default=5, help="stop after this many non-finite steps in a row")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast + TF32 on CUDA, fp32 on CPU (bf16 is far slower on most CPUs)")
    a("--compile", action="store_true", help="torch.compile the towers (before DDP)")
    a("--seed", type=int, default=0, help="seeds the towers, the data order and the shapes world")
    # output
    a("--out", "--logs", dest="out", default=None, help="run folder (default runs/<mode>-s<seed>)")
    a("--resume", default=None, help="'latest' (the run folder's ckpt.pt, if any) or a checkpoint path")
    a("--save-every", type=int, default=200, help="write ckpt.pt every N steps (and at the end)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--log-every", type=int, default=10, help="write averaged metrics to metrics.jsonl every N steps")
    a("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    check_ranges(p, args, RANGES)
    args.out = args.out or os.path.join("runs", f"{args.mode}-s{args.seed}")
    args.context_length = args.context_length or (128 if args.tokenizer == "bytes" else 77)
    if args.loss_weights is not None and args.mode in PAIRS:
        try:
            values = [float(x) for x in args.loss_weights.split(",")]
        except ValueError:
            values = []
        if len(values) != len(PAIRS[args.mode]):
            p.error(f"--loss-weights {args.loss_weights!r}: expected {len(PAIRS[args.mode])} comma-separated "
                    f"numbers for the terms {','.join(PAIRS[args.mode])} of --mode {args.mode}")
        if not all(0 <= v < math.inf for v in values) or not sum(values) > 0:
            p.error(f"--loss-weights {args.loss_weights!r}: expected finite weights >= 0, not all 0")
        args.loss_weights = values
    tar = args.mode != "supervised" and args.train_data != "shapes" and not args.train_data.lower().endswith(
        (".csv", ".tsv"))
    if args.train_samples is not None and tar:
        p.error(f"--train-samples {args.train_samples}: tar shards are streamed whole; select fewer shards")
    if args.train_data == "shapes" and args.train_samples is None:
        args.train_samples = SHAPES_TRAIN_SAMPLES
    if args.tower3 == "auto" and args.mode in ("lit", "3t") and args.train_data != "shapes":
        p.error(f"--tower3 auto only works with --train-data shapes; for {args.train_data!r} give e.g. "
                f"--tower3 torchvision:resnet50:IMAGENET1K_V2")
    patch = VIT_PRESETS.get(args.image_arch, [1])[0]
    if args.image_size % patch:
        p.error(f"--image-size {args.image_size}: expected a multiple of {args.image_arch}'s patch size {patch}")
    return args


# The range of every numeric flag, checked once at parse time: [a, b] closed, (a, b) open. NaN and
# inf fall outside all of them; a flag left at its default None is not checked.
RANGES = {"train_samples": "[1, inf)", "caption_noise": "[0, 1]", "max_bad_fraction": "[0, 1]",
          "workers": "[0, inf)", "eval_images": "[1, inf)", "image_size": "[1, inf)", "vocab_size": "[259, inf)",
          "context_length": "[3, inf)", "embed_dim": "[1, inf)", "tower3_steps": "[1, inf)", "tower3_batch_size": "[1, inf)",
          "init_temperature": "(0, 100]", "batch_size": "[1, inf)", "steps": "[1, inf)", "epochs": "(0, inf)",
          "lr": "(0, inf)", "wd": "[0, inf)", "beta2": "[0, 1)", "warmup": "[0, inf)", "grad_clip": "[0, inf)",
          "max_nonfinite": "[1, inf)", "seed": "[0, inf)", "save_every": "[1, inf)", "eval_every": "[0, inf)",
          "log_every": "[1, inf)", "max_image_pixels": "[1, inf)", "max_file_bytes": "[1, inf)",
          "crop_scale": "(0, 1]"}


def check_ranges(p: argparse.ArgumentParser, args: argparse.Namespace, ranges: dict[str, str]) -> None:
    """p.error naming the first flag (or list element) outside its interval in `ranges`."""
    for name, interval in ranges.items():
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not ((lo < v if interval[0] == "(" else lo <= v) and
                                      (v < hi if interval[-1] == ")" else v <= hi)):
                p.error(f"--{name.replace('_', '-')} {v if isinstance(v, int) else f'{v:g}'}: "
                        f"expected a value in {interval}")


# ----------------------------------------------------------------------------------------------
# Processes and devices (torchrun's RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run is rank 0)
# ----------------------------------------------------------------------------------------------
class Env:
    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        cores = max(1, (os.cpu_count() or 1) // local_world)       # this process's share of the CPU
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
            if "OMP_NUM_THREADS" not in os.environ:
                torch.set_num_threads(cores)
        self.default_workers = 0 if self.device.type == "cpu" else min(8, cores)
        self.agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None   # torchrun's agent process
        self.locks = contextlib.ExitStack()                                           # run folders held
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0

    def workers(self, args: argparse.Namespace) -> int:
        """DataLoader workers per rank: --workers, else 0 on CPU and up to 8 per GPU."""
        return self.default_workers if args.workers is None else args.workers

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def stop_together(self, problem: str | None) -> None:
        """SystemExit on every rank when any rank has a problem: one all_reduce, so no rank is left
        waiting in a collective for one that stopped. A rank says its own problem, else whose it was."""
        if self.world == 1:
            if problem:
                raise SystemExit(problem)
            return
        flags = torch.zeros(self.world, device=self.device)
        flags[self.rank] = problem is not None
        dist.all_reduce(flags)
        if flags.any():
            raise SystemExit(problem or f"rank {self.rank}: stopping with rank(s) "
                                        f"{flags.nonzero().flatten().tolist()}, see their error")

    def orphaned(self) -> str | None:
        """Why this worker should stop when torchrun's agent died (it was re-parented), else None."""
        if self.agent is not None and os.getppid() != self.agent:
            return f"rank {self.rank}: the torchrun agent (pid {self.agent}) is gone, stopping this orphaned worker"
        return None

    def lock(self, folder: str) -> str | None:
        """Hold an exclusive flock on folder/.lock (it names the holder) until close(); or say who holds
        it. The kernel drops the lock when its process dies: no stale locks after a crash."""
        f = open(os.path.join(folder, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "holder unknown"
            f.close()
            return f"--out {folder!r} is in use by another run ({holder}); give this run its own --out"
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.locks.enter_context(f)
        return None

    def close(self) -> None:
        self.locks.close()
        if self.owns_group:
            dist.destroy_process_group()


def unwritable(flag: str, folder: str) -> str | None:
    """Why `folder` (created if missing) cannot take a new file, or None."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"{flag} {folder!r}: cannot write there ({e.strerror or e})"
    return None


def claim_folders(args: argparse.Namespace, env: Env) -> None:
    """Before any work: create --out (and --cache-dir where this run writes) and prove them writable;
    then rank 0 locks --out for the run's lifetime, so a second run given the same folder stops at once
    instead of interleaving metrics.jsonl and overwriting ckpt.pt."""
    folders = [("--out", args.out)]
    if args.mode in ("lit", "3t") and (args.tower3 == "auto" or args.cache_tower3):
        folders.append(("--cache-dir", args.cache_dir))
    problem = next(filter(None, (unwritable(flag, folder) for flag, folder in folders)), None)
    if problem is None and env.master:
        problem = env.lock(args.out)
    env.stop_together(problem)


def log(env: Env, message: str) -> None:
    if env.master:
        tqdm.write(message)


def autocast(args: argparse.Namespace, env: Env):
    """bf16 autocast on CUDA (the paper's towers train in bf16); nothing on CPU."""
    bf16 = args.precision == "bf16" or (args.precision == "auto" and env.device.type == "cuda")
    if bf16:
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The third tower h: its source (auto-pretrained on the shapes world) and its cached embeddings
# ----------------------------------------------------------------------------------------------
def resolve_tower3(args: argparse.Namespace, env: Env) -> FrozenTower:
    """Load h from --tower3; 'auto' pretrains one on the shapes world first (see auto_tower3)."""
    spec = auto_tower3(args, env) if args.tower3 == "auto" else args.tower3
    try:
        tower3 = load_tower3(spec).to(env.device)
    except (ValueError, OSError, RuntimeError) as e:      # wrong file, wrong weights, offline download
        raise SystemExit(" ".join(str(e).split())[:500]) from None
    log(env, f"[tower3] {spec}: D_h = {tower3.dim}, input {tower3.image_size}px, frozen")
    return tower3


def auto_tower3(args: argparse.Namespace, env: Env) -> str:
    """The default run's third tower: a classifier pretrained by `pretrain` on the shapes world's
    --tower3-label labels, once, then reused from --cache-dir -- a genuinely pretrained tower,
    never a random one. The file name holds everything the tower depends on, including a digest
    of the preset's shape and of a rendered image, so a changed preset or world is never reused."""
    recipe = ["--label", args.tower3_label, "--image-arch", args.image_arch, "--image-size", str(args.image_size),
              "--steps", str(args.tower3_steps), "--batch-size", str(args.tower3_batch_size), "--lr", "4e-3",
              "--warmup", "20", "--seed", str(args.seed)]
    digest = hashlib.sha256(json.dumps([recipe, env.world, data.ShapesWorld(args.seed, args.image_size).digest(),
                                        CNN_PRESETS.get(args.image_arch), VIT_PRESETS.get(args.image_arch)]
                                       ).encode()).hexdigest()[:8]
    path = os.path.abspath(os.path.join(args.cache_dir, f"tower3-shapes-{args.tower3_label}-{args.image_arch}-"
                                                        f"{args.image_size}px-s{args.seed}-{digest}.pt"))
    if not os.path.exists(path):
        log(env, f"[tower3] no pretrained third tower yet: pretraining one on the shapes world's "
                 f"'{args.tower3_label}' labels ({' '.join(recipe)}); it is saved to {path} and reused by later runs")
        folder = path[:-3]
        pretrain(parse_args(["--mode", "supervised", *recipe, "--workers", str(env.workers(args)), "--eval-images",
                             str(args.eval_images), "--out", folder, "--resume", "latest"]
                            + (["--quiet"] if args.quiet else [])), env)
        if env.master:   # a slim copy, written only once pretraining has finished
            ckpt = read_checkpoint(os.path.join(folder, "ckpt.pt"))
            save_checkpoint({k: ckpt[k] for k in ("format", "mode", "classifier", "model", "args")}, path)
        env.barrier()
    return path


def tower3_cache(args: argparse.Namespace, env: Env, tower3: FrozenTower, dataset) -> data.RowTable | None:
    """h(x_i) of every sample i of a finite dataset (h's own view, data.tower3_view), computed once and then
    read by row (LiT Sec. 5.6). The table is a file under --cache-dir named by a fingerprint of the tower's
    weights, h's view and the data (for files: every image's size and modification time); a file whose
    header does not match is recomputed, never used. Rank r of W computes only rows [r N/W, (r+1) N/W) into
    a temporary file that every rank writes, and rank 0 renames it into place once each rank sees the
    others' rows -- so --cache-dir must be on a filesystem that all nodes share. Training reads the rows of
    its batch: memory O(batch) per rank; the OS page cache holds what is read often."""
    if not args.cache_tower3:
        return None
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        log(env, "[tower3] streaming data: no cache, h runs every step")
        return None
    digest = hashlib.sha256()
    for t in tower3.state_dict().values():
        digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())   # 1-d: BatchNorm counters are 0-d
    digest.update(json.dumps([args.train_data, len(dataset), args.seed, args.image_size, tower3.image_size,
                              data.TOWER3_VIEW, getattr(dataset, "stamp", None)]).encode())
    key = dict(rows=len(dataset), dim=tower3.dim, fingerprint=digest.hexdigest()[:16])
    path = os.path.join(args.cache_dir, f"h-{key['fingerprint']}.bin")
    table = data.RowTable.open(path, **key)
    if every_rank(env, table is not None):
        log(env, f"[tower3] reusing cached embeddings {path}")
        return table
    if os.path.exists(path):
        log(env, f"[tower3] cache {path} is stale: recomputing")
    token = [f"{os.getpid()}-{os.urandom(4).hex()}"]               # rank 0's, so every rank names one file
    if env.world > 1:
        dist.broadcast_object_list(token, src=0)
    tmp = f"{path}.{token[0]}.tmp"
    try:
        if env.master:
            os.makedirs(args.cache_dir, exist_ok=True)
            data.RowTable.create(tmp, **key)
        env.barrier()
        table = data.RowTable.open(tmp, writable=True, **key)     # None where rank 0's file is not visible
        first = cache_share(args, env, tower3, dataset, table) if table is not None else None
        # Every rank must see every rank's rows: each compares the first row of every share in its own view.
        firsts = [first]
        if env.world > 1:
            firsts = [None] * env.world
            dist.all_gather_object(firsts, first)
        seen = table is not None and all(torch.equal(table[[i]][0], row) for i, row in filter(None, firsts))
        if not every_rank(env, seen):
            raise SystemExit(f"--cache-dir {args.cache_dir}: the ranks do not see each other's rows of {tmp}; use a "
                             f"folder on a filesystem that every node shares, or --no-cache-tower3")
        if env.master:
            os.replace(tmp, path)
        env.barrier()
    finally:
        if env.master and os.path.exists(tmp):
            os.remove(tmp)
    return data.RowTable.open(path, **key)


def cache_share(args: argparse.Namespace, env: Env, tower3: FrozenTower, dataset, table: data.RowTable
                ) -> tuple[int, torch.Tensor] | None:
    """Compute this rank's share of the rows, [r N/W, (r+1) N/W), into `table`, batch by batch; return
    (index, row) of its first row, or None for an empty share."""
    lo, hi = len(dataset) * env.rank // env.world, len(dataset) * (env.rank + 1) // env.world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), 256,   # in order, no
                                         num_workers=env.workers(args), collate_fn=data.collate)  # index list
    row, first = lo, None
    for batch in tqdm(loader, desc="caching h", disable=not env.master or args.quiet):
        with autocast(args, env):
            h = tower3(batch["image_h"].to(env.device, non_blocking=True)).float().cpu()
        table.write(row, h)
        first, row = first or (lo, h[0].clone()), row + len(h)
    return first


def every_rank(env: Env, flag: bool) -> bool:
    """Whether `flag` holds on every rank (one all_reduce), so that all ranks take the same branch."""
    if env.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------
# Optimiser, schedule, the run's position and its checkpoints
# ----------------------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay only on weight matrices -- not on biases, norms, embeddings (token,
    positional, class token) or the temperatures/biases of the loss (CLIP, Sec. 2.5)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "class_token" in name or name.startswith(("log_temperature", "bias."))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-6)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def schedule(args: argparse.Namespace, env: Env, model: torch.nn.Module, dataset
             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """AdamW, its warm-up + cosine schedule, and the number of steps: --steps, else --epochs
    (default 1) over a finite dataset."""
    per_epoch = len(dataset) // (args.batch_size * env.world) if hasattr(dataset, "__len__") else None
    if per_epoch == 0:
        raise SystemExit(f"--train-data {args.train_data!r}: no full batch of --batch-size {args.batch_size}: "
                         f"{len(dataset)} samples, fewer than one global batch ({args.batch_size} x {env.world} processes)")
    if args.steps is None and per_epoch is None:
        raise SystemExit("--steps is required for streaming (tar-shard) data")
    total = args.steps or max(1, int(args.epochs * per_epoch))
    optimizer = build_optimizer(model, args)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, total)), total


@dataclass
class Position:
    """Where a run stands: optimiser steps, and this rank's epoch and batch within it (streaming
    shards may put ranks at different points of an epoch); skipped samples so far."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    data_errors: Counter = field(default_factory=Counter)


def endless(loader, position: Position) -> Iterator[dict | None]:
    """The loader's batches, epoch after epoch, from `position` on; position follows along. None after
    an epoch that gave no batch at all (more epochs would not help: next_batch stops the run)."""
    while True:
        data.set_epoch(loader, position.epoch)
        fresh = position.batch == 0
        for batch in loader:
            position.batch += 1
            position.data_errors.update(batch.get("data_errors", {}))
            yield batch
        if position.batch == 0:
            yield None
        position.epoch, position.batch = position.epoch + 1, 0


def next_batch(batches: Iterator[dict | None], args: argparse.Namespace, env: Env) -> dict:
    """The next batch of `endless`, agreed on by all ranks each step (Env.stop_together): a rank whose
    epoch held no full batch (too little usable data) or whose torchrun agent died stops every rank."""
    batch, problem = next(batches), env.orphaned()
    if batch is None:
        problem = (f"--train-data {args.train_data!r}: an epoch gave rank {env.rank} no full batch of --batch-size "
                   f"{args.batch_size}; each rank (and, for tar shards, each loader worker) needs at least that "
                   f"many usable samples per epoch")
    env.stop_together(problem)
    return batch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(args: argparse.Namespace, env: Env, model: torch.nn.Module, optimizer, scheduler, position: Position,
         **extra) -> None:
    """ckpt.pt: the trainable model, optimiser, schedule, step, and every rank's RNG state and data
    position (gathered, so one file resumes every rank exactly); `extra` says what the model is."""
    mine = {"rng": rng_state(), "epoch": position.epoch, "batch_in_epoch": position.batch}
    ranks = [mine]
    if env.world > 1:
        ranks = [None] * env.world
        dist.all_gather_object(ranks, mine)
    if env.master:
        save_checkpoint({"format": CHECKPOINT_FORMAT, "mode": args.mode, "args": vars(args),
                                   "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "step": position.step, "ranks": ranks,
                                   "data_errors": dict(position.data_errors), **extra},
                                  os.path.join(args.out, "ckpt.pt"))


def find_checkpoint(args: argparse.Namespace) -> dict | None:
    """The checkpoint to resume from: --resume PATH, or with --resume latest the run folder's ckpt.pt
    if there is one; also after an elastic restart by torchrun (--max-restarts), so a restarted worker
    continues instead of starting over."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    path = args.resume
    if args.resume == "latest" or (args.resume is None and restarted):
        path = os.path.join(args.out, "ckpt.pt")
        if not os.path.exists(path):
            return None
    elif path is None:
        return None
    elif not os.path.exists(path):
        raise SystemExit(f"--resume {path!r}: no such checkpoint")
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"--resume {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("mode") != args.mode:
        raise SystemExit(f"--resume {path!r}: not a {CHECKPOINT_FORMAT} checkpoint of mode {args.mode}")
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "ranks") if k not in ckpt]
    if missing:
        raise SystemExit(f"--resume {path!r}: an incomplete checkpoint, without {', '.join(missing)}")
    return {**ckpt, "path": path}


def check_resumable(ckpt: dict | None, config: dict, tower3_digest: str | None = None) -> None:
    """A resumed run must rebuild the model its checkpoint holds, with the same frozen tower: SystemExit
    naming every setting that differs (what the checkpoint does not record passes; so does the initial
    temperature, which the checkpoint's learned one replaces)."""
    if ckpt is None:
        return
    recorded = {**(ckpt.get("model_config") or ckpt.get("classifier") or {}), "tower3 weights": ckpt.get("tower3_digest")}
    diff = [f"{k}: {recorded[k]!r} in the checkpoint, {v!r} now" for k, v in {**config, "tower3 weights": tower3_digest}.items()
            if k != "init_temperature" and recorded.get(k) is not None and recorded[k] != v]
    if diff:
        raise SystemExit(f"--resume {ckpt['path']!r} holds another model than these flags build: {'; '.join(diff)}"
                         + (f" (its third tower was --tower3 {ckpt['tower3']!r})" if ckpt.get("tower3") else ""))


def resume(env: Env, ckpt: dict | None, model: torch.nn.Module, optimizer, scheduler) -> Position:
    """Restore the model, optimiser, schedule, this rank's RNG state and data position from ckpt."""
    if ckpt is None:
        return Position()
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"--resume {ckpt['path']!r}: its state does not fit the model these flags build "
                         f"({' '.join(str(e).split())[:300]})") from None
    if len(ckpt["ranks"]) != env.world:
        raise SystemExit(f"--resume {ckpt['path']!r} was written by {len(ckpt['ranks'])} processes; resume it "
                         f"with the same number (now {env.world}) to continue exactly")
    mine = ckpt["ranks"][env.rank]
    set_rng_state(mine["rng"])
    log(env, f"[resume] {ckpt['path']}: step {ckpt['step']}, epoch {mine['epoch']}, batch {mine['batch_in_epoch']}")
    return Position(ckpt["step"], mine["epoch"], mine["batch_in_epoch"], Counter(ckpt.get("data_errors", {})))


def build_tokenizer(args: argparse.Namespace, env: Env, dataset, ckpt: dict | None) -> data.Tokenizer:
    """The run's tokenizer: a resumed run's own; else bytes, or BPE merges learned from the captions of
    the training data (deterministic, so every rank learns the same). Written to tokenizer.json and
    into every checkpoint, so evaluation and resumed runs tokenise exactly as training did."""
    if ckpt is not None:
        tokenizer = data.Tokenizer.from_dict(ckpt["tokenizer"])
    elif args.tokenizer == "bytes":
        tokenizer = data.Tokenizer(args.context_length)
    else:
        tokenizer = data.Tokenizer.learn(dataset.sample_captions(VOCAB_CAPTIONS), args.vocab_size, args.context_length)
    if env.master:
        with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
            json.dump(tokenizer.to_dict(), f)
    log(env, f"[tokenizer] {args.tokenizer if ckpt is None else 'from the checkpoint'}: {tokenizer.vocab_size} "
             f"tokens, context {tokenizer.context_length}")
    return tokenizer


VOCAB_CAPTIONS = 20_000   # captions that BPE merges are learned from


def wrap(model: torch.nn.Module, args: argparse.Namespace, env: Env) -> torch.nn.Module:
    """What the step calls: the model, compiled if asked (before DDP, so DDP sees the compiled
    graph), in DDP when there are several processes. Checkpoints and evaluation keep the raw model."""
    if args.compile:
        model = torch.compile(model)
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.world > 1 else model


class MetricsLog:
    """The progress bar and metrics.jsonl (rank 0): running means of the step metrics over ranks,
    one record every --log-every steps; evaluation records as they come."""

    def __init__(self, args: argparse.Namespace, env: Env, total: int, position: Position, scheduler):
        self.args, self.env, self.position, self.total, self.scheduler = args, env, position, total, scheduler
        self.file = open(os.path.join(args.out, "metrics.jsonl"), "a") if env.master else None
        self.bar = tqdm(total=total, initial=position.step, desc=args.mode, disable=not env.master or args.quiet,
                        dynamic_ncols=True)
        self.running: Counter = Counter()
        self.t_last, self.n_last = time.time(), position.step

    def step(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.running[k] += v
        self.running["n"] += 1
        self.bar.update(1)
        step = self.position.step
        if step % self.args.log_every and step != self.total:
            return
        keys = sorted(k for k in self.running if k != "n")       # one all_reduce per log line
        values = torch.stack([torch.as_tensor(self.running[k], dtype=torch.float32, device=self.env.device)
                              for k in keys]) / self.running["n"]
        if self.env.world > 1:
            dist.all_reduce(values)
            values /= self.env.world
        now = time.time()
        record = dict(zip(keys, values.tolist()), step=step, epoch=self.position.epoch,
                      lr=self.scheduler.get_last_lr()[0],
                      samples_per_s=(step - self.n_last) * self.args.batch_size * self.env.world / (now - self.t_last),
                      data_errors=dict(self.position.data_errors))
        self.t_last, self.n_last, self.running = now, step, Counter()
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "lr", "samples_per_s")
                              or k.startswith("t/")})
        self.write(record)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.position.data_errors:
            log(self.env, f"[data] skipped samples: {dict(self.position.data_errors)}")
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------
# The step and the run
# ----------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a training step touches, built once by `run`."""
    model: ThreeTowers                  # the raw model: clipping, temperature clamp, checkpoints, eval
    forward: torch.nn.Module            # what the step calls: the model, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tower3: FrozenTower | None
    h_cache: data.RowTable | None       # h(x_i) by sample index (tower3_cache), or None: h runs every step
    weights: dict[str, float]           # weight of each loss term of losses.PAIRS[mode]


def train_step(args: argparse.Namespace, env: Env, parts: Parts, batch: dict) -> dict[str, torch.Tensor] | None:
    """One optimiser step of CLIP, LiT or 3T: the frozen tower's embeddings (read from the cache, or
    h under no_grad outside DDP), the trainable towers under DDP, losses.tower_loss, then
    `apply_gradients` and the temperature clamp. Returns the step's metrics, or None when the loss
    or gradient was not finite and the step was skipped (on every rank alike)."""
    image = batch["image"].to(env.device, non_blocking=True)
    text = data.Tokenizer.trim(batch["text"]).to(env.device, non_blocking=True)
    with autocast(args, env):
        h = None
        if parts.tower3 is not None:
            h = parts.h_cache[batch["index"]].to(env.device, non_blocking=True) if parts.h_cache is not None else \
                parts.tower3(batch["image_h"].to(env.device, non_blocking=True))
        out = parts.forward(image if args.mode != "lit" else None, text, h)
        loss, metrics = tower_loss(out, args.mode, parts.weights)
    if not apply_gradients(parts.model, parts.optimizer, parts.scheduler, loss, args.grad_clip):
        return None
    parts.model.clamp_temperatures_()
    return {"loss": loss.detach(), **metrics}


def apply_gradients(model: torch.nn.Module, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> bool:
    """Backward, clip the global gradient norm, AdamW step, schedule step; False (and no update)
    when the norm is not finite. One host sync per step: a non-finite loss makes the (all-reduced,
    so rank-identical) gradient norm non-finite, and every rank skips the same step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(norm).item():
        return False
    optimizer.step()
    scheduler.step()
    return True


def check_finite(ok: bool, streak: int, args: argparse.Namespace, env: Env, step: int) -> int:
    """Count skipped steps in a row; stop after --max-nonfinite of them."""
    if ok:
        return 0
    log(env, f"[warn] step {step}: non-finite loss/gradient, step skipped ({streak + 1} in a row)")
    if streak + 1 >= args.max_nonfinite:
        raise FloatingPointError(f"{streak + 1} non-finite steps in a row at step {step}: lower --lr, "
                                 f"check the data, or use --precision fp32")
    return streak + 1


def pairs_dataset(args: argparse.Namespace, env: Env, tower3: FrozenTower | None):
    """The image-text pairs of --train-data; with a third tower, items also carry h's own view ('image_h',
    data.tower3_view). Logs how much of the data is used."""
    h_size = tower3.image_size if tower3 is not None else None
    dataset = data.make_pairs_dataset(
        args.train_data, "train", image_size=args.image_size, tower3_image_size=h_size, num_samples=args.train_samples,
        caption_noise=args.caption_noise, seed=args.seed, rank=env.rank, world_size=env.world,
        csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
        max_bad_fraction=args.max_bad_fraction, max_image_pixels=args.max_image_pixels,
        max_file_bytes=args.max_file_bytes)
    used = getattr(dataset, "summary", None) or (f"{len(dataset):,} pairs" if hasattr(dataset, "__len__") else
                                                 f"{len(dataset.shards)} shards, streamed whole")
    log(env, f"[data] {args.train_data}: {used}")
    return dataset


def model_config(args: argparse.Namespace, tokenizer: data.Tokenizer, tower3: FrozenTower | None) -> dict:
    """ThreeTowers' arguments, as stored in checkpoints so eval.py rebuilds the same model."""
    return dict(mode=args.mode, image_arch=args.image_arch, image_size=args.image_size, text_arch=args.text_arch,
                vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length, eos_id=tokenizer.EOS,
                embed_dim=args.embed_dim, tower3_dim=tower3.dim if tower3 else None,
                tower3_heads=not args.no_tower3_heads, init_temperature=args.init_temperature, loss=args.loss)


def run(args: argparse.Namespace, env: Env) -> dict[str, float]:
    """Train CLIP, LiT or 3T on the processes of env: data -> frozen tower h (cached) -> towers f, g
    and heads under DDP -> losses.tower_loss -> AdamW. Returns the final evaluation."""
    claim_folders(args, env)
    ckpt = find_checkpoint(args)
    tower3 = resolve_tower3(args, env) if args.mode != "clip" else None
    tower3_digest = checksum(tower3.state_dict())[:16] if tower3 is not None else None
    dataset = pairs_dataset(args, env, tower3)
    tokenizer = build_tokenizer(args, env, dataset, ckpt)
    config = model_config(args, tokenizer, tower3)
    check_resumable(ckpt, config, tower3_digest)
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    model = ThreeTowers(**config).to(env.device)
    torch.manual_seed(args.seed + env.rank)       # after the identical init: per-rank randomness
    log(env, f"[{args.mode}] {env.world} process(es) on {env.device.type}; data {args.train_data!r}\n"
             + summary(model, tower3))
    optimizer, scheduler, total = schedule(args, env, model, dataset)
    position = resume(env, ckpt, model, optimizer, scheduler)
    weights = dict(zip(PAIRS[args.mode], args.loss_weights)) if args.loss_weights else default_weights(args.mode)
    parts = Parts(model, wrap(model, args, env), optimizer, scheduler, tower3,
                  tower3_cache(args, env, tower3, dataset) if tower3 is not None else None, weights)
    loader = data.make_loader(dataset, args.batch_size, tokenizer=tokenizer, workers=env.workers(args), rank=env.rank,
                              world_size=env.world, seed=args.seed, start_batch=position.batch,
                              pin_memory=env.device.type == "cuda")
    suite = build_suite(args, tokenizer) if env.master else None
    metrics_log, batches, skipped = MetricsLog(args, env, total, position, scheduler), endless(loader, position), 0
    model.train()
    while position.step < total:
        metrics = train_step(args, env, parts, next_batch(batches, args, env))
        skipped = check_finite(metrics is not None, skipped, args, env, position.step)
        if metrics is None:
            continue
        position.step += 1
        metrics_log.step(metrics)
        if position.step % args.save_every == 0 or position.step == total:
            save(args, env, model, optimizer, scheduler, position, model_config=config,
                 tokenizer=tokenizer.to_dict(), tower3=tower3.source if tower3 is not None else None,
                 tower3_digest=tower3_digest)
        if args.eval_every and position.step % args.eval_every == 0 and position.step < total:
            periodic_eval(args, env, model, tower3, suite, metrics_log)
    final = periodic_eval(args, env, model, tower3, suite, metrics_log)
    metrics_log.close()
    env.barrier()
    return final


# ----------------------------------------------------------------------------------------------
# Pretraining a third tower: --mode supervised, its own short loop
# ----------------------------------------------------------------------------------------------
def pretrain(args: argparse.Namespace, env: Env) -> dict[str, float]:
    """Train an image classifier with cross-entropy -- on the shapes world's object or scene labels,
    or an ImageFolder -- to serve later as a frozen third tower (`--tower3 CKPT`, or `--tower3
    auto`). The same optimiser, schedule, checkpoints and resume as `run`. Returns the held-out
    accuracy (shapes only)."""
    claim_folders(args, env)
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    dataset = data.make_labelled_dataset(args.train_data, "pretrain", label=args.label, image_size=args.image_size,
                                         num_samples=args.train_samples, seed=args.seed, crop_scale=args.crop_scale,
                                         flip=args.flip, max_image_pixels=args.max_image_pixels,
                                         max_file_bytes=args.max_file_bytes)
    classnames = list(getattr(dataset, "classnames", getattr(dataset, "classes", [])))
    model = build_image_tower(args.image_arch, args.image_size, len(classnames), bias=True).to(env.device)
    config = {"arch": args.image_arch, "image_size": args.image_size, "num_classes": len(classnames),
              "classnames": classnames}
    torch.manual_seed(args.seed + env.rank)
    log(env, f"[supervised] {env.world} process(es) on {env.device.type}; data {args.train_data!r}; classifier "
             f"{args.image_arch}: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer, scheduler, total = schedule(args, env, model, dataset)
    ckpt = find_checkpoint(args)
    check_resumable(ckpt, config)
    position = resume(env, ckpt, model, optimizer, scheduler)
    forward = wrap(model, args, env)
    loader = data.make_loader(dataset, args.batch_size, workers=env.workers(args), rank=env.rank,
                              world_size=env.world, seed=args.seed, start_batch=position.batch,
                              pin_memory=env.device.type == "cuda")
    metrics_log, batches, skipped = MetricsLog(args, env, total, position, scheduler), endless(loader, position), 0
    model.train()
    while position.step < total:
        batch = next_batch(batches, args, env)
        labels = batch["label"].to(env.device, non_blocking=True)
        with autocast(args, env):
            logits = forward(batch["image"].to(env.device, non_blocking=True)).float()
        loss = F.cross_entropy(logits, labels)
        ok = apply_gradients(model, optimizer, scheduler, loss, args.grad_clip)
        skipped = check_finite(ok, skipped, args, env, position.step)
        if not ok:
            continue
        position.step += 1
        metrics_log.step({"loss": loss.detach(), "acc/train": (logits.argmax(1) == labels).float().mean()})
        if position.step % args.save_every == 0 or position.step == total:
            save(args, env, model, optimizer, scheduler, position, classifier=config)
    results = {}
    if env.master and args.eval_data != "none" and args.train_data == "shapes":
        held_out = data.make_labelled_dataset("shapes", "test", label=args.label, image_size=args.image_size,
                                              num_samples=args.eval_images, seed=args.seed)
        results = {"test/top1": classifier_accuracy(model, held_out, env.device)}
        log(env, f"[eval] step {position.step}: held-out {args.label} accuracy {100 * results['test/top1']:.1f}%")
        metrics_log.write({"step": position.step, "eval": results})
    metrics_log.close()
    env.barrier()
    return results


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, dataset, device: torch.device) -> float:
    model.eval()
    correct = 0
    for batch in data.make_loader(dataset, 256, shuffle=False, drop_last=False):
        correct += (model(batch["image"].to(device)).argmax(1).cpu() == batch["label"]).sum().item()
    model.train()
    return correct / len(dataset)


# ----------------------------------------------------------------------------------------------
# Evaluation during and after training (eval.py holds the tasks; rank 0 runs them on the raw model)
# ----------------------------------------------------------------------------------------------
def build_suite(args: argparse.Namespace, tokenizer: data.Tokenizer):
    """The held-out zero-shot and retrieval tasks of eval.py, built once (shapes world only)."""
    if args.eval_data == "none" or args.train_data != "shapes":
        return None
    import eval as evaluation
    return evaluation.build_eval_suite("shapes", tokenizer=tokenizer, image_size=args.image_size,
                                       num_images=args.eval_images, seed=args.seed)


def periodic_eval(args: argparse.Namespace, env: Env, model: ThreeTowers, tower3: FrozenTower | None, suite,
                  metrics_log: MetricsLog) -> dict[str, float]:
    """Evaluate on rank 0 while the other ranks wait; log a line and a JSONL record."""
    results: dict[str, float] = {}
    if env.master and suite is not None:
        import eval as evaluation
        alphas = (1.0, 0.5, 0.0) if args.mode == "3t" else (1.0,)
        with autocast(args, env):
            results = evaluation.evaluate(model, tower3, suite, device=env.device, alphas=alphas)
        shown = {k: v for k, v in results.items() if k.endswith(("top1", "R@1")) and "@" not in k.split("/")[0]}
        log(env, f"[eval] step {metrics_log.position.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        metrics_log.write({"step": metrics_log.position.step, "eval": results})
    env.barrier()
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Entry point for `python train.py`, `torchrun train.py` and tests (`main([...])`)."""
    args = parse_args(argv)
    env = Env()
    try:
        return pretrain(args, env) if args.mode == "supervised" else run(args, env)
    finally:
        env.close()


if __name__ == "__main__":
    main()
