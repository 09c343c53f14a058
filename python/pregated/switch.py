"""SwitchTransformers (the Pre-gated MoE paper's own models) through an adapter.

Its MoE layers do not use transformers' experts interface: each holds its experts as a
ModuleDict of DenseActDense modules (wi, wo, ReLU) and routes top-1 with an expert capacity. The
adapter swaps that ModuleDict for an experts module in the interface's layout (up_proj [E, I, H],
down_proj [E, H, I], no gate), adds the converter that stacks the checkpoint's per-expert
tensors into it, and reads the router's output in its own order (one-hot dispatch mask with
capacity overflow masked out, the chosen expert's probability, the logits).

T = tokens, E = experts, H = d_model, I = d_ff.
"""

from __future__ import annotations

import torch

MODEL_TYPES = ("switch_transformers",)


class SwitchExperts(torch.nn.Module):
    """SwitchTransformers' experts in transformers' experts-interface layout (no gate)."""

    has_gate = False
    has_bias = False
    is_transposed = False
    is_concatenated = True

    def __init__(self, config):
        from transformers.activations import ACT2FN

        super().__init__()
        self.num_experts = config.num_experts
        self.up_proj = torch.nn.Parameter(torch.empty(config.num_experts, config.d_ff, config.d_model))
        self.down_proj = torch.nn.Parameter(torch.empty(config.num_experts, config.d_model, config.d_ff))
        self.act_fn = ACT2FN[config.dense_act_fn]

    def forward(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor,
                routing_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H]; selected_experts [T, 1, E] one-hot (all zero for a token over its
        expert's capacity); routing_weights [T, 1] -> [T, H]."""
        from .experts import experts_forward

        mask = selected_experts.reshape(hidden_states.shape[0], -1)
        ids = mask.argmax(-1, keepdim=True)
        weights = routing_weights.reshape(-1, 1) * mask.sum(-1, keepdim=True).to(routing_weights.dtype)
        return experts_forward(self, hidden_states, ids, weights)


def adapt(model) -> None:
    """Swaps every sparse MLP's experts for a SwitchExperts (on the model's device, meta when built)."""
    config = model.config
    for module in model.modules():
        if type(module).__name__ == "SwitchTransformersSparseMLP":
            device = next(module.router.parameters()).device
            with torch.device(device):
                module.experts = SwitchExperts(config)


def conversions() -> list:
    """The checkpoint's per-expert tensors (experts.expert_N.wi / wo) stacked into the adapter's
    up_proj / down_proj, with transformers' own converter operations."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    return [WeightConverter(source_patterns="mlp.experts.*.wi.weight", target_patterns="mlp.experts.up_proj",
                            operations=[MergeModulelist(dim=0)]),
            WeightConverter(source_patterns="mlp.experts.*.wo.weight", target_patterns="mlp.experts.down_proj",
                            operations=[MergeModulelist(dim=0)])]


def read_router_output(out):
    """(dispatch mask [.., E], probability [.., 1], logits [.., E]) -> (logits, ids, weights) [T, *]:
    the expert each token prefers (a prediction ignores the capacity of a batch not yet seen)."""
    probs, logits = out[1], out[2]
    E = logits.shape[-1]
    return logits.reshape(-1, E), logits.reshape(-1, E).argmax(-1, keepdim=True), probs.reshape(-1, 1)
