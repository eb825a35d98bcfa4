"""Real-format data, end to end: PNG/JPEG files written here, a CSV, tar shards, an ImageFolder, and a
torchvision third tower from a state_dict file (randomly initialised: nothing can be downloaded) at
224 px while f runs at 32 px. Train -> resume -> evaluate, and one test per way such data used to give
silently wrong results: h's view in training, its cache and evaluation; whole files; exact resume with
workers; the per-rank h cache; few-shot and class names on real sets; augmentation flags; stale caches;
size limits; corrupt evaluation images."""
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tarfile
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.io import encode_jpeg, encode_png
from torchvision.transforms import v2

import data
import runtime
import shapes
from tokenizer import Tokenizer
import eval as ev
import flags
import train
from model import build_image_tower
from checkpoints import load_trained, load_tower3
from test_data import write_tar
from test_train import ROOT, crash_at_step, torchrun, weights

N = 24                                          # CSV rows, one image each; 12 per tar shard
FILES = ["--image-arch", "vit-micro", "--text-arch", "micro", "--image-size", "32", "--embed-dim", "16",
         "--batch-size", "8", "--workers", "0", "--warmup", "2", "--log-every", "1", "--quiet", "--eval-data", "none"]


def image_bytes(seed: int, width: int, height: int, ext: str = "png") -> bytes:
    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return (encode_png if ext == "png" else encode_jpeg)(pixels).numpy().tobytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "img").mkdir()
    lines, members = ["filepath,title"], ([], [])
    for i in range(N):                          # sizes vary, so random crops differ from the centre crop
        ext = "png" if i % 2 else "jpg"
        payload = image_bytes(i, 36 + 3 * (i % 5), 40 + 4 * (i % 4), ext)
        (root / "img" / f"{i:03d}.{ext}").write_bytes(payload)
        caption = f"a {('red', 'green', 'blue')[i % 3]} picture, number {i}"
        lines.append(f"img/{i:03d}.{ext},{caption}")
        members[i % 2].extend([(f"{i:03d}.{ext}", payload), (f"{i:03d}.txt", caption.encode())])
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    for s in range(2):
        write_tar(root / f"shard-{s}.tar", members[s])
    for split, count in (("train", 4), ("test", 2)):
        for c, name in enumerate(("blue", "green", "red")):
            (root / "folder" / split / name).mkdir(parents=True)
            for k in range(count):
                (root / "folder" / split / name / f"{k}.png").write_bytes(image_bytes(100 * c + 10 * count + k, 40, 44))
    (root / "names.txt").write_text("blue thing\ngreen thing\nred thing\n")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / "r18.pth")
    micro = build_image_tower("vit-micro", 32, 4, bias=True)       # a tower at f's own size, 32 px
    torch.save({"classifier": {"arch": "vit-micro", "image_size": 32, "num_classes": 4}, "model": micro.state_dict()},
               root / "micro32.pt")
    return SimpleNamespace(root=root, csv=str(root / "pairs.csv"), shards=str(root / "shard-{0..1}.tar"),
                           folder=str(root / "folder"), names=str(root / "names.txt"),
                           r18=f"torchvision:resnet18:{root / 'r18.pth'}", micro=str(root / "micro32.pt"))


def run(tmp_path, *extra, out="run"):
    return FILES + ["--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache")] + list(extra)


def cache_rows(folder) -> torch.Tensor:
    """Every row of the one h cache file in `folder`."""
    (name,) = [f for f in os.listdir(folder) if f.startswith("h-") and f.endswith(".bin")]
    header = json.loads(open(os.path.join(folder, name), "rb").read(runtime.RowTable.HEADER))
    return runtime.RowTable.open(os.path.join(folder, name), **header)[range(header["rows"])]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("mode,source", [("lit", "csv"), ("3t", "tar")])
