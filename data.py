"""Data: what the towers read, after the image helpers they share.

Read `CsvPairs` first: the simplest reader, whose items follow the conventions at the end of this
docstring, then `make_loader` and `collate`, which turn a rank's items into training batches.

- The shapes world, embedded, no download, is its own file, shapes.py (image-text pairs, labelled
  images for a third tower, the retrieval test set, zero-shot prompts).
- File readers: a CSV/TSV of image paths and captions (open_clip's keys), img2dataset/WebDataset tar
  shards read with the standard library, ImageFolder class folders. train.pairs_dataset and
  train.labelled_dataset turn a --train-data value into one of them, or into the shapes world.
- Loaders: one rank's share of the data per epoch, resumable mid-epoch; `collate` stacks items and
  turns captions into token ids (tokenizer.py).

Items are dicts of plain tensors and strings: 'image' (f's view), 'caption' or 'label', 'index'
(the row of the third tower's cache), 'image_h' (h's own view, tower3_view) when a third tower reads
them, and 'data_errors' (skipped samples by reason). Images use one normalisation: ImageNet mean/std.
"""
from __future__ import annotations

import copy
import csv
import functools
import glob
import hashlib
import io
import logging
import os
import re
import stat
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from tokenizer import Tokenizer

logger = logging.getLogger("data")

# ==================================================================================================
# Shared: images, limits, and what every dataset builds on
# ==================================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class View:
    """How an image becomes a tower's input: its short side resized to `resize` pixels (`interpolation`,
    antialiased), a centre crop of `crop` x `crop`, then (on the device, in the tower) mean/std. The
    third tower's view is the one its weights were trained with (checkpoints.load_tower3 reads it from a
    torchvision weight's metadata); items carry uint8 pixels, so only the geometry happens here."""
    crop: int
    resize: int
    interpolation: str = "bilinear"              # or "bicubic" (torchvision's SWAG and EfficientNet weights)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


@functools.lru_cache(maxsize=None)
def image_transform(image_size: int, train: bool) -> Callable[[Tensor], Tensor]:
    """f's view: uint8 [..., 3, H, W] -> uint8 [..., 3, S, S] (the towers normalise on the device).

    Train: random resized crop with scale (0.9, 1) (open_clip's default): captions name positions and
    objects, and heavy crops would make them false. Eval: resize the short side, centre crop; this is
    deterministic, which is what lets the frozen third tower's embeddings be cached.
    """
    if train:
        return v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), antialias=True)
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def resize(images: Tensor, view: View) -> Tensor:
    """The short side of uint8 image(s) [..., 3, H, W] resized to view.resize (a no-op when it is that already)."""
    if min(images.shape[-2:]) == view.resize:
        return images
    return v2.functional.resize(images, view.resize, INTERPOLATIONS[view.interpolation], antialias=True)


def tower3_view(images: Tensor, view: View) -> Tensor:
    """What the third tower h sees of uint8 image(s) [..., 3, H, W] -- in training, in its cache and in
    evaluation alike: the whole image, short side resized to view.resize, centre crop view.crop; uint8
    [..., 3, crop, crop]. Never f's augmented crop."""
    return v2.functional.center_crop(resize(images, view), view.crop)


def item_views(image: Tensor, transform: Callable[[Tensor], Tensor] | None, view: View | None,
               key: tuple[int, ...] | None = None) -> dict[str, Tensor]:
    """The views of one decoded uint8 image that a dataset's items carry: f's ('image': `transform`,
    seeded by `key` = (seed, epoch, sample) in training; none without a transform, see
    with_tower3_view) and h's ('image_h': none without a view). Both are taken from the full image,
    so f's pixels do not depend on whether h runs every step, reads its cache, or is absent (clip)."""
    views = {}
    if transform is not None:
        views["image"] = transform(image) if key is None else seeded(transform, image, *key)
    if view is not None:
        views["image_h"] = tower3_view(image, view)
    return views


