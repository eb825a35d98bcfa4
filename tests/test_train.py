"""train.py end to end on a tiny preset: every mode, exact resume, the frozen tower, the cache,
non-finite steps, and real multi-process runs (torchrun on 127.0.0.1 with gloo)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluation
import runtime
from checkpoints import CHECKPOINT_FORMAT
import shapes
from tokenizer import Tokenizer
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-arch", "vit-micro", "--text-arch", "micro", "--image-size", "32", "--embed-dim", "16",
        "--batch-size", "8", "--train-samples", "64", "--workers", "0", "--eval-images", "24",
        "--warmup", "2", "--log-every", "1", "--quiet"]


def tiny(tmp_path, *extra, out="run"):
    return TINY + ["--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache")] + list(extra)


def without(args: list[str], flag: str) -> list[str]:
    """args minus `flag` and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def weights(path) -> dict:
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def tower3_file(tmp_path_factory):
    """A genuinely (if briefly) pretrained third tower, from our own supervised mode."""
    tmp = tmp_path_factory.mktemp("tower3")
    result = train.main(tiny(tmp, "--mode", "supervised", "--steps", "15", "--lr", "3e-3", out="sup"))
    assert 0.0 <= result["test/top1"] <= 1.0
    return str(tmp / "sup" / "ckpt.pt")


