"""Checks of `zaya serve` through the official `openai` Python client.

Run by crates/zaya-cli/tests/serve.rs against real servers:
    python openai_checks.py CONFIG.json
CONFIG: {"base": URL of the server under test, "cold": URL of a second server with the prefix
cache off, "key": API key, "model": served name, "generate": {"prompt", "max_tokens", "text"}
(what `zaya generate --prompt` printed)}. Prints one line per check; exits 1 if any failed.
"""

import concurrent.futures
import json
import sys
import time
import traceback
import urllib.request

import openai

CFG = json.load(open(sys.argv[1]))
MODEL = CFG["model"]
client = openai.OpenAI(base_url=CFG["base"] + "/v1", api_key=CFG["key"], max_retries=0, timeout=120)
cold = openai.OpenAI(base_url=CFG["cold"] + "/v1", api_key=CFG["key"], max_retries=0, timeout=120)

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "options": {
                    "type": "object",
                    "properties": {"unit": {"type": "string", "enum": ["c", "f"]}, "hourly": {"type": "boolean"}},
                    "required": ["unit", "hourly"],
                    "additionalProperties": False,
                },
            },
            "required": ["city", "days", "options"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "And God said, what is the weather in Eden?"}]


def chat(**kw):
    args = dict(model=MODEL, messages=USER, max_tokens=24, temperature=0)
    args.update(kw)
    return client.chat.completions.create(**args)


def stream_chat(c=client, **kw):
    """Streams a chat request; returns (content, reasoning, tool_calls, finish, usage, chunks)."""
    args = dict(model=MODEL, messages=USER, max_tokens=24, temperature=0, stream=True)
    args.update(kw)
    content, reasoning, calls, finish, usage, chunks = "", "", {}, {}, None, 0
    for ch in c.chat.completions.create(**args):
        chunks += 1
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            d = choice.delta
            if d.content:
                content += d.content
            r = getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content")
            if r:
                reasoning += r
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    # OpenAI's shape: the first delta of a call has id, type and name.
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    assert tc.function.arguments == "", tc
                    calls[tc.index] = {"name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and tc.function.name is None, tc
                    calls[tc.index]["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return content, reasoning, [calls[i] for i in sorted(calls)], finish, usage, chunks


def no_markup(text):
    for tag in ["<zyphra_tool_call", "</zyphra_tool_call", "<function=", "<parameter=", "</think>", "<think>"]:
        assert tag not in (text or ""), f"markup {tag} leaked: {text!r}"


def valid_weather(args):
    a = json.loads(args)
    assert set(a) == {"city", "days", "options"}, a
    assert isinstance(a["city"], str) and a["city"], a
    assert isinstance(a["days"], int) and 1 <= a["days"] <= 7, a
    assert a["options"]["unit"] in ("c", "f") and isinstance(a["options"]["hourly"], bool), a
    return a


@check
def models_list():
    assert [m.id for m in client.models.list().data] == [MODEL]


@check
def chat_plain_stream_equals_whole():
    r = chat()
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    content, _, calls, finish, usage, _ = stream_chat(stream_options={"include_usage": True})
    assert content == (c.message.content or ""), (content, c.message.content)
    assert finish == {0: c.finish_reason} and not calls
    assert usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens == r.usage.prompt_tokens
    # Without include_usage there is no usage chunk.
    assert stream_chat()[4] is None


@check
def chat_content_parts_system_and_history():
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "In the beginning"}]},
        {"role": "assistant", "content": "God created."},
        {"role": "user", "content": "And then?"},
    ]
    r = chat(messages=msgs)
    assert r.choices[0].finish_reason in ("stop", "length")


