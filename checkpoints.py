"""Weights on disk: the project's checkpoint format, and the pretrained third towers h is loaded from.

Read `load_tower3` first: every source of a frozen tower h (torchvision weights, a torchvision
state_dict file such as a Places365 release, a torch.hub model, or a classifier this project
pretrained with `train.py --mode supervised`) becomes a `model.FrozenTower` with its known
classification head removed and the preprocessing view its weights were trained with. Then
`save_checkpoint` / `read_checkpoint`: one checksummed format for train.py, eval.py and --tower3,
read with weights_only=True so that a checkpoint can never run code; and `load_trained`, which
rebuilds a trained model and its h for eval.py.

This is its own module so that model.py holds the towers alone (README, "Files").
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import socket
import urllib.error

import torch
import torchvision
from torch import Tensor, nn

from data import View
from model import ConvTower, FrozenTower, ThreeTowers, build_image_tower


# ----------------------------------------------------------------------------------------------
# The third tower h: torchvision weights, state_dict files, torch.hub, this project's classifiers
# ----------------------------------------------------------------------------------------------
# Known classification heads, by attribute: torchvision's ResNets/RegNets/Inception (fc), ViTs
# (heads), Swin/MaxViT-style (head), AlexNet/VGG/ConvNeXt/EfficientNet/MobileNet (classifier, last
# layer), and this project's classifiers (ConvTower's last layer, the ViT's head).
HEADS = ("fc", "heads", "head", "classifier")


def strip_classifier(net: nn.Module) -> str | None:
    """Remove a known classification head of `net` in place -- the last nn.Linear inside one of the
    HEADS attributes (or that attribute itself), replaced by Identity -- and return its name, or None
    when there is none: then the model is taken whole, since cutting the last nn.Linear of a headless
    trunk would cut into its last block."""
    for name in HEADS:
        head = getattr(net, name, None)
        if isinstance(head, nn.Linear):
            setattr(net, name, nn.Identity())
            return name
        linears = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
        if linears:
            parent, _, child = linears[-1].rpartition(".")
            setattr(head.get_submodule(parent) if parent else head, child, nn.Identity())
            return f"{name}.{linears[-1]}"
    if isinstance(net, ConvTower) and isinstance(net[-1], nn.Linear):
        net[-1] = nn.Identity()
        return str(len(net) - 1)
    return None


# The view of a tower whose weights say nothing of their preprocessing (a state_dict file, a torch.hub
# model): torchvision's ImageNet evaluation recipe, short side 256, centre crop 224. --tower3-view changes it.
DEFAULT_VIEW = View(crop=224, resize=256)


def load_tower3(spec: str, view: dict | None = None) -> FrozenTower:
    """Build the frozen tower h from `spec`, its known classification head removed (strip_classifier):

    torchvision:ARCH:WEIGHTS   torchvision weights by name, e.g. torchvision:resnet50:IMAGENET1K_V2
                               (downloaded into torch.hub.get_dir() on first use); view from the weights
    torchvision:ARCH:FILE      a state_dict for torchvision's ARCH in FILE: a plain one, or a release
                               checkpoint (nested under 'state_dict'/'model', 'module.' prefixes, any
                               class count: the head is dropped); DEFAULT_VIEW
    hub:OWNER/REPO:ENTRY       torch.hub.load of a GitHub repository's entry point (downloaded on first
    hub:/path/to/repo:ENTRY    use), or of a local clone; a headless model is taken whole; DEFAULT_VIEW
    FILE                       a checkpoint written by `train.py --mode supervised`; its own input size

    `view` overrides fields of the tower's view (data.View: crop, resize, interpolation, mean, std)."""
    kind, _, rest = spec.partition(":")
    if kind == "torchvision":
        net, base, head = _torchvision_tower(spec, rest)
    else:
        net, base = (_hub_tower(spec, rest), DEFAULT_VIEW) if kind == "hub" else _project_tower(spec)
        head = strip_classifier(net)
    view = dataclasses.replace(base, **(view or {}))
    if view.resize < view.crop:
        raise ValueError(f"--tower3 {spec!r}: h's view resizes the short side to {view.resize}, less than its "
                         f"centre crop {view.crop} (--tower3-resize, --tower3-size)")
    return FrozenTower(net, view, spec, head)


