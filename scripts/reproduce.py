"""Reproduce the orderings claimed by the 3T paper at laptop scale, or show where they fail.

    python scripts/reproduce.py              # towers + 5 methods x 2 regimes x 3 seeds
    python scripts/reproduce.py --sweep      # also the data-scale sweep and results/scaling.png
    python scripts/reproduce.py --quick      # a smoke run of the whole pipeline

The paper's claims (Kossen et al. 2023, abstract and Sec. 5):
  R1  retrieval: 3T beats LiT and the from-scratch CLIP-style baseline;
  C1  classification: 3T beats from-scratch;
  C2  3T trails LiT when the pretrained labels cover what captions say (JFT-like);
  C3  3T beats LiT when they cover less (Places365-like).

What runs, all through `train.main`, the function `python train.py` calls (in this process, one run
after another, so no time goes to launching processes):
  1. `--mode supervised` pretrains two third towers on many labelled shapes images (as a pretrained
     model has seen many more labelled images than the paired runs see pairs): one on `object`
     labels (shape x colour, the JFT-like case), one on `scene` labels (background only, the
     Places-like case). Their held-out accuracy is reported.
  2. For each regime and seed: `clip`, and `lit` and `3t` with each tower -- five runs with identical
     towers, steps, batch, learning rate and seed. Nothing is tuned per method.
  3. Each run ends with train.py's evaluation (eval.py): retrieval over 500 images x 5 captions, zero-shot
     object, position/size and scene. 3T rows use f and g alone (alpha = 1), as the paper does; the
     third-tower pairing and the alpha = 0.5 mix are reported beside them as an analysis.
Regimes: `clean` (plentiful correct pairs) and `noisy` (half of the captions belong to another image,
like web alt-text). The sweep varies the number of distinct training pairs at the same step budget.

An ordering A > B is decided only when the mean over seeds of the paired difference A - B (same seed,
same data) exceeds two standard errors of that mean; otherwise it is "within noise".
Writes results/reproduce.md and .json (and results/scaling.png, results/scaling.md with --sweep).
How long each command takes on 2 CPU cores: results/README.md ("Reproduction").
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

METHODS = [("clip", None), ("lit", "object"), ("3t", "object"), ("lit", "scene"), ("3t", "scene")]
REGIMES = {"clean": [], "noisy": ["--caption-noise", "0.5"]}
COLUMNS = {"retrieval/i2t/R@1": "I->T R@1", "retrieval/t2i/R@1": "T->I R@1",
           "zeroshot/object/top1": "0-shot object", "zeroshot/scene/top1": "0-shot scene"}
CHANCE = {"retrieval/i2t/R@1": 0.2, "retrieval/t2i/R@1": 0.2, "zeroshot/object/top1": 100 / 35,
          "zeroshot/scene/top1": 100 / 6}
# Identical for every method. The paired budget: CLIP itself learns retrieval well within it.
IMAGE = ["--image-arch", "cnn-tiny", "--image-size", "32"]           # f, and the third towers
TOWERS = IMAGE + ["--text-arch", "mini", "--embed-dim", "64"]
SIZES = {
    "full": {"paired": ["--steps", "200", "--batch-size", "256", "--lr", "3e-3", "--warmup", "20"],
             "pairs": 51_200, "sweep": [800, 3_200, 12_800, 51_200], "sweep_seeds": 2,
             "pretrain": ["--steps", "400", "--batch-size", "128", "--lr", "4e-3", "--warmup", "20",
                          "--train-samples", "51200"]},
    "quick": {"paired": ["--steps", "8", "--batch-size", "32", "--warmup", "2"],
              "pairs": 2_000, "sweep": [200, 2_000], "sweep_seeds": 2,
              "pretrain": ["--steps", "8", "--batch-size", "32", "--warmup", "2", "--train-samples", "2000"]},
}


def quiet(argv: list[str]) -> dict[str, float]:
    """train.main with the progress bar and log lines off; returns the final evaluation."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(argv + ["--quiet"])


