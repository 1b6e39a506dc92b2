//! Chat templates: Hugging Face Jinja templates rendered with minijinja.
//!
//! A model's template comes from the GGUF key `tokenizer.chat_template` or from
//! `tokenizer_config.json`'s `chat_template` (see
//! [`Tokenizer::chat_template`](crate::Tokenizer::chat_template)). The environment
//! matches what `transformers` gives templates: `trim_blocks` and `lstrip_blocks`,
//! loop controls, Python string and dict methods (`.strip()`, `.startswith()`,
//! `.items()`, through `minijinja-contrib`'s pycompat), `raise_exception(msg)`,
//! `strftime_now(format)` (UTC) and a `tojson` filter that writes JSON as Python's
//! `json.dumps` does (`", "` and `": "` separators, non-ASCII kept, optional `indent`).
//!
//! A model without a template gets [`CHATML_TEMPLATE`] ([`ChatTemplate::chatml`]).

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The fallback template for models that ship none: ChatML, as used by SmolLM2, Qwen
/// and many others.
///
/// Each message becomes `<|im_start|>{role}\n{content}<|im_end|>\n`; the generation
/// prompt is `<|im_start|>assistant\n`. No system message is added.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template; `bos_token` and `eos_token` are the texts the
    /// template sees under those names (empty when the model has none).
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] with the line of a syntax error.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        Self::named("default", source, bos_token, eos_token)
    }

    /// As [`ChatTemplate::new`], with a name that error messages use.
    ///
    /// # Errors
    /// As [`ChatTemplate::new`].
    pub fn named(
        name: impl Into<String>,
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let name = name.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(|source| Error::ChatTemplate {
                name: name.clone(),
                source,
            })?;
        Ok(Self {
            env,
            name,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The ChatML fallback ([`CHATML_TEMPLATE`]) for models with no template.
    ///
    /// # Errors
    /// Never in practice; the signature matches [`ChatTemplate::new`].
    pub fn chatml(bos_token: impl Into<String>, eos_token: impl Into<String>) -> Result<Self> {
        Self::named("chatml", CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// The model's template when it has one, else ChatML.
    ///
    /// # Errors
    /// As [`ChatTemplate::new`].
    pub fn from_tokenizer(tokenizer: &crate::Tokenizer) -> Result<Self> {
        let bos = tokenizer.bos_token().unwrap_or_default();
        let eos = tokenizer.eos_token().unwrap_or_default();
        match tokenizer.chat_template() {
            Some(source) => Self::new(source, bos, eos),
            None => Self::chatml(bos, eos),
        }
    }

    /// Renders a conversation; `add_generation_prompt` appends the opening of the
    /// assistant's turn.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] when the template raises (`raise_exception`) or fails.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, Value::UNDEFINED)
    }

    /// As [`ChatTemplate::render`], with extra variables (`tools`, `documents`, ...)
    /// given as a map, for example `minijinja::context! { tools => tools }` or
    /// `Value::from_serialize(&json)`.
    ///
    /// # Errors
    /// As [`ChatTemplate::render`].
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: Value,
    ) -> Result<String> {
        let err = |source| Error::ChatTemplate {
            name: self.name.clone(),
            source,
        };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(err)?;
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        // Earlier sources win a key: extra variables cannot replace the conversation.
        let ctx = context! { ..base, ..extra };
        template.render(ctx).map_err(err)
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The current UTC time formatted with Python `strftime` codes: `%Y %y %m %d %e %H %I
/// %M %S %p %B %b %A %a %j %%`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(format_utc(secs, &format))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats seconds since the Unix epoch (UTC) with `strftime` codes.
pub(crate) fn format_utc(secs: u64, format: &str) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    const CUM: [u64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let month_idx = usize::try_from(month - 1).unwrap_or(0).min(11);
    let day_of_year = CUM[month_idx] + day + u64::from(leap && month > 2);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = usize::try_from((days + 3) % 7).unwrap_or(0);
    let month_name = MONTHS[month_idx];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(month_name.get(..3).unwrap_or(month_name)),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(weekday_name.get(..3).unwrap_or(weekday_name)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Python-style JSON writing: `", "` between items and `": "` after keys.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `value | tojson` / `value | tojson(indent=2)`, as `json.dumps(ensure_ascii=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut buf = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PythonJson);
            value.serialize(&mut ser)
        }
    };
    result.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot write value as JSON")
            .with_source(e)
    })?;
    let text = String::from_utf8(buf).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "JSON is not UTF-8").with_source(e)
    })?;
    Ok(Value::from_safe_string(text))
}

#[cfg(test)]
mod tests {
    use super::format_utc;

    #[test]
    fn formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            format_utc(secs, "%Y-%m-%d %H:%M:%S %a %b %j %I%p"),
            "2024-02-29 13:05:09 Thu Feb 060 01PM"
        );
        assert_eq!(format_utc(0, "%d %B %Y %A"), "01 January 1970 Thursday");
        assert_eq!(format_utc(1_735_689_599, "%d %b %Y"), "31 Dec 2024");
    }
}
