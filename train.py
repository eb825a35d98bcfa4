"""Train CLIP, LiT or Three Towers (3T) -- or pretrain a third tower -- from one command.

    python train.py --mode 3t                                       # one process, CPU or GPU
    torchrun --standalone --nproc_per_node=2 train.py --mode 3t      # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-backend=c10d
             --rdzv-endpoint=HOST:29500 train.py --mode 3t ...        # many nodes (one line)

One step is `train_step` and the loop is `run`, both at the top: data -> (cached) frozen tower h ->
towers f, g and heads under DDP -> losses.tower_loss -> AdamW. What 3T changes relative to CLIP is
only which embeddings the loss compares (losses.PAIRS) and that the frozen tower's embeddings enter
the batch (Sec. 3 of Kossen et al. 2023). What every run needs besides the method (processes,
checkpoints and resume, the optimiser's update, the metrics log) is runtime.py. `--mode supervised`
(`pretrain`, its own short loop) trains an image classifier whose checkpoint `--tower3` loads as a
pretrained third tower (Sec. 4: JFT, ImageNet-21k or Places365 classifiers); that is how an offline
user gets one. Below the loops: the flags, what a run is built from, the third tower and its cache,
evaluation during training, and `main`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

import data
import eval as evaluation
import shapes
from losses import PAIRS, default_weights, tower_loss
from model import (CNN_PRESETS, IMAGE_ARCHS, TEXT_PRESETS, VIT_PRESETS, FrozenTower, ThreeTowers, build_image_tower,
                   load_tower3, normalize, read_checkpoint, summary)
from runtime import (DIST_TIMEOUT, Env, MetricsLog, RunError, StepBatches,
                     apply_gradients, autocast, check_ranges, check_resumable, checkpoint_to,
                     claim_folders, endless, every_rank, find_checkpoint, log, one_line, resume,
                     save, schedule, sync_step, take_lock, tower3_cache, uses_tower3_cache, wrap,
                     write_file)
from shapes import ShapesLabelled
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------
# The step and the run of CLIP, LiT and 3T
# ----------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a training step touches, built once by `run`."""
    model: ThreeTowers                  # the raw model: clipping, temperature clamp, checkpoints,
                                        # eval, and the no-grad pass of --accum-freq
    forward: torch.nn.Module            # what the step calls: the model, in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tower3: FrozenTower | None          # h, run every step on the batch's 'image_h' when it is not cached
    weights: dict[str, float]           # weight of each loss term of losses.PAIRS[mode]


