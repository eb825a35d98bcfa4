"""Data, in three parts after what they share (image helpers and the tokenizer):

1. The shapes world: an embedded procedural world of image-text pairs and labelled images, no
   download. 3T (Kossen et al. 2023) trains image and text towers on web pairs while the frozen third
   tower comes from a classifier pretrained on labelled images: JFT or ImageNet-21k, whose labels
   name much of what captions say, or Places365, whose scene labels name little (there 3T beats LiT).
   The world reproduces that in miniature:
     paired data     -> ShapesPairs (captions in varied templates, optional web-like caption noise)
     labelled data   -> ShapesLabelled: "object" labels (shape x colour, like JFT) or "scene" labels
                        (background only, like Places365)
     test tasks      -> zeroshot_tasks() + ShapesLabelled(split="test"), shapes_retrieval()
2. File readers: a CSV/TSV of image paths and captions (open_clip's keys), img2dataset/WebDataset tar
   shards read with the standard library, and ImageFolder class folders.
3. Loaders: one rank's share of the data per epoch, resumable mid-epoch; `collate` stacks items and
   turns captions into token ids.

Items are dicts of plain tensors and strings. Images use one normalisation: ImageNet mean/std.
"""
from __future__ import annotations

import array
import copy
import csv
import functools
import glob
import hashlib
import heapq
import io
import json
import logging
import os
import re
import stat
import tarfile
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

logger = logging.getLogger("data")

