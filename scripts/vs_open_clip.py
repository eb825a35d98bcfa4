"""Our trainer against open_clip's trainer: same data on disk, same machine, one scorer for both.

open_clip is NOT a dependency of the project and nothing in it (tests included) imports it. It lives
in a side virtual environment, where `openclip`, `score` and `steps` run with this repository on
sys.path (the script adds it); `prepare`, `ours` and `report` run in either environment.

    python3 -m venv .venv-oc
    .venv-oc/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-oc/bin/pip install open-clip-torch==3.3.0 pandas braceexpand "webdataset>=0.2.5,<=0.2.86" fsspec
    # open_clip_train.main imports pandas, braceexpand, webdataset and fsspec: its [training] extra
    # without transformers, which the CSV path never uses

    python scripts/vs_open_clip.py prepare                      # 60k + 1k PNG/CSV pairs in runs/oc-data
    .venv-oc/bin/python scripts/vs_open_clip.py openclip        # 1 epoch (open_clip trains whole epochs)
    python scripts/vs_open_clip.py ours --steps 490 [--extra "--seed 1"]    # or --seconds S
    .venv-oc/bin/python scripts/vs_open_clip.py score CHECKPOINT                  # either kind
    .venv-oc/bin/python scripts/vs_open_clip.py steps [--equal-tokens] [--both-linears]   # step time, equal towers
    python scripts/vs_open_clip.py report RUN_FOLDER ...        # markdown table, mean ± std over seeds

Both trainers run in-process with 2 threads, fp32, workers 0, batch 256, lr 2e-3, warmup 30, AdamW
(0.9, 0.98, eps 1e-6), wd 0.1, cosine, grad clip 1, and start from the same temperature: open_clip's
1/0.07 (our default is 10, README "Where this project chooses"). The start matters here: t moves by
at most ~lr per step, so it stays near its start for the whole run. Wall time is the training call's
(model build, data setup, training, checkpoint), not the interpreter start's. open_clip opens CSV
paths relative to the working directory, so its launcher chdirs into the data folder; an experiment
`--name` must be new (open_clip refuses an existing one). Towers: ViT 4 x 128, patch 8, 32 px; text
4 x 128, 2 heads; embed 128; open_clip's BPE tokenizer (context 77), ours what `our_tokenizer` says.
Our patch-8 ViTs have a conv stem and pool the mean of their patch tokens (model.VIT_PRESETS),
open_clip's ViT has a plain patchify layer and a class token. Retrieval: per pair over the 1,000
held-out pairs, R@1 both ways, a negative scoring >= the positive ranking above it (eval.py's
convention), cross-checked against eval.recall_at_k and open_clip's get_clip_metrics.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OC_MODEL, OC_STEPS_MODEL = "shapes-vit4x128p8-text4x128", "steps-vit6x192p8-text4x192"
COMMON = ["--batch-size", "256", "--lr", "2e-3", "--warmup", "30", "--workers", "0"]
OPEN_CLIP_INIT_T = "14.29"        # open_clip's initial logit scale, 1/0.07 = 14.2857 (CLIP, Radford et al. 2021)


def oc_config(size: int, vit_depth: int, width: int, context: int) -> dict:
    """An open_clip config: patch-8 ViT and 4-layer text tower of one width, 64-wide heads, embed 128."""
    return {"embed_dim": 128, "vision_cfg": {"image_size": size, "layers": vit_depth, "width": width,
                                             "head_width": 64, "patch_size": 8},
            "text_cfg": {"context_length": context, "vocab_size": 49408, "width": width, "heads": width // 64,
                         "layers": 4}}


def register_oc_configs() -> None:
    """open_clip finds model configs by name in the folders registered with add_model_config."""
    import open_clip
    folder = tempfile.mkdtemp(prefix="oc-configs-")
    for name, cfg in {OC_MODEL: oc_config(32, 4, 128, 77), OC_STEPS_MODEL: oc_config(64, 6, 192, 64)}.items():
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(cfg, f)
    open_clip.add_model_config(folder)


def our_tokenizer(ckpt: dict | None = None, context_length: int = 64):
    """A checkpoint's own tokenizer; without one (the step benchmark), BPE learned from shapes captions,
    as train.py learns it at the start of a run."""
    import shapes
    from tokenizer import Tokenizer
    if ckpt is not None:
        return Tokenizer.from_dict(ckpt["tokenizer"])
    world = shapes.ShapesWorld(0, 64)
    return Tokenizer.learn([world.captions(i)[0] for i in range(20_000)], 8192, context_length)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def read_csv(path: str) -> tuple[list[str], list[str]]:
    """(absolute image paths, captions) of a filepath,title CSV whose paths are relative to it."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [os.path.join(os.path.dirname(os.path.abspath(path)), r["filepath"]) for r in rows], \
        [r["title"] for r in rows]


