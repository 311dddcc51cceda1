//! Identities over HTTP: login and refresh, the caller's own account and API tokens, and
//! (for administrators) users, projects and memberships, worker service tokens and the
//! audit log. Every change here is audited by the store in the same transaction.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use drover_auth::{ApiToken, REFRESH_PREFIX};
use drover_domain::{
    AgentType, ErrorCode, Membership, ProjectId, Role, Timestamp, TokenScope, User, UserName,
};
use drover_store::{ApiTokenRecord, GLOBAL_AUDIT_PROJECT, NewApiToken, NewAudit};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::AppState;
use crate::auth::{ACCESS_TTL, Account, Admin, REFRESH_TTL};
use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::wire::{
    AuditEntryView, AuditPage, CreateProjectBody, CreateTokenBody, CreateUserBody,
    CreatedTokenView, LoginBody, MeView, MemberBody, MembershipView, ProjectView, RefreshBody,
    SessionView, SetRoleBody, TokenView, UserView, WorkerTokenBody, WorkerTokenView,
};

/// Longest an API token may live.
const MAX_TOKEN_DAYS: u32 = 365;
/// Longest a worker service token may live.
const MAX_WORKER_TOKEN_HOURS: u32 = 24 * 365;

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

fn field(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::validation(vec![FieldError { field: field.to_owned(), message: message.into() }])
}

fn user_name(raw: &str, name_of_field: &str) -> Result<UserName, ApiError> {
    UserName::parse(raw).map_err(|err| field(name_of_field, err.message))
}

fn role(raw: &str, name_of_field: &str) -> Result<Role, ApiError> {
    raw.parse::<Role>().map_err(|err| field(name_of_field, err.message))
}

fn time(at: Timestamp) -> String {
    crate::wire::time(at)
}

fn token_view(token: &ApiTokenRecord) -> TokenView {
    TokenView {
        id: token.id.clone(),
        user: token.user.to_string(),
        name: token.name.clone(),
        scope: token.scope.as_str().to_owned(),
        project: token.project.as_ref().map(ToString::to_string),
        created_at: time(token.created_at),
        expires_at: token.expires_at.map(time),
        revoked_at: token.revoked_at.map(time),
        last_used_at: token.last_used_at.map(time),
    }
}

fn user_view(user: &User) -> UserView {
    UserView {
        name: user.name.to_string(),
        role: user.role.as_str().to_owned(),
        created_at: time(user.created_at),
        disabled: user.disabled,
    }
}

async fn session(state: &AppState, user: &UserName) -> Result<SessionView, ApiError> {
    let auth = state.auth();
    let access = auth
        .signer
        .user_token(user, ACCESS_TTL)
        .map_err(|err| ApiError::new(ErrorCode::Internal, err.to_string()))?;
    let refresh = drover_auth::random_secret(REFRESH_PREFIX);
    let now = now();
    auth.identities
        .store_refresh_token(&drover_auth::hash_token(&refresh), user, now.plus(REFRESH_TTL), now)
        .await?;
    Ok(SessionView {
        access_token: access,
        token_type: "Bearer".to_owned(),
        expires_in: ACCESS_TTL.as_secs(),
        refresh_token: refresh,
    })
}

/// Log in with a password: a short-lived access token and a refresh token.
/// Password hashes computed at once. Each argon2id hash takes 19 MiB of memory and tens
/// of milliseconds of a core by design; a flood of logins waits its turn here instead of
/// filling the blocking pool (hundreds of threads, gigabytes) with them.
static PASSWORD_WORK: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs password hashing or verification off the async threads, a bounded number at once.
async fn password_work<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    // The semaphore is static and never closed.
    let _permit = PASSWORD_WORK.acquire().await.ok();
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ApiError::new(ErrorCode::Internal, err.to_string()))
}

