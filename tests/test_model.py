"""The towers: shapes of each mode, the frozen third tower, loading it offline, temperatures."""
import math
import types
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import data
import model as model_lib
import runtime
from losses import tower_loss
from model import FrozenTower, ThreeTowers, build_image_tower, summary
from checkpoints import load_tower3, strip_classifier
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
    strip_classifier(net)
    return FrozenTower(net, data.View(crop=32, resize=32), "test")


@pytest.mark.parametrize("causal", [True, False])
def test_block_attention_equals_nn_multihead_attention(causal):
    """Block's attention (one q/k/v matmul, one fused scaled_dot_product_attention call) against
    PyTorch's nn.MultiheadAttention holding the same weights, with the same mask: the block's
    output and the gradients of its input and of the q/k/v and output projections."""
    torch.manual_seed(0)
    block = model_lib.Block(32, 4, causal=causal)
    attention = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        for a, b in ((attention.in_proj_weight, block.qkv.weight), (attention.in_proj_bias, block.qkv.bias),
                     (attention.out_proj.weight, block.out.weight), (attention.out_proj.bias, block.out.bias)):
            a.copy_(b)
    mask = nn.Transformer.generate_square_subsequent_mask(7) if causal else None

    def reference(x):
        y = block.ln_1(x)
        x = x + attention(y, y, y, attn_mask=mask, need_weights=False)[0]
        return x + block.mlp(block.ln_2(x))

    x, weight = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    results = []
    for forward, params in ((block, [block.qkv, block.out]), (reference, None)):
        x_ = x.clone().requires_grad_(True)
        out = forward(x_)
        (out * weight).sum().backward()
        params = params or [attention, attention.out_proj]
        weights = [getattr(p, "in_proj_weight", getattr(p, "weight", None)) for p in params]
        results.append([out.detach(), x_.grad] + [w.grad for w in weights])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_shared_block_is_causal_for_text_and_not_for_images():
    """One Block class in both towers: in g a later token cannot change an earlier position's
    output; in f every patch sees every other."""
    torch.manual_seed(0)
    model = tiny_model("clip")
    assert type(model.text.blocks[0]) is type(model.image.blocks[0]) is model_lib.Block
    assert model.text.blocks[0].causal and not model.image.blocks[0].causal
    x = torch.randn(2, 6, 32)
    later = x.clone()
    later[:, 4] = torch.randn(2, 32)                           # change position 4 only
    for causal in (True, False):
        block = model_lib.Block(32, 2, causal=causal)
        y, y_later = block(x), block(later)
        if causal:
            torch.testing.assert_close(y[:, :4], y_later[:, :4], rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(y[:, :4], y_later[:, :4], atol=1e-3)
        assert not torch.allclose(y[:, 4:], y_later[:, 4:], atol=1e-3)


@pytest.mark.parametrize("pool", ["mean", "token"])
def test_vit_sees_where_each_patch_is(pool):
    """The ViT on 4 x 4 patches of 8 px (patchify convolution, no stem): one (out_dim,) embedding
    per image with either pooling; shuffling an image's patches changes it through the position
    embeddings alone -- with them zeroed, attention without a mask and either pooling are blind
    to patch order, so the same embedding comes out."""
    torch.manual_seed(0)
    net = model_lib.ViT(32, 8, 32, 2, 2, (), pool, out_dim=8)
    assert (net.class_token is not None) == (pool == "token")
    assert net.positional_embedding.shape == (16 + (pool == "token"), 32)
    x = torch.randn(3, 3, 32, 32)
    grid = x.view(3, 3, 4, 8, 4, 8).permute(0, 1, 2, 4, 3, 5).reshape(3, 3, 16, 8, 8)   # (B, C, patch, 8, 8)
    shuffled = grid[:, :, torch.randperm(16)].view(3, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(3, 3, 32, 32)
    out = net(x)
    assert out.shape == (3, 8)
    assert not torch.allclose(net(shuffled), out, atol=1e-3)
    with torch.no_grad():
        net.positional_embedding.zero_()
    torch.testing.assert_close(net(shuffled), net(x), rtol=1e-5, atol=1e-5)


def test_small_vits_pool_the_mean_of_their_patch_tokens_and_train_every_parameter():
    """The small presets: a conv stem (GroupNorm, ReLU, 1x1 projection), then only the
    (S/patch)^2 patch tokens (no class token), the embedding is the head applied to their mean,
    and one backward reaches every parameter -- an unused one would stop DDP. The large presets
    read a class token. Position embeddings and the class token take no weight decay (their
    names say so to train.build_optimizer)."""
    import argparse
    import train
    torch.manual_seed(0)
    net = build_image_tower("vit-micro", 32, 8)
    assert net.class_token is None and "class_token" not in net.state_dict()
    assert [type(m) for m in net.patchify] == [nn.Conv2d, nn.GroupNorm, nn.ReLU] * 3 + [nn.Conv2d]
    tokens = []
    net.ln_final.register_forward_hook(lambda module, inputs, out: tokens.append(out))
    image = torch.randn(3, 3, 32, 32)
    out = net(image)
    assert tokens[0].shape == (3, (32 // 8) ** 2, 32)
    torch.testing.assert_close(out, net.head(tokens[0].mean(dim=1)))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    big = build_image_tower("vit-b/32", 64, 8)
    assert big.class_token.shape == (1, 1, 768) and big.positional_embedding.shape == (5, 768)
    optimizer = train.build_optimizer(big, argparse.Namespace(lr=1e-3, wd=0.1, beta2=0.98))
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert id(big.class_token) in no_decay and id(big.positional_embedding) in no_decay
    assert id(big.head.weight) not in no_decay and id(big.blocks[0].qkv.weight) not in no_decay


@pytest.mark.parametrize("arch", ["vit-micro", "vit-b/32"])
def test_the_residual_stream_is_contiguous_in_every_block(arch):
    """Each residual sum x + ... takes x's memory layout. The patch tokens come out of the patchify
    convolution transposed, (B, W, N) -> (B, N, W); left so, every block's input, residual add
    and LayerNorm ran on a strided tensor (an extra copy per norm: ~3 % of a vit-small step,
    results/README.md). Both towers' blocks must see row-major (B, L, W) input."""
    torch.manual_seed(0)
    model = ThreeTowers("clip", image_arch=arch, image_size=64, text_arch="micro", embed_dim=8)
    seen = []
    for block in (*model.image.blocks, *model.text.blocks):
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    model(torch.randn(2, 3, 64, 64), torch.randint(0, 256, (2, 6)))
    assert len(seen) == len(model.image.blocks) + len(model.text.blocks) and all(seen), seen


def test_vit_starts_from_torchvision_s_init_and_the_text_tower_from_pytorch_s_defaults():
    """The shared Block, initialised per tower: the ViT's q/k/v and MLP weights Xavier-uniform
    (their largest entry near sqrt(6 / (fan_in + fan_out))) and zero biases, position embeddings
    std 0.02; the text tower's linears PyTorch's U(+-1/sqrt(fan_in)), biases included."""
    torch.manual_seed(0)
    vit, text = build_image_tower("vit-tiny", 32, 8), tiny_model("clip").text
    for block in vit.blocks:
        for layer in (block.qkv, block.mlp[0], block.mlp[2]):
            bound = math.sqrt(6 / sum(layer.weight.shape))
            assert 0.95 * bound < layer.weight.abs().max() <= bound
        assert all(not layer.bias.any() for layer in (block.qkv, block.out, block.mlp[0], block.mlp[2]))
    assert vit.positional_embedding.std().item() == pytest.approx(0.02, rel=0.1)
    for layer in (text.blocks[0].qkv, text.blocks[0].mlp[2]):
        bound = layer.in_features ** -0.5
        assert 0.95 * bound < layer.weight.abs().max() <= bound and layer.bias.any()


def test_default_towers_keep_their_state_dict_layout():
    """The default towers (cnn-tiny + mini text) and the heads: the same state_dict names and
    shapes as before the towers were rewritten, so their checkpoints still load."""
    m = ThreeTowers("3t", image_arch="cnn-tiny", image_size=32, text_arch="mini", vocab_size=300,
                    context_length=40, embed_dim=24, tower3_dim=20)
    want = {}
    for i, (c_in, c) in enumerate(zip((3, 16, 32, 32, 64), (16, 32, 32, 64, 128))):
        want[f"image.{3 * i}.weight"] = (c, c_in, 3, 3)
        want.update({f"image.{3 * i + 1}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})
        want[f"image.{3 * i + 1}.num_batches_tracked"] = ()
    want["image.17.weight"] = (24, 128)
    want.update({"text.token_embedding.weight": (300, 64), "text.positional_embedding": (40, 64),
                 "text.ln_final.weight": (64,), "text.ln_final.bias": (64,), "text.proj.weight": (24, 64)})
    for i in range(2):
        block = {"ln_1.weight": (64,), "ln_1.bias": (64,), "ln_2.weight": (64,), "ln_2.bias": (64,),
                 "qkv.weight": (192, 64), "qkv.bias": (192,), "out.weight": (64, 64), "out.bias": (64,),
                 "mlp.0.weight": (256, 64), "mlp.0.bias": (256,), "mlp.2.weight": (64, 256), "mlp.2.bias": (64,)}
        want.update({f"text.blocks.{i}.{k}": shape for k, shape in block.items()})
    want.update({"f_h.weight": (24, 24), "g_h.weight": (24, 24), "h_f.weight": (24, 20), "h_g.weight": (24, 20)})
    want.update({f"log_temperature.{t}": () for t in ("fg", "fh", "gh")})
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want


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
    assert (tower3.dim, tower3.view.crop, tower3.view.resize) == (32, 16, 16)
    x = torch.randn(3, 3, 16, 16)
    net.eval()
    logits = net(x)
    torch.testing.assert_close(tower3(x) @ net.head.weight.T + net.head.bias, logits)


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
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)     # float rounding of ~1e-3 grads


# ---------------------------------------------------------------- runtime's oneDNN linears on a built model
needs_onednn = pytest.mark.skipif(not runtime.ONEDNN_OP, reason="this PyTorch has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape,bias,transposed", [((7, 12), True, False), ((3, 5, 12), True, True),
                                                    ((4, 12), False, False), ((12,), True, False)])
def test_linear_equals_nn_linear_forward_and_gradients(shape, bias, transposed, monkeypatch):
    """runtime.linear (oneDNN on the CPU in float32) computes F.linear: output and the gradients of
    input, weight and bias agree to float rounding, for 1-d, 2-d and 3-d, strided input, with and
    without a bias. Each is checked against a float64 F.linear, an independent reference."""
    monkeypatch.setattr(runtime, "ONEDNN_MIN_MACS", 0)                 # these shapes are far below it
    torch.manual_seed(0)
    x = torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2) if transposed else torch.randn(*shape)
    x.requires_grad_(True)
    w = torch.randn(9, 12, requires_grad=True)
    b = torch.randn(9, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 9)
    out = runtime.linear(x, w, b)
    out.backward(grad)
    leaves = [x, w] + ([b] if bias else [])
    got = [out.detach()] + [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = torch.nn.functional.linear(*ref_leaves, *([] if bias else [None]))
    ref.backward(grad.double())
    for g, r in zip(got, [ref.detach()] + [t.grad for t in ref_leaves]):
        assert g.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    assert out.grad_fn.name() == "_OneDNNLinearBackward"      # the oneDNN path ran, not F.linear


@needs_onednn
def test_linear_takes_the_oneDNN_path_only_where_it_should(monkeypatch):
    """float64, no-grad and empty inputs: the same values as F.linear (float64 exactly: F.linear
    itself runs); only float32 with a gradient builds the custom backward, and only from
    ONEDNN_MIN_MACS multiply-adds up."""
    torch.manual_seed(0)
    small = runtime.linear(torch.randn(4, 6, requires_grad=True), torch.randn(3, 6))
    assert small.grad_fn.name() != "_OneDNNLinearBackward"                # 72 multiply-adds: F.linear
    monkeypatch.setattr(runtime, "ONEDNN_MIN_MACS", 0)
    x, w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(runtime.linear(x, w), torch.nn.functional.linear(x, w))
    with torch.no_grad():
        x32, w32 = torch.randn(4, 6), torch.randn(3, 6)
        out = runtime.linear(x32, w32)
        assert out.grad_fn is None
        torch.testing.assert_close(out, torch.nn.functional.linear(x32, w32))
    assert runtime.linear(torch.randn(0, 6), torch.randn(3, 6, requires_grad=True)).shape == (0, 3)
    w_only, x_plain = torch.randn(3, 6, requires_grad=True), torch.randn(4, 6)    # no input gradient (a head on h)
    runtime.linear(x_plain, w_only).sum().backward()
    torch.testing.assert_close(w_only.grad, x_plain.sum(0).expand(3, 6))


def test_cpu_kernels_switch_linears_only_on_a_cpu_with_avx512(monkeypatch):
    """oneDNN's matmul beats MKL's only where MKL leaves AVX-512 unused; on an AVX2-only CPU (MKL's
    widest kernel there) the built model keeps nn.Linear, as it does on CUDA. runtime.wrap applies
    cpu_kernels to the model it wraps, following this CPU's capability."""
    for capability, onednn in (("AVX512", True), ("AVX2", False), ("DEFAULT", False), ("SVE256", False)):
        assert runtime.prefers_onednn(capability) is onednn, capability
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def switched(m):
        return any(type(x) is runtime.OneDNNLinear for x in m.modules())

    here = runtime.ONEDNN_OP and runtime.prefers_onednn(torch.backends.cpu.get_cpu_capability())
    env = types.SimpleNamespace(device=cpu, world=1)
    assert switched(runtime.wrap(tiny_model("clip"), types.SimpleNamespace(compile=False), env)) == here
    for capability, device, want in (("AVX512", cpu, runtime.ONEDNN_OP), ("AVX2", cpu, False), ("AVX512", cuda, False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert switched(runtime.cpu_kernels(tiny_model("3t"), device)) == want, (capability, device)


@needs_onednn
def test_every_linear_of_a_built_tower_becomes_onednn_with_state_dicts_unchanged():
    """use_onednn_linears switches the class of every nn.Linear of a built model -- the ViT's fused
    q/k/v and output projections and MLPs, ResNet's fc, the text blocks and heads -- to
    runtime.OneDNNLinear; state_dict names and values stay those of the plain build, and outputs
    agree with it to float rounding."""
    for arch in ("vit-micro", "resnet18", "cnn-tiny"):
        torch.manual_seed(0)
        plain = build_image_tower(arch, 32, 8).eval()
        torch.manual_seed(0)
        net = runtime.use_onednn_linears(build_image_tower(arch, 32, 8).eval())
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is runtime.OneDNNLinear for m in linears), arch
        assert list(plain.state_dict()) == list(net.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), net.state_dict().values()))
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-5)
    m = runtime.use_onednn_linears(tiny_model("3t"))
    assert all(type(x) is runtime.OneDNNLinear for x in m.modules() if isinstance(x, nn.Linear))


@needs_onednn
@pytest.mark.parametrize("mode", ["clip", "lit", "3t"])
def test_a_training_step_through_onednn_equals_the_f_linear_step(mode, monkeypatch):
    """The whole model with every linear switched to oneDNN (threshold 0) against the same plain
    model (F.linear throughout): the same loss and every parameter's gradient, to float rounding
    -- the ViT's q/k/v and output projections, MLPs, text blocks and heads alike."""
    from losses import default_weights

    def loss_and_grads(m):
        loss = tower_loss(m(*tiny_batch(6)), mode, default_weights(mode))[0]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(tiny_model(mode))
    monkeypatch.setattr(runtime, "ONEDNN_MIN_MACS", 0)
    seen = []
    monkeypatch.setattr(runtime._OneDNNLinear, "backward", _counting(runtime._OneDNNLinear.backward, seen))
    loss, grads = loss_and_grads(runtime.use_onednn_linears(tiny_model(mode)))
    assert seen, "no linear took the oneDNN path"
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def _counting(backward, seen: list):
    def wrapped(ctx, grad):
        seen.append(grad.shape)
        return backward(ctx, grad)
    return staticmethod(wrapped)
