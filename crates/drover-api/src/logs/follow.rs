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
    let mut tail = FileTail::new(path.to_path_buf());
    loop {
        match tail.send_new(events).await {
            None => return false,
            Some(true) => continue,
            Some(false) => {}
        }
        if attempt_over(state, project, run, attempt).await {
            return tail.finish(events).await;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Reads a growing log file from where it last stopped and sends its complete lines. A file
/// that shrank was rotated (renamed to `.1`, a new one started): the rest of the rotated
/// file is read first, then the new one from its start.
pub(crate) struct FileTail {
    path: std::path::PathBuf,
    offset: u64,
    partial: Vec<u8>,
    buffer: Vec<u8>,
}

impl FileTail {
    pub(crate) fn new(path: std::path::PathBuf) -> Self {
        Self { path, offset: 0, partial: Vec::new(), buffer: vec![0u8; CHUNK] }
    }

    /// Sends what was written since the last call: `Some(true)` if there was something,
    /// `Some(false)` if not, `None` if the client went away.
    pub(crate) async fn send_new(
        &mut self,
        events: &tokio::sync::mpsc::Sender<Event>,
    ) -> Option<bool> {
        let size = tokio::fs::metadata(&self.path).await.map_or(0, |m| m.len());
        if size < self.offset {
            let mut rotated = self.path.as_os_str().to_owned();
            rotated.push(".1");
            let rotated = std::path::PathBuf::from(rotated);
            self.read_from(&rotated, events).await?;
            self.offset = 0;
        }
        let path = self.path.clone();
        self.read_from(&path, events).await
    }

    async fn read_from(
        &mut self,
        path: &std::path::Path,
        events: &tokio::sync::mpsc::Sender<Event>,
    ) -> Option<bool> {
        let mut read_any = false;
        let Ok(mut file) = tokio::fs::File::open(path).await else { return Some(false) };
        if file.seek(SeekFrom::Start(self.offset)).await.is_err() {
            return Some(false);
        }
        while let Ok(n) = file.read(&mut self.buffer).await {
            if n == 0 {
                break;
            }
            read_any = true;
            self.offset += n as u64;
            self.partial.extend_from_slice(&self.buffer[..n]);
            while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                if !send_line(events, &line[..line.len() - 1]).await {
                    return None;
                }
            }
            if self.partial.len() >= CHUNK {
                let line: Vec<u8> = std::mem::take(&mut self.partial);
                if !send_line(events, &line).await {
                    return None;
                }
            }
        }
        Some(read_any)
    }

    /// Sends an unfinished last line; false if the client went away.
    pub(crate) async fn finish(&mut self, events: &tokio::sync::mpsc::Sender<Event>) -> bool {
        self.partial.is_empty() || send_line(events, &std::mem::take(&mut self.partial)).await
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(receiver: &mut tokio::sync::mpsc::Receiver<Event>, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        for _ in 0..n {
            let event = receiver.recv().await.unwrap();
            // `Event` shows only its wire form: take the data line.
            let wire = format!("{event:?}");
            seen.push(wire);
        }
        seen
    }

    #[tokio::test]
    async fn a_tail_reads_on_from_where_it_stopped_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.log");
        let (events, mut receiver) = tokio::sync::mpsc::channel(64);
        let mut tail = FileTail::new(path.clone());
        assert_eq!(tail.send_new(&events).await, Some(false), "no file yet");

        std::fs::write(&path, "one\ntwo\nthr").unwrap();
        assert_eq!(tail.send_new(&events).await, Some(true));
        let seen = lines(&mut receiver, 2).await;
        assert!(seen[0].contains("one") && seen[1].contains("two"), "{seen:?}");
        assert_eq!(tail.send_new(&events).await, Some(false), "nothing new");

        // The rest of the line and one more arrive; then the file is rotated.
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut file, b"ee\nfour\n").unwrap();
        drop(file);
        std::fs::rename(&path, dir.path().join("web.log.1")).unwrap();
        std::fs::write(&path, "five\n").unwrap();
        assert_eq!(tail.send_new(&events).await, Some(true));
        let seen = lines(&mut receiver, 3).await;
        for (seen, want) in seen.iter().zip(["three", "four", "five"]) {
            assert!(seen.contains(want), "{seen} should be {want}");
        }
        assert!(receiver.try_recv().is_err(), "nothing twice");
    }
}
