"""The shapes world: a procedural world of images, captions and labels, embedded, no download.

Read `ShapesWorld.sample` first: one sample from (seed, split, index) alone -- `_draw` picks its
attributes, `_captions` words them, `_paint` renders them, `_labels` names its classes.

3T (Kossen et al. 2023) trains its image and text towers on web image-text pairs, while the frozen
third tower comes from a classifier pretrained on labelled images: JFT or ImageNet-21k, whose labels
name much of what captions say, or Places365, whose scene labels name little (where 3T beats LiT,
Sec. 5). This world reproduces that in miniature. Every image shows a main object (shape x colour,
a size, a position on a 3x3 grid) on a background pattern (the scene), sometimes with a second
object; every caption names all of it in varied templates and synonyms. Label sets:
    object          shape x colour (35 classes)    -- covers most of a caption, like JFT
    scene           the background (6 classes)     -- covers little of it, like Places365
    position_size   where and how big (27 classes) -- zero-shot evaluation only
Every sample is a pure function of (seed, split, index), so any rank or worker can make any sample and
nothing is stored. Datasets at the end: ShapesPairs (paired data, optional web-like caption noise),
ShapesLabelled (a third tower's pretraining data, and zero-shot test images), shapes_retrieval;
`zeroshot_tasks` gives the prompts of evaluation. Items follow data.py's conventions.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from data import RetrievalSet, View, check_index, noisy_source, tower3_view

# ----------------------------------------------------------------------------------------------
# Vocabulary, labels and captions
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# The generator: attributes -> captions and painted images
# ----------------------------------------------------------------------------------------------
MIN_IMAGE_SIZE = 16   # the smallest images the world renders (its shapes and positions need the pixels)


class ShapesWorld:
    """Deterministic procedural world. Splits are disjoint index ranges.

    Every sample is a pure function of (seed, split offset + index): any rank or worker can make any
    sample and nothing is stored. Attributes are drawn per sample (cheap scalar draws), then a whole
    batch is painted with vectorised numpy masks on a coordinate grid.
    """

    SPLIT_SIZE = 10**8
    SPLITS: dict[str, int] = {"train": 0, "pretrain": 10**8, "test": 2 * 10**8, "val": 3 * 10**8}

    def __init__(self, seed: int = 0, image_size: int = 64):
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
        self.seed, self.image_size = seed, image_size
        s = image_size
        grid = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
        x, y = np.broadcast_to(grid[None, :], (s, s)), np.broadcast_to(grid[:, None], (s, s))
        self._grid = grid
        self._coords = np.stack([x, y, (x + y) / np.sqrt(2)])  # (3, S, S): horizontal, vertical, diagonal
        self._ramps = self._coords / self._coords.max(axis=(1, 2), keepdims=True)  # the same, scaled to [0, 1]
        # Per-pixel noise comes from a few seeded tiles cropped at a per-sample offset: as random-looking
        # as fresh noise per image, but far cheaper than drawing 3*S*S normals per sample (results/README.md,
        # "Benchmarks", has the timings).
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


# ----------------------------------------------------------------------------------------------
# Its datasets: pairs, labelled images, the retrieval set
# ----------------------------------------------------------------------------------------------


def _with_tower3_view(items: list[dict[str, Any]], raw: Tensor, view: View | None) -> list[dict]:
    """Add 'image_h', the third tower's view (tower3_view) of the rendered uint8 images `raw`; at f's own size
    that is f's image itself."""
    if view is not None:
        for item, image in zip(items, tower3_view(raw, view)):
            item["image_h"] = image
    return items


