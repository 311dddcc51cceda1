//! Custom hostnames (`[routes]` `"api.novu.loc" = "novu:api"`): the name agents use stays
//! the same while the service behind it moves between shared and per-environment, or to
//! another port. Parsed here so a bad route is refused at load, naming what is wrong.

use std::fmt;

use crate::{EnvName, ProjectId, ServiceName, ValidationError};

/// A hostname routed to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomRoute {
    /// Lowercase, without a trailing dot.
    pub host: String,
    pub target: RouteTarget,
}

/// Where a custom hostname leads: a shared service (`SERVICE[:PORT]`) or a service of
/// one environment of one project (`[PROJECT/]ENV/SERVICE[:PORT]`, project `default` when
/// not named: environment names are unique within a project only); `PORT` names one of
/// the service's ports (its first by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    /// The project of `environment`, as written (see [`Self::project`]).
    pub written_project: Option<ProjectId>,
    pub environment: Option<EnvName>,
    pub service: ServiceName,
    pub port: Option<String>,
}

impl RouteTarget {
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        let bad = |reason: String| {
            ValidationError::new(
                "route",
                format!(
                    "`{value}` {reason}; expected SERVICE[:PORT] or [PROJECT/]ENV/SERVICE[:PORT]"
                ),
            )
        };
        let mut segments: Vec<&str> = value.split('/').collect();
        let rest = segments.pop().unwrap_or_default();
        let (written_project, environment) = match segments.as_slice() {
            [] => (None, None),
            [env] => (None, Some(*env)),
            [project, env] => (Some(*project), Some(*env)),
            _ => return Err(bad("has too many `/`".to_owned())),
        };
        let written_project = written_project
            .map(|project| ProjectId::parse(project).map_err(|e| bad(e.message)))
            .transpose()?;
        let environment =
            environment.map(|env| EnvName::parse(env).map_err(|e| bad(e.message))).transpose()?;
        let (service, port) = match rest.split_once(':') {
            Some((service, port)) if !port.is_empty() => (service, Some(port.to_owned())),
            Some(_) => return Err(bad("names an empty port".to_owned())),
            None => (rest, None),
        };
        let service = ServiceName::parse(service).map_err(|e| bad(e.message))?;
        Ok(Self { written_project, environment, service, port })
    }

    /// The project whose environment it leads to (`default` unless named); none for a
    /// shared service.
    pub fn project(&self) -> Option<ProjectId> {
        self.environment.as_ref()?;
        Some(self.written_project.clone().unwrap_or_else(ProjectId::default_project))
    }
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(project) = &self.written_project {
            write!(f, "{project}/")?;
        }
        if let Some(env) = &self.environment {
            write!(f, "{env}/")?;
        }
        f.write_str(self.service.as_str())?;
        if let Some(port) = &self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Checks a hostname (RFC 1123 labels: letters, digits and `-`, 1 to 63 each, 253 in
/// all) and returns it lowercase without a trailing dot.
pub fn parse_hostname(host: &str) -> Result<String, ValidationError> {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let bad = |reason: &str| ValidationError::new("host", format!("`{host}` {reason}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("has an empty or over-long label"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("may only hold letters, digits, `-` and dots"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("has a label that starts or ends with `-`"));
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_a_shared_or_an_environment_service_and_maybe_a_port() {
        let shared = RouteTarget::parse("novu:api").unwrap();
        assert_eq!((&shared.environment, shared.service.as_str()), (&None, "novu"));
        assert_eq!(shared.port.as_deref(), Some("api"));
        assert_eq!(shared.project(), None);
        let per_env = RouteTarget::parse("alice/mailpit").unwrap();
        assert_eq!(per_env.environment.as_ref().map(EnvName::as_str), Some("alice"));
        assert_eq!(per_env.project(), Some(ProjectId::default_project()), "the default one");
        assert_eq!(per_env.to_string(), "alice/mailpit");
        let other = RouteTarget::parse("team-b/alice/mailpit:web").unwrap();
        assert_eq!(other.project().as_ref().map(ProjectId::as_str), Some("team-b"));
        assert_eq!(other.environment.as_ref().map(EnvName::as_str), Some("alice"));
        assert_eq!(other.to_string(), "team-b/alice/mailpit:web");
        for bad in ["", "novu:", "a/b/c/d", "Novu", "/x", "//x", "P/a/x", "x y"] {
            assert!(RouteTarget::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn hostnames_are_checked_and_lowercased() {
        assert_eq!(parse_hostname("API.Novu.loc.").unwrap(), "api.novu.loc");
        for bad in ["", "a..b", "-a.loc", "a_b.loc", "a b", &"x".repeat(64)] {
            assert!(parse_hostname(bad).is_err(), "{bad:?} accepted");
        }
    }
}
