"""Pooled-only embeddings: the last transformer block runs on the pooled token only.

A CLIP tower's embedding reads one token after its last block: the class token of the image tower, the
end-of-text token of the text tower. Every block before the last one must run on all tokens (their
outputs are the last block's keys and values), but in the last block only the pooled token's query,
attention output and MLP are ever read. Safe-CLIP reads nothing but these embeddings, in the frozen
reference's passes (``T0(S)``, ``I0(V)``) and in the trainable ones (``T(S)``, ``T(U)``, ``I(V)``,
``I(G)``; all but the ``text_safe_tokens`` term's pass, which reads every token), so :func:`pooled_text` /
:func:`pooled_image` run the model's own forward with the last block swapped, for the duration of the
call, for one that computes the keys and values of all tokens but the rest for the pooled token only,
and leaves the other rows as they came in (nobody reads them). On a tower of ``L`` blocks this saves most
of ``1/L`` of the pass, forward and backward (in the last block: the query, attention, output projection
and MLP of all but one token; the keys and values remain): 20% of a plain CLIP step on the 4-block towers
of ``benchmarks/safeclip_step.py``, 17% on its 6-block ones, an estimated 3% on a 24-block ViT-L/14. It
works under autograd and in training mode: the skipped forwards have no dropout of their own
(``CLIPAttention``'s attention dropout has; where it is on in training, the full forward runs), and the
submodules the fast path calls (LoRA layers included) run as themselves.

Without autograd (the reference always runs without it), the blocks' quick-GELU MLPs (CLIP's
``h * sigmoid(1.702 * h)``) also compute their activation in place, in the output of their first linear
layer: bit for bit the same values, two fewer tensors of the MLP's width per block.

The result equals the full forward's up to float rounding (attention of one query row instead of all).
Only the structures below are special-cased; anything else (another block type, attention pooling, a
token-mean pool, a block whose ``forward`` is already patched, hooks on a bypassed module, attention dropout
in training) falls back to the full forward of :meth:`~vlmsafe.safeclip.backends.CLIPBackend.encode_text` /
:meth:`~vlmsafe.safeclip.backends.CLIPBackend.encode_image`:

* ``transformers`` ``CLIPModel``: ``CLIPEncoderLayer`` blocks with ``CLIPAttention`` / ``CLIPMLP``; the
  text tower's pooled token is found with ``CLIPTextModel``'s own rule (``argmax`` of the ids when
  ``eos_token_id == 2``, else the first end-of-text id), its attention is causal and masks padding;
* ``open_clip`` ``CLIP``: batch-first ``ResidualAttentionBlock`` towers; the text pool types ``argmax`` /
  ``eos`` / ``first`` / ``last`` (with the model's causal mask), a ``VisionTransformer`` with ``tok``
  pooling and no attention pooler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmsafe.safeclip.backends import CLIPBackend

#: A block forward that computes the pooled rows ``[B]`` (one position per row) of the block's output.
BlockForward = Callable[..., torch.Tensor]
#: A tower's blocks and the pooled forward of its last one (``((), None)``: the structure is not special-cased).
FastPath = tuple[Sequence[nn.Module], BlockForward | None]


def pooled_text(backend: CLIPBackend, model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """``backend.encode_text(model, tokens)``, computing only the pooled token in the last text block."""
    fast = _hf_text if backend.kind == "hf" else _open_clip_text
    with _shadowed(backend, *fast(model, tokens)):
        return backend.encode_text(model, tokens)


def pooled_image(backend: CLIPBackend, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``backend.encode_image(model, pixel_values)``, computing only the class token in the last vision block."""
    fast = _hf_image if backend.kind == "hf" else _open_clip_image
    with _shadowed(backend, *fast(model, pixel_values)):
        return backend.encode_image(model, pixel_values)


@contextlib.contextmanager
def _shadowed(backend: CLIPBackend, blocks: Sequence[nn.Module], last: BlockForward | None) -> Iterator[None]:
    """For the duration: the last of ``blocks`` runs ``last``; without autograd, quick-GELU MLPs run in place.

    Each is an instance attribute ``forward`` (``nn.Module.__call__`` runs it instead of the class's), removed
    on exit. Nothing is shadowed when ``last`` is ``None`` (a structure not special-cased).
    """
    patches: list[tuple[nn.Module, BlockForward]] = []
    if last is not None:
        patches.append((blocks[-1], last))
        if not torch.is_grad_enabled():
            mlp_of = _hf_inplace_mlp if backend.kind == "hf" else _open_clip_inplace_mlp
            patches += [(b.mlp, f) for b in blocks if "forward" not in b.mlp.__dict__ and (f := mlp_of(b.mlp))]
    try:
        for module, forward in patches:
            module.forward = forward
        yield
    finally:
        for module, _ in patches:
            module.__dict__.pop("forward", None)


