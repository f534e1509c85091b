"""vitkern.models.ViT: the seed's d2l ViT (chapter 11.8) on vitkern's fused ops.

* vit_reference_forward (the chapter's code in plain PyTorch) equals the model with
  backend="torch" in float64 (so the model's structure is d2l's), and the model with
  backend="triton" in float32 (Triton's interpreter on CPU) matches it: output and the
  gradient of the input and of every parameter, for both pool modes.
* the chapter's shapes (96x96 images, patch 16 -> 36 patches + CLS), d2l's initialisation
  and state_dict keys, a few training steps that lower the loss, bad arguments.
"""

import pytest
import torch
from torch import nn

from helpers import assert_close
from vitkern import ops
from vitkern.models import ViT, vit_reference_forward
from vitkern.testing import poison_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIGH = torch.float32 if DEVICE.type == "cuda" else torch.float64

# A tiny ViT: 32x32 images, patch 8 -> 16 patches + CLS = 17 tokens, width 32, 2 heads, 2 blocks.
TINY = dict(img_size=32, patch_size=8, num_hiddens=32, mlp_num_hiddens=64, num_heads=2, num_blks=2,
            emb_dropout=0.1, blk_dropout=0.1)


# ----------------------------------------------------------------------------- helpers
def _randomise(model: nn.Module) -> None:
    """Every parameter random (cls_token starts at zero, LayerNorm at 1/0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 0.05)


def _build(backend, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ViT(**{**TINY, **kwargs}, backend=backend).to(DEVICE, dtype)


def _run(fn, model, x, grad):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = fn(model, x)
    out.backward(grad.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({f"param {n.removeprefix('_orig_mod.')}": p.grad for n, p in model.named_parameters()})
    return out, grads


def _model_forward(model, x):
    return model(x)


def _images(batch, kwargs, dtype=HIGH):
    img = kwargs.get("img_size", TINY["img_size"])
    h, w = (img, img) if isinstance(img, int) else img
    return torch.randn(batch, kwargs.get("in_chans", 3), h, w, dtype=dtype, device=DEVICE)


PARITY_CASES = [
    pytest.param(dict(pool="cls"), 2, id="cls"),
    pytest.param(dict(pool="mean", use_bias=True, img_size=(32, 24), num_classes=7), 2, id="mean-bias-nonsquare"),
    pytest.param(dict(pool="cls", use_bias=True, in_chans=1, patch_size=(8, 4), num_heads=4, num_blks=1), 1,
                 id="cls-1chan-rectpatch-h4-b1"),
]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kwargs,batch", PARITY_CASES)
def test_torch_backend_is_the_chapters_code(kwargs, batch):
    """backend="torch" in float64 == vit_reference_forward (d2l's code) to rounding: the model's
    structure (concatenated W_q/W_k/W_v, pre-norm residuals, pooling) is d2l's."""
    model = _build("torch", HIGH, **kwargs).eval()
    _randomise(model)
    x = _images(batch, kwargs)
    grad = torch.randn(batch, model.num_classes, dtype=HIGH, device=DEVICE)
    out_ref, g_ref = _run(vit_reference_forward, model, x, grad)
    out, g = _run(_model_forward, model, x, grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kwargs,batch", PARITY_CASES)
def test_triton_matches_reference(kwargs, batch):
    """backend="triton" in float32 vs the chapter's code in float64 (same weights): output and
    every gradient (image, conv, cls_token, pos_embedding, W_q/W_k/W_v/W_o, LayerNorms, MLP, head)."""
    ref = _build("torch", HIGH, **kwargs).eval()
    _randomise(ref)
    model = _build("triton", torch.float32, **kwargs).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = _images(batch, kwargs)
    grad = torch.randn(batch, ref.num_classes, dtype=HIGH, device=DEVICE)
    out_ref, g_ref = _run(vit_reference_forward, ref, x, grad)
    with poison_outputs():
        out, g = _run(_model_forward, model, x.float(), grad)
    assert out.dtype == torch.float32 and out.shape == (batch, ref.num_classes)
    assert_close("logits", out, out_ref)
    _assert_grads_close(g, g_ref)


def _assert_grads_close(g, g_ref):
    """Every gradient within tolerance. W_k.bias's gradient is zero in exact arithmetic (it adds
    q·b to a whole row of scores, which the softmax cancels): it must be ~0 next to the largest."""
    assert g.keys() == g_ref.keys()
    scale = max(gr.double().norm().item() for gr in g_ref.values())
    for name, gr in g_ref.items():
        assert g[name] is not None, f"{name}: no gradient"
        if name.endswith("attention.W_k.bias"):
            assert gr.double().norm().item() <= 1e-12 * scale, f"{name}: the reference gradient is not ~0"
            err = g[name].double().norm().item() / scale
            assert err <= 1e-5, f"grad {name}: should be ~0, norm {err:.3e} of the largest gradient's"
            continue
        assert_close(f"grad {name}", g[name], gr, grad=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kwargs", [pytest.param(dict(pool="cls"), id="cls"),
                                    pytest.param(dict(pool="mean", num_blks=0, use_bias=True), id="mean-no-blocks")])
def test_empty_batch_gives_empty_logits_and_zero_gradients(kwargs, backend):
    """As timm's ViT: a batch of 0 gives (0, num_classes) logits; the image gradient is empty and
    every parameter's gradient is zero (the chapter's code gives the same)."""
    ref = _build("torch", HIGH, **kwargs).eval()
    _randomise(ref)
    model = _build(backend, torch.float32, **kwargs).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = _images(0, kwargs)
    grad = torch.randn(0, ref.num_classes, dtype=HIGH, device=DEVICE)
    out_ref, g_ref = _run(vit_reference_forward, ref, x, grad)
    with poison_outputs():
        out, g = _run(_model_forward, model, x.float(), grad)
    assert out.shape == out_ref.shape == (0, ref.num_classes) and out.dtype == torch.float32
    assert g.keys() == g_ref.keys()
    for name, gr in g_ref.items():
        assert g[name] is not None and g[name].shape == gr.shape, name
        assert torch.equal(g[name], gr.float()), name


def test_uses_one_fused_patch_embed_and_packed_attention(monkeypatch):
    """The stem is ONE patch_embed call with the CLS token and the position embedding; every block
    calls attention_packed on a (B, N, 3D) tensor with scale 1/sqrt(D/h)."""
    calls = []
    real_pe, real_attn = ops.patch_embed, ops.attention_packed

    def pe(x, w, b=None, **kw):
        calls.append(("patch_embed", kw))
        return real_pe(x, w, b, **kw)

    def attn(qkv, h, **kw):
        calls.append(("attention_packed", dict(kw, shape=tuple(qkv.shape), heads=h)))
        return real_attn(qkv, h, **kw)

    monkeypatch.setattr(ops, "patch_embed", pe)
    monkeypatch.setattr(ops, "attention_packed", attn)
    model = _build("torch", torch.float32, num_heads=4)
    model.eval()(_images(2, {}, torch.float32))
    assert [c[0] for c in calls] == ["patch_embed", "attention_packed", "attention_packed"]
    assert calls[0][1]["cls_token"] is model.cls_token and calls[0][1]["pos_embed"] is model.pos_embedding
    for _, kw in calls[1:]:
        assert kw["shape"] == (2, 17, 96) and kw["heads"] == 4
        assert kw["scale"] == pytest.approx(8 ** -0.5) and kw["dropout_p"] == 0.0
    calls.clear()
    model.train()(_images(2, {}, torch.float32))
    assert all(kw["dropout_p"] == 0.1 for _, kw in calls[1:])  # blk_dropout on the attention weights


# ----------------------------------------------------------------------------- d2l's model
def test_chapter_shapes_and_initialisation():
    """The chapter's configuration: 96x96, patch 16 -> 36 patches (+ CLS), 512 wide, 8 heads, 2 blocks."""
    torch.manual_seed(0)
    model = ViT(96, 16, 512, 2048, 8, 2, 0.1, 0.1, backend="torch")
    assert model.lr == 0.1 and model.pool == "cls" and model.num_classes == 10
    assert model.patch_embedding.num_patches == 36
    assert model.pos_embedding.shape == (1, 37, 512) and model.cls_token.shape == (1, 1, 512)
    assert torch.all(model.cls_token == 0)  # zeros, as d2l
    pos = model.pos_embedding.detach()
    assert abs(pos.mean().item()) < 0.05 and 0.95 < pos.std().item() < 1.05  # torch.randn, as d2l
    assert model.patch_embedding.conv.weight.shape == (512, 3, 16, 16)
    assert model.patch_embedding.conv.bias is not None
    blk = model.blks[0]
    assert [blk.attention.W_q.bias, blk.attention.W_o.bias] == [None, None]  # use_bias=False
    assert blk.mlp.dense1.weight.shape == (2048, 512) and blk.mlp.dense1.bias is not None
    # d2l's module tree -> d2l's state_dict keys
    keys = list(model.state_dict())
    assert keys[:4] == ["cls_token", "pos_embedding", "patch_embedding.conv.weight", "patch_embedding.conv.bias"]
    assert keys[4:14] == [f"blks.0.{k}" for k in ["ln1.weight", "ln1.bias", "attention.W_q.weight",
                                                 "attention.W_k.weight", "attention.W_v.weight",
                                                 "attention.W_o.weight", "ln2.weight", "ln2.bias",
                                                 "mlp.dense1.weight", "mlp.dense1.bias"]]
    assert keys[-4:] == ["head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"]
    D, M, P = 512, 2048, 16
    per_block = 2 * 2 * D + 4 * D * D + (D * M + M) + (M * D + D)
    expected = (3 * P * P * D + D) + D + 37 * D + 2 * per_block + 2 * D + (D * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected

    x = torch.randn(2, 3, 96, 96)
    # d2l's PatchEmbedding check: (batch, (96/16)^2, 512) patch tokens, = Conv2d -> flatten -> transpose
    conv = model.patch_embedding.conv
    torch.testing.assert_close(model.patch_embedding(x), conv(x).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert model.patch_embedding(x).shape == (2, 36, 512)
    model.eval()
    assert model.forward_features(x).shape == (2, 37, 512)
    out = model(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, vit_reference_forward(model, x), rtol=1e-5, atol=1e-5)
    # Fashion-MNIST (the chapter's data) is 1-channel: in_chans=1 (d2l's LazyConv2d infers it)
    fm = ViT(96, 16, 512, 2048, 8, 2, 0.1, 0.1, in_chans=1, backend="torch").eval()
    assert fm(torch.randn(1, 1, 96, 96)).shape == (1, 10)


def test_chapter_shapes_triton_forward():
    """The chapter's shapes through the Triton kernels (interpreter on CPU): 37 tokens, head dim 64."""
    ref = ViT(96, 16, 512, 2048, 8, 2, 0.1, 0.1, backend="torch").to(DEVICE, HIGH).eval()
    _randomise(ref)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.2)  # keep the 512-wide activations O(1)
    model = ViT(96, 16, 512, 2048, 8, 2, 0.1, 0.1, backend="triton").to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 96, 96, dtype=HIGH, device=DEVICE)
    with torch.no_grad(), poison_outputs():
        assert_close("logits", model(x.float()), vit_reference_forward(ref, x))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pooling(pool):
    """cls: head(LN(CLS output)); mean: head(LN(mean of the patch outputs)), CLS kept in the sequence."""
    model = _build("torch", HIGH, pool=pool).eval()
    _randomise(model)
    x = _images(2, {})
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 32)
    pooled = feats[:, 0] if pool == "cls" else feats[:, 1:].mean(dim=1)
    torch.testing.assert_close(model(x), model.head(pooled), rtol=0, atol=0)
    # The CLS token is in the sequence in both modes: changing it changes the mean-pooled logits too.
    before = model(x)
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))  # not a constant: LayerNorm would cancel it
    assert not torch.allclose(model(x), before)
    # The same weights serve both pool modes.
    other = _build("torch", HIGH, pool="mean" if pool == "cls" else "cls")
    other.load_state_dict(model.state_dict(), strict=True)


