"""The towers: shapes of each mode, the frozen third tower, loading it offline, temperatures."""
import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import model as model_lib
from losses import tower_loss
from model import FrozenTower, ThreeTowers, build_image_tower, load_tower3, strip_classifier, summary
from test_losses import tiny_batch, tiny_model


@pytest.mark.parametrize("mode,keys", [
    ("clip", {"f": 8, "g": 8}),
    ("lit", {"h": 6, "g": 6}),
    ("3t", {"f": 8, "g": 8, "f_h": 8, "g_h": 8, "h_f": 8, "h_g": 8}),
])
def test_forward_shapes_and_unit_norm(mode, keys):
    out = tiny_model(mode)(*tiny_batch(5))
    embeddings = {k: v for k, v in out.items() if not k.startswith(("t_", "b_"))}
    assert {k: v.shape for k, v in embeddings.items()} == {k: (5, d) for k, d in keys.items()}
    for v in embeddings.values():
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(5))
    assert sorted(k for k in out if k.startswith("t_")) == sorted(
        {"clip": ["t_fg"], "lit": ["t_hg"], "3t": ["t_fg", "t_fh", "t_gh"]}[mode])


def test_3t_without_tower3_heads_maps_into_d_h():
    out = tiny_model("3t", tower3_heads=False)(*tiny_batch(5))
    assert out["f_h"].shape == out["g_h"].shape == (5, 6)                  # D_h = 6
    h = tiny_batch(5)[2]
    torch.testing.assert_close(out["h_f"], nn.functional.normalize(h, dim=-1))


def test_temperatures_start_at_10_and_are_clamped_at_100():
    m = tiny_model("3t")
    assert all(t.item() == pytest.approx(10.0) for t in m.temperatures().values())
    with torch.no_grad():
        m.log_temperature["fg"].fill_(10.0)          # t would be e^10
    assert m.temperatures()["t_fg"].item() == pytest.approx(100.0)
    m.clamp_temperatures_()
    assert m.log_temperature["fg"].item() == pytest.approx(math.log(100.0))


def test_text_tower_ignores_tokens_after_eos():
    m = tiny_model("clip").eval()
    _, text, _ = tiny_batch(4)
    text[:, 6] = 257                                   # EOS earlier; column 11 stays EOS too
    other = text.clone()
    other[:, 7:] = torch.randint(0, 256, (4, 5))       # garbage after the first EOS
    torch.testing.assert_close(m.encode_text(text)["g"], m.encode_text(other)["g"])
    changed = text.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 256          # a token before EOS matters
    assert not torch.allclose(m.encode_text(text)["g"], m.encode_text(changed)["g"])


def small_resnet_tower() -> FrozenTower:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():                               # non-trivial BN statistics
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return FrozenTower(net, strip_classifier(net), 32, "test")


def test_vit_attention_equals_torchvision_multihead_attention():
    """f's ViT blocks swap nn.MultiheadAttention's forward for the fused batch-first one; the
    reference is torchvision's own module with the same weights: same outputs and gradients in
    train mode, and the same state_dict keys (so torchvision weights still load)."""
    torch.manual_seed(0)
    net = build_image_tower("vit-micro", 32, 8)
    ref = build_image_tower("vit-micro", 32, 8)
    for block in ref.encoder.layers:       # torchvision's own module around the same tensors
        fused = block.self_attention
        block.self_attention = nn.MultiheadAttention(32, fused.num_heads, batch_first=True)
    ref.load_state_dict(net.state_dict())
    assert isinstance(net.encoder.layers[0].self_attention, model_lib.ViTSelfAttention)
    image = torch.randn(3, 3, 32, 32)
    out, out_ref = net(image), ref(image)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (out_ref * weight).sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="self-attention"):
        net.encoder.layers[0].self_attention(image.new_zeros(1, 4, 32), image.new_zeros(1, 4, 32),
                                             image.new_zeros(1, 4, 32))
    with pytest.raises(ValueError, match="without dropout"):
        model_lib.ViTSelfAttention(nn.MultiheadAttention(32, 2, dropout=0.1, batch_first=True))


