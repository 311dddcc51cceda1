//! Who is calling, proven on every request: the only place identities enter the API.
//!
//! A request carries `Authorization: Bearer <credential>`: an API token (`drv_…`, looked
//! up by its hash), a user access token (a JWT from `POST /auth/login`), or a worker's
//! service token (a JWT for the worker audience). Nothing else is believed: no header
//! names a user. Without a credential, a server in local mode (loopback, no users yet)
//! treats the caller as the implicit local admin, `local` (a user row made before it first
//! acts, so the API tokens it makes belong to someone; it is no user that ends local mode);
//! any other server answers 401.
//!
//! Extractors turn the proven principal into what a handler may use:
//! [`Caller`] (a user acting in one project, chosen with `X-Drover-Project`, default
//! `default`; a project the user is not in does not exist for them: 404; writing needs a
//! write role and a write credential: 403), [`Account`] (a user, no project), [`Admin`],
//! and [`WorkerCaller`] (a worker's service token; user credentials are refused).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use drover_auth::Signer;
use drover_domain::{
    ErrorCode, ProjectId, Role, Timestamp, TokenScope, UserName, UserPrincipal, WorkerPrincipal,
};
use drover_store::IdentityStore;

use crate::AppState;
use crate::error::ApiError;

/// The header that picks the project a request acts in.
pub const PROJECT_HEADER: &str = "x-drover-project";

/// How long a login's access token lives.
pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a login's refresh token lives.
pub const REFRESH_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the server needs to check credentials.
pub struct AuthState {
    pub(crate) identities: Arc<dyn IdentityStore>,
    pub(crate) signer: Signer,
    /// Listening beyond loopback: a credential is always required.
    network: bool,
    /// Whether any user exists (then local mode is over, even on loopback).
    users_exist: AtomicBool,
    /// The hash of a credential that stands for the local admin: the one an embedded
    /// instance hands to the CLI command that started it.
    trusted: Option<String>,
    /// Projects known to exist (an administrator may name any project: it must exist).
    /// Projects are never deleted, so a known one stays known.
    known_projects: std::sync::RwLock<std::collections::HashSet<ProjectId>>,
    /// Set once the local admin's user row is known to exist (made on its first call).
    local_admin_stored: tokio::sync::OnceCell<()>,
}

impl AuthState {
    pub fn new(
        identities: Arc<dyn IdentityStore>,
        signer: Signer,
        network: bool,
        users_exist: bool,
        trusted_token: Option<&str>,
    ) -> Self {
        Self {
            identities,
            signer,
            network,
            users_exist: AtomicBool::new(users_exist),
            trusted: trusted_token.map(drover_auth::hash_token),
            known_projects: std::sync::RwLock::default(),
            local_admin_stored: tokio::sync::OnceCell::new(),
        }
    }

    /// The implicit local admin, whose user row is made (once, idempotently) before it
    /// first acts, so that what it makes (an API token) belongs to a user like anyone's.
    async fn local_admin(&self) -> Result<UserPrincipal, ApiError> {
        self.local_admin_stored
            .get_or_try_init(|| self.identities.ensure_local_admin(now()))
            .await?;
        Ok(local_admin())
    }

    /// Whether `project` exists (cached once seen).
    pub(crate) async fn project_exists(&self, project: &ProjectId) -> Result<bool, ApiError> {
        if self.known_projects.read().unwrap_or_else(|p| p.into_inner()).contains(project) {
            return Ok(true);
        }
        let exists = self.identities.get_project(project).await?.is_some();
        if exists {
            // Bounded by the number of projects.
            self.known_projects.write().unwrap_or_else(|p| p.into_inner()).insert(project.clone());
        }
        Ok(exists)
    }

    /// Local mode: no credential needed (loopback, no users).
    pub fn is_local(&self) -> bool {
        !self.network && !self.users_exist.load(Ordering::Relaxed)
    }

    pub(crate) fn user_created(&self) {
        self.users_exist.store(true, Ordering::Relaxed);
    }
}

/// The proven identity behind a request.
#[derive(Debug, Clone)]
pub enum Principal {
    User(UserPrincipal),
    Worker(WorkerPrincipal),
}

