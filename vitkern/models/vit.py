"""The seed's Vision Transformer (d2l.ai chapter 11.8, "Transformers for Vision") on vitkern's kernels.

Same constructor as d2l's ``ViT`` (arguments, order, defaults), same module tree and
``state_dict`` keys, so weights of a d2l model load unchanged::

    patch_embedding.conv.{weight,bias}   Conv2d(in_chans, D, kernel=stride=patch), with bias
    cls_token                            (1, 1, D), zeros at init
    pos_embedding                        (1, 1 + num_patches, D), torch.randn at init (learnable)
    blks.{i}.ln1 / ln2                   LayerNorm(D)
    blks.{i}.attention.W_q/W_k/W_v/W_o   Linear(D, D, bias=use_bias)    (d2l.MultiHeadAttention)
    blks.{i}.mlp.dense1 / dense2         Linear(D, mlp), Linear(mlp, D), with bias
    head.0 / head.1                      LayerNorm(D), Linear(D, num_classes)

What runs on vitkern:

* stem: patchify + projection + CLS row + position embedding in ONE
  :func:`vitkern.ops.patch_embed` call (d2l: Conv2d -> flatten -> transpose -> cat -> + pos),
  then the embedding dropout;
* attention: ``W_q``, ``W_k`` and ``W_v`` stay separate parameters (d2l's names), and their
  weights (and biases) are concatenated into one (3D, D) matrix for a single ``F.linear``
  whose (B, N, 3D) output goes straight into :func:`vitkern.ops.attention_packed` (no
  permute/copy), then ``W_o``. The concatenation copies 3·D² weights per block and
  forward (small next to the B·N·3D activations it produces); autograd splits the
  gradient back into the three parameters.

Semantics (d2l's), checked against :func:`vit_reference_forward`, a plain-PyTorch
transcription of the chapter's code:

* ``d2l.MultiHeadAttention``: heads are contiguous chunks of D (``transpose_qkv``);
  ``DotProductAttention`` scales q·kᵀ by 1/sqrt(d) with d = D / num_heads (the per-head
  dimension, after ``transpose_qkv``), applies dropout (``blk_dropout``) to the attention
  weights, and ``W_o`` (bias = ``use_bias``) projects the concatenated heads.
* ``ViTMLP``: dense1 -> GELU (exact erf) -> dropout -> dense2 -> dropout.
* ``ViTBlock``: pre-norm, ``X = X + attention(ln1(X)); X = X + mlp(ln2(X))``. The chapter's
  printed code (the seed text) has ``X = ln1(X); return X + mlp(ln2(X + attention(X)))``,
  which adds the residual to the *normalised* input and drops the attention branch's own
  residual; d2l fixed its code to the form above (d2l-ai/d2l-en PR #2283, "ViTBlock
  implementation match schema"), which is what the chapter's figure and prose (and the ViT
  paper) describe. We follow the fixed code.
* head: ``LayerNorm -> Linear`` on the CLS output (``pool="cls"``), or, for the chapter's
  exercise 2 (``pool="mean"``), on the mean of the *patch* tokens' outputs. The CLS token
  stays in the sequence for mean pooling (it still attends and is attended to; only the
  pooled average leaves it out), as timm does with ``class_token=True, global_pool="avg"``:
  both modes then have the same parameters and ``state_dict``, so one trained model can be
  evaluated either way.

Additions to d2l's signature, all keyword-only: ``pool``, ``in_chans`` (d2l's ``LazyConv2d``
infers it from the first batch; Fashion-MNIST, the chapter's data, needs ``in_chans=1``) and
``backend``. ``lr`` is stored and used by :meth:`ViT.configure_optimizers` (SGD, as
``d2l.Classifier``); :meth:`ViT.loss` is d2l's cross-entropy.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern._args import pair
from vitkern.nn import _graph

__all__ = ["ViT", "ViTBlock", "ViTMLP", "MultiHeadAttention", "PatchEmbedding", "vit_reference_forward"]

POOLS = ("cls", "mean")
IntOrPair = Union[int, Tuple[int, int]]



class PatchEmbedding(nn.Module):
    """d2l's PatchEmbedding: ``conv`` (kernel = stride = patch) -> (B, num_patches, D) tokens.

    ``forward`` gives the patch tokens only (d2l's API); :class:`ViT` calls the op itself to
    add the CLS row and the position embedding in the same kernel.
    """

    def __init__(self, img_size: IntOrPair = 96, patch_size: IntOrPair = 16, num_hiddens: int = 512, *,
                 in_chans: int = 3, backend: str = "auto"):
        super().__init__()
        self.backend = _backends.check_name(backend, "PatchEmbedding")
        self.img_size = pair(img_size, "img_size", "ViT", minimum=1)
        self.patch_size = pair(patch_size, "patch_size", "ViT", minimum=1)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"ViT: img_size={self.img_size} must be divisible by patch_size={self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv = nn.Conv2d(in_chans, num_hiddens, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, X: Tensor) -> Tensor:
        return _graph.patch_embed(X, self.conv.weight, self.conv.bias, None, None, self.backend)


class ViTMLP(nn.Module):
    """d2l's ViTMLP: dense1 -> GELU -> dropout1 -> dense2 -> dropout2."""

    def __init__(self, mlp_num_hiddens: int, mlp_num_outputs: int, dropout: float = 0.5, *,
                 num_inputs: Optional[int] = None):
        super().__init__()
        # d2l's LazyLinear infers the input width; in a ViTBlock it is mlp_num_outputs (= num_hiddens).
        self.dense1 = nn.Linear(mlp_num_outputs if num_inputs is None else num_inputs, mlp_num_hiddens)
        self.gelu = nn.GELU()
        self.dropout1 = nn.Dropout(dropout)
        self.dense2 = nn.Linear(mlp_num_hiddens, mlp_num_outputs)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.dense2(self.dropout1(self.gelu(self.dense1(x)))))


