"""One conversation -> ``input_ids`` + assistant ``loss_mask``, with the target's own chat template.

Turns come as ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) dicts; roles are
normalised to user/assistant/system/tool. Every assistant turn is supervised; system, user and tool
turns are context. The mask covers what the assistant says: its content and the end-of-turn token
that closes it, never the header that opens it.

Two ways to get the mask:

* the template has ``{% generation %}`` markers: ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` marks exactly the generated span;
* it has none (transformers then returns an all-zero mask with only a warning): render the text,
  tokenize it with offsets, find each message's content in order, and mark the tokens overlapping
  each assistant content plus everything up to and including the first special token after it
  (``<|eot_id|>``, ``<|im_end|>``, ``</s>``...).

A conversation with assistant content whose mask comes out empty raises ``ChatTemplateError``: a
silent zero-loss dataset is worse than a stopped run.

An assistant turn marked ``"truncated": true`` (``draftstream regenerate`` marks answers cut at
``--max-new-tokens``) did not end: the target would have gone on. Its end-of-turn token is not
supervised, and when it is the last message the rows end with its content: the template's
end-of-turn token and whatever follows it are cut, so no row teaches an end the target never chose.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

USER, ASSISTANT, SYSTEM, TOOL = "user", "assistant", "system", "tool"
ROLE_ALIASES = {
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bing": ASSISTANT,
    "bard": ASSISTANT,
    "model": ASSISTANT,
    "system": SYSTEM,
    "tool": TOOL,
    "function": TOOL,
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The target's chat template cannot give an assistant mask for these conversations."""


class MalformedConversation(ValueError):
    """A row that is not a usable conversation (unknown role, non-text content, no turns)."""


