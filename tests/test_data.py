"""Tests for data.py: tokenizer, the shapes world, CSV / tar readers, sharding and resuming."""
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import runtime  # noqa: E402
import shapes  # noqa: E402
import train  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(1)
TOK = Tokenizer(64)


# ----------------------------------------------------------------------------- helpers


def jpeg(seed: int, size: int = 16) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_jpeg(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)).numpy().tobytes()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def good_shard(path, keys: list[str]) -> str:
    members = []
    for i, key in enumerate(keys):
        members += [(f"{key}.jpg", jpeg(i)), (f"{key}.txt", f"caption {key}".encode())]
    return write_tar(path, members)


def captions_of(batch_or_items) -> list[str]:
    if isinstance(batch_or_items, dict):
        return list(batch_or_items["caption"])
    return [b["caption"] for b in batch_or_items]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_script():
    texts = ["a small red circle", "café crème brûlée", "日本語のテキスト", "emoji 🐍🚀 ok", ""]
    ids = TOK.encode(texts)
    assert ids.shape == (5, 64) and ids.dtype == torch.long
    assert (ids[:, 0] == TOK.BOS).all()
    assert [TOK.decode(row) for row in ids] == texts
    assert TOK.encode("hi").shape == (1, 64)
    assert TOK.encode(b"hi").tolist() == TOK.encode("hi").tolist()
    row = TOK.encode("hi")[0].tolist()
    assert row[:4] == [TOK.BOS, ord("h"), ord("i"), TOK.EOS] and set(row[4:]) == {TOK.PAD}


def test_truncation_keeps_eos_and_whole_characters():
    tok = Tokenizer(10)
    row = tok.encode("x" * 100)[0]
    assert row[-1] == tok.EOS and row[0] == tok.BOS and (row[1:-1] == ord("x")).all()
    row = tok.encode("é" * 20)[0]  # 2 bytes each; 8 slots -> 4 characters, never half of one
    assert tok.decode(row) == "éééé" and (row == tok.EOS).sum() == 1
    assert tok.decode(tok.encode("abc🐍")[0]) == "abc🐍"  # 7 bytes fit in 8 slots
    assert tok.decode(Tokenizer(8).encode("abc🐍")[0]) == "abc"  # 6 slots: the emoji goes whole


def test_invalid_utf8_is_replaced_not_a_crash():
    ids = TOK.encode(b"ab\xff\xfecd")
    assert TOK.decode(ids[0]) == "ab\ufffd\ufffdcd"
    assert TOK.decode(TOK.encode("bad \udcff surrogate")[0]) == "bad ? surrogate"
    with pytest.raises(ValueError, match="outside the vocabulary of size 259"):
        TOK.decode([TOK.BOS, 300])


# ----------------------------------------------------------------------------- shapes world


def test_shapes_deterministic_and_batch_independent():
    a, b = shapes.ShapesWorld(seed=3), shapes.ShapesWorld(seed=3)
    batch = a.render_batch([7, 2, 11], "train")
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.uint8
    assert torch.equal(batch[1], b.sample(2)["image"])  # same image alone or in any batch
    assert a.sample(7)["caption"] == b.sample(7)["caption"]
    assert not torch.equal(batch[0], shapes.ShapesWorld(seed=4).sample(7)["image"])