# ==================================================================================================
# Shared: images and the tokenizer
# ==================================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: Tensor) -> Tensor:
    """uint8 [..., 3, H, W] -> float32, ImageNet-normalised (the same numbers as `image_transform`)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=None)
def image_transform(image_size: int, train: bool) -> Callable[[Tensor], Tensor]:
    """uint8 [..., 3, H, W] -> normalised float [..., 3, S, S].

    Train: random resized crop with scale (0.9, 1) (open_clip's default): captions name positions and
    objects, and heavy crops would make them false. Eval: resize the short side, centre crop; this is
    deterministic, which is what lets the frozen third tower's embeddings be cached (DESIGN.md).
    """
    if train:
        geometry = v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), antialias=True)
    else:
        geometry = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# What the third tower h sees -- in training, in its cache and in evaluation alike (DESIGN.md "Efficiency"): the
# whole image, short side resized to h's input size, centre crop, ImageNet mean/std (the statistics of every
# tower load_tower3 builds: torchvision's classifiers and this project's own). Never f's augmented crop.
TOWER3_VIEW = "short side resized to h's size, centre crop, ImageNet mean/std"   # in the h cache's fingerprint


def tower3_view(images: Tensor, size: int) -> Tensor:
    """h's view of uint8 image(s) [..., 3, H, W]: normalised float [..., 3, size, size]."""
    return image_transform(size, False)(images)


def seeded(transform: Callable[[Tensor], Tensor], image: Tensor, *key: int) -> Tensor:
    """transform(image) under torch's CPU RNG seeded by key = (seed, epoch, sample): a random crop that depends
    on neither the worker or rank that draws the sample nor on earlier draws, so a resumed run sees the crops
    of an uninterrupted one. The caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
        return transform(image)


# Size limits checked before any decoding (--max-image-pixels, --max-file-bytes): a 100 KB PNG can decode to
# gigabytes, a 10 KB tar can hold a 3 GB sparse member.
MAX_IMAGE_PIXELS = 2**26      # 67M pixels, e.g. 8192 x 8192
MAX_FILE_BYTES = 2**28        # 256 MiB per image file or tar member


class DataError(ValueError):
    """Bad input data; the message names the file or shard and what was expected."""


class TooLarge(DataError):
    """A sample over a size limit: never decoded; skipped and counted as 'too_large' in training."""


def decode_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Encoded JPEG/PNG/WebP/GIF bytes -> uint8 [3, H, W]; raises on corrupt or truncated data, and raises
    TooLarge before decoding when the header (read lazily by PIL, no pixels) announces more than max_pixels.

    torchvision >= 0.29 marks its decoders deprecated in favour of torchcodec, a package this
    project may not depend on; they still work, so the warning (once per image) is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except Image.DecompressionBombError as e:     # PIL's own limit, ~179M pixels
            raise TooLarge(f"more than --max-image-pixels {max_pixels} ({e})") from None
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} = {width * height} pixels, more than --max-image-pixels {max_pixels}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*image decoding and encoding")
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image[0] if image.dim() == 4 else image      # an animated GIF: its first frame


def skip_reason(error: Exception) -> str:
    return "too_large" if isinstance(error, TooLarge) else "decode_error"


# ----------------------------------------------------------------------------- the tokenizer


# Merges never cross these chunks: an optional space and a run of letters, digits or non-ASCII bytes (so no
# UTF-8 character is ever split between chunks), an optional space and a run of other symbols, or spaces.
_CHUNK = re.compile(rb" ?[A-Za-z0-9\x80-\xff]+| ?[^A-Za-z0-9\x80-\xff\s]+|\s+")


class Tokenizer:
    """Byte-level BPE: UTF-8 bytes, with frequent byte sequences merged into single tokens (Sennrich et
    al. 2016; on bytes, as in GPT-2 and CLIP). The merges are learned from the training captions
    (`learn`) and stored with the run, so no vocabulary file is needed and no text is ever unknown: what
    the merges do not cover stays bytes. With no merges it is a plain byte tokenizer.

    Why merges: a shapes caption is ~73 bytes but ~15 BPE tokens, so the text tower costs several times
    less per caption, and it learns from the first steps (a word is one token, not a dozen bytes).

    Ids: 0..255 bytes, 256 BOS, 257 EOS, 258 PAD, 259 + k merge k. A row is BOS, ids..., EOS, PAD...
    of length context_length; truncation keeps EOS (the text tower pools there, and its causal mask
    makes what follows irrelevant) and never cuts a UTF-8 character in two.
    """

    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, context_length: int = 128, merges: Sequence[Sequence[int]] = ()):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 (BOS, a token, EOS), got {context_length}")
        self.context_length, self.merges = context_length, []
        self.pieces = [bytes([i]) for i in range(256)] + [b"", b"", b""]     # the bytes of each id
        for k, (a, b) in enumerate(merges):
            if not all(type(x) is int and (x < 256 or 259 <= x < 259 + k) and x >= 0 for x in (a, b)):
                raise ValueError(f"merge {k} {(a, b)} names an id that is neither a byte nor an earlier merge")
            self.merges.append((a, b))
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self.rank = {pair: k for k, pair in enumerate(self.merges)}
        self.vocab_size = len(self.pieces)
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def learn(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> Tokenizer:
        """Merge the most frequent adjacent pair of tokens (ties: the smallest pair) again and again,
        until vocab_size ids exist or no pair occurs twice. Deterministic. Each distinct chunk is kept
        once with its count, and a merge revisits only the chunks that hold its pair, updating the
        pair counts by difference: thousands of merges over 100k captions take seconds."""
        freq = Counter(chunk for text in texts for chunk in _CHUNK.findall(_utf8(text)))
        words, counts = [list(w) for w in freq], list(freq.values())
        pairs: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = defaultdict(set)      # pair -> chunks that may hold it
        for w, ids in enumerate(words):
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[w]
                where[pair].add(w)
        heap = [(-n, pair) for pair, n in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while 259 + len(merges) < vocab_size and heap:
            n, pair = heapq.heappop(heap)
            if -n != pairs[pair]:
                continue                                  # an outdated count; the current one is queued
            if -n < 2:
                break
            merges.append(pair)
            changed = set()
            for w in where.pop(pair):
                old, ids = words[w], _merge(words[w], pair, 258 + len(merges))
                words[w] = ids
                for p in zip(old, old[1:]):
                    pairs[p] -= counts[w]
                for p in zip(ids, ids[1:]):
                    pairs[p] += counts[w]
                    where[p].add(w)
                changed.update(zip(old, old[1:]), zip(ids, ids[1:]))
            for p in changed:
                heapq.heappush(heap, (-pairs[p], p))
        return cls(context_length, merges)

    def tokens(self, text: str | bytes) -> list[int]:
        """Ids of one text, without BOS/EOS, untruncated."""
        data = _utf8(text)
        if not self.merges:
            return list(data)
        ids, cached = [], self._cache.get
        for chunk in _CHUNK.findall(data):
            ids += cached(chunk) or self._chunk(chunk)
        return ids

    def _chunk(self, chunk: bytes) -> list[int]:
        """Apply the earliest-learned merge that occurs, until none does (memoised: words repeat)."""
        ids = list(chunk)
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, len(self.rank)))
            if pair not in self.rank:
                break
            ids = _merge(ids, pair, 259 + self.rank[pair])
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode(self, texts: str | bytes | Sequence[str | bytes]) -> Tensor:
        """Text(s) -> LongTensor (N, context_length); a single str/bytes gives N = 1."""
        if isinstance(texts, (str, bytes, bytearray)):
            texts = [texts]
        width, flat = self.context_length, array.array("q")       # all rows, one conversion at the end
        for text in texts:
            ids = self.tokens(text)
            if len(ids) > width - 2:     # keep EOS; back off while the first dropped token continues a character
                cut = width - 2
                while cut > width - 5 and cut > 0 and self.pieces[ids[cut]][0] & 0xC0 == 0x80:
                    cut -= 1
                ids = ids[:cut]
            flat.append(self.BOS)
            flat.extend(ids)
            flat.append(self.EOS)
            flat.extend([self.PAD] * (width - 2 - len(ids)))
        return torch.frombuffer(flat, dtype=torch.long).clone().view(len(texts), width) if texts \
            else torch.empty(0, width, dtype=torch.long)

    @classmethod
    def trim(cls, ids: Tensor) -> Tensor:
        """Cut a batch (N, L) after its longest caption: the columns that are PAD in every row cannot
        change the EOS-pooled embedding, only cost compute. Call on CPU ids (no device sync)."""
        return ids[:, : int((ids != cls.PAD).sum(1).max())]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """One row of ids -> text, for display; stops at EOS; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i == self.EOS:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary of size {self.vocab_size}")
            out += self.pieces[i]                         # BOS and PAD have no bytes
        return out.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild this tokenizer exactly: plain ints and lists."""
        return {"context_length": self.context_length, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        try:
            return cls(d["context_length"], [tuple(m) for m in d["merges"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a stored tokenizer ({type(e).__name__}: {e})") from None


def _utf8(text: str | bytes) -> bytes:
    # errors="replace": a lone surrogate (e.g. from a file name) becomes "?" instead of a crash
    return text.encode("utf-8", errors="replace") if isinstance(text, str) else bytes(text)


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """ids with each occurrence of `pair`, left to right without overlaps, replaced by `new`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ==================================================================================================
# Part 1. The shapes world
# ==================================================================================================
# ----------------------------------------------------------------------------- vocabulary and labels

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SCENES = ("plain", "striped", "checkered", "dotted", "gradient", "speckled")

_RGB = np.array([[220, 40, 40], [40, 170, 60], [40, 80, 220], [235, 210, 40], [140, 60, 190], [245, 135, 20],
                 [40, 200, 215]], np.float32)  # saturated object colours, one row per COLOURS entry
_BG_RGB = np.array([[25, 25, 25], [80, 80, 80], [140, 140, 140], [200, 200, 200], [110, 90, 70], [210, 195, 160]],
                   np.float32)  # muted background colours, so objects stay visible
_RADIUS = np.array([0.10, 0.15, 0.20], np.float32)  # per SIZES, as a fraction of the image side
_SECOND_OBJECT_P = 0.3  # paired images only; labelled images show one object (ShapesLabelled)
_NOISE_TILES = 4

# Words a caption may use for each attribute value (synonyms keep text towers from memorising one form).
CAPTION_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
              "diamond": ("diamond", "rhombus"), "cross": ("cross",)},
    "colour": {c: (c,) for c in COLOURS},
    "size": {"small": ("small", "tiny", "little"), "medium": ("medium", "mid-size"), "large": ("large", "big")},
    "position": {"top left": ("at the top left", "in the upper left"), "top": ("at the top", "up top"),
                 "top right": ("at the top right", "in the upper right"), "left": ("on the left", "at the left"),
                 "center": ("in the center", "in the middle"), "right": ("on the right", "at the right"),
                 "bottom left": ("at the bottom left", "in the lower left"), "bottom": ("at the bottom", "down below"),
                 "bottom right": ("at the bottom right", "in the lower right")},
    "scene": {"plain": ("plain", "blank"), "striped": ("striped", "stripy"), "checkered": ("checkered", "checked"),
              "dotted": ("dotted", "polka-dot"), "gradient": ("gradient", "fading"),
              "speckled": ("speckled", "grainy")},
}
# The main object is always described before the optional second one ({second}), so "first colour word"
# etc. identify it. With the longest words every template stays <= 126 bytes (fits context 128).
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {pos}{second} on a {scene} background",
    "on a {scene} background, a {size} {colour} {shape} {pos}{second}",
    "{pos} there is a {size} {colour} {shape}{second}, {scene} background",
    "a {colour} {shape}, {size}, {pos}{second}; {scene} background",
    "a {scene} background with a {size} {colour} {shape} {pos}{second}",
    "{size} {colour} {shape} {pos}{second} over a {scene} backdrop",
    "the {shape} is {colour} and {size}, {pos}{second}, {scene} background",
    "photo of a {size} {shape} in {colour} {pos}{second}, {scene} background",
    "{pos}: a {colour} {size} {shape}{second} on a {scene} backdrop",
)
_SECOND_TEMPLATE = "{conn} a {colour} {shape} {pos}"  # no size word: "size" always means the main object
_CONNECTIVES = (" and", " by", ", with")


