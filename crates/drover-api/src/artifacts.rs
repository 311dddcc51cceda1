//! `GET /api/v1/runs/{id}/artifacts` and `…/artifacts/{name}`: what each stage attempt
//! left besides its result: its log, an `llm` agent's transcript, the diff it made in a
//! git workspace, and the deployed app's output. Names come from the run's own log
//! directory listing, so a request can only ever name one of those files.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use drover_domain::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, Problem};
use crate::extract::{ApiPath, ApiQuery};
use crate::openapi::InProject;
use crate::runs::find_run;
use crate::{AppState, Caller};

/// One file a stage attempt left.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArtifactView {
    /// The file name, e.g. `scaffold.1.diff`; download it at `…/artifacts/{name}`.
    pub name: String,
    /// `app` for the deployed app's output.
    pub stage: String,
    pub attempt: Option<u32>,
    /// `log`, `transcript` or `diff`.
    pub kind: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArtifactList {
    pub items: Vec<ArtifactView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ArtifactsQuery {
    /// Only this stage's (or `app`).
    stage: Option<String>,
}

/// A run's artifacts, in stage and attempt order.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}/artifacts", tag = "runs",
    params(("id" = String, Path, description = "Run id"), ArtifactsQuery, InProject),
    responses(
        (status = 200, body = ArtifactList),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ArtifactsQuery>,
) -> Result<Json<ArtifactList>, ApiError> {
    let run = find_run(&state, &caller.project, &id).await?;
    let dir = state.engine().layout().logs_dir(run.id);
    let mut items = Vec::new();
    if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if name.ends_with(".outputs") && entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                output_files(&dir, &name, query.stage.as_deref(), &mut items).await;
                continue;
            }
            let Some(mut artifact) = describe(&name) else { continue };
            if query.stage.as_deref().is_some_and(|s| s != artifact.stage) {
                continue;
            }
            artifact.size_bytes = entry.metadata().await.map(|m| m.len()).unwrap_or(0);
            items.push(artifact);
        }
    }
    // Pipeline order is attempt order in time; the log files' stages sort by the run's
    // attempts.
    let attempts = state.engine().store().list_attempts(&caller.project, run.id).await?;
    let position = |a: &ArtifactView| {
        attempts
            .iter()
            .position(|t| t.stage.as_str() == a.stage && Some(t.attempt) == a.attempt)
            .unwrap_or(usize::MAX)
    };
    items.sort_by(|a, b| position(a).cmp(&position(b)).then_with(|| a.name.cmp(&b.name)));
    Ok(Json(ArtifactList { items }))
}

