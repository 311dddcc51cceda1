//! The SQLite [`IdentityStore`]: every change and its audit record in one transaction.

use async_trait::async_trait;
use drover_domain::{
    AuditEntry, Membership, ProjectId, Role, Timestamp, TokenScope, User, UserName,
};

use super::{Backend, Db, SqlStore, corrupt, sql, unique_violation};
use crate::identities::{
    ApiTokenRecord, GLOBAL_AUDIT_PROJECT, IdentityStore, KeptResponse, NewApiToken, NewAudit,
    Project,
};
use crate::{StoreError, StoreResult};

/// A token's `last_used_at` is written at most this often (milliseconds), so that
/// authenticating is not a write per request.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// Appends one audit record (every store module audits through here).
pub(super) async fn audit_in(
    conn: &mut Db<'_>,
    entry: &NewAudit<'_>,
    now: Timestamp,
) -> StoreResult<()> {
    sql(
        "INSERT INTO audit_log (project_id, actor, action, target, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(entry.project)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.target)
    .bind(entry.reason)
    .bind(now.as_millis())
    .execute(conn)
    .await?;
    Ok(())
}

fn global<'a>(actor: &'a str, action: &'a str, target: &'a str) -> NewAudit<'a> {
    NewAudit { project: GLOBAL_AUDIT_PROJECT, actor, action, target, reason: None }
}

type UserRow = (String, String, Option<String>, i64, Option<i64>);

fn user_from(row: UserRow) -> StoreResult<(User, Option<String>)> {
    let (name, role, hash, created_at, disabled_at) = row;
    Ok((
        User {
            name: UserName::parse(name).map_err(|e| corrupt("users.name", e))?,
            role: role.parse().map_err(|e| corrupt("users.role", e))?,
            created_at: Timestamp::from_millis(created_at),
            disabled: disabled_at.is_some(),
        },
        hash,
    ))
}

type TokenRow =
    (String, String, String, String, Option<String>, i64, Option<i64>, Option<i64>, Option<i64>);

macro_rules! token_columns {
    () => {
        "id, user_name, name, scope, project_id, created_at, expires_at, revoked_at, last_used_at"
    };
}

fn token_from(row: TokenRow) -> StoreResult<ApiTokenRecord> {
    let (id, user, name, scope, project, created_at, expires_at, revoked_at, last_used_at) = row;
    Ok(ApiTokenRecord {
        id,
        user: UserName::parse(user).map_err(|e| corrupt("api_tokens.user_name", e))?,
        name,
        scope: scope.parse::<TokenScope>().map_err(|e| corrupt("api_tokens.scope", e))?,
        project: project
            .map(ProjectId::parse)
            .transpose()
            .map_err(|e| corrupt("api_tokens.project_id", e))?,
        created_at: Timestamp::from_millis(created_at),
        expires_at: expires_at.map(Timestamp::from_millis),
        revoked_at: revoked_at.map(Timestamp::from_millis),
        last_used_at: last_used_at.map(Timestamp::from_millis),
    })
}

fn membership_from((project, user, role): (String, String, String)) -> StoreResult<Membership> {
    Ok(Membership {
        project_id: ProjectId::parse(project).map_err(|e| corrupt("memberships.project_id", e))?,
        user: UserName::parse(user).map_err(|e| corrupt("memberships.user_name", e))?,
        role: role.parse::<Role>().map_err(|e| corrupt("memberships.role", e))?,
    })
}

fn project_from((id, name, created_at): (String, String, i64)) -> StoreResult<Project> {
    Ok(Project {
        id: ProjectId::parse(id).map_err(|e| corrupt("projects.id", e))?,
        name,
        created_at: Timestamp::from_millis(created_at),
    })
}