def seeded(transform: Callable[[Tensor], Tensor], image: Tensor, *key: int) -> Tensor:
    """transform(image) under torch's CPU RNG seeded by key = (seed, epoch, sample): a random crop that depends
    on neither the worker or rank that draws the sample nor on earlier draws, so a resumed run sees the crops
    of an uninterrupted one. The caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
        return transform(image)


def shared_state() -> Tensor:
    """A dataset's epoch, in shared memory (SharedEpoch)."""
    return torch.zeros(1, dtype=torch.long).share_memory_()


class SharedEpoch:
    """set_epoch for datasets read by persistent loader workers: each worker keeps the copy of the dataset
    made when it started, so the epoch that seeds crops and shard order lives in shared memory
    (`shared`, from shared_state), written by the main process and read by every copy."""

    shared: Tensor

    def set_epoch(self, epoch: int) -> None:
        self.shared[0] = epoch

    @property
    def epoch(self) -> int:
        return int(self.shared[0])


# Size limits checked before any decoding (--max-image-pixels, --max-file-bytes): a 100 KB PNG can decode to
# gigabytes, a 10 KB tar can hold a 3 GB sparse member.
MAX_IMAGE_PIXELS = 2**26      # 67M pixels, e.g. 8192 x 8192
MAX_FILE_BYTES = 2**28        # 256 MiB per image file or tar member


CSV_FIELD_LIMIT = 2**31 - 1   # characters per CSV field (the csv module's default is 131072)


class ProjectError(Exception):
    """An error that its one-line message fully explains (bad input data, a flag at odds with a file, a run
    that cannot go on): the entry points (train.main, eval.main) print that line and exit with code 1, no
    traceback. Anything else is a bug and keeps its traceback."""


class DataError(ProjectError, ValueError):
    """Bad input data; the message names the file or shard and what was expected."""


class MissingData(DataError, FileNotFoundError):
    """A data file, image or shard that is not there; still a FileNotFoundError for callers that test for it."""


class UnusableData(DataError, RuntimeError):
    """A reader met more bad data than it may skip (a mostly bad or truncated shard, a run of unusable images)."""


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


def noisy_source(seed: int, index: int, num_samples: int, p: float) -> int:
    """Index whose caption pair `index` gets: itself, or (with prob. p) another one (web alt-text noise)."""
    if p <= 0 or num_samples < 2:
        return index
    rng = np.random.default_rng([seed, 104729, index])
    if rng.random() >= p:
        return index
    other = int(rng.integers(num_samples - 1))
    return other + (other >= index)  # uniform over the other indices


def check_index(index: int, length: int) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for dataset of length {length}")
    return index


@dataclass
class RetrievalSet:
    """COCO-style retrieval: caption i describes image caption_image[i] (several captions per image)."""

    images: Dataset
    captions: list[str]
    caption_image: Tensor


