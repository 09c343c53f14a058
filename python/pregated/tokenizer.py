"""The checkpoint's tokenizer (tokenizer.json through `tokenizers`) and its chat template.

The chat template is rendered the way transformers renders it (a sandboxed jinja2 environment
with trim_blocks / lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson` that keeps
non-ASCII characters), so the same messages give the same prompt text.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """tokenizer files are missing or unusable."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path} does not exist: the model folder needs tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path} could not be read by `tokenizers` ({e})") from e
        self.config: dict = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    self.config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{cfg_path} is not valid JSON: {e}") from e
        template_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            tpl = self.config.get("chat_template")
            self.chat_template = tpl if isinstance(tpl, str) else None
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise TokenizerError(
                "this checkpoint has no chat template (no chat_template.jinja, no chat_template in "
                "tokenizer_config.json): pass plain text instead of chat messages")
        if self._template is None:
            self._template = _compile(self.chat_template)
        special = {k: _token_text(v) for k, v in self.config.items()
                   if k.endswith("_token") and isinstance(_token_text(v), str)}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **special, **kwargs)


def _compile(source: str):
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise TokenizerError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
