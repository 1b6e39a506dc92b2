"""The afo Python package against the real SmolLM2 model and the tiny test VLM."""

import ast
import gc
import os
import pathlib
import signal
import threading
import time

import pytest

import afo
from conftest import records, wait_for_record

BADGES = {"SAFE", "WARN", "OVER_CUTLINE"}
HELLO = [{"role": "user", "content": "Say hello in five words."}]


def test_generate_returns_text_usage_memory_and_writes_its_record(model, log):
    rt = afo.Runtime(cutline="2GiB", ssot_log=log, replica_id="replica-7", node_id="node-a")
    r = rt.generate(model, messages=HELLO, max_tokens=24)

    assert r.text.strip()
    assert r.finish_reason in {"stop", "length"}
    u = r.usage
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["completion_tokens"] <= 24
    assert r.badge in BADGES
    assert r.peak_memory_bytes > 0 and r.predicted_peak_bytes > 0
    assert r.cutline_bytes == rt.cutline_bytes <= 2 << 30
    t = r.timings
    assert t["latency_ms"] > 0 and t["ttft_ms"] > 0 and t["acquire_ms"] > 0
    assert t["ttft_ms"] <= t["latency_ms"]
    assert r.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert r.admission["decision"] == "admitted"
    assert r.run_id in repr(r) and "GenerateResult(" in repr(r)

    (record,) = records(log)
    assert record["run_id"] == r.run_id
    assert record["status"] == "ok"
    assert record["tokens_out"] == u["completion_tokens"]
    assert record["tokens_in"] == u["prompt_tokens"]
    assert record["peak_memory_bytes"] == r.peak_memory_bytes
    assert record["status_badge"] == r.badge
    assert record["replica_id"] == "replica-7"
    assert record["node_id"] == "node-a"
    assert rt.replica_id == "replica-7" and rt.node_id == "node-a"


def test_greedy_generation_is_reproducible_and_prompt_text_works(model):
    rt = afo.Runtime()
    a = rt.generate(model, prompt="The capital of France is", max_tokens=12)
    b = rt.generate(model, "The capital of France is", max_tokens=12)
    assert a.text and a.text == b.text
    assert b.prefix_cache_hit_tokens >= 0 and b.cache_hit


def test_stop_string_ends_the_text(model):
    rt = afo.Runtime()
    full = rt.generate(model, prompt="1, 2, 3, 4, 5, 6,", max_tokens=16)
    assert " 9" in full.text, full.text
    cut = rt.generate(model, prompt="1, 2, 3, 4, 5, 6,", max_tokens=16, stop=" 9")
    assert cut.finish_reason == "stop"
    assert " 9" not in cut.text and full.text.startswith(cut.text)


def test_stream_deltas_join_to_the_result_text(model, log):
    rt = afo.Runtime(ssot_log=log)
    stream = rt.stream(model, messages=HELLO, max_tokens=24)
    assert stream.result is None
    deltas = list(stream)
    assert len(deltas) > 1
    r = stream.result
    assert isinstance(r, afo.GenerateResult)
    assert "".join(deltas) == r.text
    assert r.usage["completion_tokens"] >= len([d for d in deltas if d])
    assert [x["run_id"] for x in records(log)] == [r.run_id]
    # Exhausted: further next() calls stop at once.
    assert next(stream, None) is None


def test_closing_a_stream_cancels_the_run(model, log):
    rt = afo.Runtime(ssot_log=log)
    stream = rt.stream(model, prompt="Once upon a time", max_tokens=300, ignore_eos=True)
    got = []
    for delta in stream:
        got.append(delta)
        if len(got) == 3:
            break
    stream.close()
    r = stream.result
    assert r.finish_reason == "cancelled"
    assert 3 <= r.usage["completion_tokens"] < 300
    assert r.text.startswith("".join(got))
    (record,) = records(log)
    assert record["run_id"] == r.run_id and record["status"] == "ok"
    assert record["tokens_out"] == r.usage["completion_tokens"] < 300
    assert record["token_budget"] == 300