def pretrain_towers(out: str, size: str) -> tuple[dict[str, str], dict[str, float]]:
    """Two supervised towers (object and scene labels); their checkpoints and held-out accuracy (%)."""
    towers, accuracy = {}, {}
    for label in ("object", "scene"):
        folder = os.path.join(out, f"tower3-{label}")
        result = quiet(["--mode", "supervised", "--label", label, "--seed", "0", "--out", folder,
                        "--eval-images", "1000", *IMAGE, *SIZES[size]["pretrain"]])
        towers[label], accuracy[label] = os.path.join(folder, "ckpt.pt"), 100 * result["test/top1"]
        print(f"[reproduce] tower3 '{label}': held-out {label} accuracy {accuracy[label]:.1f}%", flush=True)
    return towers, accuracy


def run_one(out: str, name: str, mode: str, tower: str | None, towers: dict, extra: list[str]) -> dict[str, float]:
    """One paired run; its final evaluation."""
    args = ["--mode", mode, "--out", os.path.join(out, name), "--cache-dir", os.path.join(out, "cache"), *TOWERS,
            *extra] + (["--tower3", towers[tower]] if tower else [])
    start = time.time()
    result = quiet(args)
    print(f"[reproduce] {name} ({time.time() - start:.0f} s): "
          + ", ".join(f"{COLUMNS[k]} {result[k]:.1f}" for k in COLUMNS), flush=True)
    return result


def runs_of(out: str, size: str, regime: str, seed: int, pairs: int, towers: dict) -> dict:
    """The five methods on one regime, seed and number of pairs."""
    extra = [*SIZES[size]["paired"], "--seed", str(seed), "--train-samples", str(pairs), *REGIMES[regime]]
    return {(mode, tower): run_one(out, f"{regime}-{pairs}-{mode}{'-' + tower if tower else ''}-s{seed}",
                                   mode, tower, towers, extra) for mode, tower in METHODS}


# ----------------------------------------------------------------------------------------------
# Statistics: mean +- std per cell; orderings from paired differences
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def verdict(a: list[float], b: list[float]) -> tuple[str, float, float]:
    """(held | not held | within noise, mean paired difference a - b, its standard error)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    if abs(mean) <= 2 * se:
        return "within noise", mean, se
    return ("held" if mean > 0 else "not held"), mean, se


CLAIMS = [  # (name, metric, method A, method B): the claim is A > B
    ("R1 I->T: 3T/object > LiT/object", "retrieval/i2t/R@1", ("3t", "object"), ("lit", "object")),
    ("R1 I->T: 3T/scene > LiT/scene", "retrieval/i2t/R@1", ("3t", "scene"), ("lit", "scene")),
    ("R1 I->T: 3T/object > CLIP", "retrieval/i2t/R@1", ("3t", "object"), ("clip", None)),
    ("R1 I->T: 3T/scene > CLIP", "retrieval/i2t/R@1", ("3t", "scene"), ("clip", None)),
    ("R1 T->I: 3T/object > LiT/object", "retrieval/t2i/R@1", ("3t", "object"), ("lit", "object")),
    ("R1 T->I: 3T/object > CLIP", "retrieval/t2i/R@1", ("3t", "object"), ("clip", None)),
    ("C1 0-shot object: 3T/object > CLIP", "zeroshot/object/top1", ("3t", "object"), ("clip", None)),
    ("C1 0-shot object: 3T/scene > CLIP", "zeroshot/object/top1", ("3t", "scene"), ("clip", None)),
    ("C2 0-shot object: LiT/object > 3T/object", "zeroshot/object/top1", ("lit", "object"), ("3t", "object")),
    ("C3 0-shot object: 3T/scene > LiT/scene", "zeroshot/object/top1", ("3t", "scene"), ("lit", "scene")),
]


def orderings(runs: dict) -> list[str]:
    """Each claim on one regime's runs (lists over seeds, same seed order for every method)."""
    lines = []
    for claim, key, a, b in CLAIMS:
        va, vb = [r[key] for r in runs[a]], [r[key] for r in runs[b]]
        word, mean, se = verdict(va, vb)
        lines.append(f"- {claim}: {statistics.mean(va):.1f} vs {statistics.mean(vb):.1f}, paired difference "
                     f"{mean:+.1f} ± {se:.1f} (s.e.) -> **{word}**")
    return lines


