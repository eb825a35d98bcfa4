"""Pretrain a third tower: `python train.py --mode supervised` trains an image classifier that lit and
3t load, frozen, as their third tower h (`--tower3 CKPT`; `--tower3 auto` runs this on first use).

3T's third tower is a classifier pretrained on many labelled images (JFT-3B, ImageNet-21k or Places365
in Kossen et al. 2023, Sec. 4). Offline, with no downloadable weights, this is how a user gets one: on
the shapes world's object or scene labels, or on an ImageFolder. Same optimiser, schedule,
checkpoints and resume as a contrastive run (runtime.py); its own short loop with cross-entropy.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

import data
from model import build_image_tower
from shapes import ShapesLabelled
from runtime import (Env, MetricsLog, StepBatches, apply_gradients, autocast, check_resumable,
                     claim_folders, endless, find_checkpoint, log, resume, save, schedule, sync_step, wrap)



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
    transform = v2.Compose(crop + [v2.RandomHorizontalFlip()] * args.flip + [
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    images = data.image_folder(args.train_data, transform, train=True, seed=args.seed)
    images.max_image_pixels, images.max_file_bytes = args.max_image_pixels, args.max_file_bytes
    if args.train_samples is not None and args.train_samples < len(images):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(images), args.train_samples, replace=False))
        images.targets, images.paths = [images.targets[i] for i in keep], [images.paths[i] for i in keep]
    return images


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
            logits = forward(batch["image"].to(env.device, non_blocking=True)).float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = apply_gradients(model, optimizer, scheduler, args.grad_clip, defer=env.defer_syncs)
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