class ShapesPairs(Dataset):
    """Image-text pairs from ShapesWorld. Rendering is batched via `__getitems__` (used by DataLoader).

    No augmentation: captions name positions, and a crop or flip would make them false.
    """

    def __init__(self, split: str = "train", num_samples: int = 100_000, *, seed: int = 0, image_size: int = 64,
                 tower3_view: View | None = None, caption_noise: float = 0.0):
        if not 1 <= num_samples <= ShapesWorld.SPLIT_SIZE:
            raise ValueError(f"num_samples must be in [1, {ShapesWorld.SPLIT_SIZE}], got {num_samples}")
        self.world = ShapesWorld(seed, image_size)
        self.split, self.num_samples, self.seed = split, num_samples, seed
        self.tower3_view, self.caption_noise = tower3_view, caption_noise

    def __len__(self) -> int:
        return self.num_samples

    def caption(self, index: int) -> str:
        """The caption paired with `index` (another index's caption for a noisy pair)."""
        source = noisy_source(self.seed, index, self.num_samples, self.caption_noise)
        return self.world.captions(source, self.split, 1)[0]

    def sample_captions(self, n: int) -> list[str]:
        """Captions to learn the tokenizer's merges from: those of the first n pairs."""
        return [self.caption(i) for i in range(min(n, self.num_samples))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [check_index(i, self.num_samples) for i in indices]
        draws = [self.world._draw(i, self.split) for i in indices]  # drawn once, for image and caption
        raw = torch.from_numpy(self.world._paint(draws))          # uint8: the towers normalise on the device
        captions = []
        for d, i in zip(draws, indices):  # the same as self.caption(i), reusing the draw
            source = noisy_source(self.seed, i, self.num_samples, self.caption_noise)
            d = d if source == i else self.world._draw(source, self.split)
            captions.append(self.world._captions(d, source, self.split, 1)[0])
        items = [{"image": raw[n], "caption": captions[n], "index": i} for n, i in enumerate(indices)]
        return _with_tower3_view(items, raw, self.tower3_view)


class ShapesLabelled(Dataset):
    """Labelled shapes images (supervised pretraining of the third tower, or zero-shot eval on 'test').

    label: 'object' (shape x colour, covers most of a caption), 'scene' (background kind, covers little),
    or 'position_size'. Items: {'image', 'label'} (+ 'image_h' when tower3_view is given).
    A labelled image shows one object, as in a classification dataset: with a second object (as paired
    images may have) nothing in the pixels says which of the two the label names. single=False keeps
    the paired images' second objects (the retrieval set, whose captions describe them).
    """

    def __init__(self, split: str = "pretrain", num_samples: int = 50_000, *, label: str = "object", seed: int = 0,
                 image_size: int = 64, tower3_view: View | None = None, single: bool = True):
        if label not in LABELS:
            raise ValueError(f"unknown label set {label!r}; choose from {list(LABELS)}")
        if not 1 <= num_samples <= ShapesWorld.SPLIT_SIZE:
            raise ValueError(f"num_samples must be in [1, {ShapesWorld.SPLIT_SIZE}], got {num_samples}")
        self.world = ShapesWorld(seed, image_size)
        self.split, self.num_samples, self.label, self.tower3_view = split, num_samples, label, tower3_view
        self.single, self.classnames = single, LABELS[label][0]
        self.num_classes = len(self.classnames)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        draws = [self.world._draw(check_index(i, self.num_samples), self.split, self.single) for i in indices]
        raw = torch.from_numpy(self.world._paint(draws))
        items = [{"image": raw[n], "label": self.world._labels(d)[self.label]} for n, d in enumerate(draws)]
        return _with_tower3_view(items, raw, self.tower3_view)


def shapes_retrieval(num_images: int = 500, captions_per_image: int = 5, *, seed: int = 0, image_size: int = 64,
                     tower3_view: View | None = None) -> RetrievalSet:
    """Retrieval test set on the 'test' split; each image gets captions from distinct templates."""
    images = ShapesLabelled("test", num_images, seed=seed, image_size=image_size,
                            tower3_view=tower3_view, single=False)
    captions = [c for i in range(num_images) for c in images.world.captions(i, "test", captions_per_image)]
    owner = torch.arange(num_images).repeat_interleave(captions_per_image)
    return RetrievalSet(images, captions, owner)