def test_train_resume_evaluate_on_files(files, tmp_path, capsys, mode, source):
    """Train on a CSV or tar shards with a torchvision tower at 224 px (f at 32 px), resume, then
    eval.py on an ImageFolder (zero-shot with a names file, few-shot) and the CSV (retrieval). On the
    CSV, h's cached rows from training equal h's embeddings in evaluation: the same view of each image,
    not f's 32 px view upsampled."""
    spec = files.csv if source == "csv" else files.shards
    common = ["--mode", mode, "--tower3", files.r18, "--train-data", spec, "--save-every", "2"]
    train.main(run(tmp_path, *common, "--steps", "2"))
    train.main(run(tmp_path, *common, "--steps", "3", "--resume", "latest"))
    out = capsys.readouterr().out
    assert "[resume]" in out and "step 2" in out
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    if source == "csv":
        assert f"[data] {files.csv}: {N} of {N} rows used ({N} image files" in out
    results = ev.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--device", "cpu", "--no-progress",
                       "--zeroshot-data", f"imagefolder:{files.folder}/test:{files.names}",
                       "--retrieval-data", files.csv, "--fewshot-data", f"imagefolder:{files.folder}",
                       "--shots", "1,2", "--fewshot-seeds", "2"])
    expected = {"zeroshot/imagefolder/top1", "retrieval/i2t/R@1", "retrieval/t2i/R@10", "fewshot/imagefolder/2shot"}
    assert expected <= set(results) and all(0 <= v <= 100 for v in results.values())
    assert ("tower3/fewshot/imagefolder/1shot" in results) == (mode == "3t")
    if source == "csv":      # h in training (the cache) = h in eval.py: h(tower3_view(image)) at its own 224 px
        model, tower3, _ = load_trained(str(tmp_path / "run" / "ckpt.pt"))
        with torch.inference_mode():
            images = ev.csv_retrieval(files.csv, image_size=32).images
            embedded, _ = ev.Embedder(model.eval(), tower3, "cpu").images(images)
        torch.testing.assert_close(embedded["h"], F.normalize(cache_rows(tmp_path / "cache"), dim=-1),
                                   atol=1e-5, rtol=1e-4)


def test_eval_h_of_an_image_folder_is_h_of_its_own_view(files):
    tower3 = load_tower3(files.micro)           # h at 32 px, f at 16 px, the images 40 x 44
    folder, _ = ev.imagefolder_zeroshot(f"{files.folder}/test", files.names, image_size=16)
    model = ev.ThreeTowers("lit", image_arch="vit-micro", image_size=16, text_arch="micro", embed_dim=16,
                           tower3_dim=tower3.dim).eval()
    with torch.inference_mode():
        embedded, labels = ev.Embedder(model, tower3, "cpu").images(folder)
    raw = torch.stack([data.decode_rgb(open(p, "rb").read()) for p in folder.paths])
    h_view = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])           # spelled out
    expected = F.normalize(tower3(h_view(raw)), dim=-1)
    torch.testing.assert_close(embedded["h"], expected, atol=1e-5, rtol=1e-4)
    assert labels.tolist() == folder.targets


# ----------------------------------------------------------------------------- 1. h's own view, exact cache
def test_h_view_is_deterministic_and_not_f_crop(files):
    pairs = data.CsvPairs(files.csv, image_size=32, tower3_view=data.View(crop=32, resize=32))
    raw = data.decode_rgb(open(pairs.rows[3][0], "rb").read())
    first = pairs[3]
    pairs.set_epoch(1)
    again = pairs[3]
    assert torch.equal(first["image_h"], data.tower3_view(raw, data.View(crop=32, resize=32))) and torch.equal(first["image_h"], again["image_h"])
    assert not torch.equal(first["image"], again["image"])              # f: a new crop each epoch


