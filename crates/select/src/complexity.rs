//! How demanding a query is: a cheap, explainable analysis of its text.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::task::Task;

/// How much model quality a query needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Complexity {
    /// Greetings, look-ups, one-line answers (`low`).
    Low,
    /// One task of some substance: explain, summarise, a short function (`medium`).
    Medium,
    /// Several steps, comparison, analysis, design, long or many inputs (`high`).
    High,
}

named_enum!(Complexity, "complexity", {
    Low => "low",
    Medium => "medium" | "med",
    High => "high",
});

/// What [`analyze`] counted in a query.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Features {
    /// Estimated tokens of the text: ASCII characters / 4 (rounded up) plus one per
    /// non-ASCII, non-space character (a Hangul syllable is about one token). Images
    /// are not included: their vision tokens depend on the model.
    pub tokens: u64,
    /// Whitespace-separated words.
    pub words: usize,
    /// Images attached.
    pub images: usize,
    /// Fenced code blocks (```` ``` ```` pairs; an unclosed fence counts).
    pub code_blocks: usize,
    /// Questions: `?` and `？` marks, plus sentences ending in a Korean question
    /// ending (`까`, `나요`, `가요`, `니`, `냐`, `어때`, ...) without a mark.
    pub questions: usize,
    /// List items and enumerated parts: `1.`, `2)`, `-`, `*`, `•` items, and commas
    /// or semicolons separating the parts of a request (capped in the score).
    pub parts: usize,
    /// Task words found outside code blocks, as written (`analysis`, `분석해` is
    /// reported as the stem `분석`), one per keyword: deep ones (analyze/analyse,
    /// compare, design, evaluate, `분석`, `비교`, `설계`, `평가`, ...) and plain ones
    /// (explain, summarize, write, function, `설명`, `요약`, `코드`, ...).
    pub task_words: Vec<String>,
    /// How many of [`task_words`](Self::task_words) are deep.
    pub deep_words: usize,
}

/// The result of [`analyze`]: the level, the score it came from, the inferred
/// [`Task`] and the features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComplexityReport {
    /// The level.
    pub level: Complexity,
    /// The score, 0 to 1 (see [`Analyzer`] for the formula).
    pub score: f32,
    /// The task the words point to.
    pub task: Task,
    /// What was counted.
    pub features: Features,
}

/// Scores a query's complexity. The score, clamped to 0..=1, is a sum of terms:
///
/// | term | value |
/// | --- | --- |
/// | deep task words (analyze, compare, design, 분석, 비교, 설계, ...) | 0.20 each, at most 0.45 |
/// | plain task words (explain, summarize, write, function, 설명, 요약, ...) | 0.10 each, at most 0.25 |
/// | length | 0.25 x min(1, tokens / 400) |
/// | questions beyond the first | 0.05 each, at most 0.15 |
/// | parts (list items, commas, semicolons) | 0.025 each, at most 0.15 |
/// | code blocks | 0.10 each, at most 0.20 |
/// | images | 0.08 each, at most 0.24 |
///
/// Words inside code blocks are not searched for task words. The level is
/// [`Complexity::High`] from [`Analyzer::high_at`] (default 0.40),
/// [`Complexity::Medium`] from [`Analyzer::medium_at`] (default 0.10), and
/// [`Complexity::Low`] below. The task is [`Task::Code`] when a code word or block is
/// present, else [`Task::Analysis`] for a deep word, else [`Task::Summary`] for a
/// summary word, else [`Task::Chat`].
///
/// On the committed labelled set (`tests/fixtures/complexity_labels.jsonl`, 67
/// English and Korean queries labelled by hand) the defaults agree with the labels on
/// most but not all queries; the test prints the figure and the confusion matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Analyzer {
    medium_at: f32,
    high_at: f32,
}

/// The default score from which a query is [`Complexity::Medium`].
pub const DEFAULT_MEDIUM_AT: f32 = 0.10;
/// The default score from which a query is [`Complexity::High`].
pub const DEFAULT_HIGH_AT: f32 = 0.40;

impl Default for Analyzer {
    fn default() -> Self {
        Self {
            medium_at: DEFAULT_MEDIUM_AT,
            high_at: DEFAULT_HIGH_AT,
        }
    }
}

