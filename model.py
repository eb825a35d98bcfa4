"""The three towers of 3T (Kossen et al. 2023, Sec. 3 and Fig. 2), and the CLIP and LiT baselines.

    f    image tower, trained from scratch   (a ViT, a small conv net or a torchvision ResNet,
         with a linear head to embed_dim)
    g    text tower, trained from scratch    (causal Transformer over BPE tokens, pooled at EOS)
    h    third tower: a FROZEN pretrained image classifier, classification layer removed;
         its output is the pre-logits embedding of dimension D_h
    f_h, g_h   linear adaptor heads on f and g, for the alignment with h
    h_f, h_g   linear heads on h, one per pairing (drop them with tower3_heads=False, then
               f_h and g_h map straight into D_h)

Read first: `ThreeTowers` (what each mode trains; `encode_image` / `encode_text` as in CLIP), then
`Block`, the one Transformer block of both towers, and the towers built from it, `ViT` (f) and
`TextTower` (g). This file is plain PyTorch: faster CPU kernels are applied to a built model by
runtime.py (`cpu_kernels`), as torch.compile is.

`ThreeTowers` holds every *trainable* part (f, g, heads, temperatures). The frozen tower h is a
separate `FrozenTower`: the trainer runs it under no_grad (or reads its cached output) and passes
its embedding to `ThreeTowers.forward`. Keeping it outside makes "never in DDP, never in the
optimiser, never in a checkpoint" true by construction.

Modes (README, "The method in one paragraph"):
    clip: f, g                   -> L(f, g)
    lit : h, g (g maps into D_h) -> L(h, g); no trainable image side at all (LiT, App. C)
    3t  : f, g, f_h, g_h, h_f, h_g -> (L(f,g) + L(f_h,h_f) + L(g_h,h_g)) / 3
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data import IMAGENET_MEAN, IMAGENET_STD, View
from losses import PAIRS


# ----------------------------------------------------------------------------------------------
# The Transformer block of both towers
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm Transformer block (Vaswani et al. 2017; the norm before each sublayer, as in GPT-2
    and CLIP): x + attention(LN(x)), then x + MLP(LN(x)), the MLP 4 x width with GELU. Attention
    is one q/k/v matmul and one fused `scaled_dot_product_attention` call, batch-first. `causal`:
    a position attends only to itself and earlier ones (text); the image tower attends to every
    patch. Like openai/CLIP's model.py, both towers use this one block, differing only by the mask.
    Linears and norms start at PyTorch's defaults (nn.Linear: Kaiming-uniform, U(+-1/sqrt(fan_in))),
    which the text tower keeps; the ViT re-initialises its blocks (`ViT._init_weights`)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:                          # (B, L, W) -> (B, L, W)
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, W // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal)     # (B, heads, L, W / heads)
        x = x + self.out(y.transpose(1, 2).reshape(B, L, W))
        return x + self.mlp(self.ln_2(x))


class Blocks(nn.Sequential):
    """Transformer blocks run in order. With `checkpointing` on, each block keeps only its input
    while training and recomputes its activations in backward (Chen et al. 2016, "Training deep
    nets with sublinear memory cost"): activation memory per block falls from O(B L W x ~10
    tensors) to one (B, L, W) tensor, for ~1/3 more compute. The gradients are those of the plain
    run (tests/test_model.py). ThreeTowers.set_grad_checkpointing switches it."""

    def __init__(self, blocks):
        super().__init__(OrderedDict(blocks))
        self.checkpointing = False

    def forward(self, x: Tensor) -> Tensor:                          # (B, L, W) -> (B, L, W)
        for block in self:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# ----------------------------------------------------------------------------------------------
# Image tower f (also the classifier that `train.py --mode supervised` pretrains as a tower h)
# ----------------------------------------------------------------------------------------------
# ViT sizes: patch, width, depth, heads (MLP = 4 x width), conv stem, pooling. vit-b/16 and vit-b/32
# are ViT-Base (Dosovitskiy et al. 2021, Table 1); the small ones are for the shapes world on a CPU.
# From tiny up, heads are 64 wide, as in ViT-Base and CLIP's text tower.
# Conv stem: the patchify layer becomes stride-2 3x3 convolutions (norm, ReLU) with these channels,
# down to the patch size, then a 1x1 projection to the width (Xiao et al. 2021, "Early convolutions
# help transformers see better"): small ViTs learn shape, not only colour, within a CPU budget
# (README, "Where this project chooses"). GroupNorm, not the paper's BatchNorm: per-sample
# statistics keep N processes x batch B exactly equal to one process x batch N*B.
# Pooling: "token" reads a class token (the ViT paper's); "mean" averages the patch tokens.
VIT_PRESETS: dict[str, tuple[int, int, int, int, tuple[int, ...], str]] = {
    "vit-micro": (8, 32, 1, 2, (8, 16, 32), "mean"),     # unit tests
    "vit-tiny": (8, 128, 4, 2, (16, 32, 64), "mean"),
    "vit-small": (8, 256, 6, 4, (32, 64, 128), "mean"),
    "vit-b/32": (32, 768, 12, 12, (), "token"),
    "vit-b/16": (16, 768, 12, 12, (), "token"),
    "vit-l/16": (16, 1024, 24, 16, (), "token"),
}
# Small convolutional towers for the CPU default: 3x3 convolutions (strides downsample) with
# BatchNorm and ReLU, global average pooling, a linear head. Channels and strides per layer.
CNN_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "cnn-micro": ((8, 16, 32), (1, 2, 2)),                       # unit tests
    "cnn-tiny": ((16, 32, 32, 64, 128), (1, 2, 1, 2, 2)),          # the CPU default
}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
IMAGE_ARCHS = tuple(CNN_PRESETS) + tuple(VIT_PRESETS) + RESNETS


def build_image_tower(arch: str, image_size: int, out_dim: int, bias: bool = False) -> nn.Module:
    """An image tower from scratch whose last layer is a linear map to `out_dim` (embed_dim for f;
    the number of classes for a supervised classifier). (B, 3, S, S) -> (B, out_dim)."""
    if arch in VIT_PRESETS:                         # image_size % patch: train.finish_args
        return ViT(image_size, *VIT_PRESETS[arch], out_dim=out_dim, bias=bias)
    if arch in CNN_PRESETS:
        layers, width = [], 3
        for channels, stride in zip(*CNN_PRESETS[arch]):
            layers += [nn.Conv2d(width, channels, 3, stride, 1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            width = channels
        return ConvTower(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, out_dim, bias=bias))
    if arch in RESNETS:
        return getattr(torchvision.models, arch)(weights=None, num_classes=out_dim)
    raise ValueError(f"unknown image architecture {arch!r}; choose one of {', '.join(IMAGE_ARCHS)}")


class ViT(nn.Module):
    """f as a Vision Transformer (Dosovitskiy et al. 2021, "An image is worth 16x16 words"): the
    image cut into patches, each mapped to a width-W token (one patch-sized convolution, or the
    conv stem of Xiao et al. 2021), position embeddings added, `Block`s without a causal mask, a
    final LayerNorm, then one vector per image -- the class token's, or the mean of the patch
    tokens ("Better plain ViT baselines", Beyer et al. 2022: the mean sees every patch's gradient
    from the first step, where a class token can hold a small ViT on the contrastive loss's plateau
    for long; README, "Where this project chooses") -- and a linear head to out_dim.

    Init (`_init_weights`): torchvision's ViT init, which follows the ViT paper's code, so that f
    starts as the ViT the results were made with (results/README.md, "History"); the head
    normal(0, W^-0.5) as CLIP's projections, not zero as a classifier's often is: a zero embedding
    has no direction to normalise."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int,
                 stem: tuple[int, ...], pool: str, out_dim: int, bias: bool = False):
        super().__init__()
        self.patchify = conv_stem(stem, width) if stem else nn.Conv2d(3, width, patch, patch)
        tokens = (image_size // patch) ** 2 + (pool == "token")
        # "mean": no class token and no position for it, so DDP finds no unused parameter
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "token" else None
        self.positional_embedding = nn.Parameter(torch.empty(tokens, width))
        self.blocks = Blocks((str(i), Block(width, heads, causal=False)) for i in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim, bias=bias)
        self._init_weights()

    def _init_weights(self) -> None:
        """Position embeddings normal(0, 0.02), the class token zero; in each block the q/k/v and
        MLP weights Xavier-uniform (Glorot & Bengio 2010), the output projection's PyTorch's
        default, every bias zero; the stem's 1x1 projection He-normal over its fan-out (He et al.
        2015), or the patchify convolution LeCun-normal over its fan-in."""
        nn.init.normal_(self.positional_embedding, std=0.02)
        for block in self.blocks:
            for layer in (block.qkv, block.mlp[0], block.mlp[2]):
                nn.init.xavier_uniform_(layer.weight)
            for layer in (block.qkv, block.out, block.mlp[0], block.mlp[2]):
                nn.init.zeros_(layer.bias)
        if isinstance(self.patchify, nn.Sequential):
            last = self.patchify[-1]
            nn.init.normal_(last.weight, std=math.sqrt(2.0 / last.out_channels))
        else:
            last = self.patchify
            nn.init.trunc_normal_(last.weight, std=math.sqrt(1.0 / last.weight[0].numel()))
        nn.init.zeros_(last.bias)
        nn.init.normal_(self.head.weight, std=self.head.in_features ** -0.5)

    def forward(self, image: Tensor) -> Tensor:                  # (B, 3, S, S) -> (B, out_dim)
        # (B, N, W), N = (S / patch)^2; contiguous, since each residual sum x + ... takes x's layout
        x = self.patchify(image).flatten(2).transpose(1, 2).contiguous()
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1 + N, W)
        x = self.ln_final(self.blocks(x + self.positional_embedding))               # (B, L, W)
        pooled = x[:, 0] if self.class_token is not None else x.mean(dim=1)          # (B, W)
        return self.head(pooled)                                                     # (B, out_dim)