#[utoipa::path(
    post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginBody,
    security(()),
    responses(
        (status = 200, body = SessionView),
        (status = 401, description = "Wrong user or password", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn login(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Json<SessionView>, ApiError> {
    let refused = || ApiError::new(ErrorCode::InvalidCredentials, "wrong user name or password");
    let name = UserName::parse(body.user.as_str()).map_err(|_| refused())?;
    let identities = state.auth().identities.clone();
    let found = identities.get_user(&name).await?;
    let hash = found.as_ref().filter(|(user, _)| !user.disabled).and_then(|(_, hash)| hash.clone());
    let password = body.password;
    // An unknown user is checked against a dummy hash so both failures take as long.
    let verified = password_work(move || match hash {
        Some(hash) => drover_auth::verify_password(&password, &hash),
        None => {
            let _ = drover_auth::verify_password(&password, &DUMMY_HASH);
            false
        }
    })
    .await
    .unwrap_or(false);
    let outcome = if verified { "auth.login" } else { "auth.login_failed" };
    identities
        .audit(
            NewAudit {
                project: GLOBAL_AUDIT_PROJECT,
                actor: name.as_str(),
                action: outcome,
                target: name.as_str(),
                reason: None,
            },
            now(),
        )
        .await?;
    if !verified {
        return Err(refused());
    }
    Ok(Json(session(&state, &name).await?))
}

/// An argon2id hash of a random password nobody knows, checked for unknown users so that
/// a failed login takes as long whether or not the user exists.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    drover_auth::hash_password(&drover_auth::random_secret("")).unwrap_or_default()
});

/// Trade a refresh token (each works once) for a new access token and refresh token.
#[utoipa::path(
    post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshBody,
    security(()),
    responses(
        (status = 200, body = SessionView),
        (status = 401, description = "Unknown, used or expired refresh token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Json<SessionView>, ApiError> {
    let user = state
        .auth()
        .identities
        .consume_refresh_token(&drover_auth::hash_token(&body.refresh_token), now())
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidCredentials,
                "the refresh token is unknown, used or expired",
            )
        })?;
    Ok(Json(session(&state, &user).await?))
}

/// Who the credential belongs to, and what it may do.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth", responses((status = 200, body = MeView)))]
pub(crate) async fn me(State(state): State<AppState>, Account(user): Account) -> Json<MeView> {
    Json(MeView {
        user: user.name.to_string(),
        role: user.role.as_str().to_owned(),
        scope: user.scope.as_str().to_owned(),
        project_limit: user.project_limit.as_ref().map(ToString::to_string),
        memberships: user
            .memberships
            .iter()
            .map(|m| MembershipView {
                project: m.project_id.to_string(),
                user: m.user.to_string(),
                role: m.role.as_str().to_owned(),
            })
            .collect(),
        local_mode: state.auth().is_local(),
    })
}