#: Rows of an MLP activation processed at a time on the CPU by the in-place quick GELU (its scratch: 128 x width
#: floats, small enough to stay in a core's cache while the three elementwise passes run over it). Blocks are
#: used only when they hold a multiple of 64 values: the elementwise kernels then see the same SIMD vectors
#: and scalar tail as in one pass, so the values stay bit for bit the same.
QUICK_GELU_ROWS = 128


def _gelu_block_rows(rows: torch.Tensor) -> int:
    """Rows per block of the in-place quick GELU of ``rows`` ``[N, W]``: all of them (one pass) on a GPU (one
    launch per op) or where blocks of :data:`QUICK_GELU_ROWS` would change a vector tail."""
    if rows.device.type == "cpu" and QUICK_GELU_ROWS * rows.shape[1] % 64 == 0:
        return min(QUICK_GELU_ROWS, len(rows))
    return len(rows)


def _quick_gelu_mlp(fc1: nn.Module, act: nn.Module, fc2: nn.Module) -> BlockForward:
    """``fc2(act(fc1(x)))`` with the quick GELU ``h * sigmoid(1.702 * h)`` written into ``h = fc1(x)``, bit for bit,
    a block of rows at a time (``act`` itself runs only if ``h`` shares memory with ``x`` or is not contiguous)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = fc1(x)
        if h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() or not h.is_contiguous():
            return fc2(act(h))
        rows = h.view(-1, h.shape[-1])
        step = _gelu_block_rows(rows)
        scratch = torch.empty((step, rows.shape[1]), dtype=h.dtype, device=h.device)
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            t = torch.mul(part, 1.702, out=scratch[: len(part)])
            t.sigmoid_()
            part.mul_(t)
        return fc2(h)

    return forward


def _bypassable(*modules: nn.Module) -> bool:
    """Whether ``modules`` (whose own forward the fast path skips) are unhooked and unpatched.

    Training mode is no obstacle: none of the forwards skipped has a dropout of its own (``CLIPAttention``'s,
    checked apart, is the exception), and the submodules the fast path calls run as themselves.
    """
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in modules)


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b]]`` for every row ``b``: ``[B, W]``."""
    return x[torch.arange(x.shape[0], device=x.device), positions]