@pytest.mark.parametrize("mode", ["clip", "lit", "3t"])
def test_main_end_to_end(tmp_path, tower3_file, mode):
    result = train.main(tiny(tmp_path, "--mode", mode, "--steps", "4", "--tower3", tower3_file))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert (ckpt["format"], ckpt["mode"], ckpt["step"]) == (CHECKPOINT_FORMAT, mode, 4)
    assert not any(k.startswith("tower3") or "backbone" in k for k in ckpt["model"])  # h is not stored
    assert ckpt["tower3"] == (None if mode == "clip" else tower3_file)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    terms = {"clip": {"fg"}, "lit": {"hg"}, "3t": {"fg", "fh", "gh"}}[mode]
    assert {k.split("/")[1] for k in train_lines[0] if k.startswith("loss/")} == terms
    assert "zeroshot/object/top1" in result and "retrieval/i2t/R@1" in result
    assert any(k.startswith("tower3/") for k in result) == (mode == "3t")
    # curves.png at the end: losses, temperatures, in-batch accuracy, a panel per evaluation metric
    metrics = {k.split("/", 1)[1] if k.startswith(("tower3/", "mix@")) else k for k in result}
    panels = 3 + len(metrics)
    with Image.open(tmp_path / "run" / "curves.png") as image:
        assert image.size == (4 * evaluation.PANEL_W, -(-panels // 4) * evaluation.PANEL_H)
        assert np.asarray(image.convert("L")).std() > 20                   # not a blank canvas


def test_a_curves_drawing_failure_only_warns(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("no room for a picture")
    monkeypatch.setattr(evaluation, "draw_panels", broken)
    train.main(tiny(tmp_path, "--mode", "clip", "--steps", "1", "--eval-data", "none"))
    run = tmp_path / "run"
    assert (run / "ckpt.pt").exists() and not (run / "curves.png").exists()
    warning = [line for line in capsys.readouterr().err.splitlines() if "curves.png" in line]
    assert warning == [f"warning: could not draw {tmp_path / 'run' / 'curves.png'}: OSError: "
                       f"no room for a picture"]


def test_auto_tower3_is_pretrained_once_then_reused(tmp_path, capsys):
    args = tiny(tmp_path, "--mode", "lit", "--steps", "2", "--tower3-steps", "3", "--eval-data", "none")
    train.main(args)
    first = capsys.readouterr().out
    assert "no pretrained third tower yet: pretraining one" in first
    tower = [f for f in os.listdir(tmp_path / "cache") if f.startswith("tower3-") and f.endswith(".pt")]
    assert len(tower) == 1
    saved = torch.load(tmp_path / "cache" / tower[0], weights_only=True)
    assert saved["mode"] == "supervised" and saved["classifier"]["num_classes"] > 1
    train.main(tiny(tmp_path, "--mode", "lit", "--steps", "2", "--tower3-steps", "3", "--eval-data", "none",
                    out="run2"))
    assert "pretraining one" not in capsys.readouterr().out


def test_supervised_checkpoint_loads_as_tower3(tower3_file):
    from checkpoints import load_tower3
    tower3 = load_tower3(tower3_file)
    assert tower3.dim == 32 and tower3.view.crop == 32        # vit-micro width, --image-size
    assert tower3(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def crash_at_step(monkeypatch, step: int, argv: list[str]) -> None:
    """Run train.main(argv) and interrupt it at its `step`-th train_step call (steps before it were saved
    by --save-every); train_step is whole again afterwards."""
    real, calls = train.train_step, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(train, "train_step", crashing)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)


def test_resume_is_exact(tmp_path, tower3_file, monkeypatch):
    common = ["--mode", "3t", "--tower3", tower3_file, "--steps", "12", "--save-every", "5",
              "--train-samples", "40", "--eval-data", "none"]   # 5 steps per epoch: crosses epochs
    train.main(tiny(tmp_path, *common, out="straight"))
    crash_at_step(monkeypatch, 8, tiny(tmp_path, *common, out="interrupted"))
    assert torch.load(tmp_path / "interrupted" / "ckpt.pt", weights_only=True)["step"] == 5
    train.main(tiny(tmp_path, *common, "--resume", "latest", out="interrupted"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "interrupted")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"


def test_frozen_tower_unchanged_and_outside_optimizer(tmp_path, tower3_file, monkeypatch):
    seen = {}
    real_load, real_opt = train.load_tower3, train.build_optimizer

    def spy_load(spec, view=None):
        seen["tower3"] = real_load(spec, view)
        seen["before"] = {k: v.clone() for k, v in seen["tower3"].state_dict().items()}
        return seen["tower3"]

    def spy_opt(model, args, **kwargs):
        seen["opt"] = real_opt(model, args, **kwargs)
        return seen["opt"]
    monkeypatch.setattr(train, "load_tower3", spy_load)
    monkeypatch.setattr(train, "build_optimizer", spy_opt)
    train.main(tiny(tmp_path, "--mode", "3t", "--tower3", tower3_file, "--steps", "3", "--no-cache-tower3",
                    "--eval-data", "none", "--lr", "1e-2"))
    after = seen["tower3"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    frozen = {id(p) for p in seen["tower3"].parameters()}
    assert not any(id(p) in frozen for g in seen["opt"].param_groups for p in g["params"])
    no_decay = {id(p) for p in seen["opt"].param_groups[1]["params"]}
    assert len(no_decay) > 0 and all(g["weight_decay"] == 0 for g in seen["opt"].param_groups[1:])


def test_cache_reused_invalidated_and_equivalent(tmp_path, tower3_file, capsys):
    base = ["--mode", "3t", "--tower3", tower3_file, "--steps", "3", "--eval-data", "none"]
    train.main(tiny(tmp_path, *base, out="cached"))
    assert "reusing cached" not in capsys.readouterr().out
    caches = [f for f in os.listdir(tmp_path / "cache") if f.startswith("h-")]
    assert len(caches) == 1
    train.main(tiny(tmp_path, *base, out="cached2"))
    assert "reusing cached" in capsys.readouterr().out
    # a file under the right name whose contents do not match is recomputed, never used
    path = tmp_path / "cache" / caches[0]
    stale = read_cache(path)
    runtime.RowTable.create(str(path), *stale.shape, fingerprint="0" * 16)          # zeros, another fingerprint
    train.main(tiny(tmp_path, *base, out="cached3"))
    assert "is stale: recomputing" in capsys.readouterr().out
    torch.testing.assert_close(read_cache(path), stale)
    # other data -> another fingerprint, another file
    train.main(tiny(tmp_path, *base, "--train-samples", "48", out="cached4"))
    assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("h-")]) == 2
    # training on cached embeddings equals training with h run every step
    train.main(tiny(tmp_path, *base, "--no-cache-tower3", out="uncached"))
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "uncached")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_items_carry_h_view_only_when_h_runs_every_step(tmp_path, tower3_file, monkeypatch):
    """Whether h is cached is decided before the dataset is built: a cached run's training items hold no
    'image_h' (the cache's build reads h's view from its own copy), an uncached run's do."""
    seen = []
    real = train.data.make_loader

    def spy(dataset, *args, **kwargs):
        seen.append(dataset.tower3_view)
        return real(dataset, *args, **kwargs)
    monkeypatch.setattr(train.data, "make_loader", spy)
    base = ["--mode", "3t", "--tower3", tower3_file, "--steps", "1", "--eval-data", "none"]
    train.main(tiny(tmp_path, *base, out="cached"))
    train.main(tiny(tmp_path, *base, "--no-cache-tower3", out="uncached"))
    assert seen == [None, train.load_tower3(tower3_file).view]


def read_cache(path) -> torch.Tensor:
    """Every row of an h cache file (runtime.tower3_cache), as a (rows, D_h) tensor."""
    header = json.loads(open(path, "rb").read(runtime.RowTable.HEADER))
    return runtime.RowTable.open(str(path), **header)[range(header["rows"])]


def test_cache_fingerprints_a_batchnorm_tower(tmp_path):
    """ResNets (and most torchvision towers) carry 0-d BatchNorm counters in their state_dict."""
    import torchvision
    net = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    train.main(tiny(tmp_path, "--mode", "lit", "--tower3", f"torchvision:resnet18:{path}", "--steps", "1",
                    "--eval-data", "none", "--train-samples", "16"))
    assert len([f for f in os.listdir(tmp_path / "cache") if f.startswith("h-")]) == 1


def test_nonfinite_steps_make_no_update_then_stop(tmp_path, monkeypatch):
    """A non-finite step makes no update but counts as a step (as with AMP's loss scaling); a streak of
    --max-nonfinite of them stops the run at the next sync step, before its checkpoint."""
    real, calls, states = train.tower_loss, [0], []
    real_apply = train.adamw_update

    def nan_on_second_call(out, mode, w):
        calls[0] += 1
        loss, metrics = real(out, mode, w)
        return (loss * float("nan") if calls[0] == 2 else loss), metrics

    def recording_apply(model, *args, **kwargs):
        finite = real_apply(model, *args, **kwargs)
        states.append((bool(finite), [p.detach().clone() for p in model.parameters()]))
        return finite
    monkeypatch.setattr(train, "tower_loss", nan_on_second_call)
    monkeypatch.setattr(train, "adamw_update", recording_apply)
    train.main(tiny(tmp_path, "--mode", "clip", "--steps", "3", "--eval-data", "none"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and calls[0] == 3 and [ok for ok, _ in states] == [True, False, True]
    assert all(torch.equal(a, b) for a, b in zip(states[0][1], states[1][1]))     # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(states[1][1], states[2][1]))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.setattr(train, "tower_loss", lambda out, mode, w: (real(out, mode, w)[0] * float("inf"), {}))
    with pytest.raises(SystemExit, match="4 non-finite steps in a row by step 4"):
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "6", "--max-nonfinite", "3", "--log-every", "4",
                        "--eval-data", "none", out="run2"))
    assert not (tmp_path / "run2" / "ckpt.pt").exists()


@pytest.mark.parametrize("argv,message", [
    (["--mode", "3t", "--loss-weights", "1,2"], "expected 3 comma-separated numbers for the terms fg,fh,gh"),
    (["--mode", "lit", "--train-data", "pairs.csv"], "--tower3 auto only works with --train-data shapes"),
    (["--mode", "bogus"], "invalid choice: 'bogus'"),
    (["--mode", "clip", "--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        train.main(argv + ["--out", str(tmp_path / "run")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------- many processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_train_like_one_with_the_global_batch(tmp_path, tower3_file):
    """DDP on 2 ranks x batch 8 follows the same trajectory as 1 process x batch 16: the loss sees
    the global batch and DDP's averaging gives the global gradient (losses.py convention)."""
    common = ["--mode", "3t", "--tower3", tower3_file, "--steps", "4", "--eval-data", "none"]
    r = torchrun("--standalone", "--nproc_per_node=2", "train.py", *tiny(tmp_path, *common, out="ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    one = tiny(tmp_path, *common, out="single")
    one[one.index("--batch-size") + 1] = "16"
    train.main(one)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_two_nodes_on_localhost(tmp_path, tower3_file):
    port = free_port()
    args = tiny(tmp_path, "--mode", "3t", "--tower3", tower3_file, "--steps", "3", "--eval-data", "none")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", "train.py", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in "".join(outputs)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


def test_elastic_restart_resumes(tmp_path, tower3_file):
    args = tiny(tmp_path, "--mode", "clip", "--steps", "6", "--save-every", "2", "--eval-data", "none")
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it, restarted gloo workers may read their peers'
    # addresses from the previous attempt (pytorch/pytorch#135712); the README gives the same advice.
    r = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1", "tests/elastic_entry.py", *args,
                 env={"ELASTIC_TEST_FAIL_AT": "4", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "simulated node failure" in r.stderr
    assert "[resume]" in r.stdout and "step 2" in r.stdout
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 6


# --------------------------------------------------------------------------------- real formats
def test_csv_training_logs_skipped_images(tmp_path):
    from test_data import jpeg
    lines = ["filepath,title"]
    for i in range(24):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg" if i == 5 else jpeg(i, 40))
        lines.append(f"{i}.jpg,a caption number {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    args = tiny(tmp_path, "--mode", "clip", "--train-data", str(tmp_path / "pairs.csv"), "--train-samples", "24",
                "--epochs", "1", "--batch-size", "4")
    train.main(args)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(records) == 6                                      # 24 pairs / batch 4, one epoch
    assert records[-1]["data_errors"] == {"decode_error": 1}      # the bad file, counted once


def test_tar_shard_training_streams_without_cache(tmp_path, tower3_file, capsys):
    from test_data import good_shard
    for s in range(2):
        good_shard(tmp_path / f"shard-{s}.tar", [f"{s}{k:03d}" for k in range(12)])
    args = without(tiny(tmp_path, "--mode", "3t", "--tower3", tower3_file, "--steps", "4", "--eval-data", "none",
                        "--train-data", str(tmp_path / "shard-{0..1}.tar")), "--train-samples")
    train.main(args)
    assert "streaming data: no cache" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4
    with pytest.raises(SystemExit, match="--steps is required"):
        train.main(without(tiny(tmp_path, "--mode", "clip", "--train-data", str(tmp_path / "shard-{0..1}.tar"),
                                "--eval-data", "none", out="run2"), "--train-samples"))


def test_tokenizer_is_learned_once_stored_and_reused_by_resume_and_eval(tmp_path, monkeypatch):
    """BPE merges are learned from the training captions at the start of a run, written to
    tokenizer.json and every checkpoint; a resumed run and eval.py take them from there (they
    never learn again), so every stage tokenises alike."""
    import eval as evaluation
    args = tiny(tmp_path, "--mode", "clip", "--steps", "4", "--save-every", "2", "--eval-data", "none")
    train.main(args)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    stored = ckpt["tokenizer"]
    assert len(stored["merges"]) > 50 and ckpt["model_config"]["vocab_size"] == 259 + len(stored["merges"])
    assert json.load(open(tmp_path / "run" / "tokenizer.json")) == stored
    caption = shapes.ShapesWorld(0, 32).captions(0, "train")[0]
    assert len(Tokenizer.from_dict(stored).tokens(caption)) < len(caption) / 3

    def refuse(*a, **k):
        raise AssertionError("a resumed run or eval.py learned a tokenizer again")
    monkeypatch.setattr(Tokenizer, "learn", refuse)
    seen = {}
    real_suite = evaluation.build_eval_suite
    monkeypatch.setattr(evaluation, "build_eval_suite", lambda *a, **k: seen.setdefault("suite", real_suite(*a, **k)))
    train.main(args[:args.index("--steps") + 1] + ["6"] + args[args.index("--steps") + 2:] + ["--resume", "latest"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["tokenizer"] == stored
    evaluation.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--tasks", "retrieval", "--num-images", "8",
                     "--no-progress"])
    assert seen["suite"].tokenizer.to_dict() == stored
    byte = tiny(tmp_path, "--mode", "clip", "--steps", "1", "--eval-data", "none", "--tokenizer", "bytes", out="bytes")
    monkeypatch.undo()
    train.main(byte)
    assert torch.load(tmp_path / "bytes" / "ckpt.pt", weights_only=True)["model_config"]["vocab_size"] == 259
