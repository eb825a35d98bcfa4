"""Evaluation of CLIP / LiT / 3T checkpoints on the paper's three task families (Kossen et al. 2023,
Sec. 5; README "Evaluation"), and 3T's choice of embeddings at test time.

Read `evaluate` first: one evaluation of a model over a suite of tasks built once (`build_eval_suite`),
scored by `_zeroshot`, `_retrieval` and `_fewshot` on the embeddings of `Embedder`.

    zero-shot classification   class names x prompt templates, text embeddings averaged over the
                               templates (normalise, mean, normalise); top-1 / top-5 accuracy
    retrieval                  image->text and text->image Recall@1/5/10 with several captions per
                               image (COCO/Flickr30k: an image->text hit is ANY of its captions)
    few-shot linear probe      k examples per class, closed-form ridge regression to one-hot
                               targets on frozen image embeddings; mean top-1 over seeds

Which embeddings score an image-text pair (a "view"):
    main     cos(f(I), g(T)) for clip and 3t;  cos(h(I), g(T)) for lit
    tower3   cos(h_g(h(I)), g_h(g(T)))         3t only: the LiT-like pairing 3T trains for free
    mix@a    a * main + (1 - a) * tower3       3t only: s_alpha, an analysis option (README,
                                               "Where this project chooses"), not the paper's
                                               protocol (a=1: main, a=0: tower3)
Few-shot probes read f ('main' of clip and 3t) or h ('main' of lit, 'tower3' of 3t).

Conventions: every metric is a percentage. A tie counts against the positive (a negative scoring
exactly as high as the best positive ranks above it), so a constant scorer gets 0, never 100; a NaN
score counts against it too, so a broken model gets 0. Non-finite embeddings add the record
'nonfinite/embeddings' (% of embedded rows), a warning, and make eval.py exit with an error.

    python eval.py --checkpoint runs/NAME/ckpt.pt --tasks zeroshot,retrieval,fewshot
    python eval.py --curves runs/NAME/metrics.jsonl         # curves.png: losses, t, evaluations

The tasks' data do not depend on a model, so `build_eval_suite` builds them once -- from the shapes
world (shapes.py: its test split, its own prompts) or from files: an ImageFolder with a class-name
file, ImageNet's validation folders, CIFAR-10/100, a CSV of image paths and captions, a Karpathy
split of COCO or Flickr30k. A data spec that cannot serve its task stops at parse time
(check_source): no task asked for is skipped. train.py calls `evaluate(...)` periodically on every
rank, each embedding its share of the images and texts, and `write_curves` at the end of a run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import find_classes
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

from data import (CsvPairs, DataError, LabelledImages, RetrievalSet, collate, image_folder,
                  image_transform, with_tower3_view)
from losses import PAIRS
from model import FrozenTower, ThreeTowers
from checkpoints import CHECKPOINT_FORMAT, load_trained
from runtime import check_ranges, unwritable
from shapes import ShapesLabelled, shapes_retrieval, zeroshot_tasks
from tokenizer import Tokenizer

VIEWS = ("main", "tower3", "mix")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------------------------
# 1. The tasks: which images, captions, class names and prompts each task scores; no model, built once
# ----------------------------------------------------------------------------------------------
TASKS = ("zeroshot", "retrieval", "fewshot")
CAPTIONS_PER_IMAGE = 5           # shapes retrieval: 5 captions per image, as in COCO
FEWSHOT_POOL_PER_CLASS = 30      # shapes probe-train pool: 30 x classes images of split 'val'
FEWSHOT_LAMBDA = 0.1             # ridge strength on unit-norm features; fixed (our choice)
# Prompts for real class names (our own short list; the shapes world has its own templates).
GENERIC_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "a low resolution photo of a {}.",
                     "an image of a {}."]


def prompts_of(classnames: Sequence[str], templates: Sequence[str] = GENERIC_TEMPLATES) -> list[list[str]]:
    """Every class name in every template ('{}' marks the name): prompts per class."""
    return [[t.format(c) for t in templates] for c in classnames]


@dataclass
class EvalSuite:
    """What evaluation needs that does not depend on the model: labelled images with class names
    and prompts per class per zero-shot task, the retrieval set with its tokenised captions, and
    the few-shot (probe-train pool, probe-test) datasets."""
    tokenizer: Tokenizer
    zeroshot: dict[str, tuple[Dataset, list[str], list[list[str]]]] = field(default_factory=dict)
    retrieval: RetrievalSet | None = None
    retrieval_tokens: Tensor | None = None
    fewshot: dict[str, tuple[Dataset, Dataset]] = field(default_factory=dict)
    shots: tuple[int, ...] = (1, 5, 10)
    fewshot_seeds: int = 3
    fewshot_lambda: float = FEWSHOT_LAMBDA


def imagefolder_zeroshot(root: str, classnames_file: str, image_size: int = 224) -> tuple[Dataset, list[str]]:
    """ImageNet-val-style folder + a class-name file: its k-th name names the k-th class folder in sorted
    (alphabetical) order. A file that lists folder names in another order would permute every label
    silently, so that raises (check_classnames)."""
    data = image_folder(root, image_transform(image_size, train=False))
    names = check_classnames(root, classnames_file, data.classnames)
    data.classnames = names
    return data, names


def check_classnames(root: str, classnames_file: str, folders: Sequence[str]) -> list[str]:
    """The names in classnames_file (one per non-empty line), if they can name the sorted class `folders` of
    root: as many names as folders, and no name that is another folder's name (a permuted list)."""
    with open(classnames_file, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{classnames_file} has {len(names)} names but {root} has {len(folders)} class folders")
    folder = {name: k for k, name in enumerate(folders)}
    moved = [(k, name) for k, name in enumerate(names) if folder.get(name, k) != k]
    if moved:
        k, name = moved[0]
        raise ValueError(f"{classnames_file}: name {k + 1} is {name!r}, the name of class folder {folder[name] + 1} "
                         f"in sorted order ({len(moved)} such names); the k-th name must name the k-th folder of "
                         f"{root} in sorted order")
    return names


def cifar_zeroshot(name: str, root: str, image_size: int = 224, download: bool = False,
                   train: bool = False) -> tuple[Dataset, list[str]]:
    """CIFAR-10/100 test (or train) set from torchvision's on-disk format; downloads only when asked."""
    from torchvision import datasets

    builders = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    if name not in builders:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose from {list(builders)}")
    try:
        base = builders[name](root, train=train, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(f"{name} not found under {root!r} (pass download=True to fetch it): {e}") from e
    names = [c.replace("_", " ") for c in base.classes]  # "aquarium_fish" -> "aquarium fish" for prompts
    return LabelledImages(image_transform(image_size, train=False), names, base.targets, array=base.data), names


def cifar_folder(name: str, root: str) -> None:
    """FileNotFoundError unless root holds torchvision's extracted CIFAR folder (checked at parse
    time; cifar_zeroshot reads and verifies the files themselves)."""
    from torchvision import datasets

    base = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name].base_folder
    if not os.path.isdir(os.path.join(root, base)):
        raise FileNotFoundError(f"{name} not found: expected torchvision's folder "
                                f"{os.path.join(root, base)}")


# ImageNet zero-shot (the paper's headline classification task, Sec. 5): the ILSVRC-2012 validation
# set as 1,000 class folders named by WordNet id. Sorted wnids are the class indices, the order of
# the class names in torchvision's weight metadata.
IMAGENET_CLASSES = 1000
WNID = re.compile(r"n\d{8}")
# Our own prompts for ImageNet's class names. CLIP (Radford et al. 2021, Sec. 3.1.4) ensembles many
# templates because one bare phrasing is ambiguous (a "crane" bird or machine) and unlike the
# captions the text tower learned from; averaging the embeddings of varied contexts -- medium,
# quality, framing -- gives a steadier class embedding than any single template (`ensemble`).
IMAGENET_TEMPLATES = [
    "a photo of a {}.", "a snapshot of a {}.", "there is a {} in this image.",
    "an example of a {}.", "a {} seen up close.", "a {} seen from far away.",
    "a cropped image of a {}.", "an out-of-focus photo of a {}.", "a grainy photo showing a {}.",
    "a dimly lit photo of a {}.", "a brightly lit photo of a {}.",
    "a black-and-white photograph of a {}.", "a pencil sketch of a {}.", "an oil painting of a {}.",
    "a cartoon drawing of a {}.", "a toy model of a {}.", "a {}, photographed outdoors.",
    "a {}, photographed indoors.", "a {} in its usual surroundings.",
    "my favourite picture of a {}.",
]


def imagenet_classnames() -> list[str]:
    """The 1,000 ILSVRC-2012 class names in class-index (sorted wnid) order, from torchvision's
    weight metadata (part of the package: nothing is downloaded)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_folders(root: str) -> list[str]:
    """The sorted wnid class folders of an ImageNet validation root; FileNotFoundError or a
    one-line ValueError (how many found, an example) unless it holds the 1,000 of them, no other."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageNet folder not found: {root}")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    folders = [e.name for e in entries if e.is_dir()]
    wnids = [f for f in folders if WNID.fullmatch(f)]
    others = [f for f in folders if not WNID.fullmatch(f)]
    if len(wnids) != IMAGENET_CLASSES or others:
        files = [e.name for e in entries if not e.is_dir()]
        example = (f"e.g. folder {others[0]!r}" if others else f"e.g. file {files[0]!r}" if files
                   else f"e.g. {wnids[0]!r}" if wnids else "it is empty")
        raise ValueError(f"{root}: expected the {IMAGENET_CLASSES:,} ILSVRC-2012 class folders "
                         f"named by WordNet id (n + 8 digits, e.g. n01440764), found "
                         f"{len(wnids):,} such folders, {len(others):,} other folders and "
                         f"{len(files):,} files ({example})")
    return wnids


