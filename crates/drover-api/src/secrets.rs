//! `/api/v1/secrets`: the caller's project's secrets. Set one (`PUT …/{name}` with
//! `{"value": "…"}`), list them (names and times, never values) and delete one. Values
//! go in and never come out: no response, error body or log line of this module holds
//! one, and the body is read by hand so that even a malformed one is never quoted back.
//! Agents receive the values as environment variables, through the engine's vault.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use drover_domain::ErrorCode;
use drover_secrets::Vault;
use drover_store::SecretMeta;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::openapi::InProject;
use crate::wire::time;
use crate::{AppState, Caller};

/// The body of `PUT /secrets/{name}`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretBody {
    #[schema(schema_with = crate::wire::rules::secret_value)]
    pub value: String,
}

impl std::fmt::Debug for SetSecretBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecretBody").finish_non_exhaustive()
    }
}

/// A secret, without its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&SecretMeta> for SecretView {
    fn from(meta: &SecretMeta) -> Self {
        Self {
            name: meta.name.to_string(),
            created_at: time(meta.created_at),
            updated_at: time(meta.updated_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretList {
    pub items: Vec<SecretView>,
}

fn vault(state: &AppState) -> Result<&Vault, ApiError> {
    state.engine().vault().map(AsRef::as_ref).ok_or_else(|| {
        ApiError::new(ErrorCode::ServiceUnavailable, "this server keeps no secrets (no master key)")
    })
}

/// The value of a `{"value": "…"}` body. Every complaint names the field, never its
/// content.
fn value_of(body: serde_json::Value) -> Result<String, ApiError> {
    let serde_json::Value::Object(mut fields) = body else {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            r#"the body must be a JSON object: {"value": "…"}"#,
        ));
    };
    if let Some(unknown) = fields.keys().find(|key| key.as_str() != "value") {
        return Err(ApiError::new(
            ErrorCode::UnknownField,
            format!("unknown field `{unknown}`; the only field is `value`"),
        ));
    }
    match fields.remove("value") {
        Some(serde_json::Value::String(value)) => Ok(value),
        Some(_) => Err(ApiError::validation(vec![FieldError {
            field: "value".to_owned(),
            message: "must be a string".to_owned(),
        }])),
        None => Err(ApiError::validation(vec![FieldError {
            field: "value".to_owned(),
            message: "is required".to_owned(),
        }])),
    }
}

/// Set a secret of the caller's project (created, or replaced). Agents of the project's
/// runs receive it as the environment variable `{name}`; its value is redacted from their
/// logs, outputs and artifacts.
#[utoipa::path(
    put, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "An environment variable name: `[A-Z_][A-Z0-9_]*`, at most 128 characters, not `PATH`, `HOME`, `PWD`, `SHELL`, `USER` nor starting with `DROVER_`", pattern = "^[A-Z_][A-Z0-9_]{0,127}$"), InProject),
    request_body = SetSecretBody,
    responses(
        (status = 201, description = "Created", body = SecretView),
        (status = 200, description = "Replaced", body = SecretView),
        (status = 422, description = "`validation_failed`: an invalid or reserved name, or an invalid value (never quoted)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`service_unavailable`: the server keeps no secrets (no master key)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    let value = value_of(body)?;
    let (meta, created) = vault(&state)?.set(&caller.project, &name, &value, &caller.user).await?;
    tracing::info!(project = %caller.project, secret = %meta.name, created, "secret set");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(SecretView::from(&meta))).into_response())
}

/// The caller's project's secrets, by name; never their values.
#[utoipa::path(
    get, path = "/api/v1/secrets", tag = "secrets",
    params(InProject),
    responses(
        (status = 200, body = SecretList),
        (status = 503, description = "`service_unavailable`: the server keeps no secrets (no master key)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SecretList>, ApiError> {
    let secrets = vault(&state)?.list(&caller.project).await?;
    Ok(Json(SecretList { items: secrets.iter().map(SecretView::from).collect() }))
}

/// Delete a secret of the caller's project. Runs dispatched from now on no longer get it.
#[utoipa::path(
    delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "The secret's name", pattern = "^[A-Z_][A-Z0-9_]{0,127}$"), InProject),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`secret_not_found`: no such secret", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed`: not a secret's name", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`service_unavailable`: the server keeps no secrets (no master key)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    vault(&state)?.delete(&caller.project, &name, &caller.user).await?;
    tracing::info!(project = %caller.project, secret = %name, "secret deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_bad_body_is_refused_without_quoting_what_was_sent() {
        for (body, code) in [
            (json!("tok-0123456789"), ErrorCode::InvalidBody),
            (json!({ "value": 123456789 }), ErrorCode::ValidationFailed),
            (json!({}), ErrorCode::ValidationFailed),
            (json!({ "value": "tok-0123456789", "other": 1 }), ErrorCode::UnknownField),
        ] {
            let err = value_of(body.clone()).unwrap_err();
            assert_eq!(err.code, code, "{body}");
            let shown = format!("{} {:?}", err.detail, err.errors);
            assert!(!shown.contains("0123456789"), "{shown}");
        }
        assert_eq!(value_of(json!({ "value": "tok-0123456789" })).unwrap(), "tok-0123456789");
        let body = SetSecretBody { value: "tok-0123456789".into() };
        assert!(!format!("{body:?}").contains("tok-"));
    }
}
