"""The third towers real users bring, offline: torchvision weights by name (a random state_dict saved
where torch.hub looks), torch.hub repositories (a local one this file writes), headless trunks, and
release checkpoints in the Places365 layout; and h's view, which must be the preprocessing the
tower's weights were trained with -- in training, in the h cache, in checkpoints and in eval.py."""
import os
import textwrap
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import EfficientNet_B0_Weights, MobileNet_V3_Small_Weights, ResNet50_Weights
from torchvision.models import ViT_B_16_Weights

import checkpoints
import data
import runtime
import train
from model import normalize
from checkpoints import DEFAULT_VIEW, load_trained, load_tower3, strip_classifier, weights_view
from test_train import tiny

def photo_like(height: int, width: int) -> torch.Tensor:
    """uint8 (3, H, W): smooth colour gradients with mild noise, as photographs are (white noise would
    make every resampler's rounding differ by many levels after bicubic overshoot)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    image = torch.stack([x, y, (x + y) / 2]) * 200 + 25 * torch.sin(12 * x * y) + 10 * noise
    return image.clamp(0, 255).round().to(torch.uint8)


IMAGE = photo_like(300, 260)


# ----------------------------------------------------------------------------- h's view from the weights
@pytest.mark.parametrize("enum,expected", [
    (ResNet50_Weights.IMAGENET1K_V2, data.View(224, 232, "bilinear")),
    (ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1, data.View(384, 384, "bicubic")),
    (EfficientNet_B0_Weights.IMAGENET1K_V1, data.View(224, 256, "bicubic")),
])
def test_view_of_torchvision_weights_is_their_own_preprocessing(enum, expected):
    """weights_view reads the weights' metadata (no download), and h's view built from it is what
    torchvision's own enum.transforms() makes of an image, up to the rounding of the uint8 resize
    (within 2 intensity levels; on average far less)."""
    view = weights_view(enum)
    assert view == expected
    ours = normalize(data.tower3_view(IMAGE, view), view.mean, view.std)
    reference = enum.transforms()(IMAGE)
    level = 1 / 255 / min(view.std)
    torch.testing.assert_close(ours, reference, atol=2 * level, rtol=0)
    assert (ours - reference).abs().mean() < 0.5 * level
    other = normalize(data.tower3_view(IMAGE, data.View(view.crop, view.crop)))    # the old "resize to crop"
    assert (other - reference).abs().max() > 4 * level or view.resize == view.crop


@pytest.fixture()
def offline_weights(tmp_path, monkeypatch):
    """MobileNetV3-small 'IMAGENET1K_V1' weights as torchvision would find them after a download:
    random, saved under $TORCH_HOME/hub/checkpoints/ with the enum's file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    enum = MobileNet_V3_Small_Weights.IMAGENET1K_V1
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    net = torchvision.models.mobilenet_v3_small()
    torch.save(net.state_dict(), folder / enum.url.rsplit("/", 1)[-1])
    return net.eval()


def test_torchvision_weights_load_offline_with_their_view(offline_weights):
    tower = load_tower3("torchvision:mobilenet_v3_small:IMAGENET1K_V1")
    assert tower.view == data.View(224, 256, "bilinear") and tower.head == "classifier.3"
    assert tower.dim == 1024                                   # the input of the removed classifier[-1]
    x = data.tower3_view(IMAGE, tower.view)[None]
    offline_weights.classifier[-1] = nn.Identity()
    torch.testing.assert_close(tower(x), offline_weights(normalize(x)))


def test_view_flags_override_the_source_and_are_checked(offline_weights, tmp_path, capsys):
    tower = load_tower3("torchvision:mobilenet_v3_small:IMAGENET1K_V1", {"resize": 240, "interpolation": "bicubic"})
    assert tower.view == data.View(224, 240, "bicubic")
    with pytest.raises(ValueError, match=r"resizes the short side to 100, less than its centre crop 224"):
        load_tower3("torchvision:mobilenet_v3_small:IMAGENET1K_V1", {"resize": 100})
    args = train.parse_args(["--tower3-size", "64", "--tower3-mean", "0.5", "0.5", "0.5"])
    assert train.tower3_view_flags(args) == {"crop": 64, "mean": (0.5, 0.5, 0.5)}
    for bad in (["--tower3-size", "0"], ["--tower3-std", "0", "1", "1"], ["--tower3-interpolation", "nearest"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
        assert bad[0] in capsys.readouterr().err


# ----------------------------------------------------------------------------- heads: only known ones go
def tiny_vit() -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5)


def test_a_headless_trunk_is_taken_whole():
    """A trunk whose last nn.Linear sits in its last block's MLP: removing 'the last linear' (the old
    rule) would cut into it; no known head, so the model is kept whole."""
    trunk = tiny_vit()
    trunk.heads = nn.Identity()
    reference = trunk(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert strip_classifier(trunk) is None
    assert trunk(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))).equal(reference)
    classifier = tiny_vit()
    assert strip_classifier(classifier) == "heads.head" and isinstance(classifier.heads.head, nn.Identity)

    class NestedHead(nn.Module):               # a head module with a hidden layer, as some hub ViTs have
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.head = nn.Module()
            self.head.layers = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 10))
    nested = NestedHead()
    assert strip_classifier(nested) == "head.layers.2" and isinstance(nested.head.layers[2], nn.Identity)
    assert isinstance(nested.trunk, nn.Linear) and isinstance(nested.head.layers[0], nn.Linear)


