//! The token budget and temperature of a run.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::task::Task;

/// How many tokens a task gets by default, growing with the input:
/// `min(max, base + ceil(input_tokens x per_input_token))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskBudget {
    /// Tokens for an empty input (at least 1).
    pub base: u64,
    /// Tokens added per input token (0 or more).
    pub per_input_token: f32,
    /// The most tokens, however long the input (at least `base`).
    pub max: u64,
}

impl TaskBudget {
    /// The default for an input of `input_tokens`.
    pub fn tokens_for(&self, input_tokens: u64) -> u64 {
        let extra = (input_tokens as f64 * f64::from(self.per_input_token)).ceil();
        // A float to integer `as` saturates; the input is finite and not negative.
        let extra = extra as u64;
        self.base.saturating_add(extra).min(self.max)
    }

    fn check(&self, task: Task) -> Result<()> {
        let bad = |value: String, reason| Error::InvalidSetting {
            setting: "task_budget",
            value: format!("{task}: {value}"),
            reason,
        };
        if self.base == 0 {
            return Err(bad(
                format!("base {}", self.base),
                "base must be at least 1",
            ));
        }
        if self.max < self.base {
            return Err(bad(
                format!("max {}", self.max),
                "max must be at least base",
            ));
        }
        if !(self.per_input_token.is_finite() && self.per_input_token >= 0.0) {
            return Err(bad(
                format!("per_input_token {}", self.per_input_token),
                "per_input_token must be 0 or more",
            ));
        }
        Ok(())
    }
}

/// Which limit set [`Budget::max_tokens`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BudgetBound {
    /// The task's default budget (`task_default`).
    TaskDefault,
    /// The context left after the input (`context_left`).
    ContextLeft,
    /// The KV cache's memory headroom (`kv_headroom`).
    KvHeadroom,
    /// The caller's explicit `max_tokens` (`caller_override`).
    CallerOverride,
}

named_enum!(BudgetBound, "budget bound", {
    TaskDefault => "task_default",
    ContextLeft => "context_left",
    KvHeadroom => "kv_headroom",
    CallerOverride => "caller_override",
});

/// What one run's budget depends on: `BudgetRequest::new(...)` and the setters.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BudgetRequest {
    /// The task.
    pub task: Task,
    /// Input tokens (prompt and vision tokens).
    pub input_tokens: u64,
    /// The model's context length.
    pub context_length: u64,
    /// Bytes the KV cache may take for this run, prompt and output together, and the
    /// KV bytes one token takes (`layers x 2 x kv_heads x head_dim x dtype bytes`);
    /// none for no memory limit.
    pub kv_headroom: Option<(u64, u64)>,
    /// The caller's `max_tokens`: wins over the task default, not over the context or
    /// the memory.
    pub max_tokens: Option<u64>,
    /// The caller's temperature: always wins.
    pub temperature: Option<f32>,
}

impl BudgetRequest {
    /// A request for `task` with `input_tokens` of input on a model of
    /// `context_length`, no memory limit and no caller override.
    pub fn new(task: Task, input_tokens: u64, context_length: u64) -> Self {
        Self {
            task,
            input_tokens,
            context_length,
            kv_headroom: None,
            max_tokens: None,
            temperature: None,
        }
    }

    /// The KV headroom: `bytes` for the whole sequence, `bytes_per_token` each.
    pub fn kv_headroom(mut self, bytes: u64, bytes_per_token: u64) -> Self {
        self.kv_headroom = Some((bytes, bytes_per_token));
        self
    }

    /// The caller's `max_tokens`.
    pub fn max_tokens(mut self, max_tokens: u64) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// The caller's temperature.
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }
}

/// A run's budget: what the runtime passes to generation and records.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Tokens to generate at most: at least 1, at most the context left and the KV
    /// room.
    pub max_tokens: u64,
    /// Sampling temperature.
    pub temperature: f32,
    /// Which limit set `max_tokens`.
    pub bound: BudgetBound,
    /// The task.
    pub task: Task,
    /// The budget asked for before the hard limits: the caller's or the task's.
    pub wanted: u64,
    /// Context tokens left after the input.
    pub context_left: u64,
    /// Output tokens the KV headroom holds, when bounded.
    pub kv_room: Option<u64>,
    /// Whether the temperature is the caller's.
    pub temperature_from_caller: bool,
}