/// Create an API token (shown once, in this response only).
#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "auth", request_body = CreateTokenBody,
    responses(
        (status = 201, body = CreatedTokenView),
        (status = 403, description = "Creating a token for another user needs an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`user_not_found`: no such user; `project_not_found`: no such project, or one the caller is not in", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    Account(caller): Account,
    ApiJson(body): ApiJson<CreateTokenBody>,
) -> Result<(StatusCode, Json<CreatedTokenView>), ApiError> {
    let owner = match &body.user {
        Some(raw) => user_name(raw, "user")?,
        None => caller.name.clone(),
    };
    if owner != caller.name && !caller.is_admin() {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "only an administrator makes tokens for others",
        ));
    }
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(field("name", "1-100 characters, no control characters"));
    }
    let scope = match body.scope.as_deref() {
        None => TokenScope::Write,
        Some(raw) => raw.parse::<TokenScope>().map_err(|err| field("scope", err.message))?,
    };
    if scope == TokenScope::Write && caller.scope == TokenScope::Read {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "a read-only credential cannot make a write token",
        ));
    }
    let project = match &body.project {
        Some(raw) => {
            let project =
                ProjectId::parse(raw.as_str()).map_err(|err| field("project", err.message))?;
            if caller.role_in(&project).is_none() || !state.auth().project_exists(&project).await? {
                return Err(ApiError::new(
                    ErrorCode::ProjectNotFound,
                    format!("no project `{project}`"),
                ));
            }
            Some(project)
        }
        None => caller.project_limit.clone(),
    };
    let days = body.expires_in_days.unwrap_or(90);
    if !(1..=MAX_TOKEN_DAYS).contains(&days) {
        return Err(field("expires_in_days", format!("must be between 1 and {MAX_TOKEN_DAYS}")));
    }
    let identities = &state.auth().identities;
    if owner != caller.name && identities.get_user(&owner).await?.is_none() {
        return Err(ApiError::new(ErrorCode::UserNotFound, format!("no user `{owner}`")));
    }
    let secret = ApiToken::generate();
    let now = now();
    let record = identities
        .create_api_token(
            &NewApiToken {
                id: uuid::Uuid::now_v7().to_string(),
                user: owner,
                name: name.to_owned(),
                hash: secret.hash,
                scope,
                project,
                expires_at: Some(now.plus(Duration::from_secs(u64::from(days) * 86_400))),
            },
            caller.name.as_str(),
            now,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedTokenView { token: secret.secret, details: token_view(&record) }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokensQuery {
    /// Every user's tokens (administrators).
    all: Option<bool>,
}

/// The caller's API tokens (never their secrets).
#[utoipa::path(
    get, path = "/api/v1/tokens", tag = "auth", params(TokensQuery),
    responses((status = 200, body = Vec<TokenView>), (status = 403, description = "`all` needs an admin", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    Account(caller): Account,
    ApiQuery(query): ApiQuery<TokensQuery>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let all = query.all.unwrap_or(false);
    if all && !caller.is_admin() {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "only an administrator lists everyone's tokens",
        ));
    }
    let owner = (!all).then_some(&caller.name);
    let tokens = state.auth().identities.list_api_tokens(owner).await?;
    Ok(Json(tokens.iter().map(token_view).collect()))
}

/// Revoke an API token (the caller's own; an administrator's any).
#[utoipa::path(
    delete, path = "/api/v1/tokens/{id}", tag = "auth",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, body = TokenView), (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    Account(caller): Account,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TokenView>, ApiError> {
    let owner = (!caller.is_admin()).then_some(&caller.name);
    let token =
        state.auth().identities.revoke_api_token(&id, owner, caller.name.as_str(), now()).await?;
    Ok(Json(token_view(&token)))
}

/// Every user (administrators).
#[utoipa::path(get, path = "/api/v1/users", tag = "admin", responses((status = 200, body = Vec<UserView>), (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<UserView>>, ApiError> {
    let users = state.auth().identities.list_users().await?;
    Ok(Json(users.iter().map(user_view).collect()))
}

