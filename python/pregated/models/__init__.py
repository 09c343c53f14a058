"""The supported model families: dense parts in PyTorch, routed experts in the runtime."""

from .layers import CausalLM
from .loader import expert_layout, load_dense, load_experts

__all__ = ["CausalLM", "expert_layout", "load_dense", "load_experts"]