#[async_trait]
impl<B: Backend> IdentityStore for SqlStore<B> {
    async fn count_users(&self) -> StoreResult<u64> {
        let (count,): (i64,) =
            sql("SELECT COUNT(*) FROM users WHERE disabled_at IS NULL AND name <> ?")
                .bind(UserName::LOCAL)
                .fetch_one(&mut self.read())
                .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn ensure_local_admin(&self, now: Timestamp) -> StoreResult<()> {
        self.with_tx(async |tx| {
            let made = sql(
                "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, NULL, ?) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(UserName::LOCAL)
            .bind(Role::Admin.as_str())
            .bind(now.as_millis())
            .execute(tx)
            .await?;
            if made > 0 {
                let target = format!("user {} ({})", UserName::LOCAL, Role::Admin);
                audit_in(tx, &global(UserName::LOCAL, "user.create", &target), now).await?;
            }
            Ok(())
        })
        .await
    }

    async fn create_user(
        &self,
        user: &User,
        password_hash: Option<&str>,
        actor: &str,
    ) -> StoreResult<()> {
        self.with_tx(async |tx| {
            let inserted = sql(
                "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(user.name.as_str())
            .bind(user.role.as_str())
            .bind(password_hash)
            .bind(user.created_at.as_millis())
            .execute(tx)
            .await;
            match inserted {
                Err(err) if unique_violation(&err) => {
                    return Err(StoreError::UserExists(user.name.to_string()));
                }
                other => other?,
            };
            let target = format!("user {} ({})", user.name, user.role);
            audit_in(tx, &global(actor, "user.create", &target), user.created_at).await?;
            Ok(())
        })
        .await
    }

    async fn get_user(&self, name: &UserName) -> StoreResult<Option<(User, Option<String>)>> {
        let row: Option<UserRow> = sql(
            "SELECT name, role, password_hash, created_at, disabled_at FROM users WHERE name = ?",
        )
        .bind(name.as_str())
        .fetch_optional(&mut self.read())
        .await?;
        row.map(user_from).transpose()
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let rows: Vec<UserRow> = sql(
            "SELECT name, role, password_hash, created_at, disabled_at FROM users ORDER BY name",
        )
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(|row| user_from(row).map(|(user, _)| user)).collect()
    }

    async fn set_user_role(
        &self,
        name: &UserName,
        role: Role,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<User> {
        self.with_tx(async |tx| {
            let updated = sql("UPDATE users SET role = ? WHERE name = ?")
                .bind(role.as_str())
                .bind(name.as_str())
                .execute(tx)
                .await?;
            if updated == 0 {
                return Err(StoreError::UserNotFound(name.to_string()));
            }
            let target = format!("user {name} → {role}");
            audit_in(tx, &global(actor, "user.role", &target), now).await?;
            let row: UserRow = sql(
            "SELECT name, role, password_hash, created_at, disabled_at FROM users WHERE name = ?",
        )
        .bind(name.as_str())
        .fetch_one(tx)
        .await?;
            user_from(row).map(|(user, _)| user)
        })
        .await
    }

    async fn set_password(
        &self,
        name: &UserName,
        hash: &str,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        self.with_tx(async |tx| {
            let updated = sql("UPDATE users SET password_hash = ? WHERE name = ?")
                .bind(hash)
                .bind(name.as_str())
                .execute(tx)
                .await?;
            if updated == 0 {
                return Err(StoreError::UserNotFound(name.to_string()));
            }
            audit_in(tx, &global(actor, "user.password", name.as_str()), now).await?;
            Ok(())
        })
        .await
    }

    async fn create_project(
        &self,
        id: &ProjectId,
        name: &str,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<Project> {
        self.with_tx(async |tx| {
            let inserted = sql("INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)")
                .bind(id.as_str())
                .bind(name)
                .bind(now.as_millis())
                .execute(tx)
                .await;
            match inserted {
                Err(err) if unique_violation(&err) => {
                    return Err(StoreError::ProjectExists(id.to_string()));
                }
                other => other?,
            };
            audit_in(tx, &global(actor, "project.create", id.as_str()), now).await?;
            Ok(Project { id: id.clone(), name: name.to_owned(), created_at: now })
        })
        .await
    }

    async fn list_projects(&self) -> StoreResult<Vec<Project>> {
        let rows: Vec<(String, String, i64)> =
            sql("SELECT id, name, created_at FROM projects ORDER BY id")
                .fetch_all(&mut self.read())
                .await?;
        rows.into_iter().map(project_from).collect()
    }

    async fn get_project(&self, id: &ProjectId) -> StoreResult<Option<Project>> {
        let row: Option<(String, String, i64)> =
            sql("SELECT id, name, created_at FROM projects WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(&mut self.read())
                .await?;
        row.map(project_from).transpose()
    }

    async fn add_member(
        &self,
        membership: &Membership,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        self.with_tx(async |tx| {
            let project: Option<(String,)> = sql("SELECT id FROM projects WHERE id = ?")
                .bind(membership.project_id.as_str())
                .fetch_optional(tx)
                .await?;
            if project.is_none() {
                return Err(StoreError::ProjectNotFound(membership.project_id.to_string()));
            }
            let user: Option<(String,)> = sql("SELECT name FROM users WHERE name = ?")
                .bind(membership.user.as_str())
                .fetch_optional(tx)
                .await?;
            if user.is_none() {
                return Err(StoreError::UserNotFound(membership.user.to_string()));
            }
            let inserted = sql(
            "INSERT INTO memberships (project_id, user_name, role, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(membership.project_id.as_str())
        .bind(membership.user.as_str())
        .bind(membership.role.as_str())
        .bind(now.as_millis())
        .execute(tx)
        .await;
            match inserted {
                Err(err) if unique_violation(&err) => {
                    return Err(StoreError::AlreadyMember {
                        project: membership.project_id.to_string(),
                        user: membership.user.to_string(),
                    });
                }
                other => other?,
            };
            let target = format!("{} ({})", membership.user, membership.role);
            let entry = NewAudit {
                project: membership.project_id.as_str(),
                actor,
                action: "member.add",
                target: &target,
                reason: None,
            };
            audit_in(tx, &entry, now).await?;
            Ok(())
        })
        .await
    }

    async fn remove_member(
        &self,
        project: &ProjectId,
        user: &UserName,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<()> {
        self.with_tx(async |tx| {
            let removed = sql("DELETE FROM memberships WHERE project_id = ? AND user_name = ?")
                .bind(project.as_str())
                .bind(user.as_str())
                .execute(tx)
                .await?;
            if removed == 0 {
                return Err(StoreError::NotAMember {
                    project: project.to_string(),
                    user: user.to_string(),
                });
            }
            let entry = NewAudit {
                project: project.as_str(),
                actor,
                action: "member.remove",
                target: user.as_str(),
                reason: None,
            };
            audit_in(tx, &entry, now).await?;
            Ok(())
        })
        .await
    }

    async fn memberships_of(&self, user: &UserName) -> StoreResult<Vec<Membership>> {
        let rows: Vec<(String, String, String)> = sql(
            "SELECT project_id, user_name, role FROM memberships WHERE user_name = ? ORDER BY project_id",
        )
        .bind(user.as_str())
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(membership_from).collect()
    }

    async fn members_of(&self, project: &ProjectId) -> StoreResult<Vec<Membership>> {
        let rows: Vec<(String, String, String)> = sql(
            "SELECT project_id, user_name, role FROM memberships WHERE project_id = ? ORDER BY user_name",
        )
        .bind(project.as_str())
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter().map(membership_from).collect()
    }

    async fn create_api_token(
        &self,
        token: &NewApiToken,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<ApiTokenRecord> {
        self.with_tx(async |tx| {
            sql("INSERT INTO api_tokens (id, user_name, name, token_hash, scope, project_id, \
                 created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(&token.id)
            .bind(token.user.as_str())
            .bind(&token.name)
            .bind(&token.hash)
            .bind(token.scope.as_str())
            .bind(token.project.as_ref().map(ProjectId::as_str))
            .bind(now.as_millis())
            .bind(token.expires_at.map(Timestamp::as_millis))
            .execute(tx)
            .await?;
            let target = format!("token {} `{}` of {}", token.id, token.name, token.user);
            audit_in(tx, &global(actor, "token.create", &target), now).await?;
            Ok(ApiTokenRecord {
                id: token.id.clone(),
                user: token.user.clone(),
                name: token.name.clone(),
                scope: token.scope,
                project: token.project.clone(),
                created_at: now,
                expires_at: token.expires_at,
                revoked_at: None,
                last_used_at: None,
            })
        })
        .await
    }

    async fn list_api_tokens(&self, user: Option<&UserName>) -> StoreResult<Vec<ApiTokenRecord>> {
        let text = concat!(
            "SELECT ",
            token_columns!(),
            " FROM api_tokens WHERE (? IS NULL OR user_name = ?) ORDER BY id DESC"
        );
        let user = user.map(UserName::as_str);
        let rows: Vec<TokenRow> =
            sql(text).bind(user).bind(user).fetch_all(&mut self.read()).await?;
        rows.into_iter().map(token_from).collect()
    }

    async fn revoke_api_token(
        &self,
        id: &str,
        owner: Option<&UserName>,
        actor: &str,
        now: Timestamp,
    ) -> StoreResult<ApiTokenRecord> {
        self.with_tx(async |tx| {
            let text = concat!(
                "SELECT ",
                token_columns!(),
                " FROM api_tokens WHERE id = ? AND (? IS NULL OR user_name = ?)"
            );
            let owner = owner.map(UserName::as_str);
            let row: Option<TokenRow> =
                sql(text).bind(id).bind(owner).bind(owner).fetch_optional(tx).await?;
            let mut token =
                token_from(row.ok_or_else(|| StoreError::TokenNotFound(id.to_owned()))?)?;
            if token.revoked_at.is_none() {
                sql("UPDATE api_tokens SET revoked_at = ? WHERE id = ?")
                    .bind(now.as_millis())
                    .bind(id)
                    .execute(tx)
                    .await?;
                token.revoked_at = Some(now);
                let target = format!("token {id} `{}` of {}", token.name, token.user);
                audit_in(tx, &global(actor, "token.revoke", &target), now).await?;
            }
            Ok(token)
        })
        .await
    }

    async fn authenticate_token(
        &self,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ApiTokenRecord>> {
        let text = "SELECT t.id, t.user_name, t.name, t.scope, t.project_id, t.created_at, \
                   t.expires_at, t.revoked_at, t.last_used_at \
                   FROM api_tokens t JOIN users u ON u.name = t.user_name \
                   WHERE t.token_hash = ? AND t.revoked_at IS NULL \
                   AND (t.expires_at IS NULL OR t.expires_at > ?) AND u.disabled_at IS NULL";
        let row: Option<TokenRow> =
            sql(text).bind(hash).bind(now.as_millis()).fetch_optional(&mut self.read()).await?;
        let Some(token) = row.map(token_from).transpose()? else { return Ok(None) };
        let stale = token
            .last_used_at
            .is_none_or(|used| now.as_millis() - used.as_millis() >= LAST_USED_RESOLUTION_MS);
        if stale {
            let mut writer = self.writer().await;
            let conn = &mut writer.db();
            sql("UPDATE api_tokens SET last_used_at = ? WHERE id = ?")
                .bind(now.as_millis())
                .bind(&token.id)
                .execute(conn)
                .await?;
        }
        Ok(Some(token))
    }

    async fn store_refresh_token(
        &self,
        hash: &str,
        user: &UserName,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut writer = self.writer().await;
        let conn = &mut writer.db();
        // Expired refresh tokens go as new ones come: the table stays as small as the
        // number of live sessions.
        sql("DELETE FROM refresh_tokens WHERE expires_at < ?")
            .bind(now.as_millis())
            .execute(conn)
            .await?;
        sql(
            "INSERT INTO refresh_tokens (token_hash, user_name, created_at, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(user.as_str())
        .bind(now.as_millis())
        .bind(expires_at.as_millis())
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn consume_refresh_token(
        &self,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<Option<UserName>> {
        let mut writer = self.writer().await;
        let conn = &mut writer.db();
        let row: Option<(String,)> =
            sql("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL \
             AND expires_at > ? RETURNING user_name")
            .bind(now.as_millis())
            .bind(hash)
            .bind(now.as_millis())
            .fetch_optional(conn)
            .await?;
        row.map(|(user,)| UserName::parse(user).map_err(|e| corrupt("refresh_tokens.user_name", e)))
            .transpose()
    }

    async fn audit(&self, entry: NewAudit<'_>, now: Timestamp) -> StoreResult<()> {
        let mut writer = self.writer().await;
        let conn = &mut writer.db();
        audit_in(conn, &entry, now).await
    }

    async fn list_audit_entries(
        &self,
        project: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>> {
        let rows: Vec<(i64, String, String, String, String, Option<String>, i64)> = sql(
            "SELECT id, project_id, actor, action, target, reason, at FROM audit_log \
             WHERE (? IS NULL OR project_id = ?) AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(project)
        .bind(project)
        .bind(before)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&mut self.read())
        .await?;
        rows.into_iter()
            .map(|(id, project_id, actor, action, target, reason, at)| {
                Ok(AuditEntry {
                    id,
                    project_id: ProjectId::parse(project_id)
                        .map_err(|e| corrupt("audit_log.project_id", e))?,
                    actor,
                    action,
                    target,
                    reason,
                    at: Timestamp::from_millis(at),
                })
            })
            .collect()
    }

    async fn kept_response(
        &self,
        project: &ProjectId,
        route: &str,
        key: &str,
    ) -> StoreResult<Option<KeptResponse>> {
        let row: Option<(String, i64, String)> =
            sql("SELECT body_hash, status, response FROM idempotency_keys \
             WHERE project_id = ? AND route = ? AND key = ?")
            .bind(project.as_str())
            .bind(route)
            .bind(key)
            .fetch_optional(&mut self.read())
            .await?;
        Ok(row.map(|(body_hash, status, body)| KeptResponse {
            body_hash,
            status: u16::try_from(status).unwrap_or(500),
            body,
        }))
    }

    async fn keep_response(
        &self,
        project: &ProjectId,
        route: &str,
        key: &str,
        response: &KeptResponse,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut writer = self.writer().await;
        let conn = &mut writer.db();
        sql("INSERT INTO idempotency_keys (project_id, key, route, body_hash, status, \
             response, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
        .bind(project.as_str())
        .bind(key)
        .bind(route)
        .bind(&response.body_hash)
        .bind(i64::from(response.status))
        .bind(&response.body)
        .bind(now.as_millis())
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn forget_responses(&self, before: Timestamp) -> StoreResult<u64> {
        let mut writer = self.writer().await;
        let conn = &mut writer.db();
        let deleted = sql("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(before.as_millis())
            .execute(conn)
            .await?;
        Ok(deleted)
    }
}