class MultiHeadAttention(nn.Module):
    """d2l's MultiHeadAttention (W_q, W_k, W_v, W_o; scale 1/sqrt(D/h)) as self-attention on
    vitkern's fused kernel: one ``F.linear`` with the concatenated [W_q; W_k; W_v] weights feeds
    :func:`vitkern.ops.attention_packed`. ``dropout`` drops attention weights (d2l's
    ``DotProductAttention`` dropout). d2l's ``valid_lens`` masking is not supported (ViT never uses it).
    """

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, bias: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        if num_hiddens % num_heads:
            raise ValueError(f"ViT: num_hiddens={num_hiddens} must be divisible by num_heads={num_heads}")
        self.backend = _backends.check_name(backend, "MultiHeadAttention")
        self.num_heads = num_heads
        self.head_dim = num_hiddens // num_heads
        self.dropout = nn.Dropout(dropout)
        self.W_q = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_k = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_v = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    def forward(self, X: Tensor) -> Tensor:
        weight = torch.cat([self.W_q.weight, self.W_k.weight, self.W_v.weight])
        bias = None
        if self.W_q.bias is not None:
            bias = torch.cat([self.W_q.bias, self.W_k.bias, self.W_v.bias])
        qkv = F.linear(X, weight, bias)  # (B, N, 3D) = [q | k | v], heads contiguous in each
        out = _graph.attention_packed(qkv, self.num_heads, 1.0 / math.sqrt(self.head_dim), None,
                                      self.dropout.p if self.training else 0.0, False, self.backend)  # (B, N, D)
        return self.W_o(out)


class ViTBlock(nn.Module):
    """Pre-norm encoder block: ``X + attention(ln1(X))``, then ``+ mlp(ln2(X))``."""

    def __init__(self, num_hiddens: int, norm_shape, mlp_num_hiddens: int, num_heads: int, dropout: float,
                 use_bias: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.ln1 = nn.LayerNorm(norm_shape)
        self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias, backend=backend)
        self.ln2 = nn.LayerNorm(norm_shape)
        self.mlp = ViTMLP(mlp_num_hiddens, num_hiddens, dropout)

    def forward(self, X: Tensor) -> Tensor:
        X = X + self.attention(self.ln1(X))
        return X + self.mlp(self.ln2(X))