def conv_stem(channels: tuple[int, ...], width: int) -> nn.Sequential:
    """Xiao et al. 2021: stride-2 3x3 convolutions with GroupNorm(4, c) and ReLU, then a 1x1
    convolution to the width. (B, 3, S, S) -> (B, W, S / 2^n, S / 2^n), n = len(channels)."""
    layers, c_in = [], 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.GroupNorm(4, c),
                   nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers, nn.Conv2d(c_in, width, 1))


class ConvTower(nn.Sequential):
    """The CNN presets: conv-BN-ReLU layers, global average pooling, a linear head;
    (B, 3, S, S) -> (B, out_dim). The input is laid out channels-last (NHWC), for which the CPU's
    oneDNN convolutions run faster forward and backward at these widths (results/README.md); the
    same model and weights, equal to float rounding (not bitwise: another kernel sums in another
    order; tests/test_model.py). ReLU runs in place on BatchNorm's output, which BatchNorm's
    backward does not read."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


# ----------------------------------------------------------------------------------------------
# Text tower g: a causal Transformer over tokenizer.Tokenizer ids (BPE or bytes), pooled at EOS
# ----------------------------------------------------------------------------------------------
TEXT_PRESETS: dict[str, tuple[int, int, int]] = {   # width, depth, heads
    "micro": (32, 1, 2),
    "mini": (64, 2, 2),
    "tiny": (128, 4, 2),
    "small": (256, 6, 4),
    "base": (512, 12, 8),      # CLIP's text tower size (Radford et al. 2021, Sec. 2.4)
}


class TextTower(nn.Module):
    """g. Causal attention + pooling at the first EOS token (as CLIP does) means the PAD tokens
    after EOS never influence the embedding, so no padding mask is needed and a batch may be
    cut to its longest caption. Token embeddings normal(0, 0.02), position embeddings
    normal(0, 0.01) and the projection normal(0, W^-0.5), as CLIP initialises its text tower."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 out_dim: int, eos_id: int):
        super().__init__()
        self.eos_id = eos_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = Blocks((str(i), Block(width, heads, causal=True)) for i in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, ids: Tensor) -> Tensor:                         # (B, L) -> (B, out_dim)
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]   # (B, L, W)
        x = self.blocks(x)
        eos = (ids == self.eos_id).int().argmax(dim=1)                   # first EOS per caption
        x = x[torch.arange(ids.shape[0], device=ids.device), eos]        # (B, W)
        return self.proj(self.ln_final(x))


