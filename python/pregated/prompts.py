"""Prompts as users give them -> lists of token ids.

A prompt is text, chat messages (a list of {"role", "content"} dicts), or token ids: a list of
ints, a 1-D integer torch tensor or a 1-D integer numpy array. A batch is a list of prompts.
Every refusal names what was given and what to give instead.
"""

from __future__ import annotations

import numbers

import torch

PROMPT_KINDS = "text, chat messages (a list of {'role': ..., 'content': ...} dicts) or token ids"


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dim()}-D {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}"
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return f"a {value.ndim}-D {value.dtype} numpy array of shape {list(value.shape)}"
    return f"{value!r} ({type(value).__name__})"


def _is_array(value) -> bool:
    return torch.is_tensor(value) or (type(value).__module__ == "numpy" and hasattr(value, "ndim"))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_token_ids(value) -> list[int]:
    """A list / tuple of ints, or a 1-D integer tensor or array -> list[int] (range unchecked)."""
    if _is_array(value):
        kind = str(value.dtype)
        is_integer = (not value.dtype.is_floating_point and not value.dtype.is_complex
                      and value.dtype != torch.bool) if torch.is_tensor(value) else kind.startswith(("int", "uint"))
        if value.ndim != 1 or not is_integer:
            raise TypeError(
                f"token ids must be a 1-D integer tensor or array, got {_describe(value)}"
                + ("; for a batch give a list of prompts" if value.ndim == 2 else ""))
        return [int(t) for t in value.tolist()]
    if isinstance(value, (list, tuple)):
        for t in value:
            if not _is_int(t):
                raise TypeError(f"token ids must be integers, got {_describe(t)} in the prompt")
        return [int(t) for t in value]
    raise TypeError(f"token ids must be a list of ints, a 1-D integer tensor or array, got {_describe(value)}")


def check_chat_messages(messages) -> list[dict]:
    """Each message is a dict with a string 'role' and a 'content' (text or a list of parts)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"chat message {i} is {_describe(m)}: each message is a dict "
                            "{'role': ..., 'content': ...}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"chat message {i} has no 'role' (a string such as 'user'): {m!r}")
        if "content" not in m or not isinstance(m["content"], (str, list)):
            raise ValueError(f"chat message {i} has no 'content' (text): {m!r}")
    return list(messages)


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def split_batch(prompt) -> tuple[list, bool]:
    """-> (the prompts, whether one prompt was given rather than a batch)."""
    if isinstance(prompt, str) or _is_array(prompt):
        return [prompt], True
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"prompt is empty: give {PROMPT_KINDS}")
        if all(_is_int(p) for p in prompt) or _is_chat(prompt):
            return [prompt], True
        return list(prompt), False
    raise TypeError(f"a prompt is {PROMPT_KINDS}, or a list of those; got {_describe(prompt)}")


def encode_prompt(p, tokenizer) -> list[int]:
    """One prompt -> token ids (vocabulary and length are checked by the caller)."""
    if isinstance(p, str):
        if not p:
            raise ValueError("prompt is empty: give some text")
        return tokenizer.encode(p)
    if _is_chat(p):
        text = tokenizer.apply_chat_template(check_chat_messages(p), add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(p, (list, tuple)) or _is_array(p):
        return as_token_ids(p)
    raise TypeError(f"a prompt is {PROMPT_KINDS}; got {_describe(p)}")


def check_token_ids(ids: list[int], vocab_size: int, context: int, extra: int) -> list[int]:
    """ids must be non-empty, inside the vocabulary, and leave room for `extra` new tokens."""
    if not ids:
        raise ValueError("prompt is empty: give at least one token")
    for t in ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"token id {t} is not in the vocabulary (0..{vocab_size - 1})")
    if len(ids) + extra > context:
        raise ValueError(
            f"prompt of {len(ids)} tokens plus max_new_tokens={extra} exceeds the model's "
            f"context of {context} tokens; shorten the prompt or lower max_new_tokens")
    return ids
