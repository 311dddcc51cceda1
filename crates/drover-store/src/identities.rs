//! The store's identity side: users, projects and memberships, API tokens (hashes only),
//! refresh tokens, idempotency keys, and the security audit trail. Kept apart from
//! [`Store`] (runs) and [`EnvironmentStore`] because only the API's authentication and
//! administration use it.
//!
//! [`Store`]: crate::Store
//! [`EnvironmentStore`]: crate::EnvironmentStore

use async_trait::async_trait;
use drover_domain::{
    AuditEntry, Membership, ProjectId, Role, Timestamp, TokenScope, User, UserName,
};

use crate::StoreResult;

/// The project under which actions on users, projects and tokens are audited.
pub const GLOBAL_AUDIT_PROJECT: &str = "global";

/// A project as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub id: ProjectId,
    pub name: String,
    pub created_at: Timestamp,
}

/// An API token to store: its hash, never the secret.
#[derive(Debug, Clone)]
pub struct NewApiToken {
    pub id: String,
    pub user: UserName,
    pub name: String,
    pub hash: String,
    pub scope: TokenScope,
    pub project: Option<ProjectId>,
    pub expires_at: Option<Timestamp>,
}

/// An API token as listed (no secret, no hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRecord {
    pub id: String,
    pub user: UserName,
    pub name: String,
    pub scope: TokenScope,
    pub project: Option<ProjectId>,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
}

/// A security-relevant action, for the audit trail.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    /// The project it concerns ([`GLOBAL_AUDIT_PROJECT`] for users, projects, tokens).
    pub project: &'a str,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub reason: Option<&'a str>,
}

/// The response kept for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptResponse {
    /// SHA-256 of the request body the key was first used with.
    pub body_hash: String,
    pub status: u16,
    pub body: String,
}

#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    /// Enabled users other than the implicit local admin: while there are none, a loopback
    /// server is in local mode.
    async fn count_users(&self) -> StoreResult<u64>;

    /// Makes the implicit local admin ([`UserName::local`], role admin, no password) a user
    /// row, so that what it makes (API tokens) belongs to someone; audited when it is made,
    /// nothing when it exists. It does not count as a user ([`Self::count_users`]).
    async fn ensure_local_admin(&self, now: Timestamp) -> StoreResult<()>;

    /// Creates a user; audited. Fails if the name is taken.
    async fn create_user(
        &self,
        user: &User,
        password_hash: Option<&str>,
        actor: &str,
    ) -> StoreResult<()>;

    /// A user and their password hash (if they have a password).
    async fn get_user(&self, name: &UserName) -> StoreResult<Option<(User, Option<String>)>>;

    async fn list_users(&self) -> StoreResult<Vec<User>>;

    /// Changes a user's global role; audited.
    async fn set_user_role(
        &self,
        name: &UserName,
        role: Role,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<User>;

    /// Sets (or replaces) a user's password hash; audited.
    async fn set_password(
        &self,
        name: &UserName,
        hash: &str,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<()>;

    /// Creates a project; audited. Fails if the id is taken.
    async fn create_project(
        &self,
        id: &ProjectId,
        name: &str,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Project>;

    async fn list_projects(&self) -> StoreResult<Vec<Project>>;

    async fn get_project(&self, id: &ProjectId) -> StoreResult<Option<Project>>;

    /// Adds a user to a project; audited. Fails if they already are a member.
    async fn add_member(
        &self,
        membership: &Membership,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<()>;

    /// Removes a user from a project; audited.
    async fn remove_member(
        &self,
        project: &ProjectId,
        user: &UserName,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<()>;

    async fn memberships_of(&self, user: &UserName) -> StoreResult<Vec<Membership>>;

    async fn members_of(&self, project: &ProjectId) -> StoreResult<Vec<Membership>>;

    /// Stores a new API token (its hash); audited.
    async fn create_api_token(
        &self,
        token: &NewApiToken,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<ApiTokenRecord>;

    /// Tokens, newest first: one user's, or everyone's.
    async fn list_api_tokens(&self, user: Option<&UserName>) -> StoreResult<Vec<ApiTokenRecord>>;

    /// Revokes a token (one of `owner`'s, or anyone's when `None`); audited.
    async fn revoke_api_token(
        &self,
        id: &str,
        owner: Option<&UserName>,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<ApiTokenRecord>;

    /// The live token with this hash (not revoked, not expired, its user not disabled),
    /// noting its use.
    async fn authenticate_token(
        &self,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ApiTokenRecord>>;

    async fn store_refresh_token(
        &self,
        hash: &str,
        user: &UserName,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> StoreResult<()>;

    /// Uses up a refresh token: its user, if it was live and unused (each works once).
    async fn consume_refresh_token(
        &self,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<Option<UserName>>;

    async fn audit(&self, entry: NewAudit<'_>, now: Timestamp) -> StoreResult<()>;

    /// The audit trail, newest first: one project's or all, strictly older than `before`.
    async fn list_audit_entries(
        &self,
        project: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>>;

    async fn kept_response(
        &self,
        project: &ProjectId,
        route: &str,
        key: &str,
    ) -> StoreResult<Option<KeptResponse>>;

    /// Keeps a response for an idempotency key (first writer wins).
    async fn keep_response(
        &self,
        project: &ProjectId,
        route: &str,
        key: &str,
        response: &KeptResponse,
        now: Timestamp,
    ) -> StoreResult<()>;

    /// Forgets idempotency keys older than `before`; how many.
    async fn forget_responses(&self, before: Timestamp) -> StoreResult<u64>;
}