def test_cached_equals_uncached_on_augmented_csv(files, tmp_path):
    """h at f's own size (32 px) on random-cropped CSV data: the cache must hold h's deterministic view,
    so two epochs on cached embeddings train exactly like running h every step."""
    common = ["--mode", "3t", "--tower3", files.micro, "--train-data", files.csv, "--train-samples", "16",
              "--steps", "4"]
    train.main(run(tmp_path, *common, out="cached"))
    train.main(run(tmp_path, *common, "--no-cache-tower3", out="uncached"))
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "uncached")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("source, cache", [("csv", True), ("csv", False), ("shards", False)])
def test_lit_and_the_h_cache_make_no_view_for_f_and_train_as_if_they_did(files, tmp_path, monkeypatch, source,
                                                                          cache):
    """LiT has no f, and h's cache reads h's view only, so their items carry no f view
    (data.with_tower3_view, f_view=False): the decode stays (bad images are skipped and counted as
    before), f's crop and its bytes go. Final weights: bitwise those of a run whose items do carry it."""
    seen: dict[str, list[set]] = {}
    real_collate, real_views = data.collate, data.with_tower3_view
    for name, keep_f in (("lean", False), ("with-f", True)):
        seen[name] = []
        monkeypatch.setattr(data, "collate", lambda samples, *a, **k: seen[name].append(set(samples[0]))
                            or real_collate(samples, *a, **k))
        if keep_f:                                                       # the code before: f's view made
            monkeypatch.setattr(data, "with_tower3_view", lambda ds, view, f_view=True: real_views(ds, view))
        train.main(run(tmp_path, "--mode", "lit", "--tower3", files.micro, "--steps", "3", "--train-data",
                       files.csv if source == "csv" else files.shards, *([] if cache else ["--no-cache-tower3"]),
                       "--cache-dir", str(tmp_path / name), out=name))
    assert seen["lean"] and not any("image" in keys for keys in seen["lean"])
    assert all("image" in keys for keys in seen["with-f"])
    assert any("image_h" in keys for keys in seen["lean"])             # the cache's build, or h every step
    a, b = weights(tmp_path / "lean"), weights(tmp_path / "with-f")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_a_dataset_without_f_view_still_skips_and_counts_bad_images(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, 40, 40) if i != 1 else b"not an image")
    (tmp_path / "pairs.csv").write_text("filepath,title\n" + "".join(f"img/{i}.png,caption {i}\n" for i in range(4)))
    pairs = data.CsvPairs(str(tmp_path / "pairs.csv"), image_size=32)
    lean = data.with_tower3_view(pairs, data.View(crop=24, resize=24), f_view=False)
    item, full = lean[1], data.with_tower3_view(pairs, data.View(crop=24, resize=24))[1]
    assert set(item) == {"image_h", "caption", "index", "data_errors"} and "image" in full
    assert item["data_errors"] == full["data_errors"] == {"decode_error": 1}    # row 2 stands in, counted
    assert item["caption"] == full["caption"] == "caption 2" and torch.equal(item["image_h"], full["image_h"])
    assert pairs.transform is not None                                    # a copy; the original keeps f's view
    world = shapes.ShapesPairs("train", 4, image_size=32)                 # renders f's view: kept
    assert "image" in data.with_tower3_view(world, None, f_view=False)[0]


# ----------------------------------------------------------------------------- 4. files are used whole
def test_csv_is_used_whole_unless_asked(files, tmp_path, capsys):
    rows = 30_010                              # more than the shapes world's default of --train-samples
    (files.root / "big.csv").write_text("filepath,title\n" + "".join(f"img/{i % N:03d}.{'png' if i % N % 2 else 'jpg'},"
                                                                  f"caption {i}\n" for i in range(rows)))
    env = runtime.Env()
    args = train.parse_args(run(tmp_path, "--mode", "clip", "--train-data", str(files.root / "big.csv")))
    assert len(train.pairs_dataset(args, env, None)) == rows
    assert f"{rows:,} of {rows:,} rows used ({N} image files" in capsys.readouterr().out
    args = train.parse_args(run(tmp_path, "--mode", "clip", "--train-data", files.csv, "--train-samples", "10"))
    assert len(train.pairs_dataset(args, env, None)) == 10
    assert "10 of 24 rows used (10 image files; 0 rows without a caption dropped; the first 10 kept)" in \
        capsys.readouterr().out
    assert train.parse_args(["--mode", "clip"]).train_samples == flags.SHAPES_TRAIN_SAMPLES


