"""The graph step (graph_step.py): the resident path's decode over a static cache and fixed
buffers, captured as a CUDA graph on a GPU. On the CPU the same step runs uncaptured
(graph_mode "eager"): the tokens must be those of the growing cache's decode and of
transformers; the capture itself is checked on the GPU (test_graph_step_gpu below)."""

import warnings

import pytest
import torch

from pregated.engine import Engine
from pregated.graph_step import CACHE_ROUND, KEPT_GRAPHS, GraphStep, cache_length, graph_step_wanted

from test_engine_parity import FAMILIES, reference_greedy
from tiny_models import reference_model

# families whose static cache is all plain layers (the step's condition), MLA and shared experts among them
TAKEN = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"]
# families the step refuses: sliding-window attention, state-space and linear-attention layers
REFUSED = ["gpt_oss", "granitemoehybrid", "qwen3_next"]
PROMPTS = [list(range(5, 17)), list(range(40, 47))]  # two lengths: the second row is left-padded


def _generate(eng, mode, prompts, **kw):
    eng.graph_mode = mode
    before = eng.stats()["graph_steps"]
    out = eng.generate(prompts, **kw)
    return out, eng.stats()["graph_steps"] - before


@pytest.mark.parametrize("family", TAKEN)
def test_graph_step_decodes_as_the_growing_cache(family, checkpoint_factory):
    with Engine(checkpoint_factory(family), device="cpu", quiet=True) as eng:
        assert eng.graph_mode is None  # on the CPU nothing is captured unless asked
        eng.eos_ids = set()
        for kw in (dict(max_new_tokens=10), dict(max_new_tokens=10, temperature=1.0, seed=3)):
            want, steps = _generate(eng, None, PROMPTS, **kw)
            assert steps == 0
            got, steps = _generate(eng, "eager", PROMPTS, **kw)
            assert steps == 9, "the graph step did not run the decode"
            assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert eng._graph_agrees is True


