"""A checkpoint into transformers' model (dense weights, on the device) and the expert store
(routed experts, in host memory), reading each tensor once.

Checkpoint names reach the model's names through transformers' own conversion mapping (the
renamings and converters its from_pretrained applies: per-expert legacy names, fused names,
family-specific renames). Experts are converted one expert at a time where the checkpoint
stores them per expert, and read one expert slice at a time where it stores them fused, so host
memory never holds a layer's experts twice.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, CheckpointError
from .experts import ExpertLayout


@dataclass
class Source:
    """The checkpoint tensors behind one model tensor: a plain (possibly renamed) key, or the
    inputs of one transformers WeightConverter."""
    keys: list[tuple[str, str]] = field(default_factory=list)  # (source pattern, checkpoint key)
    converter: object = None


@dataclass
class LoadPlan:
    dense: dict[str, Source]                    # model tensor name -> its source
    experts: dict[tuple[int, str], Source]      # (block m, experts parameter) -> its source
    unexpected: list[str]                       # checkpoint keys the model has no place for


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def plan_load(model, ckpt: Checkpoint, meta_state: dict[str, torch.Tensor], expert_params: dict[str, tuple[int, str]]) -> LoadPlan:
    """Maps every checkpoint key to the model tensor it fills, as transformers' loader would.

    meta_state: the model's tensors by name (meta), expert parameters included;
    expert_params: full name of an experts module parameter -> (block m, parameter name)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from .modeling import extra_conversions

    mapping = get_model_conversion_mapping(model) + extra_conversions(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    plan = LoadPlan({}, {}, [])
    for key in sorted(ckpt.keys(), key=_natural):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = key, None
        if target not in meta_state:
            plan.unexpected.append(key)
            continue
        where = plan.experts if target in expert_params else plan.dense
        slot = expert_params.get(target, target)
        src = where.setdefault(slot, Source(converter=by_pattern.get(pattern) if pattern else None))
        src.keys.append((pattern or key, key))
    return plan


class Loader:
    """Fills a meta-device transformers model and the expert store from a checkpoint."""

    def __init__(self, model, ckpt: Checkpoint, blocks, layout: ExpertLayout, meta_state: dict[str, torch.Tensor]):
        self.model, self.ckpt, self.blocks, self.layout = model, ckpt, blocks, layout
        self.meta_state = meta_state
        self.expert_params = {f"{b.path}.{p}": (m, p) for m, b in enumerate(blocks) for p in layout.params}
        self.plan = plan_load(model, ckpt, meta_state, self.expert_params)
        missing = [(m, p) for m in range(len(blocks)) for p in layout.params if (m, p) not in self.plan.experts]
        if missing:
            m, p = missing[0]
            raise CheckpointError(
                f"no experts for layer {blocks[m].layer} in the checkpoint at {ckpt.folder}: found no tensor "
                f"that transformers maps to {blocks[m].path}.{p} (per-expert names such as "
                f"...experts.0.gate_proj.weight, or fused ...experts.{p})")

    # --- dense weights ----------------------------------------------------------------------

    def _convert(self, src: Source, target: str, keys: list[tuple[str, str]], read=None) -> dict[str, torch.Tensor]:
        """Runs transformers' converter over `keys` (one call, tensors read lazily by `read`)."""
        read = read or self.ckpt.get
        conv = deepcopy(src.converter)
        for pattern, key in keys:
            conv.add_tensor(target, key, pattern, lambda key=key: read(key))
        out = conv.convert(target, model=self.model, config=self.model.config)
        return {name: (t[0] if isinstance(t, list) else t) for name, t in out.items()}

    def load_dense(self, device, progress=None) -> set[str]:
        """Every dense tensor onto `device` in the model's dtype for it; returns the names filled."""
        filled = set()
        for target, src in self.plan.dense.items():
            if src.converter is None:
                key = src.keys[0][1]
                tensors = {target: self.ckpt.get(key, shape=tuple(self.meta_state[target].shape))}
            else:
                tensors = self._convert(src, target, src.keys)
            for name, t in tensors.items():
                want = self.meta_state.get(name)
                if want is None:
                    continue
                if tuple(t.shape) != tuple(want.shape):
                    files = ", ".join(sorted({self.ckpt.file_of(k) for _, k in src.keys}))
                    raise CheckpointError(
                        f"tensor '{name}' (from {', '.join(k for _, k in src.keys)} in {files}) has shape "
                        f"{list(t.shape)}, expected {list(want.shape)}: the checkpoint does not match its config.json")
                set_tensor(self.model, name, t.to(device=device, dtype=want.dtype))
                filled.add(name)
                if progress is not None:
                    progress.update(t.numel())
        return filled

    # --- experts ----------------------------------------------------------------------------

    def expert_slices(self, m: int, param: str, read=None):
        """Yields (expert e, its slice of `param` in the model's layout) for block m, reading
        checkpoint tensors with `read` (default: as stored, or dequantized)."""
        src = self.plan.experts[(m, param)]
        E = self.layout.num_experts
        want = self.layout.param_shape(param)
        name = f"{self.blocks[m].path}.{param}"
        per_pattern: dict[str, list[str]] = {}
        for pattern, key in src.keys:
            per_pattern.setdefault(pattern, []).append(key)

        def check(t, e, keys):
            if tuple(t.shape) != want:
                files = ", ".join(sorted({self.ckpt.file_of(k) for k in keys}))
                names = " and ".join(f"'{k}'" for k in keys)
                raise CheckpointError(
                    f"tensor {names} in {files} make expert {e} of {name} of shape {list(t.shape)}, "
                    f"expected {list(want)}: the checkpoint does not match its config.json")
            return t

        if src.converter is None:  # stored fused: one [E, ...] tensor, read one expert at a time
            key = src.keys[0][1]
            shape = self.ckpt.shape(key)
            if len(shape) != len(want) + 1 or shape[0] != E:
                raise CheckpointError(
                    f"tensor '{key}' in {self.ckpt.file_of(key)} has shape {list(shape)}, expected "
                    f"{[E] + list(want)}: the checkpoint does not match its config.json")
            for e in range(E):
                yield e, check(self.ckpt.get_row(key, e), e, [key])
        elif all(len(keys) == E for keys in per_pattern.values()):  # per expert: convert one at a time
            for e in range(E):
                keys = [(p, ks[e]) for p, ks in per_pattern.items()]
                t = self._convert(src, name, keys, read)[name]
                yield e, check(t[0] if t.dim() == len(want) + 1 else t, e, [k for _, k in keys])
        else:  # any other converter: the whole layer at once, then its experts
            t = self._convert(src, name, src.keys, read)[name]
            for e in range(E):
                yield e, check(t[e], e, [k for _, k in src.keys])

    def load_experts(self, set_expert, dtype: torch.dtype, progress=None, set_packed=None) -> None:
        """set_expert(m, e, part, tensor) for every part of every expert; experts the checkpoint
        ships packed go to set_packed(m, e, part, tensor) as packed codes, scales and zeros."""
        for m in range(len(self.blocks)):
            for param in self.layout.params:
                keys = [k for _, k in self.plan.experts[(m, param)].keys]
                packed = [self.ckpt.is_packed(k) for k in keys]
                if any(packed):
                    if not all(packed) or set_packed is None:
                        raise CheckpointError(
                            f"'{keys[packed.index(True)]}' in {self.ckpt.folder} is packed "
                            f"({self.ckpt.packed_format.method}) but "
                            + ("other tensors of the same experts are not" if not all(packed)
                               else "these experts are being loaded unpacked"))
                    self._load_packed(m, param, set_packed, progress)
                    continue
                for e, t in self.expert_slices(m, param):
                    for part, w in self.layout.store_parts(param, t).items():
                        set_expert(m, e, part, w.to(dtype).contiguous())
                    if progress is not None:
                        progress.update(t.numel())

    def _load_packed(self, m: int, param: str, set_packed, progress=None) -> None:
        """Packed experts into the store as they are: codes, and scales and zeros spread over
        their groups' columns, go through the same conversions as a weight would (renames,
        stacking, concatenation, transposes), then each part's scales and zeros are read back
        per group."""
        from .quantize import pack

        gs, bits = self.ckpt.packed_format.group_size, self.ckpt.packed_format.bits
        memo: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def component(key: str, i: int) -> torch.Tensor:
            if key not in memo:
                codes, scale, zero = self.ckpt.packed(key)
                cols = codes.shape[1]
                memo[key] = (codes, scale.repeat_interleave(gs, 1)[:, :cols], zero.repeat_interleave(gs, 1)[:, :cols])
            return memo[key][i]

        streams = [self.expert_slices(m, param, read=lambda k, i=i: component(k, i)) for i in range(3)]
        for (e, codes), (_, scale), (_, zero) in zip(*streams):
            memo.clear()
            parts = [self.layout.store_parts(param, t) for t in (codes, scale, zero)]
            for part, c in parts[0].items():
                s, z = parts[1][part], parts[2][part]
                s16, z16 = s[:, ::gs].contiguous(), z[:, ::gs].contiguous()
                cols = c.shape[1]
                if not (torch.equal(s16.repeat_interleave(gs, 1)[:, :cols], s)
                        and torch.equal(z16.repeat_interleave(gs, 1)[:, :cols], z)):
                    raise CheckpointError(
                        f"the packed experts of {self.blocks[m].path}.{param} do not keep their groups of {gs} "
                        "along the input in the model's layout: this family cannot load them packed; "
                        "dequantize the checkpoint first")
                set_packed(m, e, part, pack(c.contiguous(), bits))
                set_packed(m, e, f"{part}.scale", s16)
                set_packed(m, e, f"{part}.zero", z16)
            if progress is not None:
                progress.update(codes.numel())


def set_tensor(model, name: str, value: torch.Tensor) -> None:
    """Replaces parameter or buffer `name` of `model` with `value` (no grad)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise CheckpointError(f"the model has no tensor '{name}'")


def finish_on_device(model, device, filled: set[str]) -> None:
    """Ties shared weights, puts the buffers transformers computes (RoPE tables) on the device
    and computes them; fails naming the dense tensors the checkpoint did not hold."""
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"the checkpoint holds no tensor for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + ": it does not match its config.json")
    for _, p in model.named_parameters():
        p._is_hf_initialized = True  # initialize_weights below leaves loaded tensors alone
    recompute = False
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":
            set_tensor(model, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
            recompute = True
        else:
            buf._is_hf_initialized = name in filled
    if recompute:
        # transformers' initialize_weights runs _init_weights on modules not marked initialized:
        # mark every module whose own tensors were all loaded (the experts modules hold none).
        for module in model.modules():
            own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
            module._is_hf_initialized = all(getattr(t, "_is_hf_initialized", False) for t in own)
        model.initialize_weights()


def progress_bar(total: int, enabled: bool):
    """A loading progress bar on stderr, only when stderr is a terminal: logs stay clean."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, unit=" params", unit_scale=True, desc="loading",
                disable=not (enabled and sys.stderr.isatty()), leave=False)


class CheckpointSource:
    """A model source for Engine: a folder in Hugging Face layout."""

    def __init__(self, folder: str):
        from .config import read_hf_config
        from .tokenizer import Tokenizer

        self.folder = folder
        self.hf_config = read_hf_config(folder)
        self.tokenizer = Tokenizer(folder)
        self.checkpoint = Checkpoint(folder)

    def build(self, dtype: torch.dtype):
        from .modeling import build_model

        return build_model(self.hf_config, dtype)

    def parameters(self) -> int:
        """Parameters that loading will read (for the progress bar)."""
        return sum(_numel(self.checkpoint.shape(k)) for k in self.checkpoint.keys())

    def packed_experts(self):
        """The PackedFormat of experts the checkpoint ships packed (GPTQ, AWQ, compressed-tensors),
        or None."""
        return self.checkpoint.packed_experts()

    def load(self, model, blocks, layout, meta_state, set_expert, device, dtype, progress=None,
             set_packed=None) -> None:
        loader = Loader(model, self.checkpoint, blocks, layout, meta_state)
        filled = loader.load_dense(device, progress)
        loader.load_experts(set_expert, dtype, progress, set_packed)
        finish_on_device(model, device, filled)
        self.checkpoint = None  # unmap the files


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