def normalize_turns(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT or OpenAI turns -> ``[{"role", "content"}]`` with canonical roles; an assistant turn
    marked truncated keeps ``"truncated": True``."""
    if not isinstance(turns, list) or not turns:
        raise MalformedConversation("no turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise MalformedConversation(f"turn is a {type(turn).__name__}, not a dict")
        raw_role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        role = ROLE_ALIASES.get(str(raw_role).lower())
        if role is None:
            raise MalformedConversation(f"unknown role {raw_role!r}")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise MalformedConversation(f"{role} content is a {type(content).__name__}, only text is supported")
        message = {"role": role, "content": content}
        if role == ASSISTANT and turn.get("truncated"):
            message["truncated"] = True
        messages.append(message)
    return messages


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


class ConversationEncoder:
    """Tokenizes conversations with ``tokenizer``'s chat template and derives the assistant mask."""

    def __init__(self, tokenizer, *, model_name: str = "the target"):
        template = tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else None
        if not template:
            raise ChatTemplateError(f"the tokenizer of {model_name} has no chat template; pick a chat/instruct model")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.uses_markers = has_generation_markers(template)
        self._special_ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
        self._special_ids.update(tokenizer.all_special_ids)

    def encode(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """``(input_ids, loss_mask)`` for normalised messages (see ``normalize_turns``)."""
        from jinja2 import TemplateSyntaxError

        try:
            if self.uses_markers:
                input_ids, loss_mask = self._encode_with_markers(messages)
            else:
                input_ids, loss_mask = self._encode_with_offsets(messages)
            if any(m["role"] == ASSISTANT and m.get("truncated") for m in messages):
                input_ids, loss_mask = self._cut_truncated(messages, input_ids, loss_mask)
        except TemplateSyntaxError as e:  # other TemplateErrors refuse one conversation, this one all
            raise ChatTemplateError(f"the chat template of {self.model_name} does not parse: {e}") from e
        num_assistant = sum(1 for m in messages if m["role"] == ASSISTANT and m["content"].strip())
        if num_assistant and not any(loss_mask):
            how = (
                "its {% generation %} markers do not surround the assistant content"
                if self.uses_markers
                else "no special end-of-turn token and no assistant content could be located in the rendered text"
            )
            raise ChatTemplateError(
                f"the chat template of {self.model_name} gave an empty assistant mask for a conversation "
                f"with {num_assistant} assistant turn(s): {how}. Fix the template (tokenizer_config.json / "
                f"chat_template.jinja) so that assistant turns can be located."
            )
        return input_ids, loss_mask

    def _encode_with_markers(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), [int(bool(x)) for x in out["assistant_masks"]]

    def _render(self, messages: list[dict[str, Any]]) -> tuple[str, list[int], list[int], list[int]]:
        """``(text, input_ids, token starts, token ends)``: the rendered conversation, tokenized with offsets."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return (
            text,
            list(enc["input_ids"]),
            [s for s, _ in enc["offset_mapping"]],
            [e for _, e in enc["offset_mapping"]],
        )

    def _content_spans(self, text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int] | None]:
        """``(start, end)`` of each message's stripped content in ``text`` (None where it is empty).
        The search for message i starts where the rendering of messages[:i] ends when that rendering
        is a prefix of ``text``: a default system prompt the template injects (SmolLM2's) can then
        never be mistaken for a short message."""
        from jinja2 import TemplateError

        spans: list[tuple[int, int] | None] = []
        cursor = 0
        for i, message in enumerate(messages):
            content = message["content"].strip()
            if not content:
                spans.append(None)
                continue
            if i:
                try:
                    prefix = self.tokenizer.apply_chat_template(messages[:i], tokenize=False)
                except TemplateError:  # a template may refuse a partial conversation: search from the cursor
                    prefix = ""
                if prefix and text.startswith(prefix):
                    cursor = max(cursor, len(prefix))
            pos = text.find(content, cursor)
            if pos < 0:
                raise ChatTemplateError(
                    f"the chat template of {self.model_name} has no {{% generation %}} markers and rewrites "
                    f"message {i} ({message['role']}), so its text cannot be found in the rendered "
                    f"conversation: add generation markers to the template to derive the assistant mask"
                )
            spans.append((pos, pos + len(content)))
            cursor = pos + len(content)
        return spans

    def _encode_with_offsets(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        text, input_ids, starts, ends = self._render(messages)
        # (start, end, is_assistant) of each non-empty content in the rendered text, in order.
        spans = [
            (*span, message["role"] == ASSISTANT)
            for span, message in zip(self._content_spans(text, messages), messages)
            if span is not None
        ]
        loss_mask = [0] * len(input_ids)
        for n, (content_start, content_end, is_assistant) in enumerate(spans):
            if not is_assistant:
                continue
            first = bisect.bisect_right(ends, content_start)  # first token ending after the start
            after = bisect.bisect_left(starts, content_end)  # first token starting at/after the end
            for t in range(first, after):
                loss_mask[t] = 1
            # The end-of-turn token: the first special token after the content, before the next message.
            limit = spans[n + 1][0] if n + 1 < len(spans) else len(text)
            for t in range(after, len(input_ids)):
                if starts[t] >= limit:
                    break
                if input_ids[t] in self._special_ids:
                    for u in range(after, t + 1):
                        loss_mask[u] = 1
                    break
        return input_ids, loss_mask

    def _cut_truncated(
        self, messages: list[dict[str, Any]], input_ids: list[int], loss_mask: list[int]
    ) -> tuple[list[int], list[int]]:
        """Unsupervise what follows each truncated assistant content (its end-of-turn token), and
        cut the row after the content when the truncated turn is the last message."""
        text, ids, starts, _ = self._render(messages)
        if ids != input_ids:
            raise ChatTemplateError(
                f"the chat template of {self.model_name} tokenizes differently from its rendered text, "
                f"so the end of a truncated answer cannot be placed"
            )
        spans = self._content_spans(text, messages)
        loss_mask = list(loss_mask)
        for i, (span, message) in enumerate(zip(spans, messages)):
            if span is None or message["role"] != ASSISTANT or not message.get("truncated"):
                continue
            later = [s[0] for s in spans[i + 1 :] if s is not None]
            limit = later[0] if later else len(text)
            after = bisect.bisect_left(starts, span[1])  # first token starting at/after the content's end
            for t in range(after, len(ids)):
                if starts[t] >= limit:
                    break
                loss_mask[t] = 0
            if i == len(messages) - 1:
                return ids[:after], loss_mask[:after]
        return ids, loss_mask