class ViT(nn.Module):
    """Vision Transformer of d2l chapter 11.8, on vitkern's fused patch-embedding and attention.

    Args (d2l's, in d2l's order):
        img_size, patch_size: int or (h, w); the image must be divisible by the patch.
        num_hiddens: model width D; mlp_num_hiddens: MLP hidden width.
        num_heads: D must be divisible by it. num_blks: number of encoder blocks.
        emb_dropout: dropout after patch + CLS + position embedding.
        blk_dropout: dropout on attention weights and after each MLP Linear.
        lr: learning rate for :meth:`configure_optimizers` (SGD, as d2l).
        use_bias: bias of W_q, W_k, W_v and W_o. num_classes: output classes.
    Keyword-only:
        pool: ``"cls"`` (the CLS token's output) or ``"mean"`` (mean of the patch tokens'
            outputs; CLS stays in the sequence, see the module docstring).
        in_chans: image channels (d2l infers it lazily; 1 for Fashion-MNIST).
        backend: ``"auto" | "cuda" | "triton" | "torch"`` for every vitkern op in the model.
    """

    def __init__(self, img_size: IntOrPair, patch_size: IntOrPair, num_hiddens: int, mlp_num_hiddens: int,
                 num_heads: int, num_blks: int, emb_dropout: float, blk_dropout: float, lr: float = 0.1,
                 use_bias: bool = False, num_classes: int = 10, *, pool: str = "cls", in_chans: int = 3,
                 backend: str = "auto"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"ViT: pool must be one of {POOLS}, got {pool!r}")
        for name, value in (("num_hiddens", num_hiddens), ("mlp_num_hiddens", mlp_num_hiddens),
                            ("num_heads", num_heads), ("num_classes", num_classes), ("in_chans", in_chans)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViT: {name} must be a positive int, got {value!r}")
        if not isinstance(num_blks, int) or num_blks < 0:
            raise ValueError(f"ViT: num_blks must be a non-negative int, got {num_blks!r}")
        if num_hiddens % num_heads:
            raise ValueError(f"ViT: num_hiddens={num_hiddens} must be divisible by num_heads={num_heads}")
        self.backend = _backends.check_name(backend, "ViT")
        self.pool = pool
        self.lr = lr
        self.num_classes = num_classes

        self.patch_embedding = PatchEmbedding(img_size, patch_size, num_hiddens, in_chans=in_chans,
                                              backend=backend)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, num_hiddens))
        num_steps = self.patch_embedding.num_patches + 1  # add the cls token
        self.pos_embedding = nn.Parameter(torch.randn(1, num_steps, num_hiddens))  # learnable
        self.dropout = nn.Dropout(emb_dropout)
        self.blks = nn.Sequential()
        for i in range(num_blks):
            self.blks.add_module(f"{i}", ViTBlock(num_hiddens, num_hiddens, mlp_num_hiddens, num_heads,
                                                  blk_dropout, use_bias, backend=backend))
        self.head = nn.Sequential(nn.LayerNorm(num_hiddens), nn.Linear(num_hiddens, num_classes))

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, backend={self.backend!r}"

    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, X: Tensor) -> None:
        if not isinstance(X, Tensor):
            raise TypeError(f"ViT: X must be a torch.Tensor, got {type(X).__name__}")
        conv = self.patch_embedding.conv
        expected = (conv.in_channels, *self.patch_embedding.img_size)
        if X.dim() != 4 or tuple(X.shape[1:]) != expected:
            raise ValueError(f"ViT: X must be (B, in_chans, H, W) = (B, {', '.join(map(str, expected))}) "
                             f"(in_chans={conv.in_channels}, img_size={self.patch_embedding.img_size}), "
                             f"got shape {tuple(X.shape)}")

    def forward_features(self, X: Tensor) -> Tensor:
        """Encoder output for every token, (B, 1 + num_patches, D); row 0 is the CLS token."""
        if _graph.eager(X):
            self._check_input(X)
        conv = self.patch_embedding.conv
        X = _graph.patch_embed(X, conv.weight, conv.bias, self.cls_token, self.pos_embedding,
                               self.backend)  # conv + flatten + cat(cls) + pos, one kernel
        X = self.dropout(X)
        for blk in self.blks:
            X = blk(X)
        return X

    def forward_head(self, X: Tensor) -> Tensor:
        X = X[:, 0] if self.pool == "cls" else X[:, 1:].mean(dim=1)
        return self.head(X)

    def forward(self, X: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(X))

    # d2l.Classifier conveniences
    def loss(self, Y_hat: Tensor, Y: Tensor, averaged: bool = True) -> Tensor:
        Y_hat = Y_hat.reshape((-1, Y_hat.shape[-1]))
        Y = Y.reshape((-1,))
        return F.cross_entropy(Y_hat, Y, reduction="mean" if averaged else "none")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), self.lr)