def imagenet_zeroshot(root: str, image_size: int = 224) -> tuple[Dataset, list[str]]:
    """ImageNet's validation folders (imagenet_folders) with torchvision's class names: the image of
    the k-th folder in sorted order has label k and is scored against name k."""
    imagenet_folders(root)
    data = image_folder(root, image_transform(image_size, train=False))    # labels: sorted folders
    data.classnames = imagenet_classnames()
    return data, data.classnames


ZEROSHOT_SPECS = ("shapes | imagefolder:ROOT:CLASSNAMES_FILE | imagenet:ROOT | cifar10:ROOT | "
                  "cifar100:ROOT")
RETRIEVAL_SPECS = ("shapes | a .csv/.tsv of image paths and captions | "
                   "karpathy:JSON:IMAGE_ROOT:SPLIT")
FEWSHOT_SPECS = "shapes | imagefolder:ROOT | cifar10:ROOT | cifar100:ROOT"


def _expected(specs: str) -> str:
    """'a | b | c' -> 'use a, b or c': the accepted syntaxes, for an error line."""
    *first, last = specs.split(" | ")
    return "use " + (", ".join(first) + " or " if first else "") + last


def parse_zeroshot(spec: str) -> tuple[str, str, str | None]:
    """(kind, root, class-name file or None) of a zero-shot spec in ZEROSHOT_SPECS' syntax; ValueError if
    it is none of them. The one parser of that syntax, for eval.py's and train.py's --zeroshot-data."""
    if spec == "shapes":
        return "shapes", "", None
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and ":" in rest:
        root, _, names_file = rest.rpartition(":")
        return kind, root, names_file
    if kind in ("imagenet", "cifar10", "cifar100") and rest:
        return kind, rest, None
    raise ValueError(f"zero-shot data {spec!r}: {_expected(ZEROSHOT_SPECS)}")


def parse_retrieval(spec: str) -> tuple[str, ...]:
    """('shapes',), ('csv', path) or ('karpathy', json, image root, split) of a retrieval spec in
    RETRIEVAL_SPECS' syntax; ValueError if it is none of them. SPLIT is the last ':' field and
    IMAGE_ROOT the one before, so only the JSON path may hold a ':'."""
    if spec == "shapes":
        return ("shapes",)
    if spec.lower().endswith((".csv", ".tsv")):
        return "csv", spec
    kind, _, rest = spec.partition(":")
    parts = rest.rsplit(":", 2)
    if kind == "karpathy" and len(parts) == 3 and all(parts):
        return ("karpathy", *parts)
    raise ValueError(f"retrieval data {spec!r}: {_expected(RETRIEVAL_SPECS)}")


def parse_fewshot(spec: str) -> tuple[str, str]:
    """(kind, root) of a few-shot spec in FEWSHOT_SPECS' syntax; ValueError if none of them."""
    if spec == "shapes":
        return "shapes", ""
    kind, _, root = spec.partition(":")
    if kind in ("imagefolder", "cifar10", "cifar100") and root:
        return kind, root
    raise ValueError(f"few-shot data {spec!r}: {_expected(FEWSHOT_SPECS)}")


def check_source(task: str, spec: str) -> None:
    """Fail fast (FileNotFoundError, ValueError) on a zero-shot, retrieval or few-shot spec that
    cannot work: its syntax, that its folders and files exist, an ImageFolder's class-name file,
    ImageNet's 1,000 class folders, a Karpathy file's split and images -- reading no image, so that
    eval.py and train.py can check their flags before any work. No task is skipped silently."""
    if task == "retrieval":
        kind, *where = parse_retrieval(spec)
        if kind == "csv" and not os.path.isfile(spec):
            raise FileNotFoundError(f"caption file not found: {spec}")
        if kind == "karpathy":
            read_karpathy(*where)
        return
    if task == "fewshot":
        kind, root = parse_fewshot(spec)
        if kind == "imagefolder":
            fewshot_splits(spec, root)
        elif kind != "shapes":
            cifar_folder(kind, root)
        return
    if task != "zeroshot":
        raise ValueError(f"unknown eval task {task!r}; choose from {TASKS}")
    kind, root, names_file = parse_zeroshot(spec)
    if kind == "imagefolder" and not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    if kind == "imagenet":
        imagenet_folders(root)
    elif kind in ("cifar10", "cifar100"):
        cifar_folder(kind, root)
    if names_file is not None:
        if not os.path.isfile(names_file):
            raise FileNotFoundError(f"class-name file not found: {names_file}")
        check_classnames(root, names_file, find_classes(root)[0])


def zeroshot_sets(spec: str, image_size: int, num_images: int, seed: int
                  ) -> dict[str, tuple[Dataset, list[str], list[list[str]]]]:
    """ZEROSHOT_SPECS (files: used whole). Returns task -> (labelled images, class names, prompts per class)."""
    kind, root, names_file = parse_zeroshot(spec)
    if kind == "shapes":
        return {name: (ShapesLabelled("test", num_images, label=name, seed=seed,
                                      image_size=image_size), classes, prompts)
                for name, (classes, prompts) in zeroshot_tasks().items()}
    if kind == "imagenet":
        data, classes = imagenet_zeroshot(root, image_size)
        return {kind: (data, classes, prompts_of(classes, IMAGENET_TEMPLATES))}
    if kind == "imagefolder":
        data, classes = imagefolder_zeroshot(root, names_file, image_size)
    else:
        data, classes = cifar_zeroshot(kind, root, image_size)
    return {kind: (data, classes, prompts_of(classes))}


def fewshot_splits(spec: str, root: str) -> list[str]:
    """ROOT/train and ROOT/test (or ROOT/val) of an imagefolder few-shot spec; else
    FileNotFoundError."""
    splits = [os.path.join(root, s) for s in ("train", "test", "val")
              if os.path.isdir(os.path.join(root, s))]
    if len(splits) < 2 or not splits[0].endswith("train"):
        raise FileNotFoundError(f"few-shot data {spec!r}: expected class folders under "
                                f"{root}/train and {root}/test (or {root}/val)")
    return splits[:2]


