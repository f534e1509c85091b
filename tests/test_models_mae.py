"""vitkern.models.MaskedAutoencoderViT (MAE) against vitkern.reference.MaskedAutoencoderViTReference.

* Same weights (the reference's state_dict, loaded strictly), same noise: loss, prediction, mask and
  the gradient of the image and of every trainable parameter (random upstream gradients on the
  loss and on the prediction), float64 with backend="torch"; float32 with backend="triton"
  (Triton's interpreter on CPU) against the float64 reference. Odd K, K = N (mask_ratio 0), K = 1,
  batch 1, non-square images and rectangular patches, one input channel, norm_pix_loss on and off.
* The decoder's one-gather un-shuffle against the cat / gather / cat it replaces, the masking,
  patchify and sin-cos helpers against their definitions, the three constructors' shapes on the
  meta device, bad input, and planted bugs that the comparison must catch.
"""
from functools import partial

import pytest
import torch
from torch import nn

from helpers import assert_close
from vitkern import backends
from vitkern.models import MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16
from vitkern.models import mae as mae_module
from vitkern.reference import (MaskedAutoencoderViTReference, mae_len_keep, mae_masking, mae_patchify,
                               mae_sincos_pos_embed, mae_unpatchify)
from vitkern.testing import randomise_parameters

pytest.importorskip("timm")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HIGH = torch.float32 if DEVICE.type == "cuda" else torch.float64

# 32x32 images, patch 8 -> 16 patches; width 32 (2 heads, 2 blocks), decoder 16 wide (2 heads, 1 block).
TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_layer=partial(nn.LayerNorm, eps=1e-6))


# ----------------------------------------------------------------------------- helpers
def _pair(backend, dtype=HIGH, **kwargs):
    """(vitkern model in ``dtype``, reference in HIGH) with the same random weights: the reference's
    state_dict loaded strictly into the model."""
    cfg = {**TINY, **kwargs}
    ref = MaskedAutoencoderViTReference(**cfg).to(DEVICE, HIGH)
    randomise_parameters(ref)  # pos embeddings included: a wrong position row shows
    model = MaskedAutoencoderViT(**cfg, backend=backend).to(DEVICE, dtype)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def _inputs(model, batch, dtype=HIGH):
    h, w = model.img_size
    imgs = torch.randn(batch, model.in_chans, h, w, dtype=dtype, device=DEVICE)
    noise = torch.rand(batch, model.patch_embed.num_patches, device=DEVICE)
    return imgs, noise


def _run(model, imgs, noise, mask_ratio, grad_loss, grad_pred):
    """loss, pred, mask and the gradients of the image and of every trainable parameter."""
    imgs = imgs.detach().clone().requires_grad_(True)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    outs, grads = [pred], [grad_pred.to(pred.dtype)]
    if not torch.isnan(loss):  # mask_ratio 0: nothing removed, the loss is 0/0
        outs.append(loss)
        grads.append(grad_loss.to(loss.dtype))
    got = torch.autograd.grad(outs, [imgs] + [p for _, p in named], grads, allow_unused=True)
    result = {"loss": loss.detach(), "pred": pred.detach(), "mask": mask, "dimgs": got[0]}
    result.update({f"d{n}": torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, got[1:])})
    return result


def _compare(model, ref, batch, mask_ratio, dtype=HIGH):
    imgs, noise = _inputs(model, batch)
    n = model.patch_embed.num_patches
    grad_loss = torch.randn((), dtype=HIGH, device=DEVICE)
    grad_pred = torch.randn(batch, n, ref.decoder_pred.out_features, dtype=HIGH, device=DEVICE)
    expected = _run(ref, imgs, noise, mask_ratio, grad_loss, grad_pred)
    got = _run(model, imgs.to(dtype), noise, mask_ratio, grad_loss, grad_pred)
    assert sorted(got) == sorted(expected)
    assert torch.equal(got["mask"].cpu(), expected["mask"].cpu().to(got["mask"].dtype)), "mask"
    assert got["mask"].sum().item() == batch * (n - mae_len_keep(n, mask_ratio))
    if mask_ratio == 0:
        assert torch.isnan(got["loss"]) and torch.isnan(expected["loss"]), "0/0 loss with nothing removed"
        del got["loss"], expected["loss"]
    for key in sorted(expected):
        if key != "mask":
            assert_close(key, got[key], expected[key], grad=key.startswith("d"))


