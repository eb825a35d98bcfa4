"""Evaluation sharded over ranks: 2 gloo processes (torch.multiprocessing on CPU), each embedding its share
of an ImageFolder (zero-shot with a class-name file, few-shot), a CSV of captions (retrieval) and the
prompts, score what one process scores; an unusable image in one rank's share stops both ranks; train.py
evaluates files every --eval-every steps and at the end under torchrun, as eval.py scores its checkpoint;
and the new flags' bad values stop at parse time, naming the flag."""
import json
import os
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

import data
import eval as ev
import train
from model import ThreeTowers, build_image_tower
from checkpoints import load_tower3
from test_files import image_bytes
from test_train import TINY, torchrun
from tokenizer import Tokenizer

WORLD = 2
ALPHAS = (1.0, 0.5, 0.0)
VAL_PER_CLASS = (3, 2, 2)          # 7 images: the ranks' shares are 3 and 4, not equal


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    """An ImageFolder (train/, val/; PNG and JPEG of several sizes), its class-name file, a CSV with several
    captions for some images, the same CSV with a truncated PNG in its last row, and a third tower's file."""
    root = tmp_path_factory.mktemp("evalsets")
    for split, counts in (("train", (3, 3, 3)), ("val", VAL_PER_CLASS)):
        for c, name in enumerate(("blue", "green", "red")):
            (root / "folder" / split / name).mkdir(parents=True)
            for k in range(counts[c]):
                ext = "png" if k % 2 else "jpg"
                payload = image_bytes(100 * c + 10 * len(split) + k, 36 + 4 * k, 40, ext)
                (root / "folder" / split / name / f"{k}.{ext}").write_bytes(payload)
    (root / "names.txt").write_text("blue thing\ngreen thing\nred thing\n")
    (root / "img").mkdir()
    rows = ["filepath,title"]
    for i in range(5):
        (root / "img" / f"{i}.png").write_bytes(image_bytes(500 + i, 30 + 2 * i, 34))
        rows += [f"img/{i}.png,{colour} picture number {i}" for colour in ("a red", "a blue")[:1 + i % 2]]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    (root / "img" / "broken.png").write_bytes(image_bytes(9, 30, 30)[:60])
    (root / "broken.csv").write_text("\n".join(rows + ["img/broken.png,a broken picture"]) + "\n")
    torch.manual_seed(0)
    tower = build_image_tower("vit-micro", 16, 4, bias=True)                   # h at 16 px, f at 32 px
    torch.save({"classifier": {"arch": "vit-micro", "image_size": 16, "num_classes": 4}, "model": tower.state_dict()},
               root / "tower3.pt")
    return {"folder": str(root / "folder"), "names": str(root / "names.txt"), "csv": str(root / "pairs.csv"),
            "broken": str(root / "broken.csv"), "tower3": str(root / "tower3.pt")}


def model_and_suite(sets: dict[str, str]):
    tower3 = load_tower3(sets["tower3"])
    torch.manual_seed(0)
    model = ThreeTowers("3t", image_arch="vit-micro", image_size=32, text_arch="micro", context_length=128,
                        embed_dim=16, tower3_dim=tower3.dim)
    suite = ev.build_eval_suite(tokenizer=Tokenizer(128), image_size=32, tasks=ev.TASKS,
                                   zeroshot_data=f"imagefolder:{sets['folder']}/val:{sets['names']}",
                                   retrieval_data=sets["csv"], fewshot_data=f"imagefolder:{sets['folder']}")
    suite.shots = (1, 2)
    return model, tower3, suite


def evaluate_and_embed(sets: dict[str, str], rank: int = 0, world: int = 1, batch_size: int = 256) -> dict:
    """What the tests compare: evaluate's results, the raw embeddings of the retrieval images and captions,
    those of a one-image set (a rank with an empty share), and the error of a set with a broken image."""
    model, tower3, suite = model_and_suite(sets)
    out = {"results": ev.evaluate(model, tower3, suite, device="cpu", alphas=ALPHAS, batch_size=batch_size,
                                  rank=rank, world=world)}
    model.eval()
    embedder = ev.Embedder(model, tower3, "cpu", batch_size, rank=rank, world=world)
    with torch.inference_mode():
        out["images"], _ = embedder.images(suite.retrieval.images)
        out["texts"] = embedder.texts(suite.retrieval_tokens)
        out["one"], out["one_label"] = embedder.images(Subset(suite.zeroshot["imagefolder"][0], [4]))
        broken = ev.csv_retrieval(sets["broken"], image_size=32)
        try:
            embedder.images(broken.images)
            out["error"] = None
        except data.DataError as e:
            out["error"] = str(e)
    return out