# ---------------------------------------------------------------------------------------- 1. data on disk
def prepare(a: argparse.Namespace) -> None:
    """The shapes world at 32 px as PNG + CSV: split 'train' and split 'test', one caption per image."""
    import shapes
    from torchvision.io import encode_png, write_file
    warnings.filterwarnings("ignore", message=".*image decoding and encoding")   # torchvision 0.29's codecs
    world, t0 = shapes.ShapesWorld(seed=0, image_size=32), time.time()
    for split, n in (("train", a.train), ("test", a.test)):
        rows = []
        for lo in range(0, n, 1000):                       # batch rendering, 1,000 files per folder
            indices = range(lo, min(n, lo + 1000))
            os.makedirs(os.path.join(a.out, split, f"{lo // 1000:03d}"), exist_ok=True)
            for i, image in zip(indices, world.render_batch(indices, split)):
                rows.append((f"{split}/{i // 1000:03d}/{i:06d}.png", world.captions(i, split, 1)[0]))
                write_file(os.path.join(a.out, rows[-1][0]), encode_png(image))
        with open(os.path.join(a.out, f"{split}.csv"), "w", newline="") as f:
            csv.writer(f).writerows([("filepath", "title"), *rows])
    print(f"{a.train} train + {a.test} test pairs in {a.out} ({time.time() - t0:.0f} s)")


def train_csv(a: argparse.Namespace) -> str:
    """train.csv, or with --train-rows N a copy of its first N rows beside it (paths stay relative)."""
    path = os.path.abspath(os.path.join(a.data, "train.csv"))
    if not a.train_rows:
        return path
    out = path[:-4] + f"-first{a.train_rows}.csv"
    with open(path) as f, open(out, "w") as g:
        g.writelines(line for _, line in zip(range(a.train_rows + 1), f))
    return out


# ---------------------------------------------------------------------------------------- 2. open_clip run
def run_openclip(a: argparse.Namespace) -> None:
    """open_clip_train.main.main in-process, our config registered; one epoch over the CSV."""
    import open_clip
    import open_clip_train.main
    register_oc_configs()
    torch.set_num_threads(a.threads)
    csv_path, name, logs = train_csv(a), a.name or time.strftime("openclip-%Y%m%d-%H%M%S"), os.path.abspath(a.logs)
    argv = ["--model", OC_MODEL, "--train-data", csv_path, "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--precision", "fp32", "--grad-clip-norm",
            "1.0", "--wd", "0.1", "--beta2", "0.98", "--eps", "1e-6", "--epochs", "1", "--save-frequency", "1",
            "--logs", logs, "--name", name, "--log-every-n-steps", "10", *COMMON, *shlex.split(a.extra)]
    cwd = os.getcwd()
    os.chdir(a.data)                          # open_clip opens CSV paths relative to the working directory
    try:
        t0 = time.time()
        rc = open_clip_train.main.main(argv)
        wall = time.time() - t0
    finally:
        os.chdir(cwd)
        logging.getLogger().setLevel(logging.WARNING)    # open_clip set the root logger to INFO
    if rc == -1:
        raise SystemExit(f"open_clip refused: {logs}/{name} exists already (pass a new --name)")
    rows = sum(1 for _ in open(csv_path)) - 1
    steps = rows // 256                                  # its training loader drops the last batch
    run = {"run": f"open_clip {open_clip.__version__}, 1 epoch of {rows} pairs", "wall_s": wall,
           "steps": steps, "samples_per_s": steps * 256 / wall, "threads": a.threads,
           "checkpoint": os.path.join(logs, name, "checkpoints", "epoch_1.pt"), "argv": argv}
    print(f"open_clip: {steps} steps, {wall:.1f} s, {run['samples_per_s']:.0f} samples/s")
    write_json(os.path.join(logs, name, "run.json"), run)


