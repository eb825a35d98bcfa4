"""eval.py: the metrics on hand-built scores with known answers, prompt ensembling, the alpha mix,
the ridge probe, and `main([...])` end to end on tiny clip / lit / 3t checkpoints."""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import shapes
import eval as ev
import train
from shapes import ShapesPairs
from tokenizer import Tokenizer
from losses import tower_loss
from model import ThreeTowers, build_image_tower
from checkpoints import CHECKPOINT_FORMAT, load_trained, load_tower3, save_checkpoint


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------------------------
# Recall@K and accuracy on hand-built scores. recall_at_k only takes dot products, so
# image_emb = S and text_emb = I give the score matrix S exactly.
# ----------------------------------------------------------------------------------------------
def recall_of_scores(scores, caption_image, ks=(1, 2, 5), chunk_size=1024):
    return ev.recall_at_k(scores, torch.eye(scores.shape[1]), caption_image, ks, chunk_size)


def test_recall_perfect_and_reversed():
    n = 6
    perfect = recall_of_scores(torch.eye(n), torch.arange(n))
    assert all(v == 100.0 for v in perfect.values())
    # Row i ranks caption i last (scores fall towards i): every hit needs K = n.
    reversed_ = -((torch.arange(n)[:, None] - torch.arange(n)[None, :] - 1) % n).float()
    r = ev.recall_at_k(reversed_, torch.eye(n), torch.arange(n), ks=(1, 5, 6))
    assert (r["i2t/R@1"], r["i2t/R@5"], r["i2t/R@6"]) == (0.0, 0.0, 100.0)


def test_recall_several_captions_per_image():
    """Image 0's best caption is first (hit@1) though its other caption ranks last; image 1's
    best caption has two negatives above it (hit only from K = 3)."""
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2],
                           [0.8, 0.7, 0.6, 0.1]])
    r = recall_of_scores(scores, torch.tensor([0, 0, 1, 1]), ks=(1, 2, 3))
    assert (r["i2t/R@1"], r["i2t/R@2"], r["i2t/R@3"]) == (50.0, 50.0, 100.0)
    # Text->image reads the transpose: captions 1, 2 rank their image first; 0, 3 second.
    assert (r["t2i/R@1"], r["t2i/R@2"]) == (50.0, 100.0)


def test_ties_count_as_misses():
    r = recall_of_scores(torch.zeros(3, 3), torch.arange(3), ks=(1, 2, 3))
    assert (r["i2t/R@1"], r["i2t/R@2"], r["i2t/R@3"]) == (0.0, 0.0, 100.0)
    acc = ev.accuracy_topk(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), ks=(1, 2, 3))
    assert acc == {1: 0.0, 2: 0.0, 3: 100.0}
    # A tie below the positive does not matter.
    assert ev.accuracy_topk(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([0]), ks=(1,)) == {1: 100.0}


def test_accuracy_topk_known_answers():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0],       # label 0: rank 0
                           [5.0, 4, 3, 2, 1, 0],       # label 5: rank 5
                           [0.0, 9, 1, 2, 3, 4]])      # label 5: rank 1
    assert ev.accuracy_topk(logits, torch.tensor([0, 5, 5]), ks=(1, 2, 5, 6)) == pytest.approx(
        {1: 100 / 3, 2: 200 / 3, 5: 200 / 3, 6: 100.0})


def naive_recall(image, text, caption_image, k):
    """Sort everything, loop over queries."""
    i2t = sum(any(int(caption_image[j]) == i for j in (image[i] @ text.T).argsort(descending=True)[:k])
              for i in range(len(image)))
    t2i = sum(int(caption_image[j]) in (text[j] @ image.T).argsort(descending=True)[:k].tolist()
              for j in range(len(text)))
    return 100.0 * i2t / len(image), 100.0 * t2i / len(text)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_recall_chunked_equals_naive(chunk_size):
    image, text = unit(23, 8, 0), unit(69, 8, 1)
    shuffle = torch.randperm(69, generator=torch.Generator().manual_seed(2))
    caption_image = torch.arange(23).repeat_interleave(3)[shuffle]          # 3 captions per image
    got = ev.recall_at_k(image, text, caption_image, ks=(1, 5, 10), chunk_size=chunk_size)
    for k in (1, 5, 10):
        expected = naive_recall(image, text, caption_image, k)
        assert (got[f"i2t/R@{k}"], got[f"t2i/R@{k}"]) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Prompt ensembling and the alpha mix
# ----------------------------------------------------------------------------------------------
def test_ensemble_normalises_before_the_mean():
    per_template = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])            # 1 class, 2 templates
    torch.testing.assert_close(ev.ensemble(per_template), torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5]]))


