"""`ExplicitAttention` computes what the nn.MultiheadAttention it replaces computes, on every call form PyTorch's
own modules and torchvision's ViT use; `explicit_attention` rewrites what it supports and names what it leaves."""

import copy

import pytest
import torch
import torch.nn.functional as F

import torchopt.quantize as tq
from torchopt.quantize.attention import ExplicitAttention, attention_forms, explicit_attention

E, H, L, S, B = 32, 4, 5, 7, 3


def _mha(**kwargs):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(E, H, **kwargs).eval()


def _pair(**kwargs):
    mha = _mha(**kwargs)
    return mha, ExplicitAttention(copy.deepcopy(mha))


def _same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_self_attention_matches(batch_first, need_weights, average):
    mha, explicit = _pair(batch_first=batch_first)
    x = _x(B, L, E) if batch_first else _x(L, B, E)
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    _same(mha(x, x, x, **kwargs), explicit(x, x, x, **kwargs))


@pytest.mark.parametrize("value_is_key", [True, False])
def test_cross_attention_matches(value_is_key):
    mha, explicit = _pair(batch_first=True)
    q, k = _x(B, L, E), _x(B, S, E, seed=2)
    v = k if value_is_key else _x(B, S, E, seed=3)
    _same(mha(q, k, v), explicit(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_masks_match(dtype):
    mha, explicit = _pair(batch_first=True)
    x = _x(B, L, E)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -2:] = True
    if dtype is not torch.bool:
        causal, padding = (torch.zeros(m.shape).masked_fill(m, -1e4) for m in (causal, padding))
    for kwargs in (
        {"attn_mask": causal},
        {"key_padding_mask": padding},
        {"attn_mask": causal, "key_padding_mask": padding, "need_weights": False},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
        {"attn_mask": causal.expand(B * H, L, L).contiguous()},  # one mask per batch item and head
    ):
        _same(mha(x, x, x, **kwargs), explicit(x, x, x, **kwargs))


def test_unbatched_input_matches():
    mha, explicit = _pair()
    x = _x(L, E)
    _same(mha(x, x, x), explicit(x, x, x))
    padding = torch.tensor([False] * (L - 1) + [True])
    _same(mha(x, x, x, key_padding_mask=padding), explicit(x, x, x, key_padding_mask=padding))
    _same(mha(x, x, x, need_weights=False), explicit(x, x, x, need_weights=False))


def test_without_bias_matches():
    mha, explicit = _pair(bias=False, batch_first=True)
    assert explicit.in_proj.bias is None and explicit.in_proj_bias is None
    x = _x(B, L, E)
    _same(mha(x, x, x), explicit(x, x, x))


def test_is_causal_without_its_mask_is_refused_as_multihead_attention_refuses_it():
    _, explicit = _pair(batch_first=True)
    x = _x(B, L, E)
    with pytest.raises(RuntimeError, match="is_causal=True needs the causal attn_mask"):
        explicit(x, x, x, is_causal=True)


def test_the_projections_are_linear_modules_holding_the_same_parameters():
    mha = _mha()
    explicit = ExplicitAttention(mha)
    assert type(explicit.in_proj) is torch.nn.Linear and explicit.in_proj.weight is mha.in_proj_weight
    assert explicit.in_proj.bias is mha.in_proj_bias and explicit.out_proj is mha.out_proj
    assert explicit.in_proj.weight.shape == (3 * E, E)


def test_calls_go_through_both_projection_modules():
    _, explicit = _pair(batch_first=True)
    called = []
    for name in ("in_proj", "out_proj"):
        getattr(explicit, name).register_forward_hook(lambda m, a, o, name=name: called.append(name))
    x = _x(B, L, E)
    explicit(x, x, x, need_weights=False)
    assert called == ["in_proj", "out_proj"]  # self-attention: one packed projection GEMM


def _encoder(nested=True):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # the float model's fast path
@pytest.mark.parametrize("grad", [True, False])
def test_a_transformer_encoder_computes_the_same_after_the_rewrite(grad):
    """Under no_grad the float encoder takes PyTorch's fused fast path (nested tensors with a padding mask);
    the rewritten one must take the standard path and agree with it."""
    model = _encoder()
    rewritten, done, left = explicit_attention(copy.deepcopy(model))
    assert sorted(done) == ["layers.0.self_attn", "layers.1.self_attn"] and not left
    assert rewritten.use_nested_tensor is False
    x = _x(B, L, E)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, -2:] = True
    with torch.set_grad_enabled(grad):
        expected, got = model(x, src_key_padding_mask=padding), rewritten(x, src_key_padding_mask=padding)
    keep = ~padding  # the fast path leaves padded positions as zeros, the standard path computes them
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_a_torchvision_vit_computes_the_same_after_the_rewrite():
    vision = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    vit = vision.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()
    rewritten, done, _ = explicit_attention(copy.deepcopy(vit))
    assert sorted(done) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    x = _x(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), vit(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"kdim": 16, "vdim": 16}, "separate q/k/v projection weights"),
        ({"add_bias_kv": True}, "add_bias_kv=True"),
        ({"add_zero_attn": True}, "add_zero_attn=True"),
    ],
)
def test_an_unsupported_attention_is_left_with_its_reason(kwargs, why):
    model = torch.nn.Sequential(_mha(**kwargs))
    same, done, left = explicit_attention(model)
    assert same is model and type(model[0]) is torch.nn.MultiheadAttention and not done
    assert why in left["0"] and "not quantized" in left["0"]
    with pytest.raises(ValueError, match=why):
        ExplicitAttention(model[0])


