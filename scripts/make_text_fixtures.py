#!/usr/bin/env python3
"""Build the text fixtures of zaya's tokenizer / chat-template / detokenizer parity tests.

Run with the reference environment (transformers 5.23.0, tokenizers 0.23, jinja2 3.1.6):

    /work/venv/bin/python scripts/make_text_fixtures.py

CI never runs this script; its outputs are committed under tests/fixtures/text/:

    tests/fixtures/text/tokenizer/   a small ZAYA1-like tokenizer directory that
                                     `AutoTokenizer.from_pretrained` loads (tokenizer.json,
                                     tokenizer_config.json, special_tokens_map.json,
                                     generation_config.json, chat_template.jinja)
    tests/fixtures/text/tokenize.json    texts -> ids (with / without special tokens) and decodes
    tests/fixtures/text/templates.json   conversations + kwargs -> apply_chat_template(tokenize=False)

The tokenizer is a BPE trained on a small built-in corpus, laid out like ZAYA1's Gemma-3
vocabulary: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, <unused0..95>=5..100, the Zyphra
tool-call tokens 101..104, <start_of_turn>=105, <end_of_turn>=106, then the 256 byte-fallback
tokens, the learned pieces, and finally <think>/</think> as added special tokens (their real ids
in ZAYA1 are past Gemma's 262144 base entries, so they go last here too).

Tokenizer class: `GemmaTokenizer`, the class transformers picks for ZAYA1. GemmaTokenizer rebuilds
its own normalizer (" " -> "▁"), pre-tokenizer and decoder and keeps only vocab, merges,
added tokens and the post-processor of tokenizer.json, so tokenizer.json here is written with
exactly Gemma's pipeline: then the `tokenizers` library reading tokenizer.json alone (what
zaya does) and transformers agree. The script asserts that agreement for every fixture text.

The post-processor mirrors the real ZAYA1 tokenizer: BOS (2) is prepended and <end_of_turn>
(106) appended when encoding with special tokens (see the HF integration test in
zaya-architecture.md section 19).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "text"
TOK_DIR = OUT / "tokenizer"

VOCAB_PIECES = 900  # learned BPE pieces (on top of specials and byte-fallback tokens)

CORPUS = """
Hello! How can I assist you today? I can answer questions, write code and call tools.
The quick brown fox jumps over the lazy dog. The weather in Paris is sunny and warm.
What is the weather like in London today? Let me check the forecast for you.
I think the answer is forty-two, but let me verify that with a calculation first.
Zyphra builds efficient language models. ZAYA1 is a mixture-of-experts model with
compressed convolutional attention, a router with exponential depth averaging and
a skip expert. The tokenizer follows Gemma: spaces become a special underscore character.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}
<function=get_weather> <parameter=city> Paris </parameter> </function>
The user asked about the temperature. The function returned 21 degrees.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 3.14 1e-7 2024 1000000
Questions and answers, reasoning and thinking, tools and functions, parameters and values.
You are a helpful assistant. Please think step by step before answering the question.
Search the web for recent news about open source software and summarise the results.
Convert 100 dollars to euros. Book a table for two people at seven in the evening.
True False None null true false [] {} () <> & ; : , . ! ? ' " - _ = + * / \\ | @ # $ % ^ ~ `
Ünïcödé tëxt: café, naïve, résumé, Zürich, São Paulo, Kraków, İstanbul.
Ελληνικά, русский текст, 日本語のテキスト, 中文文本, 한국어 텍스트, العربية, עברית.
"""

SPECIAL_LOW = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<unused{i}>" for i in range(96)]
ZYPHRA_TOKENS = [
    "<zyphra_tool_call>",  # 101
    "</zyphra_tool_call>",  # 102
    "<zyphra_tool_response>",  # 103
    "</zyphra_tool_response>",  # 104
    "<start_of_turn>",  # 105
    "<end_of_turn>",  # 106
]
THINK_TOKENS = ["<think>", "</think>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# ZAYA1-style chat template: Gemma turns, a system turn carrying the tool list (tojson), assistant tool
# calls in the Zyphra / Qwen3-Coder XML markup, tool results in <zyphra_tool_response>, thinking
# switched by `enable_thinking`, past reasoning kept only after the last user turn.
# Written without whitespace-control dashes in most places so that trim_blocks / lstrip_blocks matter.
CHAT_TEMPLATE = """{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{% if messages[0].role == 'system' %}
    {% set system_message = render_content(messages[0].content) %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set loop_messages = messages %}
{% endif %}
{% if system_message is defined or tools or extra_context is defined %}
<start_of_turn>system
{% if system_message is defined %}
{{ system_message }}
{% endif %}
{% if extra_context is defined %}
Context: {{ extra_context }}
{% endif %}
{% if tools %}

# Tools

You may call one or more of the following functions:
<tools>
    {% for tool in tools %}
{{ (tool.function if tool.function is defined else tool) | tojson }}
    {% endfor %}
</tools>

To call a function, reply with:
<zyphra_tool_call>
<function=example_function_name>
<parameter=example_parameter>
value
</parameter>
</function>
</zyphra_tool_call>
{% endif %}
<end_of_turn>
{% endif %}
{% set ns = namespace(last_user=-1) %}
{% for message in loop_messages %}
    {% if message.role == 'user' %}
        {% set ns.last_user = loop.index0 %}
    {% endif %}
{% endfor %}
{% for message in loop_messages %}
    {% if message.role == 'user' %}
<start_of_turn>user
{{ render_content(message.content) }}<end_of_turn>
    {% elif message.role == 'assistant' %}
<start_of_turn>model
        {% if message.reasoning_content is defined and loop.index0 > ns.last_user %}
<think>
{{ message.reasoning_content | trim }}
</think>

        {% endif %}
        {% if message.content is defined %}
{{- render_content(message.content) | trim -}}
        {% endif %}
        {% if message.tool_calls is defined %}
            {% for tool_call in message.tool_calls %}
                {% set call = tool_call.function if tool_call.function is defined else tool_call %}
                {% if loop.first and message.content is defined and message.content %}

                {% endif %}
<zyphra_tool_call>
<function={{ call.name }}>
                {% if call.arguments is mapping %}
                    {% for key, value in call.arguments.items() %}
<parameter={{ key }}>
{% if value is string %}{{ value }}{% else %}{{ value | tojson }}{% endif %}

</parameter>
                    {% endfor %}
                {% elif call.arguments is defined %}
{{ raise_exception('tool call arguments must be an object, got: ' ~ call.arguments) }}
                {% endif %}
</function>
</zyphra_tool_call>
            {% endfor %}
        {% endif %}
<end_of_turn>
    {% elif message.role == 'tool' %}
        {% if loop.first or loop_messages[loop.index0 - 1].role != 'tool' %}
<start_of_turn>user
        {% endif %}
<zyphra_tool_response>
{{ message.content }}
</zyphra_tool_response>
        {% if loop.last or loop_messages[loop.index0 + 1].role != 'tool' %}
<end_of_turn>
        {% endif %}
    {% else %}
{{ raise_exception('Unexpected message role: ' ~ message.role) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
    {% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

    {% elif enable_thinking is defined and enable_thinking %}
<think>
    {% endif %}
{% endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather <forecast> for a city & its region; returns 'celsius' by default.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. São Paulo"},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "threshold": {"type": "number", "default": 1e-07},
            },
            "required": ["city"],
        },
    },
}
CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {"type": "string"},
                "precision": {"type": "integer"},
                "options": {"type": "object"},
            },
            "required": ["expression"],
        },
    },
}
# A tool given as a bare function schema (no {"type": "function", "function": ...} wrapper).
BARE_TOOL = {"name": "get_time", "description": "Current time.", "parameters": {"type": "object", "properties": {}}}

