"""train.py's flags: what each does, its default (the CPU preset: the built-in shapes world, small
towers, minutes on 2 cores) and its checks, so that train.py reads as the method.

Read `parse_args` first: the groups --help shows (data, towers, loss and optimisation), then
`finish_args`, which stops with one line naming the first flag out of its range (RANGES) or at
odds with another, and fills the defaults that depend on other flags. argparse only: no config
files (README, "Files").
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

import data
import eval as evaluation
import shapes
from losses import PAIRS
from model import IMAGE_ARCHS, TEXT_PRESETS, VIT_PRESETS
from runtime import DIST_TIMEOUT, check_ranges

SHAPES_TRAIN_SAMPLES = 40_000     # --train-samples on the shapes world; files are used whole


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The flags, in the groups --help shows, then checked and completed (finish_args)."""
    p = argparse.ArgumentParser(prog="train.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
           "and stored with it (captions several times shorter than bytes); bytes: one token per UTF-8 byte")
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