def train_step(args: argparse.Namespace, env: Env, parts: Parts, batches: list[dict]
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step of CLIP, LiT or 3T over the contrastive batch of `batches` (--accum-freq
    micro-batches per rank): the frozen tower's embeddings (read from the cache, or h under no_grad
    outside DDP), the trainable towers under DDP, losses.tower_loss, backward, then `apply_gradients`
    and the temperature clamp. Returns the step's metrics and whether its gradient was finite (a 0-d
    tensor on the device: a non-finite step made no update, on every rank alike)."""
    parts.optimizer.zero_grad(set_to_none=True)
    inputs = [step_inputs(args, env, parts, batch) for batch in batches]
    if len(inputs) == 1:
        with autocast(args, env):
            loss, metrics = tower_loss(parts.forward(*inputs[0]), args.mode, parts.weights)
        loss.backward()
    else:
        loss, metrics = accumulated_backward(args, env, parts, inputs)
    finite = apply_gradients(parts.model, parts.optimizer, parts.scheduler, args.grad_clip)
    parts.model.clamp_temperatures_()
    return {"loss": loss.detach(), **metrics}, finite


def run(args: argparse.Namespace, env: Env) -> dict[str, float]:
    """Train CLIP, LiT or 3T on the processes of env: data -> frozen tower h (cached) -> towers f, g
    and heads under DDP -> losses.tower_loss -> AdamW. Returns the final evaluation."""
    claim_folders(args, env)
    ckpt = find_checkpoint(args)
    tower3 = resolve_tower3(args, env) if args.mode != "clip" else None
    tower3_digest = tower3.digest() if tower3 is not None else None
    cached = uses_tower3_cache(args, env)
    dataset = pairs_dataset(args, env, None if cached else tower3)      # h's view in the items: h runs every step
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
    if args.grad_checkpointing:
        log(env, f"[memory] activation checkpointing of {', '.join(model.set_grad_checkpointing()) or 'no blocks'}")
    h_rows = tower3_cache(args, env, tower3, data.with_tower3_view(dataset, tower3.view)) if cached else None
    parts = Parts(model, wrap(model, args, env), optimizer, scheduler, tower3, weights)
    loader = data.make_loader(dataset, args.batch_size, tokenizer=tokenizer, workers=env.workers(args), rank=env.rank,
                              world_size=env.world, seed=args.seed, start_batch=position.batch,
                              pin_memory=env.device.type == "cuda", rows=h_rows)
    suite = build_suite(args, env, tokenizer)
    metrics_log, batches = MetricsLog(args, env, total, position, scheduler), StepBatches(endless(loader, position), args, env)
    first = position.step
    model.train()
    while position.step < total:
        sync = sync_step(position.step, first, total, args)     # the host reads device values only here
        metrics, finite = train_step(args, env, parts, batches.take(args.accum_freq, agree=sync))
        position.step += 1
        metrics_log.step(metrics, finite, sync)
        if position.step % args.save_every == 0 or position.step == total:
            save(args, env, model, optimizer, scheduler, position, model_config=config,
                 tokenizer=tokenizer.to_dict(), tower3=tower3.source if tower3 is not None else None,
                 tower3_digest=tower3_digest, tower3_view=dataclasses.asdict(tower3.view) if tower3 else None)
        if args.eval_every and position.step % args.eval_every == 0 and position.step < total:
            periodic_eval(args, env, model, tower3, suite, metrics_log)
    final = periodic_eval(args, env, model, tower3, suite, metrics_log)
    metrics_log.close()
    if env.master:                     # curves.png from metrics.jsonl; a drawing failure only warns
        evaluation.write_curves(args.out)
    env.barrier()
    return final


def step_inputs(args: argparse.Namespace, env: Env, parts: Parts, batch: dict
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """ThreeTowers.forward's (image, text, h) of a batch, on the device: h's cached rows ('h'), or the
    frozen tower run on its own view ('image_h'). The loader made every tensor final (uint8 images,
    trimmed token ids, h's rows; pinned on CUDA), so each is one asynchronous copy: no host wait."""
    image = batch["image"].to(env.device, non_blocking=True) if args.mode != "lit" else None
    text = batch["text"].to(env.device, non_blocking=True)
    h = batch["h"].to(env.device, non_blocking=True) if "h" in batch else None
    if h is None and parts.tower3 is not None:
        with autocast(args, env):
            h = parts.tower3(batch["image_h"].to(env.device, non_blocking=True))
    return image, text, h


def accumulated_backward(args: argparse.Namespace, env: Env, parts: Parts, inputs: list[tuple]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gradient accumulation that keeps the contrastive batch whole: the loss of K micro-batches of B
    per rank is the loss of ONE batch of K x B (x world size), every micro-batch's embeddings the
    negatives of every other's; the gradient is that batch's too, at the activation memory of B.
    Splitting the loss per micro-batch instead would shrink the negatives K-fold. With the feature
    cache of Gao et al. 2021 ("Scaling deep contrastive learning batch size under memory limited
    setup"; also open_clip's --accum-freq):
      1. embed every micro-batch without activations (no_grad; BatchNorm statistics kept as they were);
      2. the loss of the whole batch on these embeddings, and its gradient w.r.t. each embedding and
         temperature (one gather of the global batch, as without accumulation);
      3. per micro-batch: embed again with activations and backpropagate its rows of that gradient,
         under DDP's no_sync but for the last (one gradient all-reduce per step). The temperatures
         take 1/K of theirs in each pass, so every parameter has a gradient in every pass."""
    saved = [b.clone() for b in parts.model.buffers()]
    with torch.no_grad(), autocast(args, env):        # the raw model: nothing to synchronise
        cached = [parts.model(*x) for x in inputs]
    with torch.no_grad():
        for b, s in zip(parts.model.buffers(), saved):             # the recompute updates them once
            b.copy_(s)
    scalar = lambda k: k.startswith(("t_", "b_"))                  # temperatures and sigmoid biases
    leaves = {k: (torch.cat([c[k] for c in cached]) if not scalar(k) else v).detach().requires_grad_()
              for k, v in cached[0].items()}
    loss, metrics = tower_loss(leaves, args.mode, parts.weights)
    loss.backward()
    rows = [len(x[1]) for x in inputs]
    for i, x in enumerate(inputs):
        last = i == len(inputs) - 1
        with parts.forward.no_sync() if hasattr(parts.forward, "no_sync") and not last else contextlib.nullcontext():
            with autocast(args, env):
                out = parts.forward(*x)
            pulled = [(out[k] * (g.grad / len(inputs) if scalar(k) else g.grad.split(rows)[i])).sum()
                      for k, g in leaves.items() if g.grad is not None and out[k].requires_grad]
            torch.stack(pulled).sum().backward()
    return loss.detach(), metrics


# ----------------------------------------------------------------------------------------------
# --mode supervised: pretraining a third tower, a classifier trained with cross-entropy (Sec. 4)
# ----------------------------------------------------------------------------------------------
def pretrain(args: argparse.Namespace, env: Env) -> dict[str, float]:
    """Train an image classifier with cross-entropy -- on the shapes world's object or scene labels,
    or an ImageFolder -- to serve later as a frozen third tower (`--tower3 CKPT`, or `--tower3
    auto`). The same optimiser, schedule, checkpoints and resume as `run`. Returns the held-out
    accuracy (shapes only)."""
    claim_folders(args, env)
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    dataset = labelled_dataset(args)
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
    metrics_log, batches = MetricsLog(args, env, total, position, scheduler), StepBatches(endless(loader, position), args, env)
    first = position.step
    model.train()
    while position.step < total:
        sync = sync_step(position.step, first, total, args)
        batch = batches.take(1, agree=sync)[0]
        labels = batch["label"].to(env.device, non_blocking=True)
        with autocast(args, env):
            logits = forward(normalize(batch["image"].to(env.device, non_blocking=True))).float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = apply_gradients(model, optimizer, scheduler, args.grad_clip)
        position.step += 1
        metrics_log.step({"loss": loss.detach(), "acc/train": (logits.argmax(1) == labels).float().mean()}, finite, sync)
        if position.step % args.save_every == 0 or position.step == total:
            save(args, env, model, optimizer, scheduler, position, classifier=config)
    results = {}
    if env.master and args.eval_data != "none" and args.train_data == "shapes":
        held_out = ShapesLabelled("test", args.eval_images, label=args.label, seed=args.seed, image_size=args.image_size)
        results = {"test/top1": classifier_accuracy(model, held_out, env.device)}
        log(env, f"[eval] step {position.step}: held-out {args.label} accuracy {100 * results['test/top1']:.1f}%")
        metrics_log.write({"step": position.step, "eval": results})
    metrics_log.close()
    if env.master:                     # curves.png from metrics.jsonl; a drawing failure only warns
        evaluation.write_curves(args.out)
    env.barrier()
    return results


def labelled_dataset(args: argparse.Namespace) -> Dataset:
    """The labelled images --train-data names: the shapes world's --label labels (its 'pretrain' split), or an
    ImageFolder root whose class folders are the labels (a seeded subset of --train-samples images if given).
    ImageFolder images get random crops of at least --crop-scale of the area (0.08: Inception-style; 1: resize
    and centre crop) and, with --flip, horizontal flips: small sets learn faster with less augmentation."""
    if args.train_data == "shapes":
        return ShapesLabelled("pretrain", args.train_samples, label=args.label, seed=args.seed, image_size=args.image_size)
    size = args.image_size
    crop = [v2.RandomResizedCrop(size, scale=(args.crop_scale, 1.0), antialias=True)] if args.crop_scale < 1 else \
        [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    transform = v2.Compose(crop + [v2.RandomHorizontalFlip()] * args.flip)     # uint8: normalised on the device
    images = data.image_folder(args.train_data, transform, train=True, seed=args.seed)
    images.max_image_pixels, images.max_file_bytes = args.max_image_pixels, args.max_file_bytes
    if args.train_samples is not None and args.train_samples < len(images):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(images), args.train_samples, replace=False))
        images.targets, images.paths = [images.targets[i] for i in keep], [images.paths[i] for i in keep]
    return images


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, dataset, device: torch.device) -> float:
    """Top-1 accuracy of the classifier on labelled images: how well the tower knows its labels."""
    model.eval()
    correct = 0
    for batch in data.make_loader(dataset, 256, shuffle=False, drop_last=False):
        correct += (model(normalize(batch["image"].to(device))).argmax(1).cpu() == batch["label"]).sum().item()
    model.train()
    return correct / len(dataset)



# ----------------------------------------------------------------------------------------------
# Flags. Defaults are the CPU preset: the embedded shapes world, small towers, minutes on 2 cores.
# ----------------------------------------------------------------------------------------------
SHAPES_TRAIN_SAMPLES = 40_000     # --train-samples on the shapes world; files are used whole


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, in the groups --help shows, then checked and completed (finish_args)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", default="3t", choices=["clip", "lit", "3t", "supervised"],
      help="clip: f,g from scratch; lit: frozen h + text tower; 3t: f,g + third tower h (the paper); "
           "supervised: train an image classifier to use later as --tower3")
    data_flags(p.add_argument_group("data").add_argument)
    tower_flags(p.add_argument_group("towers").add_argument)
    optimisation_flags(p.add_argument_group("loss, optimisation and output").add_argument)
    args = p.parse_args(argv)
    finish_args(p, args)
    check_eval_flags(p, args)
    return args


def data_flags(a: Callable) -> None:
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
      help="DataLoader worker processes per rank (default: 0 on CPU, where extra processes compete for the "
           "same cores; 8 per GPU, capped by the CPU count)")
    a("--eval-data", default="shapes",
      help="periodic evaluation: 'shapes' (the shapes world's held-out tasks, when training on it) or 'none'; "
           "--zeroshot-data / --retrieval-data replace a task's data")
    a("--zeroshot-data", default=None,
      help=f"periodic zero-shot data, as eval.py's: {evaluation.ZEROSHOT_SPECS} or none; CLASSNAMES_FILE has one name per "
           f"line, the k-th naming ROOT's k-th class folder in sorted order (default: --eval-data's)")
    a("--retrieval-data", default=None,
      help=f"periodic retrieval data, as eval.py's: {evaluation.RETRIEVAL_SPECS} (read with --csv-img-key, "
           f"--csv-caption-key, --csv-separator; rows with the same image are one image) or none "
           f"(default: --eval-data's)")
    a("--eval-images", type=int, default=500,
      help="shapes world: images per periodic zero-shot / retrieval evaluation (files are used whole)")


def tower_flags(a: Callable) -> None:
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
    a("--tower3-size", type=int, default=None,
      help="h's input size (its view's centre crop); default: from the tower's source -- torchvision weights' "
           "own preprocessing, a --mode supervised checkpoint's size, else 224 (a state_dict file, a hub model)")
    a("--tower3-resize", type=int, default=None,
      help="h's view: the short side is resized to this before the crop (default: the source's, else 256)")
    a("--tower3-interpolation", default=None, choices=["bilinear", "bicubic"],
      help="h's view: resize interpolation (default: the source's, else bilinear)")
    a("--tower3-mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
      help="h's view: per-channel mean of the [0, 1] pixels (default: the source's, else ImageNet's)")
    a("--tower3-std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
      help="h's view: per-channel std (default: the source's, else ImageNet's)")
    a("--tower3-label", default="object", choices=["object", "scene"], help="labels of the auto-pretrained tower")
    a("--tower3-steps", type=int, default=400, help="steps of the auto-pretrained tower")
    a("--tower3-batch-size", type=int, default=64, help="per rank, for the auto-pretrained tower")
    a("--no-tower3-heads", action="store_true",
      help="3t: drop the heads h_f, h_g on the frozen embedding; f_h, g_h then map straight into D_h")
    a("--cache-tower3", action=argparse.BooleanOptionalAction, default=True,
      help="compute the frozen tower's embeddings of a finite dataset once and reuse them (LiT Sec. 5.6)")
    a("--cache-dir", default="cache", help="where third-tower caches and auto-pretrained towers live")


def optimisation_flags(a: Callable) -> None:
    a("--loss", default="softmax", choices=["softmax", "sigmoid"],
      help="softmax: the paper's contrastive loss; sigmoid: SigLIP's pairwise loss (an extension)")
    a("--loss-weights", default=None,
      help="3t: weights of the terms fg,fh,gh, e.g. '0.5,0.25,0.25' (default 1/3 each, Eq. 2)")
    a("--init-temperature", type=float, default=10.0, help="initial t = exp(s) of every term (clamped at 100)")
    a("--batch-size", type=int, default=128,
      help="per rank and forward pass; the contrastive batch is batch-size x accum-freq x world size")
    a("--accum-freq", type=int, default=1,
      help="micro-batches of --batch-size per optimiser step, one contrastive batch: every micro-batch's "
           "embeddings are negatives of every other's, at the activation memory of one (feature cache, "
           "accumulated_backward); ~1/3 more compute. Exact for GroupNorm/LayerNorm towers (ViTs, text); "
           "BatchNorm towers (cnn-*, resnets) normalise per micro-batch")
    a("--grad-checkpointing", action="store_true",
      help="recompute the ViT and text blocks' activations in backward: less memory, ~1/3 more compute; "
           "same gradients (conv towers have no blocks to checkpoint)")
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
    a("--compile", action="store_true",
      help="torch.compile the towers (after DDP, so that gradient all-reduces overlap backward)")
    a("--dist-timeout", type=float, default=DIST_TIMEOUT,
      help="seconds a rank waits for the others -- in a collective, or where ranks drift apart "
           "(building the h cache, rank 0 waiting for the auto tower's lock) -- before the run "
           f"stops with one line naming the phase (default {DIST_TIMEOUT:g}; NCCL's own is 600)")
    a("--seed", type=int, default=0, help="seeds the towers, the data order and the shapes world")
    a("--out", default=None, help="run folder (default runs/<mode>-s<seed>)")
    a("--resume", default=None, help="'latest' (the run folder's ckpt.pt, if any) or a checkpoint path")
    a("--save-every", type=int, default=200, help="write ckpt.pt every N steps (and at the end)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--log-every", type=int, default=10, help="write averaged metrics to metrics.jsonl every N steps")
    a("--quiet", action="store_true", help="no progress bar")


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """p.error naming the first flag out of its range (RANGES) or at odds with another; then the defaults
    that depend on other flags (--out, --context-length, --train-samples) and the parsed --loss-weights."""
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
    tar = data.streamed(args.train_data, args.mode)
    if args.train_samples is not None and tar:
        p.error(f"--train-samples {args.train_samples}: tar shards are streamed whole; select fewer shards")
    if args.caption_noise > 0 and tar:
        p.error(f"--caption-noise {args.caption_noise:g}: only for the shapes world and CSV files, not tar shards")
    if args.train_data == "shapes" and args.train_samples is None:
        args.train_samples = SHAPES_TRAIN_SAMPLES
    if args.tower3 == "auto" and args.mode in ("lit", "3t") and args.train_data != "shapes":
        p.error(f"--tower3 auto only works with --train-data shapes; for {args.train_data!r} give e.g. "
                f"--tower3 torchvision:resnet50:IMAGENET1K_V2")
    if args.mode == "supervised" and (args.accum_freq > 1 or args.grad_checkpointing):
        p.error("--accum-freq and --grad-checkpointing apply to the contrastive modes clip, lit and 3t, "
                "not --mode supervised")
    if args.train_data == "shapes" and args.image_size < shapes.MIN_IMAGE_SIZE:
        p.error(f"--image-size {args.image_size}: expected at least {shapes.MIN_IMAGE_SIZE} with --train-data shapes "
                f"(the shapes world renders no smaller)")
    patch = VIT_PRESETS.get(args.image_arch, [1])[0]
    if args.image_size % patch:
        p.error(f"--image-size {args.image_size}: expected a multiple of {args.image_arch}'s patch size {patch}")


def check_eval_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """p.error naming --zeroshot-data or --retrieval-data when its data cannot work (evaluation.check_source: the
    syntax, missing folders or files, a class-name file that does not name the class folders), before any work."""
    for flag, task in (("zeroshot_data", "zeroshot"), ("retrieval_data", "retrieval")):
        spec = getattr(args, flag)
        if spec is None or spec == "none":
            continue
        name = "--" + flag.replace("_", "-")
        if args.mode == "supervised":
            p.error(f"{name} {spec}: only for clip, lit and 3t runs (--mode supervised scores held-out labels)")
        try:
            evaluation.check_source(task, spec)
        except (OSError, ValueError) as e:
            p.error(f"{name} {spec}: {' '.join(str(e).split())}")


# The range of every numeric flag, checked once at parse time: [a, b] closed, (a, b) open. NaN and
# inf fall outside all of them; a flag left at its default None is not checked.
RANGES = {"train_samples": "[1, inf)", "caption_noise": "[0, 1]", "max_bad_fraction": "[0, 1]",
          "workers": "[0, inf)", "eval_images": "[1, inf)", "image_size": "[1, inf)", "vocab_size": "[259, inf)",
          "context_length": "[3, inf)", "embed_dim": "[1, inf)", "tower3_steps": "[1, inf)", "tower3_batch_size": "[1, inf)",
          "init_temperature": "(0, 100]", "batch_size": "[1, inf)", "steps": "[1, inf)", "epochs": "(0, inf)",
          "lr": "(0, inf)", "wd": "[0, inf)", "beta2": "[0, 1)", "warmup": "[0, inf)", "grad_clip": "[0, inf)",
          "max_nonfinite": "[1, inf)", "accum_freq": "[1, inf)", "seed": "[0, inf)", "save_every": "[1, inf)", "eval_every": "[0, inf)",
          "log_every": "[1, inf)", "max_image_pixels": "[1, inf)", "max_file_bytes": "[1, inf)",
          "crop_scale": "(0, 1]", "tower3_size": "[1, inf)", "tower3_resize": "[1, inf)",
          "tower3_mean": "(-inf, inf)", "tower3_std": "(0, inf)", "dist_timeout": "(0, inf)"}



# ----------------------------------------------------------------------------------------------
# What a run is built from: its pairs, its tokenizer, its model's configuration
# ----------------------------------------------------------------------------------------------
def pairs_dataset(args: argparse.Namespace, env: Env, tower3: FrozenTower | None):
    """The image-text pairs --train-data names: the shapes world, a CSV/TSV of image paths and captions, or tar
    shards (data.py). Given the third tower that runs every step, items also carry its own view ('image_h',
    data.tower3_view). Logs how much of the data is used."""
    h_view = tower3.view if tower3 is not None else None
    limits = dict(max_image_pixels=args.max_image_pixels, max_file_bytes=args.max_file_bytes)
    if args.train_data == "shapes":
        dataset = shapes.ShapesPairs("train", args.train_samples, seed=args.seed, image_size=args.image_size,
                                     tower3_view=h_view, caption_noise=args.caption_noise)
    elif args.train_data.lower().endswith((".csv", ".tsv")):
        dataset = data.CsvPairs(args.train_data, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                                separator=args.csv_separator, image_size=args.image_size, tower3_view=h_view,
                                num_samples=args.train_samples, caption_noise=args.caption_noise, seed=args.seed, **limits)
    else:
        dataset = data.TarShards(args.train_data, rank=env.rank, world_size=env.world, seed=args.seed,
                                 image_size=args.image_size, tower3_view=h_view,
                                 max_bad_fraction=args.max_bad_fraction, **limits)
    used = getattr(dataset, "summary", None) or (f"{len(dataset):,} pairs" if hasattr(dataset, "__len__") else
                                                 f"{len(dataset.shards)} shards, streamed whole")
    log(env, f"[data] {args.train_data}: {used}")
    return dataset


VOCAB_CAPTIONS = 20_000   # captions that BPE merges are learned from


def build_tokenizer(args: argparse.Namespace, env: Env, dataset, ckpt: dict | None) -> Tokenizer:
    """The run's tokenizer: a resumed run's own; else bytes, or BPE merges learned from the captions of
    the training data (deterministic, so every rank learns the same). Written to tokenizer.json and
    into every checkpoint, so evaluation and resumed runs tokenise exactly as training did."""
    if ckpt is not None:
        try:
            tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
        except (KeyError, ValueError) as e:
            raise RunError(f"--resume {ckpt['path']!r}: its stored tokenizer does not load ({one_line(e)})") from None
    elif args.tokenizer == "bytes":
        tokenizer = Tokenizer(args.context_length)
    else:
        tokenizer = Tokenizer.learn(dataset.sample_captions(VOCAB_CAPTIONS), args.vocab_size, args.context_length)
    if env.master:
        write_file(os.path.join(args.out, "tokenizer.json"), json.dumps(tokenizer.to_dict()).encode(), "--out")
    log(env, f"[tokenizer] {args.tokenizer if ckpt is None else 'from the checkpoint'}: {tokenizer.vocab_size} "
             f"tokens, context {tokenizer.context_length}")
    return tokenizer


def model_config(args: argparse.Namespace, tokenizer: Tokenizer, tower3: FrozenTower | None) -> dict:
    """ThreeTowers' arguments, as stored in checkpoints so eval.py rebuilds the same model."""
    return dict(mode=args.mode, image_arch=args.image_arch, image_size=args.image_size, text_arch=args.text_arch,
                vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length, eos_id=tokenizer.EOS,
                embed_dim=args.embed_dim, tower3_dim=tower3.dim if tower3 else None,
                tower3_heads=not args.no_tower3_heads, init_temperature=args.init_temperature, loss=args.loss)



# ----------------------------------------------------------------------------------------------
# The third tower h: its source (auto-pretrained on the shapes world) and its cached embeddings
# ----------------------------------------------------------------------------------------------
def resolve_tower3(args: argparse.Namespace, env: Env) -> FrozenTower:
    """Load h from --tower3; 'auto' pretrains one on the shapes world first (see auto_tower3)."""
    spec = auto_tower3(args, env) if args.tower3 == "auto" else args.tower3
    try:
        tower3 = load_tower3(spec, tower3_view_flags(args)).to(env.device)
    except (ValueError, OSError, RuntimeError) as e:      # wrong file, wrong weights, offline download
        raise SystemExit(" ".join(str(e).split())[:500]) from None
    v = tower3.view
    log(env, f"[tower3] {spec}: D_h = {tower3.dim}; view: short side {v.resize} ({v.interpolation}), centre crop "
             f"{v.crop}, mean {v.mean}, std {v.std}; "
             + (f"head {tower3.head} removed" if tower3.head else "no known classification head: taken whole")
             + "; frozen")
    return tower3


def tower3_view_flags(args: argparse.Namespace) -> dict:
    """The fields of h's view that --tower3-size/-resize/-interpolation/-mean/-std set (data.View); the
    others come from the tower's source (model.load_tower3)."""
    given = dict(crop=args.tower3_size, resize=args.tower3_resize, interpolation=args.tower3_interpolation,
                 mean=args.tower3_mean and tuple(args.tower3_mean), std=args.tower3_std and tuple(args.tower3_std))
    return {k: v for k, v in given.items() if v is not None}
    return tower3


def auto_tower3(args: argparse.Namespace, env: Env) -> str:
    """The default run's third tower: a classifier pretrained by `pretrain` on the shapes world's
    --tower3-label labels, once, then reused from --cache-dir -- a genuinely pretrained tower,
    never a random one. The file name holds everything the tower depends on, including a digest
    of the preset, of the tower's parameter names and shapes and of a rendered image, so a changed preset,
    model layout or world is never reused. Runs that start together with the same --cache-dir pretrain it
    once: the first holds a lock on the file beside the tower (PATH.lock, left in place: a lock file is
    never removed while another run may wait on it), the others wait for it and reuse the tower it wrote."""
    recipe = ["--label", args.tower3_label, "--image-arch", args.image_arch, "--image-size", str(args.image_size),
              "--steps", str(args.tower3_steps), "--batch-size", str(args.tower3_batch_size), "--lr", "4e-3",
              "--warmup", "20", "--seed", str(args.seed)]
    with torch.device("meta"):                    # the parameter layout, without allocating the weights
        tower = build_image_tower(args.image_arch, args.image_size, 1)
    layout = [(k, list(v.shape)) for k, v in tower.state_dict().items()]
    digest = hashlib.sha256(json.dumps([recipe, env.world, shapes.ShapesWorld(args.seed, args.image_size).digest(),
                                        CNN_PRESETS.get(args.image_arch), VIT_PRESETS.get(args.image_arch), layout]
                                       ).encode()).hexdigest()[:8]
    path = os.path.abspath(os.path.join(args.cache_dir, f"tower3-shapes-{args.tower3_label}-{args.image_arch}-"
                                                        f"{args.image_size}px-s{args.seed}-{digest}.pt"))
    if every_rank(env, os.path.exists(path)):
        return path
    with exclusive(f"{path}.lock", env, f"[tower3] another run is pretraining the third tower {path}"):
        if every_rank(env, os.path.exists(path)):
            log(env, f"[tower3] reusing the third tower that another run pretrained meanwhile: {path}")
            return path
        log(env, f"[tower3] no pretrained third tower yet: pretraining one on the shapes world's "
                 f"'{args.tower3_label}' labels ({' '.join(recipe)}); it is saved to {path} and reused by later runs")
        folder = path[:-3]
        pretrain(parse_args(["--mode", "supervised", *recipe, "--workers", str(env.workers(args)), "--eval-images",
                             str(args.eval_images), "--out", folder, "--resume", "latest"]
                            + (["--quiet"] if args.quiet else [])), env)
        if env.master:   # a slim copy, written only once pretraining has finished
            ckpt = read_checkpoint(os.path.join(folder, "ckpt.pt"))
            checkpoint_to(path, {k: ckpt[k] for k in ("format", "mode", "classifier", "model", "args")}, "--cache-dir")
        env.barrier()
    return path


@contextlib.contextmanager
def exclusive(lock_path: str, env: Env, holder_busy: str) -> Iterator[None]:
    """Rank 0 holds an exclusive flock on `lock_path` for the block; while another run holds it,
    rank 0 says so (`holder_busy` and who) and waits, and the other ranks wait for it through the
    store (Env.phase), not in a collective, for up to --dist-timeout. The kernel drops the lock when
    its holder dies, so a crashed run never blocks the next one; a filesystem that cannot lock stops
    the run with one line (take_lock)."""
    f = open(lock_path, "a+") if env.master else None
    try:
        with env.phase("waiting for the third tower's lock") as meet:
            if f is not None and not take_lock(f, "--cache-dir", os.path.dirname(lock_path)):
                f.seek(0)
                log(env, f"{holder_busy} ({f.read().strip() or 'holder unknown'}): waiting for it")
                fcntl.flock(f, fcntl.LOCK_EX)
            if f is not None:
                f.truncate(0)
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
            meet()
            env.barrier()
        yield
    finally:
        if f is not None:
            f.close()


# ----------------------------------------------------------------------------------------------
# Evaluation during and after training (eval.py builds the tasks and scores; every rank, the raw model)
# ----------------------------------------------------------------------------------------------
def eval_sources(args: argparse.Namespace) -> tuple[str, str]:
    """The zero-shot and retrieval data of periodic evaluation: --zeroshot-data / --retrieval-data, else
    --eval-data's shapes tasks when training on the shapes world (its held-out split), else none."""
    default = args.eval_data if args.train_data == "shapes" else "none"
    return args.zeroshot_data or default, args.retrieval_data or default


def build_suite(args: argparse.Namespace, env: Env, tokenizer: Tokenizer) -> evaluation.EvalSuite | None:
    """The held-out zero-shot and retrieval tasks (Sec. 5), built once on every rank, since every rank
    embeds a share of them; files are used whole, the shapes world's split 'test' at --eval-images images.
    A source that cannot be read stops every rank with one line naming its flag."""
    suite, problem = evaluation.EvalSuite(tokenizer), None
    for flag, task, spec in zip(("--zeroshot-data", "--retrieval-data"), ("zeroshot", "retrieval"), eval_sources(args)):
        if spec == "none":
            continue
        try:
            part = evaluation.build_eval_suite(spec, tokenizer=tokenizer, image_size=args.image_size, tasks=[task],
                                          num_images=args.eval_images, seed=args.seed,
                                          csv_keys=(args.csv_img_key, args.csv_caption_key, args.csv_separator))
        except (OSError, ValueError) as e:
            problem = problem or f"{flag} {spec}: {' '.join(str(e).split())}"
            continue
        suite.zeroshot.update(part.zeroshot)
        if part.retrieval is not None:
            suite.retrieval, suite.retrieval_tokens = part.retrieval, part.retrieval_tokens
    env.stop_together(problem)
    return suite if suite.zeroshot or suite.retrieval is not None else None


def periodic_eval(args: argparse.Namespace, env: Env, model: ThreeTowers, tower3: FrozenTower | None, suite,
                  metrics_log: MetricsLog) -> dict[str, float]:
    """Evaluate on every rank, each embedding its share of the images and texts (eval.Embedder), so
    no rank idles in a collective while one embeds a large set; rank 0 logs a line and a JSONL
    record. The shares are equal (N/W rows each, give or take one), so the ranks meet in the gather
    without a store meeting first; a collective that fails there still ends in one line naming the
    evaluation (Env.phase)."""
    results: dict[str, float] = {}
    if suite is not None:
        alphas = (1.0, 0.5, 0.0) if args.mode == "3t" else (1.0,)
        try:
            with env.phase(f"evaluation at step {metrics_log.position.step}"), autocast(args, env):
                results = evaluation.evaluate(model, tower3, suite, device=env.device, alphas=alphas, rank=env.rank,
                                              world=env.world, workers=env.workers(args))
        except data.DataError as e:      # every rank raises it (Embedder): an unusable evaluation image
            raise SystemExit(f"evaluation at step {metrics_log.position.step} (--zeroshot-data / --retrieval-data): "
                             f"{e}") from None
        shown = {k: v for k, v in results.items() if k.endswith(("top1", "R@1")) and "@" not in k.split("/")[0]}
        log(env, f"[eval] step {metrics_log.position.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        metrics_log.write({"step": metrics_log.position.step, "eval": results})
    return results



# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Entry point for `python train.py`, `torchrun train.py` and tests (`main([...])`). The project's own
    errors (data.ProjectError: bad data, a checkpoint that does not load, the non-finite stop) end in their
    one line and exit code 1; any other exception is a bug and keeps its traceback."""
    args = parse_args(argv)
    env = Env(args.dist_timeout)
    try:
        return pretrain(args, env) if args.mode == "supervised" else run(args, env)
    except data.ProjectError as e:
        raise SystemExit(f"train.py: error: {one_line(e)}") from None
    finally:
        env.close()


if __name__ == "__main__":
    main()