/// Create a user (administrators; anyone while the server is in local mode, which the
/// first user ends).
#[utoipa::path(
    post, path = "/api/v1/users", tag = "admin", request_body = CreateUserBody,
    responses(
        (status = 201, body = UserView),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_user(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ApiJson(body): ApiJson<CreateUserBody>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let name = user_name(&body.name, "name")?;
    if name.as_str() == UserName::LOCAL {
        return Err(field("name", "`local` is the implicit user of local mode"));
    }
    let role = role(body.role.as_deref().unwrap_or("member"), "role")?;
    let hash = match body.password {
        Some(password) => {
            if password.chars().count() < 12 {
                return Err(field("password", "at least 12 characters"));
            }
            Some(
                password_work(move || drover_auth::hash_password(&password))
                    .await?
                    .map_err(|err| ApiError::new(ErrorCode::Internal, err.to_string()))?,
            )
        }
        None => None,
    };
    let user = User { name, role, created_at: now(), disabled: false };
    let identities = &state.auth().identities;
    // A new user belongs to no project until an administrator adds them (projects are
    // walls: nothing is shared by default).
    identities.create_user(&user, hash.as_deref(), admin.name.as_str()).await?;
    state.auth().user_created();
    Ok((StatusCode::CREATED, Json(user_view(&user))))
}

/// Change a user's global role (administrators).
#[utoipa::path(
    patch, path = "/api/v1/users/{name}", tag = "admin", request_body = SetRoleBody,
    params(("name" = String, Path, description = "User name")),
    responses((status = 200, body = UserView), (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn set_user_role(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<SetRoleBody>,
) -> Result<Json<UserView>, ApiError> {
    let name = UserName::parse(name.as_str())
        .map_err(|_| ApiError::new(ErrorCode::UserNotFound, format!("no user `{name}`")))?;
    let role = role(&body.role, "role")?;
    let user =
        state.auth().identities.set_user_role(&name, role, admin.name.as_str(), now()).await?;
    Ok(Json(user_view(&user)))
}

/// The projects the caller can see (all of them for an administrator).
#[utoipa::path(get, path = "/api/v1/projects", tag = "admin", responses((status = 200, body = Vec<ProjectView>)))]
pub(crate) async fn list_projects(
    State(state): State<AppState>,
    Account(caller): Account,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    let projects = state.auth().identities.list_projects().await?;
    Ok(Json(
        projects
            .into_iter()
            .filter_map(|p| {
                let role = caller.role_in(&p.id)?;
                Some(ProjectView {
                    id: p.id.to_string(),
                    name: p.name,
                    created_at: time(p.created_at),
                    role: role.as_str().to_owned(),
                })
            })
            .collect(),
    ))
}

/// Create a project (administrators).
#[utoipa::path(
    post, path = "/api/v1/projects", tag = "admin", request_body = CreateProjectBody,
    responses(
        (status = 201, body = ProjectView),
        (status = 409, description = "The id is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_project(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ApiJson(body): ApiJson<CreateProjectBody>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    let id = ProjectId::parse(body.id.as_str()).map_err(|err| field("id", err.message))?;
    if id.as_str() == GLOBAL_AUDIT_PROJECT {
        return Err(field("id", "`global` is reserved"));
    }
    let name = body.name.as_deref().unwrap_or(id.as_str()).trim().to_owned();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(field("name", "1-200 characters, no control characters"));
    }
    let project =
        state.auth().identities.create_project(&id, &name, admin.name.as_str(), now()).await?;
    Ok((
        StatusCode::CREATED,
        Json(ProjectView {
            id: project.id.to_string(),
            name: project.name,
            created_at: time(project.created_at),
            role: Role::Admin.as_str().to_owned(),
        }),
    ))
}

/// A project's members (its members and administrators).
#[utoipa::path(
    get, path = "/api/v1/projects/{id}/members", tag = "admin",
    params(("id" = String, Path, description = "Project id")),
    responses((status = 200, body = Vec<MembershipView>), (status = 404, description = "No such project", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn list_members(
    State(state): State<AppState>,
    Account(caller): Account,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<MembershipView>>, ApiError> {
    let project = visible_project(&caller, &id)?;
    let members = state.auth().identities.members_of(&project).await?;
    Ok(Json(
        members
            .iter()
            .map(|m| MembershipView {
                project: m.project_id.to_string(),
                user: m.user.to_string(),
                role: m.role.as_str().to_owned(),
            })
            .collect(),
    ))
}

fn visible_project(
    caller: &drover_domain::UserPrincipal,
    raw: &str,
) -> Result<ProjectId, ApiError> {
    let missing = || ApiError::new(ErrorCode::ProjectNotFound, format!("no project `{raw}`"));
    let project = ProjectId::parse(raw).map_err(|_| missing())?;
    caller.role_in(&project).ok_or_else(missing)?;
    Ok(project)
}

/// Only a project's administrators (or global ones) change its members.
fn manage_members(caller: &drover_domain::UserPrincipal, raw: &str) -> Result<ProjectId, ApiError> {
    let project = visible_project(caller, raw)?;
    if caller.role_in(&project) != Some(Role::Admin) || caller.scope != TokenScope::Write {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("only an administrator of project `{project}` changes its members"),
        ));
    }
    Ok(project)
}

/// Add a user to a project with a role.
#[utoipa::path(
    post, path = "/api/v1/projects/{id}/members", tag = "admin", request_body = MemberBody,
    params(("id" = String, Path, description = "Project id")),
    responses(
        (status = 201, body = MembershipView),
        (status = 404, description = "No such project or user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already a member", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn add_member(
    State(state): State<AppState>,
    Account(caller): Account,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<MemberBody>,
) -> Result<(StatusCode, Json<MembershipView>), ApiError> {
    let project = manage_members(&caller, &id)?;
    let user = user_name(&body.user, "user")?;
    let role = role(&body.role, "role")?;
    let membership = Membership { project_id: project, user, role };
    state.auth().identities.add_member(&membership, caller.name.as_str(), now()).await?;
    Ok((
        StatusCode::CREATED,
        Json(MembershipView {
            project: membership.project_id.to_string(),
            user: membership.user.to_string(),
            role: role.as_str().to_owned(),
        }),
    ))
}

/// Remove a user from a project.
#[utoipa::path(
    delete, path = "/api/v1/projects/{id}/members/{user}", tag = "admin",
    params(("id" = String, Path, description = "Project id"), ("user" = String, Path, description = "User name")),
    responses((status = 204, description = "Removed"), (status = 404, description = "No such project or membership", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    Account(caller): Account,
    ApiPath((id, user)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let project = manage_members(&caller, &id)?;
    let user = UserName::parse(user.as_str()).map_err(|_| {
        ApiError::new(ErrorCode::NotAMember, format!("`{user}` is not a member of `{project}`"))
    })?;
    state.auth().identities.remove_member(&project, &user, caller.name.as_str(), now()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A service token for a worker: which agent types it may run, until when (administrators).
#[utoipa::path(
    post, path = "/api/v1/workers/tokens", tag = "admin", request_body = WorkerTokenBody,
    responses((status = 201, body = WorkerTokenView), (status = 422, description = "Invalid body", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn create_worker_token(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ApiJson(body): ApiJson<WorkerTokenBody>,
) -> Result<(StatusCode, Json<WorkerTokenView>), ApiError> {
    let worker = body.worker.trim().to_owned();
    if worker.is_empty() || worker.len() > 100 || !worker.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(field("worker", "1-100 visible ASCII characters"));
    }
    let agents = body
        .agents
        .iter()
        .map(|a| AgentType::parse(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| field("agents", err.message))?;
    let hours = body.expires_in_hours.unwrap_or(24 * 30);
    if !(1..=MAX_WORKER_TOKEN_HOURS).contains(&hours) {
        return Err(field(
            "expires_in_hours",
            format!("must be between 1 and {MAX_WORKER_TOKEN_HOURS}"),
        ));
    }
    let ttl = Duration::from_secs(u64::from(hours) * 3600);
    let token = state
        .auth()
        .signer
        .worker_token(&worker, &agents, ttl)
        .map_err(|err| ApiError::new(ErrorCode::Internal, err.to_string()))?;
    let target = format!("worker {worker} ({})", body.agents.join(","));
    state
        .auth()
        .identities
        .audit(
            NewAudit {
                project: GLOBAL_AUDIT_PROJECT,
                actor: admin.name.as_str(),
                action: "worker_token.create",
                target: &target,
                reason: None,
            },
            now(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(WorkerTokenView {
            token,
            worker,
            agents: body.agents,
            expires_at: time(now().plus(ttl)),
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Only this project's entries (`global` for users, projects and tokens).
    project: Option<String>,
    /// Entries older than this id (the `next_cursor` of the previous page).
    cursor: Option<i64>,
    /// 1-200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

/// The audit log of security-relevant actions, newest first (administrators).
#[utoipa::path(
    get, path = "/api/v1/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn audit_log(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "limit must be between 1 and 200"));
    }
    let entries = state
        .auth()
        .identities
        .list_audit_entries(query.project.as_deref(), query.cursor, limit)
        .await?;
    let next_cursor =
        (entries.len() == limit as usize).then(|| entries.last().map(|e| e.id)).flatten();
    Ok(Json(AuditPage {
        items: entries
            .into_iter()
            .map(|e| AuditEntryView {
                id: e.id,
                project: e.project_id.to_string(),
                actor: e.actor,
                action: e.action,
                target: e.target,
                reason: e.reason,
                at: time(e.at),
            })
            .collect(),
        next_cursor,
    }))
}
