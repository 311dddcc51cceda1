//! `GET /api/v1/usage`: the tokens and cost agents reported, summed per stage, run and
//! submitter, over a window of the project's runs.

use axum::Json;
use axum::extract::State;
use drover_domain::{Timestamp, Usage};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, FieldError, Problem};
use crate::extract::ApiQuery;
use crate::openapi::InProject;
use crate::wire::{UsageReportView, UsageRow, UsageView};
use crate::{AppState, Caller};

/// The window when none is asked for.
const DEFAULT_WINDOW_HOURS: u64 = 24 * 30;
/// The widest window (one year).
const MAX_WINDOW_HOURS: u64 = 24 * 366;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    /// Runs created in the last this many hours (default 720, at most 8784).
    #[param(minimum = 1, maximum = 8784)]
    hours: Option<u64>,
}

/// Reported usage of the project's recent runs.
#[utoipa::path(
    get, path = "/api/v1/usage", tag = "runs", params(UsageQuery, InProject),
    responses(
        (status = 200, body = UsageReportView),
        (status = 422, description = "Invalid window", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn report(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<UsageReportView>, ApiError> {
    let hours = query.hours.unwrap_or(DEFAULT_WINDOW_HOURS);
    if !(1..=MAX_WINDOW_HOURS).contains(&hours) {
        return Err(ApiError::validation(vec![FieldError {
            field: "hours".to_owned(),
            message: format!("must be between 1 and {MAX_WINDOW_HOURS}"),
        }]));
    }
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let since = Timestamp::from_millis(now.as_millis().saturating_sub((hours * 3_600_000) as i64));
    let report = state.engine().store().usage_report(&caller.project, since).await?;
    let row = |key: String, usage: Usage| UsageRow {
        key,
        tokens: usage.tokens,
        cost_usd: usage.cost_usd,
    };
    Ok(Json(UsageReportView {
        hours,
        total: UsageView { tokens: report.total.tokens, cost_usd: report.total.cost_usd },
        by_stage: report.by_stage.into_iter().map(|(k, u)| row(k, u)).collect(),
        by_run: report.by_run.into_iter().map(|(k, u)| row(k.to_string(), u)).collect(),
        by_user: report.by_user.into_iter().map(|(k, u)| row(k, u)).collect(),
    }))
}