def write_places_checkpoint(path, arch: str = "resnet18", classes: int = 365) -> nn.Module:
    """A release checkpoint as Places365's: {'epoch', 'arch', 'state_dict': {'module.' + key: ...}}."""
    torch.manual_seed(3)
    net = getattr(torchvision.models, arch)(num_classes=classes)
    torch.save({"epoch": 90, "arch": arch, "best_prec1": 54.7,
                "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net.eval()


def test_places365_style_checkpoint_loads_as_a_trunk(tmp_path):
    net = write_places_checkpoint(tmp_path / "resnet18_places365.pth.tar")
    tower = load_tower3(f"torchvision:resnet18:{tmp_path / 'resnet18_places365.pth.tar'}")
    assert tower.head == "fc (365 classes in the file)" and tower.dim == 512 and tower.view == DEFAULT_VIEW
    x = data.tower3_view(IMAGE, tower.view)[None]
    net.fc = nn.Identity()
    torch.testing.assert_close(tower(x), net(normalize(x)))
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth'?: not a state_dict of torchvision's resnet18"):
        load_tower3(f"torchvision:resnet18:{tmp_path / 'other.pth'}")


# ----------------------------------------------------------------------------- torch.hub towers
HUBCONF = '''
import torch
from torch import nn

dependencies = ["torch"]


def headless(pretrained=True):
    """A trunk that ends in an MLP block, no classification head: an embedding of width 24."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 24)))


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def classifier(pretrained=True):
    torch.manual_seed(5)
    return WithHead()
'''


@pytest.fixture()
def hub_repo(tmp_path):
    repo = tmp_path / "hubrepo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    return str(repo)


def test_hub_towers_headless_whole_classifier_cut(hub_repo):
    headless = load_tower3(f"hub:{hub_repo}:headless")
    assert headless.head is None and headless.dim == 24 and headless.view == DEFAULT_VIEW
    whole = torch.hub.load(hub_repo, "headless", source="local").eval()
    x = data.tower3_view(IMAGE, headless.view)[None]
    torch.testing.assert_close(headless(x), whole(normalize(x)))
    cut = load_tower3(f"hub:{hub_repo}:classifier", {"crop": 32, "resize": 32})
    assert cut.head == "fc" and cut.dim == 6 and cut.view.crop == 32
    with pytest.raises(ValueError, match="nothing_here"):
        load_tower3(f"hub:{hub_repo}:nothing_here")
    with pytest.raises(FileNotFoundError, match="hubconf.py"):
        load_tower3(f"hub:{os.path.dirname(hub_repo)}:headless")
    with pytest.raises(ValueError, match="expected hub:OWNER/REPO:ENTRYPOINT"):
        load_tower3("hub:justaname")


def test_hub_offline_error_says_where_the_cache_is(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(RuntimeError, match=r"Offline\? torch\.hub keeps repositories and weights under "
                                           + torch.hub.get_dir()):
        load_tower3("hub:facebookresearch/dinov2:dinov2_vitb14")


# ----------------------------------------------------------------------------- the view end to end
def test_view_is_recorded_cached_and_reused_by_eval(hub_repo, tmp_path, capsys):
    """A hub tower with a view set by flags: training's cache holds h of that view, the checkpoint
    records it, eval.py's model loader rebuilds the same view, and another view is another cache."""
    spec = f"hub:{hub_repo}:headless"
    flags = ["--mode", "3t", "--tower3", spec, "--steps", "2", "--eval-data", "none", "--tower3-size", "16",
             "--tower3-resize", "20", "--tower3-interpolation", "bicubic"]
    train.main(tiny(tmp_path, *flags))
    out = capsys.readouterr().out
    assert "view: short side 20 (bicubic), centre crop 16" in out and "no known classification head" in out
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["tower3_view"]["crop"] == 16 and ckpt["tower3_view"]["interpolation"] == "bicubic"
    _, tower, _ = load_trained(str(tmp_path / "run" / "ckpt.pt"))
    assert tower.view == data.View(16, 20, "bicubic") and checkpoints.tower3_digest(tower) == ckpt["tower3_digest"]
    caches = lambda: sorted(f for f in os.listdir(tmp_path / "cache") if f.startswith("h-"))
    first = caches()
    train.main(tiny(tmp_path, *flags[:-2], out="bilinear"))
    assert len(caches()) == len(first) + 1                    # another view: another fingerprint
    with pytest.raises(SystemExit, match="another model"):    # resuming with another view is refused
        train.main(tiny(tmp_path, *flags[:-2], "--resume", "latest"))


def test_cache_key_covers_the_view(hub_repo):
    args = train.parse_args(["--train-data", "shapes"])
    dataset = list(range(10))
    keys = {runtime.cache_key(args, load_tower3(f"hub:{hub_repo}:headless", v), dataset)["fingerprint"]
            for v in ({}, {"resize": 300}, {"interpolation": "bicubic"}, {"mean": (0.5, 0.5, 0.5)})}
    assert len(keys) == 4