@check
def sampling_parameters():
    kw = dict(temperature=0.9, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=7, max_tokens=16,
              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    a, b = chat(**kw), chat(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content, "same seed, same text"
    texts = {chat(**{**kw, "seed": s}).choices[0].message.content for s in range(4)}
    assert len(texts) > 1, "different seeds should differ"
    r = chat(n=3, temperature=1.0, seed=3, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1, "choices use seed + i"


@check
def max_tokens_and_stop():
    r = chat(max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    full = chat(max_tokens=30, extra_body={"ignore_eos": True}).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2] if len(words) > 2 else None
    if stop:
        r = chat(max_tokens=30, stop=[stop], extra_body={"ignore_eos": True})
        assert stop not in r.choices[0].message.content, r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        assert full.startswith(r.choices[0].message.content.rstrip())


@check
def logprobs():
    r = chat(logprobs=True, top_logprobs=3, max_tokens=6)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for t in lp:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5, t
    try:
        chat(logprobs=True, top_logprobs=21)
        raise AssertionError("top_logprobs 21 accepted")
    except openai.BadRequestError:
        pass


@check
def tool_choice_required_whole_and_streamed():
    r = chat(tools=[WEATHER, NOW], tool_choice="required", max_tokens=400, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.tool_calls and len(c.message.tool_calls) == 1
    no_markup(c.message.content)
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id
    if call.function.name == "get_weather":
        valid_weather(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) == {}
    content, _, calls, finish, _, _ = stream_chat(tools=[WEATHER, NOW], tool_choice="required", max_tokens=400, parallel_tool_calls=False)
    no_markup(content)
    assert finish == {0: "tool_calls"}
    assert calls == [{"name": call.function.name, "arguments": call.function.arguments}], (calls, call)


@check
def named_tool_with_braces_in_arguments():
    for stream in (False, True):
        kw = dict(tools=[WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=400)
        if stream:
            content, _, calls, finish, _, _ = stream_chat(**kw)
        else:
            c = chat(**kw).choices[0]
            content, finish = c.message.content, {0: c.finish_reason}
            calls = [{"name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls]
        no_markup(content)
        assert finish == {0: "tool_calls"}, finish
        assert [x["name"] for x in calls] == ["get_weather"]
        a = valid_weather(calls[0]["arguments"])
        assert "{" in calls[0]["arguments"][1:], "the nested object's braces are in the arguments"
        assert isinstance(a["options"], dict)


@check
def parameterless_named_tool():
    content, _, calls, finish, _, _ = stream_chat(tools=[WEATHER, NOW], tool_choice={"type": "function", "function": {"name": "now"}}, max_tokens=40)
    no_markup(content)
    assert calls == [{"name": "now", "arguments": "{}"}], calls
    assert finish == {0: "tool_calls"}


@check
def tool_call_after_thinking():
    kw = dict(tools=[WEATHER, NOW], tool_choice="required", max_tokens=400, parallel_tool_calls=False,
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = chat(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    extra = c.message.model_extra or {}
    assert "reasoning_content" in extra and "reasoning" in extra, extra
    no_markup(c.message.content)
    no_markup(extra["reasoning_content"])
    content, reasoning, calls, finish, _, _ = stream_chat(**kw)
    no_markup(content)
    assert reasoning == extra["reasoning_content"], (reasoning, extra)
    assert [x["name"] for x in calls] == [t.function.name for t in c.message.tool_calls]
    assert finish == {0: "tool_calls"}


@check
def tool_history_roundtrip():
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Eden", "days": 1, "options": {"unit": "c", "hourly": False}})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]
    r = chat(messages=msgs, tools=[WEATHER], tool_choice="auto", max_tokens=16)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = chat(messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=16)
    assert not r.choices[0].message.tool_calls


def tokenize(body):
    req = urllib.request.Request(CFG["base"] + "/tokenize", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + CFG["key"]})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


@check
def tool_choice_none_keeps_the_tools_in_the_prompt():
    # OpenAI / vLLM semantics: the model is told about the tools but calls none.
    plain = chat(max_tokens=1).usage.prompt_tokens
    auto = chat(tools=[WEATHER, NOW], tool_choice="auto", max_tokens=1).usage.prompt_tokens
    r = chat(tools=[WEATHER, NOW], tool_choice="none", max_tokens=40, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.usage.prompt_tokens == auto > plain, (r.usage.prompt_tokens, auto, plain)
    assert r.usage.prompt_tokens == tokenize({"messages": USER, "tools": [WEATHER, NOW]})["count"]
    assert not c.message.tool_calls and c.finish_reason == "length", c
    content, _, calls, finish, usage, _ = stream_chat(tools=[WEATHER, NOW], tool_choice="none", max_tokens=40,
                                                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    assert not calls and finish == {0: "length"}, (calls, finish)
    assert content == (c.message.content or "") and usage.prompt_tokens == auto


@check
def response_format_json():
    # Free-form objects: this small model may ramble inside a string until max_tokens; what
    # it writes is still JSON so far, and a finished answer parses.
    r = chat(response_format={"type": "json_object"}, max_tokens=300)
    text = r.choices[0].message.content
    assert text.startswith("{"), text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"], "additionalProperties": False}
    for stream in (False, True):
        kw = dict(response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}, max_tokens=200)
        content = stream_chat(**kw)[0] if stream else chat(**kw).choices[0].message.content
        v = json.loads(content)
        assert set(v) == {"name", "age"} and isinstance(v["name"], str) and isinstance(v["age"], int), v


@check
def completions_equal_generate():
    g = CFG["generate"]
    r = client.completions.create(model=MODEL, prompt=g["prompt"], max_tokens=g["max_tokens"], temperature=0)
    assert r.choices[0].text == g["text"], (r.choices[0].text, g["text"])
    text, finish, usage = "", None, None
    for ch in client.completions.create(model=MODEL, prompt=g["prompt"], max_tokens=g["max_tokens"], temperature=0, stream=True, stream_options={"include_usage": True}):
        for c in ch.choices:
            text += c.text
            finish = c.finish_reason or finish
        usage = ch.usage or usage
    assert text == g["text"] and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    r = client.completions.create(model=MODEL, prompt=[g["prompt"], "In the beginning"], max_tokens=4, temperature=0, logprobs=2, echo=True)
    assert len(r.choices) == 2 and r.choices[0].text.startswith(g["prompt"])
    assert all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs)


def solo_and_streamed(i):
    """A greedy streamed answer for prompt i."""
    msgs = [{"role": "user", "content": f"Verse {i}: and the earth was"}]
    return stream_chat(messages=msgs, max_tokens=20 + i % 5, extra_body={"ignore_eos": True})


@check
def concurrent_streams_equal_solo_runs():
    solo = [solo_and_streamed(i) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(solo_and_streamed, range(32)))
    for i, (a, b) in enumerate(zip(solo, together)):
        assert a[0] == b[0], f"stream {i} differs: {a[0]!r} vs {b[0]!r}"
        assert b[3] == {0: "length"}


@check
def prefix_cache_second_turn():
    system = "You are the scribe of Genesis. " * 40
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Tell of the first day."}]
    a1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=16, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content}, {"role": "user", "content": "And the second?"}]
    a2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=16, temperature=0)
    cached = a2.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64, f"second turn reused only {cached} tokens"
    assert cached < a2.usage.prompt_tokens
    c2 = cold.chat.completions.create(model=MODEL, messages=turn2, max_tokens=16, temperature=0)
    assert c2.usage.prompt_tokens_details.cached_tokens == 0
    assert a2.choices[0].message.content == c2.choices[0].message.content


def metric(name):
    req = urllib.request.Request(CFG["base"] + "/metrics")
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


@check
def cancellation_frees_the_row():
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert metric("zaya_requests_running") >= 0
    stream.close()
    deadline = time.time() + 10
    while metric("zaya_requests_running") != 0:
        assert time.time() < deadline, "the cancelled request still runs"
        time.sleep(0.05)
    tokens = metric("zaya_generation_tokens_total")
    time.sleep(0.3)
    assert metric("zaya_generation_tokens_total") == tokens, "tokens still generated after cancel"


@check
def errors_through_the_client():
    for fn, exc in [
        (lambda: chat(model="no-such-model"), openai.NotFoundError),
        (lambda: openai.OpenAI(base_url=CFG["base"] + "/v1", api_key="wrong", max_retries=0).chat.completions.create(model=MODEL, messages=USER), openai.AuthenticationError),
        (lambda: chat(messages=[{"role": "user", "content": "x " * 5000}]), openai.BadRequestError),
        (lambda: chat(temperature=5), openai.BadRequestError),
        (lambda: chat(messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError),
        (lambda: chat(tool_choice="required"), openai.BadRequestError),
        (lambda: chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}), openai.BadRequestError),
    ]:
        try:
            fn()
            raise AssertionError(f"no {exc.__name__}")
        except exc as e:
            assert e.body and "message" in e.body, e.body
    assert chat(max_tokens=2).choices[0].finish_reason in ("stop", "length"), "still serving"


failed = 0
only = sys.argv[2:]
for fn in CHECKS:
    if only and fn.__name__ not in only:
        continue
    t = time.time()
    try:
        fn()
        print(f"ok    {fn.__name__} ({time.time() - t:.1f} s)", flush=True)
    except Exception:
        failed += 1
        print(f"FAIL  {fn.__name__}\n{traceback.format_exc()}", flush=True)
sys.exit(1 if failed else 0)