# ---------------------------------------------------------------------------------------- 3. our run
def our_argv(a: argparse.Namespace, out: str, steps: int) -> list[str]:
    return ["--mode", "clip", "--train-data", train_csv(a), "--image-arch", "vit-tiny", "--image-size", "32",
            "--text-arch", "tiny", "--embed-dim", "128", "--eval-data", "none", "--train-samples", "60000",
            "--steps", str(steps), "--init-temperature", OPEN_CLIP_INIT_T, "--quiet", "--out", out, *COMMON,
            *shlex.split(a.extra)]


def run_ours(a: argparse.Namespace) -> None:
    """train.main in-process. --seconds S: a --calibrate-step run first, whose last logged 10-step window
    sets the number of steps; the wall time reported is always the real run's."""
    import train
    os.environ["OMP_NUM_THREADS"] = str(a.threads)       # runtime.Env keeps it instead of taking every core
    torch.set_num_threads(a.threads)
    steps = a.steps
    if steps is None:
        scratch = tempfile.mkdtemp(prefix="vs-oc-calibrate-")
        train.main(our_argv(a, scratch, a.calibrate) + ["--log-every", "10"])
        with open(os.path.join(scratch, "metrics.jsonl")) as f:
            rate = [json.loads(line) for line in f][-1]["samples_per_s"]
        steps = max(1, round(a.seconds * rate / 256))
        print(f"calibration: {rate:.0f} samples/s -> {steps} steps for {a.seconds:.0f} s")
    t0 = time.time()
    train.main(our_argv(a, a.out, steps))
    wall = time.time() - t0
    run = {"run": f"ours, {steps} steps" + (f" ({a.extra})" if a.extra else ""), "wall_s": wall, "steps": steps,
           "samples_per_s": steps * 256 / wall, "threads": a.threads,
           "checkpoint": os.path.join(os.path.abspath(a.out), "ckpt.pt"), "argv": our_argv(a, a.out, steps)}
    print(f"ours: {steps} steps, {wall:.1f} s, {run['samples_per_s']:.0f} samples/s")
    write_json(os.path.join(a.out, "run.json"), run)