def test_graph_step_matches_transformers(checkpoint_factory):
    """Independent of our other decode: transformers' greedy tokens, each from a full forward."""
    folder = checkpoint_factory("mixtral")
    prompt = list(range(5, 11))
    want = reference_greedy(reference_model(folder), prompt, 24)
    with Engine(folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        got, steps = _generate(eng, "eager", prompt, max_new_tokens=24)
    assert steps == 23
    assert got.token_ids == want


def test_graph_step_logits_follow_the_model(checkpoint_factory):
    """Step by step, the step's logits against the engine's logits() over the whole sequence
    (a prefill each time), with real experts, for a padded batch."""
    with Engine(checkpoint_factory("qwen3_moe"), device="cpu", quiet=True) as eng, torch.inference_mode():
        step = GraphStep(eng._forward, eng.model.config, eng.runtime, eng.cfg.top_k, 2, 64, "cpu", capture=False)
        tokens, valid, positions = eng._padded(PROMPTS)
        logits = step.prefill(tokens, valid, positions)
        seqs = [list(p) for p in PROMPTS]
        for n in range(4):
            for b, seq in enumerate(seqs):
                want = eng.logits(seq)[-1]
                assert torch.allclose(logits[b], want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (n, b)
            nxt = torch.tensor([100 + n, 200 + n])
            for seq, t in zip(seqs, nxt.tolist()):
                seq.append(t)
            logits = step.step(nxt).clone()


@pytest.mark.parametrize("family", REFUSED)
def test_graph_step_refuses_caches_with_host_state(family, checkpoint_factory):
    with Engine(checkpoint_factory(family), device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        want, _ = _generate(eng, None, PROMPTS, max_new_tokens=6)
        got, steps = _generate(eng, "eager", PROMPTS, max_new_tokens=6)
        assert steps == 0 and eng._graph_agrees is False
        assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_graph_step_only_on_the_resident_path(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        one = eng.cfg.expert_bytes()
        eng.reconfigure(policy="pregated", expert_memory=2 * eng.cfg.top_k * one)
        _, steps = _generate(eng, "eager", PROMPTS, max_new_tokens=5)
        assert steps == 0, "an offloading policy needs the routing on the host: no graph step"
        eng.reconfigure(policy="gpu-only")
        eng.set_routing("pregate")
        _, steps = _generate(eng, "eager", PROMPTS, max_new_tokens=5)
        assert steps == 0, "routing by the pre-gate needs the host"
        eng.set_routing("exact")
        _, steps = _generate(eng, "eager", PROMPTS, max_new_tokens=5)
        assert steps == 4
        before = eng.stats()["graph_steps"]
        eng.trace_decode_step(PROMPTS[0], warmup_tokens=2)
        assert eng.stats()["graph_steps"] == before, "a traced decode runs the eager path (its timeline is per block)"


def test_graph_steps_are_kept_per_batch_and_length(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        eng.graph_mode = "eager"
        eng.generate(PROMPTS[0], max_new_tokens=4)
        eng.generate(PROMPTS[1], max_new_tokens=8)  # the same length class: the same step
        assert list(eng._graph_steps) == [(1, CACHE_ROUND)]
        first = eng._graph_steps[(1, CACHE_ROUND)]
        eng.generate(PROMPTS, max_new_tokens=4)
        eng.generate(PROMPTS[0], max_new_tokens=CACHE_ROUND)  # a longer cache
        assert len(eng._graph_steps) == KEPT_GRAPHS
        assert list(eng._graph_steps) == [(2, CACHE_ROUND), (1, 2 * CACHE_ROUND)]
        assert first not in eng._graph_steps.values()
        eng.reconfigure(policy="gpu-only")
        assert eng._graph_steps == {}, "reconfigure rebuilds the slots a captured graph points into"


def test_cache_length_and_switch(monkeypatch):
    assert cache_length(1, 4096) == CACHE_ROUND
    assert cache_length(CACHE_ROUND + 1, 4096) == 2 * CACHE_ROUND
    assert cache_length(300, 400) == 400 and cache_length(300, None) == 2 * CACHE_ROUND
    assert cache_length(500, 400) == 500  # beyond the limit: what was asked (the prompt check refuses it)
    monkeypatch.setenv("PREGATED_GRAPH_STEP", "0")
    assert not graph_step_wanted()
    monkeypatch.setenv("PREGATED_GRAPH_STEP", "yes")
    with pytest.raises(ValueError, match="PREGATED_GRAPH_STEP='yes'"):
        graph_step_wanted()


def test_a_prefill_longer_than_the_step_is_refused(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        step = GraphStep(eng._forward, eng.model.config, eng.runtime, eng.cfg.top_k, 1, 8, "cpu", capture=False)
        tokens, valid, positions = eng._padded([list(range(5, 15))])
        with pytest.raises(ValueError, match="up to 8 tokens got a prefill of 1 x 10"):
            step.prefill(tokens, valid, positions)


@pytest.mark.gpu
def test_graph_step_gpu(checkpoint_factory):
    """On the GPU: the decode is captured (graph_steps counts replays), its tokens are those of the
    eager decode, a replay asks the host nothing, and a longer prompt (a larger resident
    workspace, at a new address) is captured again rather than replayed stale."""
    folder = checkpoint_factory("mixtral", dtype=torch.bfloat16)
    with Engine(folder, device="cuda", policy="gpu-only", quiet=True) as eng:
        assert eng.graph_mode == "graph"
        eng.eos_ids = set()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture warns: that is a failure here
            for kw in (dict(max_new_tokens=16), dict(max_new_tokens=16, temperature=1.0, seed=5)):
                want, _ = _generate(eng, None, PROMPTS, **kw)
                got, steps = _generate(eng, "graph", PROMPTS, **kw)
                assert steps == 15
                assert [r.token_ids for r in got] == [r.token_ids for r in want]
        step = eng._graph_steps[(2, CACHE_ROUND)]
        assert step.graph is not None
        captured = step.workspace
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # tokens from the host (pinned staging) and from the device: neither waits for the device
            step.step(torch.tensor([7, 8]))
            step.step(torch.tensor([7, 8], device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert eng.stats()["graph_host_seconds"] > 0
        long_prompt = [list(range(5, 205)), list(range(5, 100))]
        want, _ = _generate(eng, None, long_prompt, max_new_tokens=8)
        got, steps = _generate(eng, "graph", long_prompt, max_new_tokens=8)
        assert steps == 7 and [r.token_ids for r in got] == [r.token_ids for r in want]
        assert step.workspace > captured, "the larger workspace was not captured again"
        assert eng.stats()["resident_workspace_bytes"] == step.workspace


# Ops that read a device tensor's values on the host: on a GPU each is a synchronisation, and
# inside a capture an error.
HOST_READS = {"item", "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "equal", "is_nonzero", "bincount", "histc", "repeat_interleave"}


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op in HOST_READS that runs inside, and an index by a boolean mask (a nonzero)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masked = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in HOST_READS or masked:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_graph_step_reads_nothing_from_the_device(mixtral_folder, monkeypatch):
    """On the CPU, what a capture would refuse: the step's PyTorch ops, with transformers taking
    its branches for a capture (is_current_stream_capturing() is True inside), read no tensor
    value on the host. The CPU Engine's own kernels and the runtime's resident op are not
    PyTorch ops; the resident op asks the host nothing by construction (test_resident)."""
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng, torch.inference_mode():
        step = GraphStep(eng._forward, eng.model.config, eng.runtime, eng.cfg.top_k, 2, 64, "cpu", capture=False)
        tokens, valid, positions = eng._padded(PROMPTS)
        step.prefill(tokens, valid, positions)
        nxt = torch.tensor([3, 4])
        with HostReads() as probe:  # the detector sees what it should
            torch.ones(2).sum().item()
        assert probe.seen in (["aten.item.default"], ["aten._local_scalar_dense.default"])
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        before = eng.stats()["resident_forwards"]
        with HostReads() as probe:
            step.step(nxt)
            step.step(nxt)
        assert probe.seen == [], f"the step reads device values on the host: {probe.seen}"
        assert eng.stats()["resident_forwards"] == before + 2 * eng.cfg.num_moe_layers  # the experts did run


@pytest.mark.parametrize("fmt", [None, "int4"])
def test_graph_step_reserves_the_resident_rows_it_will_run(fmt, mixtral_folder):
    """Before a capture the workspace is reserved for the prefill's rows where the prefill takes
    the resident path (dense experts), else for the decode's (quantized experts: their prefill
    takes the general path), so a large prompt does not hold a prefill-sized workspace for nothing."""
    def workspace_bytes(rows: int) -> int:  # runtime.cc's resident_workspace_bytes
        up = lambda n: -(-n // 256) * 256  # noqa: E731
        H, U, esz = eng.layout.hidden, 2 * eng.layout.intermediate, 4
        return up(rows * U * esz) + up(rows * H * esz) + up(rows * 8 * 8) + up(rows * 4)

    with Engine(mixtral_folder, device="cpu", quiet=True, expert_dtype=fmt) as eng, torch.inference_mode():
        assert eng.stats()["resident_workspace_bytes"] == 0
        step = GraphStep(eng._forward, eng.model.config, eng.runtime, eng.cfg.top_k, 2, 128, "cpu", capture=False,
                         resident=eng.moe.resident)
        tokens, valid, positions = eng._padded([list(range(5, 65)), list(range(70, 100))])
        step.prefill(tokens, valid, positions)
        rows = 2 * 60 * eng.cfg.top_k if fmt is None else 2 * eng.cfg.top_k
        assert eng.stats()["resident_workspace_bytes"] == workspace_bytes(rows)


class FakeGraph:
    """Stands in for a captured graph on the CPU: replay() runs the step, or (wrong=True) the
    step with its logits changed, as a capture that recorded the wrong thing would."""

    def __init__(self, step: GraphStep, wrong: bool):
        self.step, self.wrong = step, wrong

    def replay(self):
        self.step._step()
        if self.wrong:
            self.step.logits = self.step.logits + 1.0


@pytest.mark.parametrize("how", ["no-cuda", "faithful", "wrong"])
def test_a_capture_is_checked_and_a_failed_one_decodes_eagerly(how, mixtral_folder, monkeypatch):
    """graph_mode "graph" on the CPU: the real capture fails (no CUDA), a stand-in graph that
    replays the step passes the replay check and decodes, and one whose replay differs from the
    eager step is refused: a warning, graphs off for the engine, the same tokens either way."""
    if how != "no-cuda":
        monkeypatch.setattr(GraphStep, "_capture",
                            lambda self: (setattr(self, "graph", FakeGraph(self, how == "wrong")), self._reset()))
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        want, _ = _generate(eng, None, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, steps = _generate(eng, "graph", PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        failed = [w for w in caught if "could not be captured as a CUDA graph" in str(w.message)]
        if how == "faithful":
            assert steps == 7 and not failed and eng.graph_mode == "graph"
        else:
            assert steps == 0 and len(failed) == 1 and eng.graph_mode is None and eng._graph_steps == {}
            assert ("differs from the step run eagerly" in str(failed[0].message)) == (how == "wrong")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_decodes_alike_with_or_without_the_graph_step(family, checkpoint_factory):
    """Every family the engine runs: where the check lets the graph step in, its tokens are the
    eager decode's; where it does not, the decode is the eager one. On a GPU this is the default
    decode of gpu-only for every family that takes it."""
    with Engine(checkpoint_factory(family), device="cpu", quiet=True) as eng:
        eng.eos_ids = set()
        want, _ = _generate(eng, None, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1)
        got, steps = _generate(eng, "eager", PROMPTS, max_new_tokens=6, temperature=1.0, seed=1)
        assert steps == (5 if eng._graph_agrees else 0)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
