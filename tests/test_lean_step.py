"""The lean decode step (lean_step.py): installed where it gives what the model's own forward
gives, used for unpadded decode steps, and refused (the model's forward runs) everywhere else.
The parity suite (test_engine_parity.py) compares the tokens of every family against
transformers with the step in place; these tests check that it runs, and what it refuses."""

import pytest
import torch

from pregated.engine import Engine
from pregated.lean_step import lean_step_for

PROMPT = list(range(5, 17))


class Counting:
    """Wraps an engine's lean step: how many steps it took and how many it refused."""

    def __init__(self, step):
        self.step, self.taken, self.refused = step, 0, 0

    def __call__(self, *args):
        out = self.step(*args)
        if out is None:
            self.refused += 1
        else:
            self.taken += 1
        return out


def _generate(eng, prompt, n=12, lean=True):
    saved = eng.lean_step
    if not lean:
        eng.lean_step = None
    try:
        eng.eos_ids = set()
        return eng.generate(prompt, max_new_tokens=n)
    finally:
        eng.lean_step = saved


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_steps_take_the_lean_step_and_give_the_same_tokens(family, dtype, checkpoint_factory):
    with Engine(checkpoint_factory(family, dtype=dtype), device="cpu", quiet=True) as eng:
        assert eng.lean_step is not None, f"{family}: the lean step was not installed"
        want = _generate(eng, PROMPT, lean=False).token_ids
        eng.lean_step = counting = Counting(eng.lean_step)
        got = _generate(eng, PROMPT).token_ids
        assert got == want
        assert counting.taken == 11 and counting.refused == 0  # every step after the prefill's token


def test_qwen2_moe_keeps_its_shared_expert_block_and_olmoe_inlines_its_block(checkpoint_factory):
    with Engine(checkpoint_factory("qwen2_moe"), device="cpu", quiet=True) as eng:
        assert all(lay.m is None for lay in eng.lean_step.layers)  # shared experts: the block's own forward
    with Engine(checkpoint_factory("olmoe"), device="cpu", quiet=True) as eng:
        assert [lay.m for lay in eng.lean_step.layers] == list(range(len(eng.blocks)))


def test_the_pregated_policy_sees_the_same_residual_stream(mixtral_folder):
    """The step records block m's residual stream for the pre-gate as the taps' hooks would:
    the same tokens and the same prediction scores with it and without it (how many copies a
    run makes depends on the copy thread's timing, so those are not compared)."""
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        budget = 3 * eng.cfg.top_k * eng.cfg.expert_bytes()  # evicting on every step
    runs = []
    for lean in (False, True):
        with Engine(mixtral_folder, device="cpu", policy="pregated", expert_memory=budget, quiet=True) as eng:
            assert eng.lean_step is not None
            eng.lean_step = counting = Counting(eng.lean_step)
            out = _generate(eng, PROMPT, lean=lean)
            assert eng.stats()["bytes_h2d"] > 0
            runs.append((out.token_ids, eng.moe.prediction_totals()))
            assert counting.taken == (11 if lean else 0)
            eng.runtime.check()
    assert runs[0] == runs[1]


def test_a_padded_batch_and_finished_rows_run_the_model(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.lean_step = counting = Counting(eng.lean_step)
        eng.eos_ids = set()
        padded = eng.generate([PROMPT, PROMPT[:7]], max_new_tokens=6)
        assert counting.taken == 0
        alone = [_generate(eng, p, n=6, lean=False).token_ids for p in (PROMPT, PROMPT[:7])]
        assert [r.token_ids for r in padded] == alone
        same = eng.generate([PROMPT, PROMPT[::-1]], max_new_tokens=6)  # equal lengths: no padding
        assert counting.taken == 5
        assert [r.token_ids for r in same] == [_generate(eng, p, n=6, lean=False).token_ids for p in (PROMPT, PROMPT[::-1])]


def test_a_hook_it_would_skip_sends_the_step_to_the_model(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        seen = []
        handle = eng.model.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, out: seen.append(1))
        eng.lean_step = counting = Counting(eng.lean_step)
        out = _generate(eng, PROMPT, n=4).token_ids
        assert counting.taken == 0 and counting.refused == 3 and len(seen) == 4  # the prefill and 3 steps
        handle.remove()
        assert _generate(eng, PROMPT, n=4).token_ids == out and counting.taken == 3


def test_a_hook_on_a_projection_runs_on_every_step(mixtral_folder):
    """q/k/v are computed in one pass by the lean attention; a hook on one of them sends the
    attention (and the step) back to transformers' forward, so the hook sees every call."""
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        want = _generate(eng, PROMPT, n=4).token_ids
        seen = []
        handle = eng.model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(1))
        try:
            assert _generate(eng, PROMPT, n=4).token_ids == want
        finally:
            handle.remove()
        assert len(seen) == 4  # the prefill and three decode steps


