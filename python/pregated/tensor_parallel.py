"""Tensor parallelism of attention and dense MLPs across the expert-parallel ranks (Megatron's
split, on transformers' own modules).

Each rank keeps a contiguous share of every attention layer's key/value heads (and the query
heads that read them) and of every dense MLP's intermediate features: q/k/v and gate/up are cut
by output rows, o_proj and down_proj by input columns, and the partial outputs of o_proj and
down_proj are summed over the ranks (`all_reduce`) before the residual add. transformers'
attention code reads its head count from the tensors (`view(..., -1, head_dim)`), so the cut
modules run unchanged and the KV cache holds this rank's heads only. A norm over the whole
projection width (OLMoE's q_norm / k_norm) becomes a norm whose mean of squares is summed over
the ranks. Embeddings, the LM head, routers and layer norms stay replicated.

Every rank then holds the block's tokens in duplicate: the expert all-to-all drops the
duplicates (DeepSpeed-TED), see expert_parallel.py.
"""

from __future__ import annotations

import torch

from .expert_parallel import ExpertParallel, share


def _keep_rows(linear: torch.nn.Linear, start: int, stop: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[start:stop].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:stop].clone(), requires_grad=False)
    linear.out_features = stop - start


def _keep_columns(linear: torch.nn.Linear, start: int, stop: int, keep_bias: bool) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, start:stop].contiguous(), requires_grad=False)
    if linear.bias is not None and not keep_bias:  # the bias is added once: on rank 0
        linear.bias = torch.nn.Parameter(torch.zeros_like(linear.bias.data), requires_grad=False)
    linear.in_features = stop - start


class TensorParallel:
    """Shards a model's attention and dense MLPs over the ranks of `ep`'s group."""

    def __init__(self, ep: ExpertParallel):
        self.ep = ep
        self.world, self.rank = ep.world, ep.rank
        self.bytes_reduced = 0  # payload this rank contributed to the all-reduces

    def _sum_over_ranks(self, what: str):
        def hook(module, args, out):
            self.bytes_reduced += out.numel() * 4  # summed in float32
            return self.ep.all_reduce(out, what).to(out.dtype)
        return hook

    def _sharded_norm(self, norm: torch.nn.Module, start: int, stop: int, width: int, what: str) -> None:
        """An RMS norm over `width` features of which this rank holds [start, stop)."""
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if weight is None or eps is None or weight.shape[-1] != width:
            raise ValueError(f"tensor parallelism: {what} ({type(norm).__name__}) normalises across the heads being "
                             "split and is not an RMS norm with a weight and an epsilon; run without --tensor-parallel")
        norm.weight = torch.nn.Parameter(weight.data[start:stop].clone(), requires_grad=False)
        ep = self.ep

        def forward(x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            xf = xf * torch.rsqrt(ep.all_reduce(xf.pow(2).sum(-1, keepdim=True), what) / width + eps)
            return norm.weight * xf.to(x.dtype)

        norm.forward = forward

    def shard_attention(self, name: str, attn: torch.nn.Module) -> None:
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        hd = attn.head_dim
        heads, kv_heads = q.out_features // hd, k.out_features // hd
        if kv_heads % self.world:
            raise ValueError(f"tensor parallelism: {name} has {kv_heads} key/value heads, which do not split over "
                             f"{self.world} ranks; use a rank count that divides {kv_heads}, or run without "
                             "--tensor-parallel")
        kv0, kv1 = kv_heads // self.world * self.rank, kv_heads // self.world * (self.rank + 1)
        group = heads // kv_heads
        q0, q1 = kv0 * group, kv1 * group
        for norm_name, proj, lo, hi in (("q_norm", q, q0, q1), ("k_norm", k, kv0, kv1)):
            norm = getattr(attn, norm_name, None)
            w = getattr(norm, "weight", None)
            if norm is not None and w is not None and w.shape[-1] == proj.out_features != hd:
                self._sharded_norm(norm, lo * hd, hi * hd, proj.out_features, f"{name}.{norm_name}")
        _keep_rows(q, q0 * hd, q1 * hd)
        _keep_rows(k, kv0 * hd, kv1 * hd)
        _keep_rows(v, kv0 * hd, kv1 * hd)
        _keep_columns(o, q0 * hd, q1 * hd, keep_bias=self.rank == 0)
        o.register_forward_hook(self._sum_over_ranks(f"{name}.o_proj all-reduce"))

    def shard_mlp(self, name: str, mlp: torch.nn.Module) -> None:
        inter = mlp.gate_proj.out_features
        i0, i1 = share(inter, self.rank, self.world)
        if i0 == i1:
            raise ValueError(f"tensor parallelism: {name} has {inter} intermediate features for {self.world} ranks")
        _keep_rows(mlp.gate_proj, i0, i1)
        _keep_rows(mlp.up_proj, i0, i1)
        _keep_columns(mlp.down_proj, i0, i1, keep_bias=self.rank == 0)
        mlp.down_proj.register_forward_hook(self._sum_over_ranks(f"{name}.down_proj all-reduce"))

    def shard(self, model: torch.nn.Module, num_layers: int) -> None:
        """Cuts every attention with q/k/v/o projections and every gate/up/down MLP; refuses a
        model with attention layers of another form."""
        linear = torch.nn.Linear
        attns, mlps = [], []
        for name, m in model.named_modules():
            if all(isinstance(getattr(m, p, None), linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                    and isinstance(getattr(m, "head_dim", None), int):
                attns.append((name, m))
            elif all(isinstance(getattr(m, p, None), linear) for p in ("gate_proj", "up_proj", "down_proj")):
                mlps.append((name, m))
        if len(attns) != num_layers:
            kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(("self_attn", "attention",
                                                                                              "linear_attn", "mamba"))})
            raise ValueError(f"tensor parallelism splits attention layers with q/k/v/o projections: this model has "
                             f"{len(attns)} of them in {num_layers} layers ({', '.join(kinds) or 'other mixers'}); "
                             "run it without --tensor-parallel")
        for name, m in attns:
            self.shard_attention(name, m)
        for name, m in mlps:
            self.shard_mlp(name, m)