def worker(rank: int, tmp: str, sets: dict[str, str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))       # a rank left waiting fails the test, never hangs it
    out = evaluate_and_embed(sets, rank, WORLD, batch_size=2)
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()                 # no rank closes its connections while another still reads from them
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(sets, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("evaldist"))
    mp.spawn(worker, args=(tmp, sets), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(sets):
    return evaluate_and_embed(sets)


def test_two_ranks_score_what_one_process_scores(sharded, single):
    """Every rank returns the one-process results: zero-shot on the ImageFolder with its names, few-shot
    on its train/val splits, retrieval on the CSV, for main, tower3 and the mix -- each rank having embedded
    only its share, in batches of 2 where one process used one batch."""
    expected = single["results"]
    assert {"zeroshot/imagefolder/top1", "tower3/retrieval/i2t/R@1", "mix@0.5/retrieval/t2i/R@5",
            "fewshot/imagefolder/2shot", "tower3/fewshot/imagefolder/1shot"} <= set(expected)
    for out in sharded:
        assert set(out["results"]) == set(expected)
        assert out["results"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_gathered_embeddings_are_the_whole_set_in_order(sharded, single):
    for out in sharded:
        for part in ("images", "texts", "one"):
            assert set(out[part]) == set(single[part])
            for key, value in single[part].items():
                assert out[part][key].shape == value.shape, (part, key)
                torch.testing.assert_close(out[part][key], value, atol=1e-5, rtol=1e-4)
        assert torch.equal(out["one_label"], single["one_label"])      # rank 0's share of one image is empty


def test_an_unusable_image_in_one_share_stops_every_rank(sharded, single):
    """The broken PNG is the last row, in rank 1's share: rank 1 raises its own DataError, rank 0 the same
    one relayed (instead of waiting in the gather until the collective times out)."""
    assert "broken.png" in single["error"]
    own, relayed = sharded[1]["error"], sharded[0]["error"]
    assert own == single["error"]
    assert relayed.startswith("rank 1 could not embed its share: DataError: ") and own in relayed


# ----------------------------------------------------------------------------- train.py
def test_train_evaluates_files_every_n_steps_on_two_ranks_as_eval_py_scores_its_checkpoint(sets, tmp_path):
    """torchrun, 2 ranks: --zeroshot-data (ImageFolder + names) and --retrieval-data (CSV) are scored at
    steps 1 and 2 (--eval-every 1, and the end), logged once by rank 0; the last record equals eval.py's
    one-process scores of the final checkpoint."""
    zeroshot = f"imagefolder:{sets['folder']}/val:{sets['names']}"
    args = TINY + ["--mode", "clip", "--steps", "2", "--eval-every", "1", "--zeroshot-data", zeroshot,
                   "--retrieval-data", sets["csv"], "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")]
    r = torchrun("--standalone", "--nproc_per_node=2", "train.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[eval] step 1:") == 1 and r.stdout.count("[eval] step 2:") == 1
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [rec for rec in records if "eval" in rec]
    assert [rec["step"] for rec in evals] == [1, 2]
    assert {"zeroshot/imagefolder/top1", "retrieval/i2t/R@1", "retrieval/t2i/R@10"} <= set(evals[-1]["eval"])
    assert not any("object" in k for k in evals[-1]["eval"])                   # the files replaced the shapes tasks
    expected = ev.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--device", "cpu", "--no-progress",
                        "--tasks", "zeroshot,retrieval", "--zeroshot-data", zeroshot, "--retrieval-data", sets["csv"],
                        "--out", str(tmp_path / "eval.json")])
    assert evals[-1]["eval"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("flag,value,message", [
    ("--zeroshot-data", "imagefolder:{folder}/nope:{names}", "image folder not found: .*nope"),
    ("--zeroshot-data", "imagefolder:{folder}/val:{folder}/none.txt", "class-name file not found: .*none.txt"),
    ("--zeroshot-data", "imagefolder:{folder}/val:{few}", "has 2 names but .* has 3 class folders"),
    ("--zeroshot-data", "imagefolder:{folder}/val:{swapped}", "name 1 is 'green', the name of class folder 2"),
    ("--zeroshot-data", "{folder}/val", "use shapes, imagefolder:ROOT:CLASSNAMES_FILE"),
    ("--retrieval-data", "{folder}/missing.csv", "caption file not found: .*missing.csv"),
    ("--retrieval-data", "imagefolder:{folder}/val:{names}", "use shapes, a .csv/.tsv"),
])
def test_bad_eval_flags_stop_at_parse_time_naming_the_flag(sets, tmp_path, capsys, flag, value, message):
    (tmp_path / "few.txt").write_text("blue\ngreen\n")
    (tmp_path / "swapped.txt").write_text("green\nblue\nred\n")
    value = value.format(few=tmp_path / "few.txt", swapped=tmp_path / "swapped.txt", **sets)
    with pytest.raises(SystemExit):
        train.main(TINY + [flag, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: {flag} {value}: " in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_eval_flags_do_not_apply_to_supervised_mode(sets, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "supervised", "--retrieval-data", sets["csv"]])
    assert "--retrieval-data" in capsys.readouterr().err


def test_eval_sources_default_to_the_shapes_tasks_only_on_the_shapes_world(sets):
    assert train.eval_sources(train.parse_args([])) == ("shapes", "shapes")
    assert train.eval_sources(train.parse_args(["--eval-data", "none", "--retrieval-data", sets["csv"]])) == \
        ("none", sets["csv"])
    args = train.parse_args(["--mode", "clip", "--train-data", sets["csv"], "--zeroshot-data", "shapes"])
    assert train.eval_sources(args) == ("shapes", "none")


def test_an_unreadable_eval_folder_stops_at_the_start_naming_the_flag(sets, tmp_path):
    """A class folder without images passes the parse-time check (the folders match the names) but not the
    suite's build, before the first step: one line naming the flag, and no checkpoint."""
    for name in ("blue", "green", "red"):
        (tmp_path / "folder" / name).mkdir(parents=True)
    (tmp_path / "folder" / "blue" / "0.png").write_bytes(image_bytes(0, 20, 20))
    spec = f"imagefolder:{tmp_path / 'folder'}:{sets['names']}"
    with pytest.raises(SystemExit, match=rf"^--zeroshot-data {re.escape(spec)}: .*no valid file"):
        train.main(TINY + ["--mode", "clip", "--steps", "1", "--zeroshot-data", spec, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "ckpt.pt").exists()