/// The token budget and temperature policy.
///
/// `max_tokens` is the task's default ([`TaskBudget::tokens_for`] the input) or the
/// caller's value, cut to the hard limits: the context left (`context_length -
/// input_tokens`) and the KV room (`headroom_bytes / kv_bytes_per_token -
/// input_tokens`). [`Budget::bound`] says which of the four set it. With no room at
/// all, [`Error::NoTokenRoom`].
///
/// Defaults (tokens: base + per input token, at most; temperature):
///
/// | task | base | per input token | max | temperature |
/// | --- | --- | --- | --- | --- |
/// | chat | 256 | 0.5 | 1024 | 0.7 |
/// | summary | 128 | 0.25 | 1024 | 0.3 |
/// | analysis | 768 | 0.5 | 2048 | 0.2 |
/// | code | 1024 | 1.0 | 4096 | 0.2 |
///
/// A summary grows with the text it summarises; analysis and code need room to
/// reason and to repeat code. Analysis, summary and code sample with a low
/// temperature to stay faithful; chat a moderate one. The caller's temperature always
/// wins.
///
/// ```
/// use afo_select::{BudgetBound, BudgetRequest, Task, TokenBudget};
///
/// let policy = TokenBudget::default();
/// let b = policy.plan(&BudgetRequest::new(Task::Summary, 2000, 8192))?;
/// assert_eq!((b.max_tokens, b.bound), (628, BudgetBound::TaskDefault));
/// let b = policy.plan(&BudgetRequest::new(Task::Code, 8000, 8192))?;
/// assert_eq!((b.max_tokens, b.bound), (192, BudgetBound::ContextLeft));
/// let b = policy.plan(&BudgetRequest::new(Task::Chat, 10, 8192).temperature(1.1))?;
/// assert_eq!(b.temperature, 1.1);
/// # Ok::<(), afo_select::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenBudget {
    chat: (TaskBudget, f32),
    summary: (TaskBudget, f32),
    analysis: (TaskBudget, f32),
    code: (TaskBudget, f32),
}

impl Default for TokenBudget {
    fn default() -> Self {
        let tb = |base, per_input_token, max| TaskBudget {
            base,
            per_input_token,
            max,
        };
        Self {
            chat: (tb(256, 0.5, 1024), 0.7),
            summary: (tb(128, 0.25, 1024), 0.3),
            analysis: (tb(768, 0.5, 2048), 0.2),
            code: (tb(1024, 1.0, 4096), 0.2),
        }
    }
}

impl TokenBudget {
    /// A builder starting from the defaults.
    pub fn builder() -> TokenBudgetBuilder {
        TokenBudgetBuilder::default()
    }

    fn entry(&self, task: Task) -> (TaskBudget, f32) {
        match task {
            Task::Chat => self.chat,
            Task::Summary => self.summary,
            Task::Analysis => self.analysis,
            Task::Code => self.code,
        }
    }

    /// The budget rule for `task`.
    pub fn task_budget(&self, task: Task) -> TaskBudget {
        self.entry(task).0
    }

    /// The default temperature for `task`.
    pub fn temperature(&self, task: Task) -> f32 {
        self.entry(task).1
    }

    /// The budget for one run.
    pub fn plan(&self, req: &BudgetRequest) -> Result<Budget> {
        let context_left = req.context_length.saturating_sub(req.input_tokens);
        let kv_room = match req.kv_headroom {
            None => None,
            Some((_, 0)) => {
                return Err(Error::InvalidSetting {
                    setting: "kv_bytes_per_token",
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
            Some((bytes, per_token)) => Some((bytes / per_token).saturating_sub(req.input_tokens)),
        };
        let room = kv_room.map_or(context_left, |kv| kv.min(context_left));
        if room == 0 {
            return Err(Error::NoTokenRoom {
                input_tokens: req.input_tokens,
                context_length: req.context_length,
                kv_tokens: req.kv_headroom.map(|(bytes, per)| bytes / per),
            });
        }
        let (wanted, source) = match req.max_tokens {
            Some(0) => {
                return Err(Error::InvalidSetting {
                    setting: "max_tokens",
                    value: "0".into(),
                    reason: "must be at least 1",
                });
            }
            Some(n) => (n, BudgetBound::CallerOverride),
            None => (
                self.task_budget(req.task).tokens_for(req.input_tokens),
                BudgetBound::TaskDefault,
            ),
        };
        let bound = if wanted <= room {
            source
        } else if kv_room.is_some_and(|kv| kv < context_left) {
            BudgetBound::KvHeadroom
        } else {
            BudgetBound::ContextLeft
        };
        let temperature = match req.temperature {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(Error::InvalidSetting {
                    setting: "temperature",
                    value: t.to_string(),
                    reason: "must be 0 or more",
                });
            }
            Some(t) => t,
            None => self.temperature(req.task),
        };
        Ok(Budget {
            max_tokens: wanted.min(room),
            temperature,
            bound,
            task: req.task,
            wanted,
            context_left,
            kv_room,
            temperature_from_caller: req.temperature.is_some(),
        })
    }
}

/// Builds a [`TokenBudget`]; unset tasks keep their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TokenBudgetBuilder {
    policy: TokenBudget,
}

impl TokenBudgetBuilder {
    /// A builder with the defaults (see [`TokenBudget`]).
    pub fn new() -> Self {
        Self::default()
    }

    fn entry_mut(&mut self, task: Task) -> &mut (TaskBudget, f32) {
        match task {
            Task::Chat => &mut self.policy.chat,
            Task::Summary => &mut self.policy.summary,
            Task::Analysis => &mut self.policy.analysis,
            Task::Code => &mut self.policy.code,
        }
    }