def test_breaking_out_and_dropping_a_stream_cancels_the_run(model, log):
    rt = afo.Runtime(ssot_log=log)
    started = time.monotonic()
    for i, _ in enumerate(rt.stream(model, prompt="Once upon a time", max_tokens=400, ignore_eos=True)):
        if i == 2:
            break
    gc.collect()
    (record,) = wait_for_record(log, 1)
    assert record["tokens_out"] < 400 and record["token_budget"] == 400
    # Cancelled long before 400 tokens could have been generated.
    assert time.monotonic() - started < record["latency_ms"] / 1e3 + 5
    # The model is free again: the runtime is usable and evicts it as idle.
    again = rt.generate(model, messages=HELLO, max_tokens=8)
    assert again.text and again.cache_hit
    assert rt.evict() == 1


def test_stream_as_context_manager_closes(model):
    rt = afo.Runtime()
    with rt.stream(model, prompt="Once upon a time", max_tokens=200, ignore_eos=True) as s:
        first = next(s)
    assert first
    assert s.result is not None and s.result.finish_reason == "cancelled"


def test_refused_run_raises_refused_error_with_the_numbers(model, log):
    rt = afo.Runtime(cutline="64MiB", ssot_log=log)
    assert rt.cutline_bytes == 64 << 20
    with pytest.raises(afo.RefusedError) as info:
        rt.generate(model, messages=HELLO, max_tokens=16)
    e = info.value
    assert isinstance(e, afo.AfoError) and isinstance(e, RuntimeError)
    assert e.cutline_bytes == 64 << 20
    assert e.needed_bytes > e.available_bytes
    assert e.needed_bytes > 0 and e.reserved_bytes > 0 and e.margin_bytes > 0
    assert e.tried and e.admission["decision"] == "refused"
    assert "cutline" in str(e)
    (record,) = records(log)
    assert record["status"] == "error" and "cutline" in record["error"]
    assert record["admission"]["decision"] == "refused"
    # A stream raises the same error on its first next().
    with pytest.raises(afo.RefusedError):
        next(iter(rt.stream(model, prompt="hi")))


def test_bad_arguments_raise_value_error(model):
    rt = afo.Runtime()
    with pytest.raises(ValueError, match="not both"):
        rt.generate(model, prompt="hi", messages=HELLO)
    with pytest.raises(ValueError, match="prompt or messages"):
        rt.generate(model)
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        rt.generate(model, messages=["hi"])
    with pytest.raises(ValueError, match="content"):
        rt.generate(model, messages=[{"role": "user"}])
    with pytest.raises(ValueError, match="temperature"):
        rt.generate(model, prompt="hi", temperature=-1.0)
    with pytest.raises(ValueError, match="scheme"):
        rt.generate(model, prompt="hi", scheme="q3_pretend")
    with pytest.raises(ValueError, match="cutline"):
        afo.Runtime(cutline="a lot")
    # The default cutline is 8 GiB (lower only under a smaller container limit);
    # an int is bytes.
    assert 0 < afo.Runtime().cutline_bytes <= 8 << 30
    assert afo.Runtime(cutline=300 << 20).cutline_bytes == 300 << 20
    with pytest.raises(ValueError, match="keep_alive"):
        afo.Runtime(keep_alive=-1.0)


def test_a_q8_0_kv_cache_reserves_less_and_answers(model):
    # The same greedy request with f32 and with Q8_0 keys and values: the run's
    # reservation counts the cache's format (45 KiB against 11.95 KiB per position),
    # and the text stays an answer.
    f32 = afo.Runtime(cutline="2GiB", kv_cache="f32")
    q8 = afo.Runtime(cutline="2GiB", kv_cache="q8_0")
    a = f32.generate(model, messages=HELLO, max_tokens=16)
    b = q8.generate(model, messages=HELLO, max_tokens=16)
    assert b.text.strip() and b.finish_reason in {"stop", "length"}
    assert 0 < b.admission["run_bytes"] < a.admission["run_bytes"]
    with pytest.raises(ValueError, match="kv_cache"):
        afo.Runtime(kv_cache="q3_pretend")


