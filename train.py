"""Train CLIP, LiT or Three Towers (3T) -- or pretrain a third tower -- from one command.

    python train.py --mode 3t                                       # one process, CPU or GPU
    torchrun --standalone --nproc_per_node=2 train.py --mode 3t      # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-backend=c10d
             --rdzv-endpoint=HOST:29500 train.py --mode 3t ...        # many nodes (one line)

Read `train_step` first: one optimiser step, from a batch to the update, and every function it
runs is in this file, model.py or losses.py -- the frozen tower h (or its cached rows), the towers
f and g with their heads (model.ThreeTowers), the loss L_3T (losses.tower_loss), backward, then
`adamw_update`: gradient clipping, AdamW with its non-finite skip, the warm-up + cosine schedule,
and the temperature clamp. What 3T changes relative to CLIP is only which embeddings the loss
compares (losses.PAIRS) and that h's embeddings enter the batch (Sec. 3 of Kossen et al. 2023).
Then `run`, the loop around it. What a run needs besides the method (processes, run folders and
locks, checkpoints and resume, the h cache, the metrics log) sits behind one call each in
runtime.py; the flags are in flags.py. `--mode supervised` (`pretrain`, its own short loop)
trains an image classifier that `--tower3` loads as a pretrained third tower (Sec. 4: JFT,
ImageNet-21k or Places365 classifiers); that is how an offline user gets one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

import data
import eval as evaluation
import flags
import shapes
from checkpoints import load_tower3, read_checkpoint, tower3_digest
from losses import PAIRS, default_weights, tower_loss
from model import (CNN_PRESETS, VIT_PRESETS, FrozenTower, ThreeTowers, build_image_tower,
                   normalize, precision, summary)
from runtime import (Env, MetricsLog, RunError, StepBatches, check_resumable, checkpoint_to,
                     claim_folders, endless, every_rank, exclusive, find_checkpoint, log, one_line,
                     resume, save, sync_step, tower3_cache, uses_tower3_cache, wrap, write_file)
from shapes import ShapesLabelled
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------
# One step of CLIP, LiT and 3T: batch -> h -> f, g and heads -> L_3T -> backward -> update
# ----------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What a training step touches, built once by `run`."""
    model: ThreeTowers        # the raw model: clipping, temperature clamp, checkpoints, eval,
                              # and the no-grad pass of --accum-freq
    forward: torch.nn.Module  # what the step calls: the model, in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tower3: FrozenTower | None  # h, run every step on the batch's 'image_h' when not cached
    weights: dict[str, float]   # weight of each loss term of losses.PAIRS[mode]


def train_step(args: argparse.Namespace, env: Env, parts: Parts, batches: list[dict]
               ) -> tuple[dict[str, Tensor], Tensor]:
    """One optimiser step of CLIP, LiT or 3T over the contrastive batch of `batches` (--accum-freq
    micro-batches per rank): h's embeddings (cached rows, or h under no_grad outside DDP), the
    trainable towers under DDP, L_3T (losses.tower_loss, Eq. 2), backward, then `adamw_update`
    and the temperature clamp. Returns the step's metrics and whether its gradient was finite (a
    0-d tensor on the device: a non-finite step made no update, on every rank alike)."""
    parts.optimizer.zero_grad(set_to_none=True)
    inputs = [tower_inputs(args, env, parts, batch) for batch in batches]
    if len(inputs) == 1:
        with precision(args.precision, env.device):
            loss, metrics = tower_loss(parts.forward(*inputs[0]), args.mode, parts.weights)
        loss.backward()
    else:
        loss, metrics = accumulated_backward(args, env, parts, inputs)
    finite = adamw_update(parts.model, parts.optimizer, parts.scheduler, args.grad_clip)
    parts.model.clamp_temperatures_()
    return {"loss": loss.detach(), **metrics}, finite