def tiny_3t(tower3_dim=32, seed=0, **kw):
    torch.manual_seed(seed)
    return ThreeTowers("3t", image_arch="vit-micro", image_size=32, text_arch="micro", context_length=128,
                       embed_dim=16, tower3_dim=tower3_dim, **kw)


def test_class_embeddings_ensemble_each_class_over_its_templates():
    model, tok = tiny_3t().eval(), Tokenizer(128)
    classes, templates = ["red circle", "blue square", "dog"], ["a {}.", "photo of a {}", "{}!"]
    got = ev.class_embeddings(model, tok, ev.prompts_of(classes, templates), device="cpu")
    for key in ("g", "g_h"):
        for c, name in enumerate(classes):
            with torch.no_grad():
                per = model.encode_text(tok.encode([t.format(name) for t in templates]))[key]
            expected = F.normalize(F.normalize(per, dim=-1).mean(0), dim=-1)
            torch.testing.assert_close(got[key][c], expected, atol=1e-5, rtol=1e-5)


def test_alpha_mix_endpoints_and_middle():
    image = {"f": unit(5, 4, 0), "h_g": unit(5, 6, 1)}
    text = {"g": unit(7, 4, 2), "g_h": unit(7, 6, 3)}
    main, third = image["f"] @ text["g"].T, image["h_g"] @ text["g_h"].T
    def mixed(alpha):                  # s_alpha for all pairs, from the concatenated view
        a, b = ev.view_embeddings(image, text, "3t", "mix", alpha)
        return a @ b.T
    torch.testing.assert_close(mixed(1.0), main)
    torch.testing.assert_close(mixed(0.0), third)
    torch.testing.assert_close(mixed(0.25), 0.25 * main + 0.75 * third)


def test_views_offer_only_what_exists():
    assert ev.views("clip", (0, 0.5, 1)) == [("", "main", 1.0)]
    assert ev.views("lit", (0, 0.5, 1)) == [("", "main", 1.0)]
    assert [p for p, _, _ in ev.views("3t", (0, 0.5, 1))] == ["", "tower3/", "mix@0/", "mix@0.5/"]
    lit_image, text = {"h": unit(3, 6, 0)}, {"g": unit(3, 6, 1)}
    a, b = ev.view_embeddings(lit_image, text, "lit", "main")
    assert a is lit_image["h"] and b is text["g"]


# ----------------------------------------------------------------------------------------------
# Few-shot: k-shot sampling and the ridge probe
# ----------------------------------------------------------------------------------------------
def test_kshot_picks_exactly_k_per_class():
    labels = torch.arange(4).repeat(10)[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    idx = ev.kshot_indices(labels, 3, seed=0)
    assert len(set(idx.tolist())) == 12
    assert torch.bincount(labels[idx], minlength=4).tolist() == [3, 3, 3, 3]
    assert torch.equal(idx, ev.kshot_indices(labels, 3, seed=0))
    assert not torch.equal(idx, ev.kshot_indices(labels, 3, seed=1))
    with pytest.raises(ValueError, match="fewer than k=11"):
        ev.kshot_indices(labels, 11, seed=0)


def test_ridge_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 12) * 3
    x = F.normalize(centres.repeat_interleave(20, 0) + 0.3 * torch.randn(60, 12, generator=g), dim=-1)
    y = torch.arange(3).repeat_interleave(20)
    train = ev.kshot_indices(y, 5, seed=0)
    logits = ev.ridge_probe(x[train], y[train], x, 3)
    assert ev.accuracy_topk(logits, y, (1,))[1] == 100.0


@pytest.mark.parametrize("n", [5, 40])                                 # dual (n < d) and primal
def test_ridge_probe_matches_naive_normal_equations(n):
    x, y, test = unit(n, 16, 0).double(), torch.arange(n) % 3, unit(9, 16, 1).double()
    lam = 0.3
    # Naive: augment with a bias column, regularise every weight but the bias.
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    reg = lam * torch.eye(17, dtype=x.dtype)
    reg[-1, -1] = 0
    w = torch.linalg.solve(xa.T @ xa + reg, xa.T @ F.one_hot(y, 3).double())
    expected = torch.cat([test, torch.ones(9, 1, dtype=x.dtype)], 1) @ w
    torch.testing.assert_close(ev.ridge_probe(x, y, test, 3, lam), expected.float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# End to end: tiny checkpoints written the way train.py writes them
# ----------------------------------------------------------------------------------------------
TOWER3_SIZE, D_H = 16, 32         # h runs at 16 px, the main towers at 32 px: exercises the resize


def save_trained(path, model, tower3_spec):
    config = dict(mode=model.mode, image_arch="vit-micro", image_size=32, text_arch="micro",
                  context_length=128, embed_dim=16, tower3_dim=None if model.mode == "clip" else D_H)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "mode": model.mode, "model_config": config, "model": model.state_dict(),
                     "tower3": tower3_spec, "tokenizer": Tokenizer(128).to_dict(),
                     "args": {"train_data": "shapes", "seed": 0, "image_size": 32, "context_length": 128}}, path)


