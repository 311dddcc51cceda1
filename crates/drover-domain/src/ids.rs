//! Identifiers, each its own type so a run id can never be passed where an attempt id is
//! expected, and each built by parsing so an invalid one cannot exist.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ValidationError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) id.
            #[allow(clippy::new_without_default)]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| ValidationError::new($what, format!("`{s}` is not a valid {} id", $what)))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// Identifies one run of a pipeline.
    RunId,
    "run"
);
uuid_id!(
    /// Identifies one attempt at one stage of a run.
    AttemptId,
    "attempt"
);
uuid_id!(
    /// Identifies one environment.
    EnvironmentId,
    "environment"
);
uuid_id!(
    /// Ties together everything caused by one request, across processes and the bus.
    CorrelationId,
    "correlation"
);
uuid_id!(
    /// Identifies one webhook endpoint of a project.
    WebhookId,
    "webhook"
);
uuid_id!(
    /// Identifies one chat session (`drover chat`).
    ChatSessionId,
    "chat session"
);
uuid_id!(
    /// Identifies one webhook delivery (its `webhook-id` header, the same on every attempt).
    DeliveryId,
    "delivery"
);

macro_rules! slug_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses a slug: 1 to 63 characters of `a-z`, `0-9`, `-` and `_`, starting with
            /// a letter or digit.
            pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                validate_slug(&value).map_err(|reason| ValidationError::new($what, reason))?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

slug_id!(
    /// The project a resource belongs to. Every run, attempt and event has one; local mode
    /// uses [`ProjectId::default_project`].
    ProjectId,
    "project"
);
slug_id!(
    /// The name of a stage inside a pipeline (`scaffold`, `validate`, ...).
    StageName,
    "stage"
);
slug_id!(
    /// The name of a pipeline (`sdlc`, ...).
    PipelineName,
    "pipeline"
);
slug_id!(
    /// The name of an environment, unique among a project's live environments.
    EnvName,
    "environment"
);
slug_id!(
    /// The name of a service (`web`, `db`, `mailpit`, ...).
    ServiceName,
    "service"
);
slug_id!(
    /// The kind of agent that executes a stage; workers subscribe by agent type.
    AgentType,
    "agent"
);

impl ProjectId {
    /// The project every resource belongs to in local, single-user mode.
    pub fn default_project() -> Self {
        Self("default".to_owned())
    }
}

fn validate_slug(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if value.len() > 63 {
        return Err(format!("must be at most 63 characters, got {}", value.len()));
    }
    let mut chars = value.chars();
    // The emptiness check above guarantees a first character.
    let first = chars.next().unwrap_or('-');
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!("`{value}` must start with a lowercase letter or a digit"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!("`{value}` contains `{bad}`; only a-z, 0-9, `-` and `_` are allowed"));
    }
    Ok(())
}

/// Identifies one worker process (or one in-process worker task) that leases attempts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The global, gap-tolerant, strictly increasing position of an event in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventSeq(pub i64);

impl fmt::Display for EventSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_accept_lowercase_digits_dash_and_underscore() {
        assert!(StageName::parse("e2e").is_ok());
        assert!(AgentType::parse("claude-code_2").is_ok());
        assert_eq!(ProjectId::default_project().as_str(), "default");
    }

    #[test]
    fn slugs_reject_empty_uppercase_spaces_and_long_values() {
        for bad in ["", "Deploy", "has space", "-leading", &"x".repeat(64)] {
            let err = StageName::parse(bad).unwrap_err();
            assert_eq!(err.field, "stage", "{bad}");
        }
    }

    #[test]
    fn run_ids_round_trip_through_strings_and_reject_garbage() {
        let id = RunId::new();
        assert_eq!(id.to_string().parse::<RunId>().unwrap(), id);
        let err = "not-a-uuid".parse::<RunId>().unwrap_err();
        assert!(err.message.contains("not a valid run id"), "{}", err.message);
    }

    #[test]
    fn run_ids_are_time_ordered() {
        let first = RunId::new();
        let second = RunId::new();
        assert!(first < second);
    }
}