def _with_rows(x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` whose pooled rows are ``rows`` (the block's other outputs are never read)."""
    out = x.clone()
    out[torch.arange(x.shape[0], device=x.device), positions] = rows.to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------- transformers


def _hf_blocks_ok(tower: nn.Module) -> bool:
    from transformers.models.clip.modeling_clip import (
        CLIPMLP,
        CLIPAttention,
        CLIPEncoderLayer,
        CLIPTextModel,
        CLIPVisionModel,
    )

    if type(tower) not in (CLIPTextModel, CLIPVisionModel) or not len(tower.encoder.layers):
        return False
    layers = tower.encoder.layers
    last = layers[-1]
    return (
        type(last) is CLIPEncoderLayer
        and type(last.self_attn) is CLIPAttention
        and type(last.mlp) is CLIPMLP
        and _bypassable(last, last.self_attn)
        and not (last.self_attn.training and last.self_attn.dropout)  # the fast path's attention has no dropout
    )


def _hf_block_forward(layer: nn.Module, positions: torch.Tensor, key_mask: torch.Tensor | None) -> BlockForward:
    """``CLIPEncoderLayer.forward`` for the token at ``positions`` (``[B]``); ``key_mask`` ``[B, T]`` (True: attend)
    is what the pooled query may see (``None``: every token)."""
    attn = layer.self_attn

    def forward(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        x = layer.layer_norm1(hidden_states)
        q = attn.q_proj(_rows(x, positions)[:, None]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        h = _rows(hidden_states, positions) + attn.out_proj(a.transpose(1, 2).reshape(b, -1))
        h = h + layer.mlp(layer.layer_norm2(h))
        return _with_rows(hidden_states, positions, h)

    return forward


def _hf_inplace_mlp(mlp: nn.Module) -> BlockForward | None:
    """``CLIPMLP.forward`` with its quick GELU in place (``None`` for another MLP or activation)."""
    from transformers.activations import QuickGELUActivation
    from transformers.models.clip.modeling_clip import CLIPMLP

    if type(mlp) is not CLIPMLP or type(mlp.activation_fn) is not QuickGELUActivation:
        return None
    return _quick_gelu_mlp(mlp.fc1, mlp.activation_fn, mlp.fc2) if _bypassable(mlp, mlp.activation_fn) else None


def _hf_text(model: nn.Module, tokens: dict[str, torch.Tensor]) -> FastPath:
    tower = getattr(model, "text_model", None)
    if tower is None or not _hf_blocks_ok(tower):
        return (), None
    ids = tokens["input_ids"]
    if ids.dim() != 2:
        return (), None
    eos = tower.eos_token_id
    # CLIPTextModel's pooling rule (ids before PR #24773 of transformers carry eos_token_id 2: argmax)
    positions = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
    seen = torch.arange(ids.shape[1], device=ids.device)[None, :] <= positions[:, None]  # causal
    mask = tokens.get("attention_mask")
    if mask is not None:
        seen = seen & mask.to(torch.bool)
    layers = tower.encoder.layers
    return layers, _hf_block_forward(layers[-1], positions, seen)


def _hf_image(model: nn.Module, pixel_values: torch.Tensor) -> FastPath:
    tower = getattr(model, "vision_model", None)
    if tower is None or not _hf_blocks_ok(tower):
        return (), None
    layers = tower.encoder.layers
    zeros = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
    return layers, _hf_block_forward(layers[-1], zeros, None)  # CLIPVisionModel pools the class token (position 0)


# ---------------------------------------------------------------------------------------------- open_clip


def _open_clip_blocks_ok(transformer: nn.Module) -> bool:
    from open_clip.transformer import ResidualAttentionBlock, Transformer

    if type(transformer) is not Transformer or not getattr(transformer, "batch_first", False):
        return False
    last = transformer.resblocks[-1] if len(transformer.resblocks) else None
    return (
        type(last) is ResidualAttentionBlock
        and not hasattr(last, "ln_1_kv")
        and _bypassable(last)
    )


def _open_clip_block_forward(
    block: nn.Module, positions: torch.Tensor, mask_rows: torch.Tensor | None
) -> BlockForward:
    """``ResidualAttentionBlock.forward`` for the token at ``positions``; ``mask_rows`` ``[B, T]`` are the rows
    of the block's additive attention mask at those positions (``None``: no mask)."""

    def forward(q_x: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        x = block.ln_1(q_x)
        mask = None
        if mask_rows is not None:  # nn.MultiheadAttention's per-head 3-D mask: [B * heads, 1, T]
            mask = mask_rows.to(q_x.dtype).repeat_interleave(block.attn.num_heads, dim=0)[:, None, :]
        a = block.attn(_rows(x, positions)[:, None], x, x, need_weights=False, attn_mask=mask)[0][:, 0]
        h = _rows(q_x, positions) + block.ls_1(a)
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
        return _with_rows(q_x, positions, h)

    return forward


def _open_clip_inplace_mlp(mlp: nn.Module) -> BlockForward | None:
    """The block MLP (``c_fc``, ``gelu``, ``c_proj``) with its ``QuickGELU`` in place (``None`` for another one)."""
    from open_clip.transformer import QuickGELU

    if type(mlp) is not nn.Sequential or list(mlp._modules) != ["c_fc", "gelu", "c_proj"]:
        return None
    if type(mlp.gelu) is not QuickGELU or not _bypassable(mlp, mlp.gelu):
        return None
    return _quick_gelu_mlp(mlp.c_fc, mlp.gelu, mlp.c_proj)


def _open_clip_text(model: nn.Module, tokens: dict[str, torch.Tensor]) -> FastPath:
    transformer, ids = getattr(model, "transformer", None), tokens["input_ids"]
    if transformer is None or ids.dim() != 2 or not _open_clip_blocks_ok(transformer):
        return (), None
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        positions = ids.argmax(-1)
    elif pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        positions = (ids == model.text_eos_id).int().argmax(-1)
    elif pool in ("first", "last"):
        positions = torch.full((ids.shape[0],), 0 if pool == "first" else ids.shape[1] - 1, device=ids.device)
    else:
        return (), None
    attn_mask = getattr(model, "attn_mask", None)
    rows = None if attn_mask is None else attn_mask[: ids.shape[1], : ids.shape[1]][positions]
    blocks = transformer.resblocks
    return blocks, _open_clip_block_forward(blocks[-1], positions, rows)


def _open_clip_image(model: nn.Module, pixel_values: torch.Tensor) -> FastPath:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if (
        type(visual) is not VisionTransformer
        or visual.attn_pool is not None
        or visual.pool_type != "tok"
        or not _open_clip_blocks_ok(visual.transformer)
    ):
        return (), None
    blocks = visual.transformer.resblocks
    zeros = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
    return blocks, _open_clip_block_forward(blocks[-1], zeros, None)
