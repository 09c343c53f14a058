"""Policies, routing modes and the expert cache through the Engine."""

import json
import os

import pytest
import torch

from conftest import DEVICES
from pregated.engine import Engine
from test_engine_parity import FAMILIES

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]
CORE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def generate(eng, n=12):
    return [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", CORE)
def test_every_policy_budget_and_eviction_equals_gpu_only_in_exact_mode(family, device, checkpoint_factory):
    """Every offloading policy (hybrid under every plan of its host lane) at budgets from its
    minimum to everything gives gpu-only's tokens."""
    folder = checkpoint_factory(family)
    with Engine(folder, device=device, policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng)
        one = eng.cfg.expert_bytes()
        total = one * eng.cfg.num_experts * eng.cfg.num_moe_layers
        K = eng.cfg.top_k
        for policy in ("on-demand", "prefetch-all", "pregated"):
            minimum = (K if policy == "on-demand" else 2 * K) * one
            for budget in (minimum, minimum + 3 * one, total // 2, total):
                for eviction in ("lru", "lfu", "none"):
                    if eviction != "lru" and budget not in (minimum, total // 2):
                        continue
                    eng.reconfigure(policy=policy, expert_memory=budget, eviction=eviction)
                    got = generate(eng)
                    assert got == want, f"{policy} at {budget} bytes ({eviction})"
                    eng.runtime.check()
        # hybrid, from one expert to everything, under each plan of its host lane
        for budget in (one, 4 * one, total // 2, total):
            for plan in ("host", "copy", "alternate", "auto"):
                eng.reconfigure(policy="hybrid", expert_memory=budget, eviction="lru", lane_plan=plan)
                assert generate(eng) == want, f"hybrid at {budget} bytes, plan {plan}"
                eng.runtime.check()
                s = eng.stats()
                if budget < total and plan == "host":
                    assert s["host_experts"] > 0 and s["expert_misses"] == 0
                if budget < total and plan == "copy":  # the host lane takes only what has no slot
                    assert s["expert_misses"] > 0
                assert s["host_bytes"] == s["host_experts"] * one


@pytest.mark.parametrize("family", FAMILIES)
def test_policies_and_routing_modes_on_every_family(family, checkpoint_factory):
    """Every offloading policy at its smallest budget gives gpu-only's tokens (exact routing);
    routing by pre-gate runs, with no demand load after the first block in decode."""
    folder = checkpoint_factory(family)
    with Engine(folder, device="cpu", policy="gpu-only", quiet=True) as eng:
        eng.eos_ids = set()
        want = generate(eng, n=8)
        one, K = eng.cfg.expert_bytes(), eng.cfg.top_k
        for policy in ("on-demand", "prefetch-all", "pregated"):
            eng.reconfigure(policy=policy, expert_memory=(K if policy == "on-demand" else 2 * K) * one)
            assert generate(eng, n=8) == want, policy
            eng.runtime.check()
        eng.reconfigure(policy="pregated", expert_memory=2 * K * one)
        eng.set_routing("pregate")
        out = eng.generate(PROMPTS[0], max_new_tokens=8)
        assert len(out.token_ids) == 8
        s, pre = eng.stats(), eng.last_prefill_stats
        decode_misses = [b["expert_misses"] - p["expert_misses"] for b, p in zip(s["layers"], pre["layers"])]
        assert decode_misses[1:] == [0] * (len(decode_misses) - 1)
        assert all(b["prefetch_used"] <= b["prefetch_issued"] for b in s["layers"])
        assert (s["pregate_precision"] is not None) == (eng.cfg.num_moe_layers > 1)  # a next block to predict
        eng.runtime.check()


@pytest.fixture(scope="module")
def eng(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", policy="pregated", quiet=True) as e:
        yield e


def budget(eng, experts):
    return experts * eng.cfg.expert_bytes()


def test_on_demand_issues_no_prefetch(eng):
    eng.reconfigure(policy="on-demand", expert_memory=budget(eng, 6))
    generate(eng)
    s = eng.stats()
    assert s["prefetch_issued"] == 0 and s["prefetch_used"] == 0 and s["expert_misses"] > 0


def test_prefetch_all_moves_at_least_as_much_as_pregated(eng):
    moved = {}
    for policy in ("prefetch-all", "pregated"):
        eng.reconfigure(policy=policy, expert_memory=budget(eng, 12))
        generate(eng)
        moved[policy] = eng.stats()["bytes_h2d"]
    assert moved["prefetch-all"] >= moved["pregated"] > 0


def test_nothing_moves_after_the_first_pass_when_everything_fits(eng):
    for policy in ("gpu-only", "pregated", "on-demand"):
        eng.reconfigure(policy=policy, expert_memory=budget(eng, 24))
        generate(eng)
        first = eng.stats()["bytes_h2d"]
        assert first <= budget(eng, 24)
        generate(eng)
        generate(eng)
        assert eng.stats()["bytes_h2d"] == first, policy


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_a_cache_moves_fewer_bytes_than_none_on_repeated_prompts(eng, eviction):
    moved = {}
    for ev in (eviction, "none"):
        eng.reconfigure(policy="on-demand", expert_memory=budget(eng, 14), eviction=ev)
        for _ in range(3):
            generate(eng, n=6)
        moved[ev] = eng.stats()["bytes_h2d"]
    assert moved[eviction] < moved["none"]


def test_per_block_statistics(eng):
    eng.reconfigure(policy="pregated", expert_memory=budget(eng, 6))
    generate(eng)
    s = eng.stats()
    assert len(s["layers"]) == eng.cfg.num_moe_layers
    for key in ("bytes_h2d", "expert_hits", "expert_misses", "prefetch_issued", "stall_seconds"):
        assert sum(b[key] for b in s["layers"]) == pytest.approx(s[key])
    assert s["layers"][0]["prefetch_precision"] is None  # nothing predicts the first block
    assert all(0 <= b["prefetch_recall"] <= 1 for b in s["layers"][1:])


def test_pregate_routing_never_loads_late_in_decode(eng):
    """routing='pregate': block i+1 uses the experts chosen at block i and prefetched during it,
    so after the first block a decode step has no demand loads."""
    eng.reconfigure(policy="pregated", expert_memory=budget(eng, 4))  # the minimum: 2K slots
    eng.set_routing("pregate")
    try:
        eng.generate(PROMPTS[0], max_new_tokens=10)
        s, pre = eng.stats(), eng.last_prefill_stats
        decode_misses = [b["expert_misses"] - p["expert_misses"] for b, p in zip(s["layers"], pre["layers"])]
        assert decode_misses[1:] == [0] * (len(decode_misses) - 1)
    finally:
        eng.set_routing("exact")


def test_pregate_routing_changes_outputs_and_exact_does_not(eng, mixtral_folder):
    eng.reconfigure(policy="pregated", expert_memory=budget(eng, 6))
    exact = eng.logits(list(range(5, 60)))
    eng.set_routing("pregate")
    pregate = eng.logits(list(range(5, 60)))
    eng.set_routing("exact")
    assert torch.allclose(eng.logits(list(range(5, 60))), exact)
    assert not torch.allclose(pregate, exact)  # the predicted routing is not always the true one
    # the first token's logits differ only through blocks 1.. which use predicted experts
    assert torch.isfinite(pregate).all()


def test_decode_step_timeline(eng):
    eng.reconfigure(policy="pregated", expert_memory=budget(eng, 6))
    events = eng.trace_decode_step(PROMPTS[0], warmup_tokens=2)
    computes = [e for e in events if e["kind"] == "compute"]
    assert {e["layer"] for e in computes} == set(range(eng.cfg.num_moe_layers))
    # block order on the compute stream
    starts = [min(e["start_s"] for e in computes if e["layer"] == m) for m in range(eng.cfg.num_moe_layers)]
    assert starts == sorted(starts)


TEXT = " ".join(["Mixture of experts models route each token to a few experts.",
                 "The quick brown fox jumps over the lazy dog.",
                 "Experts live in host memory and move to the GPU before they are needed.",
                 "héllo wörld, ça va? 0123456789"] * 12)


def test_calibrate_and_use_a_trained_pregate(mixtral_folder, tmp_path, capsys):
    from pregated.cli import main

    out = tmp_path / "pg"
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    assert main(["calibrate", "--model", mixtral_folder, "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--steps", "60", "--window", "64"]) == 0
    printed = capsys.readouterr().out
    assert "speculative precision" in printed and "trained precision" in printed and "overall" in printed
    report = json.loads((out / "pregate.json").read_text())
    assert len(report["blocks"]) == 2  # 3 MoE blocks: 0 -> 1 and 1 -> 2
    for b in report["blocks"] + [report["overall"]]:
        for kind in ("speculative", "trained"):
            assert 0 <= b[kind]["recall"] <= 1 and 0 <= b[kind]["precision"] <= 1
    assert os.path.isfile(out / "pregate.safetensors")
    # Exact routing ignores the pre-gate's quality: same tokens as gpu-only.
    with Engine(mixtral_folder, device="cpu", policy="gpu-only", quiet=True) as ref:
        want = generate(ref)
    with Engine(mixtral_folder, device="cpu", pregate=str(out), expert_memory=6 * ref.cfg.expert_bytes(),
                quiet=True) as e:
        assert e.pregate.kind == "trained"
        assert generate(e) == want
        assert e.stats()["prefetch_recall"] is not None
    # eval reports both routing modes and both pre-gates
    assert main(["eval", "--model", mixtral_folder, "--data", str(data), "--pregate", str(out), "--device", "cpu",
                 "--window", "64", "--json", str(tmp_path / "eval.json")]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    rows = {(r["routing"], r["pregate"]): r["perplexity"] for r in res["results"]}
    assert set(rows) == {("exact", "speculative"), ("pregate", "speculative"), ("pregate", "trained")}
    assert all(p > 1 for p in rows.values())


def test_pregate_folder_that_does_not_match(mixtral_folder, checkpoint_factory, tmp_path):
    from pregated.pregate import calibrate

    out = tmp_path / "pg"
    calibrate(mixtral_folder, TEXT, str(out), device="cpu", steps=5, window=64, quiet=True, log=lambda *_: None)
    other = checkpoint_factory("mixtral", seed=1)  # same shapes, different weights
    with pytest.raises(ValueError, match="does not match this model: it was calibrated for router weights"):
        Engine(other, device="cpu", pregate=str(out), quiet=True)
    olmoe = checkpoint_factory("olmoe")
    with pytest.raises(ValueError, match="calibrated for model_type mixtral, this model has olmoe"):
        Engine(olmoe, device="cpu", pregate=str(out), quiet=True)
    with pytest.raises(ValueError, match="is not a pre-gate folder"):
        Engine(mixtral_folder, device="cpu", pregate=str(tmp_path), quiet=True)
    with pytest.raises(ValueError, match="unknown routing mode 'fast'"):
        Engine(mixtral_folder, device="cpu", routing="fast", quiet=True)


@pytest.mark.parametrize("routing", ["exact", "pregate"])
def test_prefetch_counters_obey_their_definitions(eng, routing):
    """prefetch_used counts prefetch copies that a forward then used: never more than were
    issued, in every block, also when block i+1 computes with the experts chosen at block i."""
    eng.reconfigure(policy="pregated", expert_memory=budget(eng, 5))
    eng.set_routing(routing)
    try:
        for prompt in PROMPTS + [list(range(3, 60))]:
            eng.generate(prompt, max_new_tokens=16)
        s = eng.stats()
        for b in s["layers"]:
            assert b["prefetch_used"] <= b["prefetch_issued"], b
        assert s["prefetch_issued"] > 0
    finally:
        eng.set_routing("exact")


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen2_moe", "hunyuan_v1_moe"])
def test_calibrate_any_family(family, checkpoint_factory, tmp_path):
    """A trained pre-gate fits the family's own norm and router (sigmoid scores with correction
    biases, routers with biases, shared experts), loads, and leaves exact routing's tokens alone."""
    from pregated.pregate import calibrate

    folder = checkpoint_factory(family)
    report = calibrate(folder, TEXT, str(tmp_path / "pg"), device="cpu", steps=20, window=64, quiet=True,
                       log=lambda *_: None)
    for b in report["blocks"]:
        assert 0 <= b["trained"]["precision"] <= 1 and 0 <= b["speculative"]["recall"] <= 1
    with Engine(folder, device="cpu", policy="gpu-only", quiet=True) as ref:
        ref.eos_ids = set()
        want = generate(ref)
        budget = 2 * ref.cfg.top_k * ref.cfg.expert_bytes()
    with Engine(folder, device="cpu", pregate=str(tmp_path / "pg"), expert_memory=budget, quiet=True) as e:
        e.eos_ids = set()
        assert e.pregate.kind == "trained"
        assert generate(e) == want
        assert e.stats()["prefetch_recall"] is not None


def test_asynchronous_copies_on_the_cpu(mixtral_folder, monkeypatch):
    """With the CPU backend's copies asynchronous (each after 200 us, as a GPU's copy engine runs
    beside compute), every policy still gives gpu-only's tokens, and forwards wait for copies."""
    with Engine(mixtral_folder, device="cpu", policy="gpu-only", quiet=True) as ref:
        ref.eos_ids = set()
        want = generate(ref)
        one, K = ref.cfg.expert_bytes(), ref.cfg.top_k
    monkeypatch.setenv("PREGATED_CPU_COPY_DELAY_US", "200")
    with Engine(mixtral_folder, device="cpu", policy="on-demand", expert_memory=K * one, quiet=True) as eng:
        eng.eos_ids = set()
        for policy, slots in (("on-demand", K), ("prefetch-all", 2 * K), ("pregated", 2 * K + 1)):
            eng.reconfigure(policy=policy, expert_memory=slots * one)
            assert generate(eng) == want, policy
            s = eng.stats()
            assert s["stall_seconds"] > 0 and s["prefetch_used"] <= s["prefetch_issued"]
            eng.runtime.check()
