//! Log-probabilities on the wire: the engine's [`TokenLogprobs`] (token ids) as the
//! tokens' text and bytes, in OpenAI's chat shape (`logprobs.content[]`) and its
//! legacy completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`).
//!
//! The values are the log-softmax of the model's raw logits at each step (before the
//! temperature, penalties, logit bias and top-k / top-p filters), as vLLM reports by
//! default; see [`afo_runtime::engine::token_logprobs`].

use afo_runtime::engine::{TokenLogprobs, Tokenizer};
use serde_json::{Map, Value, json};

/// One token as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WireToken {
    /// The token's text (invalid UTF-8, a piece of a character, shows as U+FFFD).
    pub token: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenLogprob {
    /// The generated token.
    pub chosen: WireToken,
    /// The most likely tokens at its step, most likely first.
    pub top: Vec<WireToken>,
}

/// The bytes token `id` stands for: its decoded text, or, when that is not whole
/// characters, the byte-level BPE vocabulary entry mapped back to bytes.
fn token_bytes(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    let decoded = tokenizer.decode(&[id], false).unwrap_or_default();
    if !decoded.contains('\u{FFFD}') {
        return decoded.into_bytes();
    }
    tokenizer
        .id_to_token(id)
        .and_then(|piece| piece.chars().map(byte_level).collect::<Option<Vec<u8>>>())
        .unwrap_or_else(|| decoded.into_bytes())
}

/// GPT-2's byte-level alphabet, reversed: the byte a vocabulary character stands for.
fn byte_level(c: char) -> Option<u8> {
    let c = u32::from(c);
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if c <= 255 && printable(c) {
        return u8::try_from(c).ok();
    }
    // The other bytes, in order, were shifted to 256 and up.
    let k = c.checked_sub(256)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(usize::try_from(k).ok()?)
        .and_then(|b| u8::try_from(b).ok())
}

fn wire_token(tokenizer: &Tokenizer, id: u32, logprob: f32) -> WireToken {
    let bytes = token_bytes(tokenizer, id);
    WireToken {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
        logprob,
    }
}

/// The engine's log-probabilities of one token, with the tokens' text.
pub(crate) fn from_engine(tokenizer: &Tokenizer, t: &TokenLogprobs) -> TokenLogprob {
    TokenLogprob {
        chosen: wire_token(tokenizer, t.token, t.logprob),
        top: t
            .top
            .iter()
            .map(|&(id, lp)| wire_token(tokenizer, id, lp))
            .collect(),
    }
}

/// JSON has no infinity: a token the model gives no chance at all reports -9999, as
/// OpenAI does.
fn number(lp: f32) -> Value {
    if lp.is_finite() {
        json!(lp)
    } else {
        json!(-9999.0)
    }
}

/// The chat shape: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
pub(crate) fn chat(entries: &[TokenLogprob]) -> Value {
    let one =
        |t: &WireToken| json!({"token": t.token, "logprob": number(t.logprob), "bytes": t.bytes});
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = one(&e.chosen);
            v["top_logprobs"] = Value::Array(e.top.iter().map(one).collect());
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions shape; `offset` is the text offset (in characters) of the
/// first entry's token within the choice's text.
pub(crate) fn completion(entries: &[TokenLogprob], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    let mut at = offset;
    for e in entries {
        text_offset.push(at);
        at += e.chosen.token.chars().count();
    }
    let top: Vec<Value> = entries
        .iter()
        .map(|e| {
            let map: Map<String, Value> = e
                .top
                .iter()
                .map(|t| (t.token.clone(), number(t.logprob)))
                .collect();
            Value::Object(map)
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e.chosen.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| number(e.chosen.logprob)).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_round_trips() {
        // `Ġ` is the space, `Ċ` the newline; printable ASCII stands for itself.
        assert_eq!(byte_level('Ġ'), Some(b' '));
        assert_eq!(byte_level('Ċ'), Some(b'\n'));
        assert_eq!(byte_level('a'), Some(b'a'));
        assert_eq!(byte_level('\u{100}'), Some(0));
        let all: Vec<u8> = (0..=0x143u32)
            .filter_map(char::from_u32)
            .filter_map(byte_level)
            .collect();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "every byte once");
    }

    #[test]
    fn shapes() {
        let t = |s: &str, lp: f32| WireToken {
            token: s.into(),
            bytes: s.as_bytes().to_vec(),
            logprob: lp,
        };
        let entries = [
            TokenLogprob {
                chosen: t(" Pa", -0.5),
                top: vec![t(" Pa", -0.5), t(" Lyon", -2.0)],
            },
            TokenLogprob {
                chosen: t("ris", f32::NEG_INFINITY),
                top: vec![],
            },
        ];
        let c = chat(&entries);
        assert_eq!(c["content"][0]["token"], " Pa");
        assert_eq!(c["content"][0]["bytes"], json!([32, 80, 97]));
        assert_eq!(c["content"][0]["top_logprobs"][1]["token"], " Lyon");
        assert_eq!(c["content"][1]["logprob"], json!(-9999.0));
        let l = completion(&entries, 3);
        assert_eq!(l["tokens"], json!([" Pa", "ris"]));
        assert_eq!(l["text_offset"], json!([3, 6]));
        assert_eq!(l["top_logprobs"][0][" Lyon"], json!(-2.0));
    }
}
