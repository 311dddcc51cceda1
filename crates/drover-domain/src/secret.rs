//! Project secrets as the rest of drover sees them: a name an agent reads as an environment
//! variable, and a value that must never be shown. Validation lives here so the API, the
//! CLI and the store refuse the same names and values, and [`SecretValues`] exists so a
//! map of decrypted values cannot be printed by accident (`{:?}` shows names only).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// The longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 128;
/// The largest secret value, in bytes.
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// The shortest secret value, in characters. Shorter values cannot be redacted from
/// output without blotting out ordinary text, so they are refused.
pub const MIN_SECRET_VALUE_CHARS: usize = 8;

/// Names drover sets itself for every process; a secret may not shadow them.
const RESERVED_NAMES: &[&str] = &["PATH", "HOME", "PWD", "SHELL", "USER"];
/// Prefix of the variables drover sets for agents (`DROVER_RUN_ID`, …).
const RESERVED_PREFIX: &str = "DROVER_";

/// A secret's name: what agents read it as, an environment variable name
/// (`[A-Z_][A-Z0-9_]*`, at most 128 characters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretName(String);

impl SecretName {
    pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        let invalid = |message: String| Err(ValidationError::new("name", message));
        let Some(first) = value.chars().next() else {
            return invalid("must not be empty".to_owned());
        };
        if value.len() > MAX_SECRET_NAME_LEN {
            return invalid(format!("must be at most {MAX_SECRET_NAME_LEN} characters"));
        }
        let valid_char = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
        if first.is_ascii_digit() || !value.chars().all(valid_char) {
            return invalid(format!(
                "`{value}` is not an environment variable name: use A-Z, 0-9 and `_`, not \
                 starting with a digit"
            ));
        }
        if value.starts_with(RESERVED_PREFIX) || RESERVED_NAMES.contains(&value.as_str()) {
            return invalid(format!("`{value}` is reserved for drover and the system"));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SecretName {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<SecretName> for String {
    fn from(value: SecretName) -> String {
        value.0
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a value before it is stored. The message never quotes the value.
pub fn validate_secret_value(value: &str) -> Result<(), ValidationError> {
    let invalid = |message: String| Err(ValidationError::new("value", message));
    if value.chars().count() < MIN_SECRET_VALUE_CHARS {
        return invalid(format!(
            "must be at least {MIN_SECRET_VALUE_CHARS} characters: shorter values cannot be \
             redacted from output safely"
        ));
    }
    if value.len() > MAX_SECRET_VALUE_BYTES {
        return invalid(format!("must be at most {MAX_SECRET_VALUE_BYTES} bytes"));
    }
    if value.contains('\0') {
        return invalid(
            "must not contain a NUL character (it could not be an environment variable)".to_owned(),
        );
    }
    if value.trim().chars().count() < MIN_SECRET_VALUE_CHARS {
        return invalid(format!(
            "must hold at least {MIN_SECRET_VALUE_CHARS} characters besides surrounding whitespace"
        ));
    }
    Ok(())
}

/// Decrypted secret values by name: what a task carries to its agent. Its `Debug` shows
/// names only, so logging a task never logs a value.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValues(BTreeMap<String, String>);

impl SecretValues {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Self(values)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Names and values, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value.as_str()))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.keys().map(|name| (name, "[redacted]"))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_environment_variable_names() {
        for good in ["MY_TOKEN", "_X", "A1", "GITHUB_TOKEN_2"] {
            assert!(SecretName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "my_token", "1ABC", "A-B", "A B", "É", "DROVER_TOKEN", "PATH"] {
            let err = SecretName::parse(bad).unwrap_err();
            assert_eq!(err.field, "name", "{bad}");
        }
        assert!(SecretName::parse("A".repeat(128)).is_ok());
        assert!(SecretName::parse("A".repeat(129)).is_err());
    }

    #[test]
    fn values_must_be_redactable_and_fit_an_environment_variable() {
        assert!(validate_secret_value("s3cr3t-value").is_ok());
        for bad in ["tiny", "       x", "with\0nul-character"] {
            let err = validate_secret_value(bad).unwrap_err();
            assert_eq!(err.field, "value");
            assert!(!err.message.contains(bad), "the message quotes the value: {err}");
        }
        assert!(validate_secret_value(&"x".repeat(MAX_SECRET_VALUE_BYTES)).is_ok());
        assert!(validate_secret_value(&"x".repeat(MAX_SECRET_VALUE_BYTES + 1)).is_err());
    }

    #[test]
    fn debug_output_shows_names_never_values() {
        let mut values = SecretValues::default();
        values.insert("MY_TOKEN", "tok-123456789");
        let shown = format!("{values:?}");
        assert!(shown.contains("MY_TOKEN") && !shown.contains("tok-123456789"), "{shown}");
        assert_eq!(serde_json::to_string(&values).unwrap(), r#"{"MY_TOKEN":"tok-123456789"}"#);
    }
}