def test_a_sliding_window_the_cache_reaches_sends_the_step_to_the_model(checkpoint_factory):
    with Engine(checkpoint_factory("mixtral", sliding_window=16), device="cpu", quiet=True) as eng:
        assert eng.lean_step is not None and eng.lean_step.window == 16
        want = _generate(eng, PROMPT, n=10, lean=False).token_ids
        eng.lean_step = counting = Counting(eng.lean_step)
        assert _generate(eng, PROMPT, n=10).token_ids == want
        assert counting.taken == 3 and counting.refused == 6  # cache 12..14 of 16 keys: lean; from 15 on: the model


def test_a_layer_that_computes_something_else_gets_no_lean_step(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        layer = eng.model.model.layers[1]
        base = type(layer)

        class HalfResidual(base):  # the same children, another forward
            def forward(self, hidden_states, **kwargs):
                return base.forward(self, hidden_states, **kwargs) * 0.5

        layer.__class__ = HalfResidual
        try:
            assert lean_step_for(eng.model, eng.blocks, eng.taps, eng._cache_arg) is None
        finally:
            layer.__class__ = base
        assert lean_step_for(eng.model, eng.blocks, eng.taps, eng._cache_arg) is not None
        # the check swapped in stub experts and put the engine's back
        assert all(b.experts._pregated.executor is eng.moe for b in eng.blocks)


def test_the_environment_turns_it_off(mixtral_folder, monkeypatch):
    monkeypatch.setenv("PREGATED_LEAN_STEP", "0")
    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        assert eng.lean_step is None
    monkeypatch.setenv("PREGATED_LEAN_STEP", "yes")
    with pytest.raises(ValueError, match="PREGATED_LEAN_STEP"):
        Engine(mixtral_folder, device="cpu", quiet=True)


def test_the_server_steps_one_request_through_it(mixtral_folder):
    """A request alone in the server's batch (no row padded) decodes through the lean step and
    gives Engine.generate's text."""
    import threading

    from pregated.generation import SamplingParams
    from pregated.serving import Request, Scheduler

    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        eng.eos_ids = set()  # random weights may emit eos: eight tokens either way
        want = eng.generate(PROMPT, max_new_tokens=8).text
        eng.lean_step = counting = Counting(eng.lean_step)
        sched = Scheduler(eng, max_batch=2)
        events, done = [], threading.Event()

        def emit(ev):
            events.append(ev)
            if "finish_reason" in ev:
                done.set()

        try:
            sched.submit(Request(PROMPT, SamplingParams(max_new_tokens=8), emit))
            assert done.wait(120)
        finally:
            sched.shutdown(drain=True, timeout=120)
        assert "".join(ev.get("text", "") for ev in events) == want
        assert counting.taken == 7


def test_an_attention_refusal_before_the_cache_is_written_runs_the_model(mixtral_folder, monkeypatch):
    import pregated.lean_step as lean_step

    with Engine(mixtral_folder, device="cpu", quiet=True) as eng:
        want = _generate(eng, PROMPT, n=4).token_ids
        real = lean_step._lean_attention
        refuse = {"layer": 0}

        def attention(module, args, kwargs):
            return None if module.layer_idx == refuse["layer"] else real(module, args, kwargs)

        monkeypatch.setattr(lean_step, "_lean_attention", attention)
        eng.lean_step = counting = Counting(eng.lean_step)
        assert _generate(eng, PROMPT, n=4).token_ids == want  # refused at the first layer: the model ran
        assert counting.refused == 3 and counting.taken == 0
        refuse["layer"] = 1  # after layer 0 wrote the cache: an error, not a wrong answer
        with pytest.raises(RuntimeError, match="PREGATED_LEAN_STEP=0"):
            _generate(eng, PROMPT, n=4)