# ---------------------------------------------------------------------------------------- 4. one scorer
def embed_ours(path: str, images: list[str], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our checkpoint: checkpoints.load_trained (what eval.py uses), data.py's decoder and eval transform, our tokenizer."""
    import data
    import eval as evaluation
    from checkpoints import load_trained
    model, tower3, ckpt = load_trained(path)
    model.eval()
    transform = data.image_transform(ckpt["model_config"]["image_size"], train=False)
    raw = [data.decode_rgb(data._read_bytes(p)) for p in images]
    x = torch.stack([transform(r) for r in raw])
    h = tower3(torch.stack([data.tower3_view(r, tower3.view) for r in raw])) if tower3 is not None \
        else None                                               # lit needs h: its own view, as in training
    i, t = evaluation.view_pair(model.mode, "main")
    return model.encode_image(x, h)[i], model.encode_text(our_tokenizer(ckpt).encode(captions))[t]


def embed_openclip(path: str, images: list[str], captions: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip checkpoint: its own preprocess_val (on PIL images, as its CsvDataset) and tokenizer."""
    import open_clip
    from PIL import Image
    register_oc_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=path)
    model.eval()
    x = torch.stack([preprocess(Image.open(p)) for p in images])
    return (F.normalize(model.encode_image(x), dim=-1),
            F.normalize(model.encode_text(open_clip.get_tokenizer(name)(captions)), dim=-1))


def recall1(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """Per-pair R@1 (%): pair i's positive is column i; any negative scoring >= it ranks above it."""
    s = image.float() @ text.float().T
    hit = lambda m: (m >= m.diagonal()[:, None]).sum(1) == 1      # only the positive itself
    return {"i2t_R@1": 100 * hit(s).float().mean().item(), "t2i_R@1": 100 * hit(s.T).float().mean().item()}


def score(a: argparse.Namespace) -> None:
    import eval as evaluation
    torch.set_num_threads(a.threads)
    images, captions = read_csv(os.path.join(a.data, "test.csv"))
    kind = "openclip" if "state_dict" in torch.load(a.checkpoint, map_location="cpu", weights_only=True) else "ours"
    with torch.inference_mode():
        emb = embed_openclip(a.checkpoint, images, captions, a.oc_model) if kind == "openclip" \
            else embed_ours(a.checkpoint, images, captions)
    result = {"checkpoint": os.path.abspath(a.checkpoint), "kind": kind, "pairs": len(images), **recall1(*emb)}
    ev = evaluation.recall_at_k(*emb, torch.arange(len(images)), ks=(1,))       # cross-checks
    result["eval.py"] = {"i2t_R@1": ev["i2t/R@1"], "t2i_R@1": ev["t2i/R@1"]}
    try:
        from open_clip_train.train import get_clip_metrics
        oc = get_clip_metrics(*emb, 1.0)
        result["open_clip"] = {"i2t_R@1": 100 * oc["image_to_text_R@1"], "t2i_R@1": 100 * oc["text_to_image_R@1"]}
    except ImportError:
        pass
    print(f"{kind}: I->T R@1 {result['i2t_R@1']:.1f}, T->I R@1 {result['t2i_R@1']:.1f} over {len(images)} pairs; "
          + "; ".join(f"{k} {v['i2t_R@1']:.1f}/{v['t2i_R@1']:.1f}" for k, v in result.items() if isinstance(v, dict)))
    folder = os.path.dirname(os.path.abspath(a.checkpoint))               # the run folder, beside run.json
    write_json(os.path.join(os.path.dirname(folder) if kind == "openclip" else folder, "score.json"), result)


# ---------------------------------------------------------------------------------------- 5. step speed
def step_models(equal: bool, both_linears: bool) -> tuple[dict, torch.nn.Module, object, object]:
    """The towers of `steps` and each side's tokenizer: ours in clip and 3t (as runtime.wrap builds them
    for a CPU run), open_clip's as its trainer builds it. With `both_linears`, ours also on the other
    linear kernel (runtime's oneDNN linears where wrap keeps nn.Linear, and the reverse), the same
    weights, named "clip oneDNN" / "clip F.linear". Returns (ours by name, theirs, tok, oc_tok)."""
    import copy
    import open_clip
    import runtime
    from model import TEXT_PRESETS, VIT_PRESETS, ThreeTowers
    # Equal work (--equal-tokens): open_clip's own tower shapes -- a patchify ViT with a class token, its
    # 49,408-row embedding table -- and every caption padded to 64 tokens, none trimmed.
    VIT_PRESETS["vit-6x192"] = (8, 192, 6, 3, (), "token") if equal else (8, 192, 6, 3, (16, 32, 64), "mean")
    TEXT_PRESETS["4x192"] = (192, 4, 3)
    tok, oc_tok = our_tokenizer(context_length=64), open_clip.get_tokenizer(OC_STEPS_MODEL)
    towers = dict(image_arch="vit-6x192", image_size=64, text_arch="4x192",
                  vocab_size=49408 if equal else tok.vocab_size, context_length=64, eos_id=tok.EOS, embed_dim=128)
    ours = {}
    for mode in ("clip", "3t"):
        built = ThreeTowers(mode, **towers, tower3_dim=192 if mode == "3t" else None)
        other = copy.deepcopy(built) if both_linears else None
        ours[mode] = runtime.cpu_kernels(built, torch.device("cpu"))                     # as runtime.wrap does
        if other is not None:
            wrap_took_onednn = any(isinstance(m, runtime.OneDNNLinear) for m in built.modules())
            name = "F.linear" if wrap_took_onednn else "oneDNN"
            ours[f"{mode} {name}"] = other if wrap_took_onednn else runtime.use_onednn_linears(other)
    theirs = open_clip.create_model(OC_STEPS_MODEL, precision="fp32", output_dict=True)   # as its trainer
    return ours, theirs, tok, oc_tok


def oc_optimizer(theirs: torch.nn.Module) -> torch.optim.Optimizer:
    """open_clip's trainer's AdamW: no decay on gains, biases and logit_scale, 0.1 on the rest."""
    decay = {0.0: [], 0.1: []}
    for n, p in theirs.named_parameters():
        decay[0.0 if p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale")) else 0.1].append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": wd} for wd, ps in decay.items()],
                             lr=1e-3, betas=(0.9, 0.98), eps=1e-6)