def _torchvision_tower(spec: str, rest: str) -> tuple[nn.Module, View, str | None]:
    arch, _, weights = rest.partition(":")
    if arch not in torchvision.models.list_models(torchvision.models):
        raise ValueError(f"--tower3 {spec!r}: unknown torchvision architecture {arch!r}")
    enums = torchvision.models.get_model_weights(arch)
    if weights not in enums.__members__:
        if not (os.sep in weights or os.path.exists(weights) or weights.endswith((".pt", ".pth", ".tar", ".bin"))):
            raise ValueError(f"--tower3 {spec!r}: {arch} has no weights {weights!r} (it has "
                             f"{', '.join(enums.__members__)}), and it is no file name")
        net = torchvision.models.get_model(arch, weights=None)
        return net, DEFAULT_VIEW, _load_trunk(net, _state_dict_file(weights, spec), spec, arch)
    enum = enums[weights]
    try:
        net = torchvision.models.get_model(arch, weights=enum)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise RuntimeError(
            f"--tower3 {spec!r}: could not download the weights ({e}). Offline? Copy "
            f"{enum.url.rsplit('/', 1)[-1]} into {torch.hub.get_dir()}/checkpoints/, or "
            f"pass --tower3 torchvision:{arch}:/path/to/state_dict.pth") from e
    return net, weights_view(enum), strip_classifier(net)


def weights_view(enum: torchvision.models.WeightsEnum) -> View:
    """The preprocessing torchvision weights were trained with, from their metadata (no download):
    resize, crop, interpolation, mean, std of enum.transforms()."""
    t = enum.transforms()
    crop, size = t.crop_size[0], t.resize_size[0]
    return View(crop=crop, resize=size, interpolation=t.interpolation.value,
                mean=tuple(t.mean), std=tuple(t.std))


def _state_dict_file(path: str, spec: str) -> dict[str, Tensor]:
    """A state_dict from FILE in any of the layouts releases use: plain, nested under 'state_dict' or
    'model' (with training metadata beside it), keys prefixed 'module.' (saved from DataParallel/DDP)."""
    sd = _load_file(path, spec)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"--tower3 {spec!r}: {path} holds no state_dict (a dict of tensors, possibly under "
                         f"'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_trunk(net: nn.Module, sd: dict[str, Tensor], spec: str, arch: str) -> str | None:
    """Load `sd` into `net` without its classification head, whatever the head's class count (a
    Places365 ResNet-50 has 365, read from the file for the log): the head goes anyway. Returns what
    strip_classifier removed."""
    head = strip_classifier(net)
    if head is not None:
        weight = sd.get(head + ".weight")
        sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
        head += f" ({weight.shape[0]} classes in the file)" if weight is not None else " (not in the file)"
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"--tower3 {spec!r}: not a state_dict of torchvision's {arch} "
                         f"({' '.join(str(e).split())[:300]})") from None
    return head


def _hub_tower(spec: str, rest: str) -> nn.Module:
    repo, _, entry = rest.rpartition(":")
    if not repo or not entry:
        raise ValueError(f"--tower3 {spec!r}: expected hub:OWNER/REPO:ENTRYPOINT or hub:/path/to/repo:ENTRYPOINT")
    local = repo.startswith(("/", ".", "~")) or os.path.isdir(repo)
    if local and not os.path.isfile(os.path.join(os.path.expanduser(repo), "hubconf.py")):
        raise FileNotFoundError(f"--tower3 {spec!r}: {repo} is no folder with a hubconf.py (a torch.hub repository)")
    try:
        if local:
            return torch.hub.load(os.path.expanduser(repo), entry, source="local")
        return torch.hub.load(repo, entry, source="github", trust_repo=True)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"--tower3 {spec!r}: torch.hub could not fetch {repo} or its weights ({e}). Offline? torch.hub keeps "
            f"repositories and weights under {torch.hub.get_dir()}: load it once where the network is reachable, "
            f"or clone the repository and pass --tower3 hub:/path/to/repo:{entry}") from e
    except (RuntimeError, AttributeError) as e:
        raise ValueError(f"--tower3 {spec!r}: {' '.join(str(e).split())[:300]}") from None