# ----------------------------------------------------------------------------------------------
# Third tower h: a frozen pretrained classifier without its classification layer
# ----------------------------------------------------------------------------------------------
def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 images [..., 3, H, W] -> float32 (x / 255 - mean) / std, on their device: the loader
    ships uint8 (4x fewer bytes than float32 through shared memory and to the GPU) and each tower
    normalises its own input. Float input is taken as normalised already."""
    if images.is_floating_point():
        return images
    mean_, std_ = _channel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() / 255.0 - mean_) / std_


@functools.lru_cache(maxsize=None)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """mean and std as (3, 1, 1) tensors on `device`, made once: a tensor built from a Python list
    on a GPU is a blocking copy, which would make every step wait for the device."""
    with torch.inference_mode(False), torch.no_grad():
        return (torch.tensor(mean, device=device).view(3, 1, 1),
                torch.tensor(std, device=device).view(3, 1, 1))


class FrozenTower(nn.Module):
    """h. Parameters never require grad; eval mode always (a parent's .train() cannot switch it,
    so BatchNorm statistics and dropout never change); forward runs under no_grad. `view` is the
    preprocessing its weights were trained with (data.View): the loader crops uint8 images to it and
    forward applies its mean/std. D_h is the width of one dry forward pass's output."""

    def __init__(self, backbone: nn.Module, view: View, source: str, head: str | None = None):
        super().__init__()
        self.backbone, self.view, self.source, self.head = backbone, view, source, head
        self.backbone.requires_grad_(False)
        self.train(False)
        out = self(torch.zeros(1, 3, view.crop, view.crop, dtype=torch.uint8))
        if out.dim() != 2:
            raise ValueError(f"--tower3 {source!r}: the tower's output is {tuple(out.shape)} for "
                             f"one image, expected (1, D_h): an embedding per image")
        self.dim = out.shape[1]

    def train(self, mode: bool = True) -> "FrozenTower":
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, image: Tensor) -> Tensor:               # (B,3,S,S), uint8 -> (B, D_h)
        return self.backbone(normalize(image, self.view.mean, self.view.std))