def oc_step(model: torch.nn.Module, optim: torch.optim.Optimizer, loss_fn, images: torch.Tensor,
            text: torch.Tensor) -> None:
    """One step as open_clip's train_one_epoch runs it: loss, backward, clip at 1, AdamW, logit_scale clamp."""
    out = model(images, text)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def our_step(mode: str, model: torch.nn.Module, optim: torch.optim.Optimizer, sched, images: torch.Tensor,
             text: torch.Tensor, h: torch.Tensor | None) -> None:
    """One step as train.py runs it: tower_loss, backward, train.adamw_update (clip at 1), temperature clamp."""
    import train
    from losses import default_weights, tower_loss
    optim.zero_grad(set_to_none=True)
    tower_loss(model(images, text, h), mode, default_weights(mode))[0].backward()
    train.adamw_update(model, optim, sched, 1.0)
    model.clamp_temperatures_()


def report_steps(a: argparse.Namespace, order: tuple[str, ...], rounds: list[list[float]], counts: dict,
                 batches: list) -> None:
    """The table of `steps` (median step times, the median paired ratio of samples/s against
    open_clip's; with --both-linears also oneDNN's over F.linear's, per mode) and its JSON."""
    B, last = a.batch, len(order) - 1                                          # open_clip runs last
    t = {who: statistics.median(r[i] for r in rounds) for i, who in enumerate(order)}
    ratio = {who: statistics.median(r[last] / r[i] for r in rounds) for i, who in enumerate(order[:last])}
    print(f"{'step':<20}{'ms/step':>10}{'samples/s':>11}{'params':>12}{'vs open_clip':>14}")
    for who in order:
        name = who if who == "open_clip" else f"ours {who}"
        print(f"{name:<20}{1000 * t[who]:>10.0f}{B / t[who]:>11.0f}{counts[who]:>12,}"
              f"{f'{ratio[who]:.2f}x' if who in ratio else '':>14}")
    print(f"median of {a.pairs} paired ratios (ours samples/s over open_clip's, per round)")
    gain = {}
    for mode in ("clip", "3t"):
        other = next((who for who in order if who.startswith(f"{mode} ")), None)
        if other is not None:
            i, j = order.index(mode), order.index(other)
            per_round = [r[j] / r[i] if other.endswith("F.linear") else r[i] / r[j] for r in rounds]
            gain[mode] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
            print(f"{mode}: oneDNN linears' samples/s over F.linear's {gain[mode]['median']:.2f}x "
                  f"({gain[mode]['min']:.2f}-{gain[mode]['max']:.2f}, {a.pairs} rounds; this CPU: "
                  f"{torch.backends.cpu.get_cpu_capability()}, where runtime.wrap takes "
                  f"{'F.linear' if other.endswith('oneDNN') else 'oneDNN'})")
    write_json(a.out, {"batch": B, "threads": a.threads, "equal_tokens": a.equal_tokens, "pairs": a.pairs,
                       "warmup": a.warmup, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "ms_per_step": {w: 1000 * x for w, x in t.items()},
                       "ratio_ours_over_open_clip": ratio, "onednn_over_f_linear": gain, "params": counts,
                       "ours_text_len": [b[0].shape[1] for b in batches],
                       "open_clip_text_len": batches[0][1].shape[1], "rounds_s": rounds})


