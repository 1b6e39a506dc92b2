//! Streaming detokenization and stop strings, on the real SmolLM2 tokenizer.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use afo_engine::{StopMatcher, StreamDecoder, Tokenizer};

use common::smollm2_tokenizer as smollm2;

/// GPT-2's byte-to-character table: the vocabulary stores byte `b` as this char.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap()
}

/// One token per byte of `text`: the worst case for a streaming decoder.
fn byte_tokens(tok: &Tokenizer, text: &str) -> Vec<u32> {
    text.bytes()
        .map(|b| tok.token_to_id(&byte_char(b).to_string()).unwrap())
        .collect()
}

fn stream(dec: &mut StreamDecoder<'_>, ids: &[u32]) -> Vec<String> {
    let mut deltas: Vec<String> = ids.iter().map(|&id| dec.step(id).unwrap()).collect();
    deltas.push(dec.finish().unwrap());
    deltas
}

#[test]
fn emoji_split_over_byte_tokens_is_never_cut() {
    let tok = smollm2();
    let text = "ok 😀 and 👍🏽, 한국어!";
    let ids = byte_tokens(&tok, text);
    assert_eq!(ids.len(), text.len());
    let mut dec = StreamDecoder::new(&tok, false);
    let deltas = stream(&mut dec, &ids);
    for d in &deltas {
        assert!(!d.contains(char::REPLACEMENT_CHARACTER), "{deltas:?}");
    }
    assert_eq!(deltas.concat(), text);
    // Nothing shows while the four bytes of 😀 arrive.
    let start = "ok ".len();
    assert!(
        deltas[start..start + 3].iter().all(String::is_empty),
        "{deltas:?}"
    );
}

#[test]
fn skin_tone_and_zwj_sequences_stay_whole() {
    let tok = smollm2();
    for cluster in ["👍🏽", "👨‍👩‍👧", "🇫🇷", "한"] {
        let text = format!("a{cluster}b");
        let ids = byte_tokens(&tok, &text);
        let mut dec = StreamDecoder::new(&tok, false);
        let deltas = stream(&mut dec, &ids);
        assert_eq!(deltas.concat(), text);
        // The cluster comes out in one delta.
        assert!(
            deltas.iter().any(|d| d.contains(cluster)),
            "{cluster}: {deltas:?}"
        );
    }
}

#[test]
fn ordinary_text_streams_token_by_token() {
    let tok = smollm2();
    let text = "The capital of France is Paris. 12345 done.";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = StreamDecoder::new(&tok, false);
    let deltas = stream(&mut dec, &ids);
    assert_eq!(deltas.concat(), text);
    // ASCII is not held back: every token produces its text immediately.
    assert!(
        deltas[..ids.len()].iter().all(|d| !d.is_empty()),
        "{deltas:?}"
    );
}

#[test]
fn long_korean_and_gpl_round_trip_through_the_stream() {
    let tok = smollm2();
    let gpl = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let korean = "대한민국의 수도는 서울입니다. 오늘 날씨가 좋네요! ".repeat(20);
    for text in [korean.as_str(), &gpl] {
        let ids = tok.encode(text, false).unwrap();
        let mut dec = StreamDecoder::new(&tok, false);
        let deltas = stream(&mut dec, &ids);
        assert_eq!(deltas.concat(), text);
    }
}

#[test]
fn continuation_after_a_prompt_and_special_tokens() {
    let tok = smollm2();
    let prompt = tok.encode("<|im_start|>assistant\n", false).unwrap();
    let answer = tok.encode("Paris is nice.<|im_end|>", false).unwrap();
    let mut dec = StreamDecoder::with_prompt(&tok, &prompt, true);
    assert_eq!(stream(&mut dec, &answer).concat(), "Paris is nice.");
    let mut dec = StreamDecoder::with_prompt(&tok, &prompt, false);
    assert_eq!(
        stream(&mut dec, &answer).concat(),
        "Paris is nice.<|im_end|>"
    );
}

#[test]
fn stop_string_spanning_three_tokens() {
    let tok = smollm2();
    let stop = "<END>";
    assert!(tok.encode(stop, false).unwrap().len() >= 3);
    let text = "Answer: 42<END> and this must not appear";
    let ids = tok.encode(text, false).unwrap();
    let mut dec = StreamDecoder::new(&tok, false);
    let mut stops = StopMatcher::new(["\n\nUser:", stop]).unwrap();
    let mut out = String::new();
    let mut matched = None;
    for &id in &ids {
        let step = stops.push(&dec.step(id).unwrap());
        out.push_str(&step.text);
        if let Some(i) = step.stop {
            matched = Some(i);
            break;
        }
    }
    assert_eq!(matched, Some(1));
    assert_eq!(out, "Answer: 42");
    assert_eq!(stops.stopped(), Some(1));
    // After the stop nothing more comes out.
    assert_eq!(stops.push(" more").text, "");
}

#[test]
fn stop_matcher_holds_back_possible_prefixes() {
    let mut m = StopMatcher::new(["STOP"]).unwrap();
    let a = m.push("abc ST");
    assert_eq!((a.text.as_str(), a.stop), ("abc ", None));
    let b = m.push("O");
    assert_eq!((b.text.as_str(), b.stop), ("", None));
    // Not a stop after all: the held text is released.
    let c = m.push("RY S");
    assert_eq!((c.text.as_str(), c.stop), ("STORY ", None));
    let d = m.push("TOP!");
    assert_eq!((d.text.as_str(), d.stop), ("", Some(0)));

    let mut m = StopMatcher::new(["ab", "b"]).unwrap();
    let s = m.push("xab");
    assert_eq!((s.text.as_str(), s.stop), ("x", Some(0)));

    let mut m = StopMatcher::new(["안녕히"]).unwrap();
    assert_eq!(m.push("좋아요 안녕").text, "좋아요 ");
    assert_eq!(m.finish(), "안녕");

    let mut none = StopMatcher::new(Vec::<String>::new()).unwrap();
    assert_eq!(none.push("anything").text, "anything");
    assert!(StopMatcher::new(["ok", ""]).is_err());
}
