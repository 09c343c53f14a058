"""transformers' RMSNorm and softmax-top-k routers as one call of the CPU backend (`cpu_fused.py`):
the kernels against transformers' own modules, the swap made only where a module's forward gives
what the fused call gives, and the calls it cannot take left to the module's own forward."""

import pytest
import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm, MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from pregated import _core
from pregated.cpu_fused import use_fused_norms, use_fused_routers
from pregated.engine import Engine

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _norm(n, dtype, eps=1e-6, seed=0):
    norm = MixtralRMSNorm(n, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(1, 512), (3, 67), (300, 512), (2, 2048)])
def test_rms_norm_against_transformers_module(dtype, rows, n, kernels):
    norm = _norm(n, dtype)
    g = torch.Generator().manual_seed(rows + n)
    # rows whose mean square is far above eps, near it and below it
    x = (torch.randn(rows, n, generator=g) * torch.logspace(-4, 1, rows)[:, None]).to(dtype)
    want = norm(x)
    for isa in ("portable", "best"):
        kernels(isa)
        out = torch.full_like(x, float("nan"))
        _core.cpu_rms_norm(x, norm.weight.data, norm.variance_epsilon, out)
        if dtype == torch.float32:  # only the order of the sum of squares differs
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        else:  # ... which may move a rounding by one unit, seldom
            assert (out != want).float().mean().item() < 0.01, isa
            torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-3 * want.abs().max().item())


def test_rms_norm_refuses_bad_tensors():
    x, w, out = torch.zeros(2, 8), torch.ones(8), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        _core.cpu_rms_norm(x, torch.ones(9), 1e-6, out)
    with pytest.raises(ValueError, match="out"):
        _core.cpu_rms_norm(x, w, 1e-6, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="bfloat16"):
        _core.cpu_rms_norm(x, w.bfloat16(), 1e-6, out)
    with pytest.raises(ValueError, match="contiguous"):
        _core.cpu_rms_norm(torch.zeros(8, 2).T, w, 1e-6, out)


class GemmaLikeRMSNorm(torch.nn.Module):  # scales by 1 + weight
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class OtherEpsRMSNorm(MixtralRMSNorm):  # says 1e-6, adds eps outside the root
    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)


class GatedRMSNorm(MixtralRMSNorm):  # takes a gate as well
    def forward(self, x, gate=None):
        out = super().forward(x)
        return out if gate is None else out * torch.sigmoid(gate)


def test_only_norms_that_compute_rms_norm_are_swapped():
    model = torch.nn.ModuleList([_norm(64, torch.float32), GemmaLikeRMSNorm(64), OtherEpsRMSNorm(64),
                                 GatedRMSNorm(64), _norm(64, torch.bfloat16)])
    patched = _norm(64, torch.float32)
    patched.forward = lambda x: x  # a forward set on the instance (tensor parallelism does this)
    model.append(patched)
    assert use_fused_norms(model) == 2
    assert [hasattr(m, "_pregated_eps") for m in model] == [True, False, False, False, True, False]


def test_a_swapped_norm_gives_transformers_output_and_leaves_autograd_to_it(monkeypatch):
    norm, ref = _norm(48, torch.float32), _norm(48, torch.float32)
    assert use_fused_norms(torch.nn.Sequential(norm)) == 1
    calls = []
    real = _core.cpu_rms_norm
    monkeypatch.setattr(_core, "cpu_rms_norm", lambda *a: (calls.append(a[0].shape), real(*a)))
    with torch.inference_mode():
        x = torch.randn(2, 3, 48)
        torch.testing.assert_close(norm(x), ref(x), rtol=1e-5, atol=1e-6)
        assert calls == [(6, 48)]
        torch.testing.assert_close(norm(x.bfloat16()), ref(x.bfloat16()))  # mixed dtypes: its own forward
        assert len(calls) == 1
    x = torch.randn(4, 48, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and len(calls) == 1


def _router(kind, dtype, seed=0):
    if kind == "mixtral":
        router = MixtralTopKRouter(MixtralConfig(hidden_size=96, num_local_experts=8, num_experts_per_tok=2))
    elif kind == "olmoe":  # no normalisation, weights in the logits' dtype
        router = OlmoeTopKRouter(OlmoeConfig(hidden_size=96, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False))
    else:  # normalised, weights in the logits' dtype
        router = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=96, num_experts=12, num_experts_per_tok=3,
                                                   norm_topk_prob=True))
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return router.to(dtype)


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_swapped_router_chooses_as_transformers_router(kind, dtype):
    router, ref = _router(kind, dtype), _router(kind, dtype)
    assert use_fused_routers(torch.nn.Sequential(router)) == 1
    want_form = (kind != "olmoe", kind != "mixtral" and dtype != torch.float32)
    assert (router._pregated_normalize, router._pregated_cast) == want_form
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in (1, 5, 40):
            x = torch.randn(rows, 96, generator=g).to(dtype)
            logits, weights, ids = router(x)
            want_logits, want_weights, want_ids = ref(x)
            assert logits.dtype == want_logits.dtype and weights.dtype == want_weights.dtype and ids.dtype == torch.int64
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(logits.float(), want_logits.float(), rtol=tol, atol=tol)
            # the same experts, or ones of equal probability (bf16 and fp16 logits tie)
            probs = torch.softmax(want_logits.float(), dim=-1)
            torch.testing.assert_close(probs.gather(1, ids), probs.gather(1, want_ids), rtol=tol, atol=tol)
            torch.testing.assert_close(weights.float(), want_weights.float(), rtol=tol, atol=tol)