def fewshot_sets(spec: str, image_size: int, seed: int, test: Dataset | None = None,
                 num_images: int = 500) -> dict[str, tuple[Dataset, Dataset]]:
    """Task -> (probe-train pool, probe-test images). 'shapes': the 'object' task, pool from split
    'val', test images from 'test' (`test` if given), disjoint by construction. imagefolder:ROOT:
    ROOT/train is the pool, ROOT/test (or ROOT/val) is scored, with the same class folders.
    cifar10:ROOT / cifar100:ROOT: the train and test splits. Pools keep FEWSHOT_POOL_PER_CLASS
    seeded images per class: only those are embedded."""
    kind, root = parse_fewshot(spec)
    if kind == "shapes":
        test = test if test is not None else ShapesLabelled("test", num_images, label="object", seed=seed,
                                                            image_size=image_size)
        return {"object": (ShapesLabelled("val", FEWSHOT_POOL_PER_CLASS * test.num_classes, label="object",
                                          seed=seed, image_size=image_size), test)}
    if kind == "imagefolder":
        splits = fewshot_splits(spec, root)
        pool, test = (image_folder(d, image_transform(image_size, train=False)) for d in splits)
        if pool.classnames != test.classnames:
            raise ValueError(f"few-shot data {spec!r}: {splits[0]} and {splits[1]} have different class folders")
    else:
        pool, test = (cifar_zeroshot(kind, root, image_size, train=train)[0]
                      for train in (True, False))
    targets, generator = torch.tensor(pool.targets), torch.Generator().manual_seed(seed)
    keep = [idx[torch.randperm(len(idx), generator=generator)[:FEWSHOT_POOL_PER_CLASS]]
            for idx in ((targets == c).nonzero().flatten() for c in range(pool.num_classes))]
    return {kind: (Subset(pool, sorted(torch.cat(keep).tolist())), test)}


def csv_retrieval(path: str, *, image_size: int,
                  img_key: str = "filepath", caption_key: str = "title",
                  separator: str | None = None) -> RetrievalSet:
    """A CSV/TSV of (image path, caption) rows as a retrieval set: rows sharing an image path are
    one image with several captions (how COCO/Flickr30k caption files list them)."""
    pairs = CsvPairs(path, img_key=img_key, caption_key=caption_key,
                     separator=separator, image_size=image_size, train=False)
    first_row: dict[str, int] = {}
    for row, (image_path, _) in enumerate(pairs.rows):
        first_row.setdefault(image_path, row)
    image_of = {image_path: i for i, image_path in enumerate(first_row)}
    owner = torch.tensor([image_of[p] for p, _ in pairs.rows])
    return RetrievalSet(Subset(pairs, list(first_row.values())), [c for _, c in pairs.rows], owner)


def read_karpathy(json_path: str, image_root: str, split: str) -> tuple[list[str], list[list[str]]]:
    """(image paths, captions of each image) of one split of a Karpathy-split file (Karpathy and
    Fei-Fei 2015; the COCO 5k / Flickr30k 1k test sets of the paper's retrieval, Sec. 5):
    {"images": [{"filepath" (COCO only), "filename", "split", "sentences": [{"raw"}, ...]}, ...]};
    the image is IMAGE_ROOT/filepath/filename. The first CAPTIONS_PER_IMAGE captions of each image
    are kept (COCO has a few images with more; the usual 5k-image protocol counts five each). Reads
    no image, but checks that every one exists: FileNotFoundError or ValueError, one line."""
    for what, path, exists in (("Karpathy caption file", json_path, os.path.isfile),
                               ("image root", image_root, os.path.isdir)):
        if not exists(path):
            raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            entries = json.load(f)["images"]
        splits = sorted({e["split"] for e in entries})
        chosen = [e for e in entries if e["split"] == split]
        paths = [os.path.join(image_root, e.get("filepath", ""), e["filename"]) for e in chosen]
        captions = [[s["raw"] for s in e["sentences"]][:CAPTIONS_PER_IMAGE] for e in chosen]
    except ValueError as e:                                 # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{json_path} is not in the Karpathy format {{'images': [{{'filename', "
                         f"'split', 'sentences': [{{'raw'}}, ...]}}, ...]}} "
                         f"({type(e).__name__}: {e})") from None
    if not chosen:
        raise ValueError(f"{json_path} has no split {split!r}; its splits: "
                         f"{', '.join(map(str, splits))}")
    bad = [p for p, c in zip(paths, captions) if not c or not all(isinstance(s, str) for s in c)]
    if bad:
        raise ValueError(f"{json_path}: {len(bad)} image(s) of split {split!r} have no text "
                         f"captions ('sentences' with a 'raw' string), e.g. {bad[0]}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images of split {split!r} of "
                                f"{json_path} are missing, e.g. {', '.join(missing[:3])}")
    return paths, captions


def karpathy_retrieval(json_path: str, image_root: str, split: str, *,
                       image_size: int) -> RetrievalSet:
    """A Karpathy split (read_karpathy) as a retrieval set: each image with its captions. An image
    that cannot be decoded stops evaluation with its name (LabelledImages: never substituted)."""
    paths, captions = read_karpathy(json_path, image_root, split)
    images = LabelledImages(image_transform(image_size, train=False), paths, range(len(paths)),
                            paths=paths)
    owner = torch.arange(len(paths)).repeat_interleave(torch.tensor([len(c) for c in captions]))
    return RetrievalSet(images, [c for per_image in captions for c in per_image], owner)


def retrieval_set(spec: str, image_size: int, num_images: int, seed: int,
                  csv_keys: tuple[str, str, str | None]) -> RetrievalSet:
    """RETRIEVAL_SPECS: the shapes world's split 'test', a caption CSV or a Karpathy split."""
    kind, *where = parse_retrieval(spec)
    if kind == "shapes":
        return shapes_retrieval(num_images, CAPTIONS_PER_IMAGE, seed=seed, image_size=image_size)
    if kind == "csv":
        return csv_retrieval(spec, image_size=image_size, img_key=csv_keys[0],
                             caption_key=csv_keys[1], separator=csv_keys[2])
    return karpathy_retrieval(*where, image_size=image_size)


def build_eval_suite(spec: str = "shapes", *, tokenizer: Tokenizer, image_size: int,
                     num_images: int = 500, seed: int = 0,
                     tasks: Sequence[str] = ("zeroshot", "retrieval"),
                     zeroshot_data: str | None = None, retrieval_data: str | None = None,
                     fewshot_data: str | None = None,
                     csv_keys: tuple[str, str, str | None] = ("filepath", "title", None)
                     ) -> EvalSuite:
    """Build the datasets once. `spec` names the data of every task; zeroshot_data / retrieval_data /
    fewshot_data override it per task. 'shapes' = the shapes world's split 'test' (num_images images,
    `seed`); a .csv/.tsv or karpathy: serve retrieval only; imagefolder:/imagenet:/cifar: serve
    zero-shot (imagefolder: and cifar: also few-shot: fewshot_sets says which split does what). A
    spec that cannot serve its task raises ValueError: a task asked for is never skipped."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task(s) {sorted(unknown)}; choose from {TASKS}")
    suite = EvalSuite(tokenizer)
    zs_spec = zeroshot_data or spec
    if "zeroshot" in tasks:
        suite.zeroshot = zeroshot_sets(zs_spec, image_size, num_images, seed)
    if "retrieval" in tasks:
        suite.retrieval = retrieval_set(retrieval_data or spec, image_size, num_images, seed,
                                        csv_keys)
        suite.retrieval_tokens = tokenizer.encode(suite.retrieval.captions)
    if "fewshot" in tasks:
        shared = suite.zeroshot["object"][0] if zs_spec == "shapes" and "object" in suite.zeroshot \
            else None                                       # the shapes test images: embedded once
        suite.fewshot = fewshot_sets(fewshot_data or spec, image_size, seed, shared, num_images)
    return suite


# ----------------------------------------------------------------------------------------------
# 2. Metrics: pure functions of embeddings and labels
# ----------------------------------------------------------------------------------------------
def positive_rank(scores: Tensor, positive: Tensor) -> Tensor:
    """Per row of scores (Q, K) with a boolean mask of its positives (Q, K): how many negatives
    score >= the best positive (0 = retrieved first). Ties go against the positive, and so do NaN
    scores (a NaN negative beats it; a NaN positive is never found: rank K); a row with no positive
    gets rank >= K, a miss at every k."""
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)     # NaN if any positive is
    rank = (((scores >= best) | scores.isnan()) & ~positive).sum(dim=1)
    return rank.masked_fill(best.squeeze(1).isnan(), scores.shape[1])


def accuracy_topk(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy (%) of logits (N, C) for integer labels (N,); ties count as misses."""
    rank = positive_rank(logits, F.one_hot(labels, logits.shape[1]).bool())
    return {k: 100.0 * (rank < k).float().mean().item() for k in ks}


