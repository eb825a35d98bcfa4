"""scripts/vs_open_clip.py without open_clip: the one scorer both trainers are judged by, and the flags
our side of the comparison trains with (the start temperature is open_clip's, and --extra can override it)."""
import argparse
import json

import torch

import eval as evaluation
import train
from conftest import load_script


def naive_recall1(s: torch.Tensor) -> float:
    """Row i is a hit when every other column scores strictly below column i."""
    hits = [all(s[i, j] < s[i, i] for j in range(s.shape[1]) if j != i) for i in range(s.shape[0])]
    return 100 * sum(hits) / len(hits)


def test_scorer_matches_a_naive_loop_and_counts_ties_as_misses():
    vs = load_script("vs_open_clip")
    torch.manual_seed(0)
    image, text = torch.randn(40, 8), torch.randn(40, 8)
    text[:10] = image[:10] + 0.01 * torch.randn(10, 8)     # ten clear hits
    text[10] = text[11]                                      # two identical captions: a tie in image 11's row
    image[11] = text[11]
    s = image @ text.T
    got = vs.recall1(image, text)
    assert abs(got["i2t_R@1"] - naive_recall1(s)) < 1e-4 and abs(got["t2i_R@1"] - naive_recall1(s.T)) < 1e-4
    assert s[11, 10] == s[11, 11] and vs.recall1(image[[11]], text[[11, 10]])["i2t_R@1"] == 0   # a tie is a miss
    ev = evaluation.recall_at_k(image, text, torch.arange(40), ks=(1,))
    assert abs(ev["i2t/R@1"] - got["i2t_R@1"]) < 1e-6 and abs(ev["t2i/R@1"] - got["t2i_R@1"]) < 1e-6


def test_our_side_starts_at_open_clips_temperature_unless_extra_says_otherwise(tmp_path):
    vs = load_script("vs_open_clip")
    a = argparse.Namespace(data=str(tmp_path), train_rows=None, extra="")
    args = train.parse_args(vs.our_argv(a, str(tmp_path / "run"), 5))
    assert abs(args.init_temperature - 1 / 0.07) < 0.01
    assert (args.batch_size, args.lr, args.warmup, args.image_arch, args.text_arch) == (256, 2e-3, 30, "vit-tiny", "tiny")
    a.extra = "--init-temperature 10 --seed 3"
    args = train.parse_args(vs.our_argv(a, str(tmp_path / "run"), 5))
    assert (args.init_temperature, args.seed) == (10.0, 3)


def test_report_groups_runs_that_differ_only_in_seed(tmp_path, capsys):
    vs = load_script("vs_open_clip")
    runs = {"a": ("ours, 490 steps (--log-every 10 --seed 1)", ["--seed", "0", "--seed", "1"], 60.0),
            "b": ("ours, 490 steps (--log-every 10)", ["--steps", "490"], 70.0),
            "c": ("open_clip 3.3.0, 1 epoch of 60000 pairs", ["--seed", "2"], 12.0)}
    for name, (label, argv, r1) in runs.items():
        (tmp_path / name).mkdir()
        vs.write_json(str(tmp_path / name / "run.json"), {"run": label, "argv": argv, "wall_s": 400.0,
                                                         "samples_per_s": 300.0})
        vs.write_json(str(tmp_path / name / "score.json"), {"i2t_R@1": r1, "t2i_R@1": r1 + 1})
    vs.main(["report", *(str(tmp_path / n) for n in runs)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert "| ours, 490 steps (--log-every 10) | 1 |" in lines[2] and "| 0 |" in lines[3] and "| 2 |" in lines[4]
    assert lines[5] == "| **ours, 490 steps (--log-every 10)**, mean ± std | 2 seeds | 400 | 300 | 65.0 ± 7.1 | 66.0 ± 7.1 |"
    assert lines[6].startswith("| **open_clip 3.3.0, 1 epoch of 60000 pairs**, mean ± std | 1 seeds |") and "12.0 ± nan" in lines[6]


def test_steps_report_pairs_each_mode_with_its_other_linear_kernel(tmp_path, capsys):
    """`steps --both-linears`: per mode, oneDNN's samples/s over F.linear's is the median of the
    per-round ratios, whichever of the two runtime.wrap took; every side against open_clip (last)."""
    vs = load_script("vs_open_clip")
    a = argparse.Namespace(batch=4, threads=2, equal_tokens=True, pairs=3, warmup=0, out=str(tmp_path / "s.json"))
    order = ("clip", "clip oneDNN", "3t", "3t F.linear", "open_clip")
    rounds = [[2.0, 1.0, 2.0, 4.0, 4.0], [2.0, 0.5, 2.0, 2.0, 4.0], [2.0, 2.0, 2.0, 6.0, 4.0]]
    batches = [(torch.zeros(4, 7), torch.zeros(4, 77))]
    vs.report_steps(a, order, rounds, dict.fromkeys(order, 1), batches)
    out = capsys.readouterr().out
    assert "clip: oneDNN linears' samples/s over F.linear's 2.00x (1.00-4.00, 3 rounds" in out   # 2/1, 2/.5, 2/2
    assert "3t: oneDNN linears' samples/s over F.linear's 2.00x (1.00-3.00, 3 rounds" in out     # 4/2, 2/2, 6/2
    got = json.load(open(a.out))
    assert got["ratio_ours_over_open_clip"] == {"clip": 2.0, "clip oneDNN": 4.0, "3t": 2.0, "3t F.linear": 1.0}
    assert got["onednn_over_f_linear"]["3t"]["median"] == 2.0