def train_a_little(model, tower3, steps=20):
    """A few contrastive steps on shapes pairs, so the checkpoint is not random."""
    data = ShapesPairs("train", 16 * steps, image_size=32, tower3_view=tower3.view)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(steps):
        batch = ev.collate(data.__getitems__(range(16 * step, 16 * step + 16)), Tokenizer(128))
        h = tower3(batch["image_h"])
        loss, _ = tower_loss(model(batch["image"], batch["text"][:, :100], h), model.mode)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    classifier = build_image_tower("vit-micro", TOWER3_SIZE, 4, bias=True)
    supervised = str(root / "supervised.pt")
    save_checkpoint({"format": CHECKPOINT_FORMAT, "mode": "supervised", "model": classifier.state_dict(),
                     "classifier": {"arch": "vit-micro", "image_size": TOWER3_SIZE, "num_classes": 4}}, supervised)
    model = tiny_3t(D_H)
    train_a_little(model, load_tower3(supervised))
    paths = {"supervised": supervised, "3t": str(root / "3t" / "ckpt.pt")}
    os.makedirs(root / "3t")
    save_trained(paths["3t"], model, supervised)
    for mode in ("clip", "lit"):
        paths[mode] = str(root / f"{mode}.pt")
        m = ThreeTowers(mode, image_arch="vit-micro", image_size=32, text_arch="micro", context_length=128,
                        embed_dim=16, tower3_dim=None if mode == "clip" else D_H)
        save_trained(paths[mode], m, None if mode == "clip" else supervised)
    return paths


FAST = ["--num-images", "24", "--shots", "1,2", "--fewshot-seeds", "2", "--device", "cpu", "--no-progress"]


