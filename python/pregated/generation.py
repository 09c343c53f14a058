"""Sampling, stopping and incremental detokenisation for the generation loop.

B = batch, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (eos id or stop string) or "length"
    prompt_tokens: int = 0


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0              # 0 = no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = no limit), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [B, V] float32 -> the same with tokens outside top-k / the nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] (on any device) -> next token ids [B] (on the CPU)."""
    if params.temperature == 0:  # max's indices: the first maximum, as argmax's, in half its time on the CPU;
        return logits.max(-1).indices.cpu()  # on a GPU only the ids cross to the host
    logits = logits.float().cpu()
    # Shifted so the largest logit is 0, and divided in float64: a tiny temperature then sends
    # the others towards -inf (greedy in the limit) instead of overflowing into nan.
    logits = (logits - logits.max(-1, keepdim=True).values).double()
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextTracker:
    """Text of one sequence as tokens arrive: what can be shown so far, and stop strings.

    A piece is held back while it ends in an incomplete UTF-8 sequence (U+FFFD from the
    decoder) or while its end could be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Adds a token; returns the newly showable text (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            pos = text.find(s)
            if pos >= 0:
                self.text = text[:pos]
                self.stopped = True
                return self._take(len(self.text))
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text, once no more tokens come."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece


class TextStream:
    """Iterator over text pieces of one generation; `.result` holds the GenerationResult
    once the iteration has finished."""

    def __init__(self, pieces):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)