# --------------------------------------------------------------------------- #
# Reference: the chapter's code, transcribed with plain PyTorch ops
# --------------------------------------------------------------------------- #
def _transpose_qkv(X: Tensor, num_heads: int) -> Tensor:
    """d2l: (B, N, D) -> (B·h, N, D/h). (Sizes spelt out where d2l writes -1: B may be 0.)"""
    X = X.reshape(X.shape[0], X.shape[1], num_heads, X.shape[2] // num_heads).permute(0, 2, 1, 3)
    return X.reshape(-1, X.shape[2], X.shape[3])


def _transpose_output(X: Tensor, num_heads: int) -> Tensor:
    """d2l: (B·h, N, D/h) -> (B, N, D)."""
    X = X.reshape(X.shape[0] // num_heads, num_heads, X.shape[1], X.shape[2]).permute(0, 2, 1, 3)
    return X.reshape(X.shape[0], X.shape[1], num_heads * X.shape[3])


def _reference_mha(mha: MultiHeadAttention, X: Tensor, training: bool) -> Tensor:
    h = mha.num_heads
    queries = _transpose_qkv(F.linear(X, mha.W_q.weight, mha.W_q.bias), h)
    keys = _transpose_qkv(F.linear(X, mha.W_k.weight, mha.W_k.bias), h)
    values = _transpose_qkv(F.linear(X, mha.W_v.weight, mha.W_v.bias), h)
    d = queries.shape[-1]  # DotProductAttention: per-head dimension
    scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)
    weights = F.softmax(scores, dim=-1)  # masked_softmax with valid_lens=None
    output = torch.bmm(F.dropout(weights, mha.dropout.p, training), values)
    return F.linear(_transpose_output(output, h), mha.W_o.weight, mha.W_o.bias)


def vit_reference_forward(model: ViT, X: Tensor) -> Tensor:
    """d2l's ViT forward for ``model``'s weights with plain PyTorch ops (no vitkern op).

    Conv2d -> flatten -> transpose -> cat(CLS) -> + pos -> dropout -> blocks (d2l's
    MultiHeadAttention with transpose_qkv / bmm / softmax, ViTMLP) -> pool -> head. Dropout
    follows ``model.training`` (its random draws differ from the fused kernels', so compare
    in eval mode or with dropout 0). Used by the tests and benchmarks as the naive model.
    """
    training = model.training
    conv = model.patch_embedding.conv
    X = F.conv2d(X, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    X = torch.cat((model.cls_token.expand(X.shape[0], -1, -1), X), 1)
    X = F.dropout(X + model.pos_embedding, model.dropout.p, training)
    for blk in model.blks:
        ln1, ln2, mlp = blk.ln1, blk.ln2, blk.mlp
        X = X + _reference_mha(blk.attention, F.layer_norm(X, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps),
                               training)
        Y = F.layer_norm(X, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
        Y = F.dropout(F.gelu(F.linear(Y, mlp.dense1.weight, mlp.dense1.bias)), mlp.dropout1.p, training)
        Y = F.dropout(F.linear(Y, mlp.dense2.weight, mlp.dense2.bias), mlp.dropout2.p, training)
        X = X + Y
    X = X[:, 0] if model.pool == "cls" else X[:, 1:].mean(dim=1)
    norm, linear = model.head[0], model.head[1]
    X = F.layer_norm(X, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.linear(X, linear.weight, linear.bias)