def tower_inputs(args: argparse.Namespace, env: Env, parts: Parts, batch: dict
                 ) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The towers' inputs on the device: the image for f, the token ids for g, and h's embedding
    -- its cached row ('h'), or the frozen tower run on its own view ('image_h'). The loader made
    every tensor final (uint8 images, trimmed ids, h's rows; pinned on CUDA), so each is one
    asynchronous copy and the host never waits."""
    image = batch["image"].to(env.device, non_blocking=True) if args.mode != "lit" else None
    text = batch["text"].to(env.device, non_blocking=True)
    h = batch["h"].to(env.device, non_blocking=True) if "h" in batch else None
    if h is None and parts.tower3 is not None:
        with precision(args.precision, env.device):
            h = parts.tower3(batch["image_h"].to(env.device, non_blocking=True))
    return image, text, h


def accumulated_backward(args: argparse.Namespace, env: Env, parts: Parts, inputs: list[tuple]
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """Gradient accumulation that keeps the contrastive batch whole: the loss of K micro-batches
    of B per rank is the loss of ONE batch of K x B (x world size), every micro-batch's embeddings
    the negatives of every other's; the gradient is that batch's too, at the activation memory of
    B. Splitting the loss per micro-batch instead would shrink the negatives K-fold. With the
    feature cache of Gao et al. 2021 ("Scaling deep contrastive learning batch size under memory
    limited setup"):
      1. embed every micro-batch without activations (no_grad; BatchNorm statistics kept);
      2. the loss of the whole batch on these embeddings, and its gradient w.r.t. each embedding
         and temperature (one gather of the global batch, as without accumulation);
      3. per micro-batch: embed again with activations and backpropagate its rows of that
         gradient, under DDP's no_sync but for the last (one gradient all-reduce per step). The
         temperatures take 1/K of theirs in each pass, so every parameter has a gradient in each."""
    saved = [b.clone() for b in parts.model.buffers()]
    with torch.no_grad(), precision(args.precision, env.device):     # the raw model: no DDP
        cached = [parts.model(*x) for x in inputs]
    with torch.no_grad():
        for b, s in zip(parts.model.buffers(), saved):          # the recompute updates them once
            b.copy_(s)
    scalar = lambda k: k.startswith(("t_", "b_"))               # temperatures and sigmoid biases
    leaves = {k: (torch.cat([c[k] for c in cached]) if not scalar(k) else v).detach()
              .requires_grad_() for k, v in cached[0].items()}
    loss, metrics = tower_loss(leaves, args.mode, parts.weights)
    loss.backward()
    rows = [len(x[1]) for x in inputs]
    for i, x in enumerate(inputs):
        last = i == len(inputs) - 1
        sync = parts.forward.no_sync() if hasattr(parts.forward, "no_sync") and not last \
            else contextlib.nullcontext()
        with sync:
            with precision(args.precision, env.device):
                out = parts.forward(*x)
            pulled = [(out[k] * (g.grad / len(inputs) if scalar(k) else g.grad.split(rows)[i]))
                      .sum() for k, g in leaves.items()
                      if g.grad is not None and out[k].requires_grad]
            torch.stack(pulled).sum().backward()
    return loss.detach(), metrics


# ----------------------------------------------------------------------------------------------
# The update: clipping, AdamW with its non-finite skip, the warm-up + cosine schedule
# ----------------------------------------------------------------------------------------------
def adamw_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, grad_clip: float) -> Tensor:
    """After backward: clip the global gradient norm, AdamW step, schedule step (`lr_factor`).
    Returns whether the gradient was finite, a 0-d bool tensor on the device. A non-finite
    gradient makes no update (the step still counts, as with AMP's loss scaling); the norm is that
    of the all-reduced gradient, so every rank skips the same step. The skip happens on the device
    (fused AdamW's found_inf), so the host never waits for the GPU here: it reads the flag at sync
    steps only (runtime.MetricsLog)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else float("inf"))
    finite = torch.isfinite(norm)
    optimizer.found_inf = (~finite).float()
    optimizer.step()
    scheduler.step()
    return finite


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate's factor at `step`: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay only on weight matrices -- not on biases, norms, embeddings (token,
    positional, class token) or the temperatures/biases of the loss (CLIP, Sec. 2.5). Fused: one
    kernel over every parameter (faster than the multi-tensor path, results/README.md), and the
    AdamW that can skip a step on the device (`adamw_update`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 or "embedding" in name or "class_token" in name
                or name.startswith(("log_temperature", "bias.")))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), eps=1e-6, fused=True)