# ----------------------------------------------------------------------------- 5. exact resume on augmented files
def test_resume_is_exact_on_csv_with_workers(files, tmp_path, monkeypatch):
    common = ["--mode", "clip", "--train-data", files.csv, "--train-samples", "12", "--batch-size", "4",
              "--workers", "2", "--steps", "7", "--save-every", "4"]   # 3 steps per epoch: resumed at step 4 of 7
    train.main(run(tmp_path, *common, out="straight"))
    crash_at_step(monkeypatch, 6, run(tmp_path, *common, out="interrupted"))
    train.main(run(tmp_path, *common, "--resume", "latest", out="interrupted"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "interrupted")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"


def test_crops_do_not_depend_on_the_global_rng(files):
    pairs = data.CsvPairs(files.csv, image_size=32)
    torch.manual_seed(1)
    a = pairs[5]["image"]
    torch.manual_seed(2)
    assert torch.equal(a, pairs[5]["image"])
    state = torch.get_rng_state()
    pairs[6]
    assert torch.equal(state, torch.get_rng_state())                    # and leave it alone


# ----------------------------------------------------------------------------- 6. the h cache per rank
def test_two_ranks_build_the_cache_of_one(files, tmp_path, capsys):
    """2 gloo ranks each compute half of the rows into one shared file: h of every image's own view, in
    row order; one process then reuses it (the fingerprint does not depend on the number of ranks)."""
    common = ["--mode", "lit", "--tower3", files.micro, "--train-data", files.csv, "--steps", "1"]
    r = torchrun("--standalone", "--nproc_per_node=2", "train.py", *run(tmp_path, *common, out="ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tmp")]
    tower3, pairs = load_tower3(files.micro), data.CsvPairs(files.csv)
    expected = tower3(torch.stack([data.tower3_view(data.decode_rgb(open(p, "rb").read()), tower3.view) for p, _ in pairs.rows]))
    torch.testing.assert_close(cache_rows(tmp_path / "cache"), expected, atol=1e-5, rtol=1e-4)
    train.main(run(tmp_path, *common, out="single"))
    assert "reusing cached embeddings" in capsys.readouterr().out


def test_cache_memory_does_not_grow_with_rows(tmp_path):
    """scripts/bench.py's measurement at 50k x 512 (a 98 MiB table): building the cache and reading
    batches of rows raise the peak resident memory by far less, since rows go to disk batch by batch
    and training reads the rows of its batch."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--cache-child", "50000", "512",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    cache = json.loads(out.stdout.strip().splitlines()[-1])
    assert cache["file_mib"] > cache["table_mib"] == 50_000 * 512 * 4 / 2**20
    assert cache["peak_after_reads_mib"] < cache["table_mib"] / 4, cache


# ----------------------------------------------------------------------------- 7. few-shot on CIFAR
def test_fewshot_on_cifar(tmp_path, monkeypatch):
    import pickle
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    batch = lambda n: {"data": torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g).numpy(),
                       "labels": [i % 10 for i in range(n)]}
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 30)]:
        pickle.dump(batch(n), open(folder / name, "wb"))
    pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, open(folder / "batches.meta", "wb"))
    suite = ev.build_eval_suite(tokenizer=Tokenizer(32), image_size=16, tasks=("fewshot",),
                                fewshot_data=f"cifar10:{tmp_path}")
    pool, test = suite.fewshot["cifar10"]
    assert len(pool) == 100 and len(test) == 30           # 10 per class in the train split, all kept (<= 30)
    model = ev.ThreeTowers("clip", image_arch="vit-micro", image_size=16, text_arch="micro", embed_dim=16)
    suite.shots = (1, 5)
    results = ev.evaluate(model, None, suite, device="cpu")
    assert set(results) == {"fewshot/cifar10/1shot", "fewshot/cifar10/5shot"}


def test_fewshot_folder_layout_errors(files, tmp_path):
    (tmp_path / "only" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="expected class folders under .*only/train and .*only/test"):
        ev.fewshot_sets(f"imagefolder:{tmp_path / 'only'}", 16, 0)
    with pytest.raises(ValueError, match="use shapes, imagefolder:ROOT"):
        ev.fewshot_sets("mnist:/x", 16, 0)


# ----------------------------------------------------------------------------- 8. class-name files
def test_names_file_in_another_order_than_the_folders_stops(files, tmp_path):
    (tmp_path / "shuffled.txt").write_text("red\nblue\ngreen\n")             # the folder names, not sorted
    with pytest.raises(ValueError, match=r"shuffled\.txt: name 1 is 'red', the name of class folder 3 in sorted "
                                         r"order \(3 such names\)"):
        ev.imagefolder_zeroshot(f"{files.folder}/test", str(tmp_path / "shuffled.txt"))
    (tmp_path / "sorted.txt").write_text("blue\ngreen\nred\n")
    assert ev.imagefolder_zeroshot(f"{files.folder}/test", str(tmp_path / "sorted.txt"))[1] == ["blue", "green", "red"]
    assert "sorted (alphabetical) order" in " ".join(ev.build_parser().format_help().split())


# ----------------------------------------------------------------------------- 9. augmentation of small sets
def test_supervised_augmentation_flags(files, tmp_path, capsys):
    root = f"{files.folder}/train"
    supervised = ["--mode", "supervised", "--train-data", root, "--image-size", "16"]
    plain = train.labelled_dataset(train.parse_args(supervised + ["--crop-scale", "1", "--no-flip"]))
    raw = data.decode_rgb(open(plain.paths[2], "rb").read())
    assert torch.equal(plain[2]["image"], data.tower3_view(raw, data.View(crop=16, resize=16)))      # resize + centre crop, nothing random
    crops = train.labelled_dataset(train.parse_args(supervised))
    crops.set_epoch(1)
    assert not torch.equal(crops[2]["image"], plain[2]["image"])
    args = train.parse_args(["--mode", "supervised", "--train-data", root, "--crop-scale", "0.5", "--no-flip"])
    assert (args.crop_scale, args.flip, args.train_samples) == (0.5, False, None)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "0.08: Inception-style, the default" in " ".join(capsys.readouterr().out.split())
    result = train.main(run(tmp_path, "--mode", "supervised", "--train-data", root, "--steps", "2", "--batch-size",
                            "4", "--crop-scale", "1", "--no-flip"))
    assert result == {} and torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("flag,message", [("--crop-scale 0", "a value in (0, 1]"),
                                          ("--crop-scale 1.5", "a value in (0, 1]"),
                                          ("--train-samples 0", "a value in [1, inf)")])
def test_bad_augmentation_flags(flag, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "supervised", "--train-data", "x"] + flag.split())
    assert f"{flag}: expected {message}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 13.5 stale caches
def test_replaced_image_file_invalidates_the_cache(files, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    (tmp_path / "img").mkdir()
    for i in range(8):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, 40, 40))
    csv.write_text("filepath,title\n" + "".join(f"img/{i}.png,caption {i}\n" for i in range(8)))
    common = ["--mode", "lit", "--tower3", files.micro, "--train-data", str(csv), "--steps", "1"]
    train.main(run(tmp_path, *common, out="a"))
    train.main(run(tmp_path, *common, out="b"))
    assert "reusing cached embeddings" in capsys.readouterr().out
    (tmp_path / "img" / "3.png").write_bytes(image_bytes(99, 44, 40))     # same name, same CSV, other pixels
    train.main(run(tmp_path, *common, out="c"))
    assert "reusing cached embeddings" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- 13.6 size limits before decoding
def png_header(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height, with a few bytes of pixel data: 'decodes' to gigabytes."""
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [9_000, 30_000])       # over our limit; over PIL's own limit too
def test_image_bombs_are_never_decoded(tmp_path, monkeypatch, side):
    monkeypatch.setattr(data, "decode_image", lambda *a, **k: pytest.fail("decoded a bomb"))
    with pytest.raises(data.TooLarge, match="--max-image-pixels"):
        data.decode_rgb(png_header(side, side))
    (tmp_path / "img").mkdir()
    for i, payload in enumerate([png_header(side, side), image_bytes(1, 20, 20), image_bytes(2, 8, 8)]):
        (tmp_path / "img" / f"{i}.png").write_bytes(payload)
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title\nimg/0.png,bomb\nimg/1.png,fine\nimg/2.png,small\n")
    monkeypatch.undo()
    item = data.CsvPairs(str(csv), image_size=16)[0]
    assert item["data_errors"] == {"too_large": 1} and item["caption"] == "fine"
    item = data.CsvPairs(str(csv), image_size=16, max_image_pixels=100)[1]      # 20 x 20 > 100 pixels
    assert item["data_errors"] == {"too_large": 1} and item["caption"] == "small"
    item = data.CsvPairs(str(csv), image_size=16, max_file_bytes=1000)[1]       # a 20 x 20 noise PNG is ~1.3 kB
    assert item["data_errors"] == {"too_large": 1} and item["caption"] == "small"
    with pytest.raises(RuntimeError, match="16 consecutive unusable images"):
        data.CsvPairs(str(csv), image_size=16, max_file_bytes=10)[0]


