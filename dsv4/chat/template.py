"""A model folder's own Jinja chat template, when it ships one.

DeepSeek-V4 ships none (its format is the Python encoder in :mod:`dsv4.chat.encoding`), but a fine-tune or
a converted checkpoint may: ``chat_template.jinja`` (the current Hugging Face convention) or
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{"name", "template"}`` from which
``default`` is taken). When present it is honoured, rendered the way transformers renders it (sandboxed,
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, a ``tojson`` that keeps non-ASCII text).

jinja2 is an optional import: it is needed only when a template exists, and then its absence is reported
when the template is loaded (server start), not on the first request.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from dsv4.chat.encoding import ChatFormatError


def _token_text(token: Any) -> str:
    """``bos_token``/``eos_token`` may be a string or a serialized AddedToken."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""


class ChatTemplate:
    """A compiled Jinja chat template plus the special-token strings it may reference."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "") -> None:
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError(f"{origin or 'the model folder'} ships a chat template, which needs jinja2: "
                              "pip install jinja2") from None
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template_error = TemplateError

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"{origin or 'chat template'}: cannot compile: {e}") from None

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The folder's chat template, or ``None`` (use the official encoder)."""
        path = Path(path)
        config: dict[str, Any] = {}
        config_file = path / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        tokens = {"bos_token": _token_text(config.get("bos_token")), "eos_token": _token_text(config.get("eos_token"))}
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), origin=str(jinja_file), **tokens)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if isinstance(source, str) and source:
            return cls(source, origin=f"{config_file} chat_template", **tokens)
        return None

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt text; extra keyword arguments (``chat_template_kwargs``) become template variables.
        A template that rejects the request (``raise_exception``) raises :class:`ChatFormatError`."""
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **context)
        except self._template_error as e:
            raise ChatFormatError(f"chat template: {e}") from None