def test_shapes_deterministic_across_processes():
    def digest(world):
        imgs = world.render_batch(range(6), "pretrain")
        caps = "|".join(c for i in range(6) for c in world.captions(i, "pretrain", 3))
        return hashlib.sha256(imgs.numpy().tobytes() + caps.encode()).hexdigest()

    code = ("import sys, hashlib; sys.path.insert(0, sys.argv[1]); import shapes; w = shapes.ShapesWorld(5, 32); "
            "imgs = w.render_batch(range(6), 'pretrain'); "
            "caps = '|'.join(c for i in range(6) for c in w.captions(i, 'pretrain', 3)); "
            "print(hashlib.sha256(imgs.numpy().tobytes() + caps.encode()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == digest(shapes.ShapesWorld(5, 32))


def first_value(caption: str, attr: str) -> str:
    """The attribute value whose caption word appears first (the main object is always described first)."""
    hits = []
    for value, words in shapes.CAPTION_WORDS[attr].items():
        for w in words:
            m = re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", caption)
            if m:
                hits.append((m.start(), -len(w), value))
    assert hits, (attr, caption)
    return min(hits)[2]


def test_captions_say_what_the_labels_say():
    world = shapes.ShapesWorld(seed=1)
    classes = shapes.zeroshot_tasks()
    two_objects = 0
    for i in range(150):
        s = world.sample(i, "train")
        att, lab = s["attributes"], s["labels"]
        two_objects += att["second"] is not None
        assert classes["object"][0][lab["object"]] == f"{att['colour']} {att['shape']}"
        assert classes["scene"][0][lab["scene"]] == f"{att['scene']} background"
        assert classes["position_size"][0][lab["position_size"]].startswith(f"{att['size']} object ")
        caps = world.captions(i, "train", len(shapes.CAPTION_TEMPLATES))
        assert len(set(caps)) == len(caps) and caps[0] == s["caption"]
        for cap in caps:
            for attr in ("shape", "colour", "size", "position", "scene"):
                assert first_value(cap, attr) == att[attr], (attr, cap, att)
    assert 20 < two_objects < 80  # some captions must read past a second object


def test_images_show_the_main_object_colour():
    world = shapes.ShapesWorld(seed=2)
    draws = [world._draw(i, "test") for i in range(60)]
    imgs = world.render_batch(range(60), "test").float()
    for d, img in zip(draws, imgs):
        cx = int((0.2 + 0.3 * (d["position"] % 3) + 0.08 * d["jitter"][0]) * 64)
        cy = int((0.2 + 0.3 * (d["position"] // 3) + 0.08 * d["jitter"][1]) * 64)
        pixel = img[:, cy - 1 : cy + 2, cx - 1 : cx + 2].mean((1, 2)).numpy()
        nearest = np.argmin(((shapes._RGB - pixel) ** 2).sum(1))
        assert nearest == d["colour"], (d, pixel)


def test_captions_fit_context_128():
    longest = {a: max((w for ws in shapes.CAPTION_WORDS[a].values() for w in ws), key=len) for a in shapes.CAPTION_WORDS}
    second = shapes._SECOND_TEMPLATE.format(conn=max(shapes._CONNECTIVES, key=len), colour=longest["colour"],
                                          shape=longest["shape"], pos=longest["position"])
    for t in shapes.CAPTION_TEMPLATES:  # lengths add up, so the longest words give the exact bound
        worst = t.format(size=longest["size"], colour=longest["colour"], shape=longest["shape"],
                         pos=longest["position"], scene=longest["scene"], second=second)
        assert len(worst.encode()) <= 126, worst
    assert len(shapes.CAPTION_TEMPLATES) >= 8


def test_splits_are_disjoint():
    offsets = sorted(shapes.ShapesWorld.SPLITS.values())
    assert all(b - a >= shapes.ShapesWorld.SPLIT_SIZE for a, b in zip(offsets, offsets[1:]))
    world = shapes.ShapesWorld(seed=0)
    images = {s: world.render_batch(range(20), s) for s in ("train", "pretrain", "test")}
    for a in images:
        for b in images:
            if a < b:
                assert not any(torch.equal(x, y) for x in images[a] for y in images[b])
    with pytest.raises(ValueError, match="unknown split"):
        world.sample(0, "validation")


def test_caption_noise_swaps_about_p_of_captions():
    clean = shapes.ShapesPairs("train", 2000, caption_noise=0.0)
    noisy = shapes.ShapesPairs("train", 2000, caption_noise=0.25)
    swapped = sum(clean.caption(i) != noisy.caption(i) for i in range(2000)) / 2000
    assert 0.21 < swapped < 0.29
    again = shapes.ShapesPairs("train", 2000, caption_noise=0.25)
    assert all(noisy.caption(i) == again.caption(i) for i in range(0, 2000, 7))
    items = again.__getitems__(range(40))  # the batched path pairs the same (noisy) captions
    assert [it["caption"] for it in items] == [again.caption(i) for i in range(40)]


def test_shapes_datasets_items_and_zero_shot_tasks():
    pairs = shapes.ShapesPairs("train", 10, tower3_view=data.View(crop=96, resize=96))
    item = pairs[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    assert item["image_h"].shape == (3, 96, 96) and item["image_h"].dtype == torch.uint8
    assert isinstance(item["caption"], str) and item["index"] == 3
    assert 0 < item["image"].float().mean().item() < 255
    with pytest.raises(IndexError):
        pairs[10]
    tasks = shapes.zeroshot_tasks()
    assert {k: len(v[0]) for k, v in tasks.items()} == {"object": 35, "position_size": 27, "scene": 6}
    # prompts per class: full captions that name the class and vary everything else
    names, prompts = tasks["object"]
    assert all(len(p) == 24 for p in prompts) and prompts == shapes.zeroshot_tasks()["object"][1]
    for k, name in enumerate(names):
        colour, shape = name.split()
        words = shapes.CAPTION_WORDS["shape"][shape]
        assert all(colour in p and any(w in p for w in words) for p in prompts[k])
        assert len({p for p in prompts[k]}) > 12                      # sizes, positions, scenes vary
    scene_names, scene_prompts = tasks["scene"]
    for k, name in enumerate(scene_names):
        words = shapes.CAPTION_WORDS["scene"][name.split()[0]]
        assert all(any(f"{w} back" in p for w in words) for p in scene_prompts[k])
    for label in ("object", "scene", "position_size"):
        ds = shapes.ShapesLabelled("pretrain", 20, label=label)
        assert ds.num_classes == len(tasks[label][0])
        assert all(0 <= ds[i]["label"] < ds.num_classes for i in range(20))
    ret = shapes.shapes_retrieval(num_images=6, captions_per_image=4)
    assert len(ret.captions) == 24 and ret.caption_image.tolist() == [i // 4 for i in range(24)]
    assert len(set(ret.captions[:4])) == 4 and ret.images[0]["image"].shape == (3, 64, 64)


# ----------------------------------------------------------------------------- CSV


def make_csv(tmp_path, sep=",", name="pairs.csv", header=("filepath", "title")) -> str:
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = [sep.join(header)]
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
        lines.append(sep.join([f"img/{i}.jpg", f"photo number {i}" if i != 2 else " "]))
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def test_csv_pairs_read_relative_paths_and_drop_empty_captions(tmp_path):
    ds = data.CsvPairs(make_csv(tmp_path), image_size=24, tower3_view=data.View(crop=32, resize=32))
    assert len(ds) == 3 and ds.skipped == {"empty_caption": 1}
    item = ds[2]
    assert item["image"].shape == (3, 24, 24) and item["image_h"].shape == (3, 32, 32)
    assert item["caption"] == "photo number 3" and item["data_errors"] == {}
    tsv = data.CsvPairs(make_csv(tmp_path, sep="\t", name="pairs.tsv"), image_size=24)
    assert len(tsv) == 3


def test_csv_errors_name_the_problem(tmp_path):
    path = make_csv(tmp_path, header=("path", "caption"))
    with pytest.raises(ValueError, match=r"no column 'filepath'.*\['path', 'caption'\]"):
        data.CsvPairs(path)
    path = make_csv(tmp_path)
    os.remove(tmp_path / "img" / "1.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) missing.*1\.jpg"):
        data.CsvPairs(path)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        data.CsvPairs(str(tmp_path / "nowhere.csv"))


def test_csv_corrupt_image_is_replaced_and_counted_in_training_an_error_in_evaluation(tmp_path):
    path = make_csv(tmp_path)
    (tmp_path / "img" / "0.jpg").write_bytes(jpeg(0)[:40])
    item = data.CsvPairs(path, image_size=16, train=True)[0]
    assert item["data_errors"] == {"decode_error": 1} and item["caption"] == "photo number 1"
    with pytest.raises(data.DataError, match=r"pairs\.csv row 0: cannot use image .*0\.jpg.*never substituted"):
        data.CsvPairs(path, image_size=16, train=False)[0]


# ----------------------------------------------------------------------------- tar shards


def test_expand_pattern(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    found = data.expand_pattern(str(tmp_path / "{00003..00010}.tar"))
    assert [os.path.basename(p) for p in found] == [f"{i:05d}.tar" for i in range(3, 11)]
    assert len(data.expand_pattern(str(tmp_path / "0000*.tar"))) == 10
    assert len(data.expand_pattern(str(tmp_path / "{00000,00011}.tar"))) == 2
    with pytest.raises(FileNotFoundError, match=r"pattern '.*nothing-\*\.tar' matched no files"):
        data.expand_pattern(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing.*00012\.tar"):
        data.expand_pattern(str(tmp_path / "{00010..00012}.tar"))


def test_tar_bad_samples_skipped_and_counted(tmp_path, caplog):
    members = [("a/000.jpg", jpeg(0)), ("a/000.txt", b"first good"), ("a/000.json", b"{}"),
               ("001.png", encode_png(torch.zeros(1, 8, 8, dtype=torch.uint8)).numpy().tobytes()),
               ("001.txt", "non-UTF-8 caf\xe9 ".encode("latin-1")),
               ("002.jpg", jpeg(2)[:50]), ("002.txt", b"corrupt jpeg"),
               ("003.jpg", jpeg(3)),  # no caption
               ("004.jpg", jpeg(4)), ("004.txt", b"  \n"),
               ("005.txt", b"caption without image"),
               ("006.jpeg", jpeg(6)), ("006.txt", b"last good")]
    shard = write_tar(tmp_path / "s.tar", members)
    ds = data.TarShards(shard, image_size=16, train=False)
    with caplog.at_level("WARNING", logger="data"):
        items = list(ds)
    assert "'002'" in caplog.text and "decode_error" in caplog.text and "s.tar" in caplog.text
    assert captions_of(items) == ["first good", "non-UTF-8 caf\ufffd", "last good"]
    assert all(i["image"].shape == (3, 16, 16) for i in items)
    batch = data.collate(items)
    assert batch["data_errors"] == {"decode_error": 1, "missing_caption": 1, "empty_caption": 1,
                                    "missing_image": 1}
    assert items[0]["data_errors"] == {}  # skips reach the item that follows them, each counted once


def test_tar_mostly_bad_shard_raises_naming_it(tmp_path):
    img, members = jpeg(0), []
    for i in range(120):
        members.append((f"{i:04d}.jpg", img))
        if i % 6:  # 20 of 120 without caption: 17% > 10%
            members.append((f"{i:04d}.txt", b"ok"))
    shard = write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(RuntimeError, match=r"bad\.tar: 1\d of 1\d\d samples bad"):
        list(data.TarShards(shard, image_size=8, train=False))
    assert len(list(data.TarShards(shard, image_size=8, train=False, max_bad_fraction=0.2))) == 100


def test_tar_unreadable_or_truncated_named(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match=r"not a readable tar file: .*junk\.tar"):
        data.TarShards(str(tmp_path / "junk.tar"))
    full = good_shard(tmp_path / "full.tar", [f"{i:03d}" for i in range(8)])
    (tmp_path / "cut.tar").write_bytes(open(full, "rb").read()[:3000])
    with pytest.raises(RuntimeError, match=r"cut\.tar: unreadable or truncated"):
        list(data.TarShards(str(tmp_path / "cut.tar"), image_size=8, train=False))


def make_shards(tmp_path, num_shards=5, per_shard=6) -> str:
    for s in range(num_shards):
        good_shard(tmp_path / f"{s:03d}.tar", [f"s{s}k{k}" for k in range(per_shard)])
    return str(tmp_path / f"{{000..{num_shards - 1:03d}}}.tar")


def test_tar_ranks_times_workers_see_every_sample_once(tmp_path):
    pattern = make_shards(tmp_path)
    expected = {f"caption s{s}k{k}" for s in range(5) for k in range(6)}
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            ds = data.TarShards(pattern, rank=rank, world_size=2, image_size=8, shuffle_buffer=4)
            loader = data.make_loader(ds, 2, workers=2, rank=rank, world_size=2, drop_last=False)
            data.set_epoch(loader, epoch)
            seen += [c for batch in loader for c in captions_of(batch)]
        assert sorted(seen) == sorted(expected)
        orders.append(seen)
    assert orders[0] != orders[1]  # shard order and buffer reshuffled per epoch
    ds = data.TarShards(pattern, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"5 shards .* 2 ranks x 3 workers = 6 readers"):
        data.make_loader(ds, 2, workers=3, rank=0, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_tar_start_batch_resumes_exactly(tmp_path, workers):
    pattern = make_shards(tmp_path, num_shards=4, per_shard=6)
    ds = data.TarShards(pattern, image_size=8, shuffle_buffer=5, seed=3)
    full_loader = data.make_loader(ds, 2, workers=workers)
    data.set_epoch(full_loader, 2)
    full = [captions_of(b) for b in full_loader]
    resumed = data.make_loader(ds, 2, workers=workers, start_batch=3)  # odd: another worker goes first
    data.set_epoch(resumed, 2)
    assert [captions_of(b) for b in resumed] == full[3:]
    assert [captions_of(b) for b in resumed] == full  # the skip applies to one epoch only


# ----------------------------------------------------------------------------- sampler, loader, collate


def test_epoch_sampler_disjoint_covering_and_seeded():
    parts = [data.EpochSampler(20, rank=r, world_size=2, seed=1).indices() for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == list(range(20))
    s = data.EpochSampler(20, rank=0, world_size=2, seed=1)
    s.set_epoch(1)
    assert s.indices() != parts[0]
    odd = [data.EpochSampler(21, rank=r, world_size=2).indices() for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 10  # equal per rank: DDP never waits on a rank that ran out


def test_map_loader_start_batch_resumes_exactly():
    ds = shapes.ShapesPairs("train", 40, image_size=16)
    full_loader = data.make_loader(ds, 4, rank=1, world_size=2, seed=5)
    data.set_epoch(full_loader, 3)
    full = [b["index"].tolist() for b in full_loader]
    assert len(full) == 5
    resumed = data.make_loader(ds, 4, rank=1, world_size=2, seed=5, start_batch=2)
    data.set_epoch(resumed, 3)
    assert len(resumed) == 3
    assert [b["index"].tolist() for b in resumed] == full[2:]
    assert [b["index"].tolist() for b in resumed] == full
    other = data.make_loader(ds, 4, rank=0, world_size=2, seed=5)
    data.set_epoch(other, 3)
    both = sum(full, []) + [i for b in other for i in b["index"].tolist()]
    assert sorted(both) == list(range(40))


def test_loader_workers_batch_shapes_with_getitems():
    ds = shapes.ShapesPairs("train", 16, image_size=16)
    tok = Tokenizer(128)
    batches = list(data.make_loader(ds, 8, tokenizer=tok, workers=2, shuffle=False))
    assert [b["index"].tolist() for b in batches] == [list(range(8)), list(range(8, 16))]
    assert batches[0]["image"].shape == (8, 3, 16, 16) and batches[0]["image"].dtype == torch.uint8
    longest = int((tok.encode([ds.caption(i) for i in range(8)]) != tok.PAD).sum(1).max())
    assert batches[0]["text"].shape == (8, longest) and batches[0]["text"].is_contiguous()   # trimmed
    assert [tok.decode(t) for t in batches[1]["text"]] == [ds.caption(i) for i in range(8, 16)]
    assert torch.equal(batches[1]["image"][0], ds[8]["image"])


def test_collate_sums_data_errors():
    items = [{"x": torch.ones(2), "i": 1, "data_errors": {"decode_error": 1}},
             {"x": torch.zeros(2), "i": 2, "data_errors": {"decode_error": 2, "empty_caption": 1}}]
    batch = data.collate(items)
    assert batch["x"].shape == (2, 2) and batch["i"].tolist() == [1, 2]
    assert batch["data_errors"] == {"decode_error": 3, "empty_caption": 1}
    with pytest.raises(TypeError, match="set_epoch"):
        data.set_epoch(torch.utils.data.DataLoader(list(range(4))), 1)


# ----------------------------------------------------------------------------- eval sources and factories


def test_image_folder_trains_a_classifier(tmp_path):
    for c, cls in enumerate(["n01", "n02"]):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "val" / cls / f"{i}.jpg").write_bytes(jpeg(10 * c + i, 20))
    images = train.labelled_dataset(flags("--mode", "supervised", "--train-data", str(tmp_path / "val"),
                                             "--image-size", "12", "--train-samples", "3"))
    assert len(images) == 3 and images.num_classes == 2 and images[0]["image"].shape == (3, 12, 12)


def flags(*argv: str):
    return train.parse_args([*argv, "--out", "/nonexistent"])


def test_train_data_flag_dispatch(tmp_path, capsys):
    pairs = lambda *argv: train.pairs_dataset(flags(*argv), runtime.Env(), None)
    assert isinstance(pairs("--train-samples", "8"), shapes.ShapesPairs)
    assert isinstance(pairs("--train-data", make_csv(tmp_path), "--tower3", "x.pt"), data.CsvPairs)
    pattern = make_shards(tmp_path, num_shards=2, per_shard=2)
    assert isinstance(pairs("--train-data", pattern, "--tower3", "x.pt"), data.TarShards)
    with pytest.raises(SystemExit):
        flags("--train-data", pattern, "--caption-noise", "0.1", "--tower3", "x.pt")
    assert "--caption-noise 0.1: only for the shapes world and CSV files" in capsys.readouterr().err
    assert train.labelled_dataset(flags("--mode", "supervised", "--label", "scene",
                                           "--train-samples", "5")).num_classes == 6


# ----------------------------------------------------------------------------- the GPU path's batches
def test_items_are_uint8_and_the_device_normalisation_is_the_old_worker_pipeline(tmp_path):
    """Workers ship uint8 views (4x fewer bytes than float32); the towers normalise on the device.
    Shapes: the same formula moved, bitwise. Files: the worker's old float pipeline (seeded crop, then
    ToDtype + Normalize) to float rounding."""
    from torchvision.transforms import v2
    from model import normalize
    pairs = shapes.ShapesPairs("train", 8, image_size=16)
    raw = torch.stack([pairs[i]["image"] for i in range(8)])
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert raw.dtype == torch.uint8 and torch.equal(normalize(raw), (raw.float() / 255.0 - mean) / std)
    ds = data.CsvPairs(make_csv(tmp_path), image_size=24, seed=3)
    ds.set_epoch(2)
    old = v2.Compose([v2.RandomResizedCrop(24, scale=(0.9, 1.0), antialias=True), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    for i in range(len(ds)):
        image = data.decode_rgb(open(ds.rows[i][0], "rb").read())
        item = ds[i]["image"]
        assert item.dtype == torch.uint8 and item.nbytes == 3 * 24 * 24
        torch.testing.assert_close(normalize(item), data.seeded(old, image, 3, 2, i), atol=1e-6, rtol=0)


def test_persistent_workers_follow_the_epoch(tmp_path):
    """Loader workers persist across epochs; each epoch's random crops are those the main process's
    dataset gives for that epoch (SharedEpoch), with 2 workers as with none."""
    ds = data.CsvPairs(make_csv(tmp_path), image_size=16, seed=1)
    loader = data.make_loader(ds, 1, workers=2, shuffle=False, drop_last=False)
    assert loader.persistent_workers
    epochs = []
    for epoch in range(2):
        data.set_epoch(loader, epoch)
        epochs.append(torch.cat([b["image"] for b in loader]))
    for epoch in range(2):
        ds.set_epoch(epoch)
        assert torch.equal(epochs[epoch], torch.stack([ds[i]["image"] for i in range(len(ds))]))
    assert not torch.equal(epochs[0], epochs[1])


def test_workers_read_h_rows_and_the_step_only_copies(tmp_path, monkeypatch):
    """The training thread does no file I/O per step: the loader workers read h's cached rows (and trim
    the token ids), and train.tower_inputs hands the batch's own tensors to the device (on the CPU: the
    very same objects, no host-side slice or copy that a pinned transfer would have to wait for)."""
    pairs = shapes.ShapesPairs("train", 16, image_size=16)
    path = str(tmp_path / "h.bin")
    runtime.RowTable.create(path, 16, 6)
    rows = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    runtime.RowTable.open(path, 16, 6, writable=True).write(0, rows)
    table = runtime.RowTable.open(path, 16, 6)
    main, reads, real = os.getpid(), [], os.pread
    monkeypatch.setattr(os, "pread", lambda *a: (reads.append(1) if os.getpid() == main else None) or real(*a))
    tok = Tokenizer(64)
    batches = list(data.make_loader(pairs, 8, tokenizer=tok, workers=2, rows=table))
    assert reads == [] and len(batches) == 2
    args = train.parse_args(["--mode", "3t"])
    env, parts = runtime.Env(), train.Parts(None, None, None, None, None, {})
    for batch in batches:
        assert torch.equal(batch["h"], rows[batch["index"]])
        image, text, h = train.tower_inputs(args, env, parts, batch)
        assert image is batch["image"] and text is batch["text"] and h is batch["h"]
        assert text.is_contiguous() and (text[:, -1] != tok.PAD).any()     # cut after the longest caption
