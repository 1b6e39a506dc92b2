"""The agent-facing API through the official clients against a running `afo serve`:

- `openai`: 50 chat requests with a JSON schema (nested objects, enums, arrays,
  required fields), sampled with 50 seeds, four at a time, each validated with the
  `jsonschema` package; 50 forced tool calls (40 whole, 10 streamed) whose arguments
  validate against their tool's parameters; `logprobs`, `n=3` and `seed`;
  `responses.create` whole and streamed, with a function call;
- `anthropic`: `messages.create` whole and streamed, and a tool-use turn answered
  with a `tool_result`.

Prints one line per part with its counts and seconds; exits non-zero on the first
failure.

Usage: python agent.py BASE_URL API_KEY MODEL_ID   (BASE_URL ends in /v1)
"""

import concurrent.futures
import json
import sys
import time

import anthropic
import jsonschema
from openai import OpenAI

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "maxItems": 3,
        },
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "country": {"enum": ["France", "Italy", "Japan", "Peru"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "mood", "hobbies", "home"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 20}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


def say(part, start, detail):
    print(f"agent: {part}: {detail} ({time.monotonic() - start:.1f} s)", flush=True)


def json_schema(client, model):
    start = time.monotonic()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(seed):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Invent a person and describe them."}],
            response_format=fmt,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        text = r.choices[0].message.content
        doc = json.loads(text)
        jsonschema.validate(doc, PERSON)
        assert r.choices[0].finish_reason == "stop", (seed, r.choices[0].finish_reason, text)
        return doc

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        docs = list(pool.map(one, range(50)))
    distinct = len({json.dumps(d, sort_keys=True) for d in docs})
    assert distinct > 10, f"only {distinct} distinct documents from 50 seeds"
    say("response_format json_schema", start, f"50/50 parse and validate, {distinct} distinct")


def check_calls(calls):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id, c
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def tools(client, model):
    start = time.monotonic()
    questions = [
        "What is the weather in Paris?",
        "How warm is it in Lima right now?",
        "What time is it in Tokyo?",
        "Is it raining in Rome?",
        "Tell me the time in UTC.",
    ]
    n = 0
    for i, q in enumerate(questions * 8):
        choice = "required" if i % 2 == 0 else {"type": "function", "function": {"name": "get_weather"}}
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=1.0,
            seed=i,
            max_tokens=160,
        )
        assert r.choices[0].finish_reason == "tool_calls", r
        check_calls(r.choices[0].message.tool_calls)
        if isinstance(choice, dict):
            assert all(c.function.name == "get_weather" for c in r.choices[0].message.tool_calls)
        n += 1
    # Streamed: the calls arrive as deltas and add up to valid calls.
    for i, q in enumerate(questions * 2):
        calls = {}
        finish = None
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=100 + i,
            max_tokens=160,
            stream=True,
        ):
            if not chunk.choices:
                continue
            for d in chunk.choices[0].delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = c["id"] or d.id
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls", finish
        assert calls, "no streamed calls"
        for c in calls.values():
            assert c["id"], c
            jsonschema.validate(json.loads(c["arguments"]), PARAMS[c["name"]])
        n += 1
    # The result goes back as a `tool` message and the model answers in text.
    r = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "18 degrees, sunny"},
        ],
        tools=TOOLS,
        temperature=0,
        max_tokens=32,
    )
    assert r.choices[0].message.content or r.choices[0].message.tool_calls, r
    say("tools", start, f"{n} forced calls valid (40 whole, 10 streamed), tool result answered")


def sampling(client, model):
    start = time.monotonic()
    msgs = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
               for t in content), content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    a = client.chat.completions.create(model=model, messages=msgs, n=3, seed=11, temperature=1.0, max_tokens=16)
    b = client.chat.completions.create(model=model, messages=msgs, n=3, seed=11, temperature=1.0, max_tokens=16)
    assert [c.index for c in a.choices] == [0, 1, 2], a
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices], "the same seed, the same text"
    say("sampling", start, "logprobs agree with greedy choice, n=3 gives 3 choices, seed repeats")


def responses(client, model):
    start = time.monotonic()
    r = client.responses.create(model=model, input="Say hello.", instructions="Be brief.",
                                max_output_tokens=16, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text, r
    text = ""
    kinds = []
    for event in client.responses.create(model=model, input="Say hello.", instructions="Be brief.",
                                         max_output_tokens=16, temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    assert text == r.output_text, (text, r.output_text)
    tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
              "parameters": WEATHER}]
    r = client.responses.create(model=model, input="Weather in Paris?", tools=tools, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=160, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1, r.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # The call and its output go back as input items.
    r2 = client.responses.create(model=model, tools=tools, max_output_tokens=24, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees, sunny"},
    ])
    assert r2.status in ("completed", "incomplete"), r2
    say("responses", start, f"whole and streamed text agree ({len(kinds)} events), function call round trip")


def messages(base_url, api_key, model):
    # The client (2.x) no longer takes `temperature` as an argument; the server still
    # reads it from the body, so greedy runs pass it through `extra_body`.
    start = time.monotonic()
    client = anthropic.Anthropic(base_url=base_url.removesuffix("/v1"), api_key=api_key, max_retries=0, timeout=120)
    m = client.messages.create(model=model, max_tokens=16, system="Be brief.", extra_body={"temperature": 0},
                               messages=[{"role": "user", "content": "Say hello."}])
    assert m.content and m.content[0].type == "text" and m.stop_reason in ("end_turn", "max_tokens"), m
    with client.messages.stream(model=model, max_tokens=16, system="Be brief.", extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Say hello."}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == m.content[0].text, (streamed, m.content[0].text)
    assert final.usage.output_tokens == m.usage.output_tokens
    tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    m = client.messages.create(model=model, max_tokens=160, extra_body={"temperature": 0}, tools=tools,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True}, messages=[ask])
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1, m
    jsonschema.validate(uses[0].input, WEATHER)
    with client.messages.stream(model=model, max_tokens=160, extra_body={"temperature": 0}, tools=tools,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                messages=[ask]) as stream:
        final = stream.get_final_message()
    streamed_uses = [b for b in final.content if b.type == "tool_use"]
    assert len(streamed_uses) == 1 and streamed_uses[0].input == uses[0].input, final
    answer = client.messages.create(model=model, max_tokens=24, extra_body={"temperature": 0}, tools=tools, messages=[
        ask,
        {"role": "assistant", "content": [b.model_dump() for b in m.content if b.type == "tool_use"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees"}]},
    ])
    assert answer.content, answer
    say("anthropic messages", start, "whole and streamed agree, tool_use turn and tool_result answered")


def main() -> None:
    base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    json_schema(client, model)
    tools(client, model)
    sampling(client, model)
    responses(client, model)
    messages(base_url, api_key, model)
    print("agent: ok")


if __name__ == "__main__":
    main()
