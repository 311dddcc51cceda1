//! `POST /api/v1/runs/{id}/stages/{stage}/approve|reject`: a person's answer to a gated
//! stage (`approval = true`), which waits in `waiting_approval` until then.

use axum::Json;
use axum::extract::State;
use drover_domain::{ErrorCode, StageName};
use drover_store::ApprovalDecision;

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::{ApiJson, ApiPath};
use crate::openapi::InProject;
use crate::runs::parse_run_id;
use crate::wire::{ApprovalBody, AttemptView, RejectionBody, RunView};
use crate::{AppState, Caller};

/// The most characters a reason may have.
pub(crate) const MAX_REASON_CHARS: usize = 2_000;

/// Approve a gated stage: it becomes due and the run goes on.
#[utoipa::path(
    post, path = "/api/v1/runs/{id}/stages/{stage}/approve", tag = "runs",
    params(("id" = String, Path, description = "Run id"), ("stage" = String, Path, description = "Stage name"), InProject),
    request_body(content = Option<ApprovalBody>, description = "Optional reason"),
    responses(
        (status = 200, body = RunView, description = "The run, with its attempts"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The stage is not waiting for approval, or the run finished", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid reason", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn approve(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, stage)): ApiPath<(String, String)>,
    body: Option<ApiJson<ApprovalBody>>,
) -> Result<Json<RunView>, ApiError> {
    let reason = body.and_then(|ApiJson(body)| body.reason);
    decide(&state, &caller, &id, &stage, true, reason).await
}

/// Reject a gated stage: it fails with the reason, and so does the run.
#[utoipa::path(
    post, path = "/api/v1/runs/{id}/stages/{stage}/reject", tag = "runs",
    params(("id" = String, Path, description = "Run id"), ("stage" = String, Path, description = "Stage name"), InProject),
    request_body = RejectionBody,
    responses(
        (status = 200, body = RunView, description = "The failed run, with its attempts"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The stage is not waiting for approval, or the run finished", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Missing or invalid reason", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn reject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, stage)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<RejectionBody>,
) -> Result<Json<RunView>, ApiError> {
    if body.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(ApiError::validation(vec![FieldError {
            field: "reason".to_owned(),
            message: "say why the stage is rejected".to_owned(),
        }]));
    }
    decide(&state, &caller, &id, &stage, false, body.reason).await
}

async fn decide(
    state: &AppState,
    caller: &Caller,
    id: &str,
    stage: &str,
    approve: bool,
    reason: Option<String>,
) -> Result<Json<RunView>, ApiError> {
    let run_id = parse_run_id(id)?;
    let stage = StageName::parse(stage).map_err(|err| {
        ApiError::new(ErrorCode::NotWaitingApproval, format!("no stage `{stage}`: {}", err.message))
    })?;
    let reason = reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
    if let Some(reason) = &reason
        && (reason.chars().count() > MAX_REASON_CHARS
            || reason.chars().any(|c| c.is_control() && c != '\n'))
    {
        return Err(ApiError::validation(vec![FieldError {
            field: "reason".to_owned(),
            message: format!("at most {MAX_REASON_CHARS} characters, no control characters"),
        }]));
    }
    let decision = ApprovalDecision { approve, by: caller.user.clone(), reason };
    let outcome =
        state.engine().decide_approval(&caller.project, run_id, &stage, &decision).await?;
    let attempts = state.engine().store().list_attempts(&caller.project, run_id).await?;
    let mut view = RunView::new(&outcome.run, None);
    view.attempts = Some(attempts.iter().map(AttemptView::from).collect());
    Ok(Json(view))
}
