//! Which events a subscriber wants: a run, an environment, and kinds — exact wire names
//! (`run.succeeded`) or whole families (`stage`, also written `stage.` or `stage.*`). The
//! same filter serves the live event streams and webhook endpoints, so a kind list means
//! the same thing everywhere.

use crate::{EnvironmentId, Event, EventKind, RunId, ValidationError};

/// Kinds (or families) one filter may list, at most.
pub const MAX_FILTER_KINDS: usize = 32;

/// What a subscriber wants to see. Empty parts match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub run: Option<RunId>,
    pub environment: Option<EnvironmentId>,
    /// Exact kinds, or families ending in `.` (`stage.`), as [`EventFilter::parse_kinds`]
    /// returns them.
    pub kinds: Vec<String>,
}

impl EventFilter {
    /// A filter on kinds only.
    pub fn of_kinds(kinds: Vec<String>) -> Self {
        Self { run: None, environment: None, kinds }
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.run.is_none_or(|run| event.run_id == Some(run))
            && self.environment.is_none_or(|env| event.environment_id == Some(env))
            && self.matches_kind(event.kind.as_str())
    }

    /// Whether a kind's wire name passes the kind filter.
    pub fn matches_kind(&self, kind: &str) -> bool {
        self.kinds.is_empty()
            || self
                .kinds
                .iter()
                .any(|k| if k.ends_with('.') { kind.starts_with(k.as_str()) } else { kind == k })
    }

    /// Parses kinds and families: an exact kind stays as is, a family becomes `family.`.
    /// Blank entries are skipped; an unknown kind, or more than [`MAX_FILTER_KINDS`], is
    /// an error on the field `kinds`.
    pub fn parse_kinds<'a>(
        kinds: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>, ValidationError> {
        let known = EventKind::all_names();
        let mut parsed: Vec<String> = Vec::new();
        for kind in kinds.into_iter().map(str::trim).filter(|k| !k.is_empty()) {
            let family = kind.trim_end_matches(".*").trim_end_matches('.');
            let entry = if known.contains(&kind) {
                kind.to_owned()
            } else if known.iter().any(|k| k.split('.').next() == Some(family)) {
                format!("{family}.")
            } else {
                return Err(ValidationError::new(
                    "kinds",
                    format!(
                        "`{kind}` is not an event kind; kinds look like `run.succeeded`, families like `stage`"
                    ),
                ));
            };
            if !parsed.contains(&entry) {
                parsed.push(entry);
            }
            if parsed.len() > MAX_FILTER_KINDS {
                return Err(ValidationError::new(
                    "kinds",
                    format!("at most {MAX_FILTER_KINDS} kinds"),
                ));
            }
        }
        Ok(parsed)
    }

    /// Kinds as people write them: families without their trailing dot (`stage`).
    pub fn display_kinds(kinds: &[String]) -> Vec<String> {
        kinds.iter().map(|k| k.strip_suffix('.').unwrap_or(k).to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_families_parse_and_match() {
        let kinds =
            EventFilter::parse_kinds(["run.succeeded", " stage ", "service.*", ""]).unwrap();
        assert_eq!(kinds, ["run.succeeded", "stage.", "service."]);
        let filter = EventFilter::of_kinds(kinds.clone());
        assert!(filter.matches_kind("run.succeeded"));
        assert!(!filter.matches_kind("run.failed"));
        assert!(filter.matches_kind("stage.running"));
        assert!(filter.matches_kind("service.ready"));
        assert!(!filter.matches_kind("environment.running"));
        assert_eq!(EventFilter::display_kinds(&kinds), ["run.succeeded", "stage", "service"]);
        assert!(EventFilter::of_kinds(Vec::new()).matches_kind("anything.at_all"));
    }

    #[test]
    fn unknown_kinds_and_too_many_are_field_errors() {
        let err = EventFilter::parse_kinds(["run.exploded"]).unwrap_err();
        assert_eq!(err.field, "kinds");
        assert!(EventFilter::parse_kinds(["nothing"]).is_err());
        let many = EventKind::all_names();
        assert!(many.len() > MAX_FILTER_KINDS);
        assert!(EventFilter::parse_kinds(many).is_err());
        assert_eq!(EventFilter::parse_kinds(["stage", "stage."]).unwrap(), ["stage."]);
    }
}