def test_main_3t_writes_json_table_and_grid(ckpts, capsys, tmp_path):
    grid = str(tmp_path / "retrieval.png")
    results = ev.main(["--checkpoint", ckpts["3t"], "--alphas", "0,0.5,1", "--save-grid", grid] + FAST)
    out = os.path.join(os.path.dirname(ckpts["3t"]), "eval_ckpt.json")
    records = json.load(open(out))
    assert len(records) == len(results)
    got = {(r["embeddings"], r["alpha"], r["task"], r["metric"]) for r in records}
    tasks = [("zeroshot/" + t, m) for t in ("object", "position_size", "scene") for m in ("top1", "top5")]
    tasks += [("retrieval/" + d, f"R@{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)]
    views = [("main", None), ("tower3", None), ("mix", 0.0), ("mix", 0.5)]
    expected = {(e, a, t, m) for e, a in views for t, m in tasks}
    expected |= {(e, None, "fewshot/object", f"{k}shot") for e in ("main", "tower3") for k in (1, 2)}
    assert got == expected
    assert all(0.0 <= r["value"] <= 100.0 for r in records)
    # alpha = 0 is the third-tower pairing, end to end.
    paired = [k[len("tower3/"):] for k in results if k.startswith("tower3/") and "shot" not in k]
    assert paired and all(results[f"mix@0/{k}"] == results[f"tower3/{k}"] for k in paired)
    table = capsys.readouterr().out
    assert "zeroshot/object/top1" in table and "a=0.5" in table and "tower3" in table
    # 4 queries; 5 tiles of 32 px upscaled x3 = 96 px, padding 2; a 28 px text band per row.
    with Image.open(grid) as image:
        assert image.size == (5 * 98 + 2, 4 * (28 + 100))
        lo, hi = image.convert("L").getextrema()
        assert hi - lo > 100                                              # not a blank canvas


@pytest.mark.parametrize("mode", ["clip", "lit"])
def test_clip_and_lit_offer_only_main(ckpts, tmp_path, capsys, mode):
    out = str(tmp_path / "r.json")
    ev.main(["--checkpoint", ckpts[mode], "--out", out, "--tasks", "zeroshot,fewshot"] + FAST)
    records = json.load(open(out))
    assert {r["embeddings"] for r in records} == {"main"}
    assert {r["task"] for r in records} == {"zeroshot/object", "zeroshot/position_size", "zeroshot/scene",
                                            "fewshot/object"}
    assert "only the main embeddings exist" in capsys.readouterr().out


def test_evaluate_keys_and_restores_training_mode(ckpts):
    model, tower3, _ = load_trained(ckpts["3t"])
    suite = ev.build_eval_suite("shapes", tokenizer=Tokenizer(128), image_size=32, num_images=12)
    for training in (True, False):
        model.train(training)
        results = ev.evaluate(model, tower3, suite, device="cpu", alphas=(1.0, 0.5))
        assert model.training is training
    main_keys = {f"zeroshot/{t}/top{k}" for t in ("object", "position_size", "scene") for k in (1, 5)}
    main_keys |= {f"retrieval/{d}/R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(results) == main_keys | {p + k for p in ("tower3/", "mix@0.5/") for k in main_keys}


def test_shapes_zero_shot_images_show_one_object_retrieval_images_what_captions_say():
    """Zero-shot labels name one object, so its images show one; retrieval captions describe a
    second object where there is one, so its images are the paired world's, second objects included."""
    suite = ev.build_eval_suite("shapes", tokenizer=Tokenizer(128), image_size=32, num_images=12)
    world = shapes.ShapesWorld(0, 32)
    single = world.render_batch(range(12), "test", single=True)
    paired = world.render_batch(range(12), "test")
    zeroshot, retrieval = suite.zeroshot["object"][0], suite.retrieval.images
    two = [i for i in range(12) if world.attributes(i, "test")["second"]]
    assert two, "some test image should have a second object"
    for i in range(12):
        torch.testing.assert_close(zeroshot[i]["image"], single[i])
        torch.testing.assert_close(retrieval[i]["image"], paired[i])
        assert torch.equal(single[i], paired[i]) == (i not in two)
    assert any(" and a " in c or " by a " in c or ", with a " in c
               for i in two for c in suite.retrieval.captions[5 * i:5 * i + 5])


def test_csv_retrieval_groups_captions_by_image(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (20, 20), colour).save(tmp_path / name)
    rows = ["filepath,title", "a.png,one", "b.png,two", "a.png,three", "c.png,four", "b.png,five"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    r = ev.csv_retrieval(str(tmp_path / "pairs.csv"), image_size=16)
    assert len(r.images) == 3 and r.captions == ["one", "two", "three", "four", "five"]
    assert r.caption_image.tolist() == [0, 1, 0, 2, 1]
    assert r.images[1]["image"][2].float().mean() > r.images[1]["image"][0].float().mean()   # b.png is blue


def test_clear_errors(ckpts, tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found: .*nope.pt"):
        ev.main(["--checkpoint", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit, match="supervised classifier.*--tower3"):
        ev.main(["--checkpoint", ckpts["supervised"]])
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=f"no format '{CHECKPOINT_FORMAT}'"):
        ev.main(["--checkpoint", str(tmp_path / "other.pt")])


def test_every_flag_has_help():
    actions = ev.build_parser()._actions
    assert {"--checkpoint", "--tasks", "--alphas", "--save-grid", "--out"} <= {
        o for a in actions for o in a.option_strings}
    assert all(a.help and a.help.strip() for a in actions)


def test_imagefolder_and_cifar_zero_shot_sources(tmp_path):
    from test_data import jpeg
    for c, cls in enumerate(["n01", "n02"]):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "val" / cls / f"{i}.jpg").write_bytes(jpeg(10 * c + i, 20))
    (tmp_path / "names.txt").write_text("goldfish\nwhite shark\n")
    ds, names = ev.imagefolder_zeroshot(str(tmp_path / "val"), str(tmp_path / "names.txt"), image_size=16)
    assert names == ["goldfish", "white shark"] and ds[3]["label"] == 1 and ds[3]["image"].shape == (3, 16, 16)
    (tmp_path / "few.txt").write_text("goldfish\n")
    with pytest.raises(ValueError, match="1 names but .* 2 class folders"):
        ev.imagefolder_zeroshot(str(tmp_path / "val"), str(tmp_path / "few.txt"))
    with pytest.raises(FileNotFoundError, match="download=True"):
        ev.cifar_zeroshot("cifar10", str(tmp_path / "no_cifar"))


def test_views_compare_what_training_paired():
    """view_pair reads losses.PAIRS: image side first, the text side (g, g_h) second."""
    assert {m: ev.view_pair(m, "main") for m in ("clip", "lit", "3t")} == \
        {"clip": ("f", "g"), "lit": ("h", "g"), "3t": ("f", "g")}
    assert ev.view_pair("3t", "tower3") == ("h_g", "g_h")


# ----------------------------------------------------------------------------------------------
# ImageNet zero-shot: 1,000 WordNet-id folders, torchvision's class names, folder k is class k
# ----------------------------------------------------------------------------------------------
def colour_of(k):
    """A distinct solid colour per class index k < 1000 (levels 25 apart survive any
    normalisation)."""
    return (25 * (k % 10), 25 * (k // 10 % 10), 25 * (k // 100))


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """1,000 class folders named like WordNet ids (n + 8 digits, uneven gaps), made in shuffled
    order, one tiny PNG each whose colour encodes the folder's rank in sorted order."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    wnids = [f"n{1_000_000 + 7 * k * k + k:08d}" for k in range(1000)]       # sorted = k order
    for k in torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist():
        (root / wnids[k]).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour_of(k)).save(root / wnids[k] / f"ILSVRC2012_val_{k:08d}.png")
    return root, wnids


class ColourModel(torch.nn.Module):
    """A 'clip' model that knows the answer: an image's embedding is the one-hot of the class whose
    colour it shows (nearest calibrated colour), a prompt's the one-hot of the class name it holds.
    So the image of folder k scores top-1 iff the suite pairs it with the prompts of name k."""
    mode = "clip"

    def __init__(self, names, templates, image_size):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        solid = torch.tensor([colour_of(k) for k in range(len(names))], dtype=torch.uint8)
        transform = data.image_transform(image_size, train=False)
        self.colours = torch.stack([transform(c.view(3, 1, 1).expand(3, 8, 8)).float().mean((1, 2))
                                    for c in solid])
        self.prompt_class = {t.format(name): k for k, name in enumerate(names) for t in templates}
        self.tokenizer, self.n = Tokenizer(128), len(names)

    def encode_image(self, image, h=None):
        k = torch.cdist(image.float().mean((2, 3)), self.colours).argmin(1)
        return {"f": F.one_hot(k, self.n).float()}

    def encode_text(self, ids):
        k = torch.tensor([self.prompt_class[self.tokenizer.decode(row)] for row in ids])
        return {"g": F.one_hot(k, self.n).float()}


def test_imagenet_folder_k_is_class_k_named_by_torchvision(imagenet_root):
    from torchvision.models import ResNet50_Weights
    root, wnids = imagenet_root
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    ds, names = ev.imagenet_zeroshot(str(root), image_size=16)
    assert names == categories and len(set(names)) == 1000 and ds.classnames == names
    assert ds.targets == list(range(1000))
    assert [os.path.basename(os.path.dirname(p)) for p in ds.paths] == wnids   # image k: folder k
    templates = ev.IMAGENET_TEMPLATES
    assert 16 <= len(templates) <= 24 and all(t.count("{}") == 1 for t in templates)
    # End to end: the suite's prompts, images, labels and scoring, with a model that knows which
    # name each folder's colour belongs to.
    suite = ev.build_eval_suite(tokenizer=Tokenizer(128), image_size=16, tasks=("zeroshot",),
                                zeroshot_data=f"imagenet:{root}")
    _, classes, prompts = suite.zeroshot["imagenet"]
    assert classes == categories and prompts[3] == [t.format(categories[3]) for t in templates]
    model = ColourModel(categories, templates, 16)
    results = ev.evaluate(model, None, suite, device="cpu", batch_size=500)
    assert results == {"zeroshot/imagenet/top1": 100.0, "zeroshot/imagenet/top5": 100.0}
    # The same model reading the names shifted by one class scores nothing: the check can fail.
    shifted = ColourModel(categories[1:] + categories[:1], templates, 16)
    assert ev.evaluate(shifted, None, suite, device="cpu", batch_size=500) == {
        "zeroshot/imagenet/top1": 0.0, "zeroshot/imagenet/top5": 0.0}


def test_imagenet_folder_of_the_wrong_shape_is_one_line_naming_it(tmp_path):
    few = tmp_path / "few"
    for name in ("n01440764", "n01443537", "readme"):
        (few / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"few: expected the 1,000 ILSVRC-2012 class folders named "
                                         r"by WordNet id \(n \+ 8 digits.*found 2 such folders, 1 "
                                         r"other folders .*'readme'"):
        ev.check_source("zeroshot", f"imagenet:{few}")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match=r"found 0 such folders, 0 other folders and 1 files "
                                         r"\(e.g. file 'ILSVRC2012_val_00000001.JPEG'\)"):
        ev.imagenet_zeroshot(str(flat))
    with pytest.raises(SystemExit) as stop:
        ev.parse_args(["--checkpoint", "x.pt", "--zeroshot-data", f"imagenet:{few}"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit):
        train.parse_args(["--zeroshot-data", f"imagenet:{tmp_path / 'none'}"])


def test_imagenet_spec_is_accepted_by_eval_and_train(imagenet_root):
    spec = f"imagenet:{imagenet_root[0]}"
    assert ev.parse_args(["--checkpoint", "x.pt", "--zeroshot-data", spec]).zeroshot_data == spec
    assert train.eval_sources(train.parse_args(["--zeroshot-data", spec]))[0] == spec
    assert "imagenet:ROOT" in ev.ZEROSHOT_SPECS


# ----------------------------------------------------------------------------------------------
# Karpathy splits (dataset_coco.json with filepath, dataset_flickr30k.json without)
# ----------------------------------------------------------------------------------------------
def karpathy_files(root, coco: bool):
    """Four images (test, val, test, restval) of distinct colours; the first has seven captions
    (COCO has such images), the others five. Returns (json path, image root)."""
    entries, colours = [], ["red", "blue", "green", "white"]
    for i, (split, colour) in enumerate(zip(["test", "val", "test", "restval"], colours)):
        folder = root / "images" / ("val2014" if coco else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), colour).save(folder / f"{i}.jpg")
        sentences = [{"raw": f"{colour} picture, caption {c}."} for c in range(7 if i == 0 else 5)]
        entry = {"filename": f"{i}.jpg", "split": split, "sentences": sentences}
        entries.append({"filepath": "val2014", **entry} if coco else entry)
    path = root / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": entries, "dataset": "coco" if coco else "flickr30k"}))
    return str(path), str(root / "images")


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy_split_groups_five_captions_per_image(tmp_path, coco):
    path, images = karpathy_files(tmp_path, coco)
    r = ev.karpathy_retrieval(path, images, "test", image_size=16)
    assert len(r.images) == 2 and len(r.captions) == 10             # image 0's extra two dropped
    assert r.captions[:5] == [f"red picture, caption {c}." for c in range(5)]
    assert r.captions[5:] == [f"green picture, caption {c}." for c in range(5)]
    assert r.caption_image.tolist() == [0] * 5 + [1] * 5
    red, green = r.images[0]["image"], r.images[1]["image"]
    red, green = red.float(), green.float()
    assert red[0].mean() > red[1].mean() and green[1].mean() > green[0].mean()  # the right files
    assert os.path.dirname(r.images.paths[0]).endswith("val2014") == coco


def test_karpathy_retrieval_end_to_end_in_eval_and_train(ckpts, tmp_path):
    path, images = karpathy_files(tmp_path, coco=True)
    spec = f"karpathy:{path}:{images}:test"
    results = ev.main(["--checkpoint", ckpts["clip"], "--tasks", "retrieval", "--retrieval-data",
                       spec, "--out", str(tmp_path / "r.json")] + FAST)
    assert set(results) == {f"retrieval/{d}/R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    # 2 images x 5 captions: an image's best caption has at most 5 negatives above it, a caption 1
    assert results["retrieval/i2t/R@10"] == results["retrieval/t2i/R@5"] == 100.0
    assert train.eval_sources(train.parse_args(["--retrieval-data", spec]))[1] == spec
    suite = ev.build_eval_suite(spec, tokenizer=Tokenizer(128), image_size=16, tasks=["retrieval"])
    assert len(suite.retrieval_tokens) == 10


@pytest.mark.parametrize("case,message", [
    ("no json", r"Karpathy caption file not found: .*nope.json"),
    ("no root", r"image root not found: .*nowhere"),
    ("not json", r"dataset_coco.json is not valid JSON"),
    ("no images key", r"dataset_coco.json is not in the Karpathy format .*KeyError: 'images'"),
    ("unknown split", r"dataset_coco.json has no split 'tset'; its splits: restval, test, val"),
    ("missing images", r"2 of 2 images of split 'test' of .*dataset_coco.json are missing, e.g. "
                       r".*0.jpg, .*2.jpg"),
])
def test_karpathy_errors_are_one_line_before_any_work(tmp_path, capsys, case, message):
    path, images = karpathy_files(tmp_path, coco=True)
    split = "tset" if case == "unknown split" else "test"
    if case == "no json":
        path = str(tmp_path / "nope.json")
    if case == "no root":
        images = str(tmp_path / "nowhere")
    if case == "not json":
        open(path, "w").write("{'images': ")
    if case == "no images key":
        open(path, "w").write(json.dumps({"imgs": []}))
    if case == "missing images":
        for name in ("0.jpg", "2.jpg"):
            os.remove(os.path.join(images, "val2014", name))
    spec = f"karpathy:{path}:{images}:{split}"
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        ev.check_source("retrieval", spec)
    with pytest.raises(SystemExit) as stop:       # before the (missing) checkpoint is looked for
        ev.main(["--checkpoint", str(tmp_path / "not_loaded.pt"), "--retrieval-data", spec])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and f"error: --retrieval-data {spec}: " in err, err
    assert re.search(message, err)


# ----------------------------------------------------------------------------------------------
# No silent skip: an unknown or unusable --zeroshot-data / --retrieval-data / --fewshot-data stops
# eval.py at parse time (exit 2), naming the flag, the spec and the syntaxes accepted
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,spec,accepted", [
    ("--retrieval-data", "typo:data.json", "karpathy:JSON:IMAGE_ROOT:SPLIT"),
    ("--retrieval-data", "cifar10:/data", "a .csv/.tsv of image paths and captions"),
    ("--retrieval-data", "karpathy:only.json:test", "karpathy:JSON:IMAGE_ROOT:SPLIT"),
    ("--zeroshot-data", "captions.csv", "imagenet:ROOT"),
    ("--zeroshot-data", "imagenet", "imagefolder:ROOT:CLASSNAMES_FILE"),
    ("--fewshot-data", "captions.csv", "imagefolder:ROOT, cifar10:ROOT or cifar100:ROOT"),
    ("--fewshot-data", "mnist:/data", "imagefolder:ROOT, cifar10:ROOT or cifar100:ROOT"),
])
def test_unknown_eval_data_stops_at_parse_time(tmp_path, capsys, flag, spec, accepted):
    """The checkpoint does not exist: the flag must be rejected before it is looked for."""
    with pytest.raises(SystemExit) as stop:
        ev.main(["--checkpoint", str(tmp_path / "not_loaded.pt"), flag, spec])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert f"error: {flag} {spec}: " in err[-1] and accepted in err[-1], err[-1]


@pytest.mark.parametrize("flag,spec,message", [
    ("--zeroshot-data", "cifar10:{tmp}", "cifar10 not found: .*cifar-10-batches-py"),
    ("--fewshot-data", "cifar100:{tmp}", "cifar100 not found: .*cifar-100-python"),
    ("--fewshot-data", "imagefolder:{tmp}", "expected class folders under .*/train"),
])
def test_unusable_eval_data_stops_at_parse_time(tmp_path, capsys, flag, spec, message):
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as stop:
        ev.main(["--checkpoint", str(tmp_path / "not_loaded.pt"), flag, spec])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and f"error: {flag} {spec}: " in err and re.search(message, err)


def test_build_eval_suite_never_skips_a_task():
    tok = Tokenizer(128)
    for task, spec, message in (("retrieval", "cifar10:/x", "retrieval data 'cifar10:/x'"),
                                ("zeroshot", "pairs.csv", "zero-shot data 'pairs.csv'"),
                                ("fewshot", "pairs.csv", "few-shot data 'pairs.csv'")):
        with pytest.raises(ValueError, match=message):
            ev.build_eval_suite(tokenizer=tok, image_size=16, tasks=(task,),
                                **{f"{task}_data": spec})


# ----------------------------------------------------------------------------------------------
# Curves: metrics.jsonl as small multiples (PIL)
# ----------------------------------------------------------------------------------------------
def test_nice_ticks_are_round_and_cover_the_range():
    assert ev.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert ev.nice_ticks(2.48, 4.9) == pytest.approx([2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
    ticks = ev.nice_ticks(9.961, 10.118)
    assert ticks[0] <= 9.961 and ticks[-1] >= 10.118 and 4 <= len(ticks) <= 11
    assert ev.nice_ticks(10.0, 10.0)[0] < 10.0 < ev.nice_ticks(10.0, 10.0)[-1]   # a band around it


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def step_record(step, loss, fg, fh, t_fg, t_fh, acc):
    """A record as runtime.MetricsLog writes it."""
    return {"acc/fg": acc, "loss": loss, "loss/fg": fg, "loss/fh": fh, "t/fg": t_fg, "t/fh": t_fh,
            "step": step, "epoch": 0, "lr": 1e-4, "samples_per_s": 600.0, "data_errors": {}}


def eval_record(step, main, tower3, mix, r1):
    return {"step": step, "eval": {"zeroshot/object/top1": main, "retrieval/i2t/R@1": r1,
                                   "tower3/zeroshot/object/top1": tower3,
                                   "mix@0.5/zeroshot/object/top1": mix}}


LOG = [step_record(5, 4.9, 5.0, 4.8, 10.0, 10.0, 0.01),
       step_record(10, 4.1, 4.5, 3.7, 9.9, 10.2, 0.1), eval_record(10, 12.0, 20.0, 18.0, 3.0),
       step_record(15, 3.9, 4.2, 3.5, 9.8, 10.4, 0.2),
       step_record(15, 3.0, 3.2, 2.8, 9.7, 10.5, 0.3),                # a resumed run logs it again
       eval_record(15, 22.0, 25.0, 28.0, 7.0)]


def test_curve_panels_group_losses_temperatures_and_each_eval_metric():
    panels = {title: (y_label, lines) for title, y_label, lines in ev.curve_panels(LOG)}
    assert list(panels) == ["losses", "temperatures", "in-batch top-1 (training)",
                            "zeroshot/object/top1", "retrieval/i2t/R@1"]
    assert panels["losses"][1] == {"loss": [(5, 4.9), (10, 4.1), (15, 3.0)],     # the later 15
                                   "loss/fg": [(5, 5.0), (10, 4.5), (15, 3.2)],
                                   "loss/fh": [(5, 4.8), (10, 3.7), (15, 2.8)]}
    assert set(panels["temperatures"][1]) == {"t/fg", "t/fh"}
    assert panels["zeroshot/object/top1"] == ("top1 (%)", {"main": [(10, 12.0), (15, 22.0)],
                                                           "tower3": [(10, 20.0), (15, 25.0)],
                                                           "mix@0.5": [(10, 18.0), (15, 28.0)]})


def test_curves_command_draws_a_metrics_log(tmp_path, capsys):
    log = write_log(tmp_path / "metrics.jsonl", LOG)
    assert ev.main(["--curves", log]) == {}
    png = tmp_path / "curves.png"                                         # default: beside the log
    assert f"wrote {png} " in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.size == (4 * ev.PANEL_W, 2 * ev.PANEL_H)             # 5 panels, 4 columns
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int64)
    assert pixels.std() > 20                                              # not a blank canvas
    packed = set(np.unique(pixels @ np.array([65536, 256, 1])).tolist())
    assert {r * 65536 + g * 256 + b for r, g, b in ev.PALETTE[:3]} <= packed   # lines drawn
    out = tmp_path / "elsewhere.png"
    ev.main(["--curves", log, "--out", str(out)])
    assert out.exists()


def test_curves_command_without_records_is_one_line(tmp_path):
    empty = write_log(tmp_path / "metrics.jsonl", [])
    with pytest.raises(SystemExit, match=r"^eval.py: error: .*metrics.jsonl has no record to draw "
                                         r"\(expected JSON lines with a 'step'") as stop:
        ev.main(["--curves", empty])
    assert "\n" not in str(stop.value.code)
    with pytest.raises(SystemExit, match="metrics file not found: .*nope.jsonl"):
        ev.main(["--curves", str(tmp_path / "nope.jsonl")])
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl, line 2: not a JSON record"):
        ev.main(["--curves", str(tmp_path / "bad.jsonl")])
    with pytest.raises(SystemExit) as stop:
        ev.main([])                                          # neither --checkpoint nor --curves
    assert stop.value.code == 2
    assert not (tmp_path / "curves.png").exists()


def test_lit_evaluation_makes_no_view_for_f_and_embeds_as_if_it_did(ckpts, monkeypatch):
    """A LiT model has no f: evaluation embeds h's view of each image only (data.with_tower3_view,
    f_view=False) and gets the embeddings of an evaluation that also cut f's view; 3t still gets both."""
    rng = np.random.default_rng(0)
    images = data.LabelledImages(data.image_transform(32, train=False), ["a", "b"], [0, 1, 0, 1],
                                 array=rng.integers(0, 256, (4, 40, 44, 3), dtype=np.uint8))
    seen, real_collate, real_views = [], ev.collate, data.with_tower3_view
    monkeypatch.setattr(ev, "collate", lambda samples, *a, **k: seen.append(set(samples[0])) or real_collate(samples))
    got = {}
    for mode, keep_f in (("lit", False), ("3t", False), ("lit", True)):
        if keep_f:                                                       # the code before: f's view made
            monkeypatch.setattr(ev, "with_tower3_view", lambda ds, view, f_view=True: real_views(ds, view))
        model, tower3, _ = load_trained(ckpts[mode])
        got[mode, keep_f] = ev.Embedder(model, tower3, "cpu").images(images)[0]
    assert seen == [{"image_h", "label"}, {"image", "image_h", "label"}, {"image", "image_h", "label"}]
    assert got["lit", False].keys() == got["lit", True].keys() == {"h"}
    assert torch.equal(got["lit", False]["h"], got["lit", True]["h"]) and "f" in got["3t", False]
