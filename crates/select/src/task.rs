//! What a query asks the model to do.

/// The kind of work a query asks for. It sets the default token budget and
/// temperature ([`TokenBudget`](crate::TokenBudget)) and which per-task score of a
/// card counts ([`ModelCard::score_for`](crate::ModelCard::score_for)).
///
/// [`analyze`](crate::analyze) infers it from the query's task words; a caller may
/// always override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum Task {
    /// Conversation and short answers (`chat`).
    #[default]
    Chat,
    /// Summarising a given text (`summary`, alias `summarize`).
    Summary,
    /// Analysis, comparison, evaluation, design (`analysis`, alias `analyze`).
    Analysis,
    /// Writing, fixing or reviewing code (`code`).
    Code,
}

named_enum!(Task, "task", {
    Chat => "chat",
    Summary => "summary" | "summarize" | "summarise",
    Analysis => "analysis" | "analyze" | "analyse",
    Code => "code",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &t in Task::ALL {
            assert_eq!(t.to_string().parse::<Task>().unwrap(), t);
        }
        assert_eq!(" Analyse ".parse::<Task>().unwrap(), Task::Analysis);
        let err = "poetry".parse::<Task>().unwrap_err().to_string();
        assert!(err.contains("`poetry`") && err.contains("chat, summary, analysis, code"));
    }

    #[test]
    fn serde_as_names() {
        assert_eq!(serde_json::to_string(&Task::Code).unwrap(), "\"code\"");
        let t: Task = serde_json::from_str("\"Summarize\"").unwrap();
        assert_eq!(t, Task::Summary);
    }
}