def _project_tower(spec: str) -> tuple[nn.Module, View]:
    """A classifier written by `train.py --mode supervised`, seen as it was trained: at its own size."""
    ckpt = _load_file(spec, spec)
    if not isinstance(ckpt, dict) or "classifier" not in ckpt:
        raise ValueError(f"--tower3 {spec!r}: not a `train.py --mode supervised` checkpoint "
                         f"(no 'classifier' entry); for a torchvision state_dict use "
                         f"torchvision:ARCH:{spec}")
    c = ckpt["classifier"]
    net = build_image_tower(c["arch"], c["image_size"], c["num_classes"], bias=True)
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"--tower3 {spec!r}: its weights do not fit {c['arch']} as model.VIT_PRESETS defines "
                         f"it; pretrain the tower again") from e
    return net, View(crop=c["image_size"], resize=c["image_size"])


def _load_file(path: str, spec: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tower3 {spec!r}: no such file {path!r}")
    try:
        return read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"--tower3 {spec!r}: {e}") from None


def tower3_digest(tower3: FrozenTower) -> str:
    """What h computes, in 16 hex digits: its weights and its view (checkpoints, the h cache's key)."""
    return checksum([tower3.state_dict(), dataclasses.asdict(tower3.view)])[:16]


# ----------------------------------------------------------------------------------------------
# Checkpoints: one format for train.py (both modes of training), eval.py and --tower3
# ----------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "3t"   # written by train.py; --resume and eval.py refuse anything else


