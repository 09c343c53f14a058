"""Engine: load a Hugging Face MoE checkpoint into transformers' own model with its routed
experts in pregated's expert store, own the runtime, generate.

B = batch, L = new tokens this step, S = tokens so far, H = hidden, V = vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
import warnings

import torch

from . import _core
from .config import checkpoint_dtype, dtype_from_name, dtype_name
from .experts import Binding, register_runtime, unregister_runtime
from .generation import GenerationResult, SamplingParams, TextStream, TextTracker, sample
from .loading import CheckpointSource, progress_bar
from .modeling import dense_bytes, describe, drop_expert_parameters, num_layers
from .expert_parallel import ExpertParallel, checkpoint_fingerprint, summary_of
from .tensor_parallel import TensorParallel
from .moe import (MoEExecutor, check_eviction, check_hybrid, check_routing, device_path_wanted, hybrid_split,
                  resolve_policy)
from .pregate import SpeculativePregate, load_pregate
from .pretrained import LoadedModel
from .cpu_dense import LEAN_PREFILL_ROWS, decode_threads, place_on_huge_pages, use_cpu_pool_for_dense
from .cpu_fused import use_fused_modules
from .graph_step import KEPT_GRAPHS, CaptureFailed, GraphStep, cache_length, graph_step_agrees, graph_step_wanted
from .lean_step import lean_step_for
from .quantize import resolve_expert_quantization, store_writer
from .prompts import as_token_ids, check_chat_messages, check_token_ids, encode_prompt, split_batch
from .synthetic import SyntheticModel
from .taps import BlockTaps


def default_device() -> str:
    if torch.cuda.is_available() and _core.build_info()["cuda_devices"] > 0:
        return "cuda:0"
    return "cpu"


def _resolve_device(device) -> str:
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type == "cuda":
        if not _core.build_info()["cuda"]:
            raise RuntimeError("this build of pregated has no CUDA backend; use device='cpu' or rebuild with CUDA")
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu'")
        return f"cuda:{d.index or 0}"
    if d.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    return "cpu"


def _resolve_dtype(dtype, hf_config) -> torch.dtype:
    if dtype is None:
        return checkpoint_dtype(hf_config)
    named = dtype_from_name(dtype)
    if named is None:
        raise ValueError(f"dtype {dtype!r} is not supported: use float32, float16 or bfloat16")
    return named


class Engine:
    """A MoE model whose experts live in host memory and reach the device through the runtime.

    Parameters
    ----------
    model : folder in Hugging Face layout (config.json, safetensors, tokenizer.json).
    device : "cpu", "cuda" or "cuda:N"; default CUDA when usable, else CPU.
    dtype : float32 / float16 / bfloat16 (default: the checkpoint's).
    policy : "gpu-only", "on-demand", "prefetch-all", "pregated" or "hybrid"; default the fastest
        correct choice for the budget (gpu-only when every expert fits, else pregated).
    expert_memory : device bytes for expert slots, an int or a string like "8GiB"; None = all.
    eviction : "lru", "lfu" or "none" (no cache: a block's experts leave when it is done).
    pregate : "speculative" (default: block i+1's router applied early) or a folder written by
        `pregated calibrate` (a trained pre-gate).
    routing : "exact" (default: every block routes with its own router; the pre-gate only
        prefetches) or "pregate" (block i+1 computes with the experts the pre-gate chose).
    expert_dtype : None (the experts in `dtype`) or "int8", "int4", "int3", "int2": experts
        quantized when loaded, group-wise (`group_size` 32, 64 or 128 along the input dimension),
        by round-to-nearest (`quantize="rtn"`) or with HQQ's refinement (`quantize="hqq"`); they
        stay packed in the store, on the wire and in the slots. Dense layers keep `dtype`.
    hot_fraction : policy hybrid: the share of the expert slots kept for hot experts (the most
        routed ones stay pinned); default all but 2 * top_k slots (`moe.hybrid_split`).
    lane_plan : policy hybrid: "auto" (the cost model decides, per block and expert, between a
        copy and the host lane) or, for tests, "host", "copy" or "alternate".
    lane_costs : policy hybrid: fix the cost model instead of measuring it, a dict with any of
        link_bandwidth and host_bandwidth (bytes/s) and host_row_seconds.
    expert_parallel : spread every MoE layer's experts over the ranks of the initialised
        torch.distributed process group (torchrun; gloo on CPUs, NCCL on GPUs): each rank holds
        and runs its share, policy / budget / expert dtype apply per rank, and every rank must
        make the same calls (see expert_parallel.py). On GPUs device "cuda" is the rank's
        current device: call torch.cuda.set_device(local_rank) first (the CLI does).
    tensor_parallel : with expert_parallel, also split attention heads and dense MLPs over the
        ranks (Megatron's split, all-reduce after o_proj / down_proj; tensor_parallel.py); the
        experts' all-to-all then drops the tokens the ranks hold in duplicate either way.
    quiet : no progress bar while loading (it is shown only when stderr is a terminal anyway).
    """

    def __init__(self, model: str, *, device=None, dtype=None, policy: str | None = None,
                 expert_memory=None, eviction: str = "lru", pregate=None, routing: str = "exact",
                 expert_dtype: str | None = None, group_size: int | None = None, quantize: str = "rtn",
                 hot_fraction: float | None = None, lane_plan: str = "auto", lane_costs: dict | None = None,
                 expert_parallel: bool = False, tensor_parallel: bool = False, quiet: bool = False):
        if isinstance(model, (SyntheticModel, LoadedModel)):
            source = model
            self.folder = None
        else:
            if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):
                raise FileNotFoundError(f"model folder {model!r} does not exist (a local folder in Hugging Face layout)")
            self.folder = str(model)
            source = CheckpointSource(self.folder)
        self.hf_config = source.hf_config
        self.tokenizer = source.tokenizer
        if expert_parallel and device in (None, "cuda") and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"  # each rank its own GPU (torch.cuda.set_device)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.hf_config)
        self.model = source.build(self.dtype)
        self.blocks, self.layout, self.cfg = describe(self.hf_config, self.model, self.dtype)
        cfg = self.cfg
        packed = source.packed_experts() if isinstance(source, CheckpointSource) else None
        self.quant = resolve_expert_quantization(packed, expert_dtype, group_size, quantize)
        if self.quant is not None:
            cfg.expert_format, cfg.group_size = self.quant.name, self.quant.group_size
        if tensor_parallel and not expert_parallel:
            raise ValueError("tensor_parallel=True splits attention and dense MLPs over the expert-parallel ranks: "
                             "give expert_parallel=True too (under torchrun)")
        self.ep = ExpertParallel(cfg.num_experts) if expert_parallel else None
        self.tp = None
        # the experts this process holds: all of them, or this rank's share
        self.rank_cfg = self.ep.rank_config(cfg) if self.ep else cfg
        if self.ep:
            self.ep.check_same(summary_of({
                "checkpoint": checkpoint_fingerprint(self.folder), "dtype": self.dtype, "policy": policy,
                "expert_memory": expert_memory, "eviction": eviction, "routing": routing, "expert_dtype": expert_dtype,
                "group_size": group_size, "quantize": quantize, "device_type": self.device.split(":")[0],
                "tensor_parallel": tensor_parallel}))
        self.policy, self.expert_memory = resolve_policy(policy, expert_memory, self.rank_cfg)
        check_eviction(self.policy, eviction)
        check_routing(routing)
        self.eviction = eviction
        self.hybrid = check_hybrid(hot_fraction, lane_plan, lane_costs)
        lay = self.layout
        self.runtime = _core.Runtime(
            cfg.num_moe_layers, self.rank_cfg.num_experts, lay.hidden, lay.intermediate, ffn=lay.ffn,
            dtype=dtype_name(self.dtype), device=self.device, expert_memory=self.expert_memory,
            eviction=eviction, has_bias=lay.has_bias, alpha=lay.alpha, limit=lay.limit,
            expert_format=cfg.expert_format, group_size=cfg.group_size)
        self._handle = register_runtime(self.runtime)
        try:
            meta_state = dict(self.model.state_dict())
            drop_expert_parameters(self.blocks, lay)
            with progress_bar(source.parameters(), not quiet) as bar:
                write = self._own_experts(store_writer(self.runtime, self.quant))
                extra = {"set_packed": self._own_experts(self.runtime.set_expert)} if packed is not None else {}
                source.load(self.model, self.blocks, lay, meta_state, write, self.device, self.dtype, bar, **extra)
            if tensor_parallel:
                self.tp = TensorParallel(self.ep)
                self.tp.shard(self.model, num_layers(self.model))
            if self.device == "cpu":
                place_on_huge_pages(self.model)
                use_cpu_pool_for_dense(self.model)
                use_fused_modules(self.model)
            self.taps = BlockTaps(self.blocks)
            self.pregate = SpeculativePregate(self.blocks, self.taps)
            self.moe = MoEExecutor(self.runtime, self._handle, cfg, self.policy, self.pregate, self.taps, routing)
            self.moe.ep = self.ep
            self.moe.device_path = (self.device.startswith("cuda") and device_path_wanted()
                                    and self.runtime.reads_store_in_place)
            for m, b in enumerate(self.blocks):
                b.experts._pregated = Binding(self.moe, m)
            self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            self.lean_step = (lean_step_for(self.model, self.blocks, self.taps, self._cache_arg)
                              if self.device == "cpu" and self.ep is None and not tensor_parallel else None)
            self.dense_bytes = dense_bytes(self.model)
            # The graph step (graph_step.py) where the policy allows it: "graph" captures it (CUDA),
            # "eager" runs the same step uncaptured (how CPU tests check it), None never.
            self.graph_mode = "graph" if self.device.startswith("cuda") and graph_step_wanted() else None
            self._graph_agrees: bool | None = None  # graph_step_agrees, once
            self._graph_steps: dict[tuple[int, int], GraphStep] = {}  # by (batch, cache length), oldest first
            self._counters = {"tokens": 0, "decode_seconds": 0.0, "prefill_tokens": 0, "prefill_seconds": 0.0,
                              "graph_steps": 0, "graph_host_seconds": 0.0}
            self.eos_ids = set(cfg.eos_token_ids)
            eos_text = self.tokenizer.token_id(self.tokenizer.eos_token)
            if eos_text is not None:
                self.eos_ids.add(eos_text)
            self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
            self._trace_step: int | None = None  # decode step whose timeline trace_decode_step records
            self._last_trace: list[dict] = []
            self._last_results: list[GenerationResult] = []
            self._apply_policy()
            if pregate is not None:
                self.pregate = self.moe.pregate = self._load_pregate(pregate)
        except BaseException:
            self.close()
            raise

    def _own_experts(self, write):
        """A store writer that keeps this rank's experts (under their local ids) and drops the rest."""
        if self.ep is None:
            return write

        def own(m: int, e: int, part: str, w) -> None:
            if self.ep.owns(e):
                write(m, self.ep.local(e), part, w)

        return own

    def _load_pregate(self, pregate):
        if pregate is None or pregate == "speculative":
            return SpeculativePregate(self.blocks, self.taps)
        if isinstance(pregate, (str, os.PathLike)):
            if not self.taps.found:  # one token through the model shows which norm feeds the MoE blocks
                self.logits([self.pad_id])
                self.reset_stats()
            return load_pregate(str(pregate), self.blocks, self.taps, self.cfg, self.device)
        raise ValueError(f"pregate must be 'speculative' or a folder from `pregated calibrate`, got {pregate!r}")

    def _apply_policy(self) -> None:
        """gpu-only means every expert on the device: load and pin them all now; hybrid starts
        the host lane with its share of the slots for the hot set."""
        if self.policy == "hybrid":
            hot, _ = hybrid_split(self.rank_cfg, self.expert_memory, self.hybrid["hot_fraction"])
            self.runtime.set_host_lane(True, plan=self.hybrid["lane_plan"], hot_slots=hot,
                                       **self.hybrid["lane_costs"])
        elif self.runtime.stats()["costs"]["link_bytes_per_s"] > 0:  # the lane of an earlier hybrid
            self.runtime.set_host_lane(False)
        if self.policy != "gpu-only":
            return
        for m in range(self.rank_cfg.num_moe_layers):
            for e in range(self.rank_cfg.num_experts):
                self.runtime.pin(m, e)
        self.runtime.wait_idle()

    def set_routing(self, routing: str, pregate=None) -> None:
        """Switch the routing mode (exact / pregate) and, optionally, the pre-gate."""
        self._check_open()
        if pregate is not None:
            self.pregate = self.moe.pregate = self._load_pregate(pregate)
        self.moe.set_routing(routing)
        self.moe.reset()

    @property
    def routing(self) -> str:
        return self.moe.routing

    def reconfigure(self, *, policy: str | None = None, expert_memory=None, eviction: str | None = None,
                    hot_fraction=..., lane_plan: str | None = None, lane_costs=...) -> None:
        """New policy / expert budget / eviction (and hybrid's options; those not given are kept)
        without reloading the model: the expert slots are rebuilt (empty) and the statistics
        start from zero."""
        self._check_open()
        eviction = eviction or self.eviction
        policy, budget = resolve_policy(policy, expert_memory, self.rank_cfg)
        check_eviction(policy, eviction)
        self.hybrid = check_hybrid(self.hybrid["hot_fraction"] if hot_fraction is ... else hot_fraction,
                                   lane_plan or self.hybrid["lane_plan"],
                                   self.hybrid["lane_costs"] if lane_costs is ... else lane_costs)
        self._graph_steps.clear()  # their graphs hold the addresses of the slots rebuilt here
        self.runtime.resize(budget, eviction)
        self.policy, self.expert_memory, self.eviction = policy, budget, eviction
        self.moe.policy = policy
        self._apply_policy()
        self.reset_stats()

    # --- lifetime ----------------------------------------------------------------------

    @property
    def _closed(self) -> bool:
        return getattr(self, "model", None) is None

    def close(self) -> None:
        """Frees the device memory of the model and the expert slots."""
        if getattr(self, "taps", None) is not None:
            self.taps.close()
        self._graph_steps = {}
        if getattr(self, "runtime", None) is not None:
            unregister_runtime(self._handle)
            self.runtime.close()
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this Engine was closed; create a new one")

    # --- the forward pass --------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 active: torch.Tensor, all_logits: bool = False, unpadded: bool = False):
        """tokens, positions: [B, L]; mask: [B, S] (1 = a real token, over every token so far);
        active: [B, L] bool on the host, rows that go through the experts (known on the host,
        so choosing them costs no device synchronisation), or None for every row; unpadded: the
        mask is all ones (known on the host), so a decode step may take the lean step (lean_step.py).
        -> (logits [B, L, V] or of the last position [B, 1, V], the cache)."""
        everyone = active is None or bool(active.all())
        if (unpadded and everyone and self.lean_step is not None and cache is not None and tokens.shape[1] == 1
                and not all_logits):
            logits = self.lean_step(tokens, positions, cache)
            if logits is not None:
                return logits, cache
        self.moe.rows = None if everyone else active.reshape(-1).nonzero().squeeze(-1).to(self.device)
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=0 if all_logits else 1, **{self._cache_arg: cache})
        finally:
            self.moe.rows = None
        cache = getattr(out, self._cache_arg, None)
        if self.device == "cpu" and cache is not None:
            from .kv_cache import grow_in_place  # here: the module needs transformers, the Engine's import not

            grow_in_place(cache)  # later steps append in place
        return out.logits, cache

    def _padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts left-padded into one batch, on the host: tokens [B, L], valid [B, L] bool
        and each token's position [B, L] (padding at 0)."""
        B, L = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((B, L), self.pad_id, dtype=torch.long)
        valid = torch.zeros(B, L, dtype=torch.bool)
        for b, p in enumerate(prompts):
            tokens[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[b, L - len(p):] = True
        return tokens, valid, (valid.long().cumsum(-1) - 1).clamp(min=0)

    def _prefill(self, prompts: list[list[int]]):
        """Left-pads the prompts into one batch and runs them; returns the cache, the attention
        mask [B, L], the last positions [B] and the logits of the last prompt token [B, V]."""
        tokens, valid, positions = self._padded(prompts)
        mask = valid.long().to(self.device)
        logits, cache = self._forward(tokens.to(self.device), mask, positions.to(self.device), None, valid)
        return cache, mask, positions[:, -1].to(self.device), logits[:, -1].float()

    # --- public API --------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """token_ids: a list of ints, or a 1-D integer tensor or array ->
        float32 [len(token_ids), vocab_size] through the same offloading path."""
        self._check_open()
        if self.cfg.is_encoder_decoder:
            raise ValueError("logits() needs a decoder-only model: an encoder-decoder model's logits depend on "
                             "decoder inputs too; run it through generate() or pregated.from_pretrained(...)")
        prompt = self._check_ids(as_token_ids(token_ids), 0)
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)[None]
        mask = torch.ones_like(tokens)
        logits, _ = self._forward(tokens, mask, positions, None, torch.ones(1, len(prompt), dtype=torch.bool),
                                  all_logits=True)
        return logits[0].float()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(check_chat_messages(messages),
                                                  add_generation_prompt=add_generation_prompt)

    def generate(self, prompt, *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None,
                 stream: bool = False):
        """Generate from a prompt: text, token ids, chat messages (list of dicts), or a list of
        those (a batch). Returns a GenerationResult (a list for a batch), or with stream=True
        (one prompt) a TextStream yielding text pieces, whose .result is set at the end."""
        self._check_open()
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=[] if stop is None else stop)
        prompts, single = self._prompts(prompt, params.max_new_tokens)
        if stream:
            if not single:
                raise ValueError("stream=True takes one prompt, not a batch")
            text_stream = TextStream(None)

            def pieces():
                for _, piece in self._run(prompts, params):
                    yield piece
                text_stream.result = self._last_results[0]

            text_stream._pieces = pieces()
            return text_stream
        for _ in self._run(prompts, params):
            pass
        return self._last_results[0] if single else self._last_results

    def trace_decode_step(self, prompt, warmup_tokens: int = 3) -> list[dict]:
        """A timeline of one decode step: generates `warmup_tokens` tokens, then records the
        copies (copy engine) and expert GEMMs (compute stream) of the next step from backend
        events (CUDA events on the GPU). Times are seconds from the start of the step. Events of
        kind "host" give the Python thread's time: per MoE block (layer m: its experts call,
        with the CPU backend's compute, which runs in that thread), and for the whole step
        (layer -1, before waiting for the device)."""
        self._check_open()
        params = SamplingParams(max_new_tokens=warmup_tokens + 1)
        prompts, single = self._prompts(prompt, params.max_new_tokens)
        self._trace_step = warmup_tokens
        try:
            for _ in self._run(prompts, params):
                pass
        finally:
            self._trace_step = None
        return self._last_trace

    def _run_seq2seq(self, prompts: list[list[int]], params: SamplingParams):
        """An encoder-decoder model through transformers' generate() (its experts through the
        runtime); yields (row, text piece) per sequence once it is complete."""
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)
            mask[b, :len(p)] = 1
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k or None) if params.temperature > 0 else dict(do_sample=False)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        t0 = time.perf_counter()
        out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=params.max_new_tokens, eos_token_id=sorted(self.eos_ids) or None,
                                  pad_token_id=self.pad_id, **sampling)
        self._sync()
        self._counters["decode_seconds"] += time.perf_counter() - t0
        self._counters["prefill_tokens"] += sum(len(p) for p in prompts)
        self.last_prefill_stats = self.runtime.stats()
        results = []
        for b in range(B):
            tracker = TextTracker(self.tokenizer, params.stop)
            finish, pieces = None, []
            for tok in out[b, 1:].tolist():  # after the decoder's start token
                pieces.append(tracker.add(tok))
                self._counters["tokens"] += 1
                if tok in self.eos_ids or tracker.stopped:
                    finish = "stop"
                    break
            text = "".join(pieces) + tracker.finish()
            if text:
                yield b, text
            results.append(GenerationResult(text=tracker.text, token_ids=tracker.ids, finish_reason=finish or "length",
                                            prompt_tokens=len(prompts[b])))
        self._last_results = results

    def _run(self, prompts: list[list[int]], params: SamplingParams):
        """The generation loop; yields (row, text piece) as text becomes showable."""
        if self.cfg.is_encoder_decoder:
            with torch.inference_mode():
                yield from self._run_seq2seq(prompts, params)
            return
        with torch.inference_mode(), contextlib.ExitStack() as lean:
            gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            B = len(prompts)
            longest = max(len(p) for p in prompts)
            if B * longest <= LEAN_PREFILL_ROWS:  # a short prefill runs like decode
                lean.enter_context(decode_threads(self.device, spin=self.spin_between_jobs))
            t0 = time.perf_counter()
            graph = self._graph_step(B, longest + params.max_new_tokens)
            if graph is not None:
                tokens, valid, positions = self._padded(prompts)
                try:
                    logits = graph.prefill(tokens.to(self.device), valid, positions)
                except CaptureFailed as e:
                    warnings.warn(f"pregated: the decode step could not be captured as a CUDA graph ({e}); "
                                  "decoding without graphs from here on (PREGATED_GRAPH_STEP=0 says so up front)")
                    self.graph_mode, graph = None, None
                    self._graph_steps.clear()
            if graph is None:
                cache, mask, last_pos, logits = self._prefill(prompts)
            unpadded = len({len(p) for p in prompts}) == 1
            self._sync()
            self._counters["prefill_seconds"] += time.perf_counter() - t0
            self._counters["prefill_tokens"] += sum(len(p) for p in prompts)
            self.last_prefill_stats = self.runtime.stats()  # lets a benchmark split prefill from decode
            trackers = [TextTracker(self.tokenizer, params.stop) for _ in range(B)]
            finish = [None] * B
            t_decode = time.perf_counter()
            with decode_threads(self.device, spin=self.spin_between_jobs):  # PyTorch's threads off the pool's cores
                for step in range(params.max_new_tokens):
                    nxt = sample(logits, params, gen)
                    for b in range(B):
                        if finish[b] is not None:
                            continue
                        tok = int(nxt[b])
                        piece = trackers[b].add(tok)
                        self._counters["tokens"] += 1
                        if piece:
                            yield b, piece
                        if tok in self.eos_ids or trackers[b].stopped:
                            finish[b] = "stop"
                    if all(f is not None for f in finish) or step == params.max_new_tokens - 1:
                        break
                    if graph is not None:  # every row steps; a finished row's tokens are not read
                        t_step = time.perf_counter()
                        logits = graph.step(nxt)
                        self._counters["graph_steps"] += 1
                        self._counters["graph_host_seconds"] += time.perf_counter() - t_step  # launch, not run
                        continue
                    active = torch.tensor([f is None for f in finish])[:, None]
                    mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
                    last_pos = last_pos + 1
                    tracing = self._trace_step is not None and step + 1 == self._trace_step
                    if tracing:
                        self._sync()
                        self.runtime.set_tracing(True)
                        self.moe.host_seconds = [0.0] * self.cfg.num_moe_layers
                        t_step = time.perf_counter()
                    out, cache = self._forward(nxt[:, None].to(self.device), mask, last_pos[:, None], cache, active,
                                               unpadded=unpadded)
                    logits = out[:, -1].float()
                    if tracing:
                        host_step = time.perf_counter() - t_step  # before waiting for the device
                        self._sync()
                        self._last_trace = self.runtime.trace()
                        self._last_trace.append({"kind": "host", "layer": -1, "expert": -1, "start_s": 0.0,
                                                 "end_s": host_step})
                        self._last_trace += [{"kind": "host", "layer": m, "expert": -1, "start_s": 0.0, "end_s": s}
                                             for m, s in enumerate(self.moe.host_seconds)]
                        self.moe.host_seconds = None
                        self.runtime.set_tracing(False)
                self._sync()
            self._counters["decode_seconds"] += time.perf_counter() - t_decode
            results = []
            for b in range(B):
                rest = trackers[b].finish()
                if rest:
                    yield b, rest
                results.append(GenerationResult(text=trackers[b].text, token_ids=trackers[b].ids,
                                                finish_reason=finish[b] or "length",
                                                prompt_tokens=len(prompts[b])))
            self._last_results = results

    def _graph_step(self, batch: int, tokens: int) -> GraphStep | None:
        """The graph step for `batch` sequences of up to `tokens` tokens where this decode can take
        it (graph_step.py): the resident path, no timeline traced, a model the check agrees with;
        else None (the model's forward with a growing cache)."""
        if (self.graph_mode is None or not self.moe.resident(batch) or self.tp is not None
                or self._trace_step is not None or self.cfg.is_encoder_decoder):
            return None
        if self._graph_agrees is None:
            self._graph_agrees = graph_step_agrees(self)
        if not self._graph_agrees:
            return None
        key = (batch, cache_length(tokens, self.cfg.max_position_embeddings))
        step = self._graph_steps.pop(key, None)
        if step is None:
            step = GraphStep(self._forward, self.model.config, self.runtime, self.cfg.top_k, *key, self.device,
                             capture=self.graph_mode == "graph", resident=self.moe.resident)
        self._graph_steps[key] = step  # the most recent last
        while len(self._graph_steps) > KEPT_GRAPHS:
            self._graph_steps.pop(next(iter(self._graph_steps)))
        return step

    @property
    def spin_between_jobs(self) -> bool:
        """Whether the CPU pool may spin through a step's gaps (cpu_dense.decode_threads): only
        where no copy thread, host lane or collective of ours needs the cores (gpu-only, one rank)."""
        return self.policy == "gpu-only" and self.ep is None

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _prompts(self, prompt, extra: int) -> tuple[list[list[int]], bool]:
        """-> (token id lists, whether a single prompt was given)."""
        prompts, single = split_batch(prompt)
        return [self._check_ids(encode_prompt(p, self.tokenizer), extra) for p in prompts], single

    def _check_ids(self, ids: list[int], extra: int) -> list[int]:
        return check_token_ids(ids, self.cfg.vocab_size, self.cfg.max_position_embeddings, extra)

    def stats(self) -> dict:
        """Offloading statistics since load (or reset_stats)."""
        self._check_open()
        s = self.runtime.stats()
        out = {k: v for k, v in s.items() if k != "layers"}
        out.update(self._counters)
        pred = self.moe.prediction_stats(s["layers"])
        layers = []
        for m, (rt_layer, p) in enumerate(zip(s["layers"], pred)):
            layers.append({"layer": self.cfg.moe_layers[m], **rt_layer, **p})
        out.update(self.moe.prediction_totals(s["layers"]))
        out["policy"] = self.policy
        out["routing"] = self.moe.routing
        out["pregate"] = self.pregate.kind
        out["expert_memory"] = self.expert_memory
        out["layers"] = layers
        return out

    def reset_stats(self) -> None:
        self._check_open()
        self.runtime.reset_stats()
        self.moe.reset()
        self._counters = {k: type(v)() for k, v in self._counters.items()}
