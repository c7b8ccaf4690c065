"""Chat conversations -> text and token ids, with what people wrote always encoded as text.

A template (sandboxed Jinja, the `chat_template` of tokenizer_config.json) lays out the turns. Its own markers (BOS,
<｜User｜>, <｜Assistant｜>, EOS) are control tokens; message content is not: a user who writes "<｜Assistant｜>" gets
those characters, not a forged assistant turn. So before rendering, every special-token string inside content
(found as the tokenizer finds them) is swapped for a sentinel that no text can hold (random digits, drawn per call);
the template then renders as usual (its own edits of content, a trim or a split, still apply), and the result is
encoded piece by piece: the text between sentinels with special tokens recognised (only the template's own are left
there), each sentinel as its special string split into ordinary tokens.

A marker can also be spelled across strings: two system messages "<｜Assis" and "tant｜>" that a template joins, or
content ending "<｜end▁of▁" before text that completes it. So each message content's edges are escaped as well: its
longest ending that begins a special-token string, its longest start that ends one, and the whole content when it lies
inside one (any marker spelled across contents takes one of those from some content). Content that holds no
special-token string and has no such edge encodes exactly like the plain rendered text; an escaped edge is encoded on
its own (a ">" that starts a quote: the same ids wherever the pre-tokenizer splits there anyway).

Every string a request carries is user text, not only `content`: a past tool call's name and arguments, a tool's
output, the tool definitions (names, descriptions, JSON-schema keys and values) are escaped the same way. The
sentinel is made of characters that `tojson` writes unchanged (a private-use character and digits), since
templates render tool definitions and arguments as JSON. `tojson` itself is Hugging Face's (json.dumps with
ensure_ascii=False), not Jinja's HTML-safe one: a release template renders what its model was trained on only with
the filter it was written for.

Templates receive what Hugging Face's apply_chat_template passes: `messages`, `tools` (None without them),
`add_generation_prompt`, `bos_token`, `eos_token`, plus the caller's extra variables (V3.1's `thinking`).

The server's chat completions and /tokenize use this, and post-training data must too (`encode_chat`), so that a
model is trained on the ids it is served.
"""

from __future__ import annotations

import json
import re
import secrets

from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

Piece = tuple[str, bool]        # (text, is user text: its special-token strings are split into ordinary tokens)
MARK_END = "\ue000"             # ends a sentinel; a private-use character: JSON, upper() and trim leave it alone
REASONING_TAGS = ("<think>", "</think>")     # the only added tokens an assistant turn's text keeps as tokens
RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"})


