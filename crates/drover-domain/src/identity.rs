//! Who is calling: users with a role, their memberships in projects, and the principals a
//! request can act as (a user, or a worker holding a service token).
//!
//! The rules that do not depend on how an identity was proven live here: what a role may
//! do, and which project roles a user holds. Proving identities (tokens, passwords, JWTs)
//! is `drover-auth`'s job; storing them the store's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{AgentType, ProjectId, ValidationError};

/// What a user may do, globally (a user's role) or in one project (a membership's role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads and changes runs, environments, secrets of the project.
    Member,
    /// Everything, including users, memberships and the audit log.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Self::Viewer, Self::Member, Self::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Admin => "admin",
        }
    }

    /// Whether the role may change things (not only read them).
    pub fn can_write(self) -> bool {
        self >= Self::Member
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|role| role.as_str() == s).ok_or_else(|| {
            ValidationError::new(
                "role",
                format!("`{s}` is not a role; expected viewer, member or admin"),
            )
        })
    }
}

/// A user name: a slug (lowercase letters, digits, `-`, `_`), 1-64 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);

impl UserName {
    /// The implicit user of local mode (loopback, no users configured).
    pub const LOCAL: &'static str = "local";

    pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        let valid = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && value.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
        if !valid {
            return Err(ValidationError::new(
                "name",
                format!(
                    "`{value}` is not a user name: 1-64 lowercase letters, digits, `-` or `_`, \
                     starting with a letter or digit"
                ),
            ));
        }
        Ok(Self(value))
    }

    pub fn local() -> Self {
        Self(Self::LOCAL.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserName {
    type Error = ValidationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<UserName> for String {
    fn from(value: UserName) -> Self {
        value.0
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: UserName,
    pub role: Role,
    pub created_at: crate::Timestamp,
    pub disabled: bool,
}

/// A user's role in one project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub project_id: ProjectId,
    pub user: UserName,
    pub role: Role,
}

/// What an API token may do: read only, or read and write. A token never grants more than
/// its user has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    Read,
    Write,
}

impl TokenScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

impl FromStr for TokenScope {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            other => Err(ValidationError::new(
                "scope",
                format!("`{other}` is not a token scope; expected read or write"),
            )),
        }
    }
}

/// The user behind a request, with everything authorization needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPrincipal {
    pub name: UserName,
    /// The user's global role.
    pub role: Role,
    /// The projects the user belongs to, with the role in each.
    pub memberships: Vec<Membership>,
    /// What the credential allows (an API token's scope; a login session writes).
    pub scope: TokenScope,
    /// A credential bound to one project can reach only that project.
    pub project_limit: Option<ProjectId>,
}

impl UserPrincipal {
    /// The role the user holds in `project`: an admin holds `admin` everywhere; others
    /// their membership's role; `None` if the project is not theirs (or the credential
    /// is bound elsewhere).
    pub fn role_in(&self, project: &ProjectId) -> Option<Role> {
        if self.project_limit.as_ref().is_some_and(|limit| limit != project) {
            return None;
        }
        if self.role == Role::Admin {
            return Some(Role::Admin);
        }
        self.memberships.iter().find(|m| &m.project_id == project).map(|m| m.role)
    }

    /// Whether the user may change things in `project` with this credential.
    pub fn can_write_in(&self, project: &ProjectId) -> bool {
        self.scope == TokenScope::Write && self.role_in(project).is_some_and(Role::can_write)
    }

    /// An admin, with a credential that may write.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin && self.scope == TokenScope::Write && self.project_limit.is_none()
    }
}

/// A worker proven by a service token: the agent types it may take tasks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPrincipal {
    pub worker: String,
    /// Empty: any agent type.
    pub agents: Vec<AgentType>,
}

impl WorkerPrincipal {
    pub fn may_run(&self, agent: &AgentType) -> bool {
        self.agents.is_empty() || self.agents.contains(agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, memberships: &[(&str, Role)]) -> UserPrincipal {
        UserPrincipal {
            name: UserName::parse("ann").unwrap(),
            role,
            memberships: memberships
                .iter()
                .map(|(p, r)| Membership {
                    project_id: ProjectId::parse(*p).unwrap(),
                    user: UserName::parse("ann").unwrap(),
                    role: *r,
                })
                .collect(),
            scope: TokenScope::Write,
            project_limit: None,
        }
    }

    #[test]
    fn a_user_reaches_only_their_projects_with_their_role_there() {
        let ann = principal(Role::Member, &[("alpha", Role::Viewer)]);
        let alpha = ProjectId::parse("alpha").unwrap();
        let beta = ProjectId::parse("beta").unwrap();
        assert_eq!(ann.role_in(&alpha), Some(Role::Viewer));
        assert!(!ann.can_write_in(&alpha), "a viewer membership reads only");
        assert_eq!(ann.role_in(&beta), None);
        let admin = principal(Role::Admin, &[]);
        assert_eq!(admin.role_in(&beta), Some(Role::Admin));
        assert!(admin.is_admin());
    }

    #[test]
    fn a_read_token_or_a_bound_token_narrows_what_the_user_has() {
        let mut ann = principal(Role::Admin, &[]);
        ann.scope = TokenScope::Read;
        let alpha = ProjectId::parse("alpha").unwrap();
        assert!(!ann.can_write_in(&alpha));
        assert!(!ann.is_admin());
        ann.scope = TokenScope::Write;
        ann.project_limit = Some(alpha.clone());
        assert!(ann.can_write_in(&alpha));
        assert_eq!(ann.role_in(&ProjectId::parse("beta").unwrap()), None);
    }

    #[test]
    fn names_and_roles_parse_strictly() {
        assert!(UserName::parse("ann-1").is_ok());
        for bad in ["", "Ann", "-x", "a b", &"x".repeat(65)] {
            assert!(UserName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!("member".parse::<Role>().unwrap(), Role::Member);
        assert!("root".parse::<Role>().is_err());
    }
}
