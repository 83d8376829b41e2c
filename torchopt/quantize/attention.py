"""`explicit_attention(model)`: each ``nn.MultiheadAttention`` rewritten so that ModelOpt can quantize its projections.

``nn.MultiheadAttention`` holds its packed q/k/v projection as a bare parameter (``in_proj_weight``) and passes it,
with ``out_proj``'s weight, to ``F.multi_head_attention_forward``: ModelOpt registers no quantized module for the
first and the quantizers it puts on ``out_proj`` never run (the summary calls them "bypassed"). A ViT-B/16 thus
leaves a third of its Linear FLOPs in float under every INT8/FP8 recipe, where production deployments (TensorRT on
the exported graph) quantize both projections and keep only the attention scores and softmax in float.

`ExplicitAttention` computes the same function with the projections as modules, called as modules: for
self-attention (one tensor as query, key and value) ``in_proj``, an ``nn.Linear`` embed_dim -> 3 x embed_dim on the
same parameter objects (one packed GEMM, as before); for a module the model calls as cross-attention
(`attention_forms`: ``nn.TransformerDecoderLayer``'s second attention) ``q_proj`` and ``kv_proj`` on views of the
same parameters, so that the query's GEMM computes only its third; ``out_proj`` the original one. The attention
between them runs through ``F.scaled_dot_product_attention`` (or explicit softmax when the weights are asked
for). ModelOpt then quantizes the projections like any Linear, keep rules see them by name, and
`torchopt.quantize.deploy` runs them in low precision.

Rewritten: the packed case (``kdim == vdim == embed_dim``) without ``bias_k`` / ``bias_v`` / ``add_zero_attn``,
which is what ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` and torchvision's ViT build. Others
stay as they are, each named with its reason. Without `attention_forms` (no calibration batch to watch) every module
gets the packed layout, which computes cross-attention correctly too, through three times the query's columns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ExplicitAttention", "attention_forms", "explicit_attention"]


def _linear(weight: torch.nn.Parameter, bias: torch.nn.Parameter | None) -> torch.nn.Linear:
    """An nn.Linear holding exactly these parameters (built on the meta device: nothing is allocated)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def _view(packed: torch.nn.Parameter | None, start: int, stop: int) -> torch.nn.Parameter | None:
    """Rows start:stop of a packed parameter as a parameter of their own, on the same storage."""
    return None if packed is None else torch.nn.Parameter(packed[start:stop], requires_grad=packed.requires_grad)


