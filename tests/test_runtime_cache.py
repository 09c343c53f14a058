"""Expert cache behaviour seen from Python: eviction order, byte accounting, concurrency."""

import threading

import pytest
import torch

from moe_reference import make_runtime, moe_reference, random_experts, random_routing, relative_error

H, I = 16, 8


def resident(rt):
    return {(s["layer"], s["expert"]) for s in rt.slots() if s["state"] != "empty"}


def use(rt, *experts, layer=0):
    for e in experts:
        rt.forward(layer, torch.randn(1, H), torch.tensor([[e]]), torch.ones(1, 1))


@pytest.fixture
def weights():
    return random_experts(2, 8, H, I, "gated_silu", torch.float32, seed=9)


def test_lru_eviction_order(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=3, eviction="lru")
    use(rt, 0, 1, 2, 0)  # recency: 1, 2, 0
    use(rt, 3)           # evicts 1
    assert resident(rt) == {(0, 0), (0, 2), (0, 3)}
    use(rt, 2, 4)        # recency: 0, 3, 2 -> evicts 0
    assert resident(rt) == {(0, 2), (0, 3), (0, 4)}


def test_lfu_eviction_order(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=3, eviction="lfu")
    use(rt, 0, 0, 0, 1, 2, 2)  # uses: 0 -> 3, 1 -> 1, 2 -> 2
    use(rt, 3)                 # evicts 1, the least used, although 0 is least recent
    assert resident(rt) == {(0, 0), (0, 2), (0, 3)}
    use(rt, 3, 3, 3)           # uses: 0 -> 3, 2 -> 2, 3 -> 4
    use(rt, 5)                 # evicts 2
    assert resident(rt) == {(0, 0), (0, 3), (0, 5)}


def test_byte_accounting_and_hits(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=None)  # every expert fits
    one = rt.expert_bytes
    x = torch.randn(4, H)
    ids, w = random_routing(4, 2, 8, seed=1)
    rt.forward(0, x, ids, w)
    first = rt.stats()
    distinct = len(set(ids.flatten().tolist()))
    assert first["bytes_h2d"] == distinct * one
    assert first["expert_misses"] == distinct and first["expert_hits"] == 0
    rt.forward(0, x, ids, w)  # the same experts again: nothing moves
    second = rt.stats()
    assert second["bytes_h2d"] == first["bytes_h2d"]
    assert second["expert_hits"] == distinct


def test_pin_keeps_an_expert_resident(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=2)
    rt.pin(1, 7)
    use(rt, 0, 1, 2, 3, 4, layer=1)  # churns the one free slot
    assert (1, 7) in resident(rt)
    with pytest.raises(ValueError, match="at least one slot must stay free"):
        rt.pin(1, 6)
    with pytest.raises(ValueError, match="pinned"):
        rt.evict(1, 7)
    rt.unpin(1, 7)
    rt.evict(1, 7)
    assert (1, 7) not in resident(rt)
    rt.check()


def test_prefetch_statistics(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=4)
    rt.prefetch(1, [2, 3, 2])  # the duplicate is suppressed
    rt.wait_idle()
    assert rt.stats()["prefetch_issued"] == 2
    use(rt, 2, layer=1)
    s = rt.stats()
    assert s["prefetch_used"] == 1 and s["expert_misses"] == 0
    rt.prefetch(1, [2])  # already resident: no copy
    rt.wait_idle()
    assert rt.stats()["prefetch_issued"] == 2


def test_concurrent_forwards_and_evictions_stay_correct(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=3)
    failures = []

    def forwards(seed):
        for i in range(60):
            x = torch.randn(5, H)
            ids, w = random_routing(5, 2, 8, seed=seed * 1000 + i)
            out = rt.forward(i % 2, x, ids, w)
            if relative_error(out, moe_reference(weights[i % 2], x, ids, w, "gated_silu")) > 1e-5:
                failures.append((seed, i))

    def evictions():
        for i in range(300):
            try:
                rt.evict(i % 2, i % 8)
            except ValueError as e:  # a slot in use is refused, never taken
                assert "using it" in str(e)

    threads = [threading.Thread(target=forwards, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=evictions))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    rt.check()
    assert all(s["refs"] == 0 for s in rt.slots())


def test_trace_records_copies_and_compute(weights):
    rt = make_runtime(weights, "gated_silu", torch.float32, slots=4)
    rt.set_tracing(True)
    rt.forward(0, torch.randn(2, H), torch.tensor([[1, 2], [2, 3]]), torch.full((2, 2), 0.5))
    events = rt.trace()
    copies = [e for e in events if e["kind"] == "copy"]
    computes = [e for e in events if e["kind"] == "compute"]
    assert sorted(e["expert"] for e in copies) == [1, 2, 3]
    assert sorted(e["expert"] for e in computes) == [1, 2, 3]
    assert all(0 <= e["start_s"] <= e["end_s"] for e in events)
    rt.set_tracing(False)
