"""What train.py and eval.py do with bad input: too little data, broken models, out-of-range flags,
bad checkpoints, two runs in one folder, orphaned workers and unwritable folders. Each case must end
in a one-line error (SystemExit) or a counted skip -- never a hang, a traceback from inside torch, or
exit code 0 with a wrong result."""
import argparse
import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import eval as ev
import train
from checkpoints import save_checkpoint
from test_data import good_shard, write_tar
from test_train import ROOT, tiny, torchrun, without


class Hang(BaseException):
    """Raised by `deadline`; a BaseException, so no `except Exception` in a data reader swallows it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Turn a hang into a failure: raise Hang after `seconds`, and every second after (SIGALRM)."""
    def expired(*_):
        raise Hang(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Two briefly pretrained third towers of the same width (D_h = 32) but other weights."""
    tmp = tmp_path_factory.mktemp("towers")
    for seed in (0, 1):
        train.main(tiny(tmp, "--mode", "supervised", "--steps", "2", "--seed", str(seed), "--eval-data", "none",
                        out=f"sup{seed}"))
    return [str(tmp / f"sup{seed}" / "ckpt.pt") for seed in (0, 1)]


# ------------------------------------------------------------------ 1. too little data: stop, never loop
def shard_files(tmp_path, kind: str) -> str:
    if kind == "empty tar":
        return write_tar(tmp_path / "s.tar", [])
    if kind == "tar of 3 samples":
        return good_shard(tmp_path / "s.tar", ["a", "b", "c"])
    return write_tar(tmp_path / "s.tar", [(f"{k}.jpg", b"not an image") for k in "abcdef"] +   # all bad
                     [(f"{k}.txt", b"caption") for k in "abcdef"])


@pytest.mark.parametrize("kind", ["4 shapes samples", "CSV of 3 rows", "empty tar", "tar of 3 samples",
                                  "all-bad shard"])
def test_too_little_data_for_one_batch_stops_with_an_error(tmp_path, kind):
    if kind == "4 shapes samples":
        data = ["--train-samples", "4"]
    elif kind == "CSV of 3 rows":
        from test_data import jpeg
        for i in range(3):
            (tmp_path / f"{i}.jpg").write_bytes(jpeg(i, 40))
        (tmp_path / "p.csv").write_text("filepath,title\n" + "".join(f"{i}.jpg,caption {i}\n" for i in range(3)))
        data = ["--train-data", str(tmp_path / "p.csv")]
    else:
        data = ["--train-data", shard_files(tmp_path, kind)]
    args = tiny(tmp_path, "--mode", "clip", "--steps", "6", "--eval-data", "none", "--tokenizer", "bytes", *data)
    if "tar" in kind or "shard" in kind:
        args = without(args, "--train-samples")       # shards are streamed whole
    with deadline(90), pytest.raises(SystemExit, match=r"no full batch of --batch-size 8"):
        train.main(args)


def test_one_rank_without_a_full_batch_stops_every_rank(tmp_path):
    """2 ranks, 2 shards: one of 12 samples, one of 3. The rank that gets the small shard has no
    batch; the other must not wait for it in a collective: both stop, at once, with the reason."""
    good_shard(tmp_path / "s-0.tar", [f"a{k:02d}" for k in range(12)])
    good_shard(tmp_path / "s-1.tar", ["b0", "b1", "b2"])
    args = without(tiny(tmp_path, "--mode", "clip", "--steps", "50", "--eval-data", "none", "--tokenizer", "bytes",
                        "--train-data", str(tmp_path / "s-{0..1}.tar")), "--train-samples")
    start = time.time()
    r = torchrun("--standalone", "--nproc_per_node=2", "train.py", *args, timeout=150)
    assert r.returncode != 0 and "no full batch of --batch-size 8" in r.stderr, r.stderr[-3000:]
    assert time.time() - start < 120
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


# ------------------------------------------------------------------ 2. a broken model scores 0, loudly
def test_nan_scores_are_misses():
    nan = float("nan")
    scores = torch.tensor([[nan, nan, nan], [1.0, nan, 0.0], [1.0, 0.0, 0.5]])
    # a NaN positive is never found (rank K); a NaN-free row ranks as before
    assert ev.positive_rank(scores, torch.eye(3, dtype=torch.bool)).tolist() == [3, 3, 1]
    # a NaN negative beats the positive: row 1's label 0 is second, behind its NaN
    assert ev.accuracy_topk(scores, torch.tensor([0, 0, 2]), ks=(1, 2)) == {1: 0.0, 2: pytest.approx(200 / 3)}
    r = ev.recall_at_k(torch.full((4, 8), nan), torch.full((4, 8), nan), torch.arange(4), ks=(1, 4))
    assert set(r.values()) == {0.0}


def test_eval_of_a_nan_model_says_so_and_fails(tmp_path, capsys):
    train.main(tiny(tmp_path, "--mode", "clip", "--steps", "1", "--eval-data", "none"))
    path = tmp_path / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    ckpt.pop("checksum")
    save_checkpoint(ckpt, str(tmp_path / "nan.pt"))
    out = tmp_path / "nan.json"
    with pytest.raises(SystemExit, match="embeddings .* are not finite") as stop:
        ev.main(["--checkpoint", str(tmp_path / "nan.pt"), "--out", str(out), "--num-images", "24",
                 "--shots", "1", "--fewshot-seeds", "1", "--device", "cpu", "--no-progress"])
    assert stop.value.code not in (None, 0)
    values = {(r["task"], r["metric"]): r["value"] for r in json.load(open(out))}
    assert values.pop(("nonfinite", "embeddings")) == 100.0                 # every embedding is NaN
    assert values and set(values.values()) == {0.0}                         # so every metric is a miss


# ------------------------------------------------------------------ 3. every numeric flag has a range
def parser_of(build) -> argparse.ArgumentParser:
    """The parser a parse function builds (caught at its parse_args call)."""
    seen = []
    real = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)
    argparse.ArgumentParser.parse_args = spy
    try:
        build()
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen[0]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "-5"], "--steps -5"), (["--steps", "0"], "--steps 0"), (["--epochs", "-1"], "--epochs -1"),
    (["--embed-dim", "0"], "--embed-dim 0"), (["--caption-noise", "2"], "--caption-noise 2"),
    (["--loss-weights", "-1"], "--loss-weights"), (["--loss-weights", "nan"], "--loss-weights"),
    (["--loss-weights", "0"], "--loss-weights"), (["--wd", "nan"], "--wd nan"),
    (["--batch-size", "0"], "--batch-size 0"), (["--save-every", "0"], "--save-every 0"),
    (["--log-every", "0"], "--log-every 0"), (["--init-temperature", "0"], "--init-temperature 0"),
    (["--lr", "inf"], "--lr inf"), (["--image-size", "30"], "--image-size 30"),
])
def test_out_of_range_flags_fail_at_parse_time(tmp_path, capsys, argv, message):
    with deadline(60), pytest.raises(SystemExit):        # what is accepted trains 2 tiny steps
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "2", "--eval-data", "none", *argv))
    err = capsys.readouterr().err
    assert message in err and "expected" in err
    assert not (tmp_path / "run").exists()


def test_every_numeric_flag_is_range_checked(capsys):
    for name, build, parse in [("train.py", lambda: train.parse_args([]), train.parse_args),
                               ("eval.py", lambda: ev.parse_args(["--checkpoint", "x"]), ev.parse_args)]:
        numeric = [a for a in parser_of(build)._actions if a.type in (int, float)]
        assert len(numeric) >= 3, name
        for action in numeric:
            flag, bad = action.option_strings[0], "-1" if action.type is int else "nan"
            extra = ["--checkpoint", "x"] if name == "eval.py" else []
            with pytest.raises(SystemExit):
                parse(extra + [flag] + [bad] * (action.nargs if isinstance(action.nargs, int) else 1))
            assert f"{flag} {bad}" in capsys.readouterr().err, f"{name} accepts {flag} {bad}"


@pytest.mark.parametrize("argv,message", [(["--shots", "0"], "--shots"), (["--shots", "1,x"], "--shots"),
                                          (["--alphas", "nan"], "--alphas"), (["--tasks", "zeroshot,bogus"], "--tasks"),
                                          (["--embeddings", "main,bogus"], "--embeddings")])
def test_eval_list_flags_are_checked(capsys, argv, message):
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", "x"] + argv)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ 4. checkpoints
@pytest.fixture(scope="module")
def run_3t(tmp_path_factory, towers):
    """A finished 2-step 3t run with towers[0]; tests copy what they damage."""
    tmp = tmp_path_factory.mktemp("run3t")
    train.main(tiny(tmp, "--mode", "3t", "--tower3", towers[0], "--steps", "2", "--eval-data", "none"))
    return tmp / "run" / "ckpt.pt"


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", "list"])
def test_resume_of_a_non_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "bad.pt"
    torch.save([1, 2], path) if content == "list" else path.write_bytes(content)
    with pytest.raises(SystemExit, match=r"--resume .*bad\.pt.*(not a readable|not a 3t checkpoint)") as stop:
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "2", "--resume", str(path)))
    assert "\n" not in str(stop.value.code)


@pytest.mark.parametrize("change,message", [
    (["--tower3", "sup0", "--embed-dim", "32"], r"embed_dim: 16 in the checkpoint, 32 now"),
    (["--tower3", "sup1"], r"tower3 weights: '\w+' in the checkpoint, '\w+' now .*--tower3 .*sup0"),   # same width
])
def test_resume_names_what_differs(tmp_path, run_3t, towers, change, message):
    change = [towers[int(x[-1])] if x.startswith("sup") else x for x in change]
    with pytest.raises(SystemExit, match=message):
        train.main(tiny(tmp_path, "--mode", "3t", "--steps", "3", "--eval-data", "none", "--resume", str(run_3t),
                        *change))


def flip_bytes(path, at: float = 0.5) -> None:
    raw = bytearray(open(path, "rb").read())
    i = int(len(raw) * at)
    raw[i:i + 4] = bytes(b ^ 0xFF for b in raw[i:i + 4])
    open(path, "wb").write(raw)


def test_flipped_bytes_are_caught_by_the_checksum(tmp_path, run_3t, towers):
    damaged = tmp_path / "ckpt.pt"
    damaged.write_bytes(run_3t.read_bytes())
    flip_bytes(damaged)
    with pytest.raises(SystemExit, match="checksum"):
        train.main(tiny(tmp_path, "--mode", "3t", "--tower3", towers[0], "--steps", "3", "--resume", str(damaged)))
    with pytest.raises(SystemExit, match="checksum"):
        ev.main(["--checkpoint", str(damaged), "--device", "cpu", "--no-progress"])


def test_a_checkpoint_without_checksum_is_refused(tmp_path, run_3t):
    from checkpoints import read_checkpoint
    ckpt = torch.load(run_3t, weights_only=True)
    ckpt.pop("checksum")
    torch.save(ckpt, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"^\S*bare.pt: a '3t' checkpoint without its checksum[^\n]*$"):
        read_checkpoint(str(tmp_path / "bare.pt"))
    torch.save(ckpt["model"], tmp_path / "state_dict.pt")           # not this project's: loads unverified
    assert torch.equal(read_checkpoint(str(tmp_path / "state_dict.pt"))["text.positional_embedding"],
                       ckpt["model"]["text.positional_embedding"])


def test_no_temporary_files_left_behind(tmp_path, monkeypatch):
    import checkpoints
    stale = tmp_path / f"ckpt.pt.tmp.{socket.gethostname()}"          # a writer killed mid-save
    stale.write_bytes(b"half a checkpoint")
    checkpoints.save_checkpoint({"x": torch.ones(3)}, str(tmp_path / "ckpt.pt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    real = torch.save

    def crash(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint({"x": torch.zeros(3)}, str(tmp_path / "ckpt.pt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert torch.equal(checkpoints.read_checkpoint(str(tmp_path / "ckpt.pt"))["x"], torch.ones(3))


def test_eval_with_a_third_tower_of_another_width(tmp_path, run_3t):
    wide = tiny(tmp_path, "--mode", "supervised", "--steps", "1", "--eval-data", "none", out="wide")
    wide[wide.index("--image-arch") + 1] = "cnn-tiny"                   # D_h = 128, not vit-micro's 32
    train.main(wide)
    with pytest.raises(SystemExit, match=r"--tower3 .*wide.*D_h = \d+.*trained with .*32"):
        ev.main(["--checkpoint", str(run_3t), "--tower3", str(tmp_path / "wide" / "ckpt.pt"), "--device", "cpu"])


# ------------------------------------------------------------------ 8. one run per folder; no orphans
def wait_for_metrics(process: subprocess.Popen, metrics) -> None:
    """Until a background run has logged its first step (at most 2 minutes)."""
    for _ in range(600):
        if metrics.exists() and metrics.read_text():
            return
        assert process.poll() is None, "the background run ended early"
        time.sleep(0.2)
    raise AssertionError("the background run logged nothing in 2 minutes")


def test_second_run_in_the_same_folder_is_refused(tmp_path):
    first = subprocess.Popen([sys.executable, "train.py", *tiny(tmp_path, "--mode", "clip", "--steps", "5000",
                                                               "--eval-data", "none", "--save-every", "100000")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_metrics(first, tmp_path / "run" / "metrics.jsonl")
        with pytest.raises(SystemExit, match=rf"--out .*run.* in use by another run \(pid {first.pid}"):
            train.main(tiny(tmp_path, "--mode", "clip", "--steps", "2", "--eval-data", "none", "--seed", "1"))
    finally:
        first.kill()
        first.wait()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"                # a zombie has stopped
    except FileNotFoundError:
        return False


def test_workers_stop_when_their_torchrun_agent_is_killed(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *tiny(tmp_path, "--mode", "clip", "--steps", "5000", "--eval-data", "none", "--save-every", "100000")]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        wait_for_metrics(agent, tmp_path / "run" / "metrics.jsonl")
        with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
        assert len(workers) == 2
        agent.kill()
        agent.wait()
        for _ in range(100):
            if not any(alive(p) for p in workers):
                break
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "orphaned workers still training 20 s after their agent died"
    finally:
        agent.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ 9. unwritable folders fail up front
@pytest.mark.parametrize("place", ["a file in the way", "a read-only folder"])
def test_unwritable_folders_fail_before_any_work(tmp_path, towers, run_3t, place):
    bad = tmp_path / "bad"
    if place == "a file in the way":
        bad.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        bad.mkdir(mode=0o500)
    base = tiny(tmp_path, "--mode", "3t", "--tower3", towers[0], "--steps", "2", "--eval-data", "none")
    cache = base + ["--cache-dir", str(bad)]                              # the last --cache-dir wins
    with pytest.raises(SystemExit, match=r"--cache-dir .*bad.*cannot write"):
        train.main(cache)
    assert not (tmp_path / "run" / "tokenizer.json").exists()             # stopped before any work
    with pytest.raises(SystemExit, match=r"--out .*bad.*cannot write"):
        train.main(base + ["--out", str(bad / "run")])
    with pytest.raises(SystemExit, match=r"--out .*bad.*cannot write"):
        ev.main(["--checkpoint", str(run_3t), "--out", str(bad / "r.json"), "--device", "cpu"])


# ------------------------------------------------------------------ 10. the project's own errors: one line, exit 1
def bad_train_data(tmp_path, kind: str) -> list[str]:
    """--train-data (and what it needs) for one kind of broken input."""
    from test_data import jpeg
    for i in range(16):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i, 40))
    if kind == "CSV without its caption column":
        (tmp_path / "p.csv").write_text("filepath,caption\n" + "".join(f"{i}.jpg,c {i}\n" for i in range(16)))
    elif kind == "CSV naming missing images":
        (tmp_path / "p.csv").write_text("filepath,title\n" + "".join(f"gone{i}.jpg,c {i}\n" for i in range(16)))
    if "CSV" in kind:
        return ["--train-data", str(tmp_path / "p.csv")]
    if kind == "not a tar file":
        (tmp_path / "s.tar").write_bytes(b"this is not a tar file" * 40)
    elif kind.startswith("truncated tar"):
        full = good_shard(tmp_path / "full.tar", [f"{i:03d}" for i in range(40)])
        (tmp_path / "s.tar").write_bytes(open(full, "rb").read()[:30000])
    pattern = str(tmp_path / ("s-{0..1.tar" if kind == "brace typo" else "s.tar"))
    return ["--train-data", pattern] + (["--workers", "1"] if "worker" in kind else [])


@pytest.mark.parametrize("kind,message", [
    ("CSV without its caption column", r"p\.csv: no column 'title'"),
    ("CSV naming missing images", r"p\.csv: 16 image file\(s\) missing"),
    ("not a tar file", r"not a readable tar file: .*s\.tar"),
    ("brace typo", r"pattern '.*s-\{0\.\.1\.tar': an unmatched brace"),
    ("truncated tar", r"shard .*s\.tar: unreadable or truncated tar"),
    ("truncated tar read by a loader worker", r"shard .*s\.tar: unreadable or truncated tar"),
])
def test_data_reader_errors_end_in_one_line_and_exit_code_1(tmp_path, kind, message):
    args = tiny(tmp_path, "--mode", "clip", "--steps", "3", "--eval-data", "none", "--tokenizer", "bytes",
                *bad_train_data(tmp_path, kind))
    if "CSV" not in kind:
        args = without(args, "--train-samples")             # shards are streamed whole
    with deadline(120), pytest.raises(SystemExit, match=rf"^train\.py: error: .*{message}") as stop:
        train.main(args)
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code      # a message: exit code 1


def test_the_nonfinite_stop_is_one_line(tmp_path, monkeypatch):
    real = train.tower_loss
    monkeypatch.setattr(train, "tower_loss", lambda out, mode, w: (real(out, mode, w)[0] * float("nan"), {}))
    with pytest.raises(SystemExit, match=r"^train\.py: error: 2 non-finite steps in a row by step 2: lower --lr") as stop:
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "5", "--max-nonfinite", "2", "--eval-data", "none"))
    assert "\n" not in stop.value.code


def test_an_image_size_too_small_for_the_shapes_world_fails_at_parse_time(tmp_path, capsys):
    argv = tiny(tmp_path, "--mode", "clip", "--steps", "1", "--eval-data", "none")
    argv[argv.index("--image-size") + 1] = "8"                         # a multiple of vit-micro's patch 8
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    assert "--image-size 8: expected at least 16 with --train-data shapes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def run_clip(tmp_path_factory):
    """A finished 2-step clip run (BPE tokenizer, --save-every 1); tests copy what they change."""
    tmp = tmp_path_factory.mktemp("runclip")
    train.main(tiny(tmp, "--mode", "clip", "--steps", "2", "--eval-data", "none", "--save-every", "1"))
    return tmp / "run" / "ckpt.pt"


def test_a_stored_tokenizer_that_does_not_load_is_one_line_on_resume(tmp_path, run_clip):
    from checkpoints import read_checkpoint, save_checkpoint
    ckpt = read_checkpoint(str(run_clip))
    ckpt["tokenizer"] = {"context_length": 77, "merges": [[1]]}          # a merge is a pair
    save_checkpoint(ckpt, str(tmp_path / "bad-tokenizer.pt"))
    with pytest.raises(SystemExit, match=r"^train\.py: error: --resume .*bad-tokenizer\.pt.*: its stored "
                                         r"tokenizer does not load \(not a stored tokenizer"):
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "3", "--eval-data", "none",
                        "--resume", str(tmp_path / "bad-tokenizer.pt")))


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*_):
        raise ZeroDivisionError("a bug in the step")
    monkeypatch.setattr(train, "train_step", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the step"):
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "2", "--eval-data", "none"))


def test_a_caption_over_the_csv_modules_field_limit_is_read(tmp_path):
    import data
    from test_data import jpeg
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i, 20))
    long = "a long caption " * 20_000                                     # 300,000 characters
    assert len(long) > 131072                                             # the csv module's default field limit
    (tmp_path / "p.csv").write_text(f"filepath,title\n0.jpg,short\n1.jpg,\"{long}\"\n2.jpg,last\n")
    pairs = data.CsvPairs(str(tmp_path / "p.csv"), image_size=16)
    assert [pairs[i]["caption"] for i in range(3)] == ["short", long.strip(), "last"]


# ------------------------------------------------------------------ 11. tar shards: a repeated key is never merged
@pytest.mark.parametrize("middle,kept", [
    ([("7.jpg", 7), ("7.txt", "caption 7"), ("7.txt", "caption of another 7")], []),     # two captions
    ([("7.jpg", 7), ("7.png", 70), ("7.txt", "caption 7")], []),                         # two images
    ([("7.jpg", 7), ("7.txt", "caption 7"), ("8.jpg", 8), ("8.txt", "caption 8"),
      ("7.jpg", 77), ("7.txt", "caption of another 7")], ["caption 7", "caption 8"]),  # the key again, later
])
def test_a_duplicated_tar_key_is_skipped_and_counted_never_merged(tmp_path, middle, kept):
    import data
    from test_data import jpeg
    def sample(key: int) -> list:
        return [(f"{key}.jpg", key), (f"{key}.txt", f"caption {key}")]
    members = [(name, jpeg(v) if isinstance(v, int) else v.encode())
               for name, v in sample(1) + middle + sample(9)]
    items = list(data.TarShards(write_tar(tmp_path / "dup.tar", members), image_size=8, train=False))
    assert [i["caption"] for i in items] == ["caption 1", *kept, "caption 9"]
    assert data.collate(items)["data_errors"] == {"duplicate_key": 1}


# ------------------------------------------------------------------ 12. resume: other settings are refused or logged
@pytest.mark.parametrize("change,message", [
    (["--batch-size", "4"], r"--batch-size 8 there, 4 now"),
    (["--seed", "1"], r"--seed 0 there, 1 now"),
    (["--tokenizer", "bytes"], r"--context-length 77 there, 128 now; .*--tokenizer 'bpe' there, 'bytes' now"),
    (["--context-length", "20"], r"--context-length 77 there, 20 now"),
    (["--vocab-size", "300"], r"--vocab-size 8192 there, 300 now"),
    (["--train-samples", "48"], r"--train-samples 64 there, 48 now"),
    (["--lr", "0.01"], r"--lr 0.002 there, 0.01 now"),
    (["--caption-noise", "0.5"], r"--caption-noise 0.0 there, 0.5 now"),
])
def test_resume_with_other_settings_is_refused_naming_them(tmp_path, run_clip, change, message):
    with pytest.raises(SystemExit, match=rf"^--resume .*ckpt\.pt.* was written with other settings: {message}\. "
                                         r"Resume with the checkpoint's values \(only .*--steps") as stop:
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "3", "--eval-data", "none", "--save-every", "1",
                        "--resume", str(run_clip), *change))
    assert "\n" not in stop.value.code
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_resume_with_a_changed_step_count_continues_and_says_so(tmp_path, run_clip, capsys):
    train.main(tiny(tmp_path, "--mode", "clip", "--steps", "3", "--eval-data", "none", "--save-every", "1",
                    "--log-every", "2", "--resume", str(run_clip)))
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[resume]")]
    assert len(resumed) == 1 and "step 2, epoch 0, batch 2; changed: " in resumed[0]
    assert "--log-every 1 -> 2" in resumed[0] and "--steps 2 -> 3" in resumed[0]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3


# ------------------------------------------------------------------ 13. a full disk: one line, the last checkpoint kept
def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    """torch.save's own file writer reports a full disk as a RuntimeError of its zip writer
    ('unexpected pos'), which never became the one-line error; checkpoints are serialised in memory
    and written by runtime.write_file, whose write here is cut short, then finds the disk full."""
    real, before = os.write, []
    ckpt = tmp_path / "run" / "ckpt.pt"

    def full_after_the_first_checkpoint(fd, payload):
        if not (os.readlink(f"/proc/self/fd/{fd}").startswith(f"{ckpt}.tmp.") and ckpt.exists()):
            return real(fd, payload)
        if not before:
            before.append(ckpt.read_bytes())
            return real(fd, bytes(payload[:10]))          # a short write, then the disk is full
        enospc()
    monkeypatch.setattr(os, "write", full_after_the_first_checkpoint)
    with pytest.raises(SystemExit, match=r"^train\.py: error: --out '.*run': no space left on the "
                                         r"device for ckpt\.pt: it needs about ([\d,]+) bytes, "
                                         r"[\d,]+ bytes free; .*another --out$") as stop:
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "4", "--save-every", "2", "--eval-data", "none"))
    needed = int(re.search(r"needs about ([\d,]+) bytes", str(stop.value.code))[1].replace(",", ""))
    assert abs(needed - len(before[0])) < 100               # the serialised file's own size
    assert ckpt.read_bytes() == before[0]                   # the last good one, untouched
    from checkpoints import read_checkpoint
    assert read_checkpoint(str(ckpt))["step"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "ckpt.pt", "metrics.jsonl", "tokenizer.json"]


def test_checkpoint_pieces_are_freed_as_they_are_written(tmp_path):
    """A checkpoint held in host memory needs its size again only until the write: write_file
    consumes the pieces (model.checkpoint_pieces) one by one, and the file reads back whole."""
    from checkpoints import checkpoint_pieces, read_checkpoint
    from runtime import write_file
    pieces = checkpoint_pieces({"format": "3t", "x": torch.arange(1000.0)})
    size = sum(map(len, pieces))
    write_file(str(tmp_path / "ckpt.pt"), pieces, "--out")
    assert pieces == [] and os.path.getsize(tmp_path / "ckpt.pt") == size
    assert torch.equal(read_checkpoint(str(tmp_path / "ckpt.pt"))["x"], torch.arange(1000.0))


def test_a_full_disk_while_building_the_h_cache_leaves_no_file(tmp_path, towers, monkeypatch):
    monkeypatch.setattr(os, "pwrite", enospc)
    with pytest.raises(SystemExit, match=r"^train\.py: error: --cache-dir '.*cache': no space left on the device for "
                                         r"the third tower's cache h-\w+\.bin: it needs about [\d,]+ bytes"):
        train.main(tiny(tmp_path, "--mode", "3t", "--tower3", towers[0], "--steps", "2", "--eval-data", "none"))
    assert os.listdir(tmp_path / "cache") == []


def test_a_full_disk_while_logging_metrics_leaves_whole_records(tmp_path, monkeypatch):
    real, lines = os.write, []

    def full_on_third_record(fd, payload):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            return real(fd, payload)
        lines.append(payload)
        if len(lines) < 3:
            return real(fd, payload)
        if len(lines) == 3:
            return real(fd, bytes(payload)[:10])                        # a short write, then the disk is full
        enospc()
    monkeypatch.setattr(os, "write", full_on_third_record)
    with pytest.raises(SystemExit, match=r"^train\.py: error: --out '.*run': no space left on the device for "
                                         r"metrics\.jsonl: it needs about \d+ bytes"):
        train.main(tiny(tmp_path, "--mode", "clip", "--steps", "5", "--eval-data", "none"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]                           # whole records, no half one


# ------------------------------------------------------------------ 14. the h cache: damaged rows are recomputed
def test_h_cache_blocks_that_no_longer_match_their_checksum_are_found(tmp_path):
    from runtime import RowTable
    path = str(tmp_path / "t.bin")
    RowTable.create(path, rows=2500, dim=3, fingerprint="x")              # 3 blocks of 1024 rows
    table = RowTable.open(path, rows=2500, dim=3, writable=True, fingerprint="x")
    table.write(0, torch.arange(7500.0).view(2500, 3))
    table.seal(rank=0, world=2)
    table.seal(rank=1, world=2)
    assert table.damaged(rank=0, world=2) == [] and table.damaged(rank=1, world=2) == []
    table.write(1500, torch.tensor([[1.0, 2.0, 3.0]]))                    # a row of block 1 changes
    assert table.damaged(rank=0, world=2) == [] and table.damaged(rank=1, world=2) == [1]
    assert table.damaged() == [1]


def test_a_damaged_h_cache_is_recomputed_not_reused(tmp_path, towers, capsys):
    args = tiny(tmp_path, "--mode", "3t", "--tower3", towers[0], "--steps", "1", "--eval-data", "none")
    train.main(args)
    [cache] = [tmp_path / "cache" / f for f in os.listdir(tmp_path / "cache")]
    built = cache.read_bytes()
    flip_bytes(cache, at=0.7)                                           # inside the rows (after the 4 KiB header)
    assert cache.read_bytes() != built
    capsys.readouterr()
    train.main(tiny(tmp_path, "--mode", "3t", "--tower3", towers[0], "--steps", "1", "--eval-data", "none",
                    out="again"))
    out = capsys.readouterr().out
    assert "do not match the checksum stored when it was built" in out and "reusing" not in out
    assert cache.read_bytes() == built                                  # h's rows again, as first computed
    assert os.listdir(tmp_path / "cache") == [cache.name]


def test_temporary_cache_files_of_dead_builds_are_removed(tmp_path, towers):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / f"h-0123456789abcdef.bin.{socket.gethostname()}-{dead.pid}-0badcafe.tmp"
    stale.write_bytes(b"rows of a build that died")
    other = tmp_path / "cache" / f"h-0123456789abcdef.bin.another-host-{dead.pid}-0badcafe.tmp"
    other.write_bytes(b"rows of a build on another node")
    train.main(tiny(tmp_path, "--mode", "3t", "--tower3", towers[0], "--steps", "1", "--eval-data", "none"))
    assert not stale.exists() and other.exists()


# ------------------------------------------------------------------ 15. two default runs share one --cache-dir
def test_two_runs_pretraining_the_same_auto_tower_wait_and_share_it(tmp_path):
    """Run A pretrains the --tower3 auto tower and is paused (SIGSTOP) half-way; run B, with its own --out and the
    same fresh --cache-dir, must wait for A's tower instead of stopping, then reuse it."""
    def start(out: str, log) -> subprocess.Popen:
        argv = tiny(tmp_path, "--mode", "3t", "--tower3", "auto", "--tower3-steps", "300", "--tower3-batch-size", "8",
                    "--steps", "1", "--eval-data", "none", out=out)
        return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})

    def wait_until(condition, process: subprocess.Popen, what: str) -> None:
        for _ in range(1200):
            if condition():
                return
            assert process.poll() is None, f"ended before {what}"
            time.sleep(0.1)
        raise AssertionError(f"no {what} in 2 minutes")
    a_log, b_log = open(tmp_path / "a.log", "w+"), open(tmp_path / "b.log", "w+")
    a = start("a", a_log)
    b = None
    try:
        wait_until(lambda: any(p.read_text() for p in (tmp_path / "cache").glob("tower3-*/metrics.jsonl")), a,
                   "a pretraining step of run A")
        a.send_signal(signal.SIGSTOP)
        b = start("b", b_log)
        wait_until(lambda: "waiting for it" in (tmp_path / "b.log").read_text(), b, "run B waiting for A's tower")
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in filter(None, (a, b)):
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    assert "reusing the third tower that another run pretrained meanwhile" in (tmp_path / "b.log").read_text()
    assert len(list((tmp_path / "cache").glob("tower3-*.pt"))) == 1
    assert (tmp_path / "a" / "ckpt.pt").exists() and (tmp_path / "b" / "ckpt.pt").exists()
