//! A Q8_0 KV cache on the real SmolLM2 model: reserved and reported in its own bytes,
//! and a run that fits under a cutline an f32 cache does not; the default (f16) at
//! half of f32's bytes. The cutline is tight and
//! the runtime's own share is the process's resident memory when it is built, so this
//! test has a process of its own (other tests' models would count against it).

#![allow(clippy::unwrap_used)]

mod common;

use afo_runtime::Runtime;
use afo_runtime::guard::ByteSize;

use common::capital_request as request;

#[test]
fn a_q8_0_kv_cache_is_reserved_and_reported_in_its_bytes() {
    use afo_runtime::kvcache::KvFormat;
    let with = |format: KvFormat, cutline: &str, max_tokens: usize| {
        let runtime = Runtime::builder()
            .cutline(cutline.parse::<ByteSize>().unwrap())
            .kv_format(format)
            .build()
            .unwrap();
        // Reserved for `max_tokens`, over at the first sentence.
        let mut req = request(max_tokens);
        req.options.stop = vec![".".into()];
        runtime.generate(&req)
    };
    let (f32_run, q8_run) = (
        with(KvFormat::F32, "8GiB", 24).unwrap(),
        with(KvFormat::Q8_0, "8GiB", 24).unwrap(),
    );
    assert!(q8_run.text.contains("Paris"), "{:?}", q8_run.text);
    // The same capacity, 34 bytes per 32 elements instead of 128.
    assert!(f32_run.kv_cache_bytes > 0);
    assert_eq!(q8_run.kv_cache_bytes * 128, f32_run.kv_cache_bytes * 34);
    // A runtime that is not told holds f16 keys and values: half of f32's bytes.
    let default_run = {
        let runtime = Runtime::builder()
            .cutline("8GiB".parse::<ByteSize>().unwrap())
            .build()
            .unwrap();
        let mut req = request(24);
        req.options.stop = vec![".".into()];
        runtime.generate(&req).unwrap()
    };
    assert!(default_run.text.contains("Paris"), "{:?}", default_run.text);
    assert_eq!(default_run.kv_cache_bytes * 2, f32_run.kv_cache_bytes);
    // The reservation counts the format's bytes: 30 layers x 2 x 3 heads x (256 - 68)
    // bytes less per position of the run (at least its 30 positions).
    let saved = 30 * 2 * 3 * (256 - 68) * 30;
    let (a, b) = (f32_run.admission.run_bytes, q8_run.admission.run_bytes);
    assert!(a >= b + saved, "{a} vs {b}");
    // A cutline that holds 8,000 positions of Q8_0 keys and values (98 MB) but not of
    // f32 (369 MB): the f32 run does not get its budget as asked, the Q8_0 run does.
    let cutline = "420MiB";
    let q8_long = with(KvFormat::Q8_0, cutline, 8000).unwrap();
    assert_eq!(q8_long.token_budget, 8000);
    assert!(q8_long.predicted_peak_bytes <= ByteSize::mib(420).0);
    match with(KvFormat::F32, cutline, 8000) {
        Ok(r) => assert!(
            r.token_budget < 8000,
            "f32 ran as asked: {}",
            r.token_budget
        ),
        Err(e) => assert!(e.to_string().contains("cutline"), "{e}"),
    }
}
