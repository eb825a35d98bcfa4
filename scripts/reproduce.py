"""Reproduce the orderings claimed by the 3T paper at laptop scale, or show where they fail.

    python scripts/reproduce.py              # ~20-30 minutes on 2 CPU cores
    python scripts/reproduce.py --quick      # a smoke run of the whole pipeline (~3 minutes)

The paper's claims (Kossen et al. 2023, abstract and Sec. 5):
  R1  retrieval: 3T beats LiT and the from-scratch CLIP-style baseline;
  C1  classification: 3T beats from-scratch;
  C2  3T trails LiT when the pretrained labels cover what captions say (JFT-like);
  C3  3T beats LiT when they cover less (Places365-like).

What runs, all through the same entry points users call:
  1. `train.py --mode supervised` pretrains two third towers on the shapes world: one on `object`
     labels (shape x colour: the JFT-like case) and one on `scene` labels (background only: the
     Places-like case). Each tower sees many more labelled images than the paired runs see pairs,
     as a pretrained model does.
  2. For every regime x seed: `clip`, and `lit` and `3t` with each tower (five runs), under
     `torchrun --nproc_per_node=2`, with identical towers, steps, batch, learning rate and seed.
  3. `eval.py` on every checkpoint: retrieval R@1 both ways, zero-shot accuracy on the object task
     and on the position/size task, and the 3T alpha sweep.
Regimes (flags of the shapes world): `clean` (plentiful correct pairs) and `noisy` (half of the
captions belong to another image, like web alt-text). Nothing is tuned per method.
Writes results/reproduce.md (tables: mean +- std over seeds) and results/reproduce.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402

METHODS = [("clip", None), ("lit", "object"), ("3t", "object"), ("lit", "scene"), ("3t", "scene")]
REGIMES = {"clean": [], "noisy": ["--caption-noise", "0.5"]}
COLUMNS = {"retrieval/i2t/R@1": "I->T R@1", "retrieval/t2i/R@1": "T->I R@1",
           "zeroshot/object/top1": "0-shot object", "zeroshot/position_size/top1": "0-shot pos/size"}
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Small towers so that 2 x 5 x 3 runs fit in half an hour on 2 cores; identical for every method.
# The paired budget is about the least at which CLIP itself leaves chance clearly (R@1 ~10 %):
# with 140 steps, or half the batch, it does not.
TOWERS = ["--image-arch", "vit-mini", "--text-arch", "micro", "--embed-dim", "64", "--image-size", "64"]
PAIRED = {"full": ["--steps", "220", "--batch-size", "64", "--train-samples", "28160", "--lr", "2e-3",
                   "--warmup", "20"],
          "quick": ["--steps", "10", "--batch-size", "32", "--train-samples", "2000", "--warmup", "2"]}
PRETRAIN = {"full": ["--steps", "800", "--batch-size", "64", "--train-samples", "102400", "--lr", "2e-3",
                     "--warmup", "30"],
            "quick": ["--steps", "10", "--batch-size", "32", "--train-samples", "2000", "--warmup", "2"]}


def torchrun(args: list[str], log: str) -> None:
    """`torchrun --standalone --nproc_per_node=2 train.py ARGS`, output to a log file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *args, "--quiet"]
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode:
            raise SystemExit(f"reproduce: {' '.join(cmd)} failed; see {log}")


def pretrain_towers(out: str, size: str) -> tuple[dict[str, str], dict[str, float]]:
    """Two supervised towers (object and scene labels); their checkpoints and held-out accuracy."""
    towers, accuracy = {}, {}
    for label in ("object", "scene"):
        folder = os.path.join(out, f"tower3-{label}")
        torchrun(["--mode", "supervised", "--label", label, "--seed", "0", "--out", folder,
                  "--eval-images", "1000", *TOWERS, *PRETRAIN[size]], folder + ".log")
        towers[label] = os.path.join(folder, "ckpt.pt")
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            final = [json.loads(line) for line in f if '"eval"' in line][-1]["eval"]
        accuracy[label] = 100 * final["test/top1"]
        print(f"[reproduce] tower3 '{label}': held-out {label} accuracy {accuracy[label]:.1f}%", flush=True)
    return towers, accuracy


def run_one(out: str, regime: str, seed: int, mode: str, tower: str | None, towers: dict, size: str
            ) -> dict[str, float]:
    name = f"{regime}-{mode}{'-' + tower if tower else ''}-s{seed}"
    folder = os.path.join(out, name)
    args = ["--mode", mode, "--seed", str(seed), "--out", folder, "--eval-data", "none",
            "--cache-dir", os.path.join(out, "cache"), *TOWERS, *PAIRED[size], *REGIMES[regime]]
    if tower:
        args += ["--tower3", towers[tower]]
    torchrun(args, folder + ".log")
    result = evaluation.main(["--checkpoint", os.path.join(folder, "ckpt.pt"), "--tasks", "zeroshot,retrieval",
                              "--alphas", ",".join(map(str, ALPHAS)), "--no-progress"])
    print(f"[reproduce] {name}: " + ", ".join(f"{COLUMNS[k]} {result[k]:.1f}" for k in COLUMNS), flush=True)
    return result


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def label(mode: str, tower: str | None) -> str:
    return {"clip": "CLIP (from scratch)", "lit": "LiT", "3t": "3T"}[mode] + (f" / {tower} tower" if tower else "")