impl Analyzer {
    /// An analyzer with its own thresholds: `0 < medium_at < high_at <= 1`.
    pub fn new(medium_at: f32, high_at: f32) -> Result<Self> {
        if !(medium_at.is_finite() && medium_at > 0.0 && medium_at < high_at) {
            return Err(Error::InvalidSetting {
                setting: "medium_at",
                value: medium_at.to_string(),
                reason: "must be more than 0 and less than high_at",
            });
        }
        if !(high_at.is_finite() && high_at <= 1.0) {
            return Err(Error::InvalidSetting {
                setting: "high_at",
                value: high_at.to_string(),
                reason: "must be at most 1",
            });
        }
        Ok(Self { medium_at, high_at })
    }

    /// The score from which a query is [`Complexity::Medium`].
    pub fn medium_at(&self) -> f32 {
        self.medium_at
    }

    /// The score from which a query is [`Complexity::High`].
    pub fn high_at(&self) -> f32 {
        self.high_at
    }

    /// Analyzes `text` sent with `images` images.
    pub fn analyze(&self, text: &str, images: usize) -> ComplexityReport {
        let (features, task) = features(text, images);
        let score = score(&features);
        let level = if score >= self.high_at {
            Complexity::High
        } else if score >= self.medium_at {
            Complexity::Medium
        } else {
            Complexity::Low
        };
        ComplexityReport {
            level,
            score,
            task,
            features,
        }
    }
}

/// Analyzes `text` sent with `images` images with the default [`Analyzer`].
///
/// ```
/// use afo_select::{analyze, Complexity, Task};
///
/// assert_eq!(analyze("Who wrote Hamlet?", 0).level, Complexity::Low);
/// let r = analyze("두 설계안을 비교 분석하고 장단점을 평가해 줘.", 0);
/// assert_eq!(r.level, Complexity::High);
/// assert_eq!(r.task, Task::Analysis);
/// assert!(r.features.task_words.contains(&"분석".to_string()));
/// ```
pub fn analyze(text: &str, images: usize) -> ComplexityReport {
    Analyzer::default().analyze(text, images)
}

fn score(f: &Features) -> f32 {
    let deep = f.deep_words as f32;
    let plain = (f.task_words.len() - f.deep_words) as f32;
    let terms = [
        (0.20 * deep).min(0.45),
        (0.10 * plain).min(0.25),
        0.25 * (f.tokens as f32 / 400.0).min(1.0),
        (0.05 * f.questions.saturating_sub(1) as f32).min(0.15),
        (0.025 * f.parts as f32).min(0.15),
        (0.10 * f.code_blocks as f32).min(0.20),
        (0.08 * f.images as f32).min(0.24),
    ];
    terms.iter().sum::<f32>().clamp(0.0, 1.0)
}

fn infer_task(found: &[(String, Kind)], code_blocks: usize) -> Task {
    let has = |kind: Kind| found.iter().any(|(_, k)| *k == kind);
    if code_blocks > 0 || has(Kind::Code) {
        Task::Code
    } else if has(Kind::Deep) {
        Task::Analysis
    } else if has(Kind::Summary) {
        Task::Summary
    } else {
        Task::Chat
    }
}

fn features(text: &str, images: usize) -> (Features, Task) {
    // Even segments between ``` fences are prose, odd ones code.
    let segments: Vec<&str> = text.split("```").collect();
    let code_blocks = segments.len() / 2;
    let prose: String = segments
        .iter()
        .step_by(2)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    let ascii = text.chars().filter(char::is_ascii).count() as u64;
    let other = text
        .chars()
        .filter(|c| !c.is_ascii() && !c.is_whitespace())
        .count() as u64;
    let found = task_words(&prose);
    let task = infer_task(&found, code_blocks);
    let features = Features {
        tokens: ascii.div_ceil(4) + other,
        words: text.split_whitespace().count(),
        images,
        code_blocks,
        questions: questions(&prose),
        parts: parts(&prose),
        deep_words: found.iter().filter(|(_, k)| *k == Kind::Deep).count(),
        task_words: found.into_iter().map(|(w, _)| w).collect(),
    };
    (features, task)
}

const KO_QUESTION_ENDINGS: &[&str] = &[
    "까",
    "나요",
    "가요",
    "니",
    "냐",
    "어때",
    "뭐야",
    "어디야",
    "인가",
];