def steps(a: argparse.Namespace) -> None:
    """One full training step of each trainer, as each trainer runs it -- forward, loss, backward,
    gradient clipping at 1, AdamW with its parameter groups, temperature clamp -- in turn in one
    process, on the same random images and shapes captions (each its own tokenizer). Ours runs
    train.py's own update (train.build_optimizer, train.adamw_update); open_clip's the update
    of its train_one_epoch: torch.optim.AdamW without decay on gains, biases and logit_scale, then
    clip_grad_norm_. Ours steps clip and 3t (h cached: a fixed (B, 192) tensor, h as wide as f),
    open_clip clip; rounds go ours-clip, ours-3t, open_clip. --both-linears adds ours on the other
    linear kernel to each round (what runtime's oneDNN routing buys or would cost on this CPU)."""
    import shapes
    import open_clip
    import train
    register_oc_configs()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    equal = a.equal_tokens
    ours, theirs, tok, oc_tok = step_models(equal, a.both_linears)
    world, B, oc_loss = shapes.ShapesWorld(seed=0, image_size=64), a.batch, open_clip.ClipLoss()
    captions = [[world.captions(i, "train", 1)[0] for i in range(k * B, (k + 1) * B)] for k in range(4)]
    batches = [(tok.encode(c) if equal else tok.trim(tok.encode(c)), oc_tok(c)) for c in captions]  # train.py trims
    images, h = torch.randn(B, 3, 64, 64), torch.randn(B, 192)
    hyper = argparse.Namespace(lr=1e-3, wd=0.1, beta2=0.98)
    optim = {mode: train.build_optimizer(m, hyper) for mode, m in ours.items()}
    sched = {mode: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for mode, o in optim.items()}
    oc_optim = oc_optimizer(theirs)

    def step(who: str, k: int) -> float:
        t0 = time.perf_counter()
        text = batches[k % len(batches)]
        if who == "open_clip":
            oc_step(theirs, oc_optim, oc_loss, images, text[1])
        else:
            mode = who.split()[0]                                       # "3t oneDNN": mode 3t
            our_step(mode, ours[who], optim[who], sched[who], images, text[0], h if mode == "3t" else None)
        return time.perf_counter() - t0

    order = (*ours, "open_clip")
    rounds = [[step(who, k) for who in order] for k in range(a.warmup + a.pairs)][a.warmup:]
    counts = {who: sum(p.numel() for p in m.parameters()) for who, m in (*ours.items(), ("open_clip", theirs))}
    report_steps(a, order, rounds, counts, batches)