CASES = [  # (config changes, batch, mask_ratio): K = int(N (1 - mask_ratio))
    pytest.param({}, 2, 0.75, id="N16-K4"),
    pytest.param({}, 3, 0.65, id="N16-K5-odd"),
    pytest.param({}, 2, 0.0, id="N16-K16-all-kept"),
    pytest.param({}, 2, 0.9, id="N16-K1"),
    pytest.param({}, 1, 0.75, id="batch1"),
    pytest.param(dict(norm_pix_loss=True), 2, 0.75, id="norm-pix"),
    pytest.param(dict(img_size=(24, 40)), 2, 0.6, id="nonsquare-3x5-K6"),
    pytest.param(dict(img_size=(16, 64), patch_size=(8, 4), in_chans=1, norm_pix_loss=True), 2, 0.75,
                 id="rect-patch-2x16-1chan-norm-pix"),
]


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kwargs,batch,mask_ratio", CASES)
def test_torch_backend_equals_reference(kwargs, batch, mask_ratio):
    model, ref = _pair("torch", **kwargs)
    _compare(model, ref, batch, mask_ratio)


def _needs_interpreter():
    if DEVICE.type == "cpu" and backends.triton_reason([torch.zeros(1)], torch.float32) is not None:
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("kwargs,batch,mask_ratio", [CASES[1], CASES[2], CASES[6]])
def test_triton_attention_equals_reference(kwargs, batch, mask_ratio):
    """Every attention (encoder and decoder) on the Triton kernels, fp32 vs the float64 reference."""
    _needs_interpreter()
    model, ref = _pair("triton", torch.float32, **kwargs)
    model.patch_embed.backend = "torch"
    _compare(model, ref, batch, mask_ratio, torch.float32)


@pytest.mark.parametrize("kwargs,batch,mask_ratio", [CASES[1], CASES[3], CASES[6]])
def test_triton_equals_reference(kwargs, batch, mask_ratio):
    """The whole model on the Triton kernels (masked patchify included), fp32 vs float64."""
    _needs_interpreter()
    model, ref = _pair("triton", torch.float32, **kwargs)
    _compare(model, ref, batch, mask_ratio, torch.float32)


def test_triton_encoder_multiplies_only_the_kept_patches():
    """The encoder's patchify is the fused op on the K kept patches: FlopCounterMode sees
    2·B·K·D·C·P² in vitkern's patch_embed op and no convolution."""
    from torch.utils.flop_counter import FlopCounterMode
    _needs_interpreter()
    model = MaskedAutoencoderViT(**TINY, backend="triton").to(DEVICE)
    imgs, noise = _inputs(model, 2, torch.float32)
    counter = FlopCounterMode(display=False)
    with counter:
        model.forward_encoder(imgs, 0.75, noise)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    K = mae_len_keep(16, 0.75)
    assert counts.get("vitkern.patch_embed_fwd") == 2 * 2 * K * 32 * 3 * 8 * 8, counts
    assert "aten.convolution" not in counts, counts


def test_reference_state_dict_loads_strictly_and_gives_the_same_loss():
    """A freshly initialised reference (the authors' layout and init) into the model: same keys,
    same requires_grad flags, same loss with fresh noise drawn from the same seed."""
    ref = MaskedAutoencoderViTReference(**TINY).to(DEVICE, HIGH)
    model = MaskedAutoencoderViT(**TINY, backend="torch").to(DEVICE, HIGH)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in ref.named_parameters()}
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    imgs = torch.randn(2, 3, 32, 32, dtype=HIGH, device=DEVICE)
    torch.manual_seed(7)
    loss_ref = ref(imgs)[0]
    torch.manual_seed(7)
    loss = model(imgs)[0]
    assert_close("loss", loss, loss_ref)


def test_same_seed_same_initialisation():
    """Construction draws the same numbers in the same order as the reference (the authors' init)."""
    torch.manual_seed(3)
    ref = MaskedAutoencoderViTReference(**TINY)
    torch.manual_seed(3)
    model = MaskedAutoencoderViT(**TINY)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    w = model.patch_embed.proj.weight.flatten(1)
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform over the flattened kernel
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros_like(model.blocks[0].attn.qkv.bias))