def schedule(args: argparse.Namespace, env: Env, model: torch.nn.Module, dataset
             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """AdamW, its warm-up + cosine schedule, and the number of steps: --steps, else --epochs over
    a finite dataset. A step reads --accum-freq batches of --batch-size on each rank."""
    accum = args.accum_freq
    per_epoch = (len(dataset) // (args.batch_size * env.world * accum)
                 if hasattr(dataset, "__len__") else None)
    if per_epoch == 0:
        raise SystemExit(
            f"--train-data {args.train_data!r}: no full batch of --batch-size {args.batch_size}: "
            f"{len(dataset)} samples, fewer than one global batch ({args.batch_size} x "
            f"{env.world} processes" + (f" x --accum-freq {accum})" if accum > 1 else ")"))
    if args.steps is None and per_epoch is None:
        raise SystemExit("--steps is required for streaming (tar-shard) data")
    total = args.steps or max(1, int(args.epochs * per_epoch))
    optimizer = build_optimizer(model, args)
    factor = lambda s: lr_factor(s, args.warmup, total)    # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), total


# ----------------------------------------------------------------------------------------------
# The run: data -> h (cached) -> the steps -> checkpoints and evaluation
# ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, env: Env) -> dict[str, float]:
    """Train CLIP, LiT or 3T on the processes of env: data -> frozen tower h (cached) -> towers
    f, g and heads under DDP -> losses.tower_loss -> AdamW. Returns the final evaluation."""
    claim_folders(args, env)
    ckpt = find_checkpoint(args)
    tower3 = resolve_tower3(args, env) if args.mode != "clip" else None
    digest = tower3_digest(tower3) if tower3 is not None else None
    cached = uses_tower3_cache(args, env)
    dataset = pairs_dataset(args, env, None if cached else tower3)   # else h runs every step
    tokenizer = build_tokenizer(args, env, dataset, ckpt)
    config = model_config(args, tokenizer, tower3)
    check_resumable(ckpt, config, digest)
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    model = ThreeTowers(**config).to(env.device)
    torch.manual_seed(args.seed + env.rank)       # after the identical init: per-rank randomness
    log(env, f"[{args.mode}] {env.world} process(es) on {env.device.type}; "
             f"data {args.train_data!r}\n" + summary(model, tower3))
    optimizer, scheduler, total = schedule(args, env, model, dataset)
    position = resume(env, ckpt, model, optimizer, scheduler)
    weights = (dict(zip(PAIRS[args.mode], args.loss_weights)) if args.loss_weights
               else default_weights(args.mode))
    if args.grad_checkpointing:
        stacks = ", ".join(model.set_grad_checkpointing()) or "no blocks"
        log(env, f"[memory] activation checkpointing of {stacks}")
    h_only = data.with_tower3_view(dataset, tower3.view, f_view=False) if cached else None
    h_rows = tower3_cache(args, env, tower3, h_only) if cached else None
    parts = Parts(model, wrap(model, args, env), optimizer, scheduler, tower3, weights)
    loader = data.make_loader(dataset, args.batch_size, tokenizer=tokenizer, rows=h_rows,
                              workers=env.workers(args), rank=env.rank, world_size=env.world,
                              seed=args.seed, start_batch=position.batch,
                              pin_memory=env.device.type == "cuda")
    suite = build_suite(args, env, tokenizer)
    metrics_log = MetricsLog(args, env, total, position, scheduler)
    batches, first = StepBatches(endless(loader, position), args, env), position.step
    model.train()
    while position.step < total:
        sync = sync_step(position.step, first, total, args)   # the host reads the device here only
        metrics, finite = train_step(args, env, parts, batches.take(args.accum_freq, agree=sync))
        position.step += 1
        metrics_log.step(metrics, finite, sync)
        if position.step % args.save_every == 0 or position.step == total:
            save(args, env, model, optimizer, scheduler, position, model_config=config,
                 tokenizer=tokenizer.to_dict(), tower3=tower3 and tower3.source,
                 tower3_digest=digest, tower3_view=tower3 and dataclasses.asdict(tower3.view))
        if args.eval_every and position.step % args.eval_every == 0 and position.step < total:
            periodic_eval(args, env, model, tower3, suite, metrics_log)
    final = periodic_eval(args, env, model, tower3, suite, metrics_log)
    finish(args, env, metrics_log)
    return final


def finish(args: argparse.Namespace, env: Env, metrics_log: MetricsLog) -> None:
    """The end of a run or a pretraining: close the metrics log, draw curves.png from it (rank 0;
    a drawing failure only warns), and wait for every rank."""
    metrics_log.close()
    if env.master:
        evaluation.write_curves(args.out)
    env.barrier()


# ----------------------------------------------------------------------------------------------
# --mode supervised: pretraining a third tower, a classifier trained with cross-entropy (Sec. 4)
# ----------------------------------------------------------------------------------------------
def pretrain(args: argparse.Namespace, env: Env) -> dict[str, float]:
    """Train an image classifier with cross-entropy -- on the shapes world's object or scene
    labels, or an ImageFolder -- to serve later as a frozen third tower (`--tower3 CKPT`, or
    `--tower3 auto`). The same update, schedule, checkpoints and resume as `run`. Returns the
    held-out accuracy (shapes only)."""
    claim_folders(args, env)
    torch.manual_seed(args.seed)                  # identical initial weights on every rank
    dataset = labelled_dataset(args)
    classnames = list(getattr(dataset, "classnames", getattr(dataset, "classes", [])))
    model = build_image_tower(args.image_arch, args.image_size, len(classnames), bias=True)
    model = model.to(env.device)
    config = {"arch": args.image_arch, "image_size": args.image_size,
              "num_classes": len(classnames), "classnames": classnames}
    torch.manual_seed(args.seed + env.rank)
    log(env, f"[supervised] {env.world} process(es) on {env.device.type}; data "
             f"{args.train_data!r}; classifier {args.image_arch}: "
             f"{sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer, scheduler, total = schedule(args, env, model, dataset)
    ckpt = find_checkpoint(args)
    check_resumable(ckpt, config)
    position = resume(env, ckpt, model, optimizer, scheduler)
    forward = wrap(model, args, env)
    loader = data.make_loader(dataset, args.batch_size, workers=env.workers(args), rank=env.rank,
                              world_size=env.world, seed=args.seed, start_batch=position.batch,
                              pin_memory=env.device.type == "cuda")
    metrics_log = MetricsLog(args, env, total, position, scheduler)
    batches, first = StepBatches(endless(loader, position), args, env), position.step
    model.train()
    while position.step < total:
        sync = sync_step(position.step, first, total, args)
        batch = batches.take(1, agree=sync)[0]
        labels = batch["label"].to(env.device, non_blocking=True)
        with precision(args.precision, env.device):
            logits = forward(normalize(batch["image"].to(env.device, non_blocking=True))).float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = adamw_update(model, optimizer, scheduler, args.grad_clip)
        position.step += 1
        accuracy = (logits.argmax(1) == labels).float().mean()
        metrics_log.step({"loss": loss.detach(), "acc/train": accuracy}, finite, sync)
        if position.step % args.save_every == 0 or position.step == total:
            save(args, env, model, optimizer, scheduler, position, classifier=config)
    results = held_out_accuracy(args, env, model, metrics_log)
    finish(args, env, metrics_log)
    return results


def held_out_accuracy(args: argparse.Namespace, env: Env, model: torch.nn.Module,
                      metrics_log: MetricsLog) -> dict[str, float]:
    """The pretrained classifier's top-1 on the shapes world's held-out images (rank 0; logged)."""
    if not (env.master and args.eval_data != "none" and args.train_data == "shapes"):
        return {}
    held_out = ShapesLabelled("test", args.eval_images, label=args.label, seed=args.seed,
                              image_size=args.image_size)
    results = {"test/top1": classifier_accuracy(model, held_out, env.device)}
    step = metrics_log.position.step
    log(env, f"[eval] step {step}: held-out {args.label} accuracy "
             f"{100 * results['test/top1']:.1f}%")
    metrics_log.write({"step": step, "eval": results})
    return results


def labelled_dataset(args: argparse.Namespace) -> Dataset:
    """The labelled images --train-data names: the shapes world's --label labels (its 'pretrain'
    split), or an ImageFolder root whose class folders are the labels (a seeded subset of
    --train-samples images if given). ImageFolder images get random crops of at least
    --crop-scale of the area (0.08: Inception-style; 1: resize and centre crop) and, with --flip,
    horizontal flips: small sets learn faster with less augmentation."""
    if args.train_data == "shapes":
        return ShapesLabelled("pretrain", args.train_samples, label=args.label, seed=args.seed,
                              image_size=args.image_size)
    size = args.image_size
    crop = ([v2.RandomResizedCrop(size, scale=(args.crop_scale, 1.0), antialias=True)]
            if args.crop_scale < 1 else [v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    transform = v2.Compose(crop + [v2.RandomHorizontalFlip()] * args.flip)   # uint8 stays uint8
    images = data.image_folder(args.train_data, transform, train=True, seed=args.seed)
    images.max_image_pixels, images.max_file_bytes = args.max_image_pixels, args.max_file_bytes
    if args.train_samples is not None and args.train_samples < len(images):
        rng = np.random.default_rng(args.seed)
        keep = np.sort(rng.choice(len(images), args.train_samples, replace=False))
        images.targets = [images.targets[i] for i in keep]
        images.paths = [images.paths[i] for i in keep]
    return images


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, dataset, device: torch.device) -> float:
    """Top-1 accuracy of the classifier on labelled images: how well the tower knows its labels."""
    model.eval()
    correct = 0
    for batch in data.make_loader(dataset, 256, shuffle=False, drop_last=False):
        predicted = model(normalize(batch["image"].to(device))).argmax(1).cpu()
        correct += (predicted == batch["label"]).sum().item()
    model.train()
    return correct / len(dataset)


# ----------------------------------------------------------------------------------------------
# What a run is built from: its pairs, its tokenizer, its model's configuration
# ----------------------------------------------------------------------------------------------
def pairs_dataset(args: argparse.Namespace, env: Env, tower3: FrozenTower | None):
    """The image-text pairs --train-data names: the shapes world, a CSV/TSV of image paths and
    captions, or tar shards (data.py). Given the third tower that runs every step, items also
    carry its own view ('image_h', data.tower3_view); LiT's carry no view for f, which it lacks
    (data.with_tower3_view). Logs how much of the data is used."""
    h_view = tower3.view if tower3 is not None else None
    common = dict(image_size=args.image_size, tower3_view=h_view, seed=args.seed)
    limits = dict(max_image_pixels=args.max_image_pixels, max_file_bytes=args.max_file_bytes)
    if args.train_data == "shapes":
        dataset = shapes.ShapesPairs("train", args.train_samples, caption_noise=args.caption_noise,
                                     **common)
    elif args.train_data.lower().endswith((".csv", ".tsv")):
        dataset = data.CsvPairs(args.train_data, img_key=args.csv_img_key,
                                caption_key=args.csv_caption_key, separator=args.csv_separator,
                                num_samples=args.train_samples, caption_noise=args.caption_noise,
                                **common, **limits)
    else:
        dataset = data.TarShards(args.train_data, rank=env.rank, world_size=env.world,
                                 max_bad_fraction=args.max_bad_fraction, **common, **limits)
    if args.mode == "lit":
        dataset = data.with_tower3_view(dataset, h_view, f_view=False)
    used = getattr(dataset, "summary", None) or (
        f"{len(dataset):,} pairs" if hasattr(dataset, "__len__")
        else f"{len(dataset.shards)} shards, streamed whole")
    log(env, f"[data] {args.train_data}: {used}")
    return dataset


VOCAB_CAPTIONS = 20_000   # captions that BPE merges are learned from


def build_tokenizer(args: argparse.Namespace, env: Env, dataset, ckpt: dict | None) -> Tokenizer:
    """The run's tokenizer: a resumed run's own; else bytes, or BPE merges learned from the
    captions of the training data (deterministic, so every rank learns the same). Written to
    tokenizer.json and into every checkpoint, so evaluation and resumed runs tokenise exactly as
    training did."""
    if ckpt is not None:
        try:
            tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
        except (KeyError, ValueError) as e:
            raise RunError(f"--resume {ckpt['path']!r}: its stored tokenizer does not load "
                           f"({one_line(e)})") from None
    elif args.tokenizer == "bytes":
        tokenizer = Tokenizer(args.context_length)
    else:
        tokenizer = Tokenizer.learn(dataset.sample_captions(VOCAB_CAPTIONS), args.vocab_size,
                                    args.context_length)
    if env.master:
        write_file(os.path.join(args.out, "tokenizer.json"),
                   json.dumps(tokenizer.to_dict()).encode(), "--out")
    log(env, f"[tokenizer] {args.tokenizer if ckpt is None else 'from the checkpoint'}: "
             f"{tokenizer.vocab_size} tokens, context {tokenizer.context_length}")
    return tokenizer


def model_config(args: argparse.Namespace, tokenizer: Tokenizer, tower3: FrozenTower | None
                 ) -> dict:
    """ThreeTowers' arguments, as stored in checkpoints so eval.py rebuilds the same model."""
    return dict(mode=args.mode, image_arch=args.image_arch, image_size=args.image_size,
                text_arch=args.text_arch, vocab_size=tokenizer.vocab_size,
                context_length=tokenizer.context_length, eos_id=tokenizer.EOS,
                embed_dim=args.embed_dim, tower3_dim=tower3.dim if tower3 else None,
                tower3_heads=not args.no_tower3_heads, init_temperature=args.init_temperature,
                loss=args.loss)


# ----------------------------------------------------------------------------------------------
# The third tower h: from --tower3, or auto-pretrained on the shapes world (its cache: runtime.py)
# ----------------------------------------------------------------------------------------------
def resolve_tower3(args: argparse.Namespace, env: Env) -> FrozenTower:
    """Load h from --tower3 (checkpoints.load_tower3); 'auto' pretrains one first (auto_tower3)."""
    spec = auto_tower3(args, env) if args.tower3 == "auto" else args.tower3
    try:
        tower3 = load_tower3(spec, tower3_view_flags(args)).to(env.device)
    except (ValueError, OSError, RuntimeError) as e:   # wrong file or weights, offline download
        raise SystemExit(" ".join(str(e).split())[:500]) from None
    v = tower3.view
    head = f"head {tower3.head} removed" if tower3.head else \
        "no known classification head: taken whole"
    log(env, f"[tower3] {spec}: D_h = {tower3.dim}; view: short side {v.resize} "
             f"({v.interpolation}), centre crop {v.crop}, mean {v.mean}, std {v.std}; "
             f"{head}; frozen")
    return tower3


def tower3_view_flags(args: argparse.Namespace) -> dict:
    """The fields of h's view that --tower3-size/-resize/-interpolation/-mean/-std set
    (data.View); the others come from the tower's source (checkpoints.load_tower3)."""
    given = dict(crop=args.tower3_size, resize=args.tower3_resize,
                 interpolation=args.tower3_interpolation,
                 mean=args.tower3_mean and tuple(args.tower3_mean),
                 std=args.tower3_std and tuple(args.tower3_std))
    return {k: v for k, v in given.items() if v is not None}


def auto_tower3(args: argparse.Namespace, env: Env) -> str:
    """The default run's third tower: a classifier pretrained by `pretrain` on the shapes world's
    --tower3-label labels, once, then reused from --cache-dir -- a genuinely pretrained tower,
    never a random one. The file name holds everything the tower depends on, including a digest
    of the preset, of the tower's parameter names and shapes and of a rendered image, so a changed
    preset, model layout or world is never reused. Runs that start together with the same
    --cache-dir pretrain it once: the first holds a lock on PATH.lock (runtime.exclusive), the
    others wait for it and reuse the tower it wrote."""
    recipe = ["--label", args.tower3_label, "--image-arch", args.image_arch,
              "--image-size", str(args.image_size), "--steps", str(args.tower3_steps),
              "--batch-size", str(args.tower3_batch_size), "--lr", "4e-3", "--warmup", "20",
              "--seed", str(args.seed)]
    with torch.device("meta"):             # the parameter layout, without allocating the weights
        tower = build_image_tower(args.image_arch, args.image_size, 1)
    layout = [(k, list(v.shape)) for k, v in tower.state_dict().items()]
    world = shapes.ShapesWorld(args.seed, args.image_size).digest()
    digest = hashlib.sha256(json.dumps([recipe, env.world, world, CNN_PRESETS.get(args.image_arch),
                                        VIT_PRESETS.get(args.image_arch), layout]
                                       ).encode()).hexdigest()[:8]
    name = (f"tower3-shapes-{args.tower3_label}-{args.image_arch}-{args.image_size}px-s{args.seed}"
            f"-{digest}.pt")
    path = os.path.abspath(os.path.join(args.cache_dir, name))
    if every_rank(env, os.path.exists(path)):
        return path
    busy = f"[tower3] another run is pretraining the third tower {path}"
    with exclusive(f"{path}.lock", env, busy):
        if every_rank(env, os.path.exists(path)):
            log(env, "[tower3] reusing the third tower that another run pretrained meanwhile: "
                     + path)
            return path
        log(env, f"[tower3] no pretrained third tower yet: pretraining one on the shapes world's "
                 f"'{args.tower3_label}' labels ({' '.join(recipe)}); it is saved to {path} and "
                 f"reused by later runs")
        folder = path[:-3]
        pretrain(parse_args(["--mode", "supervised", *recipe, "--workers", str(env.workers(args)),
                             "--eval-images", str(args.eval_images), "--out", folder,
                             "--resume", "latest"] + (["--quiet"] if args.quiet else [])), env)
        if env.master:   # a slim copy, written only once pretraining has finished
            ckpt = read_checkpoint(os.path.join(folder, "ckpt.pt"))
            keep = ("format", "mode", "classifier", "model", "args")
            checkpoint_to(path, {k: ckpt[k] for k in keep}, "--cache-dir")
        env.barrier()
    return path


# ----------------------------------------------------------------------------------------------
# Evaluation during and after training (eval.py builds the tasks and scores; every rank)
# ----------------------------------------------------------------------------------------------
def eval_sources(args: argparse.Namespace) -> tuple[str, str]:
    """The zero-shot and retrieval data of periodic evaluation: --zeroshot-data / --retrieval-data,
    else --eval-data's shapes tasks when training on the shapes world (held out), else none."""
    default = args.eval_data if args.train_data == "shapes" else "none"
    return args.zeroshot_data or default, args.retrieval_data or default


def build_suite(args: argparse.Namespace, env: Env, tokenizer: Tokenizer
                ) -> evaluation.EvalSuite | None:
    """The held-out zero-shot and retrieval tasks (Sec. 5), built once on every rank, since every
    rank embeds a share of them (eval_sources); files are used whole, the shapes world's split
    'test' at --eval-images images. A source that cannot be read stops every rank with one line
    naming its flag."""
    suite, problem = evaluation.EvalSuite(tokenizer), None
    for flag, task, spec in zip(("--zeroshot-data", "--retrieval-data"), ("zeroshot", "retrieval"),
                                eval_sources(args)):
        if spec == "none":
            continue
        try:
            part = evaluation.build_eval_suite(
                spec, tokenizer=tokenizer, image_size=args.image_size, tasks=[task],
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


def periodic_eval(args: argparse.Namespace, env: Env, model: ThreeTowers,
                  tower3: FrozenTower | None, suite, metrics_log: MetricsLog) -> dict[str, float]:
    """Evaluate on every rank, each embedding its share of the images and texts (eval.Embedder),
    so no rank idles in a collective while one embeds a large set; rank 0 logs a line and a JSONL
    record. The shares are equal (N/W rows each, give or take one), so the ranks meet in the
    gather without a store meeting first; a collective that fails there still ends in one line
    naming the evaluation (Env.phase)."""
    if suite is None:
        return {}
    step, alphas = metrics_log.position.step, (1.0, 0.5, 0.0) if args.mode == "3t" else (1.0,)
    try:
        with env.phase(f"evaluation at step {step}"), precision(args.precision, env.device):
            results = evaluation.evaluate(model, tower3, suite, device=env.device, alphas=alphas,
                                          rank=env.rank, world=env.world, workers=env.workers(args))
    except data.DataError as e:   # every rank raises it (Embedder): an unusable evaluation image
        raise SystemExit(f"evaluation at step {step} (--zeroshot-data / --retrieval-data): "
                         f"{e}") from None
    shown = {k: v for k, v in results.items()
             if k.endswith(("top1", "R@1")) and "@" not in k.split("/")[0]}
    log(env, f"[eval] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    metrics_log.write({"step": step, "eval": results})
    return results


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train.py's flags (flags.py), with this file's docstring as --help's description."""
    return flags.parse_args(argv, __doc__)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Entry point for `python train.py`, `torchrun train.py` and tests (`main([...])`). The
    project's own errors (data.ProjectError: bad data, a checkpoint that does not load, the
    non-finite stop) end in their one line and exit code 1; any other exception is a bug and
    keeps its traceback."""
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
