"""The official `openai` client's `embeddings.create` against a running `afo serve`:
a batch as floats and as base64 (the client's default, decoded by the client) agree,
vectors are unit length, token-id input and `dimensions` work, errors name the field.

Usage: python embeddings.py BASE_URL API_KEY MODEL_ID
"""

import base64
import math
import struct
import sys
import time

import openai
from openai import OpenAI


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def main() -> None:
    base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
    start = time.monotonic()
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue rose by three percent.",
    ]
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    b64 = client.embeddings.create(model=model, input=texts, encoding_format="base64")
    default = client.embeddings.create(model=model, input=texts)
    assert floats.object == "list" and floats.model == model, floats
    assert [d.index for d in floats.data] == [0, 1, 2], floats.data
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts)
    for f, b, d in zip(floats.data, b64.data, default.data):
        assert len(f.embedding) == 576, len(f.embedding)
        assert abs(math.sqrt(dot(f.embedding, f.embedding)) - 1) < 1e-4
        # The float JSON numbers are the f32 values; base64 carries them exactly
        # (asked for explicitly, the client hands the base64 text over as it is).
        raw = base64.b64decode(b.embedding) if isinstance(b.embedding, str) else None
        values = struct.unpack(f"<{len(raw) // 4}f", raw) if raw is not None else b.embedding
        assert max(abs(x - y) for x, y in zip(f.embedding, values)) < 1e-6
        assert max(abs(x - y) for x, y in zip(f.embedding, d.embedding)) < 1e-6
    e = [d.embedding for d in floats.data]
    print(
        f"embeddings: 3 x {len(e[0])}, cat~cat {dot(e[0], e[1]):.4f}, "
        f"cat~revenue {dot(e[0], e[2]):.4f}, usage={floats.usage}"
    )

    ids = client.embeddings.create(
        model=model, input=[[504, 3575, 282, 4649, 314]], dimensions=64,
        encoding_format="float", extra_body={"pooling": "mean"},
    )
    v = ids.data[0].embedding
    assert len(v) == 64 and abs(math.sqrt(dot(v, v)) - 1) < 1e-4, len(v)
    assert ids.usage.prompt_tokens == 5, ids.usage

    try:
        client.embeddings.create(model=model, input="x", dimensions=100000)
        raise AssertionError("dimensions past the hidden size were accepted")
    except openai.BadRequestError as err:
        assert err.body["param"] == "dimensions", err.body
    elapsed = time.monotonic() - start
    print(f"embeddings e2e: ok in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
