"""dsv4/chat/template.py: a model folder's own chat template, rendered with jinja2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.chat.encoding import ChatFormatError
from dsv4.chat.template import ChatTemplate

pytest.importorskip("jinja2")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'wizard' %}{{ raise_exception('no wizards') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}\n"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% if thinking %}<think>{% endif %}{% endif %}"
)


def test_no_template_means_official_encoder(tmp_path: Path) -> None:
    assert ChatTemplate.from_model_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert ChatTemplate.from_model_dir(tmp_path) is None
    shared = Path("/work/shared/deepseek-v4/flash")
    if shared.is_dir():  # DeepSeek-V4 ships no template
        assert ChatTemplate.from_model_dir(shared) is None


def test_tokenizer_config_template(tmp_path: Path) -> None:
    config = {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "chat_template": TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tpl = ChatTemplate.from_model_dir(tmp_path)
    assert tpl is not None and tpl.bos_token == "<s>" and tpl.eos_token == "</s>"
    msgs = [{"role": "user", "content": "Grüße"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tpl.render(msgs) == "<s><user>Grüße\n<assistant>"
    assert tpl.render(msgs, tools, add_generation_prompt=False) == '<s><user>Grüße\n[{"type": "function", ' \
                                                                   '"function": {"name": "f"}}]'
    assert tpl.render(msgs, thinking=True).endswith("<assistant><think>")
    with pytest.raises(ChatFormatError, match="no wizards"):
        tpl.render([{"role": "wizard", "content": "x"}])


def test_named_templates_and_jinja_file_precedence(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    tpl = ChatTemplate.from_model_dir(tmp_path)
    assert tpl is not None and tpl.render([{"role": "user", "content": "x"}]) == "D1"
    (tmp_path / "chat_template.jinja").write_text("J")
    tpl = ChatTemplate.from_model_dir(tmp_path)
    assert tpl is not None and tpl.render([]) == "J" and tpl.origin.endswith("chat_template.jinja")


def test_bad_template_is_reported(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="cannot compile"):
        ChatTemplate.from_model_dir(tmp_path)
