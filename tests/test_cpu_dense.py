"""Dense layers of a CPU decode step on the runtime's pool (`cpu_dense.py`): the kernel against a
float64 matmul, the Engine's nn.Linear layers routed only for few rows, PyTorch's thread count and the pool's
spin raised for a decode loop and restored after it (also when a stream is left early)."""

import pytest
import torch

from pregated import _core
from pregated.cpu_dense import (HUGE_PAGE, LEAN_PREFILL_ROWS, MAX_ROWS, decode_threads,
                                huge_pages_available, place_on_huge_pages, use_cpu_pool_for_dense)
from pregated.engine import Engine

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # output rounded to its dtype


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 53), (200, 512), (1000, 72)])
def test_cpu_linear_against_a_float64_matmul(dtype, rows, n, k, kernels):
    for isa in ("portable", "best"):
        kernels(isa)
        g = torch.Generator().manual_seed(rows * n + k)
        x = torch.randn(rows, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        out = torch.full((rows, n), float("nan"), dtype=dtype)
        _core.cpu_linear(x, w, out)
        want = x.double() @ w.double().T
        err = ((out.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err < TOL[dtype], (isa, err)


def test_cpu_linear_refuses_bad_tensors():
    x, w, out = torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="weight"):
        _core.cpu_linear(x, torch.zeros(4, 9), out)
    with pytest.raises(ValueError, match="out"):
        _core.cpu_linear(x, w, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="bfloat16"):
        _core.cpu_linear(x, w.bfloat16(), out)
    with pytest.raises(ValueError, match="contiguous"):
        _core.cpu_linear(torch.zeros(8, 2).T, w, out)


def test_linear_layers_use_the_pool_for_few_rows_only(monkeypatch):
    lin = torch.nn.Linear(16, 24)
    plain = torch.nn.Linear(16, 24)
    plain.load_state_dict(lin.state_dict())
    assert use_cpu_pool_for_dense(torch.nn.Sequential(lin)) == 1
    calls = []
    real = _core.cpu_linear
    monkeypatch.setattr(_core, "cpu_linear", lambda *a: (calls.append(a[0].shape[0]), real(*a)))
    with torch.inference_mode():
        for shape in [(1, 16), (2, 4, 16), (1, 1, 16), (3, 3, 16), (MAX_ROWS + 1, 16)]:
            x = torch.randn(*shape)
            assert torch.allclose(lin(x), plain(x), atol=1e-5), shape
    assert calls == [1, 8, 1]  # 9 rows: PyTorch's
    with torch.inference_mode(), decode_threads("cpu"):  # PyTorch on one thread: every row count on the pool
        x = torch.randn(40, 16)
        assert torch.allclose(lin(x), plain(x), atol=1e-5)
    assert calls == [1, 8, 1, 40]
    x = torch.randn(2, 16, requires_grad=True)  # autograd stays with PyTorch
    lin(x).sum().backward()
    assert x.grad is not None and calls == [1, 8, 1, 40]


class Attention(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 24, bias=bias)
        self.k_proj = torch.nn.Linear(16, 8, bias=bias)
        self.v_proj = torch.nn.Linear(16, 8, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_sibling_projections_share_one_call(bias, monkeypatch):
    torch.manual_seed(0)
    attn, plain = Attention(bias), Attention(bias)
    plain.load_state_dict(attn.state_dict())
    assert use_cpu_pool_for_dense(attn) == 3
    group = attn.q_proj._pregated_siblings
    assert group is not None and attn.k_proj._pregated_siblings is group and attn.v_proj._pregated_siblings is group
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + 24 * 16 * 4  # side by side
    calls = []
    real = _core.cpu_linear
    monkeypatch.setattr(_core, "cpu_linear", lambda *a: (calls.append(a[1].shape[0]), real(*a)))
    with torch.inference_mode():
        x = torch.randn(2, 16)
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(attn, name)(x), getattr(plain, name)(x))
        assert calls == [40] and group.last is None  # one call; the input let go after the last sibling
        other = torch.randn(2, 16)  # k_proj on another input than q_proj's: a new pass for all three
        attn.q_proj(x)
        torch.testing.assert_close(attn.k_proj(other), plain.k_proj(other))
        torch.testing.assert_close(attn.v_proj(other), plain.v_proj(other))
        assert calls == [40, 40, 40]
        attn.v_proj.weight = torch.nn.Parameter(torch.randn(8, 16))  # replaced: no longer a view of the group's
        plain.v_proj.weight = attn.v_proj.weight
        torch.testing.assert_close(attn.v_proj(x), plain.v_proj(x))
        assert calls == [40, 40, 40, 8]


@pytest.mark.parametrize("huge", [True, False])
def test_siblings_on_huge_pages_are_viewed_where_they_lie(huge, monkeypatch):
    if huge and not huge_pages_available():
        pytest.skip("this kernel offers no transparent huge pages")
    if not huge:
        monkeypatch.setenv("PREGATED_HUGE_PAGES", "0")
    torch.manual_seed(0)
    model, plain = torch.nn.Sequential(torch.nn.Linear(16, 16), Attention(True)), torch.nn.Sequential(
        torch.nn.Linear(16, 16), Attention(True))
    plain.load_state_dict(model.state_dict())
    place_on_huge_pages(model)
    use_cpu_pool_for_dense(model)
    attn = model[1]
    group = attn.q_proj._pregated_siblings
    shared = group.weight.untyped_storage().data_ptr() == model[0].weight.untyped_storage().data_ptr()
    assert shared == huge  # in the arena, not a copy beside it; else one buffer of their own
    assert group.weight.data_ptr() == attn.q_proj.weight.data_ptr()
    with torch.inference_mode():
        x = torch.randn(1, 16)
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(attn, name)(x), getattr(plain[1], name)(x))


def test_siblings_with_different_inputs_stay_apart():
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(16, 32), torch.nn.Linear(12, 32)
    lone = torch.nn.Module()
    lone.q_proj, lone.k_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)  # no v_proj
    assert use_cpu_pool_for_dense(torch.nn.ModuleList([mlp, lone])) == 4
    assert all(m._pregated_siblings is None for m in (mlp.gate_proj, mlp.up_proj, lone.q_proj, lone.k_proj))