def test_small_vits_pool_the_mean_of_their_patch_tokens_and_train_every_parameter():
    """The small presets (MeanPooledViT): the encoder sees only the (S/patch)^2 patch tokens (no
    class token), the embedding is the head applied to their mean, and one backward reaches every
    parameter -- an unused one would stop DDP. The large presets keep torchvision's class token."""
    torch.manual_seed(0)
    net = build_image_tower("vit-micro", 32, 8)
    assert net.class_token is None and "class_token" not in net.state_dict()
    tokens = []
    net.encoder.ln.register_forward_hook(lambda module, inputs, out: tokens.append(out))
    image = torch.randn(3, 3, 32, 32)
    out = net(image)
    assert tokens[0].shape == (3, (32 // 8) ** 2, 32)
    torch.testing.assert_close(out, net.heads(tokens[0].mean(dim=1)))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    big = build_image_tower("vit-b/32", 64, 8)
    assert type(big) is torchvision.models.VisionTransformer and big.class_token.shape == (1, 1, 768)


def test_third_tower_unchanged_by_training_in_train_mode():
    tower3 = small_resnet_tower()
    model = ThreeTowers("3t", image_arch="vit-micro", image_size=32, text_arch="micro",
                        context_length=12, embed_dim=8, tower3_dim=tower3.dim)
    parent = nn.ModuleDict({"model": model, "tower3": tower3})
    parent.train()
    assert not tower3.training and not tower3.backbone.training
    before = {k: v.clone() for k, v in tower3.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        image, text, _ = tiny_batch(4, seed=step)
        image = torch.randn(4, 3, 32, 32)
        loss, _ = tower_loss(model(image, text, tower3(image)), "3t")
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tower3.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in tower3.parameters())
    frozen = {id(p) for p in tower3.parameters()}
    assert not any(id(p) in frozen for group in opt.param_groups for p in group["params"])
    assert model.h_f.weight.grad is not None                # ... while its heads did train


def test_lit_trains_only_the_text_side():
    model = tiny_model("lit")
    assert model.image is None
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"text", "log_temperature"}
    image, text, h = tiny_batch(5)
    tower_loss(model(None, text, h), "lit")[0].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tower3_from_torchvision_state_dict_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.get_model("mobilenet_v3_small", weights=None).eval()
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    tower3 = load_tower3(f"torchvision:mobilenet_v3_small:{path}")
    assert tower3.dim == reference.classifier[-1].in_features == 1024   # read from the model
    x = torch.randn(2, 3, 64, 64)
    reference.classifier[-1] = nn.Identity()
    torch.testing.assert_close(tower3(x), reference(x))
    assert tower3(x).shape == (2, tower3.dim)


def test_tower3_from_a_supervised_checkpoint(tmp_path):
    net = build_image_tower("vit-micro", 16, 5, bias=True)
    path = tmp_path / "sup.pt"
    torch.save({"classifier": {"arch": "vit-micro", "image_size": 16, "num_classes": 5},
                "model": net.state_dict()}, path)
    tower3 = load_tower3(str(path))
    assert (tower3.dim, tower3.image_size) == (32, 16)
    x = torch.randn(3, 3, 16, 16)
    net.eval()
    logits = net(x)
    torch.testing.assert_close(tower3(x) @ net.heads.weight.T + net.heads.bias, logits)


def test_tower3_from_an_older_preset_fails_clearly(tmp_path, monkeypatch):
    net = build_image_tower("vit-micro", 16, 5, bias=True)
    path = tmp_path / "sup.pt"
    torch.save({"classifier": {"arch": "vit-micro", "image_size": 16, "num_classes": 5},
                "model": net.state_dict()}, path)
    monkeypatch.setitem(model_lib.VIT_PRESETS, "vit-micro", (8, 32, 1, 2, (), "mean"))  # as if the stem were new
    with pytest.raises(ValueError, match="do not fit vit-micro"):
        load_tower3(str(path))


def test_tower3_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_tower3(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown torchvision architecture 'resnet9000'"):
        load_tower3("torchvision:resnet9000:IMAGENET1K_V1")
    with pytest.raises(ValueError, match="no weights 'BOGUS'"):
        load_tower3("torchvision:resnet18:BOGUS")
    torch.save({"just": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a `train.py --mode supervised` checkpoint"):
        load_tower3(str(tmp_path / "other.pt"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(model_lib.torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match=r"resnet18-f37072fd\.pth into .*checkpoints"):
        load_tower3("torchvision:resnet18:IMAGENET1K_V1")


def test_summary_counts_trainable_and_frozen():
    tower3 = small_resnet_tower()
    model = ThreeTowers("3t", image_arch="vit-micro", image_size=32, text_arch="micro",
                        context_length=12, embed_dim=8, tower3_dim=tower3.dim)
    text = summary(model, tower3)
    trainable = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in tower3.parameters())
    assert f"{trainable:,}" in text and f"{frozen:,}" in text
    for part in ("image", "text", "f_h", "g_h", "h_f", "h_g", "log_temperature"):
        assert part in text


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown mode 'foo'"):
        ThreeTowers("foo")
    with pytest.raises(ValueError, match="needs the third tower"):
        ThreeTowers("3t")
    with pytest.raises(ValueError, match="unknown image architecture"):
        build_image_tower("vit-huge-9", 64, 8)


def test_conv_towers_run_channels_last_and_equal_the_plain_layout():
    """model.ConvTower hands its convolutions NHWC input (the faster oneDNN path on a CPU): same
    weights, same outputs and gradients as the plain NCHW run, to float rounding."""
    from model import ConvTower, build_image_tower
    torch.manual_seed(0)
    net = build_image_tower("cnn-tiny", 32, 16)                    # float32: the oneDNN kernels run
    assert isinstance(net, ConvTower)
    seen = []
    net[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(6, 3, 32, 32)
    out = net(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    plain = torch.nn.Sequential.forward(net, x)
    plain.square().sum().backward()
    assert seen == [True, False]
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
