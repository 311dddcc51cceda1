//! `GET /api/v1/runs/{id}/logs`: the output of a run's stage attempts (and of its deployed
//! app), streamed from disk in pipeline order. Nothing is buffered whole in memory.

use std::path::PathBuf;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::io::ReaderStream;
use utoipa::IntoParams;

use crate::error::{ApiError, Problem};
use crate::extract::{ApiPath, ApiQuery};
use crate::openapi::InProject;
use crate::runs::find_run;
use crate::{AppState, Caller};

mod follow;

pub(crate) use follow::FileTail;

/// The pseudo-stage that names the deployed app's output.
const APP: &str = "app";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    /// Only this stage (or `app` for the deployed app's output).
    stage: Option<String>,
    /// Only this attempt number.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4294967295_u64)]
    attempt: Option<u32>,
    /// Follow as server-sent events: every attempt's lines as they are written
    /// (`attempt` events open each attempt's section, `line` events carry its output),
    /// then `end` once the run has finished and everything was sent.
    #[serde(default)]
    follow: bool,
}

/// A run's logs as plain text, one section per stage attempt.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}/logs", tag = "runs",
    params(("id" = String, Path, description = "Run id"), LogsQuery, InProject),
    responses(
        (status = 200, description = "Plain text, sections headed `==> stage attempt N (status) <==`; with `follow`, server-sent events: `attempt` (`{stage, attempt}`) opens each attempt's lines, `line` carries one, `end` (the run id) closes the stream once the run has finished",
         content((String = "text/plain"), (String = "text/event-stream"))),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn run_logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &caller.project, &id).await?;
    if query.follow {
        return Ok(follow::follow(state, caller.project, run.id, query.stage).into_response());
    }
    let layout = state.engine().layout();
    let attempts = state.engine().store().list_attempts(&caller.project, run.id).await?;
    let wanted_stage = query.stage.as_deref();
    let mut sections: Vec<(String, PathBuf)> = attempts
        .iter()
        .filter(|a| wanted_stage.is_none_or(|s| s == a.stage.as_str()))
        .filter(|a| query.attempt.is_none_or(|n| n == a.attempt))
        .map(|a| {
            let header = format!("==> {} attempt {} ({}) <==\n", a.stage, a.attempt, a.status);
            (header, layout.attempt_log(run.id, &a.stage, a.attempt))
        })
        .collect();
    let app_log = layout.app_log(run.id);
    if wanted_stage.is_none_or(|s| s == APP) && query.attempt.is_none() && app_log.exists() {
        sections.push(("==> app (deployed app output) <==\n".to_owned(), app_log));
    }

    let body = futures::stream::iter(sections).flat_map(|(header, path)| {
        let header =
            futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(header)) });
        let contents = futures::stream::once(async move {
            match tokio::fs::File::open(&path).await {
                Ok(file) => ReaderStream::new(file).boxed(),
                Err(_) => {
                    futures::stream::once(async { Ok(Bytes::from_static(b"(no output yet)\n")) })
                        .boxed()
                }
            }
        })
        .flatten();
        header.chain(contents).chain(futures::stream::once(async { Ok(Bytes::from_static(b"\n")) }))
    });
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body))
        .into_response())
}
