"""Chat templates: messages -> prompt text.

Templates are Jinja, rendered the way transformers' `apply_chat_template` does (sandboxed, `trim_blocks`,
`lstrip_blocks`, `raise_exception`, `bos_token`/`eos_token`), so a model's own template (GGUF
`tokenizer.chat_template`, HF `chat_template`) renders identically. The built-in named templates are Jinja too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

NAMED_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # FastChat vicuna_v1.1: "<system> USER: hi ASSISTANT: hello</s>USER: ... ASSISTANT:". BOS first because
    # FastChat tokenizes the prompt with the LLaMA tokenizer's BOS.
    "vicuna_v1.1": (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% set loop_messages = messages[1:] %}{% else %}{{ system + ' ' }}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}"
        "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('vicuna_v1.1: unsupported role ' + m['role']) }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    # Meta's LLaMA-2 chat: "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] user [/INST]".
    # The generation prompt is implicit: the prompt already ends in "[/INST]".
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set sys = none %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('llama-2: roles must alternate user/assistant') }}{% endif %}"
        "{% set c = m['content'] %}"
        "{% if loop.first and sys is not none %}{% set c = '<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + c %}{% endif %}"
        "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + c | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + c | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    # Google's Gemma 3: "<bos><start_of_turn>user\nsys\n\nhi<end_of_turn>\n<start_of_turn>model\n" (the system
    # prompt opens the first user turn; the assistant is "model")
    "gemma": (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
}
_NAMED_DEFAULTS: dict[str, dict[str, str]] = {
    "chatml": {}, "vicuna_v1.1": {"bos_token": "<s>", "eos_token": "</s>", "system": VICUNA_SYSTEM},
    "llama-2": {"bos_token": "<s>", "eos_token": "</s>"}, "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
}


def _raise(msg: str) -> None:
    raise TemplateError(msg)


def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass
class ChatTemplate:
    """A compiled Jinja chat template plus the variables it expects besides `messages`."""
    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)  # more template globals (e.g. vicuna's `system`)

    def __post_init__(self) -> None:
        self._tpl = _env().from_string(self.source)

    @classmethod
    def named(cls, name: str, bos_token: str | None = None, eos_token: str | None = None) -> "ChatTemplate":
        """A built-in template: "chatml", "vicuna_v1.1", "llama-2" or "gemma"; bos/eos default to each one's own."""
        if name not in NAMED_TEMPLATES:
            raise ValueError(f"unknown chat template {name!r}; known: {', '.join(NAMED_TEMPLATES)}")
        d = dict(_NAMED_DEFAULTS[name])
        extra = {"system": d.pop("system")} if "system" in d else {}
        return cls(NAMED_TEMPLATES[name], bos_token=bos_token if bos_token is not None else d.get("bos_token", ""),
                   eos_token=eos_token if eos_token is not None else d.get("eos_token", ""), name=name, extra=extra)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token, eos_token=self.eos_token, **self.extra)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Prompt text. A trailing assistant message is a prefill: the reply is continued, not closed.

        For a prefill we render the history with the generation prompt (`head`), and the whole conversation
        without it; if the latter extends `head` and contains the prefill, we cut it right after the prefill
        (keeping a template's own separator, e.g. vicuna's "ASSISTANT: 1."). Otherwise `head + content`.
        """
        if not messages or messages[-1].get("role") != "assistant":
            return self._render(messages, add_generation_prompt)
        content = messages[-1].get("content") or ""
        head = self._render(messages[:-1], True)
        if content:
            full = self._render(messages, False)
            end = full.rfind(content)
            if end >= len(head) and full.startswith(head) and not full[len(head):end].strip():
                return full[:end + len(content)]
        return head + content


def guess_chat_template(name: str, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
    """For a model without a template, from its name or path: vicuna -> vicuna_v1.1, LLaMA-2 chat ->
    llama-2, gemma -> gemma (a Gemma 3 GGUF may carry none), anything else -> chatml."""
    n = name.lower().replace("_", "-")
    if "vicuna" in n:
        key = "vicuna_v1.1"
    elif "gemma" in n:
        key = "gemma"
    elif ("llama-2" in n or "llama2" in n) and "chat" in n:
        key = "llama-2"
    else:
        key = "chatml"
    return ChatTemplate.named(key, bos_token, eos_token)