def chunked_ranks(queries: Tensor, keys: Tensor, query_owner: Tensor, key_owner: Tensor,
                  chunk_size: int = 1024) -> Tensor:
    """positive_rank of each query (Q, D) against all keys (K, D), key j being a positive of query
    i iff key_owner[j] == query_owner[i]. chunk_size queries at a time: memory O(chunk x K)."""
    ranks = []
    with torch.autocast(queries.device.type, enabled=False):   # bf16 scores would make false ties
        queries, keys = queries.float(), keys.float()
        for lo in range(0, len(queries), chunk_size):
            scores = queries[lo:lo + chunk_size] @ keys.T                      # (chunk, K)
            positive = query_owner[lo:lo + chunk_size, None] == key_owner[None, :]
            ranks.append(positive_rank(scores, positive))
    return torch.cat(ranks)


def recall_at_k(image_emb: Tensor, text_emb: Tensor, caption_image: Tensor,
                ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """COCO-style Recall@K (%) both ways from image_emb (N_img, D) and text_emb (N_cap, D); caption
    i describes image caption_image[i]. image->text hits if any of the image's captions is in the
    top K; text->image if its one image is. Keys 'i2t/R@K', 't2i/R@K'."""
    images = torch.arange(len(image_emb), device=image_emb.device)
    caption_image = caption_image.to(image_emb.device)
    i2t = chunked_ranks(image_emb, text_emb, images, caption_image, chunk_size)
    t2i = chunked_ranks(text_emb, image_emb, caption_image, images, chunk_size)
    return {f"{name}/R@{k}": 100.0 * (rank < k).float().mean().item()
            for name, rank in (("i2t", i2t), ("t2i", t2i)) for k in ks}


def ensemble(per_template: Tensor) -> Tensor:
    """Prompt ensembling (CLIP, Radford et al. 2021, Sec. 3.1.4): (C, T, D) text embeddings ->
    (C, D) by normalising each, averaging over the T templates, normalising the mean."""
    return F.normalize(F.normalize(per_template, dim=-1).mean(dim=1), dim=-1)


def view_pair(mode: str, view: str) -> tuple[str, str]:
    """(image key, text key) of the embeddings a view compares, as training paired them (losses.PAIRS):
    'main' is the mode's first term (fg of clip and 3t, hg of lit), 'tower3' 3T's term gh. The text side
    is the one ThreeTowers.encode_text returns (g, g_h)."""
    a, b = PAIRS[mode]["gh"] if view == "tower3" else next(iter(PAIRS[mode].values()))
    return (b, a) if a.startswith("g") else (a, b)


def view_embeddings(image: dict[str, Tensor], text: dict[str, Tensor], mode: str, view: str,
                    alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """(A, B) whose dot products A @ B.T are the view's scores. For the mix,
    s_alpha = alpha <f, g> + (1 - alpha) <h_g, g_h> = <[alpha f, (1-alpha) h_g], [g, g_h]>:
    a concatenation, so retrieval stays chunked and zero-shot needs no special case."""
    (i, t), (ih, th) = view_pair(mode, "main"), view_pair("3t", "tower3")
    if view == "main":
        return image[i], text[t]
    if view == "tower3":
        return image[ih], text[th]
    return (torch.cat([alpha * image[i], (1 - alpha) * image[ih]], dim=1),
            torch.cat([text[t], text[th]], dim=1))


def views(mode: str, alphas: Sequence[float] = (1.0,), embeddings: Sequence[str] = VIEWS
          ) -> list[tuple[str, str, float]]:
    """(result-key prefix, view, alpha) of what exists in `mode`: clip and lit have only 'main'."""
    out = [("", "main", 1.0)] if "main" in embeddings else []
    if mode == "3t":
        out += [("tower3/", "tower3", 0.0)] if "tower3" in embeddings else []
        out += [(f"mix@{a:g}/", "mix", a) for a in alphas if a != 1 and "mix" in embeddings]
    return out


def ridge_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int,
                lam: float = FEWSHOT_LAMBDA) -> Tensor:
    """Closed-form ridge regression to one-hot targets, with an unregularised bias, (N_test, C)
    logits. Centring x and y makes the bias exact: W = (Xc^T Xc + lam I)^-1 Xc^T Yc, solved in
    the dual Xc^T (Xc Xc^T + lam I)^-1 Yc when there are fewer examples than dimensions."""
    x, y = train_x.double(), F.one_hot(train_y, num_classes).double()     # autocast skips float64
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    eye = lambda size: lam * torch.eye(size, dtype=x.dtype, device=x.device)
    if n < d:
        w = xc.T @ torch.linalg.solve(xc @ xc.T + eye(n), yc)                  # (d, C) via n x n
    else:
        w = torch.linalg.solve(xc.T @ xc + eye(d), xc.T @ yc)                 # (d, C) via d x d
    return ((test_x.double() - x_mean) @ w + y_mean).float()


def kshot_indices(labels: Tensor, k: int, seed: int, num_classes: int | None = None) -> Tensor:
    """Exactly k seeded random indices per class, class by class. A class with fewer than k
    examples raises: a silently unbalanced probe would not be a k-shot number."""
    labels, generator = labels.cpu(), torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes or int(labels.max()) + 1):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} probe-train examples, fewer than k={k}")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(picks)