# ----------------------------------------------------------------------------- training
def _train(backend, pool, steps, batch=8, dtype=torch.float32, optimizer="adam", **kwargs):
    model = _build(backend, dtype, seed=0, pool=pool, **kwargs).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(DEVICE, dtype)
    y = torch.randint(0, 10, (batch,), generator=gen).to(DEVICE)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:  # SGD: the update is linear in the gradient, so two backends' runs stay comparable
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(2)  # dropout draws
    losses = []
    for _ in range(steps):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_training_lowers_the_loss(pool):
    """Adam on one synthetic batch (8 images 32x32, patch 8, 2 blocks, width 32, 2 heads, dropout 0.1):
    the loss goes down, deterministically. backend="torch" here (the interpreter is slow for many steps;
    the Triton backend trains in test_training_triton)."""
    losses, _ = _train("torch", pool, steps=12)
    assert losses[-1] < 0.6 * losses[0], losses
    again, _ = _train("torch", pool, steps=12)
    assert again == losses


def test_training_triton():
    """Three Adam steps through the Triton kernels (dropout on, interpreter on CPU) lower the loss;
    SGD steps without dropout (dropout draws differ between backends) follow the torch backend's
    float64 run: same losses, same parameters after the steps."""
    losses, model = _train("triton", "mean", steps=3, batch=4)
    assert losses[2] < losses[1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    no_drop = dict(emb_dropout=0.0, blk_dropout=0.0, optimizer="sgd")
    tri, m_tri = _train("triton", "cls", steps=2, batch=4, **no_drop)
    ref, m_ref = _train("torch", "cls", steps=2, batch=4, dtype=HIGH, **no_drop)
    assert tri[1] < tri[0]
    torch.testing.assert_close(torch.tensor(tri, dtype=HIGH), torch.tensor(ref, dtype=HIGH), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(m_tri.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-4, atol=1e-5, msg=name)


def test_configure_optimizers_is_sgd_with_lr():
    model = ViT(**TINY, lr=0.05, backend="torch")
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.05
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("backend,dtype", [("torch", HIGH), ("triton", torch.float32)])
def test_dropout_train_vs_eval(backend, dtype):
    model = _build(backend, dtype).train()
    x = _images(2, {}, dtype)
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    b = model(x)
    assert torch.equal(a, b)  # reproducible under the seed
    model.eval()
    e = model(x)
    assert not torch.allclose(a, e)
    torch.testing.assert_close(e, vit_reference_forward(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_dropout_placement_equals_the_chapters_code(pool):
    """Training mode, backend="torch": every dropout (embedding, attention weights, both MLP ones)
    draws from torch's generator in d2l's order, so the chapter's code under the same seed gives the
    same output and gradients - a missing, extra or misplaced dropout changes them."""
    model = _build("torch", HIGH, pool=pool, emb_dropout=0.2, blk_dropout=0.3).train()
    _randomise(model)
    x = _images(2, {})
    grad = torch.randn(2, 10, dtype=HIGH, device=DEVICE)
    torch.manual_seed(9)
    out_ref, g_ref = _run(vit_reference_forward, model, x, grad)
    torch.manual_seed(9)
    out, g = _run(_model_forward, model, x, grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    model.eval()
    assert not torch.allclose(model(x), out)


# ----------------------------------------------------------------------------- bad arguments
def test_bad_arguments():
    with pytest.raises(ValueError, match=r"pool must be one of \('cls', 'mean'\), got 'max'"):
        ViT(**TINY, pool="max")
    with pytest.raises(ValueError, match=r"img_size=\(30, 30\) must be divisible by patch_size=\(8, 8\)"):
        ViT(**{**TINY, "img_size": 30})
    with pytest.raises(ValueError, match=r"img_size=\(32, 20\) must be divisible by patch_size=\(8, 8\)"):
        ViT(**{**TINY, "img_size": (32, 20)})
    with pytest.raises(ValueError, match="num_hiddens=30 must be divisible by num_heads=4"):
        ViT(**{**TINY, "num_hiddens": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        ViT(**{**TINY, "patch_size": 0})
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        ViT(**{**TINY, "num_heads": 0})
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'xla'"):
        ViT(**TINY, backend="xla")
    model = ViT(**TINY, backend="torch")
    expected = r"X must be \(B, in_chans, H, W\) = \(B, 3, 32, 32\).*got shape \(2, 3, 32, 24\)"
    with pytest.raises(ValueError, match=expected):
        model(torch.randn(2, 3, 32, 24))
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))


# ----------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_matches_eager():
    model = _build("triton", torch.float32, num_blks=1, pool="mean").eval()
    _randomise(model)
    x = _images(1, {}, torch.float32)
    grad = torch.randn(1, 10, device=DEVICE)
    out_eager, g_eager = _run(_model_forward, model, x, grad)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c, g_c = _run(_model_forward, compiled, x, grad)
    torch.testing.assert_close(out_c, out_eager, rtol=1e-6, atol=1e-6)
    assert g_c.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_c[name], g_eager[name], rtol=1e-6, atol=1e-6, msg=name)