    /// The budget rule for `task`.
    pub fn task(mut self, task: Task, budget: TaskBudget) -> Self {
        self.entry_mut(task).0 = budget;
        self
    }

    /// The default temperature for `task` (0 or more).
    pub fn temperature(mut self, task: Task, temperature: f32) -> Self {
        self.entry_mut(task).1 = temperature;
        self
    }

    /// The policy, or [`Error::InvalidSetting`] for a bad rule or temperature.
    pub fn build(self) -> Result<TokenBudget> {
        for &task in Task::ALL {
            let (budget, temperature) = self.policy.entry(task);
            budget.check(task)?;
            if !(temperature.is_finite() && temperature >= 0.0) {
                return Err(Error::InvalidSetting {
                    setting: "temperature",
                    value: format!("{task}: {temperature}"),
                    reason: "must be 0 or more",
                });
            }
        }
        Ok(self.policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_defaults_grow_with_input_and_stop_at_max() {
        let p = TokenBudget::default();
        assert_eq!(p.task_budget(Task::Chat).tokens_for(0), 256);
        assert_eq!(p.task_budget(Task::Chat).tokens_for(101), 307);
        assert_eq!(p.task_budget(Task::Summary).tokens_for(100_000), 1024);
        assert_eq!(p.task_budget(Task::Code).tokens_for(u64::MAX), 4096);
        assert!(p.temperature(Task::Analysis) <= 0.3 && p.temperature(Task::Summary) <= 0.3);
        assert_eq!(p.temperature(Task::Chat), 0.7);
    }

    #[test]
    fn bounds_are_named() {
        let p = TokenBudget::default();
        let kv = |bytes| BudgetRequest::new(Task::Analysis, 100, 4096).kv_headroom(bytes, 1000);
        let b = p.plan(&kv(10_000_000)).unwrap();
        assert_eq!((b.max_tokens, b.bound), (818, BudgetBound::TaskDefault));
        let b = p.plan(&kv(400_000)).unwrap();
        assert_eq!(
            (b.max_tokens, b.bound, b.kv_room),
            (300, BudgetBound::KvHeadroom, Some(300))
        );
        let b = p
            .plan(&BudgetRequest::new(Task::Chat, 100, 4096).max_tokens(50))
            .unwrap();
        assert_eq!((b.max_tokens, b.bound), (50, BudgetBound::CallerOverride));
        let b = p
            .plan(&BudgetRequest::new(Task::Chat, 4000, 4096).max_tokens(500))
            .unwrap();
        assert_eq!(
            (b.max_tokens, b.bound, b.wanted),
            (96, BudgetBound::ContextLeft, 500)
        );
    }

    #[test]
    fn no_room_and_bad_inputs_are_errors() {
        let p = TokenBudget::default();
        let err = p
            .plan(&BudgetRequest::new(Task::Chat, 4096, 4096))
            .unwrap_err();
        assert!(
            err.to_string().contains("no room for output tokens"),
            "{err}"
        );
        let kv = BudgetRequest::new(Task::Chat, 100, 4096).kv_headroom(100_000, 1000);
        assert!(matches!(
            p.plan(&kv),
            Err(Error::NoTokenRoom {
                kv_tokens: Some(100),
                ..
            })
        ));
        let zero = BudgetRequest::new(Task::Chat, 1, 10).kv_headroom(100, 0);
        assert!(p.plan(&zero).is_err());
        assert!(
            p.plan(&BudgetRequest::new(Task::Chat, 1, 10).max_tokens(0))
                .is_err()
        );
        assert!(
            p.plan(&BudgetRequest::new(Task::Chat, 1, 10).temperature(f32::NAN))
                .is_err()
        );
    }

    #[test]
    fn builder_checks_rules() {
        let rule = |base, per_input_token, max| TaskBudget {
            base,
            per_input_token,
            max,
        };
        assert!(
            TokenBudget::builder()
                .task(Task::Chat, rule(0, 0.0, 10))
                .build()
                .is_err()
        );
        assert!(
            TokenBudget::builder()
                .task(Task::Chat, rule(10, 0.0, 5))
                .build()
                .is_err()
        );
        assert!(
            TokenBudget::builder()
                .task(Task::Chat, rule(10, -1.0, 50))
                .build()
                .is_err()
        );
        assert!(
            TokenBudget::builder()
                .temperature(Task::Code, -0.1)
                .build()
                .is_err()
        );
        let p = TokenBudget::builder()
            .task(Task::Chat, rule(64, 0.0, 64))
            .temperature(Task::Chat, 0.5)
            .build()
            .unwrap();
        let b = p.plan(&BudgetRequest::new(Task::Chat, 10, 1000)).unwrap();
        assert_eq!((b.max_tokens, b.temperature), (64, 0.5));
    }
}