fn questions(prose: &str) -> usize {
    let marks = prose.chars().filter(|&c| c == '?' || c == '？').count();
    let unmarked = prose
        .split(['.', '!', '\n', '。', '！'])
        .map(|s| s.trim_end_matches(|c: char| c.is_whitespace() || "\"')".contains(c)))
        .filter(|s| !s.ends_with(['?', '？']))
        .filter(|s| KO_QUESTION_ENDINGS.iter().any(|e| s.ends_with(e)))
        .count();
    marks + unmarked
}

fn parts(prose: &str) -> usize {
    let separators = prose.chars().filter(|c| ",;，、".contains(*c)).count();
    let items = prose
        .lines()
        .flat_map(|line| line.split_whitespace().enumerate())
        .filter(|&(i, w)| {
            // `2)` anywhere, `2.` or a bullet at the start of a line.
            let number = w
                .strip_suffix(')')
                .or_else(|| w.strip_suffix('.').filter(|_| i == 0));
            let numbered = number.is_some_and(|n| {
                (1..=2).contains(&n.len()) && n.chars().all(|c| c.is_ascii_digit())
            });
            numbered || (i == 0 && matches!(w, "-" | "*" | "•"))
        })
        .count();
    separators + items
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Deep,
    Explain,
    Summary,
    Code,
}