CONVERSATIONS = [
    {
        "name": "single_user",
        "messages": [{"role": "user", "content": "Hello! How can I assist you today?"}],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "single_user_no_generation_prompt",
        "messages": [{"role": "user", "content": "Hello!"}],
        "kwargs": {"add_generation_prompt": False},
    },
    {
        "name": "system_multi_turn",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant.\n  Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "  4  "},
            {"role": "user", "content": "And   times three?\n"},
        ],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "thinking_on",
        "messages": [{"role": "user", "content": "Think about it: is 91 prime?"}],
        "kwargs": {"add_generation_prompt": True, "enable_thinking": True},
    },
    {
        "name": "thinking_off",
        "messages": [{"role": "user", "content": "Is 91 prime?"}],
        "kwargs": {"add_generation_prompt": True, "enable_thinking": False},
    },
    {
        "name": "thinking_none_is_defined",
        "messages": [{"role": "user", "content": "Is 91 prime?"}],
        "kwargs": {"add_generation_prompt": True, "enable_thinking": None},
    },
    {
        "name": "reasoning_history",
        "messages": [
            {"role": "user", "content": "First question?"},
            {"role": "assistant", "content": "First answer.", "reasoning_content": "Old reasoning, dropped."},
            {"role": "user", "content": "Second question?"},
            {"role": "assistant", "content": "Second answer.", "reasoning": "  New reasoning via `reasoning`.\n"},
        ],
        "kwargs": {"add_generation_prompt": False, "enable_thinking": True},
    },
    {
        "name": "thinking_field_alias",
        "messages": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A.", "thinking": "Reasoning via `thinking`."},
        ],
        "kwargs": {},
    },
    {
        "name": "tools_and_calls",
        "messages": [
            {"role": "system", "content": "You can use tools."},
            {"role": "user", "content": "Weather in São Paulo for 3 days, and 6*7?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"city": "São Paulo", "days": 3, "unit": "celsius", "threshold": 0.5},
                        },
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {
                            "name": "calculate",
                            "arguments": {
                                "expression": "6 * 7 < 50 && x > 1",
                                "precision": 0,
                                "options": {
                                    "exact": True,
                                    "fallback": None,
                                    "steps": [1, 2.5, -3, 1e-07, 1e16, 12345678901234567890],
                                    "note": "naïve <b>&amp;</b> 'quoted' \"double\" \\ \n\t end",
                                },
                            },
                        },
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
            {"role": "tool", "tool_call_id": "call_2", "content": {"result": 42, "exact": True, "error": None}},
            {"role": "assistant", "content": "It is 21°C and clear; 6*7 = 42."},
            {"role": "user", "content": "Thanks 🙏"},
        ],
        "tools": [WEATHER_TOOL, CALC_TOOL, BARE_TOOL],
        "kwargs": {"add_generation_prompt": True, "enable_thinking": False},
    },
    {
        "name": "tool_call_with_content_and_list_arguments",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Run two "}, {"type": "text", "text": "things."}]},
            {
                "role": "assistant",
                "content": "Sure, calling now.",
                "tool_calls": [
                    {"function": {"name": "calculate", "arguments": {"expression": "1+1", "options": ["a", {"b": []}, {}]}}}
                ],
            },
            {"role": "tool", "content": ["list", "result", 3, False, None, 1.5, {"k": "v'"}]},
        ],
        "tools": [CALC_TOOL],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "extra_context_python_str",
        "messages": [{"role": "user", "content": "Hi"}],
        "kwargs": {
            "add_generation_prompt": True,
            "extra_context": {
                "debug": True,
                "level": None,
                "ratio": 0.5,
                "big": 1e16,
                "small": 1e-05,
                "whole": 3.0,
                "tags": ["a", "b'c", 'd"e', "f'g\"h", "tab\there", "new\nline", "back\\slash", "é✓"],
                "nested": {"x": [1, [2, []]], "y": {}},
            },
        },
    },
    {
        "name": "extra_context_scalar_false",
        "messages": [{"role": "user", "content": "Hi"}],
        "kwargs": {"add_generation_prompt": False, "extra_context": False},
    },
    {
        "name": "empty_tools_list",
        "messages": [{"role": "user", "content": "No tools here."}],
        "tools": [],
        "kwargs": {"add_generation_prompt": True},
    },
]

