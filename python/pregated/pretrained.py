"""For people who live in transformers: the checkpoint's own transformers model, with its routed
experts offloaded by pregated, usable with transformers' generate() and pipeline()."""

from __future__ import annotations


def from_pretrained(model: str, *, expert_memory=None, policy: str | None = None, device=None, dtype=None,
                    eviction: str = "lru", pregate=None, routing: str = "exact", quiet: bool = False):
    """transformers' model (AutoModelForCausalLM's class for the checkpoint) whose routed experts
    live in pregated's expert store and reach the device under `policy` and `expert_memory`.

    The same arguments as `Engine`. The returned model is a `transformers.PreTrainedModel`:
    `model.generate(...)`, `pipeline("text-generation", model=model, tokenizer=...)` and plain
    forward calls run its experts through pregated. `model.pregated` is the Engine behind it:
    `model.pregated.stats()`, `.reconfigure(...)`, `.close()` (frees the expert slots)."""
    from .engine import Engine

    engine = Engine(model, device=device, dtype=dtype, policy=policy, expert_memory=expert_memory,
                    eviction=eviction, pregate=pregate, routing=routing, quiet=quiet)
    hf_model = engine.model
    hf_model.pregated = engine
    return hf_model