def orderings(results: dict, regime: str) -> list[str]:
    """The paper's claims, checked on the means of this regime; a difference smaller than the larger
    of the two standard deviations over seeds is marked as within noise."""
    runs = lambda mode, tower, key: [r[key] for r in results[regime][(mode, tower)]]  # noqa: E731
    lines = []
    for key in ("retrieval/i2t/R@1", "retrieval/t2i/R@1"):
        for tower in ("object", "scene"):
            lines.append(check(f"R1 {COLUMNS[key]}: 3T/{tower} > LiT/{tower}", runs("3t", tower, key), runs("lit", tower, key)))
            lines.append(check(f"R1 {COLUMNS[key]}: 3T/{tower} > CLIP", runs("3t", tower, key), runs("clip", None, key)))
    key = "zeroshot/object/top1"
    for tower in ("object", "scene"):
        lines.append(check(f"C1 0-shot object: 3T/{tower} > CLIP", runs("3t", tower, key), runs("clip", None, key)))
    lines.append(check("C2 0-shot object: LiT/object > 3T/object", runs("lit", "object", key), runs("3t", "object", key)))
    lines.append(check("C3 0-shot object: 3T/scene > LiT/scene", runs("3t", "scene", key), runs("lit", "scene", key)))
    return lines


def check(claim: str, a: list[float], b: list[float]) -> str:
    ma, mb = statistics.mean(a), statistics.mean(b)
    noise = max(statistics.stdev(a), statistics.stdev(b)) if min(len(a), len(b)) > 1 else 0.0
    verdict = "held" if ma > mb else "did not hold"
    return f"- {claim}: {ma:.1f} vs {mb:.1f} -> **{verdict}**" + (" (within noise)" if abs(ma - mb) < noise else "")


def report(results: dict, seeds: list[int], minutes: float, towers_acc: str, size: str) -> str:
    date = datetime.date.today().isoformat()
    command = "python scripts/reproduce.py" + (" --quick" if size == "quick" else "")
    out = [f"# 3T at laptop scale: reproduction ({date})", "",
           f"`{command}` -- {len(seeds)} seeds, {minutes:.0f} minutes on "
           f"{os.cpu_count()} CPU cores. Towers: {' '.join(TOWERS)}; paired runs: "
           f"{' '.join(PAIRED[size])} (x2 processes). {towers_acc}", ""]
    for regime in REGIMES:
        out += [f"## Regime `{regime}` {' '.join(REGIMES[regime]) or '(no caption noise)'}", "",
                "| method / pretrained tower | " + " | ".join(COLUMNS.values()) + " |",
                "|---" * (len(COLUMNS) + 1) + "|"]
        for mode, tower in METHODS:
            runs = results[regime][(mode, tower)]
            out.append(f"| {label(mode, tower)} | " + " | ".join(mean_std([r[k] for r in runs]) for k in COLUMNS) + " |")
        out += ["", "3T alpha sweep (alpha = 1: f, g as in CLIP; alpha = 0: the third-tower pairing):", "",
                "| 3T tower | metric | " + " | ".join(f"α={a:g}" for a in ALPHAS) + " |",
                "|---|---" + "|---" * len(ALPHAS) + "|"]
        for tower in ("object", "scene"):
            runs = results[regime][("3t", tower)]
            for key in COLUMNS:
                cells = [mean_std([r[key if a == 1 else f"mix@{a:g}/{key}"] for r in runs]) for a in ALPHAS]
                out.append(f"| {tower} | {COLUMNS[key]} | " + " | ".join(cells) + " |")
        out += ["", "The paper's orderings, on the means:", ""] + orderings(results, regime) + [""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method and regime")
    p.add_argument("--quick", action="store_true", help="tiny steps: checks the pipeline, not the claims")
    p.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for the tables and runs")
    a = p.parse_args()
    size = "quick" if a.quick else "full"
    runs = os.path.join(a.out, "reproduce-runs")
    os.makedirs(runs, exist_ok=True)
    start = time.time()
    towers, accuracy = pretrain_towers(runs, size)
    towers_acc = "Held-out accuracy of the third towers on their own labels: " + ", ".join(
        f"{lab} {acc:.1f}%" for lab, acc in accuracy.items()) + " (chance: object 2.9%, scene 16.7%)."
    seeds = list(range(a.seeds))
    results = {regime: {m: [] for m in METHODS} for regime in REGIMES}
    for regime in REGIMES:
        for seed in seeds:
            for mode, tower in METHODS:
                results[regime][(mode, tower)].append(run_one(runs, regime, seed, mode, tower, towers, size))
    minutes = (time.time() - start) / 60
    name = "reproduce-quick" if a.quick else "reproduce"
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(report(results, seeds, minutes, towers_acc, size))
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump({"minutes": minutes, "seeds": seeds, "tower3_accuracy": accuracy, "towers": TOWERS, "paired": PAIRED[size],
                   "regimes": REGIMES, "results": {reg: {f"{m}/{t}": v for (m, t), v in r.items()}
                                                   for reg, r in results.items()}}, f, indent=1)
    print(f"[reproduce] {minutes:.1f} minutes; wrote {a.out}/{name}.md and .json")


if __name__ == "__main__":
    main()
