"""How memory and prompts are framed as text (DESIGN 3, MEASURED "framing matters").

MEASURED.md shows SmolLM2 uses earlier conversation only when it is quoted inside the same user turn as the
question ("Here are excerpts from our earlier conversation: ... Question: ..."), and that the first tokens act
as an attention sink. So the memory of the `input` source opens with a fixed header that ends mid-way through
a user turn; every injected turn is one quoted line; the prompt closes the same user turn with the question
and opens the assistant's turn. The same frame is used by the text-RAG baseline, so comparisons differ only in
how the remembered text reaches the model.

The frame is derived from the tokenizer's own chat template by rendering a sentinel message and splitting
around it, so any chat model's template works; models without a template get a plain-text frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SENTINEL = "\x00MPLUS_SPLIT\x00"
EXCERPTS_INTRO = "Here are excerpts from our earlier conversation:\n"


@dataclass(frozen=True)
class Frame:
    header: str
    """Opens the memory; encoded once and kept forever as the sink."""
    item: str
    """One remembered turn; `{role}` and `{text}` are filled in."""
    document: str
    """One remembered document chunk with no speaker; `{text}` is filled in."""
    question: str
    """Closes the memory's user turn with the current message `{message}`, opens the reply."""
    add_special_bos: bool = False
    """Prepend the tokenizer's BOS id to the header (base models without a chat template)."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Frame:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            return cls.plain(add_bos=getattr(tokenizer, "bos_token_id", None) is not None)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str) or rendered.count(SENTINEL) != 1:
            return cls.plain(add_bos=False)
        before, after = rendered.split(SENTINEL)
        return cls(
            header=before + EXCERPTS_INTRO,
            item="{role}: {text}\n",
            document="{text}\n",
            question="\nQuestion: {message}" + after,
        )

    @classmethod
    def plain(cls, add_bos: bool = False) -> Frame:
        """No chat framing at all: memory is the raw text, the prompt is the raw message (pretrained M+)."""
        return cls(header="", item="{text}", document="{text}", question="{message}", add_special_bos=add_bos)

    def render_item(self, text: str, role: str | None) -> str:
        if role is None:
            return self.document.format(text=text)
        return self.item.format(role=role, text=text)

    def split_question(self) -> tuple[str, str]:
        """(text before the message, text after it) of the question frame."""
        before, after = self.question.split("{message}")
        return before, after