class SigmoidRouter(MixtralTopKRouter):  # DeepSeek-like scoring
    def forward(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        values, ids = torch.topk(logits.sigmoid(), self.top_k, dim=-1)
        return logits, values, ids


class TopKThenSoftmaxRouter(MixtralTopKRouter):  # GPT-OSS-like order
    def forward(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        values, ids = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(values, dim=-1) * 2, ids


def test_routers_with_other_rules_keep_their_forward():
    cfg = MixtralConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=2)
    routers = torch.nn.ModuleList([SigmoidRouter(cfg), TopKThenSoftmaxRouter(cfg), MixtralTopKRouter(cfg)])
    for r in routers:
        torch.nn.init.normal_(r.weight, std=0.3)
    assert use_fused_routers(routers) == 1
    assert [hasattr(r, "_pregated_normalize") for r in routers] == [False, False, True]


def test_route_refuses_bad_tensors():
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    logits, weights, ids = torch.zeros(2, 4), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids"):
        _core.cpu_route(x, w, 2, True, logits, weights, ids.int())
    with pytest.raises(ValueError, match="weights"):
        _core.cpu_route(x, w, 2, True, logits, torch.zeros(2, 3), ids)
    with pytest.raises(ValueError, match="top_k"):
        _core.cpu_route(x, w, 5, True, torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.int64))


def test_the_engine_fuses_norms_routers_and_projections_on_the_cpu(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        norms = [m for m in eng.model.modules() if type(m).__name__.endswith("RMSNorm")]
        routers = [m for m in eng.model.modules() if type(m).__name__.endswith("Router")]
        assert norms and all(hasattr(m, "_pregated_eps") for m in norms)
        assert routers and all(hasattr(m, "_pregated_normalize") for m in routers)
        attn = eng.model.model.layers[0].self_attn
        group = attn.q_proj._pregated_siblings
        assert group is not None and attn.k_proj._pregated_siblings is group and attn.v_proj._pregated_siblings is group


# --- attention of a decode step ---------------------------------------------------------------

from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeAttention  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention  # noqa: E402
from transformers import Qwen3MoeConfig  # noqa: E402

from pregated.cpu_dense import use_cpu_pool_for_dense  # noqa: E402
from pregated.cpu_fused import use_lean_attention  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_against_transformers(dtype, kernels):
    B, L, Hq, Hkv, D = 2, 3, 8, 2, 64
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, L, Hq, D, generator=g).to(dtype), torch.randn(B, L, Hkv, D, generator=g).to(dtype)
    angles = torch.rand(B, L, D // 2, generator=g) * 6.3
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    for isa in ("portable", "best"):
        kernels(isa)
        x = torch.cat([q.reshape(B * L, -1), k.reshape(B * L, -1), torch.ones(B * L, 5, dtype=dtype)], 1)
        _core.cpu_rope(x, cos.reshape(B * L, D), sin.reshape(B * L, D), Hq + Hkv)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)  # rounded as PyTorch's ops
        torch.testing.assert_close(x[:, :Hq * D].view(B, L, Hq, D).transpose(1, 2), want_q, **tol)
        torch.testing.assert_close(x[:, Hq * D:(Hq + Hkv) * D].view(B, L, Hkv, D).transpose(1, 2), want_k, **tol)
        assert torch.equal(x[:, (Hq + Hkv) * D:], torch.ones(B * L, 5, dtype=dtype))  # past the heads: untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("new,old", [(1, 0), (1, 37), (3, 5), (2, 300)])
