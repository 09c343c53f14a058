"""Fill the dense model and the expert store from a checkpoint.

Dense tensors go to the device one at a time; experts are read one (layer, expert) at a time
from the memory-mapped files and copied straight into the runtime's expert store.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, CheckpointError
from .layers import CausalLM

# Per-expert names on disk: (gate, up, down).
_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclass
class ExpertLayout:
    """Where one MoE layer's tensors are: `prefix` is 'model.layers.N.mlp' or '...block_sparse_moe'."""
    prefix: str
    fused: bool
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


def expert_layout(ckpt: Checkpoint, layer: int) -> ExpertLayout:
    for block in ("mlp", "block_sparse_moe"):
        prefix = f"model.layers.{layer}.{block}"
        if ckpt.has(f"{prefix}.experts.gate_up_proj"):
            return ExpertLayout(prefix, fused=True)
        for names in _PER_EXPERT_NAMES:
            if ckpt.has(f"{prefix}.experts.0.{names[0]}.weight"):
                return ExpertLayout(prefix, fused=False, names=names)
    raise CheckpointError(
        f"no experts for layer {layer} in the checkpoint: looked for "
        f"model.layers.{layer}.mlp.experts.gate_up_proj, ...experts.0.gate_proj.weight and "
        f"...block_sparse_moe.experts.0.w1.weight")


def _checkpoint_name(param: str, layouts: dict[int, ExpertLayout]) -> str:
    parts = param.split(".")
    if parts[:2] == ["model", "layers"] and parts[3] == "mlp":
        layout = layouts.get(int(parts[2]))
        if layout is not None:  # router / shared expert live under the MoE prefix
            return ".".join([layout.prefix] + parts[4:])
    return param


def load_dense(model: CausalLM, cfg, ckpt: Checkpoint, device, dtype, layouts, progress=None) -> None:
    """Fill `model` (built on the meta device) with the checkpoint's dense tensors on `device`."""
    state = {}
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        src = _checkpoint_name(name, layouts)
        tensor = ckpt.get(src, shape=tuple(param.shape))
        state[name] = tensor.to(device=device, dtype=dtype)
        if progress is not None:
            progress.update(tensor.numel())
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)


def load_experts(runtime, cfg, ckpt: Checkpoint, layouts, dtype, progress=None) -> None:
    """Copy every routed expert into the runtime's expert store, one expert at a time."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for m, layer in enumerate(cfg.moe_layers):
        lay = layouts[layer]
        for e in range(E):
            if lay.fused:
                gate_up = ckpt.get_row(f"{lay.prefix}.experts.gate_up_proj", e, shape=(E, 2 * I, H))
                down = ckpt.get_row(f"{lay.prefix}.experts.down_proj", e, shape=(E, H, I))
                parts = {"gate": gate_up[:I], "up": gate_up[I:], "down": down}
            else:
                g, u, d = (f"{lay.prefix}.experts.{e}.{n}.weight" for n in lay.names)
                parts = {"gate": ckpt.get(g, shape=(I, H)), "up": ckpt.get(u, shape=(I, H)),
                         "down": ckpt.get(d, shape=(H, I))}
            for name, w in parts.items():
                runtime.set_expert(m, e, name, w.to(dtype).contiguous())
                if progress is not None:
                    progress.update(w.numel())


def checkpoint_parameters(ckpt: Checkpoint) -> int:
    """Parameters that loading will read (for the progress bar)."""
    total = 0
    for name in ckpt.keys():
        n = 1
        for s in ckpt.shape(name):
            n *= s
        total += n
    return total


def progress_bar(total: int, enabled: bool):
    """A loading progress bar on stderr, only when stderr is a terminal: logs stay clean."""
    return tqdm(total=total, unit=" params", unit_scale=True, desc="loading",
                disable=not (enabled and sys.stderr.isatty()), leave=False)


class CheckpointSource:
    """A model source for Engine: a folder in Hugging Face layout."""

    def __init__(self, folder: str):
        from ..config import read_config
        from ..tokenizer import Tokenizer

        self.folder = folder
        self.config = read_config(folder)
        self.tokenizer = Tokenizer(folder)
        self.checkpoint = Checkpoint(folder)
        self.layouts = {layer: expert_layout(self.checkpoint, layer) for layer in self.config.moe_layers}

    def parameters(self) -> int:
        return checkpoint_parameters(self.checkpoint)

    def load(self, model, runtime, device, dtype, progress=None) -> None:
        load_dense(model, self.config, self.checkpoint, device, dtype, self.layouts, progress)
        load_experts(runtime, self.config, self.checkpoint, self.layouts, dtype, progress)
        self.checkpoint = None  # unmap the files
