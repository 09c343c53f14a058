"""Policy hybrid through the Engine: the host lane and its planner give gpu-only's tokens under
exact routing on every family and expert dtype, and report what they did (every budget and
plan on the core families: test_policies.py)."""

import pytest

from pregated.engine import Engine
from pregated.moe import hybrid_split
from test_engine_parity import FAMILIES
from test_policies import generate


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_on_every_family(family, checkpoint_factory):
    """A mixed plan (copies and host computations in every block) at the smallest budget, and
    the cost model's own plan with a slow link, give gpu-only's tokens on every family."""
    folder = checkpoint_factory(family)
    with Engine(folder, device="cpu", policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng, n=6)
        one = eng.cfg.expert_bytes()
        eng.reconfigure(policy="hybrid", expert_memory=one, lane_plan="alternate")
        assert generate(eng, n=6) == want, "alternate"
        eng.runtime.check()
        slow = {"link_bandwidth": 1e3, "host_bandwidth": 1e12, "host_row_seconds": 1e-9}
        eng.reconfigure(policy="hybrid", expert_memory=2 * eng.cfg.top_k * one, lane_plan="auto", lane_costs=slow)
        assert generate(eng, n=6) == want, "auto, slow link"
        assert eng.stats()["host_experts"] > 0
        eng.runtime.check()


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_hybrid_with_quantized_experts(expert_dtype, mixtral_folder):
    """The host lane reads packed experts where they live: the same tokens as the quantized
    model on gpu-only."""
    with Engine(mixtral_folder, device="cpu", policy="gpu-only", expert_dtype=expert_dtype, quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng)
        one = eng.cfg.expert_bytes()
        for plan in ("host", "alternate"):
            eng.reconfigure(policy="hybrid", expert_memory=3 * one, lane_plan=plan)
            assert generate(eng) == want, plan
            assert eng.stats()["host_experts"] > 0
            eng.runtime.check()


def test_cost_model_decisions_through_the_engine(mixtral_folder):
    """A slow link sends the experts that miss to the host; a fast one copies them."""
    with Engine(mixtral_folder, device="cpu", policy="hybrid", quiet=True,
                expert_memory=4 * 1024 * 1024 * 1024) as eng:  # everything fits: nothing to plan
        one = eng.cfg.expert_bytes()
        slow = {"link_bandwidth": 1e3, "host_bandwidth": 1e12, "host_row_seconds": 1e-9}
        eng.reconfigure(policy="hybrid", expert_memory=4 * one, lane_costs=slow, hot_fraction=0.0)
        generate(eng, n=4)
        s = eng.stats()
        assert s["host_experts"] > 0 and s["expert_misses"] == 0 and s["bytes_h2d"] == 0
        assert s["costs"]["link_bytes_per_s"] == 1e3
        fast = {"link_bandwidth": 1e15, "host_bandwidth": 1e3, "host_row_seconds": 1.0}
        layer = eng.cfg.num_experts * one  # room for any block's experts: nothing overflows
        eng.reconfigure(policy="hybrid", expert_memory=layer, lane_costs=fast)
        generate(eng, n=4)
        s = eng.stats()
        assert s["host_experts"] == 0 and s["expert_misses"] > 0
        # measured: both figures are there and positive
        eng.reconfigure(policy="hybrid", expert_memory=4 * one, lane_costs={})
        generate(eng, n=2)
        c = eng.stats()["costs"]
        assert c["link_bytes_per_s"] > 0 and c["host_bytes_per_s"] > 0
        # per block: the host lane's experts, bytes and time are reported
        eng.reconfigure(policy="hybrid", expert_memory=4 * one, lane_plan="host", lane_costs={})
        generate(eng, n=2)
        layer = eng.stats()["layers"][0]
        assert layer["host_experts"] > 0 and layer["host_seconds"] > 0 and layer["host_bytes"] > 0
        # leaving hybrid stops the lane
        eng.reconfigure(policy="pregated", expert_memory=4 * one)
        generate(eng, n=2)
        assert eng.stats()["host_experts"] == 0


def test_hybrid_split_and_options(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", policy="gpu-only", quiet=True) as eng:
        cfg, one = eng.cfg, eng.cfg.expert_bytes()
        K, total = cfg.top_k, cfg.num_routed_experts
        assert hybrid_split(cfg, one) == (0, 1)
        assert hybrid_split(cfg, 10 * one) == (10 - 2 * K, 2 * K)
        assert hybrid_split(cfg, 10 * one, 0.5) == (5, 5)
        assert hybrid_split(cfg, total * one) == (0, total)  # everything fits: nothing is hot
        eng.reconfigure(policy="hybrid", expert_memory=10 * one, hot_fraction=0.5, lane_plan="auto")
        generate(eng, n=8)
        pinned_hot = [s for s in eng.runtime.slots() if s["hot"]]
        assert 0 < len(pinned_hot) <= 5 and all(s["pinned"] for s in pinned_hot)
        assert eng.stats()["hot_experts"] == len(pinned_hot)
        with pytest.raises(ValueError, match="hot_fraction must be a number in"):
            eng.reconfigure(policy="hybrid", hot_fraction=1.5)
        with pytest.raises(ValueError, match="unknown lane plan 'fast'"):
            eng.reconfigure(policy="hybrid", lane_plan="fast")
        with pytest.raises(ValueError, match="unknown lane cost 'pcie'"):
            eng.reconfigure(policy="hybrid", lane_costs={"pcie": 1e9})
        with pytest.raises(ValueError, match="lane cost link_bandwidth must be a number > 0"):
            eng.reconfigure(policy="hybrid", lane_costs={"link_bandwidth": 0})


def test_hybrid_with_every_eviction_and_routing_by_pregate(mixtral_folder):
    """hybrid under lru, lfu and none keeps gpu-only's tokens (exact routing) and leaves no
    reference behind; routing by pre-gate runs under it too."""
    with Engine(mixtral_folder, device="cpu", policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng)
        one = eng.cfg.expert_bytes()
        for eviction in ("lru", "lfu", "none"):
            eng.reconfigure(policy="hybrid", expert_memory=6 * one, eviction=eviction, lane_plan="alternate")
            assert generate(eng) == want, eviction
            eng.runtime.check()
            assert all(s["refs"] == 0 for s in eng.runtime.slots())
        eng.reconfigure(policy="hybrid", expert_memory=6 * one, eviction="lru", lane_plan="auto")
        eng.set_routing("pregate")
        assert len(generate(eng, n=6)[0]) == 6
        eng.runtime.check()