def test_attention_against_float64_sdpa(dtype, new, old, kernels):
    B, Hq, Hkv, D = 2, 8, 2, 64
    g = torch.Generator().manual_seed(new * 1000 + old)
    keys = old + new
    q = torch.randn(B, new, Hq * D + 16, generator=g).to(dtype)  # q heads lead each row, then other columns
    k, v = (torch.randn(B, Hkv, keys, D, generator=g).to(dtype) for _ in range(2))
    causal = torch.ones(new, keys, dtype=torch.bool).tril(old)
    qh = q[..., :Hq * D].view(B, new, Hq, D).transpose(1, 2).double()
    want = torch.nn.functional.scaled_dot_product_attention(
        qh, k.double().repeat_interleave(Hq // Hkv, 1), v.double().repeat_interleave(Hq // Hkv, 1),
        attn_mask=causal, scale=0.11).transpose(1, 2).reshape(B * new, Hq * D)
    for isa in ("portable", "best"):
        kernels(isa)
        out = torch.full((B * new, Hq * D), float("nan"), dtype=dtype)
        _core.cpu_attention(q.reshape(B * new, -1), k, v, Hq, 0.11, out)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_rope_and_attention_refuse_bad_tensors():
    x, cs = torch.zeros(2, 64), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="must fit"):
        _core.cpu_rope(x, cs, cs, 5)
    with pytest.raises(ValueError, match="sin"):
        _core.cpu_rope(x, cs, torch.zeros(3, 16), 2)
    k = torch.zeros(2, 2, 4, 8)
    with pytest.raises(ValueError, match="whole rows per sequence"):
        _core.cpu_attention(torch.zeros(3, 32), k, k, 4, 1.0, torch.zeros(3, 32))
    with pytest.raises(ValueError, match="multiple"):
        _core.cpu_attention(torch.zeros(2, 24), k, k, 3, 1.0, torch.zeros(2, 24))
    with pytest.raises(ValueError, match="out"):
        _core.cpu_attention(torch.zeros(2, 32), k, k, 4, 1.0, torch.zeros(2, 30))


def _attention(kind, dtype):
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = MixtralConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
        cls = MixtralAttention
    elif kind == "qwen3_moe":  # q_norm / k_norm over each head
        cfg = Qwen3MoeConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
        cls = Qwen3MoeAttention
    else:  # q_norm / k_norm over the whole projection, values clipped
        cfg = OlmoeConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, clip_qkv=0.5)
        cls = OlmoeAttention
    cfg._attn_implementation = "sdpa"
    parent = torch.nn.Module()
    parent.attn = cls(cfg, layer_idx=0)
    for p in parent.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.1)
        if p.dim() == 1:
            p.data += 1
    return parent.to(dtype), MixtralRotaryEmbedding(cfg) if kind != "qwen3_moe" else None, cfg


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lean_attention_decodes_as_transformers_attention(kind, dtype, monkeypatch):
    import copy

    parent, _, cfg = _attention(kind, dtype)
    ref = copy.deepcopy(parent)
    use_cpu_pool_for_dense(parent)
    assert use_lean_attention(parent) == 1
    calls = []
    real = _core.cpu_attention
    monkeypatch.setattr(_core, "cpu_attention", lambda *a: (calls.append(a[0].shape), real(*a)))
    head_dim = parent.attn.head_dim
    caches = [DynamicCache(), DynamicCache()]
    g = torch.Generator().manual_seed(3)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.inference_mode():
        for step, new in enumerate([4, 1, 1, 1]):  # a prefill (its own forward), then decode steps
            h = torch.randn(2, new, 128, generator=g).to(dtype)
            angles = torch.rand(2, new, head_dim // 2, generator=g) * 6.3
            pe = tuple(t.to(dtype) for t in (torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()))
            want, _ = ref.attn(hidden_states=h, position_embeddings=pe, attention_mask=None, cache=caches[0])
            got, _ = parent.attn(hidden_states=h, position_embeddings=pe, attention_mask=None, cache=caches[1])
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
            assert len(calls) == step  # the prefill of 4 tokens went to transformers' forward
        mask = torch.ones(2, 1, 1, 1, dtype=torch.bool)  # with a mask: transformers' forward
        parent.attn(hidden_states=h, position_embeddings=pe, attention_mask=mask, cache=DynamicCache())
        assert len(calls) == 3
    a, b = caches[0].layers[0], caches[1].layers[0]
    torch.testing.assert_close(b.keys.float(), a.keys.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(b.values.float(), a.values.float(), rtol=tol, atol=tol)


class SinkAttention(MixtralAttention):  # an extra parameter (GPT-OSS-like sinks)
    def __init__(self, cfg, layer_idx):
        super().__init__(cfg, layer_idx)
        self.sinks = torch.nn.Parameter(torch.zeros(cfg.num_attention_heads))


class HalfScaleAttention(MixtralAttention):  # scales the output: the check catches it
    def forward(self, *args, **kwargs):
        out, w = super().forward(*args, **kwargs)
        return out * 0.5, w


def test_attention_that_is_not_llama_style_keeps_its_forward():
    cfg = MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    model = torch.nn.ModuleList([SinkAttention(cfg, 0), HalfScaleAttention(cfg, 0), MixtralAttention(cfg, 0)])
    use_cpu_pool_for_dense(model)
    assert use_lean_attention(model) == 1
    assert ["forward" in vars(m) for m in model] == [False, False, True]
