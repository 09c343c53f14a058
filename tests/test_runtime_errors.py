"""Bad input raises an exception that names the problem and the fix; nothing crashes."""

import pytest
import torch

import pregated
from moe_reference import make_runtime, random_experts

H, I = 16, 8


@pytest.fixture
def rt():
    weights = random_experts(2, 4, H, I, "gated_silu", torch.float32, seed=1)
    r = make_runtime(weights, "gated_silu", torch.float32, slots=2)
    yield r
    r.close()


def call(rt, x=None, ids=None, w=None, **kw):
    x = torch.randn(3, H) if x is None else x
    ids = torch.tensor([[0, 1], [1, 2], [2, 3]]) if ids is None else ids
    w = torch.full((3, 2), 0.5) if w is None else w
    return rt.forward(0, x, ids, w, **kw)


def test_wrong_dtype(rt):
    with pytest.raises(ValueError, match=r"x must be torch.float32, got torch.bfloat16; convert it with"):
        call(rt, x=torch.randn(3, H, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        call(rt, ids=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="weights must be a floating-point tensor"):
        call(rt, w=torch.ones(3, 2, dtype=torch.long))


def test_wrong_shape(rt):
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 16\] \(tokens, hidden\), got \[3, 15\]"):
        call(rt, x=torch.randn(3, H - 1))
    with pytest.raises(ValueError, match=r"ids must have shape \[3, K\]"):
        call(rt, ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weights must have shape \[3, 2\]"):
        call(rt, w=torch.ones(3, 3))
    with pytest.raises(ValueError, match="top_k 5 is larger than the number of experts 4"):
        call(rt, ids=torch.zeros(3, 5, dtype=torch.long), w=torch.ones(3, 5))


def test_wrong_device_and_layout(rt):
    with pytest.raises(ValueError, match=r"x is on meta but the runtime runs on cpu; move it with .to\('cpu'\)"):
        call(rt, x=torch.empty(3, H, device="meta"))
    with pytest.raises(ValueError, match="x must be contiguous"):
        call(rt, x=torch.randn(H, 3).T)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        call(rt, x=[[0.0] * H] * 3)


def test_expert_id_out_of_range(rt):
    with pytest.raises(ValueError, match=r"expert id 4 at token 2, k 1 is out of range: the layer has 4 experts \(ids 0..3\)"):
        call(rt, ids=torch.tensor([[0, 1], [1, 2], [2, 4]]))
    with pytest.raises(ValueError, match="expert id -1"):
        call(rt, ids=torch.tensor([[0, 1], [1, 2], [2, -1]]))
    with pytest.raises(ValueError, match="layer 2 is out of range: the model has 2 MoE layers"):
        rt.forward(2, torch.randn(1, H), torch.tensor([[0]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="prefetch: expert id 7"):
        rt.prefetch(0, [7])
    rt.check()  # nothing was left half done


def test_budget_smaller_than_one_expert():
    one = pregated.expert_bytes(H, I, "gated_silu", "float32")
    with pytest.raises(ValueError, match=rf"smaller than one expert: give at least {one} bytes"):
        pregated.Runtime(1, 4, H, I, dtype="float32", expert_memory=one - 1)
    with pytest.raises(ValueError, match="cannot read a byte count from 'lots'"):
        pregated.Runtime(1, 4, H, I, dtype="float32", expert_memory="lots")


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        pregated.Runtime(1, 4, H, I, dtype="float8")
    with pytest.raises(ValueError, match="unknown ffn kind 'swiglu'"):
        pregated.Runtime(1, 4, H, I, ffn="swiglu")
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo': use lru, lfu or none"):
        pregated.Runtime(1, 4, H, I, eviction="fifo")
    with pytest.raises(ValueError, match="device 'tpu' is not supported"):
        pregated.Runtime(1, 4, H, I, device="tpu")
    with pytest.raises(ValueError, match="at least one MoE layer"):
        pregated.Runtime(0, 4, H, I)


@pytest.mark.skipif(pregated.build_info()["cuda_devices"] > 0, reason="this machine has a CUDA device")
def test_cuda_without_a_device_says_so():
    with pytest.raises(RuntimeError, match="(no usable CUDA device|has no CUDA backend)"):
        pregated.Runtime(1, 4, H, I, device="cuda")


def test_set_expert_checks(rt):
    with pytest.raises(ValueError, match="unknown part 'w1' for a gated_silu expert: use one of gate, up, down"):
        rt.set_expert(0, 0, "w1", torch.zeros(I, H))
    with pytest.raises(ValueError, match=r"weight 'down' must have shape \[16, 8\]"):
        rt.set_expert(0, 0, "down", torch.zeros(I, H))
    with pytest.raises(ValueError, match="expert 9 is out of range"):
        rt.set_expert(0, 9, "gate", torch.zeros(I, H))


def test_use_after_close(rt):
    rt.close()
    assert rt.closed
    for fn in (lambda: call(rt), lambda: rt.prefetch(0, [1]), lambda: rt.pin(0, 1), rt.check):
        with pytest.raises(RuntimeError, match="closed"):
            fn()
    rt.close()  # closing twice is harmless
