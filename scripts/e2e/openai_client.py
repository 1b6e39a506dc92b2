"""The official `openai` client against a running `afo serve`: list models, a chat
completion, a streaming one, a legacy completion, and the errors it raises.

Usage: python openai_client.py BASE_URL API_KEY MODEL_ID
"""

import sys

import openai
from openai import OpenAI


def main() -> None:
    base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list()]
    assert model in ids and "auto" in ids, f"models: {ids}"
    print(f"models.list: {ids}")

    chat = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=24,
    )
    text = chat.choices[0].message.content
    assert chat.object == "chat.completion", chat
    assert text, chat
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert 1 <= chat.usage.completion_tokens <= 24
    assert chat.choices[0].finish_reason in ("stop", "length")
    print(f"chat: {text!r} usage={chat.usage}")

    stream = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, roles, finish, usage = [], [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(parts)
    assert roles == ["assistant"], roles
    assert streamed == text, f"streamed {streamed!r} != {text!r}"
    assert finish == chat.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
    print(f"chat stream: {len(parts)} deltas, {streamed!r}, usage={usage}")

    auto = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert auto.model == model, auto.model
    print(f"auto: routed to {auto.model}")

    legacy = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, temperature=0
    )
    assert legacy.choices[0].text.startswith(" Paris"), legacy
    print(f"completions: {legacy.choices[0].text!r}")

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
        raise AssertionError("an unknown model did not fail")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
        print(f"unknown model: {e.status_code} {e.code}")

    try:
        client.chat.completions.create(model=model, messages=[])
        raise AssertionError("empty messages did not fail")
    except openai.BadRequestError as e:
        print(f"empty messages: {e.status_code} {e.message}")

    bad = OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong API key was accepted")
    except openai.AuthenticationError as e:
        print(f"wrong key: {e.status_code}")

    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