# ----------------------------------------------------------------------------------------------
# The trainable model of each mode
# ----------------------------------------------------------------------------------------------
MAX_TEMPERATURE = 100.0   # CLIP clamps t = exp(s) at 100 (Radford et al. 2021, Sec. 2.5)


class ThreeTowers(nn.Module):
    """Everything that trains in `mode` (clip | lit | 3t). forward(image, text, h) returns
    L2-normalised embeddings keyed by the paper's symbols (f, g, h, f_h, g_h, h_f, h_g; only
    those the mode uses) and one temperature t_<term> per contrastive term of losses.PAIRS
    (plus a bias b_<term> with loss="sigmoid")."""

    def __init__(self, mode: str, *, image_arch: str = "vit-tiny", image_size: int = 64,
                 text_arch: str = "tiny", vocab_size: int = 259, context_length: int = 128,
                 eos_id: int = 257, embed_dim: int = 128, tower3_dim: int | None = None,
                 tower3_heads: bool = True, init_temperature: float = 10.0,
                 loss: str = "softmax", init_bias: float = -10.0):
        super().__init__()
        if mode not in PAIRS:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(PAIRS)}")
        if mode != "clip" and not tower3_dim:
            raise ValueError(f"mode {mode!r} needs the third tower's width tower3_dim (D_h)")
        if text_arch not in TEXT_PRESETS:
            raise ValueError(f"unknown text architecture {text_arch!r}; choose one of "
                             f"{', '.join(TEXT_PRESETS)}")
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown loss {loss!r}; choose softmax or sigmoid")
        self.mode, self.tower3_heads = mode, tower3_heads
        # LiT: the text tower projects straight into the frozen space D_h; no image side at all.
        text_dim = tower3_dim if mode == "lit" else embed_dim
        self.image = None if mode == "lit" else build_image_tower(image_arch, image_size, embed_dim)
        self.text = TextTower(vocab_size, context_length, *TEXT_PRESETS[text_arch],
                              out_dim=text_dim, eos_id=eos_id)
        if mode == "3t":
            head_dim = embed_dim if tower3_heads else tower3_dim
            self.f_h = nn.Linear(embed_dim, head_dim, bias=False)
            self.g_h = nn.Linear(embed_dim, head_dim, bias=False)
            if tower3_heads:
                self.h_f = nn.Linear(tower3_dim, embed_dim, bias=False)
                self.h_g = nn.Linear(tower3_dim, embed_dim, bias=False)
        # t = exp(s), s learnable, init t = 10 (README, "Where this project chooses"); one per term.
        self.log_temperature = nn.ParameterDict(
            {term: nn.Parameter(torch.tensor(math.log(init_temperature))) for term in PAIRS[mode]})
        self.bias = nn.ParameterDict(
            {term: nn.Parameter(torch.tensor(float(init_bias))) for term in PAIRS[mode]}
        ) if loss == "sigmoid" else None

    # -- public API: CLIP's names; each returns every embedding of its side, keyed by symbol -----
    def encode_image(self, image: Tensor | None, h: Tensor | None = None) -> dict[str, Tensor]:
        """Image-side embeddings, normalised, (B, D) each: f (clip, 3t); h (lit, pass
        h = tower3(I)); 3t also f_h(f), h_f(h), h_g(h). The head f_h reads f's unnormalised output
        (as g_h reads g's). At test time f (or h for lit) is the image embedding, as in CLIP."""
        out = {}
        if self.image is not None:
            f = self.image(normalize(image))           # uint8 from the loader: normalised here
            out["f"] = _norm(f)
        if self.mode == "lit":
            out["h"] = _norm(h)
        if self.mode == "3t":
            out["f_h"] = _norm(self.f_h(f))
            out["h_f"] = _norm(self.h_f(h) if self.tower3_heads else h)
            out["h_g"] = _norm(self.h_g(h) if self.tower3_heads else h)
        return out

    def encode_text(self, text: Tensor) -> dict[str, Tensor]:
        """Text-side embeddings of token ids (B, L), normalised: g; 3t also g_h(g)."""
        g = self.text(text)
        out = {"g": _norm(g)}
        if self.mode == "3t":
            out["g_h"] = _norm(self.g_h(g))
        return out

    def temperatures(self) -> dict[str, Tensor]:
        """t_<term> = exp(s) clamped at 100, and b_<term> for the sigmoid loss."""
        out = {f"t_{k}": s.clamp(max=math.log(MAX_TEMPERATURE)).exp()
               for k, s in self.log_temperature.items()}
        if self.bias is not None:
            out.update({f"b_{k}": b for k, b in self.bias.items()})
        return out

    @torch.no_grad()
    def clamp_temperatures_(self) -> None:
        """Keep the stored s <= log(100) after each optimiser step, so t never sticks above it."""
        for s in self.log_temperature.values():
            s.clamp_(max=math.log(MAX_TEMPERATURE))

    def set_grad_checkpointing(self, enabled: bool = True) -> list[str]:
        """Recompute the Transformer blocks' activations in backward (train.py
        --grad-checkpointing): the ViT blocks of f and the text blocks of g; conv towers have none.
        Returns the names of the block stacks switched."""
        stacks = [name for name, m in self.named_modules() if isinstance(m, Blocks)]
        for name in stacks:
            self.get_submodule(name).checkpointing = enabled
        return stacks

    def forward(self, image: Tensor | None, text: Tensor, h: Tensor | None = None
                ) -> dict[str, Tensor]:
        """image: (B,3,S,S) for f (None in lit); text: (B,L) token ids; h: (B, D_h), the frozen
        tower's output (lit, 3t). Returns every embedding of the mode, each (B, D), unit norm,
        float32, plus the temperatures -- the input of losses.tower_loss."""
        return {**self.encode_image(image, h), **self.encode_text(text), **self.temperatures()}


def precision(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The towers' arithmetic for --precision `name`: bf16 autocast on CUDA for 'auto' (the paper's
    towers train in bf16) or 'bf16'; float32 otherwise (bf16 is far slower on most CPUs). Losses
    and normalised embeddings stay float32 inside it (`_norm`, losses._logits)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _norm(x: Tensor) -> Tensor:
    """L2-normalise in float32 (embeddings leave bf16 autocast before any similarity)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def summary(model: ThreeTowers, tower3: FrozenTower | None = None) -> str:
    """Trainable and frozen parameter counts per tower, for the training log."""
    rows = [(name, sum(p.numel() for p in child.parameters()))
            for name, child in model.named_children()]
    lines = [f"{'part':<18}{'trainable':>14}{'frozen':>14}"]
    lines += [f"{name:<18}{n:>14,}{0:>14,}" for name, n in rows]
    if tower3 is not None:
        lines.append(f"{'h (' + tower3.source[:12] + ')':<18}{0:>14,}"
                     f"{sum(p.numel() for p in tower3.parameters()):>14,}")
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"{'total':<18}{total:>14,}{'':>14}")
    return "\n".join(lines)