# ----------------------------------------------------------------------------------------------
# 3. Embedding passes (inference mode, in batches; N x D in memory)
# ----------------------------------------------------------------------------------------------
@dataclass
class Embedder:
    """Embeds datasets and token batches with one model; an image set is embedded once per
    evaluate() call (the shapes tasks and retrieval share their images).

    The evaluation sets of Sec. 5 are large (ImageNet's 50k validation images). With world > 1 (torch.distributed initialised, one Embedder per rank) every rank embeds a
    contiguous share of each set, rows [r N/W, (r+1) N/W), and the shares are all-gathered, so
    every rank holds the whole set in the original order: W ranks embed an evaluation set in
    about 1/W of the time, and none waits in a collective while another embeds everything."""
    model: ThreeTowers
    tower3: FrozenTower | None
    device: torch.device | str
    batch_size: int = 256
    progress: bool = False
    cache: dict = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    workers: int = 0

    def images(self, dataset: Dataset) -> tuple[dict[str, Tensor], Tensor | None]:
        """Every image-side embedding of model.encode_image, plus 'h' = normalised h(I) when a
        third tower is used; and the labels, if the items have them. h reads its own view of each
        image (data.tower3_view), the pixels it saw in training, never f's view resized."""
        if id(dataset) not in self.cache:
            source = dataset if self.tower3 is None else with_tower3_view(      # LiT has no f: no f view
                dataset, self.tower3.view, f_view=self.model.mode != "lit")
            embedded = self._sharded(len(source), lambda rows: self._embed_images(
                source if len(rows) == len(source) else Subset(source, rows)))
            # The entry holds the dataset: a freed one's id could be reused by another set, a wrong hit.
            self.cache[id(dataset)] = (dataset, embedded, embedded.pop("label", None))
        return self.cache[id(dataset)][1:]

    def _embed_images(self, source: Dataset) -> dict[str, Tensor]:
        loader = DataLoader(source, self.batch_size, shuffle=False, collate_fn=collate, num_workers=self.workers)
        parts = []
        for batch in tqdm(loader, desc="images", disable=not self.progress, leave=False):
            image, h = (batch["image"].to(self.device) if "image" in batch else None), None
            if self.tower3 is not None:
                h = self.tower3(batch["image_h"].to(self.device))
            out = self.model.encode_image(image, h)
            if h is not None:
                out.setdefault("h", F.normalize(h.float(), dim=-1))
            if "label" in batch:
                out["label"] = batch["label"].to(self.device)
            parts.append(out)
        return _cat(parts)

    def texts(self, ids: Tensor) -> dict[str, Tensor]:
        """model.encode_text of token ids (N, L), each batch cut after its last EOS (the text
        tower pools at EOS under a causal mask, so later PAD tokens cannot matter)."""
        def embed(rows: range) -> dict[str, Tensor]:
            parts = []
            for lo in tqdm(range(rows.start, rows.stop, self.batch_size), desc="texts", disable=not self.progress,
                           leave=False):
                batch = Tokenizer.trim(ids[lo:min(lo + self.batch_size, rows.stop)])
                parts.append(self.model.encode_text(batch.to(self.device)))
            return _cat(parts)
        return self._sharded(len(ids), embed)

    def _sharded(self, n: int, embed: Callable[[range], dict[str, Tensor]]) -> dict[str, Tensor]:
        """embed(range(n)) in one process; with world > 1, embed(this rank's rows) on every rank, then
        the shares gathered in rank order. A rank that fails says so to the others in the same exchange
        that sizes the gather, so every rank raises (DataError for an unusable image) and none hangs."""
        if self.world == 1:
            return embed(range(n))
        rows = range(n * self.rank // self.world, n * (self.rank + 1) // self.world)
        part, problem = {}, None
        try:
            part = embed(rows) if len(rows) else {}
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks before they gather
            problem = e
        meta = (len(rows), {k: (tuple(v.shape[1:]), v.dtype) for k, v in part.items()},
                None if problem is None else (isinstance(problem, DataError), f"{type(problem).__name__}: {problem}"))
        metas = [None] * self.world
        dist.all_gather_object(metas, meta)
        failed = [(r, m[2]) for r, m in enumerate(metas) if m[2] is not None]
        if problem is not None:
            raise problem
        if failed:
            r, (is_data, message) = failed[0]
            raise (DataError if is_data else RuntimeError)(f"rank {r} could not embed its share: {message}")
        counts, layout = [m[0] for m in metas], next((m[1] for m in metas if m[1]), {})
        out = {}
        for key, (shape, dtype) in layout.items():
            padded = torch.zeros(max(counts), *shape, dtype=dtype, device=self.device)
            if key in part:
                padded[:len(rows)] = part[key]
            gathered = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(gathered, padded)
            out[key] = torch.cat([g[:c] for g, c in zip(gathered, counts)])
        return out


def _cat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def class_embeddings(model: ThreeTowers, tokenizer: Tokenizer, prompts: Sequence[Sequence[str]], *,
                     device: torch.device | str | None = None, batch_size: int = 256,
                     embedder: Embedder | None = None) -> dict[str, Tensor]:
    """Zero-shot classifier from prompts[c], the T prompts of class c (the same T for every class):
    each text-side embedding ('g', and 'g_h' for 3t) of every prompt, ensembled to (C, D). Given an
    embedder, its ranks share the prompts (1000 ImageNet classes x the templates are many texts)."""
    device = device or next(model.parameters()).device
    ids = tokenizer.encode([p for per_class in prompts for p in per_class])         # class-major
    with torch.inference_mode():
        emb = (embedder or Embedder(model, None, device, batch_size)).texts(ids)
    return {k: ensemble(v.view(len(prompts), -1, v.shape[-1])) for k, v in emb.items()}


# ----------------------------------------------------------------------------------------------
# 4. evaluate: the model passes over a suite of tasks (built once, section 1), called periodically
# ----------------------------------------------------------------------------------------------
def evaluate(model: ThreeTowers, tower3: FrozenTower | None, suite: EvalSuite, *,
             device: torch.device | str, batch_size: int = 256, alphas: Sequence[float] = (1.0,),
             progress: bool = False, embeddings: Sequence[str] = VIEWS, rank: int = 0, world: int = 1,
             workers: int = 0) -> dict[str, float]:
    """Flat results, e.g. 'zeroshot/object/top1', 'retrieval/i2t/R@5', 'fewshot/object/5shot',
    for the main embeddings; for 3t also 'tower3/...' and 'mix@a/...' per alpha != 1.

    Call it on the raw model (never the DDP wrapper). With world > 1, call it on every rank of the
    default process group with the same suite: each rank embeds its share of every image and text
    set (Embedder), every rank scores the gathered whole and returns the same results, equal to one
    process's up to float rounding. It switches the model to eval mode and restores the previous
    mode; the inputs go to `device` (DataLoader `workers` per rank), the model stays put."""
    if model.mode != "clip" and tower3 is None:
        raise ValueError(f"a {model.mode} model needs its third tower h to embed images")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            embedder = Embedder(model, tower3 if model.mode != "clip" else None, device,
                                batch_size, progress, rank=rank, world=world, workers=workers)
            view_list, found = views(model.mode, alphas, embeddings), []
            results = {**_zeroshot(embedder, suite, view_list, found), **_retrieval(embedder, suite, view_list, found),
                       **_fewshot(embedder, suite, view_list, found)}
    finally:
        model.train(was_training)
    rows, bad = (sum(x) for x in zip(*found)) if found else (0, 0)
    if bad:
        results["nonfinite/embeddings"] = 100.0 * bad / rows
        warnings.warn(f"{bad} of {rows} embeddings are not finite (NaN/inf): the model is broken (diverged "
                      f"training?); every metric counts them as misses", RuntimeWarning)
    return results


def _tally(found: list[tuple[int, int]], *embeddings: dict[str, Tensor]) -> None:
    """(rows, rows with a NaN or inf) of every embedding that evaluate scores."""
    found += [(len(x), int((~torch.isfinite(x)).any(dim=-1).sum())) for e in embeddings for x in e.values()]


def _zeroshot(embedder: Embedder, suite: EvalSuite, view_list: list, found: list) -> dict[str, float]:
    out, mode = {}, embedder.model.mode
    for name, (data, classnames, prompts) in suite.zeroshot.items():
        image, labels = embedder.images(data)
        classes = class_embeddings(embedder.model, suite.tokenizer, prompts, embedder=embedder)
        _tally(found, image, classes)
        class_ids = torch.arange(len(classnames), device=labels.device)
        for prefix, view, alpha in view_list:
            a, b = view_embeddings(image, classes, mode, view, alpha)
            rank = chunked_ranks(a, b, labels, class_ids)
            for k in (1, 5):
                out[f"{prefix}zeroshot/{name}/top{k}"] = 100.0 * (rank < k).float().mean().item()
    return out


def _retrieval(embedder: Embedder, suite: EvalSuite, view_list: list, found: list) -> dict[str, float]:
    if suite.retrieval is None:
        return {}
    image, _ = embedder.images(suite.retrieval.images)
    text = embedder.texts(suite.retrieval_tokens)
    _tally(found, image, text)
    out = {}
    for prefix, view, alpha in view_list:
        a, b = view_embeddings(image, text, embedder.model.mode, view, alpha)
        out.update({f"{prefix}retrieval/{k}": v
                    for k, v in recall_at_k(a, b, suite.retrieval.caption_image).items()})
    return out


def _fewshot(embedder: Embedder, suite: EvalSuite, view_list: list, found: list) -> dict[str, float]:
    out, mode = {}, embedder.model.mode
    probes = [(prefix, "h" if view == "tower3" else view_pair(mode, view)[0])   # tower3: the frozen h itself
              for prefix, view, _ in view_list if view != "mix"]
    for name, (pool, test) in suite.fewshot.items():
        (pool_x, pool_y), (test_x, test_y) = embedder.images(pool), embedder.images(test)
        _tally(found, pool_x, test_x)
        num_classes = test.num_classes
        for prefix, key in probes:
            for k in suite.shots:
                accs = []
                for seed in range(suite.fewshot_seeds):
                    idx = kshot_indices(pool_y, k, seed, num_classes).to(pool_x[key].device)
                    logits = ridge_probe(pool_x[key][idx], pool_y[idx], test_x[key], num_classes,
                                         suite.fewshot_lambda)
                    accs.append(accuracy_topk(logits, test_y, (1,))[1])
                out[f"{prefix}fewshot/{name}/{k}shot"] = sum(accs) / len(accs)
    return out


# ----------------------------------------------------------------------------------------------
# 5. Results: JSON records and the table
# ----------------------------------------------------------------------------------------------
def to_records(results: dict[str, float]) -> list[dict]:
    """Flat results -> [{task, metric, value, embeddings: main|tower3|mix, alpha}]; alpha is set
    for 'mix' only (main is alpha = 1, tower3 alpha = 0)."""
    records = []
    for key, value in results.items():
        head, _, rest = key.partition("/")
        embeddings, alpha = "main", None
        if head == "tower3":
            embeddings, key = "tower3", rest
        elif head.startswith("mix@"):
            embeddings, alpha, key = "mix", float(head[4:]), rest
        task, _, metric = key.rpartition("/")
        records.append({"task": task, "metric": metric, "value": value, "embeddings": embeddings,
                        "alpha": alpha})
    return records


def format_table(results: dict[str, float]) -> str:
    """One row per task/metric, one column per view; the mix columns are the alpha sweep."""
    records = to_records(results)
    column = lambda r: r["embeddings"] if r["alpha"] is None else f"a={r['alpha']:g}"
    columns = list(dict.fromkeys(column(r) for r in records))
    cells = {(f"{r['task']}/{r['metric']}", column(r)): r["value"] for r in records}
    rows = list(dict.fromkeys(row for row, _ in cells))
    width = max([len(r) for r in rows] + [6])
    lines = [f"{'metric':<{width}}" + "".join(f"{c:>10}" for c in columns)]
    for row in rows:
        lines.append(f"{row:<{width}}" + "".join(
            f"{cells[row, c]:>10.2f}" if (row, c) in cells else " " * 10 for c in columns))
    if any(r["alpha"] is not None for r in records):
        lines.append("a=alpha: s_alpha = alpha cos(f, g) + (1 - alpha) cos(h_g(h), g_h(g)); "
                     "alpha = 1 is 'main'")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 6. The retrieval grid: text queries above their top-k images
# ----------------------------------------------------------------------------------------------
GRID_MIN_TILE, GRID_TEXT_BAND, GRID_CHAR_PX = 96, 28, 6


def grid_row(query: str, images: Tensor) -> Image.Image:
    """One query (wrapped to two lines) above its images (k, 3, S, S, uint8 as the loader gives them),
    upscaled (nearest) to tiles of at least GRID_MIN_TILE pixels so the text fits."""
    images = images.cpu().float() / 255.0
    scale = -(-GRID_MIN_TILE // images.shape[-1])
    images = F.interpolate(images, scale_factor=scale, mode="nearest")
    strip = to_pil_image(make_grid(images, nrow=len(images), padding=2, pad_value=1.0))
    row = Image.new("RGB", (strip.width, strip.height + GRID_TEXT_BAND), "white")
    row.paste(strip, (0, GRID_TEXT_BAND))
    lines = textwrap.wrap(query, max(1, strip.width // GRID_CHAR_PX))[:2]
    ImageDraw.Draw(row).multiline_text((3, 1), "\n".join(lines), fill="black")
    return row


def save_retrieval_grid(path: str, model: ThreeTowers, tower3: FrozenTower | None, suite: EvalSuite,
                        queries: Sequence[str], *, device: torch.device | str, view: str = "main",
                        alpha: float = 1.0, k: int = 5, batch_size: int = 256) -> tuple[int, int]:
    """Retrieve the top-k images of suite.retrieval for each text query with `view` and save a
    PNG of one row per query; returns its (width, height)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        embedder = Embedder(model, tower3 if model.mode != "clip" else None, device, batch_size)
        image, _ = embedder.images(suite.retrieval.images)
        text = embedder.texts(suite.tokenizer.encode(list(queries)))
        a, b = view_embeddings(image, text, model.mode, view, alpha)
        top = (b @ a.T).topk(min(k, len(a)), dim=1).indices.cpu()              # (Q, k)
    model.train(was_training)
    data = suite.retrieval.images
    rows = [grid_row(q, torch.stack([data[int(i)]["image"] for i in idx]))
            for q, idx in zip(queries, top)]
    canvas = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for n, row in enumerate(rows):
        canvas.paste(row, (0, n * rows[0].height))
    canvas.save(path)
    return canvas.size


# ----------------------------------------------------------------------------------------------
# 7. Figures: small multiples drawn with PIL (which torchvision brings), and a run's training curves
# ----------------------------------------------------------------------------------------------
# A panel: (title, y-axis label, {line label: [(x, y) or (x, y, error), ...]}).
Panel = tuple[str, str, dict[str, list[tuple[float, ...]]]]
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PANEL_W, PANEL_H = 560, 320             # pixels of one panel, legend included
# margins: y ticks and label, title, legend, x ticks and label
LEFT, TOP, RIGHT, BOTTOM = 70, 30, 160, 46
INSET = 8                               # data <-> frame


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)        # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values, 1, 2, 2.5 or 5 x 10^k apart, from at or below lo to at or above hi."""
    if not hi > lo:                                      # one value: a band around it
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def _tick_text(value: float, ticks: Sequence[float]) -> str:
    """A tick value with as many decimals as the spacing of the ticks needs (0.25 -> 2, 20 -> 0)."""
    step = min((b - a for a, b in zip(ticks, ticks[1:])), default=1.0)
    digits = next(d for d in range(8) if abs(round(step, d) - step) <= step * 1e-6 or d == 7)
    return f"{value:,.{digits}f}"


def draw_panels(path: str, panels: Sequence[Panel], *, x_label: str = "step", log_x: bool = False,
                x_ticks: Sequence[float] | None = None, y_range: tuple[float, float] | None = None,
                colours: dict[str, tuple[int, int, int]] | None = None,
                columns: int = 3) -> tuple[int, int]:
    """Save small multiples as a PNG, one panel per (title, y label, lines); return its size. The
    panels share the x axis (x_label; log scale with log_x; ticks x_ticks, else round values);
    each has its own y range (or y_range), tick values, a grid, its lines with markers and +- error
    bars, and a legend. A line's colour is `colours[label]`, else PALETTE's k-th for the panel's
    k-th line (panels listing the same lines in the same order, like curve_panels' views, colour
    them alike). The project's one plotter: training curves (draw_curves), reproduce.py's sweep."""
    if not panels or not any(panel[2] for panel in panels):
        raise ValueError("nothing to draw: no panel has a line")
    to_axis = math.log10 if log_x else float
    xs = [p[0] for _, _, lines in panels for points in lines.values() for p in points]
    if x_ticks:
        ticks = list(x_ticks)
    elif log_x:                                                       # the powers of 10 inside
        lo, hi = math.ceil(math.log10(min(xs)) - 1e-9), math.floor(math.log10(max(xs)) + 1e-9)
        ticks = [10.0 ** k for k in range(lo, hi + 1)]
    else:
        ticks = nice_ticks(min(xs), max(xs))
    span = [to_axis(v) for v in (min(xs + ticks), max(xs + ticks))]
    if span[0] == span[1]:
        span = [span[0] - 1, span[1] + 1]
    columns = min(columns, len(panels))
    image = Image.new("RGB", (columns * PANEL_W, -(-len(panels) // columns) * PANEL_H), "white")
    for i, panel in enumerate(panels):
        colour = {name: (colours or {}).get(name, PALETTE[k % len(PALETTE)])
                  for k, name in enumerate(panel[2])}
        _draw_panel(image, ((i % columns) * PANEL_W, (i // columns) * PANEL_H), panel, colour,
                    (to_axis, span, ticks, x_label), y_range)
    image.save(path)
    return image.size


def _draw_panel(image: Image.Image, origin: tuple[int, int], panel: Panel, colour: dict,
                x_axis: tuple, y_range: tuple[float, float] | None) -> None:
    """One panel of draw_panels at origin (its top-left pixel). The data sit INSET pixels inside
    the frame, so that points at the ends of the axes stay visible."""
    (title, y_label, lines), (to_axis, span, x_ticks, x_label) = panel, x_axis
    draw, font, (x0, y0) = ImageDraw.Draw(image), _font(), origin
    box = (x0 + LEFT, y0 + TOP, x0 + PANEL_W - RIGHT, y0 + PANEL_H - BOTTOM)
    err = lambda p: p[2] if len(p) > 2 else 0.0                                       # noqa: E731
    ys = [v for points in lines.values() for p in points for v in (p[1] - err(p), p[1] + err(p))]
    y_ticks = nice_ticks(*(y_range or (min(ys, default=0.0), max(ys, default=1.0))))
    lo, hi = y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        fraction = (to_axis(x) - span[0]) / (span[1] - span[0])
        return box[0] + INSET + (box[2] - box[0] - 2 * INSET) * fraction

    def py(y: float) -> float:                                     # clipped to the plot (y_range)
        y = min(hi, max(lo, y))
        return box[3] - INSET - (box[3] - box[1] - 2 * INSET) * (y - lo) / (hi - lo)

    for v in y_ticks:
        draw.line([box[0], py(v), box[2], py(v)], fill=(228, 228, 228))
        draw.text((box[0] - 6, py(v)), _tick_text(v, y_ticks), fill="black", font=font, anchor="rm")
    for v in x_ticks:
        draw.line([px(v), box[1], px(v), box[3]], fill=(228, 228, 228))
        draw.text((px(v), box[3] + 5), _tick_text(v, x_ticks), fill="black", font=font, anchor="mt")
    draw.rectangle(box, outline="black")
    draw.text((box[0], y0 + 8), title, fill="black", font=_font(14))
    draw.text(((box[0] + box[2]) / 2, box[3] + 24), x_label, fill="black", font=font, anchor="mt")
    label = Image.new("RGB", (int(draw.textlength(y_label, font=font)) + 4, 16), "white")
    ImageDraw.Draw(label).text((2, 1), y_label, fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (x0 + 4, int((box[1] + box[3] - label.height) / 2)))
    for name, points in reversed(lines.items()):        # the first line (e.g. 'main') on top
        points = sorted(points)
        xy = [(px(p[0]), py(p[1])) for p in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour[name], width=2, joint="curve")
        for (x, y), p in zip(xy, points):
            if err(p):
                draw.line([x, py(p[1] + err(p)), x, py(p[1] - err(p))], fill=colour[name], width=2)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour[name])
    for n, name in enumerate(lines):                    # the legend: a swatch and the label
        top = box[1] + 4 + 18 * n
        if top + 14 <= box[3]:
            draw.line([box[2] + 10, top + 7, box[2] + 30, top + 7], fill=colour[name], width=3)
            fits = draw.textlength(name, font=font) <= RIGHT - 42
            draw.text((box[2] + 36, top), name if fits else name[:RIGHT // 8] + "...", fill="black",
                      font=font)


# The curves of a run: every key of the step records that is a loss, a temperature or an in-batch
# accuracy (losses.tower_loss's names), then every evaluation metric, one panel each with a line per
# set of embeddings (main, tower3, mix@a), against the step.
STEP_PANELS = (("losses", "loss", "loss"), ("temperatures", "t = exp(s)", "t"),
               ("in-batch top-1 (training)", "accuracy", "acc"))     # (title, y label, key stem)
CURVES_COLUMNS = 4


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; ValueError naming the file and line of one not JSON."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}, line {n}: not a JSON record ({e})") from None
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]


def curve_panels(records: Sequence[dict]) -> list[Panel]:
    """The panels of draw_curves from metrics.jsonl records. A step logged twice (a resumed run logs
    again the steps after its last checkpoint) keeps its latest value."""
    number = lambda v: isinstance(v, (int, float)) and math.isfinite(v)              # noqa: E731
    panels = []
    for title, y_label, stem in STEP_PANELS:               # 'loss' and 'loss/fg', ...; 't/fg', ...
        lines: dict[str, dict] = {}
        for r in records:
            for key, v in r.items():
                if "eval" not in r and (key == stem or key.startswith(stem + "/")) and number(v):
                    lines.setdefault(key, {})[r["step"]] = v
        if lines:
            panels.append((title, y_label,
                           {k: sorted(v.items()) for k, v in sorted(lines.items())}))
    metrics: dict[str, dict] = {}
    for r in records:
        if isinstance(r.get("eval"), dict):
            for rec in to_records({k: v for k, v in r["eval"].items() if number(v)}):
                view = rec["embeddings"] if rec["alpha"] is None else f"mix@{rec['alpha']:g}"
                metric = f"{rec['task']}/{rec['metric']}"
                metrics.setdefault(metric, {}).setdefault(view, {})[r["step"]] = rec["value"]
    for metric, lines in metrics.items():
        unit = " (%)" if metric.split("/")[0] in TASKS else ""
        panels.append((metric, metric.rsplit("/", 1)[-1] + unit,
                       {view: sorted(p.items()) for view, p in lines.items()}))
    return panels


def draw_curves(metrics_path: str, out: str | None = None) -> tuple[str, tuple[int, int]]:
    """Draw a run's metrics.jsonl as small multiples against the step (curve_panels, draw_panels):
    out, by default curves.png beside it. Returns (path, (width, height)); FileNotFoundError or
    ValueError (one line) for a missing file or one without a record to draw."""
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"metrics file not found: {metrics_path}")
    panels = curve_panels(read_metrics(metrics_path))
    if not panels:
        raise ValueError(f"{metrics_path} has no record to draw (expected JSON lines with a 'step' "
                         f"and 'loss', 't/...' or an 'eval' dict, as train.py writes)")
    out = out or os.path.join(os.path.dirname(os.path.abspath(metrics_path)), "curves.png")
    return out, draw_panels(out, panels, columns=CURVES_COLUMNS)


def curves_command(metrics_path: str, out: str | None = None) -> dict[str, float]:
    """`python eval.py --curves METRICS_JSONL [--out PNG]`: draw_curves; a problem is one line
    (exit 1). Returns no metrics."""
    try:
        path, size = draw_curves(metrics_path, out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"eval.py: error: {' '.join(str(e).split())}") from None
    print(f"wrote {path} ({size[0]}x{size[1]} pixels)")
    return {}


def write_curves(run_dir: str) -> str | None:
    """curves.png of a finished run from its metrics.jsonl (train.py, rank 0, once the log is
    closed). A picture must never fail a finished run: any failure is one warning line on stderr."""
    try:
        return draw_curves(os.path.join(run_dir, "metrics.jsonl"))[0]
    except Exception as e:  # noqa: BLE001 - the run's checkpoint and metrics are already written
        print(f"warning: could not draw {os.path.join(run_dir, 'curves.png')}: {type(e).__name__}: "
              f"{' '.join(str(e).split())}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# 8. The command line (model.load_trained rebuilds the checkpoint's model)
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--checkpoint", default=None, help="a ckpt.pt written by train.py (format "
        f"'{CHECKPOINT_FORMAT}'); required unless --curves")
    add("--curves", default=None, metavar="METRICS_JSONL", help="only draw a run's metrics.jsonl "
        "(losses, temperatures, evaluations against the step) as a PNG: --out, else curves.png "
        "beside it")
    add("--tasks", default="zeroshot,retrieval,fewshot", help=f"comma list of {TASKS}")
    add("--zeroshot-data", default="shapes", help=f"{ZEROSHOT_SPECS} (CIFAR in torchvision's format). "
        "CLASSNAMES_FILE: one name per line, the k-th naming ROOT's k-th class folder in sorted "
        "(alphabetical) order. imagenet:ROOT: the ILSVRC-2012 val set as 1,000 WordNet-id folders, "
        "torchvision's class names, top-1/top-5")
    add("--fewshot-data", default="shapes", help=f"{FEWSHOT_SPECS} (imagefolder: probe trained on "
        "ROOT/train, scored on ROOT/test or ROOT/val; cifar: the train / test split)")
    add("--retrieval-data", default="shapes", help=f"{RETRIEVAL_SPECS} (CSV rows with the same "
        "image path are one image with several captions; karpathy: dataset_coco.json or "
        "dataset_flickr30k.json, the images of SPLIT (e.g. test) at IMAGE_ROOT/filepath/filename, "
        "five captions each)")
    add("--num-images", type=int, default=500, help="shapes test images (files are used whole)")
    add("--seed", type=int, default=0, help="shapes world seed of the evaluation images")
    add("--embeddings", default="main,tower3,mix", help="views to score with; clip and lit have "
        "only main")
    add("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
        help="mix sweep: s_alpha = alpha main + (1-alpha) tower3 (3t only)")
    add("--shots", default="1,5,10", help="few-shot k (examples per class)")
    add("--fewshot-seeds", type=int, default=3, help="few-shot draws averaged per k")
    add("--fewshot-lambda", type=float, default=FEWSHOT_LAMBDA, help="ridge strength (fixed)")
    add("--tower3", default=None, help="replace the checkpoint's third-tower spec (a moved file)")
    add("--csv-keys", default=None, help="IMAGE_COLUMN,CAPTION_COLUMN of --retrieval-data "
        "(default: the training run's, else filepath,title as open_clip)")
    add("--batch-size", type=int, default=256, help="images or texts per forward pass")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add("--out", default=None, help="JSON records (default: <ckpt dir>/eval_<ckpt stem>.json); "
        "with --curves the PNG")
    add("--save-grid", default=None, help="PNG: text queries above their top-5 retrieved images")
    add("--grid-queries", default=None, help="';'-separated queries for --save-grid (default: "
        "one caption of each of the first 4 retrieval images)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    return p


RANGES = {"num_images": "[1, inf)", "seed": "[0, inf)", "fewshot_seeds": "[1, inf)", "fewshot_lambda": "(0, inf)",
          "batch_size": "[1, inf)", "shots": f"[1, {FEWSHOT_POOL_PER_CLASS}]", "alphas": "[0, 1]"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, checked: comma lists parsed and known, every number in its range (RANGES)."""
    p = build_parser()
    args = p.parse_args(argv)
    for flag, allowed in (("tasks", TASKS), ("embeddings", VIEWS)):
        if set(getattr(args, flag).split(",")) - set(allowed):
            p.error(f"--{flag} {getattr(args, flag)!r}: expected a comma list of {', '.join(allowed)}")
    for flag, kind in (("shots", int), ("alphas", float)):
        try:
            setattr(args, flag, [kind(x) for x in getattr(args, flag).split(",")])
        except ValueError:
            p.error(f"--{flag} {getattr(args, flag)!r}: expected comma-separated {kind.__name__}s")
    check_ranges(p, args, RANGES)
    if (args.checkpoint is None) == (args.curves is None):
        p.error("expected one of --checkpoint CKPT (evaluate) or --curves METRICS_JSONL (draw)")
    for flag, task in (("zeroshot_data", "zeroshot"), ("retrieval_data", "retrieval"),
                       ("fewshot_data", "fewshot")):
        try:                            # the data of every task, before any work (never skipped)
            check_source(task, getattr(args, flag))
        except (OSError, ValueError) as e:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {' '.join(str(e).split())}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.curves:
        return curves_command(args.curves, args.out)
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{stem}.json")
    try:
        for flag, path in (("--out", out), ("--save-grid", args.save_grid)):
            problem = path and unwritable(flag, os.path.dirname(os.path.abspath(path)))
            if problem:
                raise ValueError(problem)
        model, tower3, ckpt = load_trained(args.checkpoint, args.tower3)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: error: {e}") from None
    model.to(args.device)
    tower3 = tower3.to(args.device) if tower3 is not None else None
    train, config = ckpt.get("args") or {}, ckpt["model_config"]
    csv_keys = (args.csv_keys or f"{train.get('csv_img_key', 'filepath')},"
                f"{train.get('csv_caption_key', 'title')}").split(",")
    try:
        suite = build_eval_suite(
            tokenizer=Tokenizer.from_dict(ckpt["tokenizer"]), num_images=args.num_images,
            image_size=train.get("image_size") or config.get("image_size", 64), seed=args.seed,
            tasks=args.tasks.split(","), zeroshot_data=args.zeroshot_data, retrieval_data=args.retrieval_data,
            fewshot_data=args.fewshot_data, csv_keys=(*csv_keys, train.get("csv_separator")))
    except (FileNotFoundError, ValueError) as e:       # a missing file, a bad names file or CSV
        raise SystemExit(f"eval.py: error: {e}") from None
    suite.shots = tuple(args.shots)
    suite.fewshot_seeds, suite.fewshot_lambda = args.fewshot_seeds, args.fewshot_lambda
    embeddings, alphas = args.embeddings.split(","), args.alphas
    view_list = views(model.mode, alphas, embeddings)
    print(f"{model.mode} checkpoint {args.checkpoint} (trained on {train.get('train_data', '?')}): "
          f"scoring with {', '.join(dict.fromkeys(v for _, v, _ in view_list))}"
          + ("" if model.mode == "3t" else " (only the main embeddings exist in this mode)"))
    try:
        results = evaluate(model, tower3, suite, device=args.device, batch_size=args.batch_size,
                           alphas=alphas, progress=args.progress, embeddings=embeddings)
    except (DataError, ValueError) as e:     # an unusable image (never substituted); too few probe examples
        raise SystemExit(f"eval.py: error: {e}") from None
    print(format_table(results))
    with open(out, "w") as f:
        json.dump(to_records(results), f, indent=1)
    print(f"wrote {out}")
    if args.save_grid and suite.retrieval is not None and view_list:
        owner = suite.retrieval.caption_image.tolist()
        queries = args.grid_queries.split(";") if args.grid_queries else \
            [suite.retrieval.captions[owner.index(i)] for i in sorted(set(owner))[:4]]
        _, view, alpha = view_list[0]
        size = save_retrieval_grid(args.save_grid, model, tower3, suite, queries,
                                   device=args.device, view=view, alpha=alpha,
                                   batch_size=args.batch_size)
        print(f"wrote {args.save_grid} ({size[0]}x{size[1]} pixels, scored with {view})")
    if "nonfinite/embeddings" in results:
        raise SystemExit(f"eval.py: error: {results['nonfinite/embeddings']:.1f}% of the embeddings of "
                         f"{args.checkpoint} are not finite (NaN/inf); its metrics count them as misses")
    return results


if __name__ == "__main__":
    main()