def test_missing_model_raises_model_error(tmp_path):
    rt = afo.Runtime()
    missing = tmp_path / "nope.gguf"
    with pytest.raises(afo.ModelError, match="nope.gguf"):
        rt.generate(missing, prompt="hi", max_tokens=4)


def test_chain_on_the_tiny_vlm(tmp_path, sample_jpeg, log):
    vlm = tmp_path / "tiny-vlm"
    afo.write_tiny_vlm(vlm)
    assert (vlm / "config.json").is_file()
    rt = afo.Runtime(ssot_log=log)
    r = rt.chain(vlm, [sample_jpeg, sample_jpeg.read_bytes()], "Describe the image.",
                 analysis_tokens=8, summary_tokens=8)
    assert isinstance(r, afo.ChainResult)
    assert [s["name"] for s in r.stages] == ["preprocess", "vision_encode", "image_analysis", "summary"]
    assert len(r.images) == 2
    assert r.images[0]["name"].endswith("sample.jpg") and r.images[1]["name"] == "image-1"
    assert all(i["image_tokens"] > 0 for i in r.images)
    assert r.image_pixels > 0 and r.original_pixels > 0
    assert r.shared_instance and r.vlm_id == r.llm_id
    assert r.analysis_tokens["generated"] <= 8 and r.analysis_tokens["prompt"] > 0
    assert r.peak_memory_bytes > 0 and r.badge in BADGES
    (record,) = records(log)
    assert record["run_id"] == r.run_id and record["chain"] == "image_summary"
    with pytest.raises(ValueError, match="list of paths or bytes"):
        rt.chain(vlm, str(sample_jpeg))
    with pytest.raises(FileNotFoundError, match="images\\[0\\]"):
        rt.chain(vlm, [tmp_path / "missing.jpg"])


def test_query_routes_over_the_catalog(model, tmp_path, log):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        f"""
min_score = 90.0

[[models]]
id = "smollm2-q4"
family = "smollm2-135m"
params = 134515008
quant = "q4_1"
trinity_score = 96.0
context_length = 8192
estimated_bytes = "200MB"
source = "{pathlib.Path(model).as_posix()}"
"""
    )
    rt = afo.Runtime(catalog=catalog, ssot_log=log)
    q = rt.query("What is 2 + 2?", max_tokens=12)
    assert q.model_id == "smollm2-q4"
    assert q.reason and q.fallback_from is None
    assert 0 < q.usage["completion_tokens"] <= q.max_tokens <= 12
    assert q.text == q.result.text
    (record,) = records(log)
    assert record["run_id"] == q.run_id
    assert record["selection"]["model_id"] == "smollm2-q4"
    with pytest.raises(afo.AfoError, match="catalog"):
        afo.Runtime().query("hello")


def test_health_preload_and_evict(model):
    rt = afo.Runtime(cutline="3GiB")
    h = rt.health()
    assert set(h) == {"badge", "health_score", "rss_bytes", "cutline_bytes", "ledger",
                      "loaded_models", "cache_hit_rate"}
    assert h["badge"] in BADGES and h["rss_bytes"] > 0
    assert h["cutline_bytes"] == rt.cutline_bytes
    assert h["loaded_models"] == []
    assert h["ledger"]["cutline"] == rt.cutline_bytes
    assert h["ledger"]["reserved"]["runtime"] > 0

    first = rt.preload(model)
    assert first["hit"] is False and first["acquire_ms"] > 0
    assert rt.preload(model)["hit"] is True
    (loaded,) = rt.health()["loaded_models"]
    assert loaded["key"].endswith(os.path.basename(model))
    assert loaded["bytes"] > 10 << 20 and not loaded["in_use"]
    assert rt.health()["ledger"]["reserved"]["weights"] >= loaded["bytes"]

    assert rt.evict() == 1
    assert rt.health()["loaded_models"] == []
    assert rt.evict() == 0