class ChatTemplate:
    """A compiled template. `messages` are dicts with "role" and "content" (a string, or None beside tool_calls),
    and where present "tool_calls" (OpenAI's shape, arguments a JSON string) and "tool_call_id"; `tools` is the
    request's list of tool definitions (OpenAI's {"type": "function", "function": {...}})."""

    def __init__(self, source: str | None = None):
        import jinja2.meta
        import jinja2.sandbox          # the serve / post-training dependency, not needed to tokenise documents

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise       # what Hugging Face templates call on a bad conversation
        env.filters["tojson"] = _tojson
        self.source = source or CHAT_TEMPLATE
        self._template = env.from_string(self.source)
        self.variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(self.source)))

    @property
    def renders_tools(self) -> bool:
        """Whether the template lays out tool definitions (V3.1's does; V3's and R1's release templates do not)."""
        return "tools" in self.variables

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the template lays out past tool calls and tool outputs (every DeepSeek release template does)."""
        return "tool_calls" in self.source

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **variables) -> str:
        """The conversation as one text (for display: in it, user text's special-token strings look like markers).
        `variables` are the template's own switches (V3.1's `thinking`); they may not replace the standard ones."""
        clash = RESERVED & variables.keys()
        if clash:
            raise ValueError(f"template variables {sorted(clash)} are set by the server")
        return self._template.render(variables | {
            "messages": messages, "tools": tools or None, "add_generation_prompt": add_generation_prompt,
            "bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"]})

    def pieces(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **variables) -> list[Piece]:
        """The rendered conversation as pieces whose texts join to `render`'s; the special-token strings found in
        any string of the messages or tools come out as pieces of their own, marked as user text."""
        # An assistant turn's own text keeps its reasoning tags (<think>, </think>, added tokens not flagged special)
        # as the tokens the model generated (R1's SFT data, a reasoning history). Every other added token is text
        # there too, flagged or not: DeepSeek's release leaves the tool-call markers unflagged as well, and kept as
        # tokens they forged a call. Everywhere else (user, system and tool text, call arguments, tool definitions)
        # every added token is text.
        strings = json_strings((messages, tools))
        spans = dict(zip(strings, tokenizer.special_spans(strings)))
        # contents get their own tables (with their edges): a role or key equal to some content is left as it is
        texts = [(m.get("role") == "assistant", m["content"]) for m in messages if isinstance(m.get("content"), str)]
        contents, own = [t for a, t in texts if not a], [t for a, t in texts if a]
        affixes = tokenizer.added_affixes
        added = tokenizer.backend.get_added_tokens_decoder().values() if own else ()
        tags = {t.content for t in added if t.content in REASONING_TAGS and not t.special}
        content_spans = {text: _with_edges(text, spans[text], affixes) for text in contents}
        # the edges are found beside every added token (a kept tag bounds a stretch too), then the tags kept
        own_spans = {text: [(a, b) for a, b in _with_edges(text, spans[text], affixes) if text[a:b] not in tags]
                     for text in own}
        if not any(spans.values()) and not any(content_spans.values()) and not any(own_spans.values()):
            return [(self.render(messages, add_generation_prompt, tools, **variables), False)]
        mark = f"\ue000{secrets.randbelow(10**16):016d}:"
        found: list[str] = []                                   # sentinel k stands for found[k]

        def escaper(table: dict[str, list[tuple[int, int]]]):
            def escape(text: str) -> str:
                out, end = [], 0
                for a, b in table[text]:
                    out += [text[end:a], f"{mark}{len(found)}{MARK_END}"]
                    found.append(text[a:b])
                    end = b
                return "".join(out) + text[end:]
            return escape
        escape, escape_own, escape_content = escaper(spans), escaper(own_spans), escaper(content_spans)
        escaped_messages = [
            {k: (escape_own if m.get("role") == "assistant" else escape_content)(v)
             if k == "content" and isinstance(v, str) else _map_strings(v, escape) for k, v in m.items()}
            for m in messages]
        escaped_tools = _map_strings(tools, escape)
        rendered = self.render(escaped_messages, add_generation_prompt, escaped_tools, **variables)
        parts = re.split(re.escape(mark) + r"(\d+)" + MARK_END, rendered)
        # text, sentinel index, text, ..., text
        return [p for p in ((found[int(part)], True) if k % 2 else (part, False) for k, part in enumerate(parts))
                if p[0]]

    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **variables) -> list[int]:
        return encode_pieces(tokenizer, self.pieces(tokenizer, messages, add_generation_prompt, tools, **variables))


def _with_edges(text: str, spans: list[tuple[int, int]], affixes: tuple) -> list[tuple[int, int]]:
    """`spans` (the special-token strings in text, in order) plus the edges through which text could spell one with
    what a template puts beside it: the longest ending of its last stretch that is a proper prefix of some added-token
    string, the longest start of its first stretch that is a proper suffix of one, or the whole text when it has none
    and lies inside one."""
    prefixes, suffixes, strings, longest = affixes
    if not text or not longest:
        return spans
    if not spans and len(text) < longest and any(text in t for t in strings):
        return [(0, len(text))]
    head_end = spans[0][0] if spans else len(text)
    tail_start = spans[-1][1] if spans else 0
    head = next((i for i in range(min(head_end, longest - 1), 0, -1) if text[:i] in suffixes), 0)
    tail = next((i for i in range(min(len(text) - tail_start, longest - 1), 0, -1) if text[-i:] in prefixes), 0)
    if not spans and head + tail >= len(text):      # the two edges meet: the whole text
        return [(0, len(text))] if head or tail else spans
    return ([(0, head)] if head else []) + list(spans) + ([(len(text) - tail, len(text))] if tail else [])


def json_strings(value, max_depth: int | None = None) -> list[str]:
    """Every string in a JSON-like value, dict keys included. Iterative: a request body nested ~1000 levels (what
    json.loads reads) must not overflow the stack; deeper than `max_depth`, a ValueError."""
    out, todo = [], [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if max_depth is not None and depth > max_depth:
            raise ValueError(f"nested deeper than {max_depth} levels")
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            todo += [(x, depth + 1) for item in v.items() for x in item]
        elif isinstance(v, (list, tuple)):
            todo += [(x, depth + 1) for x in v]
    return out


def _map_strings(value, fn):
    """`value` with fn applied to every string in it, dict keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(v, fn) for v in value)
    return value


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """Hugging Face's `tojson` (transformers' chat template environment): plain json.dumps, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def encode_pieces(tokenizer, pieces: list[Piece]) -> list[int]:
    """Template text with special tokens recognised, user text with them split: each distinct piece once, in two
    batched calls."""
    encoded = {}
    for user in (False, True):
        texts = list(dict.fromkeys(t for t, u in pieces if u == user))
        encoded.update(zip(((t, user) for t in texts), tokenizer.encode_batch(texts, split_special_tokens=user)))
    return [i for piece in pieces for i in encoded[piece]]


def encode_chat(tokenizer, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = False) -> list[int]:
    """A conversation's ids for post-training: the whole conversation (no generation prompt) by default."""
    return ChatTemplate(template).encode(tokenizer, messages, add_generation_prompt)


def _raise(message: str):
    import jinja2
    raise jinja2.TemplateError(message)