def test_blocks_are_timm_blocks_on_vitkern_attention():
    from timm.models.vision_transformer import Block
    import vitkern.nn
    model = MaskedAutoencoderViT(**TINY, backend="torch")
    for blk in list(model.blocks) + list(model.decoder_blocks):
        assert type(blk) is Block and type(blk.attn) is vitkern.nn.Attention and blk.attn.backend == "torch"
    assert isinstance(model.patch_embed, vitkern.nn.PatchEmbed)
    import vitkern
    vitkern.optimize(model, backend="auto")
    assert {m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), str)} == {"auto"}


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the masked patchify op, the attention ops and the
    decoder's gather (autograd.Function) forward and backward; aot_eager keeps CPU compile short."""
    model, _ = _pair("torch", torch.float32, depth=1)
    imgs, noise = _inputs(model, 2, torch.float32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, pred, mask = compiled(imgs, noise=noise)
    grads = torch.autograd.grad(loss, [model.cls_token, model.mask_token])
    exp_loss, exp_pred, exp_mask = model(imgs, noise=noise)
    exp_grads = torch.autograd.grad(exp_loss, [model.cls_token, model.mask_token])
    assert torch.equal(mask, exp_mask)
    for name, a, e in zip(("loss", "pred", "dcls_token", "dmask_token"), (loss, pred, *grads),
                          (exp_loss, exp_pred, *exp_grads)):
        assert_close(name, a, e)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU autocast case; the GPU benchmark checks bf16 autocast")
def test_bf16_autocast_follows_the_reference():
    """Under CPU bf16 autocast the residual streams have the reference's dtypes (fp32 after the
    fp32 position embeddings are added), and loss, prediction and every gradient, compared in bf16,
    are within 2x (forward) / 3x (gradients) the error of the reference under the same autocast."""
    model, ref = _pair("torch", torch.float32)
    ref32 = MaskedAutoencoderViTReference(**TINY)
    ref32.load_state_dict(ref.state_dict())
    imgs, noise = _inputs(model, 4, torch.float32)
    grad_loss = torch.randn((), dtype=HIGH)
    grad_pred = torch.randn(4, 16, 192, dtype=HIGH)
    high = _run(ref, imgs.to(HIGH), noise, 0.75, grad_loss, grad_pred)
    out = {}
    for name, mod in (("ours", model), ("same", ref32)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latent = mod.forward_encoder(imgs, 0.75, noise)[0]
            out[name] = _run(mod, imgs, noise, 0.75, grad_loss, grad_pred)
        out[name]["latent dtype"] = latent.dtype
    assert out["ours"].pop("latent dtype") == out["same"].pop("latent dtype") == torch.float32
    for key in sorted(high):
        if key != "mask":
            low = torch.bfloat16
            assert_close(key, out["ours"][key].to(low), high[key], out["same"][key].to(low), grad=key.startswith("d"))


# ----------------------------------------------------------------------------- the decoder's gather
@pytest.mark.parametrize("dtype", [HIGH, torch.bfloat16])
def test_decoder_tokens_equal_cat_gather_cat(dtype):
    """One gather == the reference's mask-token cat, un-shuffle gather, CLS cat and + pos, forward
    and every gradient (the position embedding's too, when it trains); bf16 tokens + fp32 position
    embedding promote to fp32 in both."""
    B, N, K, D = 3, 12, 5, 8
    x = torch.randn(B, 1 + K, D, device=DEVICE).to(dtype).requires_grad_(True)
    token = torch.randn(1, 1, D, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 1 + N, D, device=DEVICE, requires_grad=True)
    _, _, ids_restore = mae_masking(torch.rand(B, N, device=DEVICE), K, torch.float32)

    def reference(x, token, pos):
        rows = torch.cat([x[:, 1:], token.to(x.dtype).expand(B, N - K, D)], dim=1)
        rows = rows.gather(1, ids_restore[:, :, None].expand(-1, -1, D))
        return torch.cat([x[:, :1], rows], dim=1) + pos

    grad = torch.randn(B, 1 + N, D, device=DEVICE)
    out = mae_module.decoder_tokens(x, token, pos, ids_restore)
    exp = reference(x, token, pos)
    assert out.dtype == exp.dtype
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    got = torch.autograd.grad(out, [x, token, pos], grad.to(out.dtype))
    same = torch.autograd.grad(exp, [x, token, pos], grad.to(exp.dtype))
    leaves = [t.detach().to(HIGH).requires_grad_(True) for t in (x, token, pos)]
    high = torch.autograd.grad(reference(*leaves), leaves, grad.to(HIGH))
    for name, g, s, h in zip(("dx", "dmask_token", "dpos"), got, same, high):
        assert g.dtype == s.dtype, name
        if g.dtype == torch.bfloat16:  # dx: each row's one upstream row, rounded alike
            assert torch.equal(g, s), name
        else:  # sums: ours in fp32 / float64, the same-dtype path's mask-token sum runs in bf16
            assert_close(name, g, h)


# ----------------------------------------------------------------------------- helpers' definitions
def test_masking_keeps_the_smallest_noise():
    noise = torch.rand(4, 10)
    ids_keep, mask, ids_restore = mae_masking(noise, 3, torch.float64)
    assert ids_keep.dtype == torch.int64 and ids_keep.shape == (4, 3)
    torch.testing.assert_close(noise.gather(1, ids_keep), noise.sort(dim=1).values[:, :3], rtol=0, atol=0)
    assert torch.equal(mask.sum(1), torch.full((4,), 7.0, dtype=torch.float64))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(ids_restore, noise.argsort(1).argsort(1))  # the rank of each patch
    x = torch.randn(4, 10, 6)
    kept, mask2, restore2 = MaskedAutoencoderViT(**TINY).random_masking(x, 0.7, noise)  # the authors' API
    assert torch.equal(kept, x.gather(1, ids_keep[:, :, None].expand(-1, -1, 6)))
    assert torch.equal(mask2, mask.float()) and torch.equal(restore2, ids_restore)


def test_patchify_is_row_major_patches_flattened_i_j_c():
    imgs = torch.randn(2, 3, 8, 12)
    x = mae_patchify(imgs, (4, 2))  # grid 2 x 6
    assert x.shape == (2, 12, 24)
    b, i, j = 1, 1, 4
    patch = imgs[b, :, 4 * i:4 * i + 4, 2 * j:2 * j + 2].permute(1, 2, 0).reshape(-1)
    assert torch.equal(x[b, i * 6 + j], patch)
    assert torch.equal(mae_unpatchify(x, (4, 2), (2, 6), 3), imgs)
    model = MaskedAutoencoderViT(**{**TINY, "img_size": (8, 12), "patch_size": (4, 2)})
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_sincos_position_embedding():
    D, gh, gw = 16, 3, 5
    pos = mae_sincos_pos_embed(D, (gh, gw), cls_token=True)
    assert pos.shape == (1 + gh * gw, D) and torch.equal(pos[0], torch.zeros(D, dtype=pos.dtype))
    q = D // 4
    for i, j, k in ((2, 4, 1), (1, 3, 3), (0, 2, 0)):
        w = 10000.0 ** (-k / q)
        row = pos[1 + i * gw + j]
        expected = [torch.sin(torch.tensor(j * w, dtype=torch.float64)), torch.cos(torch.tensor(j * w, dtype=torch.float64)),
                    torch.sin(torch.tensor(i * w, dtype=torch.float64)), torch.cos(torch.tensor(i * w, dtype=torch.float64))]
        got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]  # column sin, cos, then row sin, cos
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-15, atol=1e-15)
    model = MaskedAutoencoderViT(**{**TINY, "img_size": (24, 40)})
    torch.testing.assert_close(model.pos_embed[0], mae_sincos_pos_embed(32, (3, 5), True).float())
    torch.testing.assert_close(model.decoder_pos_embed[0], mae_sincos_pos_embed(16, (3, 5), True).float())