def test_the_gil_is_released_while_generating(model):
    rt = afo.Runtime()
    rt.preload(model)
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.005)

    t = threading.Thread(target=tick)
    t.start()
    try:
        start = time.monotonic()
        r = rt.generate(model, prompt="Once upon a time", max_tokens=32, ignore_eos=True)
        end = time.monotonic()
    finally:
        done.set()
        t.join()
    assert r.usage["completion_tokens"] == 32
    during = [x for x in ticks if start < x < end]
    # Held for the whole run, the GIL would have let the ticker run about once.
    assert len(during) > (end - start) / 0.005 / 4, (len(during), end - start)


def test_generations_run_side_by_side_from_threads(model):
    rt = afo.Runtime()
    results = {}

    def run(i):
        results[i] = rt.generate(model, prompt=f"Story {i}:", max_tokens=8, ignore_eos=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2]
    assert all(r.usage["completion_tokens"] == 8 for r in results.values())
    assert len({r.run_id for r in results.values()}) == 3


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as in an interactive Python, even when the
    test process inherited SIGINT ignored (started in the background by a shell)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_a_generation_and_raises_keyboard_interrupt(model, log, sigint_raises):
    rt = afo.Runtime(ssot_log=log)
    rt.preload(model)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            rt.generate(model, prompt="Once upon a time", max_tokens=4000, ignore_eos=True)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - start
    # Raised soon after the signal, not after 4000 tokens.
    assert elapsed < 4.0, elapsed
    # The cancelled run's record was written before the exception went on.
    (record,) = records(log)
    assert record["status"] == "ok"
    assert 0 < record["tokens_out"] < 4000 and record["token_budget"] == 4000
    # The runtime is usable afterwards and the model is no longer in use.
    assert rt.generate(model, messages=HELLO, max_tokens=4).text
    assert rt.evict() == 1


def test_ctrl_c_while_streaming(model, log, sigint_raises):
    rt = afo.Runtime(ssot_log=log)
    rt.preload(model)
    stream = rt.stream(model, prompt="Once upon a time", max_tokens=4000, ignore_eos=True)
    assert next(stream)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                pass
    finally:
        timer.cancel()
    # The interrupt lands while the stream waits for a delta (the run is cancelled
    # there) or in the loop's own code (close() cancels it): either way it ends.
    stream.close()
    assert time.monotonic() - start < 4.0
    assert stream.result.finish_reason == "cancelled"
    (record,) = records(log)
    assert record["run_id"] == stream.result.run_id
    assert record["tokens_out"] == stream.result.usage["completion_tokens"] < 4000
    assert next(stream, None) is None


def test_help_and_stubs_cover_the_api():
    public = [afo.Runtime, afo.Stream, afo.GenerateResult, afo.ChainResult, afo.QueryResult,
              afo.AfoError, afo.RefusedError, afo.ModelError, afo.write_tiny_vlm]
    for obj in public:
        assert obj.__doc__ and len(obj.__doc__) > 20, obj
    methods = ["generate", "stream", "chain", "query", "health", "preload", "evict"]
    for name in methods:
        assert getattr(afo.Runtime, name).__doc__, name
    assert "max_tokens=256" in afo.Runtime.generate.__text_signature__
    assert "cutline='8GiB'" in afo.Runtime.__text_signature__
    assert "kv_cache='f16'" in afo.Runtime.__text_signature__

    stubs = pathlib.Path(afo.__file__).with_name("__init__.pyi")
    assert pathlib.Path(afo.__file__).with_name("py.typed").is_file()
    tree = ast.parse(stubs.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for cls in [afo.Runtime, afo.Stream, afo.GenerateResult, afo.ChainResult, afo.QueryResult]:
        stubbed = {f.name for f in classes[cls.__name__].body if isinstance(f, ast.FunctionDef)}
        real = {n for n in dir(cls) if not n.startswith("_")}
        assert real <= stubbed, (cls.__name__, real - stubbed)
    assert set(afo.__all__) - {"__version__"} <= set(classes) | {
        n.name for n in tree.body if isinstance(n, ast.FunctionDef)
    }