def test_a_root_attention_is_returned_as_the_new_root():
    mha = _mha()
    root, done, _ = explicit_attention(mha)
    assert isinstance(root, ExplicitAttention) and done == [""]


class _Doubled(torch.nn.Linear):
    """A projection whose module call differs from its raw weight, as a deployed FP8 layer's does."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_the_fused_fast_paths_never_see_the_rewritten_module():
    """nn.TransformerEncoderLayer's fast path hands self_attn's raw in_proj weight to a fused kernel; after a
    deploy those are FP8/INT8 codes, so the layer must call the in_proj module instead, fast path enabled or not."""
    layer, _, _ = explicit_attention(_encoder(nested=False).layers[0])
    layer.self_attn.in_proj.__class__ = _Doubled
    x = _x(B, L, E)
    with torch.no_grad():
        got = layer(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            standard = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(got, standard)


def test_the_rewritten_encoder_exports_with_a_dynamic_batch():
    model, _, _ = explicit_attention(_encoder(nested=False))
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (_x(B, L, E),), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(program.module()(_x(5, L, E, seed=4)), model(_x(5, L, E, seed=4)))


def test_a_keep_rule_on_multihead_attention_keeps_the_rewritten_module():
    model = _encoder(nested=False)
    q = tq.quantize(
        model, "int8", [_x(2, L, E)], progress=False, keep=[{"module_type": "MultiheadAttention", "reason": "r"}]
    )
    rows = {r["module"]: r for r in tq.summary(q).rows}
    assert rows["layers.0.self_attn"]["status"] == "kept" and rows["layers.0.self_attn"]["why"] == "r"
    assert rows["layers.0.self_attn.in_proj"]["status"] == "kept"
    assert rows["layers.0.linear1"]["status"] == "quantized"


def test_a_failed_quantization_puts_the_multihead_attention_back():
    model = _encoder(nested=False)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="matches no module"):
        tq.quantize(model, "int8", [_x(2, L, E)], progress=False, keep=["no_such_layer"])
    assert type(model.layers[0].self_attn) is torch.nn.MultiheadAttention
    x = _x(B, L, E)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before(x))
    assert tq.summary(tq.quantize(model, "int8", [_x(2, L, E)], progress=False)).bypassed == []


class _Decoder(torch.nn.Module):
    """A decoder layer: self-attention on the target, cross-attention from it to the memory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.TransformerDecoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, tgt):
        return self.layer(tgt, tgt.flip(1))


def test_attention_forms_tell_self_from_cross_attention():
    model, x = _Decoder().eval(), _x(B, L, E)
    forms = attention_forms(model, lambda: model(x))
    assert forms == {"layer.self_attn": {"self"}, "layer.multihead_attn": {"cross"}}
    assert not model.layer.self_attn._forward_pre_hooks  # the recording hooks are gone


def test_quantize_gives_the_cross_attention_the_split_layout():
    model = _Decoder().eval()
    reference, x = copy.deepcopy(model), _x(B, L, E)
    q = tq.quantize(model, "int8", [_x(2, L, E)], progress=False)
    assert not q.layer.self_attn.split and q.layer.multihead_attn.split
    quantized = tq.summary(q).quantized
    for name in ("self_attn.in_proj", "multihead_attn.q_proj", "multihead_attn.kv_proj", "multihead_attn.out_proj"):
        assert f"layer.{name}" in quantized
    assert "2 nn.MultiheadAttention rewritten" in q.torchopt_quant.notes[0]
    with torch.no_grad():
        assert F.cosine_similarity(q(x).flatten(), reference(x).flatten(), dim=0) > 0.99


@pytest.mark.parametrize("form", ["value_is_key", "all_distinct", "self"])
def test_the_split_layout_matches(form):
    mha = _mha(batch_first=True)
    explicit = ExplicitAttention(copy.deepcopy(mha), split=True)
    q, k = _x(B, L, E), _x(B, S, E, seed=2)
    args = {"value_is_key": (q, k, k), "all_distinct": (q, k, _x(B, S, E, seed=3)), "self": (q, q, q)}[form]
    _same(mha(*args), explicit(*args))


def test_the_split_projections_are_views_of_the_packed_parameters():
    mha = _mha()
    explicit = ExplicitAttention(mha, split=True)
    assert explicit.q_proj.weight.shape == (E, E) and explicit.kv_proj.weight.shape == (2 * E, E)
    assert explicit.q_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()
    assert explicit.kv_proj.bias.data_ptr() == mha.in_proj_bias[E:].data_ptr()
    assert not hasattr(explicit, "in_proj") and explicit.in_proj_bias is explicit.q_proj.bias


def test_attention_forms_does_not_run_a_model_without_multihead_attention():
    ran = []
    assert attention_forms(torch.nn.Linear(E, E), lambda: ran.append(1)) == {} and not ran