@pytest.mark.skipif(not huge_pages_available(), reason="this kernel offers no transparent huge pages")
def test_dense_weights_move_to_huge_pages_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 24), torch.nn.Linear(24, 24), torch.nn.Linear(24, 300))
    model[2].weight = model[0].weight  # tied, as an LM head often is
    model[1].to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 300, (5,))
    ref = model[2](model[1](model[0](x).bfloat16()).float())
    moved = place_on_huge_pages(model)
    assert moved >= sum(p.numel() * p.element_size() for p in before.values())
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert min(ptrs) % HUGE_PAGE == 0 and all(p % 64 == 0 for p in ptrs)
    assert model[2].weight is model[0].weight  # still one parameter
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.equal(model[2](model[1](model[0](x).bfloat16()).float()), ref)


def test_huge_pages_can_be_refused(monkeypatch):
    monkeypatch.setenv("PREGATED_HUGE_PAGES", "0")
    model = torch.nn.Linear(8, 8)
    ptr = model.weight.data_ptr()
    assert place_on_huge_pages(model) == 0 and model.weight.data_ptr() == ptr


def test_decode_restores_torch_threads_and_the_pools_spin(mixtral_folder, monkeypatch):
    before, spin = torch.get_num_threads(), _core.cpu_spin_us()
    monkeypatch.setenv("PREGATED_DECODE_SPIN_US", str(spin + 777))
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.generate("hello", max_new_tokens=4)
        assert torch.get_num_threads() == before and _core.cpu_spin_us() == spin
        stream = eng.generate("hello", max_new_tokens=16, stream=True)
        next(iter(stream))
        assert torch.get_num_threads() == 1 and _core.cpu_spin_us() == spin + 777  # inside the loop
        stream._pieces.close()  # a caller leaving the stream early
        assert torch.get_num_threads() == before and _core.cpu_spin_us() == spin
        # with a copy thread that needs the cores the pool does not spin longer
        eng.reconfigure(policy="pregated", expert_memory=eng.cfg.all_expert_bytes() // 2)
        stream = eng.generate("hello", max_new_tokens=16, stream=True)
        next(iter(stream))
        assert torch.get_num_threads() == 1 and _core.cpu_spin_us() == spin
        stream._pieces.close()


def test_a_short_prefill_runs_like_decode_a_long_one_keeps_torchs_threads(mixtral_folder, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
            seen = []
            real = eng._prefill
            monkeypatch.setattr(eng, "_prefill", lambda p: (seen.append(torch.get_num_threads()), real(p))[1])
            eng.generate([5] * 20, max_new_tokens=2)
            eng.generate([[5] * (LEAN_PREFILL_ROWS // 2 + 1)] * 2, max_new_tokens=2)  # 2 x 129 rows
            assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_decode_spin_must_be_a_whole_number(monkeypatch):
    monkeypatch.setenv("PREGATED_DECODE_SPIN_US", "fast")
    with pytest.raises(ValueError, match="PREGATED_DECODE_SPIN_US='fast'"):
        with decode_threads("cpu"):
            pass
    monkeypatch.setenv("PREGATED_DECODE_SPIN_US", "0")
    spin = _core.cpu_spin_us()
    with decode_threads("cpu"):
        assert _core.cpu_spin_us() == spin  # never lowered below the pool's own spin
    assert _core.cpu_spin_us() == spin
