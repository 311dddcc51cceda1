//! Usage and budgets: agents report what they spent (`usage` in their output: tokens,
//! cost); a run may carry a budget, and a run whose stages together spend past it stops
//! with a reason that says what was spent of what was allowed.

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// What a run may spend. At least one limit is set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl Budget {
    pub fn new(tokens: Option<u64>, cost_usd: Option<f64>) -> Result<Self, ValidationError> {
        if tokens.is_none() && cost_usd.is_none() {
            return Err(ValidationError::new("budget", "set `tokens`, `cost_usd` or both"));
        }
        if tokens == Some(0) {
            return Err(ValidationError::new("budget.tokens", "must be at least 1"));
        }
        // Stored and documented as a signed 64-bit integer.
        if tokens.is_some_and(|t| i64::try_from(t).is_err()) {
            return Err(ValidationError::new(
                "budget.tokens",
                format!("must be at most {}", i64::MAX),
            ));
        }
        if cost_usd.is_some_and(|c| !c.is_finite() || c <= 0.0) {
            return Err(ValidationError::new("budget.cost_usd", "must be a positive number"));
        }
        Ok(Self { tokens, cost_usd })
    }

    /// Why `spent` is over this budget, if it is.
    pub fn exceeded_by(&self, spent: &Usage) -> Option<String> {
        if let Some(limit) = self.tokens
            && spent.tokens > limit
        {
            return Some(format!(
                "budget exceeded: {} tokens used of {limit} allowed",
                spent.tokens
            ));
        }
        if let Some(limit) = self.cost_usd
            && spent.cost_usd > limit
        {
            return Some(format!(
                "budget exceeded: ${:.4} spent of ${limit:.4} allowed",
                spent.cost_usd
            ));
        }
        None
    }
}

/// What stages spent, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub tokens: u64,
    pub cost_usd: f64,
}

impl Usage {
    /// The `usage` an agent reported in its output: `tokens` (or `input_tokens` +
    /// `output_tokens`, or OpenAI's `total_tokens`) and `cost_usd`. Zero if none.
    pub fn reported_in(output: &serde_json::Value) -> Self {
        let Some(usage) = output.get("usage") else { return Self::default() };
        let number = |key: &str| usage.get(key).and_then(serde_json::Value::as_u64);
        let tokens = number("tokens")
            .or_else(|| number("total_tokens"))
            .or_else(|| Some(number("input_tokens")? + number("output_tokens").unwrap_or(0)))
            .unwrap_or(0);
        let cost_usd = usage
            .get("cost_usd")
            .and_then(serde_json::Value::as_f64)
            .filter(|c| c.is_finite() && *c >= 0.0)
            .unwrap_or(0.0);
        Self { tokens, cost_usd }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            tokens: self.tokens.saturating_add(other.tokens),
            cost_usd: self.cost_usd + other.cost_usd,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn usage_is_read_from_what_agents_report() {
        let command = Usage::reported_in(&json!({ "usage": { "tokens": 1234, "cost_usd": 0.02 } }));
        assert_eq!(command, Usage { tokens: 1234, cost_usd: 0.02 });
        let llm =
            Usage::reported_in(&json!({ "usage": { "input_tokens": 21, "output_tokens": 4 } }));
        assert_eq!(llm.tokens, 25);
        assert_eq!(Usage::reported_in(&json!({ "template": "x" })), Usage::default());
        assert_eq!(Usage::reported_in(&json!({ "usage": { "cost_usd": -1 } })).cost_usd, 0.0);
    }

    #[test]
    fn a_budget_says_what_was_spent_of_what_was_allowed() {
        let budget = Budget::new(Some(1000), Some(0.05)).unwrap();
        assert_eq!(budget.exceeded_by(&Usage { tokens: 1000, cost_usd: 0.05 }), None);
        assert_eq!(
            budget.exceeded_by(&Usage { tokens: 1001, cost_usd: 0.0 }).unwrap(),
            "budget exceeded: 1001 tokens used of 1000 allowed"
        );
        assert!(
            budget
                .exceeded_by(&Usage { tokens: 0, cost_usd: 0.06 })
                .unwrap()
                .contains("$0.0600 spent of $0.0500")
        );
        assert!(Budget::new(None, None).is_err());
        assert!(Budget::new(Some(0), None).is_err());
        assert!(Budget::new(None, Some(f64::NAN)).is_err());
        // Tokens are a signed 64-bit integer, as stored and documented.
        assert!(Budget::new(Some(i64::MAX.unsigned_abs()), None).is_ok());
        assert!(Budget::new(Some(i64::MAX.unsigned_abs() + 1), None).is_err());
    }
}