/// One artifact's bytes.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}/artifacts/{name}", tag = "runs",
    params(("id" = String, Path, description = "Run id"), ("name" = String, Path, description = "Artifact name (a declared output's includes its path: `test.1.outputs/reports/junit.xml`)"), InProject),
    responses(
        (status = 200, description = "The file: a log as `text/plain`, a diff as `text/x-diff`, a transcript as `application/json`; a declared output file, whatever it holds, as `application/octet-stream` with `Content-Disposition: attachment`",
         headers(("Content-Disposition" = String, description = "`attachment; filename=\"…\"` for a declared output file")),
         content((String = "text/plain"), (String = "text/x-diff"), (serde_json::Value = "application/json"), (String = "application/octet-stream"))),
        (status = 404, description = "No such run or artifact", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn download(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &caller.project, &id).await?;
    let missing = || {
        ApiError::new(
            ErrorCode::ArtifactNotFound,
            format!("run {} has no artifact `{name}`", run.id),
        )
    };
    let artifact = describe(&name).ok_or_else(missing)?;
    let path = state.engine().layout().logs_dir(run.id).join(&artifact.name);
    let file = tokio::fs::File::open(&path).await.map_err(|_| missing())?;
    let body = Body::from_stream(ReaderStream::new(file));
    // drover writes logs, diffs and transcripts itself; a declared output file is whatever
    // the stage left, so it is offered as bytes to save, never as something to render.
    let content_type = match artifact.kind.as_str() {
        "transcript" => "application/json",
        "diff" => "text/x-diff; charset=utf-8",
        "output" => {
            let file_name = artifact.name.rsplit('/').next().unwrap_or(&artifact.name);
            let headers = [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (header::CONTENT_DISPOSITION, attachment(file_name)),
            ];
            return Ok((headers, body).into_response());
        }
        _ => "text/plain; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// `Content-Disposition: attachment` naming `file_name` (RFC 6266): an ASCII fallback,
/// and the exact name percent-encoded as UTF-8.
fn attachment(file_name: &str) -> String {
    let fallback: String = file_name
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' })
        .collect();
    let exact: String = file_name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}")
}

/// The files a stage attempt declared as outputs, kept under `STAGE.N.outputs/`, each
/// named `STAGE.N.outputs/RELATIVE/PATH`.
async fn output_files(
    dir: &std::path::Path,
    top: &str,
    stage: Option<&str>,
    items: &mut Vec<ArtifactView>,
) {
    /// Files listed per attempt, at most (the worker keeps no more).
    const MAX_FILES: usize = 1_000;
    let mut todo = vec![top.to_owned()];
    let mut listed = 0;
    while let Some(relative) = todo.pop() {
        let Ok(mut entries) = tokio::fs::read_dir(dir.join(&relative)).await else { continue };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Some(file) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let name = format!("{relative}/{file}");
            let Ok(metadata) = entry.metadata().await else { continue };
            if metadata.is_dir() {
                todo.push(name);
                continue;
            }
            let Some(mut artifact) = describe(&name) else { continue };
            if stage.is_some_and(|s| s != artifact.stage) {
                continue;
            }
            artifact.size_bytes = metadata.len();
            items.push(artifact);
            listed += 1;
            if listed >= MAX_FILES {
                return;
            }
        }
    }
}

/// What a log-directory file name says: `STAGE.N.log`, `STAGE.N.transcript.json`,
/// `STAGE.N.diff`, `STAGE.N.outputs/PATH` (a declared output file), `app.log`. Anything
/// else (including any other path) is not an artifact.
fn describe(name: &str) -> Option<ArtifactView> {
    if name == "app.log" {
        return Some(artifact(name, "app", None, "log"));
    }
    if let Some((top, path)) = name.split_once(".outputs/") {
        let safe = path.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        let (stage, attempt) = top.rsplit_once('.')?;
        let attempt: u32 = attempt.parse().ok()?;
        drover_domain::StageName::parse(stage).ok()?;
        return safe.then(|| artifact(name, stage, Some(attempt), "output"));
    }
    let (stem, kind) = [(".transcript.json", "transcript"), (".diff", "diff"), (".log", "log")]
        .into_iter()
        .find_map(|(suffix, kind)| Some((name.strip_suffix(suffix)?, kind)))?;
    let (stage, attempt) = stem.rsplit_once('.')?;
    let attempt: u32 = attempt.parse().ok()?;
    drover_domain::StageName::parse(stage).ok()?;
    Some(artifact(name, stage, Some(attempt), kind))
}

fn artifact(name: &str, stage: &str, attempt: Option<u32>, kind: &str) -> ArtifactView {
    ArtifactView {
        name: name.to_owned(),
        stage: stage.to_owned(),
        attempt,
        kind: kind.to_owned(),
        size_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_file_is_offered_under_its_own_name() {
        assert_eq!(
            attachment("junit.xml"),
            "attachment; filename=\"junit.xml\"; filename*=UTF-8''junit.xml"
        );
        assert_eq!(
            attachment("r\u{e9}sum\u{e9} \"1\".txt"),
            "attachment; filename=\"r_sum___1_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.txt"
        );
    }

    #[test]
    fn only_the_log_directorys_own_names_are_artifacts() {
        let diff = describe("scaffold.2.diff").unwrap();
        assert_eq!(
            (diff.stage.as_str(), diff.attempt, diff.kind.as_str()),
            ("scaffold", Some(2), "diff")
        );
        assert_eq!(describe("plan.1.transcript.json").unwrap().kind, "transcript");
        assert_eq!(describe("app.log").unwrap().stage, "app");
        let output = describe("test.1.outputs/reports/junit.xml").unwrap();
        assert_eq!((output.stage.as_str(), output.kind.as_str()), ("test", "output"));
        for bad in [
            "../drover.db",
            "x.log",
            "a/b.1.log",
            "scaffold.one.log",
            ".1.log",
            "s.1.git-index",
            "test.1.outputs/../../drover.db",
            "test.1.outputs//etc/passwd",
            "test.1.outputs/",
        ] {
            assert!(describe(bad).is_none(), "{bad}");
        }
    }
}