def sparse_tar(path, realsize: int, after: list[tuple[str, bytes]]) -> str:
    """A tar whose first member, 'big.jpg', is GNU-sparse: 512 bytes stored, `realsize` bytes when read."""
    info = tarfile.TarInfo("big.jpg")
    info.size, info.type = 512, tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:410] = b"%011o\0%011o\0" % (0, 512)                        # one stored block at offset 0
    header[483:495] = b"%011o\0" % realsize
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])                      # the header checksum
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in after:
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    open(path, "wb").write(bytes(header) + b"\xff" * 512 + buffer.getvalue())
    return str(path)


def test_tar_member_over_the_limit_is_never_read(tmp_path):
    path = sparse_tar(tmp_path / "s.tar", 3 * 2**30, [("big.txt", b"a bomb"), ("ok.jpg", image_bytes(0, 20, 20, "jpg")),
                                                    ("ok.txt", b"fine")])
    assert os.path.getsize(path) < 20_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    items = list(data.TarShards(path, image_size=16, train=False))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 2**20          # KiB: under 1 GiB more
    assert [i["caption"] for i in items] == ["fine"] and items[0]["data_errors"] == {"too_large": 1}
    args = train.parse_args(["--max-image-pixels", "1000", "--max-file-bytes", "2000"])
    assert (args.max_image_pixels, args.max_file_bytes) == (1000, 2000)