# ==================================================================================================
# File readers (the shapes world is shapes.py)
# ==================================================================================================
# ----------------------------------------------------------------------------- CSV / TSV pairs
class CsvPairs(SharedEpoch, Dataset):
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
                 tower3_view: View | None = None, num_samples: int | None = None, caption_noise: float = 0.0,
                 seed: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS, max_file_bytes: int = MAX_FILE_BYTES):
        if not os.path.isfile(path):
            raise MissingData(f"caption file not found: {path}")
        sep = separator or ("\t" if path.lower().endswith(".tsv") else ",")
        # The csv module refuses fields over 131072 characters by default; a caption that long is cut by the
        # tokenizer like any other, never a reason to refuse the whole file.
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:    # -sig: drop a BOM
            reader = csv.DictReader(f, delimiter=sep)
            try:
                columns = reader.fieldnames or []
                for key in (img_key, caption_key):
                    if key not in columns:
                        raise DataError(f"{path}: no column {key!r} (separator {sep!r}); its columns are {columns}")
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
            raise MissingData(f"{path}: {len(missing)} image file(s) missing, first: {missing[:5]}")
        if not rows:
            raise DataError(f"{path}: no usable rows")
        stamps = [(os.path.relpath(p, folder), stats[p]) for p, _ in rows]        # h depends on the image of each row
        self.stamp = hashlib.sha256(repr(stamps).encode()).hexdigest()[:16]
        cut = ("" if num_samples is None else f"; the first {num_samples:,} kept" if num_samples < len(usable)
               else f"; {num_samples:,} asked for, all used")
        self.summary = (f"{len(rows):,} of {len(usable) + self.skipped['empty_caption']:,} rows used ({len(stats):,} "
                        f"image files; {self.skipped['empty_caption']:,} rows without a caption dropped{cut})")
        self.rows, self.path, self.seed, self.caption_noise, self.logged = rows, path, seed, caption_noise, 0
        self.train, self.tower3_view, self.shared = train, tower3_view, shared_state()
        self.max_image_pixels, self.max_file_bytes = max_image_pixels, max_file_bytes
        self.transform = image_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.rows)

    def sample_captions(self, n: int) -> list[str]:
        """Captions to learn the tokenizer's merges from: n rows drawn without replacement (seeded)."""
        keep = np.random.default_rng(self.seed).permutation(len(self.rows))[:n]
        return [self.rows[i][1] for i in sorted(keep)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = check_index(index, len(self.rows))
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
            raise UnusableData(f"{self.path}: 16 consecutive unusable images from row {index}")
        caption = self.rows[noisy_source(self.seed, row, len(self.rows), self.caption_noise)][1]
        key = (self.seed, self.epoch, index) if self.train else None
        views = item_views(image, self.transform, self.tower3_view, key)
        return {**views, "caption": caption, "index": index, "data_errors": dict(errors)}


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
_DUPLICATE = "/duplicate"  # marks a sample whose key repeats (no member extension contains '/')
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
    unmatched = next((p for p in missing if "{" in p or "}" in p), None)
    if unmatched is not None:
        raise DataError(f"pattern {pattern!r}: an unmatched brace (it names {unmatched!r}); expected "
                        f"{{A..B}} with numbers A <= B or {{x,y,...}}, e.g. 'data/{{00000..00099}}.tar'")
    if missing:
        raise MissingData(f"pattern {pattern!r}: {len(missing)} file(s) missing, first: {missing[:3]}")
    if not paths:
        raise MissingData(f"pattern {pattern!r} matched no files")
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
            raise DataError(f"pattern {pattern!r}: descending range {{{body}}}")
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
            raise UnusableData(f"shard {shard}: {bad} of {seen} samples bad, more than max_bad_fraction="
                               f"{self.max_bad_fraction}; skips in this reader so far: {dict(self.pending)}")

    def take(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


class TarShards(SharedEpoch, IterableDataset):
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
                 tower3_view: View | None = None, max_bad_fraction: float = 0.1,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_file_bytes: int = MAX_FILE_BYTES):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards = expand_pattern(pattern)
        for shard in self.shards:  # fail before training, not hours into an epoch
            try:
                with tarfile.open(shard):
                    pass
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"not a readable tar file: {shard} ({e})") from e
        if len(self.shards) < world_size:
            raise DataError(f"{len(self.shards)} shards for {world_size} ranks: every rank needs a shard")
        self.pattern, self.rank, self.world_size, self.seed = pattern, rank, world_size, seed
        self.shuffle_buffer, self.train, self.max_bad_fraction = shuffle_buffer, train, max_bad_fraction
        self.tower3_view, self.max_image_pixels = tower3_view, max_image_pixels
        self.max_file_bytes = max_file_bytes
        self.transform = image_transform(image_size, train)
        self.shared, self.skip_batches, self.batch_size = shared_state(), 0, 1

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
            raise DataError(f"{len(self.shards)} shards ({self.pattern!r}) cannot feed {self.world_size} ranks x "
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
        # The skip is this copy's first iteration's only (each persistent worker holds its own copy).
        resumed, self.skip_batches = self.skip_batches, 0
        role = (worker + resumed) % workers
        skip = -(-(resumed - role) // workers) * self.batch_size
        reader = self.rank * workers + role
        shards = [self.shards[k] for k in order[reader::readers]]
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
            held = {**item_views(image, self.transform, self.tower3_view, (self.seed, epoch, sample) if self.train
                                 else None), "caption": caption}
        if held is not None:
            held["data_errors"] = log.take()
            yield held

    def _raw(self, shards: list[str], log: _SkipLog) -> Iterator[tuple[str, str, bytes, str]]:
        """(shard, key, image bytes, caption) per complete sample; incomplete ones are counted. A sample whose
        key repeats (a second caption or image, or the key again later in the shard) is ambiguous: which
        caption belongs to which image is unknown, so it is skipped whole ('duplicate_key'), never merged."""
        for shard in shards:
            try:
                with tarfile.open(shard, mode="r|*") as tar:  # streaming: one pass, no index
                    key, group, seen = None, {}, set()
                    for member in tar:
                        name = os.path.basename(member.name)
                        if not member.isfile() or name.startswith("."):
                            continue
                        k, ext = _split_member(member.name)
                        if k != key:
                            yield from self._complete(shard, key, group, log)
                            key, group = k, {_DUPLICATE: True} if k in seen else {}
                            seen.add(k)
                        if ext in group or (ext in _IMAGE_EXTS and any(e in group for e in _IMAGE_EXTS)):
                            group[_DUPLICATE] = True
                        # a member over the limit is never read (a sparse one can claim gigabytes): None marks it
                        group[ext] = tar.extractfile(member).read() if member.size <= self.max_file_bytes else None
                    yield from self._complete(shard, key, group, log)
                    _check_tar_end(shard, tar.offset)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise UnusableData(f"shard {shard}: unreadable or truncated tar ({e})") from e

    @staticmethod
    def _complete(shard: str, key: str | None, group: dict[str, bytes | None],
                  log: _SkipLog) -> Iterator[tuple[str, str, bytes, str]]:
        if not group:
            return
        log.see(shard)
        ext = next((e for e in _IMAGE_EXTS if e in group), None)
        if group.get(_DUPLICATE):
            log.skip(shard, key, "duplicate_key")
        elif any(v is None for v in group.values()):
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
class LabelledImages(SharedEpoch, Dataset):
    """Items {'image', 'label'} (+ 'image_h', h's view, when tower3_view is set) from image files or an HWC
    uint8 array (CIFAR); .classnames, .num_classes. train=True seeds the random transform per (seed, epoch,
    index). A file that cannot be used raises DataError naming it: labelled sets are test data or a
    classifier's training data, never silently substituted."""

    max_image_pixels, max_file_bytes = MAX_IMAGE_PIXELS, MAX_FILE_BYTES

    def __init__(self, transform: Callable[[Tensor], Tensor], classnames: list[str], targets: Sequence[int],
                 paths: Sequence[str] | None = None, array: np.ndarray | None = None, *, train: bool = False,
                 seed: int = 0):
        self.transform, self.classnames, self.targets = transform, list(classnames), list(targets)
        self.paths, self.array, self.num_classes = paths, array, len(self.classnames)
        self.train, self.seed, self.shared, self.tower3_view = train, seed, shared_state(), None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.array is not None:
            image = torch.from_numpy(np.ascontiguousarray(self.array[index])).permute(2, 0, 1)
        else:
            try:
                image = decode_rgb(_read_bytes(self.paths[index], self.max_file_bytes), self.max_image_pixels)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot use image {self.paths[index]}: {e}") from None
        views = item_views(image, self.transform, self.tower3_view, (self.seed, self.epoch, index) if self.train
                           else None)
        return {**views, "label": self.targets[index]}


def image_folder(root: str, transform: Callable[[Tensor], Tensor], **kwargs: Any) -> LabelledImages:
    """An ImageFolder root: one sub-folder per class, labels in sorted folder order; kwargs go to LabelledImages."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise MissingData(f"image folder not found: {root}")
    try:
        folder = ImageFolder(root)  # only scans: classes = sorted sub-folder names
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise MissingData(f"image folder {root}: {e}") from None
    return LabelledImages(transform, folder.classes, folder.targets, paths=[p for p, _ in folder.samples], **kwargs)


# ----------------------------------------------------------------------------- h's view of a dataset
def streamed(train_data: str, mode: str) -> bool:
    """Whether --train-data names tar shards, which are streamed: no length, so no epochs of known size, no
    --train-samples or --caption-noise, no h cache. Anything but 'shapes' or a .csv/.tsv file is, but for
    --mode supervised, which reads an ImageFolder."""
    return mode != "supervised" and train_data != "shapes" and not train_data.lower().endswith((".csv", ".tsv"))


def with_tower3_view(dataset: Dataset, view: View | None, f_view: bool = True) -> Dataset:
    """A shallow copy of `dataset` whose items also carry 'image_h', the third tower's own view
    (tower3_view; none when `view` is None): the cache and evaluation give h the pixels it sees in
    training, never f's view resized. f_view=False drops f's view ('image') where it is cut from a
    decoded image (files and shards), for readers that never use it: LiT, whose image tower is h,
    and the build of h's cache -- the decode stays, so bad images are skipped and counted as before.
    The shapes world renders f's view as its image and keeps it."""
    if isinstance(dataset, Subset):
        return Subset(with_tower3_view(dataset.dataset, view, f_view), dataset.indices)
    if not hasattr(dataset, "tower3_view"):
        raise TypeError(f"{type(dataset).__name__} has no third-tower view (no tower3_view)")
    out = copy.copy(dataset)
    out.tower3_view = view
    if not f_view and hasattr(out, "transform"):
        out.transform = None
    return out


# ==================================================================================================
# Loaders
# ==================================================================================================
def collate(samples: list[dict[str, Any]], tokenizer: Tokenizer | None = None,
            rows: Any = None) -> dict[str, Any]:
    """Stack tensors, ints -> LongTensor, nested dicts recursively, sum 'data_errors' over the batch.
    In the loader's workers, so that every tensor of a training batch leaves them final and contiguous
    (the pinned copy to the device is then asynchronous): with a tokenizer, the captions become 'text',
    token ids (B, L) cut after the batch's longest caption (Tokenizer.trim); with `rows` (the third
    tower's cache, runtime.RowTable), 'h' = rows[index], h's cached embeddings (B, D_h)."""
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
        out["text"] = Tokenizer.trim(tokenizer.encode(out["caption"])).contiguous()
    if rows is not None:
        out["h"] = rows[out["index"]]
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


def make_loader(dataset: Dataset, batch_size: int, *, tokenizer: Tokenizer | None = None, workers: int = 0,
                rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                start_batch: int = 0, pin_memory: bool = False, rows: Any = None) -> DataLoader:
    """DataLoader over one rank's share of the data; `start_batch` resumes mid-epoch (first iteration).
    With a tokenizer, batches carry the captions' token ids as 'text'; with `rows`, h's cached rows as
    'h' (collate). Workers persist across epochs (SharedEpoch carries the epoch to them); batches are
    pinned for the device when `pin_memory`.

    Map-style datasets get an EpochSampler; TarShards splits itself by rank and worker. Resuming a tar
    stream is exact while every worker still has data (not in the ragged end of an epoch).
    """
    kwargs = dict(batch_size=batch_size, num_workers=workers, drop_last=drop_last, pin_memory=pin_memory,
                  collate_fn=functools.partial(collate, tokenizer=tokenizer, rows=rows),
                  persistent_workers=workers > 0,
                  generator=torch.Generator().manual_seed(seed + rank))  # seeds worker RNGs (random crops)
    if isinstance(dataset, TarShards):
        if (dataset.rank, dataset.world_size) != (rank, world_size):
            raise ValueError(f"loader rank/world_size {rank}/{world_size} differ from the dataset's "
                             f"{dataset.rank}/{dataset.world_size}")
        dataset.check_readers(max(1, workers))  # fail here, not inside a worker process
        dataset.skip_batches, dataset.batch_size = start_batch, batch_size   # read by its first iteration
        return DataLoader(dataset, **kwargs)
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

