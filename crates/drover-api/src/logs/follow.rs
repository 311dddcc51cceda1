//! `GET /api/v1/runs/{id}/logs?follow=true`: a run's stage output as it is written, as
//! server-sent events. Each attempt's log file is tailed in pipeline order (by polling
//! its length, which works for any writer, local or not); the stream ends when the run
//! has finished and the last attempt's file is drained. Memory per follower is one
//! bounded read buffer.

use std::convert::Infallible;
use std::io::SeekFrom;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use drover_domain::{ProjectId, RunId, StageAttempt};
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::AppState;

/// How often a quiet log file is looked at again.
const POLL: Duration = Duration::from_millis(150);
/// Bytes read at once; also the longest line sent whole.
const CHUNK: usize = 16 * 1024;

pub(super) fn follow(
    state: AppState,
    project: ProjectId,
    run: RunId,
    stage: Option<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (events, receiver) = tokio::sync::mpsc::channel::<Event>(64);
    let draining = state.inner.draining.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = draining.cancelled() => {}
            () = tail_run(&state, &project, run, stage.as_deref(), &events) => {}
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver).map(Ok);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Sends every wanted attempt's output, in order, until the run is over.
async fn tail_run(
    state: &AppState,
    project: &ProjectId,
    run: RunId,
    stage: Option<&str>,
    events: &tokio::sync::mpsc::Sender<Event>,
) {
    let layout = state.engine().layout().clone();
    let mut done = 0usize; // attempts (in list order) already followed to their end
    loop {
        let Ok(attempts) = state.engine().store().list_attempts(project, run).await else {
            return;
        };
        let wanted: Vec<&StageAttempt> =
            attempts.iter().filter(|a| stage.is_none_or(|s| s == a.stage.as_str())).collect();
        let run_over = match state.engine().store().get_run(project, run).await {
            Ok(Some(run)) => run.status.is_terminal(),
            _ => true,
        };
        if let Some(attempt) = wanted.get(done) {
            let header = json!({ "stage": attempt.stage, "attempt": attempt.attempt });
            if events
                .send(Event::default().event("attempt").data(header.to_string()))
                .await
                .is_err()
            {
                return;
            }
            let path = layout.attempt_log(run, &attempt.stage, attempt.attempt);
            if !tail_file(state, project, run, attempt, &path, events).await {
                return;
            }
            done += 1;
            continue;
        }
        if run_over {
            let _ = events.send(Event::default().event("end").data(run.to_string())).await;
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends `path`'s lines as they are written, until its attempt has ended and the file is
/// drained. False if the client went away.
async fn tail_file(
    state: &AppState,
    project: &ProjectId,
    run: RunId,
    attempt: &StageAttempt,
    path: &std::path::Path,
    events: &tokio::sync::mpsc::Sender<Event>,
) -> bool {
    let mut offset = 0u64;
    let mut partial: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let mut read_any = false;
        if let Ok(mut file) = tokio::fs::File::open(path).await
            && file.seek(SeekFrom::Start(offset)).await.is_ok()
        {
            while let Ok(n) = file.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                read_any = true;
                offset += n as u64;
                partial.extend_from_slice(&buffer[..n]);
                while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=end).collect();
                    if !send_line(events, &line[..line.len() - 1]).await {
                        return false;
                    }
                }
                if partial.len() >= CHUNK {
                    let line: Vec<u8> = std::mem::take(&mut partial);
                    if !send_line(events, &line).await {
                        return false;
                    }
                }
            }
        }
        if read_any {
            continue;
        }
        if attempt_over(state, project, run, attempt).await {
            return partial.is_empty() || send_line(events, &partial).await;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn send_line(events: &tokio::sync::mpsc::Sender<Event>, line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    events.send(Event::default().event("line").data(text)).await.is_ok()
}

/// Whether the attempt has ended (or can no longer be found).
async fn attempt_over(
    state: &AppState,
    project: &ProjectId,
    run: RunId,
    attempt: &StageAttempt,
) -> bool {
    match state.engine().store().list_attempts(project, run).await {
        Ok(attempts) => {
            attempts.iter().find(|a| a.id == attempt.id).is_none_or(|a| a.status.is_terminal())
        }
        Err(_) => true,
    }
}
