"""Messages into a prompt through the model's own chat template, as transformers renders it.

`tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` in
transformers 4.57 compiles the template in an ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension, a `tojson` that does not escape
HTML, and the globals `raise_exception` and `strftime_now`; it renders with `messages`,
`tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's special tokens
(`bos_token`, `eos_token`...). The same here, from `chat.json`, which the build's download
stage wrote with transformers itself (the template it would pick, and its special tokens).
Imports only the standard library and jinja2.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template refused the messages (`raise_exception`) or failed on them."""


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    rendering a prompt keeps its body as it is (as transformers does with no mask asked)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A model's chat template and the special tokens it renders with."""

    def __init__(self, template: str, special_tokens: dict) -> None:
        self.compiled = environment().from_string(template)
        self.special_tokens = dict(special_tokens)

    @classmethod
    def load(cls, path: Path) -> ChatTemplate | None:
        """The template in a chat.json, or None when the model has none (or no file)."""
        if not path.is_file():
            return None
        chat = json.loads(path.read_text(encoding="utf-8"))
        if not chat.get("chat_template"):
            return None
        return cls(chat["chat_template"], chat.get("special_tokens") or {})

    def render(self, messages: list[dict]) -> str:
        try:
            return self.compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as err:  # raise_exception, or a bad template
            raise TemplateError(str(err)) from None
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise TemplateError(f"{type(err).__name__}: {err}") from None