_POS_PHRASE = {p: CAPTION_WORDS["position"][p][0] for p in POSITIONS}
LABELS: dict[str, tuple[list[str], Callable[[int], dict[str, int]]]] = {  # class names; the attributes class k fixes
    "object": ([f"{c} {s}" for s in SHAPES for c in COLOURS],  # label = shape * len(COLOURS) + colour
               lambda k: {"shape": k // len(COLOURS), "colour": k % len(COLOURS)}),
    "position_size": ([f"{z} object {_POS_PHRASE[p]}" for p in POSITIONS for z in SIZES],  # pos * 3 + size
                      lambda k: {"position": k // len(SIZES), "size": k % len(SIZES)}),
    "scene": ([f"{s} background" for s in SCENES], lambda k: {"scene": k}),
}


def zeroshot_tasks(prompts: int = 24) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Task -> (class names in label order, `prompts` prompts per class), for the shapes world.

    A prompt is a caption in the world's own grammar that names the class and draws everything else
    (other attributes, template, synonyms) at random, seeded; a class's text embedding is the mean
    over its prompts. This is CLIP's prompt ensembling (Radford et al. 2021, Sec. 3.1.4) with prompts
    that read like the training captions, which always name size, colour, shape, position and scene:
    a bare "a red circle." is a text the text tower has never seen.
    """
    out = {}
    for t, (name, (classnames, fixed)) in enumerate(LABELS.items()):
        rng = np.random.default_rng([t, 4099])
        per_class = []
        for k in range(len(classnames)):
            draws = [{"shape": rng.integers(len(SHAPES)), "colour": rng.integers(len(COLOURS)),
                      "size": rng.integers(len(SIZES)), "position": rng.integers(len(POSITIONS)),
                      "scene": rng.integers(len(SCENES)), "second": None, **fixed(k)} for _ in range(prompts)]
            per_class.append([_describe(d, rng, [rng.integers(len(CAPTION_TEMPLATES))])[0] for d in draws])
        out[name] = (classnames, per_class)
    return out


def _describe(d: dict[str, Any], rng: np.random.Generator, templates: Sequence[int]) -> list[str]:
    """Captions of the attribute draw d, one per template index; words and connectives drawn from rng."""
    pick = lambda options: options[int(rng.integers(len(options)))]
    word = lambda attr, names, value: pick(CAPTION_WORDS[attr][names[value]])
    out = []
    for t in templates:
        second, o = "", d["second"]
        if o:
            second = _SECOND_TEMPLATE.format(conn=pick(_CONNECTIVES), colour=COLOURS[o["colour"]],
                                             shape=word("shape", SHAPES, o["shape"]),
                                             pos=word("position", POSITIONS, o["position"]))
        out.append(CAPTION_TEMPLATES[t].format(
            size=word("size", SIZES, d["size"]), colour=COLOURS[d["colour"]], second=second,
            shape=word("shape", SHAPES, d["shape"]), pos=word("position", POSITIONS, d["position"]),
            scene=word("scene", SCENES, d["scene"])))
    return out


# ----------------------------------------------------------------------------- the generator


class ShapesWorld:
    """Deterministic procedural world. Splits are disjoint index ranges.

    Every sample is a pure function of (seed, split offset + index): any rank or worker can make any
    sample and nothing is stored. Attributes are drawn per sample (cheap scalar draws), then a whole
    batch is painted with vectorised numpy masks on a coordinate grid.
    """

    SPLIT_SIZE = 10**8
    SPLITS: dict[str, int] = {"train": 0, "pretrain": 10**8, "test": 2 * 10**8, "val": 3 * 10**8}

    def __init__(self, seed: int = 0, image_size: int = 64):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.seed, self.image_size = seed, image_size
        s = image_size
        grid = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
        x, y = np.broadcast_to(grid[None, :], (s, s)), np.broadcast_to(grid[:, None], (s, s))
        self._grid = grid
        self._coords = np.stack([x, y, (x + y) / np.sqrt(2)])  # (3, S, S): horizontal, vertical, diagonal
        self._ramps = self._coords / self._coords.max(axis=(1, 2), keepdims=True)  # the same, scaled to [0, 1]
        # Per-pixel noise comes from a few seeded tiles cropped at a per-sample offset: as random-looking
        # as fresh noise per image, but ~50x cheaper than drawing 3*S*S normals per sample.
        rng = np.random.default_rng([seed, 7919])
        self._noise = rng.standard_normal((_NOISE_TILES, 3, 2 * s, 2 * s), dtype=np.float32)
        self._high = np.array([len(SHAPES), len(COLOURS), len(SIZES), 9, len(SCENES), len(_BG_RGB),
                               len(_BG_RGB) - 1, len(SHAPES), len(COLOURS), 8, 3, 3, _NOISE_TILES, s, s, 3])

    def digest(self) -> str:
        """A fingerprint of what this world draws -- a few rendered images, captions and the label
        names -- for caches of anything learned from it (the auto-pretrained third tower)."""
        content = self.render_batch(range(4)).numpy().tobytes() + repr(
            [self.captions(i) for i in range(4)] + list(zeroshot_tasks().items())).encode()
        return hashlib.sha256(content).hexdigest()[:16]

    # --- attributes ---
    def _draw(self, index: int, split: str, single: bool = False) -> dict[str, Any]:
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {list(self.SPLITS)}")
        if not 0 <= index < self.SPLIT_SIZE:
            raise IndexError(f"index {index} outside [0, {self.SPLIT_SIZE})")
        rng = np.random.default_rng([self.seed, self.SPLITS[split] + index])
        k, u = rng.integers(0, self._high).tolist(), rng.random(8).tolist()
        second = None
        if u[0] < _SECOND_OBJECT_P and not single:  # a different grid cell than the main object
            second = {"shape": k[7], "colour": k[8], "position": (k[3] + 1 + k[9]) % 9, "size": k[15],
                      "jitter": (u[7] - 0.5, 0.5 - u[1])}
        return {"shape": k[0], "colour": k[1], "size": k[2], "position": k[3], "scene": k[4], "bg1": k[5],
                "bg2": (k[5] + 1 + k[6]) % len(_BG_RGB), "orient": k[10], "period": k[11], "tile": k[12],
                "oy": k[13], "ox": k[14], "jitter": (u[1] - 0.5, u[2] - 0.5), "tint": (u[3], u[4], u[5]),
                "noise": 2.0 + 10.0 * u[6], "second": second}

    def attributes(self, index: int, split: str = "train") -> dict[str, Any]:
        """Named attributes of one sample; 'second' is None or the second object's attributes."""
        d = self._draw(index, split)
        named = lambda o: {"shape": SHAPES[o["shape"]], "colour": COLOURS[o["colour"]],
                           "position": POSITIONS[o["position"]], "size": SIZES[o["size"]]}
        return {**named(d), "scene": SCENES[d["scene"]], "noise": d["noise"],
                "second": named(d["second"]) if d["second"] else None}

    @staticmethod
    def _labels(d: dict[str, Any]) -> dict[str, int]:
        """All label sets; labels always describe the main object (never the second one)."""
        return {"object": d["shape"] * len(COLOURS) + d["colour"], "scene": d["scene"],
                "position_size": d["position"] * len(SIZES) + d["size"], "shape": d["shape"],
                "colour": d["colour"], "size": d["size"], "position": d["position"]}

    # --- captions ---
    def captions(self, index: int, split: str = "train", n: int = 1) -> list[str]:
        """n distinct phrasings (different templates, synonyms) of the same image."""
        return self._captions(self._draw(index, split), index, split, n)

    def _captions(self, d: dict[str, Any], index: int, split: str, n: int) -> list[str]:
        if not 1 <= n <= len(CAPTION_TEMPLATES):
            raise ValueError(f"n must be in [1, {len(CAPTION_TEMPLATES)}], got {n}")
        rng = np.random.default_rng([self.seed, self.SPLITS[split] + index, 1])  # own stream: images unaffected
        return _describe(d, rng, rng.permutation(len(CAPTION_TEMPLATES))[:n])

    # --- images ---
    def sample(self, index: int, split: str = "train") -> dict[str, Any]:
        """One sample: image uint8 [3, S, S], a caption, all label sets, named attributes."""
        d = self._draw(index, split)
        return {"image": torch.from_numpy(self._paint([d]))[0], "caption": self._captions(d, index, split, 1)[0],
                "labels": self._labels(d), "attributes": self.attributes(index, split)}

    def render_batch(self, indices: Sequence[int], split: str = "train", single: bool = False) -> Tensor:
        """Fast path: uint8 [N, 3, S, S] for many indices at once."""
        return torch.from_numpy(self._paint([self._draw(int(i), split, single) for i in indices]))

    def _paint(self, draws: list[dict[str, Any]]) -> np.ndarray:
        """Attributes -> uint8 (N, 3, S, S). float32, channel-first and in place: this is the hot loop."""
        s = self.image_size
        col = lambda key, src=draws: np.array([d[key] for d in src])
        noise = np.stack([self._noise[d["tile"], :, d["oy"]:d["oy"] + s, d["ox"]:d["ox"] + s] for d in draws])
        phase = col("ox").astype(np.float32)  # stripe phase, reusing the noise offset
        mix = self._scene_mix(col("scene"), col("orient"), col("period"), phase, noise[:, 0])  # (N, S, S)
        bg1, bg2 = _BG_RGB[col("bg1")][:, :, None, None], _BG_RGB[col("bg2")][:, :, None, None]  # (N, 3, 1, 1)
        img = np.multiply(mix[:, None], bg2 - bg1)  # (N, 3, S, S)
        img += bg1
        # The second object is painted first so the labelled main object is never hidden.
        two = [i for i, d in enumerate(draws) if d["second"]]
        if two:
            objs = [draws[i]["second"] for i in two]
            mask = self._object_mask(col("shape", objs), col("position", objs), col("size", objs),
                                     col("jitter", objs))
            img[two] = np.where(mask[:, None], _RGB[col("colour", objs)][:, :, None, None], img[two])
        mask = self._object_mask(col("shape"), col("position"), col("size"), col("jitter"))
        rgb = np.clip(_RGB[col("colour")] + 40.0 * (col("tint") - 0.5), 0, 255).astype(np.float32)  # +-20
        np.copyto(img, rgb[:, :, None, None], where=mask[:, None])
        noise *= col("noise").astype(np.float32)[:, None, None, None]
        img += noise
        return np.clip(img, 0, 255, out=img).astype(np.uint8)

    def _object_mask(self, shape: np.ndarray, position: np.ndarray, size: np.ndarray,
                     jitter: np.ndarray) -> np.ndarray:
        """Boolean (N, S, S): shape k centred in grid cell `position` (3x3 grid, +-4% jitter)."""
        s, n = self.image_size, len(shape)
        cx = (0.2 + 0.3 * (position % 3) + 0.08 * jitter[:, 0]) * s
        cy = (0.2 + 0.3 * (position // 3) + 0.08 * jitter[:, 1]) * s
        r = (_RADIUS[size] * s)[:, None, None]
        dx = self._grid[None, None, :] - cx[:, None, None].astype(np.float32)  # (N, 1, S)
        dy = self._grid[None, :, None] - cy[:, None, None].astype(np.float32)  # (N, S, 1)
        ax, ay = np.abs(dx), np.abs(dy)
        mask = np.zeros((n, s, s), bool)
        for k in range(len(SHAPES)):
            sel = shape == k
            if not sel.any():
                continue
            a, b, y, rr = ax[sel], ay[sel], dy[sel], r[sel]
            if SHAPES[k] == "circle":
                m = a * a + b * b <= rr * rr
            elif SHAPES[k] == "square":
                m = np.maximum(a, b) <= 0.85 * rr
            elif SHAPES[k] == "triangle":  # apex up, base at +0.8 r
                m = (y >= -rr) & (y <= 0.8 * rr) & (a <= 0.6 * (y + rr))
            elif SHAPES[k] == "diamond":
                m = a + b <= 1.15 * rr
            else:  # cross
                m = (np.minimum(a, b) <= 0.3 * rr) & (np.maximum(a, b) <= rr)
            mask[sel] = m
        return mask

    def _scene_mix(self, scene: np.ndarray, orient: np.ndarray, period: np.ndarray, phase: np.ndarray,
                   speck: np.ndarray) -> np.ndarray:
        """Per-pixel blend factor in [0, 1] between the two background colours, (N, S, S)."""
        s = self.image_size
        mix = np.zeros((len(scene), s, s), np.float32)
        x, y = self._coords[0], self._coords[1]
        for k, name in enumerate(SCENES):
            sel = scene == k
            if name == "plain" or not sel.any():
                continue
            p = (np.array([0.125, 0.17, 0.25], np.float32)[period[sel]] * s)[:, None, None]
            if name == "striped":
                mix[sel] = (np.floor((self._coords[orient[sel]] + phase[sel, None, None]) / (p / 2)) % 2)
            elif name == "checkered":
                mix[sel] = (np.floor(x / p) + np.floor(y / p)) % 2
            elif name == "dotted":
                mix[sel] = ((x % p - p / 2) ** 2 + (y % p - p / 2) ** 2) < (0.3 * p) ** 2
            elif name == "gradient":
                mix[sel] = self._ramps[orient[sel]]
            else:  # speckled: isolated bright pixels (~16%)
                mix[sel] = speck[sel] > 1.0
        return mix


# ----------------------------------------------------------------------------- its datasets


def _noisy_source(seed: int, index: int, num_samples: int, p: float) -> int:
    """Index whose caption pair `index` gets: itself, or (with prob. p) another one (web alt-text noise)."""
    if p <= 0 or num_samples < 2:
        return index
    rng = np.random.default_rng([seed, 104729, index])
    if rng.random() >= p:
        return index
    other = int(rng.integers(num_samples - 1))
    return other + (other >= index)  # uniform over the other indices


def _check_index(index: int, length: int) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for dataset of length {length}")
    return index


def _with_tower3_view(items: list[dict[str, Any]], raw: Tensor, images: Tensor, size: int | None) -> list[dict]:
    """Add 'image_h', the third tower's view (tower3_view) of the rendered uint8 images `raw`; at f's own size
    that is f's image itself (`images`, the same normalisation of the same pixels)."""
    if size is not None:
        for item, image in zip(items, images if size == raw.shape[-1] else tower3_view(raw, size)):
            item["image_h"] = image
    return items


class ShapesPairs(Dataset):
    """Image-text pairs from ShapesWorld. Rendering is batched via `__getitems__` (used by DataLoader).

    No augmentation: captions name positions, and a crop or flip would make them false.
    """

    def __init__(self, split: str = "train", num_samples: int = 100_000, *, seed: int = 0, image_size: int = 64,
                 tower3_image_size: int | None = None, caption_noise: float = 0.0):
        if not 1 <= num_samples <= ShapesWorld.SPLIT_SIZE:
            raise ValueError(f"num_samples must be in [1, {ShapesWorld.SPLIT_SIZE}], got {num_samples}")
        if not 0.0 <= caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
        self.world = ShapesWorld(seed, image_size)
        self.split, self.num_samples, self.seed = split, num_samples, seed
        self.tower3_image_size, self.caption_noise = tower3_image_size, caption_noise

    def __len__(self) -> int:
        return self.num_samples

    def caption(self, index: int) -> str:
        """The caption paired with `index` (another index's caption for a noisy pair)."""
        source = _noisy_source(self.seed, index, self.num_samples, self.caption_noise)
        return self.world.captions(source, self.split, 1)[0]

    def sample_captions(self, n: int) -> list[str]:
        """Captions to learn the tokenizer's merges from: those of the first n pairs."""
        return [self.caption(i) for i in range(min(n, self.num_samples))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [_check_index(i, self.num_samples) for i in indices]
        draws = [self.world._draw(i, self.split) for i in indices]  # drawn once, for image and caption
        raw = torch.from_numpy(self.world._paint(draws))
        images = normalize(raw)
        captions = []
        for d, i in zip(draws, indices):  # the same as self.caption(i), reusing the draw
            source = _noisy_source(self.seed, i, self.num_samples, self.caption_noise)
            d = d if source == i else self.world._draw(source, self.split)
            captions.append(self.world._captions(d, source, self.split, 1)[0])
        items = [{"image": images[n], "caption": captions[n], "index": i} for n, i in enumerate(indices)]
        return _with_tower3_view(items, raw, images, self.tower3_image_size)


class ShapesLabelled(Dataset):
    """Labelled shapes images (supervised pretraining of the third tower, or zero-shot eval on 'test').

    label: 'object' (shape x colour, covers most of a caption), 'scene' (background kind, covers little),
    or 'position_size'. Items: {'image', 'label'} (+ 'image_h' when tower3_image_size is given).
    A labelled image shows one object, as in a classification dataset: with a second object (as paired
    images may have) nothing in the pixels says which of the two the label names. single=False keeps
    the paired images' second objects (the retrieval set, whose captions describe them).
    """

    def __init__(self, split: str = "pretrain", num_samples: int = 50_000, *, label: str = "object", seed: int = 0,
                 image_size: int = 64, tower3_image_size: int | None = None, single: bool = True):
        if label not in LABELS:
            raise ValueError(f"unknown label set {label!r}; choose from {list(LABELS)}")
        if not 1 <= num_samples <= ShapesWorld.SPLIT_SIZE:
            raise ValueError(f"num_samples must be in [1, {ShapesWorld.SPLIT_SIZE}], got {num_samples}")
        self.world = ShapesWorld(seed, image_size)
        self.split, self.num_samples, self.label, self.tower3_image_size = split, num_samples, label, tower3_image_size
        self.single, self.classnames = single, LABELS[label][0]
        self.num_classes = len(self.classnames)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        draws = [self.world._draw(_check_index(i, self.num_samples), self.split, self.single) for i in indices]
        raw = torch.from_numpy(self.world._paint(draws))
        images = normalize(raw)
        items = [{"image": images[n], "label": self.world._labels(d)[self.label]} for n, d in enumerate(draws)]
        return _with_tower3_view(items, raw, images, self.tower3_image_size)


@dataclass
class RetrievalSet:
    """COCO-style retrieval: caption i describes image caption_image[i] (several captions per image)."""

    images: Dataset
    captions: list[str]
    caption_image: Tensor


def shapes_retrieval(num_images: int = 500, captions_per_image: int = 5, *, seed: int = 0, image_size: int = 64,
                     tower3_image_size: int | None = None) -> RetrievalSet:
    """Retrieval test set on the 'test' split; each image gets captions from distinct templates."""
    images = ShapesLabelled("test", num_images, seed=seed, image_size=image_size,
                            tower3_image_size=tower3_image_size, single=False)
    captions = [c for i in range(num_images) for c in images.world.captions(i, "test", captions_per_image)]
    owner = torch.arange(num_images).repeat_interleave(captions_per_image)
    return RetrievalSet(images, captions, owner)


# ==================================================================================================
# Part 2. File readers
# ==================================================================================================
# ----------------------------------------------------------------------------- CSV / TSV pairs


class CsvPairs(Dataset):
    """Image paths (relative to the file's folder) + captions from a .csv/.tsv file, open_clip keys.

    At construction: missing columns raise (listing the columns the file has); rows with an empty
    caption are dropped and counted in `skipped`; image files that do not exist raise, listing the
    count and the first few (a CSV pointing at missing files is a broken dataset, better found before
    training than mid-epoch). The file is used whole unless num_samples keeps its first rows; `summary`
    says how much is used, `stamp` fingerprints every image's size and modification time (the h cache's key).

    train=True: random crops seeded per (seed, epoch, index); an image that fails to decode or is over a size
    limit is replaced by the next row's and counted in the item's 'data_errors', so the trainer logs it.
    train=False (evaluation): such an image raises DataError naming it -- test data is never substituted.
    """

    def __init__(self, path: str, *, img_key: str = "filepath", caption_key: str = "title",
                 separator: str | None = None, image_size: int = 224, train: bool = True,
                 tower3_image_size: int | None = None, num_samples: int | None = None, caption_noise: float = 0.0,
                 seed: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS, max_file_bytes: int = MAX_FILE_BYTES):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"caption file not found: {path}")
        sep = separator or ("\t" if path.lower().endswith(".tsv") else ",")
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:    # -sig: drop a BOM
            reader = csv.DictReader(f, delimiter=sep)
            try:
                columns = reader.fieldnames or []
                for key in (img_key, caption_key):
                    if key not in columns:
                        raise ValueError(f"{path}: no column {key!r} (separator {sep!r}); its columns are {columns}")
                rows = [(os.path.join(folder, r[img_key] or ""), (r[caption_key] or "").strip()) for r in reader]
            except csv.Error as e:  # e.g. a field over csv.field_size_limit()
                raise DataError(f"{path}: not a {sep!r}-separated file after line {reader.line_num} ({e})") from None
        self.skipped = {"empty_caption": sum(1 for _, c in rows if not c)}
        if self.skipped["empty_caption"]:
            logger.warning("%s: dropped %d rows with an empty caption", path, self.skipped["empty_caption"])
        usable = [r for r in rows if r[1]]
        rows = usable[:num_samples]
        stats = {p: _file_stat(p) for p in dict.fromkeys(p for p, _ in rows)}      # each image once, in row order
        missing = [p for p, st in stats.items() if st is None]
        if missing:
            raise FileNotFoundError(f"{path}: {len(missing)} image file(s) missing, first: {missing[:5]}")
        if not rows:
            raise ValueError(f"{path}: no usable rows")
        stamps = [(os.path.relpath(p, folder), stats[p]) for p, _ in rows]        # h depends on the image of each row
        self.stamp = hashlib.sha256(repr(stamps).encode()).hexdigest()[:16]
        cut = ("" if num_samples is None else f"; the first {num_samples:,} kept" if num_samples < len(usable)
               else f"; {num_samples:,} asked for, all used")
        self.summary = (f"{len(rows):,} of {len(usable) + self.skipped['empty_caption']:,} rows used ({len(stats):,} "
                        f"image files; {self.skipped['empty_caption']:,} rows without a caption dropped{cut})")
        self.rows, self.path, self.seed, self.caption_noise, self.logged = rows, path, seed, caption_noise, 0
        self.train, self.epoch, self.tower3_image_size = train, 0, tower3_image_size
        self.max_image_pixels, self.max_file_bytes = max_image_pixels, max_file_bytes
        self.transform = image_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_captions(self, n: int) -> list[str]:
        """Captions to learn the tokenizer's merges from: n rows drawn without replacement (seeded)."""
        keep = np.random.default_rng(self.seed).permutation(len(self.rows))[:n]
        return [self.rows[i][1] for i in sorted(keep)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self.rows))
        errors: Counter[str] = Counter()
        for attempt in range(16 if self.train else 1):
            row = (index + attempt) % len(self.rows)
            try:
                image = decode_rgb(_read_bytes(self.rows[row][0], self.max_file_bytes), self.max_image_pixels)
                break
            except Exception as e:  # noqa: BLE001 - decoder errors have no common type
                if not self.train:
                    raise DataError(f"{self.path} row {row}: cannot use image {self.rows[row][0]} ({e}); evaluation "
                                    f"data is never substituted: fix the file or remove its rows") from None
                errors[skip_reason(e)] += 1
                if self.logged < 5:  # the first few per worker; every one is counted
                    self.logged += 1
                    logger.warning("%s row %d: cannot use %s (%s)", self.path, row, self.rows[row][0], e)
        else:
            raise RuntimeError(f"{self.path}: 16 consecutive unusable images from row {index}")
        caption = self.rows[_noisy_source(self.seed, row, len(self.rows), self.caption_noise)][1]
        view = seeded(self.transform, image, self.seed, self.epoch, index) if self.train else self.transform(image)
        item = {"image": view, "caption": caption, "index": index, "data_errors": dict(errors)}
        if self.tower3_image_size:
            item["image_h"] = tower3_view(image, self.tower3_image_size)
        return item


def _file_stat(path: str) -> tuple[int, int] | None:
    """(size, modification time in ns) of a regular file, None if there is none at `path`."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _read_bytes(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)      # never more than the limit in memory, even if the size lies
    if len(data) > max_bytes:
        raise TooLarge(f"{path}: more than --max-file-bytes {max_bytes} bytes")
    return data


# ----------------------------------------------------------------------------- tar shards

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BAD_CHECK_MIN = 100  # a shard is judged by its bad fraction only once it has shown this many samples


def expand_pattern(pattern: str) -> list[str]:
    """'data/{00000..00099}.tar', '{a,b}.tar' and globs -> sorted existing paths; errors name the pattern."""
    paths, missing = set(), []
    for p in _expand_braces(pattern):
        if any(c in p for c in "*?["):
            paths.update(glob.glob(p))
        elif os.path.exists(p):
            paths.add(p)
        else:
            missing.append(p)
    if missing:
        raise FileNotFoundError(f"pattern {pattern!r}: {len(missing)} file(s) missing, first: {missing[:3]}")
    if not paths:
        raise FileNotFoundError(f"pattern {pattern!r} matched no files")
    return sorted(paths)


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tails = pattern[: m.start()], m.group(1), _expand_braces(pattern[m.end():])
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        if int(a) > int(b):
            raise ValueError(f"pattern {pattern!r}: descending range {{{body}}}")
        width = len(a) if (len(a) == len(b) or a.startswith("0")) else 0  # {00000..00099} keeps the padding
        items = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace expression: literal text
    return [head + item + tail for item in items for tail in tails]


def _split_member(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key is the basename up to its first dot."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def _check_tar_end(shard: str, offset: int) -> None:
    """tarfile stops quietly at a cut or garbled header; a complete tar ends in >= 2 zero blocks.

    Compressed shards need no check: their decompressor raises on truncation.
    """
    with open(shard, "rb") as f:
        if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return
        f.seek(offset)
        rest = f.read(1 << 20)
    if len(rest) < 1024 or rest.strip(b"\0"):
        raise tarfile.ReadError(f"no end-of-archive marker after byte {offset}; file cut short or corrupt")


class _SkipLog:
    """Counts skipped samples per reason and shard; raises when a shard is mostly bad.

    Rule: once a shard has shown >= 100 samples, it raises as soon as more than max_bad_fraction of
    them were skipped. Shards with fewer samples are never judged by fraction (their skips are still
    counted and reported). `take()` returns skips since the previous call (what a yielded item carries).
    """

    def __init__(self, max_bad_fraction: float):
        self.max_bad_fraction = max_bad_fraction
        self.pending, self.logged, self.seen, self.bad = Counter(), Counter(), Counter(), Counter()

    def see(self, shard: str) -> None:
        self.seen[shard] += 1
        self._check(shard)

    def skip(self, shard: str, key: str, reason: str) -> None:
        self.pending[reason] += 1
        self.bad[shard] += 1
        if self.logged[reason] < 5:
            self.logged[reason] += 1
            logger.warning("skipping sample %r in %s: %s", key, shard, reason)
        self._check(shard)

    def _check(self, shard: str) -> None:
        seen, bad = self.seen[shard], self.bad[shard]
        if seen >= _BAD_CHECK_MIN and bad > self.max_bad_fraction * seen:
            raise RuntimeError(f"shard {shard}: {bad} of {seen} samples bad, more than max_bad_fraction="
                               f"{self.max_bad_fraction}; skips in this reader so far: {dict(self.pending)}")

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


class TarShards(IterableDataset):
    """Streams img2dataset/WebDataset tar shards (KEY.jpg|jpeg|png|webp + KEY.txt [+ KEY.json]).

    Splitting: each epoch the shard list is permuted with (seed, epoch) identically on every rank, then
    reader g = rank * workers + worker takes shards g, g + R*W, ... so every sample is read exactly once
    per epoch. train=True shuffles shard order and samples (a seeded shuffle buffer of raw bytes, so
    memory stays small); train=False streams in sorted order. Each item carries 'data_errors': skips
    since that reader's previous item. Ranks get whole shards, so their sample counts differ when shard
    sizes do: under DDP, bound each epoch by a step count that every rank reaches.
    """

    def __init__(self, pattern: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, image_size: int = 224, train: bool = True,
                 tower3_image_size: int | None = None, max_bad_fraction: float = 0.1,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_file_bytes: int = MAX_FILE_BYTES):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards = expand_pattern(pattern)
        for shard in self.shards:  # fail before training, not hours into an epoch
            try:
                with tarfile.open(shard):
                    pass
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"not a readable tar file: {shard} ({e})") from e
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards for {world_size} ranks: every rank needs a shard")
        self.pattern, self.rank, self.world_size, self.seed = pattern, rank, world_size, seed
        self.shuffle_buffer, self.train, self.max_bad_fraction = shuffle_buffer, train, max_bad_fraction
        self.tower3_image_size, self.max_image_pixels = tower3_image_size, max_image_pixels
        self.max_file_bytes = max_file_bytes
        self.transform = image_transform(image_size, train)
        self.epoch, self.skip_batches, self.batch_size = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_captions(self, n: int) -> list[str]:
        """Captions to learn the tokenizer's merges from: the first n complete samples, shards in order."""
        out: list[str] = []
        for _, _, _, caption in self._raw(self.shards, _SkipLog(1.0)):
            out.append(caption)
            if len(out) == n:
                break
        return out

    def check_readers(self, workers: int) -> int:
        """Number of readers (ranks x workers); raises unless each one gets at least one shard."""
        readers = self.world_size * workers
        if len(self.shards) < readers:
            raise ValueError(f"{len(self.shards)} shards ({self.pattern!r}) cannot feed {self.world_size} ranks x "
                             f"{workers} workers = {readers} readers; use more shards or fewer workers")
        return readers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers = self.check_readers(workers)
        order = np.arange(len(self.shards))
        if self.train:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        # Resuming at batch b: DataLoader takes batch k from worker k % workers, always starting at worker
        # 0, so worker w plays the part of worker (w + b) % workers and skips that worker's share of b.
        role = (worker + self.skip_batches) % workers
        skip = -(-(self.skip_batches - role) // workers) * self.batch_size
        reader = self.rank * workers + role
        shards = [self.shards[k] for k in order[reader::readers]]
        # Everything is read here, not lazily in the generator, so the loader can reset skip_batches.
        return self._stream(shards, role, skip, self.epoch)

    def _stream(self, shards: list[str], worker: int, skip: int, epoch: int) -> Iterator[dict[str, Any]]:
        log = _SkipLog(self.max_bad_fraction)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
        size = max(1, self.shuffle_buffer) if self.train else 1
        buffer: list[tuple[str, str, bytes, str]] = []
        held = None  # one item is held back so skips found after the last item still reach the log

        def shuffled() -> Iterator[tuple[str, str, bytes, str]]:
            for raw in self._raw(shards, log):
                if len(buffer) < size:
                    buffer.append(raw)
                    continue
                j = int(rng.integers(size))
                buffer[j], raw = raw, buffer[j]
                yield raw
            yield from (buffer[j] for j in (rng.permutation(len(buffer)) if size > 1 else range(len(buffer))))

        for shard, key, data, caption in shuffled():
            try:
                image = decode_rgb(data, self.max_image_pixels)
            except Exception as e:  # noqa: BLE001 - decoder errors have no common type
                log.skip(shard, key, skip_reason(e))
                continue
            if skip > 0:  # resuming mid-epoch: same order, decoded so that skips stay identical
                skip -= 1
                if skip == 0:
                    log.take()  # counted by the run that did see these samples
                continue
            if held is not None:
                held["data_errors"] = log.take()
                yield held
            sample = zlib.crc32(f"{os.path.basename(shard)}/{key}".encode())     # the crop's seed: not the reader's
            held = {"image": seeded(self.transform, image, self.seed, epoch, sample) if self.train
                    else self.transform(image), "caption": caption}
            if self.tower3_image_size:
                held["image_h"] = tower3_view(image, self.tower3_image_size)
        if held is not None:
            held["data_errors"] = log.take()
            yield held

    def _raw(self, shards: list[str], log: _SkipLog) -> Iterator[tuple[str, str, bytes, str]]:
        """(shard, key, image bytes, caption) per complete sample; incomplete ones are counted."""
        for shard in shards:
            try:
                with tarfile.open(shard, mode="r|*") as tar:  # streaming: one pass, no index
                    key, group = None, {}
                    for member in tar:
                        name = os.path.basename(member.name)
                        if not member.isfile() or name.startswith("."):
                            continue
                        k, ext = _split_member(member.name)
                        if k != key:
                            yield from self._complete(shard, key, group, log)
                            key, group = k, {}
                        # a member over the limit is never read (a sparse one can claim gigabytes): None marks it
                        group[ext] = tar.extractfile(member).read() if member.size <= self.max_file_bytes else None
                    yield from self._complete(shard, key, group, log)
                    _check_tar_end(shard, tar.offset)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise RuntimeError(f"shard {shard}: unreadable or truncated tar ({e})") from e

    @staticmethod
    def _complete(shard: str, key: str | None, group: dict[str, bytes | None],
                  log: _SkipLog) -> Iterator[tuple[str, str, bytes, str]]:
        if not group:
            return
        log.see(shard)
        ext = next((e for e in _IMAGE_EXTS if e in group), None)
        if any(v is None for v in group.values()):
            log.skip(shard, key, "too_large")
        elif ext is None:
            log.skip(shard, key, "missing_image")
        elif "txt" not in group:
            log.skip(shard, key, "missing_caption")
        else:
            caption = group["txt"].decode("utf-8", errors="replace").strip()
            if caption:
                yield shard, key, group[ext], caption
            else:
                log.skip(shard, key, "empty_caption")


# ----------------------------------------------------------------------------- image folders


class LabelledImages(Dataset):
    """Items {'image', 'label'} (+ 'image_h', h's view, when tower3_image_size is set) from image files or an HWC
    uint8 array (CIFAR); .classnames, .num_classes. train=True seeds the random transform per (seed, epoch,
    index). A file that cannot be used raises DataError naming it: labelled sets are test data or a
    classifier's training data, never silently substituted."""

    max_image_pixels, max_file_bytes = MAX_IMAGE_PIXELS, MAX_FILE_BYTES

    def __init__(self, transform: Callable[[Tensor], Tensor], classnames: list[str], targets: Sequence[int],
                 paths: Sequence[str] | None = None, array: np.ndarray | None = None, *, train: bool = False,
                 seed: int = 0):
        self.transform, self.classnames, self.targets = transform, list(classnames), list(targets)
        self.paths, self.array, self.num_classes = paths, array, len(self.classnames)
        self.train, self.seed, self.epoch, self.tower3_image_size = train, seed, 0, None

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.array is not None:
            image = torch.from_numpy(np.ascontiguousarray(self.array[index])).permute(2, 0, 1)
        else:
            try:
                image = decode_rgb(_read_bytes(self.paths[index], self.max_file_bytes), self.max_image_pixels)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot use image {self.paths[index]}: {e}") from None
        item = {"image": seeded(self.transform, image, self.seed, self.epoch, index) if self.train
                else self.transform(image), "label": self.targets[index]}
        if self.tower3_image_size:
            item["image_h"] = tower3_view(image, self.tower3_image_size)
        return item


def image_folder(root: str, transform: Callable[[Tensor], Tensor], **kwargs: Any) -> LabelledImages:
    """An ImageFolder root: one sub-folder per class, labels in sorted folder order; kwargs go to LabelledImages."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    folder = ImageFolder(root)  # only scans: classes = sorted sub-folder names
    return LabelledImages(transform, folder.classes, folder.targets, paths=[p for p, _ in folder.samples], **kwargs)


# ----------------------------------------------------------------------------- what a flag names


def make_pairs_dataset(spec: str, split: str = "train", *, image_size: int = 64,
                       tower3_image_size: int | None = None, num_samples: int | None = None,
                       caption_noise: float = 0.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                       csv_img_key: str = "filepath", csv_caption_key: str = "title",
                       csv_separator: str | None = None, max_bad_fraction: float = 0.1,
                       shuffle_buffer: int = 1000, max_image_pixels: int = MAX_IMAGE_PIXELS,
                       max_file_bytes: int = MAX_FILE_BYTES) -> Dataset:
    """spec: 'shapes' | a .csv/.tsv file | a tar-shard pattern. Only split 'train' augments/shuffles. Files are
    used whole unless num_samples (CSV: the first rows) is given; items carry h's view when tower3_image_size is."""
    train = split == "train"
    if spec == "shapes":
        n = num_samples or (100_000 if train else 10_000)
        return ShapesPairs(split, n, seed=seed, image_size=image_size,
                           tower3_image_size=tower3_image_size, caption_noise=caption_noise)
    limits = dict(max_image_pixels=max_image_pixels, max_file_bytes=max_file_bytes)
    if spec.lower().endswith((".csv", ".tsv")):
        return CsvPairs(spec, img_key=csv_img_key, caption_key=csv_caption_key,
                        separator=csv_separator, image_size=image_size, train=train,
                        tower3_image_size=tower3_image_size, num_samples=num_samples,
                        caption_noise=caption_noise, seed=seed, **limits)
    if num_samples is not None or caption_noise > 0:
        raise ValueError("num_samples / caption_noise are not supported for tar shards: select fewer shards")
    return TarShards(spec, rank=rank, world_size=world_size, seed=seed,
                     shuffle_buffer=shuffle_buffer, image_size=image_size, train=train,
                     tower3_image_size=tower3_image_size, max_bad_fraction=max_bad_fraction, **limits)


def make_labelled_dataset(spec: str, split: str = "pretrain", *, label: str = "object", image_size: int = 64,
                          num_samples: int | None = None, seed: int = 0, crop_scale: float = 0.08,
                          flip: bool = True, max_image_pixels: int = MAX_IMAGE_PIXELS,
                          max_file_bytes: int = MAX_FILE_BYTES) -> Dataset:
    """'shapes' (label object|scene|position_size) or an ImageFolder root (its folders are the labels, `label`
    is ignored; a seeded subset when num_samples is given). ImageFolder augmentation: a random crop of at
    least crop_scale of the area (0.08: Inception-style; 1: resize + centre crop, no random crop), and
    horizontal flips if `flip` -- small sets learn faster with less."""
    if spec == "shapes":
        return ShapesLabelled(split, num_samples or 50_000, label=label, seed=seed, image_size=image_size)
    crop = [v2.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True)] if crop_scale < 1 else \
        [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    transform = v2.Compose(crop + [v2.RandomHorizontalFlip()] * flip + [v2.ToDtype(torch.float32, scale=True),
                                                                         v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = image_folder(spec, transform, train=True, seed=seed)
    data.max_image_pixels, data.max_file_bytes = max_image_pixels, max_file_bytes
    if num_samples is not None and num_samples < len(data):
        keep = np.sort(np.random.default_rng(seed).choice(len(data), num_samples, replace=False))
        data.targets, data.paths = [data.targets[i] for i in keep], [data.paths[i] for i in keep]
    return data


def with_tower3_view(dataset: Dataset, size: int) -> Dataset:
    """A shallow copy of `dataset` whose items also carry 'image_h', the third tower's own view at `size`
    (tower3_view): evaluation gives h the pixels it saw in training, never f's view resized."""
    if isinstance(dataset, Subset):
        return Subset(with_tower3_view(dataset.dataset, size), dataset.indices)
    if not hasattr(dataset, "tower3_image_size"):
        raise TypeError(f"{type(dataset).__name__} has no third-tower view (no tower3_image_size)")
    out = copy.copy(dataset)
    out.tower3_image_size = size
    return out


# ==================================================================================================
# Part 3. Loaders
# ==================================================================================================


def collate(samples: list[dict[str, Any]], tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Stack tensors, ints -> LongTensor, nested dicts recursively, sum 'data_errors' over the batch;
    with a tokenizer, the captions become 'text': token ids (B, context_length), in the loader's workers."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        if key == "data_errors":
            continue
        values = [s[key] for s in samples]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, np.integer)):
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], float):
            out[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(values[0], dict):
            out[key] = collate(values)
        else:
            out[key] = values
    if any("data_errors" in s for s in samples):
        total: Counter[str] = Counter()
        for s in samples:
            total.update(s.get("data_errors", {}))
        out["data_errors"] = dict(total)
    if tokenizer is not None and "caption" in out:
        out["text"] = tokenizer.encode(out["caption"])
    return out


class EpochSampler(Sampler[int]):
    """Distributed, deterministic: permutation seeded by seed + epoch, rank r takes every world_size-th.

    drop_last trims the permutation to a multiple of world_size (equal batches on every rank, so DDP
    never waits on a rank that ran out); otherwise it pads by wrapping, like DistributedSampler.
    `skip` (samples) applies to the next iteration only: that is how a resumed run starts mid-epoch.
    """

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.length, self.rank, self.world_size, self.seed = length, rank, world_size, seed
        self.shuffle, self.drop_last, self.epoch, self.skip = shuffle, drop_last, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch (before any skip). The permutation stays a tensor
        (8 bytes a row); only this rank's share becomes a list."""
        order = torch.arange(self.length)
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.drop_last:
            order = order[: self.length - self.length % self.world_size]
        else:
            order = torch.cat([order, order[: (-self.length) % self.world_size]])
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.indices()[skip:])

    def __len__(self) -> int:
        per_rank = self.length // self.world_size if self.drop_last else -(-self.length // self.world_size)
        return max(0, per_rank - self.skip)


class _TarLoader(DataLoader):
    """DataLoader over TarShards whose first iteration starts at batch `start_batch` (a resumed run)."""

    start_batch = 0

    def __iter__(self):
        # Workers copy the dataset when the iterator starts, so the skip reaches this iteration only.
        self.dataset.skip_batches, self.dataset.batch_size = self.start_batch, self.batch_size
        self.start_batch = 0
        try:
            return super().__iter__()
        finally:
            self.dataset.skip_batches = 0


def make_loader(dataset: Dataset, batch_size: int, *, tokenizer: Tokenizer | None = None, workers: int = 0,
                rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                start_batch: int = 0, pin_memory: bool = False) -> DataLoader:
    """DataLoader over one rank's share of the data; `start_batch` resumes mid-epoch (first iteration).
    With a tokenizer, batches carry the captions' token ids as 'text'.

    Map-style datasets get an EpochSampler; TarShards splits itself by rank and worker. Resuming a tar
    stream is exact while every worker still has data (not in the ragged end of an epoch).
    """
    kwargs = dict(batch_size=batch_size, num_workers=workers, collate_fn=functools.partial(collate, tokenizer=tokenizer),
                  drop_last=drop_last,
                  pin_memory=pin_memory, persistent_workers=False,
                  generator=torch.Generator().manual_seed(seed + rank))  # seeds worker RNGs (random crops)
    if isinstance(dataset, TarShards):
        if (dataset.rank, dataset.world_size) != (rank, world_size):
            raise ValueError(f"loader rank/world_size {rank}/{world_size} differ from the dataset's "
                             f"{dataset.rank}/{dataset.world_size}")
        dataset.check_readers(max(1, workers))  # fail here, not inside a worker process
        loader = _TarLoader(dataset, **kwargs)
        loader.start_batch = start_batch
        return loader
    if isinstance(dataset, IterableDataset):
        if start_batch:
            raise ValueError(f"start_batch is not supported for {type(dataset).__name__}")
        return DataLoader(dataset, **kwargs)
    sampler = EpochSampler(len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                           drop_last=drop_last)
    sampler.skip = start_batch * batch_size
    return DataLoader(dataset, sampler=sampler, **kwargs)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Forward the epoch to the sampler (map-style order) and the dataset (tar shard order, per-sample crops)."""
    targets = [t for t in (loader.sampler, loader.dataset) if hasattr(t, "set_epoch")]
    if not targets:
        raise TypeError("neither the loader's sampler nor its dataset has set_epoch; build it with make_loader")
    for target in targets:
        target.set_epoch(epoch)


class RowTable:
    """A float32 table (rows x dim) in one file: a JSON header padded to 4 KiB, then the rows. Rows are written
    and read by offset (os.pwrite / os.pread), so a process holds only the rows it touches, and the OS page
    cache (one per node, shared by its processes) keeps the hot part. The third tower's cache (train.py)."""

    HEADER = 4096

    def __init__(self, path: str, fd: int, rows: int, dim: int):
        self.path, self.fd, self.rows, self.dim = path, fd, rows, dim

    @classmethod
    def create(cls, path: str, rows: int, dim: int, **meta: Any) -> None:
        header = json.dumps({"rows": rows, "dim": dim, **meta}).encode()
        with open(path, "wb") as f:
            f.write(header.ljust(cls.HEADER))
            f.truncate(cls.HEADER + rows * dim * 4)                # sparse until written

    @classmethod
    def open(cls, path: str, rows: int, dim: int, writable: bool = False, **meta: Any) -> RowTable | None:
        """The table at `path`, or None when it is missing, unreadable, or its header or size is not `rows`,
        `dim` and `meta`."""
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError:
            return None
        try:
            header = json.loads(os.pread(fd, cls.HEADER, 0))
        except ValueError:
            header = None
        if header != {"rows": rows, "dim": dim, **meta} or os.fstat(fd).st_size != cls.HEADER + rows * dim * 4:
            os.close(fd)
            return None
        return cls(path, fd, rows, dim)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: Tensor | Sequence[int]) -> Tensor:
        """Rows (B,) -> float32 (B, dim), one read per row."""
        width, index = 4 * self.dim, [int(i) for i in index]
        if index and not 0 <= min(index) <= max(index) < self.rows:
            raise IndexError(f"{self.path}: rows {min(index)}..{max(index)} outside [0, {self.rows})")
        data = bytearray(b"".join(os.pread(self.fd, width, self.HEADER + i * width) for i in index))
        return torch.frombuffer(data, dtype=torch.float32).view(len(index), self.dim) if index \
            else torch.empty(0, self.dim)

    def write(self, start: int, rows: Tensor) -> None:
        """Write rows (B, dim) at rows start..start+B-1."""
        os.pwrite(self.fd, rows.float().contiguous().numpy().tobytes(), self.HEADER + start * 4 * self.dim)

    def __del__(self) -> None:
        os.close(self.fd)
