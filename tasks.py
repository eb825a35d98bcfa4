"""The evaluation tasks: which images, captions, class names and prompts each task scores, built once.

Kossen et al. 2023 (Sec. 5) evaluate on three task families; eval.py scores a model on them:
    zero-shot classification   labelled images + class names + prompts per class
    retrieval                  images with several captions each (COCO / Flickr30k style)
    few-shot linear probe      a probe-train pool and probe-test images with the same classes
`build_eval_suite` builds them from the shapes world (shapes.py: its test split, its own prompts)
or from files: an ImageFolder with a class-name file, CIFAR-10/100, a CSV of image paths and captions.
Nothing here depends on a model, so train.py builds the suite once and evaluates it many times.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import find_classes

from data import CsvPairs, LabelledImages, RetrievalSet, image_folder, image_transform
from shapes import ShapesLabelled, shapes_retrieval, zeroshot_tasks
from tokenizer import Tokenizer

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
    notes: list[str] = field(default_factory=list)


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


ZEROSHOT_SPECS = "shapes | imagefolder:ROOT:CLASSNAMES_FILE | cifar10:ROOT | cifar100:ROOT"
RETRIEVAL_SPECS = "shapes | a .csv/.tsv of image paths and captions"


def parse_zeroshot(spec: str) -> tuple[str, str, str | None]:
    """(kind, root, class-name file or None) of a zero-shot spec in ZEROSHOT_SPECS' syntax; ValueError if
    it is none of them. The one parser of that syntax, for eval.py's and train.py's --zeroshot-data."""
    if spec == "shapes":
        return "shapes", "", None
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and ":" in rest:
        root, _, names_file = rest.rpartition(":")
        return kind, root, names_file
    if kind in ("cifar10", "cifar100") and rest:
        return kind, rest, None
    raise ValueError(f"zero-shot data {spec!r}: use shapes, imagefolder:ROOT:CLASSNAMES_FILE, "
                     f"cifar10:ROOT or cifar100:ROOT")


def check_source(task: str, spec: str) -> None:
    """Fail fast (FileNotFoundError, ValueError) on a zero-shot or retrieval spec that cannot work: its
    syntax, that its folders and files exist, and that an ImageFolder's class-name file names its class
    folders -- without reading an image, so a trainer can check its flags before any work."""
    if task == "retrieval":
        if spec != "shapes" and not spec.lower().endswith((".csv", ".tsv")):
            raise ValueError(f"retrieval data {spec!r}: use shapes or a .csv/.tsv of image paths and captions")
        if spec != "shapes" and not os.path.isfile(spec):
            raise FileNotFoundError(f"caption file not found: {spec}")
        return
    kind, root, names_file = parse_zeroshot(spec)
    if kind != "shapes" and not os.path.isdir(root):
        raise FileNotFoundError(f"{'image folder' if names_file else kind + ' folder'} not found: {root}")
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
    if kind == "imagefolder":
        data, classes = imagefolder_zeroshot(root, names_file, image_size)
    else:
        data, classes = cifar_zeroshot(kind, root, image_size)
    return {kind: (data, classes, prompts_of(classes))}


def fewshot_sets(spec: str, image_size: int, seed: int, test: Dataset | None = None,
                 num_images: int = 500) -> dict[str, tuple[Dataset, Dataset]]:
    """Task -> (probe-train pool, probe-test images). 'shapes': the 'object' task, pool from split 'val', test
    images from 'test' (`test` if given), disjoint by construction. imagefolder:ROOT: ROOT/train is the pool,
    ROOT/test (or ROOT/val) is scored, with the same class folders. cifar10:ROOT / cifar100:ROOT: the train and
    test splits. Pools keep FEWSHOT_POOL_PER_CLASS seeded images per class: only those are embedded."""
    if spec == "shapes":
        test = test if test is not None else ShapesLabelled("test", num_images, label="object", seed=seed,
                                                            image_size=image_size)
        return {"object": (ShapesLabelled("val", FEWSHOT_POOL_PER_CLASS * test.num_classes, label="object",
                                          seed=seed, image_size=image_size), test)}
    kind, _, root = spec.partition(":")
    if kind == "imagefolder" and root:
        splits = [os.path.join(root, s) for s in ("train", "test", "val") if os.path.isdir(os.path.join(root, s))]
        if len(splits) < 2 or not splits[0].endswith("train"):
            raise FileNotFoundError(f"few-shot data {spec!r}: expected class folders under {root}/train and "
                                    f"{root}/test (or {root}/val)")
        pool, test = (image_folder(d, image_transform(image_size, train=False)) for d in splits[:2])
        if pool.classnames != test.classnames:
            raise ValueError(f"few-shot data {spec!r}: {splits[0]} and {splits[1]} have different class folders")
    elif kind in ("cifar10", "cifar100") and root:
        pool, test = (cifar_zeroshot(kind, root, image_size, train=train)[0] for train in (True, False))
    else:
        raise ValueError(f"few-shot data {spec!r}: use shapes, imagefolder:ROOT, cifar10:ROOT or cifar100:ROOT")
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


def build_eval_suite(spec: str = "shapes", *, tokenizer: Tokenizer, image_size: int,
                     num_images: int = 500, seed: int = 0,
                     tasks: Sequence[str] = ("zeroshot", "retrieval"),
                     zeroshot_data: str | None = None, retrieval_data: str | None = None,
                     fewshot_data: str | None = None,
                     csv_keys: tuple[str, str, str | None] = ("filepath", "title", None)
                     ) -> EvalSuite:
    """Build the datasets once. `spec` names the data of every task; zeroshot_data / retrieval_data /
    fewshot_data override it per task. 'shapes' = the shapes world's split 'test' (num_images images,
    `seed`); a .csv/.tsv serves retrieval only; imagefolder:/cifar: serve zero-shot and few-shot
    (fewshot_sets says which split does what)."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown eval task(s) {sorted(unknown)}; choose from {TASKS}")
    suite = EvalSuite(tokenizer)
    zs_spec, rt_spec = zeroshot_data or spec, retrieval_data or spec
    if "zeroshot" in tasks and zs_spec.lower().endswith((".csv", ".tsv")):
        suite.notes.append(f"zero-shot skipped: {zs_spec} has captions, not class labels")
    elif "zeroshot" in tasks:
        suite.zeroshot = zeroshot_sets(zs_spec, image_size, num_images, seed)
    if "retrieval" in tasks and rt_spec == "shapes":
        suite.retrieval = shapes_retrieval(num_images, CAPTIONS_PER_IMAGE, seed=seed,
                                           image_size=image_size)
    elif "retrieval" in tasks and rt_spec.lower().endswith((".csv", ".tsv")):
        suite.retrieval = csv_retrieval(rt_spec, image_size=image_size,
                                        img_key=csv_keys[0], caption_key=csv_keys[1],
                                        separator=csv_keys[2])
    elif "retrieval" in tasks:
        suite.notes.append(f"retrieval skipped: {rt_spec} has class labels, not captions")
    if suite.retrieval is not None:
        suite.retrieval_tokens = tokenizer.encode(suite.retrieval.captions)
    fs_spec = fewshot_data or spec
    if "fewshot" in tasks and fs_spec.lower().endswith((".csv", ".tsv")):
        suite.notes.append(f"few-shot skipped: {fs_spec} has captions, not class labels")
    elif "fewshot" in tasks:
        shared = suite.zeroshot["object"][0] if zs_spec == "shapes" and "object" in suite.zeroshot else None
        suite.fewshot = fewshot_sets(fs_spec, image_size, seed, shared, num_images)    # shapes: embedded once
    return suite
