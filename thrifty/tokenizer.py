"""Tokenizer, chat template and incremental detokenization.

The tokenizer comes from the checkpoint's `tokenizer.json` (for GGUF files, built from the GGUF
metadata by the converter). Chat templates are rendered in a sandboxed jinja2 environment: a
template is code shipped with a checkpoint and must not reach Python internals, nor run for
ever (thrifty/chat_template.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from tokenizers import Tokenizer as HFTokenizer

from thrifty.chat_template import BoundedSandbox, render
from thrifty.errors import ThriftyError
from thrifty.files import present, read_json_object, read_text

# Used when a checkpoint ships no chat template.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=kw.get("sort_keys", False)
    )


def _raise(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    def __init__(
        self, tokenizer: HFTokenizer, config: dict[str, Any], eos_token_ids: tuple[int, ...]
    ):
        self._tok = tokenizer
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        ids = set(eos_token_ids) | ({eos_id} if eos_id is not None else set())
        self.eos_token_ids = tuple(sorted(ids))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.use_chat_template(template or CHATML_TEMPLATE)
        self.vocab_size = tokenizer.get_vocab_size()

    def use_chat_template(self, template: str) -> None:
        """Render chats with `template` (Jinja, as in tokenizer_config.json) from now on."""
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
        except TemplateError as e:  # a syntax error in the checkpoint's (or user's) template
            raise ThriftyError(f"chat template failed to compile: {e}") from None
        self.chat_template: str = template

    @staticmethod
    def from_dir(path: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not present(tokenizer_file):
            raise ThriftyError(f"no tokenizer.json in {path}")
        text = read_text(tokenizer_file)
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ThriftyError(f"cannot read {tokenizer_file}: {e}") from None
        config_file = path / "tokenizer_config.json"
        config = read_json_object(config_file) if present(config_file) else {}
        template_file = path / "chat_template.jinja"
        if present(template_file):
            config["chat_template"] = read_text(template_file)
        _check_tokenizer_config(config, config_file)
        gen_file = path / "generation_config.json"
        if present(gen_file):
            eos = read_json_object(gen_file).get("eos_token_id")
            if not _is_token_ids(eos):
                raise ThriftyError(f"{gen_file}: eos_token_id must be token ids, got {eos!r}")
            eos_token_ids += tuple(eos) if isinstance(eos, list) else ((eos,) if eos else ())
        return Tokenizer(tok, config, eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 16_384:  # encode_batch lets go of the GIL (1.8 s for 3.8 MB): a
            # server's other threads run meanwhile; encode holds it throughout
            ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds its own from)."""
        return self._tok.to_str()

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled exactly `text`, if the vocabulary has one."""
        return self._tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        try:
            return render(
                self._template,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except (TemplateError, TypeError) as e:  # TypeError: e.g. a message whose content is None
            raise ThriftyError(f"chat template failed: {e}") from None
        except RecursionError:  # a macro that calls itself
            raise ThriftyError("chat template recursed too deeply") from None


def _is_token_ids(value: Any) -> bool:
    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return value is None or is_id(value) or (isinstance(value, list) and all(map(is_id, value)))


def _check_tokenizer_config(config: dict[str, Any], path: Path) -> None:
    """The fields Tokenizer reads have the types it reads them as (a checkpoint's file may not)."""
    for name in ("bos_token", "eos_token"):
        token = config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise ThriftyError(f"{path}: {name} must be a string, got {config[name]!r}")
    template = config.get("chat_template")
    named = isinstance(template, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in template
    )
    if template is not None and not isinstance(template, str) and not named:
        raise ThriftyError(
            f"{path}: chat_template must be a string or a list of {{name, template}} objects"
        )


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Decodes a short window of recent tokens twice (with and without the newest ones) and emits
    the difference, holding back text while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)

    def step(self, all_ids: list[int]) -> str:
        decode = self.tokenizer.decode
        prefix = decode(all_ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(all_ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
            return full[len(prefix) :]
        return ""