def checksum(obj) -> str:
    """sha256 over a checkpoint's contents in a fixed order: dict keys sorted, then every tensor's
    dtype, shape and bytes and every other value's repr. Flipped bytes in a file change it."""
    digest = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, dict):
            for key in sorted(x, key=repr):
                digest.update(repr(key).encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(b"[%d" % len(x))
            for v in x:
                walk(v)
        elif isinstance(x, Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)                 # 1-d: 0-d tensors cannot view
            digest.update(f"{t.dtype}{tuple(x.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy())
        else:
            digest.update(repr(x).encode())
    walk(obj)
    return digest.hexdigest()


class _Pieces(list):
    """A write-only sink for torch.save that keeps what it is given, piece by piece, in order: the
    file's bytes in memory without the copies a growing io.BytesIO makes when it reallocates."""

    def write(self, data) -> int:
        self.append(bytes(data))            # a copy: torch passes views of its own buffers
        return len(data)

    def flush(self) -> None:
        pass


def checkpoint_pieces(ckpt: dict) -> list[bytes]:
    """ckpt and its checksum as torch.save serialises them, in memory: the checkpoint file's bytes,
    in pieces, in order. Serialising before writing lets the writer know the size and see a full
    disk as an OSError; torch.save's own file writer reports it as a RuntimeError of its zip writer,
    without the folder. Host memory: one serialised copy of the checkpoint (tensors on a GPU are
    copied to the host piece by piece as they are serialised); a model held in host memory needs
    twice its size until the pieces are written, and the writer (runtime.write_file) frees each
    piece once it is on disk."""
    ckpt = {k: v for k, v in ckpt.items() if k != "checksum"}
    pieces = _Pieces()
    torch.save({**ckpt, "checksum": checksum(ckpt)}, pieces)
    return list(pieces)


def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write ckpt and its checksum (checkpoint_pieces) to a temporary file in the same folder, then
    rename: a crash never leaves half a file under `path`, since only a whole temporary file is
    renamed into place. A failed save removes its temporary file; one left by a writer killed
    mid-save (kill -9) has this host's name and is overwritten by the next save here (one writer per
    path). train.py saves through runtime.checkpoint_to, which also flushes the file to disk and
    says a full disk in one line."""
    tmp = f"{path}.tmp.{socket.gethostname()}"
    try:
        with open(tmp, "wb") as f:
            f.writelines(checkpoint_pieces(ckpt))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True (a checkpoint can never run code), on the CPU, checksum
    verified. ValueError (one line, naming the file) when it is not a readable PyTorch file or its
    contents differ from what save_checkpoint wrote, or when it is this project's (it has a 'format') but
    holds no checksum. Files that are not this project's (torchvision state_dicts) load unverified."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (it holds Python objects, not only tensors, "
                         f"which torch.load(weights_only=True) refuses; save model.state_dict(), not the model)") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and tensor errors have no common type
        reason = ": ".join([type(e).__name__] + str(e).strip().splitlines()[:1])[:200]
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(ckpt, dict) and "checksum" in ckpt:
        if checksum({k: v for k, v in ckpt.items() if k != "checksum"}) != ckpt.pop("checksum"):
            raise ValueError(f"{path}: checksum mismatch, its contents changed after it was written "
                             f"(a damaged copy or disk): refusing to use it")
    elif isinstance(ckpt, dict) and "format" in ckpt:
        raise ValueError(f"{path}: a {ckpt['format']!r} checkpoint without its checksum, so not as save_checkpoint "
                         f"wrote it: refusing to use it")
    return ckpt


def load_trained(path: str, tower3_spec: str | None = None) -> tuple[ThreeTowers, FrozenTower | None, dict]:
    """A train.py checkpoint (CHECKPOINT_FORMAT) -> (the trained model, its third tower or None for clip, the
    checkpoint dict), for evaluation. The third tower is reloaded from its spec (checkpoints never store it) and
    must be the one training used (its width and the checksum of its weights). ValueError says what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = read_checkpoint(path)                  # ValueError when unreadable or its checksum fails
    if isinstance(ckpt, dict) and (ckpt.get("mode") == "supervised" or "classifier" in ckpt):
        raise ValueError(f"{path} is a supervised classifier (train.py --mode supervised): a third "
                         f"tower, not an image-text model. Use it as `--tower3 {path}` when "
                         f"training lit or 3t, then evaluate that checkpoint.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has no format '{CHECKPOINT_FORMAT}': not a train.py checkpoint, so eval.py "
                         f"cannot rebuild its model")
    if "tokenizer" not in ckpt:
        raise ValueError(f"{path} stores no tokenizer: an incomplete checkpoint, so eval.py cannot "
                         f"tokenise as training did")
    model = ThreeTowers(**ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its model_config ({' '.join(str(e).split())[:300]})") from None
    spec = tower3_spec or ckpt.get("tower3")
    if model.mode != "clip" and not spec:
        raise ValueError(f"{path}: a {model.mode} checkpoint without a third-tower spec; "
                         f"pass --tower3")
    tower3 = load_tower3(spec, ckpt.get("tower3_view")) if model.mode != "clip" else None   # training's view
    if tower3 is not None and tower3.dim != ckpt["model_config"]["tower3_dim"]:
        raise ValueError(f"--tower3 {spec!r}: D_h = {tower3.dim}, but {path} was trained with a third tower of "
                         f"width {ckpt['model_config']['tower3_dim']} ({ckpt.get('tower3')!r})")
    if tower3 is not None and ckpt.get("tower3_digest") not in (None, tower3_digest(tower3)):
        raise ValueError(f"--tower3 {spec!r}: other weights than the third tower {path} was trained with "
                         f"({ckpt.get('tower3')!r})")
    return model, tower3, ckpt