def _unsupported(mha: torch.nn.MultiheadAttention) -> str | None:
    if not mha._qkv_same_embed_dim:
        return f"separate q/k/v projection weights (kdim={mha.kdim}, vdim={mha.vdim}, embed_dim={mha.embed_dim})"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True (learned key/value biases appended to the sequence)"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask as nn.MultiheadAttention reads it (bool: True = not attended; float: added) in additive form."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class ExplicitAttention(torch.nn.Module):
    """``nn.MultiheadAttention``'s forward with its projections as Linear modules on the same parameters: the packed
    ``in_proj``, or with `split` (cross-attention) ``q_proj`` and ``kv_proj``; then ``out_proj``."""

    stands_for = (torch.nn.MultiheadAttention,)  # a keep rule's module_type MultiheadAttention selects it
    # Read by nn.TransformerEncoderLayer / nn.MultiheadAttention's fused fast paths, which would hand the raw
    # in_proj weight (after `deploy`, FP8 or INT8 codes) to a fused kernel: False keeps them on the standard path.
    _qkv_same_embed_dim = False

    def __init__(self, mha: torch.nn.MultiheadAttention, *, split: bool = False):
        super().__init__()
        why = _unsupported(mha)
        if why is not None:
            raise ValueError(f"ExplicitAttention cannot take this nn.MultiheadAttention: {why}")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout, self.split = mha.batch_first, mha.dropout, split
        weight, bias, e = mha.in_proj_weight, mha.in_proj_bias, mha.embed_dim
        if split:  # views of the packed parameters: the caller's storage, two GEMMs that compute what is used
            self.q_proj = _linear(_view(weight, 0, e), _view(bias, 0, e))
            self.kv_proj = _linear(_view(weight, e, 3 * e), _view(bias, e, 3 * e))
        else:
            self.in_proj = _linear(weight, bias)
        self.out_proj = mha.out_proj
        self.train(mha.training)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """Read by nn.TransformerEncoderLayer's fast-path checks (before they reach `_qkv_same_embed_dim`)."""
        return self.q_proj.bias if self.split else self.in_proj.bias

    def _project(self, query, key, value):
        """q, k, v as [batch, heads, length, head_dim]."""
        e = self.embed_dim
        if self.split:
            q = self.q_proj(query)
            kv = self.kv_proj(key)
            k, v = kv.chunk(2, dim=-1) if value is key else (kv[..., :e], self.kv_proj(value)[..., e:])
        elif query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # packed, called as cross-attention: one GEMM per distinct input, the needed slice kept
            q = self.in_proj(query)[..., :e]
            kv = self.in_proj(key)
            k = kv[..., e : 2 * e]
            v = kv[..., 2 * e :] if value is key else self.in_proj(value)[..., 2 * e :]
        return [t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)]

    def _mask(self, attn_mask, key_padding_mask, q, k) -> torch.Tensor | None:
        """One additive mask broadcastable to [batch, heads, L, S], or None."""
        batch, length, source = q.shape[0], q.shape[2], k.shape[2]
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # [batch * heads, L, S]
            mask = mask.view(batch, self.num_heads, length, source)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            # As nn.MultiheadAttention: is_causal is a hint that attn_mask is the causal mask, not a mask itself.
            raise RuntimeError("ExplicitAttention: is_causal=True needs the causal attn_mask as well (a hint only)")
        batched = query.dim() == 3
        # Every input as [batch, length, embed]; one tensor given as two or three inputs stays one (self-attention).
        seen: dict[int, torch.Tensor] = {}
        q_in, k_in, v_in = (seen.setdefault(id(t), self._batch_major(t, batched)) for t in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        q, k, v = self._project(q_in, k_in, v_in)
        mask = self._mask(attn_mask, key_padding_mask, q, k)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # [batch, length, embed]
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _batch_major(self, t: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)


def _is_mha(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.MultiheadAttention


def attention_forms(model: torch.nn.Module, run: Callable[[], Any]) -> dict[str, set[str]]:
    """How `run()` calls each ``nn.MultiheadAttention`` of `model`: {name: {"self", "cross"}} for those it calls.
    A model without one is not run."""
    forms: dict[str, set[str]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            given = [*args, *(kwargs[k] for k in ("query", "key", "value") if k in kwargs)][:3]
            same = len(given) == 3 and given[0] is given[1] and given[1] is given[2]
            forms.setdefault(name, set()).add("self" if same else "cross")

        return record

    handles = [
        m.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, m in model.named_modules() if _is_mha(m)
    ]
    if not handles:
        return forms
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return forms


def explicit_attention(
    model: torch.nn.Module, forms: dict[str, set[str]] | None = None
) -> tuple[torch.nn.Module, list[str], dict[str, str]]:
    """Replace, in place, each supported ``nn.MultiheadAttention`` under `model` by an `ExplicitAttention`.

    `forms` (from `attention_forms`) names the modules called as cross-attention: those get the split layout
    (``q_proj``, ``kv_proj``), the others the packed ``in_proj``. Returns the model
    (a new root when the root itself was one), the names of the rewritten modules and {name: why not} for those
    left as they are. ``nn.TransformerEncoder`` layers whose attention was rewritten are taken off the
    nested-tensor fast path, which calls the raw in_proj weight.
    """
    done: list[str] = []
    left: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not _is_mha(module):
            continue
        why = _unsupported(module)
        if why is not None:
            left[name] = f"kept as nn.MultiheadAttention ({why}): its projections are not quantized"
            continue
        explicit = ExplicitAttention(module, split="cross" in (forms or {}).get(name, ()))
        if not name:
            return explicit, [""], {}
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, explicit)
        done.append(name)
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoder) and module.layers and _rewritten(module.layers[0]):
            module.use_nested_tensor = False
    return model, done, left


def _rewritten(layer: torch.nn.Module) -> bool:
    return isinstance(getattr(layer, "self_attn", None), ExplicitAttention)
