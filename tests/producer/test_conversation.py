"""Assistant masks: exactly each assistant's content plus its end-of-turn token, with or without
``{% generation %}`` markers; templates that cannot give a mask fail loudly."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from producer.conversation import (
    ChatTemplateError,
    ConversationEncoder,
    MalformedConversation,
    normalize_turns,
)
from producer.tiny_target import conversations

EOT = {"llama": "<|eot_id|>", "qwen3": "<|im_end|>"}
TOOL_CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the rate of the stream?"},
    {"role": "assistant", "content": "Let me check the buffer."},
    {"role": "tool", "content": "rate = 42 tokens per step"},
    {"role": "assistant", "content": "  The stream runs at 42 tokens per step.  "},
]


def supervised_spans(tokenizer, input_ids, loss_mask):
    spans, current = [], []
    for token, bit in zip(input_ids, loss_mask):
        if bit:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def expected_spans(messages, eot):
    return [m["content"].strip() + eot for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("variant", ["llama", "qwen3", "llama-plain", "qwen3-plain"])
def test_mask_covers_exactly_assistant_content_and_end_of_turn(tokenizer_dirs, variant):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs[variant]))
    encoder = ConversationEncoder(tokenizer)
    assert encoder.uses_markers == (not variant.endswith("-plain"))
    eot = EOT[variant.split("-")[0]]
    cases = [*conversations(24, seed=5), TOOL_CONVERSATION]
    assert any(m["role"] == "system" for c in cases for m in c)
    assert any(sum(m["role"] == "assistant" for m in c) > 1 for c in cases)

    for messages in cases:
        input_ids, loss_mask = encoder.encode(messages)
        assert input_ids == list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        assert set(loss_mask) <= {0, 1} and len(loss_mask) == len(input_ids)
        assert supervised_spans(tokenizer, input_ids, loss_mask) == expected_spans(messages, eot)


def test_fallback_mask_equals_generation_marker_mask(tokenizer_dirs):
    marked = ConversationEncoder(AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3"])))
    plain = ConversationEncoder(AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3-plain"])))
    for messages in conversations(16, seed=6):
        assert marked.encode(messages) == plain.encode(messages)


def test_empty_generation_block_raises_naming_the_template_problem(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama"]))
    marked = "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    assert marked in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(
        marked, "{%- generation %}{%- endgeneration %}{{- message['content'] | trim + '<|eot_id|>' }}"
    )
    encoder = ConversationEncoder(tokenizer, model_name="broken-template")
    with pytest.raises(ChatTemplateError, match=r"broken-template.*empty assistant mask.*generation"):
        encoder.encode(TOOL_CONVERSATION)


def test_template_that_rewrites_assistant_text_without_markers_raises(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3-plain"]))
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content'] | trim", "message['content'] | upper")
    with pytest.raises(ChatTemplateError, match="generation markers"):
        ConversationEncoder(tokenizer).encode(TOOL_CONVERSATION)


def test_conversation_without_assistant_turn_gives_empty_mask_not_an_error(tokenizer_dirs):
    encoder = ConversationEncoder(AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama"])))
    input_ids, loss_mask = encoder.encode([{"role": "user", "content": "Hello there."}])
    assert input_ids and not any(loss_mask)


def test_sharegpt_and_openai_turns_normalise_to_the_same_messages():
    sharegpt = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "gpt", "value": "A"},
        {"from": "tool", "value": "T"},
    ]
    openai = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "tool", "content": "T"},
    ]
    assert normalize_turns(sharegpt) == normalize_turns(openai) == openai


@pytest.mark.parametrize(
    "turns",
    [[], None, [{"from": "narrator", "value": "x"}], [{"role": "user", "content": [{"type": "image"}]}], ["text"]],
)
def test_unusable_turns_are_malformed(turns):
    with pytest.raises(MalformedConversation):
        normalize_turns(turns)


TRUNCATED_LAST = [
    {"role": "user", "content": "Is the buffer full?"},
    {"role": "assistant", "content": "Not yet."},
    {"role": "user", "content": "What is the rate of the stream?"},
    {"role": "assistant", "content": "The stream runs at 42 tokens per", "truncated": True},
]


def _untruncated(messages):
    return [{k: v for k, v in m.items() if k != "truncated"} for m in messages]


@pytest.mark.parametrize("variant", ["llama", "qwen3", "llama-plain", "qwen3-plain"])
def test_truncated_last_answer_ends_the_row_with_its_content_and_no_end_of_turn(tokenizer_dirs, variant):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs[variant]))
    encoder = ConversationEncoder(tokenizer)
    eot = EOT[variant.split("-")[0]]

    input_ids, loss_mask = encoder.encode(TRUNCATED_LAST)

    full_ids, full_mask = encoder.encode(_untruncated(TRUNCATED_LAST))
    assert input_ids == full_ids[: len(input_ids)] and loss_mask == full_mask[: len(input_ids)]
    assert tokenizer.convert_tokens_to_ids(eot) not in input_ids[-3:]
    assert tokenizer.decode(input_ids).endswith("The stream runs at 42 tokens per")
    assert supervised_spans(tokenizer, input_ids, loss_mask) == ["Not yet." + eot, "The stream runs at 42 tokens per"]


@pytest.mark.parametrize("variant", ["llama", "qwen3-plain"])
def test_truncated_answer_before_later_turns_keeps_its_tokens_but_not_its_end_of_turn(tokenizer_dirs, variant):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs[variant]))
    encoder = ConversationEncoder(tokenizer)
    eot = EOT[variant.split("-")[0]]
    messages = [
        {"role": "user", "content": "Is the buffer full?"},
        {"role": "assistant", "content": "Not yet, it holds", "truncated": True},
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": "Seven samples."},
    ]

    input_ids, loss_mask = encoder.encode(messages)

    assert input_ids == encoder.encode(_untruncated(messages))[0]  # the template closes the turn: tokens stay
    assert supervised_spans(tokenizer, input_ids, loss_mask) == ["Not yet, it holds", "Seven samples." + eot]


def test_truncated_flag_survives_normalisation_on_assistant_turns_only():
    turns = [
        {"from": "human", "value": "Q", "truncated": True},
        {"from": "gpt", "value": "A", "truncated": True},
        {"from": "gpt", "value": "B", "truncated": None},
    ]
    assert normalize_turns(turns) == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "truncated": True},
        {"role": "assistant", "content": "B"},
    ]


def test_short_message_found_in_an_injected_system_prompt_does_not_misplace_the_mask(tokenizer_dirs):
    """SmolLM2's template injects a default system prompt; a user message that also occurs in it
    must not pull the assistant's search into the system prompt."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen3-plain"]))
    tokenizer.chat_template = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are an assistant named Tiny.<|im_end|>\\n' }}{%- endif %}"
        + tokenizer.chat_template
    )
    messages = [{"role": "user", "content": "assistant named"}, {"role": "assistant", "content": "Tiny."}]
    input_ids, loss_mask = ConversationEncoder(tokenizer).encode(messages)
    assert supervised_spans(tokenizer, input_ids, loss_mask) == ["Tiny.<|im_end|>"]
    assert tokenizer.decode(input_ids[: loss_mask.index(1)]).endswith(
        "assistant named<|im_end|>\n<|im_start|>assistant\n"
    )