ERROR_CONVERSATIONS = [
    {
        "name": "bad_role",
        "messages": [{"role": "narrator", "content": "Once upon a time"}],
        "kwargs": {"add_generation_prompt": True},
    },
    {
        "name": "string_arguments",
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
        ],
        "kwargs": {},
    },
]

TEXTS = [
    "Hello! How can I assist you today?",
    "",
    " ",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines\r\n",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café naïve Zürich İstanbul",
    "日本語のテキストと中文文本",
    "Emojis: 🙏🏽 👩‍👩‍👧 🇫🇷 ✓",
    "Rare bytes: \u0000\u0007\u007f\u00a0\u200b\ufeff𝔘𝔫𝔦",
    "Special tokens inline: <start_of_turn>user\nHi<end_of_turn>\n<zyphra_tool_call><function=f></function></zyphra_tool_call>",
    "<think>\nreasoning\n</think>\n\nanswer",
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    "<bos>text that starts with a bos string",
    "not<eos>special-looking <unk> strings <mask> and <unused7>",
]

# Ids to decode that a plain encode never yields: lone / partial byte-fallback sequences, specials.
EXTRA_DECODES = [
    [0, 1, 2, 3, 4, 105, 106],
    [2, 105],
]


def train_tokenizer(corpus: str = CORPUS, pieces: int = VOCAB_PIECES) -> Tokenizer:
    # Train a BPE on whitespace-split words (so merges do not cross words), then lay the vocabulary
    # out with ZAYA1's fixed ids and install Gemma's pipeline.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    initial = sorted({c for c in corpus.replace(" ", "▁")})
    trainer = trainers.BpeTrainer(
        vocab_size=len(initial) + pieces,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=initial,
        show_progress=False,
        limit_alphabet=1000,
    )
    trainer_tok.train_from_iterator([corpus] * 3, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())
    learned_vocab = trained["model"]["vocab"]
    merges = trained["model"]["merges"]

    vocab: dict[str, int] = {}
    for tok in SPECIAL_LOW + ZYPHRA_TOKENS + BYTE_TOKENS:
        vocab[tok] = len(vocab)
    for piece, _ in sorted(learned_vocab.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    for tok in THINK_TOKENS:
        vocab[tok] = len(vocab)
    assert vocab["<pad>"] == 0 and vocab["<eos>"] == 1 and vocab["<bos>"] == 2
    assert vocab["<zyphra_tool_call>"] == 101 and vocab["</zyphra_tool_response>"] == 104
    assert vocab["<start_of_turn>"] == 105 and vocab["<end_of_turn>"] == 106

    merge_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merge_pairs, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None
        )
    )
    # Gemma's pipeline, as GemmaTokenizer builds it.
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = SPECIAL_LOW[:5] + ZYPHRA_TOKENS + THINK_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <end_of_turn>",
        pair="<bos> $A <end_of_turn> $B:1 <end_of_turn>:1",
        special_tokens=[("<bos>", 2), ("<end_of_turn>", 106)],
    )
    return tok


