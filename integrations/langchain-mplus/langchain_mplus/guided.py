"""Schema-guided JSON by staged prefill: we write the structure, the model writes only the values.

A 135M model asked for a tool call copies schema keys into its arguments and runs past the closing tag (seen
on SmolLM2: `{"input": 3, "type": "integer"}}</tool_call>\\n\\nQuestion: ...`). mplus_agents' decode loop has
no logits hook, so constraints are applied between passes instead of inside one: braces, keys, quotes and
commas are prefilled into the assistant's reply, and each value is one pass that is stopped (by closing the
lazy piece iterator) as soon as the value is complete: a closing quote, a character that ends a number, a
balanced JSON value. Every pass re-reads the user's memory and the prompt; that costs one prefill per value
and buys a call that always parses. Enumerations (including "which tool") are snapped to the closest allowed
value. What cannot be completed within the token budget raises `GuidedError` carrying the partial text.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from typing import Any, Protocol

MAX_DEPTH = 6
"""Nested objects deeper than this (or recursive `$ref`s) are generated as free JSON values."""
MIN_VALUE_TOKENS = 6
"""The least budget one value gets when several share what is left."""

_NUMBER = re.compile(r'\s*"?(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)')
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False}


class Runner(Protocol):
    """One model pass continuing `prefill` (text appended after the prompt's assistant opening)."""

    @property
    def remaining(self) -> int:
        """Tokens left in the call's `max_tokens` budget."""
        ...

    def run(self, prefill: str, max_new_tokens: int) -> Generator[str, None, None]: ...


class GuidedError(Exception):
    def __init__(self, message: str, partial: str) -> None:
        super().__init__(message)
        self.partial = partial


def guided_json(runner: Runner, prefix: str, schema: Mapping[str, Any]) -> Iterator[str]:
    """Yield the JSON text of one value that follows `schema`, written after `prefix`, fragment by fragment."""
    writer = _Writer(runner, prefix, schema)
    yield from writer.value(schema, depth=0, share=1)


def guided_choice(runner: Runner, prefix: str, options: Sequence[str]) -> str:
    """Let the model write a quoted string after `prefix` and snap it to the closest of `options`."""
    if len(options) == 1:
        return options[0]
    writer = _Writer(runner, prefix, {})
    written = writer.read_string(max(MIN_VALUE_TOKENS, min(runner.remaining, 16)))
    return closest(written, options)


def closest(text: str, options: Sequence[str]) -> str:
    if text in options:
        return text
    lowered = {o.lower(): o for o in options}
    if text.strip().lower() in lowered:
        return lowered[text.strip().lower()]
    best = max(options, key=lambda o: difflib.SequenceMatcher(None, text.lower(), o.lower()).ratio())
    return best


class _Writer:
    def __init__(self, runner: Runner, prefix: str, root: Mapping[str, Any]) -> None:
        self.runner = runner
        self.prefix = prefix
        self.root = root
        self.text = ""

    def emit(self, fragment: str) -> str:
        self.text += fragment
        return fragment

    def fail(self, message: str, tail: str = "") -> GuidedError:
        return GuidedError(message, self.text + tail)

    def budget(self, share: int) -> int:
        left = self.runner.remaining
        return min(left, max(MIN_VALUE_TOKENS, left // max(share, 1)))

    # ------------------------------------------------------------------ values

    def value(self, schema: Mapping[str, Any], depth: int, share: int) -> Iterator[str]:
        schema = self.resolve(schema, depth)
        if "const" in schema:
            yield self.emit(_dumps(schema["const"]))
            return
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            yield self.emit(self.enum(enum, share))
            return
        kind = _kind(schema)
        properties = schema.get("properties")
        if kind == "object" and isinstance(properties, Mapping) and properties and depth < MAX_DEPTH:
            yield self.emit("{")
            items = list(properties.items())
            for i, (key, sub) in enumerate(items):
                yield self.emit((", " if i else "") + _dumps(key) + ": ")
                yield from self.value(sub if isinstance(sub, Mapping) else {}, depth + 1, len(items) - i)
            yield self.emit("}")
        elif kind == "object" and isinstance(properties, Mapping) and not properties and not schema.get(
            "additionalProperties"
        ):
            yield self.emit("{}")
        elif kind == "string":
            yield self.emit(_dumps(self.read_string(self.budget(share))))
        elif kind in ("integer", "number"):
            yield self.emit(self.read_number(self.budget(share), integer=kind == "integer"))
        elif kind == "boolean":
            yield self.emit(self.read_bool(self.budget(share)))
        elif kind == "null":
            yield self.emit("null")
        else:
            opener = "[" if kind == "array" else "{" if kind == "object" else ""
            yield self.emit(self.read_json(self.budget(share), opener))

    def resolve(self, schema: Mapping[str, Any], depth: int) -> Mapping[str, Any]:
        for _ in range(MAX_DEPTH * 2):
            if depth >= MAX_DEPTH * 2:
                return {}
            ref = schema.get("$ref")
            if isinstance(ref, str):
                target = self.follow(ref)
                if target is None:
                    return {}
                schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
                depth += 1
                continue
            options = schema.get("anyOf") or schema.get("oneOf")
            if isinstance(options, list) and options:
                chosen = next((o for o in options if isinstance(o, Mapping) and not _is_null(o)), options[0])
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                schema = {**rest, **chosen}
                continue
            all_of = schema.get("allOf")
            if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], Mapping):
                schema = {**{k: v for k, v in schema.items() if k != "allOf"}, **all_of[0]}
                continue
            break
        return schema

    def follow(self, ref: str) -> Mapping[str, Any] | None:
        if not ref.startswith("#/"):
            return None
        node: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node if isinstance(node, Mapping) else None

    # ------------------------------------------------------------------ one pass per value

    def pieces(self, opener: str, budget: int) -> Generator[str, None, None]:
        return self.runner.run(self.prefix + self.text + opener, budget)

    def read_string(self, budget: int) -> str:
        raw = ""
        with closing(self.pieces('"', budget)) as pieces:
            for piece in pieces:
                raw += piece
                end = _string_end(raw)
                if end is not None:
                    raw = raw[:end]
                    break
        try:
            value = json.loads('"' + raw + '"')
            return value if isinstance(value, str) else raw
        except ValueError:
            return raw

    def enum(self, values: list[Any], share: int) -> str:
        if all(isinstance(v, str) for v in values):
            return _dumps(closest(self.read_string(self.budget(share)), values))
        written = self.read_json(self.budget(share), "")
        for v in values:
            if _dumps(v) == written:
                return written
        return _dumps(values[0])

    def read_number(self, budget: int, integer: bool) -> str:
        acc = ""
        with closing(self.pieces("", budget)) as pieces:
            for piece in pieces:
                acc += piece
                match = _NUMBER.match(acc)
                if match is None:
                    if acc.strip() and not _could_start_number(acc):
                        raise self.fail(f"expected a number, the model wrote {acc.strip()[:40]!r}", acc)
                    continue
                if match.end() < len(acc):
                    break  # a character after the digits ends the number
        match = _NUMBER.match(acc)
        if match is None:
            raise self.fail("no number was written within max_tokens", acc)
        literal = match.group(1)
        if integer:
            number = float(literal)
            if not number.is_integer():
                raise self.fail(f"expected an integer, the model wrote {literal}", acc)
            return str(int(number))
        return json.dumps(json.loads(literal))

    def read_bool(self, budget: int) -> str:
        acc = ""
        with closing(self.pieces("", budget)) as pieces:
            for piece in pieces:
                acc += piece
                word = acc.strip().strip('"').lower()
                for key, value in _BOOL_WORDS.items():
                    if word.startswith(key):
                        return "true" if value else "false"
                if word and not any(k.startswith(word) for k in _BOOL_WORDS):
                    break
        raise self.fail(f"expected true or false, the model wrote {acc.strip()[:40]!r}", acc)

    def read_json(self, budget: int, opener: str) -> str:
        acc = opener
        decoder = json.JSONDecoder()
        with closing(self.pieces(opener, budget)) as pieces:
            for piece in pieces:
                acc += piece
                stripped = acc.lstrip()
                try:
                    value, end = decoder.raw_decode(stripped)
                except ValueError:
                    continue
                if isinstance(value, dict | list | str) or end < len(stripped):
                    return _dumps(value)
        try:
            value, _ = decoder.raw_decode(acc.lstrip())
        except ValueError:
            raise self.fail("the JSON value was not complete within max_tokens", acc) from None
        return _dumps(value)


def _kind(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), Mapping):
        kind = "object"
    return kind if isinstance(kind, str) else None


def _is_null(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "null"


def _string_end(raw: str) -> int | None:
    """Index of the first unescaped quote (or raw newline, which cannot occur inside a JSON string)."""
    escaped = False
    for i, ch in enumerate(raw):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ('"', "\n"):
            return i
    return None


def _could_start_number(text: str) -> bool:
    head = text.lstrip()
    return bool(head) and (head[0] in '-"' or head[0].isdigit()) and len(head) <= 2


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
