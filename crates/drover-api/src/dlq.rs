//! `/api/v1/dlq`: stage attempts that used every allowed try, waiting for a decision:
//! redrive (run the stage again) or discard.

use axum::Json;
use axum::extract::State;
use drover_domain::{AttemptId, ErrorCode};
use drover_store::DeadLetterQuery;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, Problem};
use crate::extract::{ApiPath, ApiQuery};
use crate::openapi::InProject;
use crate::wire::{AttemptView, DeadLetterPage, DeadLetterView};
use crate::{AppState, Caller};

const MAX_PAGE: u32 = 200;

fn parse_id(raw: &str) -> Result<AttemptId, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(ErrorCode::DeadLetterNotFound, format!("no dead letter with id {raw}"))
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DlqQuery {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(format = Uuid)]
    cursor: Option<String>,
}

/// Dead letters, newest first.
#[utoipa::path(
    get, path = "/api/v1/dlq", tag = "dlq", params(DlqQuery, InProject),
    responses(
        (status = 200, body = DeadLetterPage),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<DlqQuery>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<AttemptId>()
                .map_err(|_| ApiError::new(ErrorCode::InvalidQuery, "cursor is not a valid cursor"))
        })
        .transpose()?;
    let mut letters = state
        .engine()
        .dead_letters(&caller.project, &DeadLetterQuery { before, limit: limit + 1 })
        .await?;
    let next_cursor = (letters.len() > limit as usize).then(|| {
        letters.truncate(limit as usize);
        letters.last().map(|a| a.id.to_string())
    });
    Ok(Json(DeadLetterPage {
        items: letters.iter().map(DeadLetterView::from).collect(),
        next_cursor: next_cursor.flatten(),
    }))
}

/// Runs the dead letter's stage again: its run reopens and a new attempt is queued.
#[utoipa::path(
    post, path = "/api/v1/dlq/{id}/redrive", tag = "dlq",
    params(("id" = String, Path, description = "Dead-lettered attempt id"), InProject),
    responses(
        (status = 200, description = "The new attempt", body = AttemptView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not waiting in the DLQ", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn redrive(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AttemptView>, ApiError> {
    let retry = state.engine().redrive(&caller.project, parse_id(&id)?).await?;
    Ok(Json(AttemptView::from(&retry)))
}

/// Dismisses the dead letter; its run stays failed.
#[utoipa::path(
    post, path = "/api/v1/dlq/{id}/discard", tag = "dlq",
    params(("id" = String, Path, description = "Dead-lettered attempt id"), InProject),
    responses(
        (status = 200, description = "The discarded attempt", body = DeadLetterView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not waiting in the DLQ", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn discard(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    let letter = state.engine().discard(&caller.project, parse_id(&id)?).await?;
    Ok(Json(DeadLetterView::from(&letter)))
}