#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// A word starting with this (lowercase ASCII).
    Prefix(&'static str),
    /// This word exactly.
    Word(&'static str),
    /// This text anywhere, words separated by single spaces (phrases, Korean stems).
    Text(&'static str),
}

struct Keyword {
    kind: Kind,
    patterns: &'static [Pattern],
}

const fn kw(kind: Kind, patterns: &'static [Pattern]) -> Keyword {
    Keyword { kind, patterns }
}

use Kind::{Code, Deep, Explain, Summary};
use Pattern::{Prefix, Text, Word};

/// The task words. Korean stems match anywhere (particles and endings attach to
/// them: `분석해`, `비교를`).
const KEYWORDS: &[Keyword] = &[
    kw(Deep, &[Prefix("analy"), Text("분석")]),
    kw(Deep, &[Prefix("compar"), Text("비교")]),
    kw(Deep, &[Prefix("contrast"), Text("대조")]),
    kw(Deep, &[Prefix("evaluat"), Text("평가")]),
    kw(Deep, &[Prefix("assess"), Text("검토")]),
    kw(Deep, &[Prefix("design"), Text("설계")]),
    kw(Deep, &[Prefix("architect"), Text("아키텍처")]),
    kw(Deep, &[Prefix("critiqu"), Text("비판")]),
    kw(Deep, &[Prefix("optimi"), Text("최적화")]),
    kw(Deep, &[Prefix("justif"), Text("정당화")]),
    kw(Deep, &[Word("prove"), Word("proof"), Text("증명")]),
    kw(Deep, &[Prefix("deriv"), Text("유도")]),
    kw(Deep, &[Prefix("investigat"), Text("조사")]),
    kw(Deep, &[Prefix("diagnos"), Text("진단")]),
    kw(Deep, &[Prefix("implication"), Text("영향")]),
    kw(
        Deep,
        &[
            Text("trade-off"),
            Text("trade off"),
            Prefix("tradeoff"),
            Text("트레이드오프"),
        ],
    ),
    kw(Deep, &[Text("pros and cons"), Text("장단점")]),
    kw(Deep, &[Prefix("strateg"), Text("전략")]),
    kw(Deep, &[Text("root cause"), Text("근본 원인")]),
    kw(
        Explain,
        &[Prefix("explain"), Prefix("explanation"), Text("설명")],
    ),
    kw(
        Explain,
        &[Prefix("describ"), Prefix("description"), Text("묘사")],
    ),
    kw(Explain, &[Prefix("differen"), Text("차이")]),
    kw(Explain, &[Word("why"), Text("왜"), Text("이유")]),
    kw(Explain, &[Text("how does"), Text("how do"), Text("원리")]),
    kw(Explain, &[Prefix("outline"), Text("개요")]),
    kw(Explain, &[Prefix("recommend"), Text("추천"), Text("제안")]),
    kw(
        Explain,
        &[
            Word("write"),
            Word("draft"),
            Text("작성"),
            Text("써 줘"),
            Text("써줘"),
        ],
    ),
    kw(Summary, &[Prefix("summar"), Word("tldr"), Text("요약")]),
    kw(Summary, &[Text("key points"), Text("핵심"), Text("정리")]),
    kw(Code, &[Word("code"), Word("coding"), Text("코드")]),
    kw(Code, &[Word("function"), Word("functions"), Text("함수")]),
    kw(Code, &[Prefix("implement"), Text("구현")]),
    kw(
        Code,
        &[
            Prefix("debug"),
            Word("bug"),
            Word("bugs"),
            Text("버그"),
            Text("디버그"),
        ],
    ),
    kw(
        Code,
        &[Prefix("refactor"), Text("리팩터"), Text("리팩토링")],
    ),
    kw(Code, &[Prefix("algorithm"), Text("알고리즘")]),
    kw(Code, &[Word("sql"), Word("regex"), Text("쿼리")]),
    kw(Code, &[Text("unit test"), Text("테스트 코드")]),
];

/// The task words in `prose`, each keyword once, as written (the first form found:
/// `analysis`, `분석`), with their kind.
fn task_words(prose: &str) -> Vec<(String, Kind)> {
    let lower = prose.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '-'))
        .filter(|w| !w.is_empty())
        .collect();
    let spaced = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    KEYWORDS
        .iter()
        .filter_map(|k| {
            k.patterns
                .iter()
                .find_map(|p| match *p {
                    Prefix(p) => words
                        .iter()
                        .find(|w| w.starts_with(p))
                        .map(|w| (*w).to_owned()),
                    Word(x) => words.contains(&x).then(|| x.to_owned()),
                    Text(t) => spaced.contains(t).then(|| t.to_owned()),
                })
                .map(|w| (w, k.kind))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_features() {
        let f = analyze(
            "Explain this? And why?\n```rust\nfn main() { analyze(); }\n```\n- one\n- two",
            2,
        )
        .features;
        assert_eq!(f.code_blocks, 1);
        assert_eq!(f.questions, 2);
        assert_eq!(f.images, 2);
        assert_eq!(f.parts, 2);
        // `analyze` inside the code block is not a task word.
        assert_eq!(f.task_words, ["explain", "why"]);
        assert_eq!(f.deep_words, 0);
        assert!(f.tokens > 10);
    }

    #[test]
    fn korean_questions_and_words() {
        let f = analyze("이 코드가 왜 느린지 알려줄 수 있나요. 원인을 분석해 줘", 0).features;
        assert_eq!(f.questions, 1);
        assert!(f.task_words.contains(&"분석".to_owned()));
        assert!(f.task_words.contains(&"코드".to_owned()));
        assert_eq!(f.tokens, 22 + 3);
    }

    #[test]
    fn levels_and_tasks() {
        assert_eq!(analyze("hello", 0).level, Complexity::Low);
        assert_eq!(analyze("hello", 0).task, Task::Chat);
        let m = analyze("Summarize this paragraph for me.", 0);
        assert_eq!((m.level, m.task), (Complexity::Medium, Task::Summary));
        let h = analyze(
            "Compare these designs, evaluate their trade-offs and recommend one.",
            0,
        );
        assert_eq!((h.level, h.task), (Complexity::High, Task::Analysis));
        let c = analyze("Fix this:\n```\nx = 1\n```", 0);
        assert_eq!(c.task, Task::Code);
        assert!(analyze("", 0).score == 0.0);
    }

    #[test]
    fn score_is_bounded_and_monotone_in_images() {
        let long = "analyze compare design evaluate why explain ? ".repeat(500);
        let r = analyze(&long, 50);
        assert!(r.score <= 1.0 && r.level == Complexity::High);
        assert!(analyze("describe", 1).score > analyze("describe", 0).score);
    }

    #[test]
    fn thresholds_are_checked() {
        assert!(Analyzer::new(0.5, 0.4).is_err());
        assert!(Analyzer::new(0.0, 0.4).is_err());
        assert!(Analyzer::new(0.1, 1.5).is_err());
        let strict = Analyzer::new(0.5, 0.9).unwrap();
        assert_eq!(strict.analyze("Explain TCP.", 0).level, Complexity::Low);
    }

    #[test]
    fn names() {
        assert_eq!("HIGH".parse::<Complexity>().unwrap(), Complexity::High);
        assert_eq!(Complexity::Medium.to_string(), "medium");
        assert!("extreme".parse::<Complexity>().is_err());
        assert!(Complexity::Low < Complexity::High);
    }
}
