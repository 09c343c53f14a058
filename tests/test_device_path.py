"""The device path (MoEExecutor.on_device, runtime.forward_device): an offloading policy's decode
blocks keep their routing on the device. An expert in no ready slot is read in place from the
expert store; the runtime's route reader learns each block's routing (and the pre-gate's
prediction) one step behind, off the Python thread, and loads and prefetches from it. On the CPU
the engine takes it only when asked (moe.device_path = True); on a GPU it is the default."""

import pytest
import torch

from pregated import _core
from pregated.engine import Engine
from pregated.moe import device_path_wanted
from conftest import decode_step_without_sync
from moe_reference import TOLERANCE, make_runtime, moe_reference, random_experts, random_routing, relative_error
from test_engine_parity import FAMILIES

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CORE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def generate(eng, n=12):
    return [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ffn,has_bias", [("gated_silu", False), ("gated_swiglu_oai", True)])
def test_forward_device_matches_reference_with_experts_in_slots_and_in_the_store(device, dtype, ffn, has_bias):
    """Blocks whose experts are partly in slots (two pinned, others loaded one step behind) and
    partly read in place from the expert store, against the PyTorch reference."""
    layers, E, H, I = 2, 8, 40, 24
    weights = random_experts(layers, E, H, I, ffn, dtype, seed=5, has_bias=has_bias)
    rt = make_runtime(weights, ffn, dtype, slots=5, device=device)
    rt.pin(1, 0)
    rt.pin(1, 3)
    rt.wait_idle()
    for step, (T, K) in enumerate([(1, 2), (3, 2), (8, 4), (1, 8), (2, 2)]):
        x = torch.randn(T, H).to(dtype)
        ids, w = random_routing(T, K, E, seed=step)
        nxt = torch.tensor([1, 2, 9], dtype=torch.int32, device=device)  # 9: past the last expert
        out = rt.forward_device(1, x.to(device), ids.to(device, torch.int32), w.to(device), next_layer=0,
                                next_ids=nxt)
        err = relative_error(out, moe_reference(weights[1], x, ids, w, ffn))
        assert err < TOLERANCE[dtype], f"T={T} K={K}: {err:.2e}"
    assert rt.reads_store_in_place
    s = rt.stats()
    assert s["device_forwards"] == 5 and s["store_reads"] > 0 and s["expert_hits"] > 0
    assert s["store_reads"] == s["expert_misses"]
    rt.check()
    rt.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,group", [("int4", 64), ("int8", 32)])
def test_forward_device_of_quantized_experts(device, fmt, group):
    """Quantized experts read from slots and in place, against dequantize-then-matmul."""
    from test_quantized_experts import quantized_runtime, tolerance

    layers, E, H, I = 2, 8, 128, 64
    weights = random_experts(layers, E, H, I, "gated_silu", torch.float32, seed=6)
    rt, deq = quantized_runtime(weights, "gated_silu", torch.bfloat16, fmt, group, device=device, slots=4)
    for step in range(6):
        x = torch.randn(2, H).to(torch.bfloat16)
        ids, w = random_routing(2, 2, E, seed=step)
        out = rt.forward_device(0, x.to(device), ids.to(device, torch.int32), w.to(device))
        err = relative_error(out, moe_reference(deq[0], x, ids, w, "gated_silu"))
        assert err < tolerance(torch.bfloat16, fmt, device), f"step {step}: {err:.2e}"
    s = rt.stats()
    assert s["store_reads"] > 0 and s["device_forwards"] == 6
    rt.check()
    rt.close()


@pytest.mark.parametrize("family", CORE)
def test_every_offloading_policy_on_the_device_path_equals_gpu_only(family, checkpoint_factory):
    """At budgets from each policy's minimum to everything, under lru and none: gpu-only's
    tokens, every block on the device path, misses read in place and counted one step behind."""
    with Engine(checkpoint_factory(family), device="cpu", policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng)
        eng.moe.device_path = True
        one, K = eng.cfg.expert_bytes(), eng.cfg.top_k
        total = one * eng.cfg.num_experts * eng.cfg.num_moe_layers
        for policy in ("on-demand", "prefetch-all", "pregated"):
            minimum = (K if policy == "on-demand" else 2 * K) * one
            for budget in (minimum, total // 2, total):
                for eviction in ("lru", "none"):
                    eng.reconfigure(policy=policy, expert_memory=budget, eviction=eviction)
                    got = generate(eng)
                    assert got == want, f"{policy} at {budget} bytes ({eviction})"
                    s = eng.stats()
                    blocks = 12 * eng.cfg.num_moe_layers  # the prefill and 11 decode steps
                    assert s["device_forwards"] == blocks == s["forwards"], (policy, budget, eviction)
                    assert s["store_reads"] > 0  # the first block found nothing in a slot
                    assert s["store_reads"] <= s["expert_misses"]
                    assert s["prefetch_used"] <= s["prefetch_issued"]
                    if policy != "on-demand":
                        assert s["prefetch_issued"] + s["prefetch_dropped"] > 0
                    if eviction == "lru" and budget == total:
                        assert s["expert_hits"] > 0  # what was read in place was loaded for later steps
                    eng.runtime.check()
                    assert all(sl["refs"] == 0 for sl in eng.runtime.slots())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_device_path_gives_gpu_only_tokens_on_every_family(family, checkpoint_factory):
    """Every family the engine runs, pregated at its smallest budget: gpu-only's tokens with the
    blocks on the device path (where a block has more token-expert rows than the path takes,
    the planned path runs it)."""
    with Engine(checkpoint_factory(family), device="cpu", policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng, n=6)
        eng.moe.device_path = True
        eng.reconfigure(policy="pregated", expert_memory=2 * eng.cfg.top_k * eng.cfg.expert_bytes())
        assert generate(eng, n=6) == want
        assert eng.stats()["device_forwards"] > 0
        eng.runtime.check()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_the_runtime_scores_the_prediction_as_the_planned_path_does(family, checkpoint_factory):
    """The pre-gate's prefetch precision and recall, scored by the runtime one step behind on the
    device path, equal the planned path's (same tokens, so the same routing and predictions)."""
    with Engine(checkpoint_factory(family), device="cpu", policy="pregated", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng)
        planned = eng.stats()
        eng.reset_stats()
        eng.moe.device_path = True
        assert generate(eng) == want
        got = eng.stats()
        assert got["device_forwards"] > 0 and got["prefetch_precision"] is not None
        for key in ("prefetch_precision", "prefetch_recall"):
            assert got[key] == pytest.approx(planned[key]), key
            assert [b[key] for b in got["layers"]] == pytest.approx([b[key] for b in planned["layers"]]), key


def test_the_device_path_sends_no_routing_to_the_host(mixtral_folder, monkeypatch):
    """On the Python thread a device-path block moves nothing to the host: no _to_host (one
    synchronisation per block on a GPU), no host list of the prediction; the planned path does."""
    import pregated.moe as moe_module

    calls = []
    real = moe_module._to_host
    monkeypatch.setattr(moe_module, "_to_host", lambda *a: calls.append(1) or real(*a))
    with Engine(mixtral_folder, device="cpu", policy="pregated", quiet=True) as eng:
        eng.eos_ids = set()
        generate(eng, n=4)
        assert len(calls) == 4 * eng.cfg.num_moe_layers  # the planned path: once per block
        calls.clear()
        eng.moe.device_path = True
        generate(eng, n=4)
        assert calls == []
        assert eng.stats()["device_forwards"] == 4 * eng.cfg.num_moe_layers


def test_larger_blocks_take_the_planned_path(mixtral_folder):
    """A prefill of more token-expert rows than DEVICE_ROWS_MAX runs through the planned path;
    the decode steps after it through the device path."""
    with Engine(mixtral_folder, device="cpu", policy="on-demand", quiet=True) as eng:
        eng.eos_ids = set()
        eng.moe.device_path = True
        prompt = list(range(3, 3 + _core.DEVICE_ROWS_MAX // eng.cfg.top_k + 1))
        eng.generate(prompt, max_new_tokens=3)
        s, n = eng.stats(), eng.cfg.num_moe_layers
        assert s["forwards"] == 3 * n and s["device_forwards"] == 2 * n


def test_gpu_only_and_hybrid_do_not_take_the_device_path(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", policy="gpu-only", quiet=True) as eng:
        eng.moe.device_path = True
        assert not eng.moe.on_device(1)
        eng.reconfigure(policy="hybrid", expert_memory=eng.cfg.expert_bytes() * 4)
        assert not eng.moe.on_device(1)
        eng.reconfigure(policy="pregated", expert_memory=eng.cfg.expert_bytes() * 4)
        assert eng.moe.on_device(1)
        eng.set_routing("pregate")  # the next block computes with the prediction: the host needs it
        assert not eng.moe.on_device(1)


def test_the_switch_says_what_it_takes(monkeypatch):
    monkeypatch.setenv("PREGATED_DEVICE_PATH", "0")
    assert not device_path_wanted()
    monkeypatch.setenv("PREGATED_DEVICE_PATH", "yes")
    with pytest.raises(ValueError, match="PREGATED_DEVICE_PATH='yes': give 1"):
        device_path_wanted()


def test_forward_device_checks_its_arguments(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", policy="on-demand", quiet=True) as eng:
        rt, H = eng.runtime, eng.cfg.hidden_size
        x, w = torch.randn(2, H), torch.full((2, 2), 0.5)
        with pytest.raises(ValueError, match="ids"):
            rt.forward_device(0, x, torch.zeros(2, 2, dtype=torch.int64), w)
        with pytest.raises(ValueError, match="next_ids"):
            rt.forward_device(0, x, torch.zeros(2, 2, dtype=torch.int32), w, next_layer=1,
                              next_ids=torch.zeros(3, dtype=torch.int64))
        big = torch.zeros(40, 2, dtype=torch.int32)
        with pytest.raises(ValueError, match="the device path takes up to 64"):
            rt.forward_device(0, torch.randn(40, H), big, torch.full((40, 2), 0.5))


@pytest.mark.gpu
def test_offloaded_decode_step_does_not_synchronise_on_a_gpu(mixtral_folder):
    """On a GPU, a pregated decode step at its smallest budget runs its forward without a
    device-to-host synchronisation on the Python thread (torch's sync debug mode raises on any),
    and the engine gives gpu-only's tokens."""
    with Engine(mixtral_folder, device="cuda", policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng)
        eng.reconfigure(policy="pregated", expert_memory=2 * eng.cfg.top_k * eng.cfg.expert_bytes())
        assert eng.moe.device_path
        assert generate(eng) == want
        before = eng.stats()["device_forwards"]
        out = decode_step_without_sync(eng, [5, 6, 7, 8, 9, 10])
        assert out.shape[-1] == eng.cfg.vocab_size
        s = eng.stats()
        assert s["device_forwards"] == before + 2 * eng.cfg.num_moe_layers and s["store_reads"] > 0
        eng.runtime.check()