def seed_of(argv: list[str]) -> int:
    """The seed a run's argv gives (the last --seed wins; both trainers default to 0)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_known_args(argv)[0].seed


def report(a: argparse.Namespace) -> None:
    """A markdown table from run folders holding run.json (and score.json once scored): one row per run,
    then one per group of runs that differ only in their seed, with the mean and the sample standard
    deviation over those seeds."""
    nan, rows = float("nan"), []
    for folder in a.runs:
        run = json.load(open(os.path.join(folder, "run.json")))
        sc = os.path.join(folder, "score.json")
        sc = json.load(open(sc)) if os.path.exists(sc) else {}
        group = re.sub(r" \(\)$", "", re.sub(r"\s*--seed \d+", "", run["run"]))
        rows.append((group, seed_of(run["argv"]), run, sc.get("i2t_R@1", nan), sc.get("t2i_R@1", nan)))
    print("| run | seed | wall s | samples/s | I->T R@1 | T->I R@1 |\n|---|---|---|---|---|---|")
    for group, seed, run, i2t, t2i in rows:
        print(f"| {group} | {seed} | {run['wall_s']:.0f} | {run['samples_per_s']:.0f} | {i2t:.1f} | {t2i:.1f} |")
    spread = lambda x: f"{statistics.mean(x):.1f} ± {statistics.stdev(x) if len(x) > 1 else nan:.1f}"
    for group in dict.fromkeys(r[0] for r in rows):
        g = [r for r in rows if r[0] == group]
        print(f"| **{group}**, mean ± std | {len(g)} seeds | {statistics.mean(r[2]['wall_s'] for r in g):.0f} | "
              f"{statistics.mean(r[2]['samples_per_s'] for r in g):.0f} | {spread([r[3] for r in g])} | "
              f"{spread([r[4] for r in g])} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--data", default="runs/oc-data", help="the folder `prepare` wrote")
    run = argparse.ArgumentParser(add_help=False, parents=[common])
    run.add_argument("--train-rows", type=int, help="train on a cut copy of the CSV (smoke runs)")
    run.add_argument("--extra", default="", help="more trainer flags, one string")
    c = sub.add_parser("prepare", help="write the shapes world as PNG + CSV")
    c.add_argument("--out", default="runs/oc-data")
    c.add_argument("--train", type=int, default=60_000)
    c.add_argument("--test", type=int, default=1_000)
    c = sub.add_parser("openclip", parents=[run], help="1 epoch of open_clip's trainer (venv-oc)")
    c.add_argument("--logs", default="runs/vs-open-clip")
    c.add_argument("--name", help="open_clip experiment name (must be new; default: a time stamp)")
    c = sub.add_parser("ours", parents=[run], help="our trainer")
    c.add_argument("--out", default="runs/vs-open-clip/ours")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int)
    g.add_argument("--seconds", type=float, help="steps from a short calibration run's speed")
    c.add_argument("--calibrate", type=int, default=20, help="steps of the calibration run")
    c = sub.add_parser("score", parents=[common], help="per-pair R@1 of a checkpoint of either kind (venv-oc)")
    c.add_argument("checkpoint")
    c.add_argument("--oc-model", default=OC_MODEL)
    c = sub.add_parser("steps", parents=[common], help="step time at equal towers, interleaved (venv-oc)")
    c.add_argument("--batch", type=int, default=128)
    c.add_argument("--pairs", type=int, default=20)
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--out", default="runs/vs-open-clip/steps.json")
    c.add_argument("--equal-tokens", action="store_true",
                   help="equal work: open_clip's tower shapes (patchify ViT, class token, 49,408-token table) and "
                        "64-token captions on both sides, none trimmed")
    c.add_argument("--both-linears", action="store_true",
                   help="also ours on the other linear kernel (runtime's oneDNN linears where runtime.wrap keeps "
                        "nn.Linear on this CPU, and the reverse), in the same rounds: what the routing buys here")
    c = sub.add_parser("report", help="markdown table of run folders (run.json, score.json), mean ± std over seeds")
    c.add_argument("runs", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "steps":
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    {"prepare": prepare, "openclip": run_openclip, "ours": run_ours, "score": score, "steps": steps,
     "report": report}[a.cmd](a)


if __name__ == "__main__":
    main()