def write_tokenizer_dir(tok: Tokenizer, out_dir: Path = TOK_DIR) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(
                {
                    "tokenizer_class": "GemmaTokenizer",
                    "bos_token": "<bos>",
                    "eos_token": "<end_of_turn>",
                    "pad_token": "<pad>",
                    "unk_token": "<unk>",
                    "mask_token": "<mask>",
                    # Ignored by transformers when tokenizer.json exists (the post-processor decides).
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "clean_up_tokenization_spaces": False,
                    "model_max_length": 4096,
                    "padding_side": "left",
                    "chat_template": CHAT_TEMPLATE,
                },
                f,
                indent=2,
                ensure_ascii=False,
            )
        hf = AutoTokenizer.from_pretrained(tmp)
        assert type(hf).__name__ == "GemmaTokenizer", type(hf).__name__
        hf.save_pretrained(out_dir)
    # The files the Rust loader reads besides tokenizer.json / tokenizer_config.json.
    with open(out_dir / "special_tokens_map.json", "w") as f:
        json.dump(
            {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>", "unk_token": "<unk>"},
            f,
            indent=2,
        )
    with open(out_dir / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}, f, indent=2)


def main() -> None:
    tok = train_tokenizer()
    write_tokenizer_dir(tok)

    hf = AutoTokenizer.from_pretrained(TOK_DIR)
    raw = Tokenizer.from_file(str(TOK_DIR / "tokenizer.json"))
    print("tokenizer class:", type(hf).__name__, "vocab:", raw.get_vocab_size(), "files:", sorted(os.listdir(TOK_DIR)))

    # --- tokenization ---
    tok_cases = []
    for text in TEXTS:
        with_special = hf.encode(text, add_special_tokens=True)
        without = hf.encode(text, add_special_tokens=False)
        assert raw.encode(text, add_special_tokens=True).ids == with_special, text
        assert raw.encode(text, add_special_tokens=False).ids == without, text
        tok_cases.append(
            {
                "text": text,
                "ids_with_special": with_special,
                "ids_without_special": without,
                "tokens_without_special": hf.convert_ids_to_tokens(without),
                "decode": hf.decode(with_special, skip_special_tokens=False),
                "decode_skip_special": hf.decode(with_special, skip_special_tokens=True),
            }
        )
    # Byte-fallback tokens of a 4-byte character decoded alone, and specials.
    emoji_bytes = [raw.token_to_id(f"<0x{b:02X}>") for b in "🙏".encode()]
    decodes = []
    for ids in EXTRA_DECODES + [emoji_bytes, emoji_bytes[:2], emoji_bytes[1:]]:
        decodes.append(
            {
                "ids": ids,
                "decode": hf.decode(ids, skip_special_tokens=False),
                "decode_skip_special": hf.decode(ids, skip_special_tokens=True),
            }
        )

    (OUT / "tokenize.json").write_text(
        json.dumps(
            {
                "generator": "scripts/make_text_fixtures.py (transformers GemmaTokenizer)",
                "bos_token_id": hf.bos_token_id,
                "eos_token_id": hf.eos_token_id,
                "pad_token_id": hf.pad_token_id,
                "vocab_size": raw.get_vocab_size(),
                "cases": tok_cases,
                "decodes": decodes,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )

    # --- chat templates ---
    rendered = []
    for conv in CONVERSATIONS:
        kwargs = dict(conv["kwargs"])
        tools = conv.get("tools")
        text = hf.apply_chat_template(conv["messages"], tools=tools, tokenize=False, **kwargs)
        ids = hf.apply_chat_template(conv["messages"], tools=tools, tokenize=True, return_dict=False, **kwargs)
        assert raw.encode(text, add_special_tokens=False).ids == ids
        entry = {"name": conv["name"], "messages": conv["messages"]}
        if tools is not None:
            entry["tools"] = tools
        entry["kwargs"] = kwargs
        entry["rendered"] = text
        entry["ids"] = ids
        rendered.append(entry)
    errors = []
    for conv in ERROR_CONVERSATIONS:
        try:
            hf.apply_chat_template(conv["messages"], tokenize=False, **conv["kwargs"])
        except Exception as e:  # jinja2.exceptions.TemplateError from raise_exception
            errors.append({"name": conv["name"], "messages": conv["messages"], "kwargs": conv["kwargs"], "error": str(e)})
        else:
            raise AssertionError(f"{conv['name']} rendered without error")

    (OUT / "templates.json").write_text(
        json.dumps(
            {
                "generator": "scripts/make_text_fixtures.py (transformers apply_chat_template, tokenize=False)",
                "conversations": rendered,
                "errors": errors,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")
    assert total < 1_000_000


if __name__ == "__main__":
    main()
