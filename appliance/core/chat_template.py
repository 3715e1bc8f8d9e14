"""Chat templates, rendered in Jinja's immutable sandbox.

A GGUF's chat template is untrusted input: it is rendered here, never by code that can reach
Python internals. jinja2 is imported when a template is compiled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.core.errors import ModelError, missing_dependency

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Used for a GGUF that carries no chat template."""

END_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)
"""End-of-turn markers of common templates; those a template uses also stop generation."""


MAX_TEMPLATE_OUTPUT = 16_000_000
"""Characters; a template that renders or multiplies out more is refused (a prompt must fit the
context anyway)."""


def _sandbox_environment() -> Any:
    """Jinja's immutable sandbox, set up as transformers renders chat templates (trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, ``tojson``, ``strftime_now``, a
    pass-through ``{% generation %}``), that also refuses huge ``*`` and ``**`` results."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    except ImportError as exc:
        raise missing_dependency("jinja2", package="jinja2") from exc

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (trl's training markers): the body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise SecurityError(f"the power {right} is too large for a chat template")
            if operator == "*":
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_TEMPLATE_OUTPUT
                ):
                    raise SecurityError("a repetition too large for a chat template")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    env = BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env


class ChatTemplate:
    """A Hugging Face style chat template, compiled once in a bounded Jinja sandbox.

    The template comes from a model file and is untrusted: unsafe attribute access, mutation,
    huge repetitions and any other failure while rendering raise ``ModelError``.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError

        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _sandbox_environment().from_string(source)
        except TemplateError as exc:
            raise ModelError(f"the model's chat template does not compile: {exc}") from exc

    def render(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True
    ) -> str:
        from jinja2.sandbox import SecurityError

        parts: list[str] = []
        size = 0
        try:
            for part in self._template.generate(
                messages=[dict(m) for m in messages],
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            ):
                size += len(part)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise SecurityError(f"it rendered more than {MAX_TEMPLATE_OUTPUT} characters")
                parts.append(part)
        except SecurityError as exc:
            raise ModelError(
                f"the model's chat template tried something unsafe and was stopped: {exc}"
            ) from exc
        except Exception as exc:  # untrusted code: whatever it raises is the model's fault
            raise ModelError(f"the model's chat template failed: {exc}") from exc
        return "".join(parts)

    def end_markers(self) -> tuple[str, ...]:
        """The end-of-turn markers this template writes, and the EOS token's text."""
        found = [m for m in END_MARKERS if m in self.source]
        if self.eos_token and self.eos_token not in found:
            found.append(self.eos_token)
        return tuple(found)
