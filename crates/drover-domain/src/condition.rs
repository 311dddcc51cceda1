//! `when` conditions: whether a stage runs, decided from the results of stages it needs.
//!
//! A condition is one small expression, kept as the text the user wrote:
//!
//! ```text
//! validate.output.tests_passed            the field is truthy
//! !validate.output.changed                the field is falsy (absent, null, false, 0, "")
//! scaffold.output.template == "flask"     equal to a JSON literal
//! e2e.status != "skipped"                 a stage's status (succeeded or skipped)
//! ```
//!
//! It is parsed once (at config load), so a pipeline never carries one that cannot be
//! evaluated; evaluation is a pure function of the earlier stages' outcomes.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{StageName, StageStatus, ValidationError};

/// What a condition reads: a stage's status, or a field of its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Operand {
    Status(StageName),
    /// The stage and the path inside its output (empty = the whole output).
    Output(StageName, Vec<String>),
}

impl Operand {
    pub(crate) fn stage(&self) -> &StageName {
        match self {
            Self::Status(stage) | Self::Output(stage, _) => stage,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Truthy,
    Falsy,
    Equals,
    NotEquals,
}

/// A parsed `when` expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Condition {
    text: String,
    operand: Operand,
    test: Test,
    value: Value,
}

/// What a condition can see of an earlier stage.
#[derive(Debug, Clone, Copy)]
pub struct StageOutcome<'a> {
    pub status: StageStatus,
    pub output: Option<&'a Value>,
}

impl Condition {
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let invalid = |reason: String| ValidationError::new("when", reason);
        let trimmed = text.trim();
        let (left, test, literal) = if let Some((left, right)) = trimmed.split_once("!=") {
            (left, Test::NotEquals, Some(right))
        } else if let Some((left, right)) = trimmed.split_once("==") {
            (left, Test::Equals, Some(right))
        } else if let Some(rest) = trimmed.strip_prefix('!') {
            (rest, Test::Falsy, None)
        } else {
            (trimmed, Test::Truthy, None)
        };
        let value = match literal {
            None => Value::Null,
            Some(literal) => serde_json::from_str(literal.trim()).map_err(|_| {
                invalid(format!(
                    "`{}` in `{trimmed}` is not a JSON literal (write strings in double quotes: \"text\")",
                    literal.trim()
                ))
            })?,
        };
        let operand = parse_operand(left.trim()).map_err(|reason| {
            invalid(format!(
                "`{trimmed}`: {reason}; expected STAGE.status or STAGE.output[.FIELD...], \
                 optionally `== VALUE` or `!= VALUE`, or prefixed with `!`"
            ))
        })?;
        if let (Operand::Status(_), Test::Equals | Test::NotEquals) = (&operand, test)
            && !matches!(value.as_str(), Some("succeeded" | "skipped"))
        {
            return Err(invalid(format!(
                "`{trimmed}`: a stage a condition reads has either succeeded or been skipped; \
                 compare its status with \"succeeded\" or \"skipped\""
            )));
        }
        Ok(Self { text: trimmed.to_owned(), operand, test, value })
    }

    /// The stage whose result this condition reads.
    pub fn stage(&self) -> &StageName {
        self.operand.stage()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the condition holds, given the outcome of the stage it reads (`None` when
    /// that stage has no outcome, which reads as null).
    pub fn holds(&self, outcome: Option<StageOutcome<'_>>) -> bool {
        let read = match &self.operand {
            Operand::Status(_) => outcome.map(|o| Value::from(o.status.as_str())),
            Operand::Output(_, path) => outcome
                .and_then(|o| o.output)
                .and_then(|output| path.iter().try_fold(output, |value, key| value.get(key)))
                .cloned(),
        }
        .unwrap_or(Value::Null);
        match self.test {
            Test::Truthy => truthy(&read),
            Test::Falsy => !truthy(&read),
            Test::Equals => read == self.value,
            Test::NotEquals => read != self.value,
        }
    }
}

fn parse_operand(text: &str) -> Result<Operand, String> {
    let mut parts = text.split('.');
    let stage = parts.next().unwrap_or_default();
    let stage = StageName::parse(stage).map_err(|err| format!("stage name: {}", err.message))?;
    match parts.next() {
        Some("status") if parts.clone().next().is_none() => Ok(Operand::Status(stage)),
        Some("output") => {
            let path: Vec<String> = parts.map(str::to_owned).collect();
            if path.iter().any(String::is_empty) {
                return Err("empty field name".to_owned());
            }
            Ok(Operand::Output(stage, path))
        }
        Some(other) => Err(format!("`{other}` is neither `status` nor `output`")),
        None => Err("missing `.status` or `.output`".to_owned()),
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

impl TryFrom<String> for Condition {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Condition> for String {
    fn from(value: Condition) -> Self {
        value.text
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn succeeded(output: &Value) -> Option<StageOutcome<'_>> {
        Some(StageOutcome { status: StageStatus::Succeeded, output: Some(output) })
    }

    #[test]
    fn truthy_and_falsy_fields() {
        let output = json!({ "changed": true, "count": 0, "nested": { "ok": "yes" } });
        assert!(Condition::parse("validate.output.changed").unwrap().holds(succeeded(&output)));
        assert!(Condition::parse("!validate.output.count").unwrap().holds(succeeded(&output)));
        assert!(Condition::parse("validate.output.nested.ok").unwrap().holds(succeeded(&output)));
        assert!(!Condition::parse("validate.output.missing").unwrap().holds(succeeded(&output)));
        assert!(!Condition::parse("validate.output.changed").unwrap().holds(None));
    }

    #[test]
    fn comparisons_with_json_literals() {
        let output = json!({ "template": "flask", "n": 3 });
        let holds = |text: &str| Condition::parse(text).unwrap().holds(succeeded(&output));
        assert!(holds(r#"scaffold.output.template == "flask""#));
        assert!(!holds(r#"scaffold.output.template != "flask""#));
        assert!(holds("scaffold.output.n == 3"));
        assert!(holds(r#"scaffold.status == "succeeded""#));
        let skipped = Some(StageOutcome { status: StageStatus::Skipped, output: None });
        assert!(Condition::parse(r#"e2e.status != "succeeded""#).unwrap().holds(skipped));
    }

    #[test]
    fn malformed_conditions_say_what_is_expected() {
        for bad in ["", "validate", "validate.result", "Validate.output", "a.output == flask"] {
            let err = Condition::parse(bad).unwrap_err();
            assert_eq!(err.field, "when", "{bad}");
            assert!(!err.message.is_empty());
        }
        let err = Condition::parse(r#"a.status == "running""#).unwrap_err();
        assert!(err.message.contains("succeeded"), "{}", err.message);
    }

    #[test]
    fn round_trips_as_its_text() {
        let condition = Condition::parse(" a.output.x == 1 ").unwrap();
        let json = serde_json::to_string(&condition).unwrap();
        assert_eq!(json, r#""a.output.x == 1""#);
        assert_eq!(serde_json::from_str::<Condition>(&json).unwrap(), condition);
    }
}
