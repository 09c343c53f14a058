"""Generation features: sampling, stopping, batching, streaming, chat templates."""

import pytest
import torch

from pregated.engine import Engine
from pregated.generation import SamplingParams, filter_logits, sample


@pytest.fixture(scope="module")
def engine(mixtral_folder):
    with Engine(mixtral_folder, device="cpu", quiet=True, policy="gpu-only") as eng:
        yield eng


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50)
    a = engine.generate("The quick brown fox", seed=7, **kw)
    b = engine.generate("The quick brown fox", seed=7, **kw)
    c = engine.generate("The quick brown fox", seed=8, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_top_k_and_top_p_are_respected():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    top3 = set(torch.topk(logits, 3).indices.flatten().tolist())
    params = SamplingParams(temperature=1.0, top_k=3)
    for _ in range(200):
        for b, t in enumerate(sample(logits, params, g).tolist()):
            assert t in torch.topk(logits[b], 3).indices.tolist()
    assert top3  # the filter itself: exactly k finite logits per row
    assert (filter_logits(logits, 3, 1.0).isfinite().sum(-1) == 3).all()
    # top-p keeps the smallest set of most likely tokens whose mass reaches p
    probs = torch.softmax(logits, -1)
    kept = filter_logits(logits, 0, 0.6).isfinite()
    for b in range(4):
        order = torch.argsort(probs[b], descending=True)
        n = int(kept[b].sum())
        assert set(order[:n].tolist()) == set(kept[b].nonzero().flatten().tolist())
        assert probs[b, order[:n]].sum() >= 0.6 and probs[b, order[:n - 1]].sum() < 0.6
    params = SamplingParams(temperature=1.0, top_p=0.6)
    for _ in range(200):
        for b, t in enumerate(sample(logits, params, g).tolist()):
            assert kept[b, t]


def test_a_tiny_temperature_samples_the_top_token():
    """Found by the server's fuzz: logits / 1e-300 overflowed to inf and softmax gave nan."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g) * 5
    for t in (1e-300, 1e-30, 1e-6):
        got = sample(logits, SamplingParams(temperature=t), g)
        assert got.tolist() == logits.argmax(-1).tolist(), t


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate("Experts live in", max_new_tokens=12)
    k1 = engine.generate("Experts live in", max_new_tokens=12, temperature=0.8, top_k=1, seed=3)
    assert greedy.token_ids == k1.token_ids


def test_stop_strings(engine):
    full = engine.generate("Mixture of experts", max_new_tokens=24)
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop and stop in full.text
    cut = engine.generate("Mixture of experts", max_new_tokens=24, stop=[stop, "never-there"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert len(cut.token_ids) < 24


def test_eos_ends_generation(engine):
    full = engine.generate("Mixture of experts", max_new_tokens=10)
    eos = full.token_ids[3]
    saved = set(engine.eos_ids)
    engine.eos_ids = {eos}
    try:
        out = engine.generate("Mixture of experts", max_new_tokens=10)
    finally:
        engine.eos_ids = saved
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:full.token_ids.index(eos) + 1]


def test_batch_equals_one_by_one(engine):
    prompts = ["The quick brown fox jumps", "Experts", [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
    batch = engine.generate(prompts, max_new_tokens=12)
    assert isinstance(batch, list) and len(batch) == 3
    for p, b in zip(prompts, batch):
        one = engine.generate(p, max_new_tokens=12)
        assert b.token_ids == one.token_ids and b.text == one.text
        assert b.prompt_tokens == one.prompt_tokens


def test_streaming_equals_non_streaming(engine):
    for prompt in ("日本語のテキスト 🙂", "héllo wörld"):
        for kw in ({}, {"temperature": 1.0, "seed": 5}, {"stop": ["e"]}):
            whole = engine.generate(prompt, max_new_tokens=20, **kw)
            stream = engine.generate(prompt, max_new_tokens=20, stream=True, **kw)
            pieces = list(stream)
            assert "".join(pieces) == whole.text
            assert stream.result.token_ids == whole.token_ids
            assert all(p for p in pieces)  # no empty pieces


def test_streaming_keeps_multibyte_characters_whole(engine):
    tok = engine.tokenizer
    # A byte-level tokenizer splits a 4-byte emoji into byte tokens: the stream must hold the
    # partial bytes back and never show a replacement character that the final text lacks.
    ids = tok.encode("🙂🚀日本", add_special_tokens=False)
    from pregated.generation import TextTracker

    tracker = TextTracker(tok, [])
    shown = "".join(tracker.add(i) for i in ids) + tracker.finish()
    assert shown == "🙂🚀日本" and "\ufffd" not in shown


def test_chat_template_matches_transformers(engine, mixtral_folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(mixtral_folder)
    messages = [{"role": "system", "content": "  Be brief.  "},
                {"role": "user", "content": "What is a pre-gate? ünïcode 🙂"},
                {"role": "assistant", "content": "A guess."},
                {"role": "user", "content": "And a slot?"}]
    for add in (True, False):
        assert engine.apply_chat_template(messages, add_generation_prompt=add) == \
            hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
    ours = engine.generate(messages, max_new_tokens=4)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.prompt_tokens == len(ids)
    assert ours.token_ids == engine.generate(list(ids), max_new_tokens=4).token_ids


def test_logits_contract(engine):
    out = engine.logits([5, 6, 7])
    assert out.shape == (3, engine.cfg.vocab_size) and out.dtype == torch.float32
    s = engine.stats()
    for key in ("bytes_h2d", "expert_hits", "expert_misses", "prefetch_issued", "prefetch_used",
                "stall_seconds", "tokens", "decode_seconds"):
        assert key in s