# ----------------------------------------------------------------------------- 13.7 corrupt evaluation images
def test_corrupt_eval_image_is_an_error_not_a_substitute(files, tmp_path, capsys):
    train.main(run(tmp_path, "--mode", "clip", "--train-data", files.csv, "--steps", "1"))
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, 20, 20)[:60] if i == 1 else image_bytes(i, 20, 20))
    (tmp_path / "eval.csv").write_text("filepath,title\n" + "".join(f"img/{i}.png,caption {i}\n" for i in range(3)))
    with pytest.raises(SystemExit, match=r"eval\.py: error: .*eval\.csv row 1: cannot use image .*1\.png"):
        ev.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--device", "cpu", "--no-progress",
                 "--tasks", "retrieval", "--retrieval-data", str(tmp_path / "eval.csv")])


# ----------------------------------------------------------------------------- bad inputs: clear errors, no hangs
def test_bad_inputs_give_one_line_errors(files, tmp_path, capsys):
    few = tmp_path / "few.csv"
    few.write_text("filepath,title\n" + "".join(f"{files.root}/img/00{i}.jpg,caption {i}\n" for i in (0, 2)))
    with pytest.raises(SystemExit, match=r"2 samples, fewer than one global batch \(8 x 1"):
        train.main(run(tmp_path, "--mode", "clip", "--train-data", str(few), "--steps", "2"))
    (files.root / "bom.csv").write_bytes(b"\xef\xbb\xbf" + open(files.csv, "rb").read())
    assert len(data.CsvPairs(str(files.root / "bom.csv"))) == N               # a BOM is not part of 'filepath'
    train.main(run(tmp_path, "--mode", "clip", "--train-data", files.csv, "--steps", "1"))
    with pytest.raises(SystemExit) as stop:          # checked at parse time, before any work
        ev.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--tasks", "zeroshot",
                 "--zeroshot-data", f"imagefolder:{tmp_path}/no_such_folder:{files.names}"])
    assert stop.value.code == 2 and "no_such_folder" in capsys.readouterr().err


def test_a_rank_whose_epoch_is_all_bad_stops_instead_of_looping(tmp_path):
    loader = data.make_loader(shapes.ShapesPairs("train", 3), batch_size=4)
    assert next(runtime.endless(loader, runtime.Position())) is None       # next_batch turns it into an error


def test_a_wrong_tower3_file_is_named(files, tmp_path, capsys):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"r34\.pth'?: not a state_dict of torchvision's resnet18"):
        load_tower3(f"torchvision:resnet18:{tmp_path / 'r34.pth'}")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")                  # the model, not its state_dict
    with pytest.raises(ValueError, match=r"module\.pth: not a readable PyTorch checkpoint \(it holds Python objects.* save model\.state_dict\(\)"):
        load_tower3(f"torchvision:resnet18:{tmp_path / 'module.pth'}")
    with pytest.raises(SystemExit):
        train.parse_args(["--max-image-pixels", "0"])
    assert "--max-image-pixels 0: expected a value in [1, inf)" in capsys.readouterr().err