fn local_admin() -> UserPrincipal {
    UserPrincipal {
        name: UserName::local(),
        role: Role::Admin,
        memberships: Vec::new(),
        scope: TokenScope::Write,
        project_limit: None,
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// The bearer credential of a request, if it has one; a malformed header is a 401.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().unwrap_or_default();
    match value.split_once(' ') {
        Some((scheme, credential))
            if scheme.eq_ignore_ascii_case("bearer") && !credential.trim().is_empty() =>
        {
            Ok(Some(credential.trim()))
        }
        _ => Err(ApiError::new(
            ErrorCode::InvalidCredentials,
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

fn invalid() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidCredentials,
        "the credential is not valid (unknown, revoked, expired or for another audience)",
    )
}

/// Proves who is calling.
pub(crate) async fn authenticate(state: &AppState, parts: &Parts) -> Result<Principal, ApiError> {
    let auth = state.auth();
    let Some(credential) = bearer(&parts.headers)? else {
        // Another server sharing the database may have made the first user: local mode
        // ends everywhere when it does (checked while it lasts; over once it is over).
        if auth.is_local() && auth.identities.count_users().await? > 0 {
            auth.user_created();
        }
        if auth.is_local() {
            return Ok(Principal::User(auth.local_admin().await?));
        }
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "this server requires a credential: send `Authorization: Bearer <token>` \
             (an API token from `drover tokens create`, or an access token from `POST /api/v1/auth/login`)",
        ));
    };
    if auth.trusted.as_deref().is_some_and(|hash| hash == drover_auth::hash_token(credential)) {
        return Ok(Principal::User(auth.local_admin().await?));
    }
    if drover_auth::is_api_token(credential) {
        let hash = drover_auth::hash_token(credential);
        let token = auth.identities.authenticate_token(&hash, now()).await?.ok_or_else(invalid)?;
        let principal = user_principal(auth, &token.user, token.scope, token.project).await?;
        return Ok(Principal::User(principal));
    }
    if let Ok(claims) = auth.signer.verify_user(credential) {
        let name = UserName::parse(claims.sub).map_err(|_| invalid())?;
        let principal = user_principal(auth, &name, TokenScope::Write, None).await?;
        return Ok(Principal::User(principal));
    }
    if let Ok(claims) = auth.signer.verify_worker(credential) {
        let agents = claims
            .agents
            .into_iter()
            .map(drover_domain::AgentType::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid())?;
        return Ok(Principal::Worker(WorkerPrincipal { worker: claims.sub, agents }));
    }
    Err(invalid())
}

async fn user_principal(
    auth: &AuthState,
    name: &UserName,
    scope: TokenScope,
    project_limit: Option<ProjectId>,
) -> Result<UserPrincipal, ApiError> {
    let (user, _) = auth.identities.get_user(name).await?.ok_or_else(invalid)?;
    if user.disabled {
        return Err(invalid());
    }
    let memberships = auth.identities.memberships_of(name).await?;
    Ok(UserPrincipal { name: user.name, role: user.role, memberships, scope, project_limit })
}

fn user_of(principal: Principal) -> Result<UserPrincipal, ApiError> {
    match principal {
        Principal::User(user) => Ok(user),
        Principal::Worker(worker) => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "worker `{}` holds a service token, which reaches only the worker endpoints",
                worker.worker
            ),
        )),
    }
}

/// A user acting in one project.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project: ProjectId,
    /// Who is calling (the actor in audit records).
    pub user: String,
    pub principal: UserPrincipal,
    /// The caller's role in `project`.
    pub role: Role,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = user_of(authenticate(state, parts).await?)?;
        let project = match parts.headers.get(PROJECT_HEADER) {
            None => ProjectId::default_project(),
            Some(value) => {
                let text = value.to_str().unwrap_or_default();
                ProjectId::parse(text).map_err(|_| not_visible(text))?
            }
        };
        let role = principal.role_in(&project).ok_or_else(|| not_visible(project.as_str()))?;
        // A membership implies the project; an administrator may name any, so check.
        if role == Role::Admin && !state.auth().project_exists(&project).await? {
            return Err(not_visible(project.as_str()));
        }
        let writes = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        if writes && !principal.can_write_in(&project) {
            let why = if principal.scope == TokenScope::Read {
                "this credential is read-only".to_owned()
            } else {
                format!("your role in project `{project}` is {role}, which only reads")
            };
            return Err(ApiError::new(ErrorCode::Forbidden, why));
        }
        Ok(Caller { user: principal.name.to_string(), project, principal, role })
    }
}

fn not_visible(project: &str) -> ApiError {
    ApiError::new(ErrorCode::ProjectNotFound, format!("no project `{project}`"))
}

/// A user, acting on their own account (tokens, profile).
#[derive(Debug, Clone)]
pub struct Account(pub UserPrincipal);

impl FromRequestParts<AppState> for Account {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = user_of(authenticate(state, parts).await?)?;
        let writes = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        if writes && principal.scope == TokenScope::Read {
            return Err(ApiError::new(ErrorCode::Forbidden, "this credential is read-only"));
        }
        Ok(Account(principal))
    }
}

/// An administrator (global admin role, a write credential not bound to a project).
#[derive(Debug, Clone)]
pub struct Admin(pub UserPrincipal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = user_of(authenticate(state, parts).await?)?;
        if !principal.is_admin() {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only an administrator (with a write credential for all projects) may do this",
            ));
        }
        Ok(Admin(principal))
    }
}

/// A worker, proven by a service token (or the local admin of a local-mode server, whose
/// built-in and local workers need no token).
#[derive(Debug, Clone)]
pub struct WorkerCaller(pub WorkerPrincipal);

impl FromRequestParts<AppState> for WorkerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match authenticate(state, parts).await? {
            Principal::Worker(worker) => Ok(WorkerCaller(worker)),
            Principal::User(user) if user.name.as_str() == UserName::LOCAL => {
                Ok(WorkerCaller(WorkerPrincipal { worker: "local".to_owned(), agents: Vec::new() }))
            }
            Principal::User(user) => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "`{}` is a user; the worker endpoints take a worker's service token \
                     (`drover workers token`)",
                    user.name
                ),
            )),
        }
    }
}