# ----------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("build,D,depth,heads,P", [(mae_vit_base_patch16, 768, 12, 12, 16),
                                                    (mae_vit_large_patch16, 1024, 24, 16, 16),
                                                    (mae_vit_huge_patch14, 1280, 32, 16, 14)])
def test_constructors_on_meta(build, D, depth, heads, P):
    """The authors' three recipes: shapes of every parameter (== the reference built alike), on the
    meta device (no memory)."""
    with torch.device("meta"):
        model = build()
        ref = MaskedAutoencoderViTReference(patch_size=P, embed_dim=D, depth=depth, num_heads=heads,
                                            decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                                            mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert shapes == {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    N = (224 // P) ** 2
    assert shapes["patch_embed.proj.weight"] == (D, 3, P, P) and shapes["cls_token"] == (1, 1, D)
    assert shapes["pos_embed"] == (1, N + 1, D) and shapes["decoder_pos_embed"] == (1, N + 1, 512)
    assert shapes[f"blocks.{depth - 1}.mlp.fc1.weight"] == (4 * D, D) and f"blocks.{depth}.norm1.weight" not in shapes
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * D, D) and shapes["blocks.0.attn.qkv.bias"] == (3 * D,)
    assert shapes["decoder_embed.weight"] == (512, D) and shapes["mask_token"] == (1, 1, 512)
    assert shapes["decoder_blocks.7.attn.qkv.weight"] == (1536, 512) and "decoder_blocks.8.norm1.weight" not in shapes
    assert shapes["decoder_pred.weight"] == (P * P * 3, 512)
    assert model.blocks[0].attn.num_heads == heads and model.norm.eps == 1e-6


def test_forward_on_meta_gives_the_shapes():
    """A forward on the meta device (FLOP counting, shape checks) runs: keep_indices' value check is
    skipped for meta tensors, which hold no values."""
    with torch.device("meta"):
        model = mae_vit_base_patch16()
        loss, pred, mask = model(torch.empty(2, 3, 224, 224))
    assert loss.shape == () and pred.shape == (2, 196, 16 * 16 * 3) and mask.shape == (2, 196)
    assert loss.is_meta and pred.is_meta


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    model = MaskedAutoencoderViT(**TINY)
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"imgs must be \(B, in_chans, H, W\) = \(B, 3, 32, 32\), got shape \(2, 3, 32, 24\)"):
        model(imgs[..., :24])
    with pytest.raises(ValueError, match=r"noise must be \(B, num_patches\) = \(2, 16\), got \(2, 15\)"):
        model(imgs, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match=r"mask_ratio must be a float in \[0, 1\), got 1.0"):
        model(imgs, mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"keeps int\(16 \* \(1 - 0.95\)\) = 0 of 16 patches"):
        model(imgs, mask_ratio=0.95)
    with pytest.raises(TypeError, match="imgs must be a torch.Tensor, got list"):
        model([imgs])
    with pytest.raises(ValueError, match="embed_dim must be a multiple of 4"):
        MaskedAutoencoderViT(**{**TINY, "embed_dim": 30, "num_heads": 2})
    with pytest.raises(ValueError, match=r"img_size=\(30, 30\) must be divisible by patch_size=\(8, 8\)"):
        MaskedAutoencoderViT(**{**TINY, "img_size": 30})
    with pytest.raises(ValueError, match="decoder_num_heads=3 must divide its width 16"):
        MaskedAutoencoderViT(**{**TINY, "decoder_num_heads": 3})
    with pytest.raises(ValueError, match="backend"):
        MaskedAutoencoderViT(**TINY, backend="cudnn")


# ----------------------------------------------------------------------------- the comparison can fail
def _flipped_keep(noise, len_keep, dtype):
    ids_keep, mask, ids_restore = mae_masking(noise, len_keep, dtype)
    return ids_keep.flip(1), mask, ids_restore  # the encoder's tokens no longer in ids_restore's order


_DECODER_TOKENS = mae_module._DecoderTokens


class _NoMaskTokenGrad(_DECODER_TOKENS):
    @staticmethod
    def backward(ctx, dout):
        dx, dtoken, dpos, *rest = _DECODER_TOKENS.backward(ctx, dout)
        return (dx, torch.zeros_like(dtoken) if dtoken is not None else None, dpos, *rest)


@pytest.mark.parametrize("bug", ["kept-patch-order", "decoder-position-rows", "mask-token-gradient"])
def test_planted_bug_is_caught(monkeypatch, bug):
    if bug == "kept-patch-order":
        monkeypatch.setattr(mae_module, "mae_masking", _flipped_keep)
    elif bug == "decoder-position-rows":
        original = mae_module.decoder_tokens
        monkeypatch.setattr(mae_module, "decoder_tokens",
                            lambda x, token, pos, ids: original(x, token, pos.flip(1), ids))
    else:
        monkeypatch.setattr(mae_module, "_DecoderTokens", _NoMaskTokenGrad)
    model, ref = _pair("torch")
    with pytest.raises(AssertionError):
        _compare(model, ref, 2, 0.75)