def label(mode: str, tower: str | None) -> str:
    return {"clip": "CLIP (from scratch)", "lit": "LiT", "3t": "3T"}[mode] + (f" / {tower}" if tower else "")


def table(runs: dict) -> list[str]:
    out = ["| method / pretrained tower | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method in METHODS:
        out.append(f"| {label(*method)} | " + " | ".join(mean_std([r[k] for r in runs[method]]) for k in COLUMNS) + " |")
    for tower in ("object", "scene"):
        for prefix, name in (("tower3/", "third-tower pairing (h_g, g_h)"), ("mix@0.5/", "alpha = 0.5 mix")):
            out.append(f"| 3T / {tower}, {name} | " + " | ".join(
                mean_std([r[prefix + k] for r in runs[("3t", tower)]]) if prefix + k in runs[("3t", tower)][0]
                else "" for k in COLUMNS) + " |")
    return out


# ----------------------------------------------------------------------------------------------
# The data-scale sweep: a figure drawn with PIL (which torchvision brings)
# ----------------------------------------------------------------------------------------------
COLOURS = {("clip", None): (90, 90, 90), ("lit", "object"): (31, 119, 180), ("3t", "object"): (214, 39, 40),
           ("lit", "scene"): (120, 170, 220), ("3t", "scene"): (240, 140, 140)}


def draw_scaling(path: str, sweep: dict[int, dict], metrics: list[str]) -> None:
    """One panel per metric: the number of distinct training pairs (log scale) against the metric,
    one line per method, mean over seeds with +- 1 std error bars (eval.draw_panels draws it)."""
    from eval import draw_panels
    pairs, panels = sorted(sweep), []
    for key in metrics:
        lines = {}
        for method in METHODS:
            values = [[r[key] for r in sweep[n][method]] for n in pairs]
            lines[label(*method)] = [(n, statistics.mean(v), statistics.stdev(v) if len(v) > 1
                                      else 0.0) for n, v in zip(pairs, values)]
        panels.append((f"{COLUMNS[key]} vs distinct training pairs", f"{COLUMNS[key]} (%)", lines))
    draw_panels(path, panels, x_label="distinct training pairs (log scale)", log_x=True,
                x_ticks=pairs, y_range=(0, 100), columns=len(panels),
                colours={label(*m): c for m, c in COLOURS.items()})


def sweep_claims(sweep: dict[int, dict]) -> list[str]:
    """Each claim at each number of pairs, summarised: held at every size, only from N pairs up, only up
    to N pairs, not held at any size, or not decided."""
    lines, pairs = [], sorted(sweep)
    for claim, key, a, b in CLAIMS:
        words = {n: verdict([r[key] for r in sweep[n][a]], [r[key] for r in sweep[n][b]])[0] for n in pairs}
        held = [n for n in pairs if all(words[m] == "held" for m in pairs if m >= n)]
        below = [n for n in pairs if all(words[m] == "held" for m in pairs if m <= n)]
        if len(held) == len(pairs):
            summary = "held at every size"
        elif held:
            summary = f"held only from {held[0]:,} pairs up"
        elif below:
            summary = f"held only up to {below[-1]:,} pairs"
        elif all(w == "not held" for w in words.values()):
            summary = "not held at any size"
        else:
            summary = "not decided"
        lines.append(f"- {claim}: **{summary}** (" + ", ".join(f"{n:,}: {words[n]}" for n in pairs) + ")")
    return lines


# ----------------------------------------------------------------------------------------------
def write(out: str, stem: str, md: list[str], record: dict) -> None:
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(record, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method and regime")
    p.add_argument("--sweep", action="store_true", help="also the data-scale sweep (fewer seeds)")
    p.add_argument("--quick", action="store_true", help="tiny steps: checks the pipeline, not the claims")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for the tables and runs")
    a = p.parse_args()
    size = "quick" if a.quick else "full"
    cfg, runs_dir, stem = SIZES[size], os.path.join(a.out, "reproduce-runs"), "reproduce-quick" if a.quick else "reproduce"
    os.makedirs(runs_dir, exist_ok=True)
    start = time.time()
    towers, accuracy = pretrain_towers(runs_dir, size)
    seeds = list(range(a.seeds))
    results = {regime: {m: [] for m in METHODS} for regime in REGIMES}
    for regime in REGIMES:
        for seed in seeds:
            for method, r in runs_of(runs_dir, size, regime, seed, cfg["pairs"], towers).items():
                results[regime][method].append(r)
    minutes = (time.time() - start) / 60
    date = datetime.date.today().isoformat()
    md = [f"# 3T at laptop scale: reproduction ({date})", "",
          f"`python scripts/reproduce.py{' --quick' if a.quick else ''}`: {len(seeds)} seeds, {minutes:.1f} minutes on "
          f"{os.cpu_count()} CPU cores. Towers: `{' '.join(TOWERS)}`; paired runs: `{' '.join(cfg['paired'])}` "
          f"over {cfg['pairs']:,} pairs. Third towers ({' '.join(cfg['pretrain'])}): held-out accuracy on their own "
          f"labels " + ", ".join(f"{k} {v:.1f} %" for k, v in accuracy.items()) + " (chance 2.9 % and 16.7 %).", "",
          "Mean ± std over seeds, in %. Chance: retrieval 0.2, object 2.9, scene 16.7. An ordering is decided "
          "when the mean paired difference (same seed) exceeds two standard errors.", ""]
    for regime in REGIMES:
        md += [f"## Regime `{regime}` {' '.join(REGIMES[regime]) or '(no caption noise)'}", ""]
        md += table(results[regime]) + ["", "The paper's orderings:", ""] + orderings(results[regime]) + [""]
    record = {"minutes": minutes, "seeds": seeds, "tower3_accuracy": accuracy, "towers": TOWERS, "config": cfg,
              "results": {reg: {f"{m}/{t}": v for (m, t), v in r.items()} for reg, r in results.items()}}
    write(a.out, stem, md, record)  # the main tables land before the (long) sweep starts
    if a.sweep:
        sweep_start = time.time()
        sweep = {cfg["pairs"]: {m: v[:cfg["sweep_seeds"]] for m, v in results["clean"].items()}}
        for pairs in cfg["sweep"][:-1]:
            sweep[pairs] = {m: [] for m in METHODS}
            for seed in range(cfg["sweep_seeds"]):
                for method, r in runs_of(runs_dir, size, "clean", seed, pairs, towers).items():
                    sweep[pairs][method].append(r)
        keys = ["retrieval/i2t/R@1", "zeroshot/object/top1"]
        draw_scaling(os.path.join(a.out, "scaling.png" if not a.quick else "scaling-quick.png"), sweep, keys)
        sweep_md = [f"# Data-scale sweep ({date})", "",
                    f"`python scripts/reproduce.py --sweep`: clean regime, {cfg['sweep_seeds']} seeds, the same "
                    f"{' '.join(cfg['paired'])} at every size, {(time.time() - sweep_start) / 60:.1f} more minutes. "
                    f"Figure: `scaling.png` (mean ± std).", ""]
        for key in keys:
            sweep_md += [f"## {COLUMNS[key]}", "", "| pairs | " + " | ".join(label(*m) for m in METHODS) + " |",
                         "|---" * (len(METHODS) + 1) + "|"]
            sweep_md += [f"| {n:,} | " + " | ".join(mean_std([r[key] for r in sweep[n][m]]) for m in METHODS) + " |"
                         for n in sorted(sweep)] + [""]
        sweep_md += ["## The paper's claims across the sweep", ""] + sweep_claims(sweep)
        with open(os.path.join(a.out, f"scaling{'-quick' if a.quick else ''}.md"), "w") as f:
            f.write("\n".join(sweep_md) + "\n")
        record["sweep"] = {str(n): {f"{m}/{t}": v for (m, t), v in r.items()} for n, r in sweep.items()}
    write(a.out, stem, md, record)
    print(f"[reproduce] {(time.time() - start) / 60:.1f} minutes; wrote {a.out}/{stem}.md and .json")


if __name__ == "__main__":
    main()
