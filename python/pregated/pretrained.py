"""For people who live in transformers: the checkpoint's own transformers model, with its routed
experts offloaded by pregated, usable with transformers' generate() and pipeline()."""

from __future__ import annotations

import os

import torch


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


class LoadedModel:
    """A model source for Engine: a transformers model already loaded in host memory, whose
    experts are moved into the expert store (see `offload`)."""

    def __init__(self, model):
        from .synthetic import NullTokenizer
        from .tokenizer import Tokenizer

        self.model = model
        self.hf_config = model.config
        folder = getattr(model, "name_or_path", "") or ""
        self.tokenizer = Tokenizer(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else NullTokenizer()

    def build(self, dtype: torch.dtype):
        from .experts import register

        register()
        self.model.set_experts_implementation("pregated")
        return self.model.eval()

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def load(self, model, blocks, layout, meta_state, set_expert, device, dtype, progress=None) -> None:
        """Copies the experts out of the loaded modules (their tensors are in `meta_state`, which
        was taken before the modules dropped them), then moves the dense rest to the device."""
        for m, b in enumerate(blocks):
            for name in layout.params:
                full = meta_state[f"{b.path}.{name}"]
                for e in range(layout.num_experts):
                    for part, w in layout.store_parts(name, full[e]).items():
                        set_expert(m, e, part, w.to(dtype).contiguous())
                if progress is not None:
                    progress.update(full.numel())
        model.to(device=device, dtype=dtype)


def offload(model, *, expert_memory=None, policy: str | None = None, device=None, eviction: str = "lru",
            pregate=None, routing: str = "exact", quiet: bool = True):
    """Moves a transformers model already loaded in host memory (e.g. by
    `AutoModelForCausalLM.from_pretrained(path, experts_implementation="pregated")`) onto
    pregated: its routed experts into the expert store, the rest onto `device`; returns the same
    model with `model.pregated` (the Engine). While it runs, host memory holds the experts twice;
    `from_pretrained` loads them straight into the store instead."""
    from .engine import Engine

    engine = Engine(LoadedModel(model), device=device, dtype=None, policy=policy, expert_memory=expert_memory,
                    eviction=eviction, pregate=pregate, routing=routing, quiet=quiet)
    model.pregated = engine
    return model
