//! `drover chat`: talk with an `llm` agent from the terminal. Each line is a message; the
//! reply streams in as the model writes it. The conversation is a session kept by the
//! server (`--session` resumes one). Lines starting with `/` act on drover instead:
//! `/run` submits a run (in the session's environment) and follows it, `/env` shows the
//! environment, `/logs` prints a run's logs. Ctrl-C during a reply stops it (what had
//! arrived is kept in the session); at the prompt it leaves, like Ctrl-D. If the server
//! goes away the session stays: say it again once it is back, or resume later.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use drover_api::Problem;
use drover_api::chat::{
    ChatDelta, ChatMessageBody, ChatMessageView, ChatSessionView, ChatTranscriptView,
    CreateChatSessionBody,
};
use drover_config::Config;
use drover_server::Mode;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::env::{print_env, print_env_list};
use crate::cli::{ChatArgs, GlobalArgs};
use crate::client::{Client, ClientError, encode};
use crate::output::{self, Progress};
use crate::target::Target;

/// Messages of a resumed session shown before the prompt.
const RESUME_SHOWN: usize = 10;

const HELP: &str = "\
  /run [--pipeline NAME] REQUEST   submit a run (in the chat's environment) and follow it
  /env [NAME]                      show the chat's environment, NAME, or list them all
  /logs RUN [STAGE]                print a run's logs
  /history                         show this session's messages
  /session                         show this session's id, agent and environment
  /help                            this list
  /quit                            leave (Ctrl-D or Ctrl-C at the prompt do too)
Anything else is said to the agent; Ctrl-C during a reply stops it.";

pub(crate) async fn chat(
    global: &GlobalArgs,
    config: &Config,
    args: &ChatArgs,
) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Full).await?;
    let outcome = Chat::start(global, &target.client, args).await;
    let outcome = match outcome {
        Ok(mut chat) => chat.repl().await,
        Err(err) => Err(err),
    };
    target.close().await?;
    outcome
}

/// One terminal's conversation.
struct Chat<'a> {
    global: &'a GlobalArgs,
    client: &'a Client,
    session: ChatSessionView,
    /// Whether a person types (prompts and name tags are shown only then).
    interactive: bool,
}

/// What a line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Say(&'a str),
    Run { pipeline: Option<&'a str>, request: &'a str },
    Env(Option<&'a str>),
    Logs { run: &'a str, stage: Option<&'a str> },
    History,
    Session,
    Help,
    Quit,
    Unknown(&'a str),
    Usage(&'static str),
    Nothing,
}

impl<'a> Line<'a> {
    fn parse(line: &'a str) -> Self {
        let line = line.trim();
        if line.is_empty() {
            return Self::Nothing;
        }
        let Some(command) = line.strip_prefix('/') else { return Self::Say(line) };
        let (name, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
        let rest = rest.trim();
        let mut words = rest.split_whitespace();
        match name {
            "run" => {
                let (pipeline, request) = match rest.strip_prefix("--pipeline") {
                    Some(after) => {
                        let after = after.trim_start();
                        let (pipeline, request) =
                            after.split_once(char::is_whitespace).unwrap_or((after, ""));
                        (Some(pipeline).filter(|p| !p.is_empty()), request.trim())
                    }
                    None => (None, rest),
                };
                if request.is_empty() {
                    Self::Usage("/run [--pipeline NAME] REQUEST")
                } else {
                    Self::Run { pipeline, request }
                }
            }
            "env" => Self::Env(words.next()),
            "logs" => match (words.next(), words.next()) {
                (Some(run), stage) => Self::Logs { run, stage },
                (None, _) => Self::Usage("/logs RUN [STAGE]"),
            },
            "history" => Self::History,
            "session" => Self::Session,
            "help" | "?" => Self::Help,
            "quit" | "exit" | "q" => Self::Quit,
            other => Self::Unknown(other),
        }
    }
}

impl<'a> Chat<'a> {
    /// Resumes `--session`, or starts a session with `--agent` in `--env`.
    async fn start(
        global: &'a GlobalArgs,
        client: &'a Client,
        args: &ChatArgs,
    ) -> anyhow::Result<Self> {
        let interactive = std::io::stdin().is_terminal();
        let session = match &args.session {
            Some(id) => {
                let path = format!("/chat/sessions/{}", encode(id));
                let transcript: ChatTranscriptView = client.get(&path, &[]).await?;
                let skipped = transcript.messages.len().saturating_sub(RESUME_SHOWN);
                if skipped > 0 {
                    output::note(format!("({skipped} earlier messages; /history shows them)"));
                }
                for message in &transcript.messages[skipped..] {
                    show_message(message);
                }
                transcript.session
            }
            None => {
                let body = CreateChatSessionBody {
                    agent: args.agent.clone(),
                    environment: args.env.clone(),
                };
                client.send_json(reqwest::Method::POST, "/chat/sessions", &body).await?
            }
        };
        let place =
            session.environment.as_deref().map(|env| format!(" in {env}")).unwrap_or_default();
        output::note(format!(
            "chat session {} with {}{place}; /help lists commands, Ctrl-D leaves",
            session.id, session.agent
        ));
        Ok(Self { global, client, session, interactive })
    }

    async fn repl(&mut self) -> anyhow::Result<ExitCode> {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            if self.interactive {
                let mut out = std::io::stdout();
                let _ = out.write_all("you› ".as_bytes());
                let _ = out.flush();
            }
            let line = tokio::select! {
                line = lines.next_line() => line?,
                _ = tokio::signal::ctrl_c() => {
                    let _ = std::io::stdout().write_all(b"\n");
                    None
                }
            };
            let Some(line) = line else { break };
            match Line::parse(&line) {
                Line::Nothing => {}
                Line::Quit => break,
                Line::Help => output::note(HELP),
                Line::Say(text) => self.say(text).await,
                Line::Run { pipeline, request } => self.act(self.run(pipeline, request)).await,
                Line::Env(name) => self.act(self.env(name)).await,
                Line::Logs { run, stage } => self.act(self.logs(run, stage)).await,
                Line::History => self.act(self.history()).await,
                Line::Session => output::note(format!(
                    "session {}: agent {}, environment {}, {} messages",
                    self.session.id,
                    self.session.agent,
                    self.session.environment.as_deref().unwrap_or("none"),
                    self.session.message_count
                )),
                Line::Unknown(name) => {
                    output::note(format!("no command /{name}; /help lists them"));
                }
                Line::Usage(usage) => output::note(format!("usage: {usage}")),
            }
        }
        output::note(format!(
            "session {id} kept; resume with: drover chat --session {id}",
            id = self.session.id
        ));
        Ok(ExitCode::SUCCESS)
    }

    /// Runs a command; its failure is told, and the chat goes on.
    async fn act(&self, action: impl Future<Output = Result<(), ClientError>>) {
        if let Err(err) = action.await {
            self.tell(&err);
        }
    }

    fn tell(&self, err: &ClientError) {
        match err {
            ClientError::Unreachable { .. } => output::note(format!(
                "{err}\nthe session is kept: say it again once the server is back, or resume \
                 later with `drover chat --session {}`",
                self.session.id
            )),
            other => output::note(format!("error: {other}")),
        }
    }

    /// Says `text` and prints the reply as it streams in.
    async fn say(&mut self, text: &str) {
        let path = format!("/chat/sessions/{}/messages", encode(&self.session.id));
        let body = ChatMessageBody { content: text.to_owned() };
        let stream = match self.client.post_sse(&path, &body).await {
            Ok(stream) => stream,
            Err(err) => return self.tell(&err),
        };
        futures::pin_mut!(stream);
        let mut out = std::io::stdout();
        if self.interactive {
            let _ = write!(out, "{}› ", self.session.agent);
            let _ = out.flush();
        }
        let outcome = loop {
            let message = tokio::select! {
                message = stream.next() => message,
                _ = tokio::signal::ctrl_c() => {
                    let _ = writeln!(out);
                    output::note("(reply stopped; what arrived is kept in the session)");
                    self.session.message_count += 2;
                    return;
                }
            };
            let Some(message) = message else {
                break Err(ClientError::Unreachable {
                    url: self.client.base().to_owned(),
                    message: "the reply stream ended before the reply did".to_owned(),
                });
            };
            let message = match message {
                Ok(message) => message,
                Err(err) => break Err(err),
            };
            match message.event.as_deref() {
                Some("message") => self.session.message_count += 1,
                Some("delta") => {
                    if let Ok(delta) = serde_json::from_str::<ChatDelta>(&message.data) {
                        let _ = out.write_all(delta.text.as_bytes());
                        let _ = out.flush();
                    }
                }
                Some("done") => {
                    self.session.message_count += 1;
                    break Ok(());
                }
                Some("error") => {
                    self.session.message_count += 1;
                    let detail = serde_json::from_str::<Problem>(&message.data)
                        .map_or(message.data, |problem| problem.detail);
                    let _ = writeln!(out);
                    output::note(format!("the reply failed: {detail}"));
                    return;
                }
                _ => {}
            }
        };
        let _ = writeln!(out);
        if let Err(err) = outcome {
            self.tell(&err);
        }
    }

    /// Submits a run in the session's environment and follows it (Ctrl-C stops following).
    async fn run(&self, pipeline: Option<&str>, request: &str) -> Result<(), ClientError> {
        let pipeline = pipeline.unwrap_or("sdlc");
        let environment = self.session.environment.as_deref();
        let run = self.client.create_run(request, pipeline, environment, None).await?;
        output::note(format!("run {} queued: {} (pipeline {})", run.id, run.request, run.pipeline));
        let mut progress = Progress::new(self.global.json);
        tokio::select! {
            followed = super::run::follow(self.client, &run.id, &mut progress) => {
                progress.finish();
                followed?;
                let run = self.client.get_run(&run.id).await?;
                output::note(output::run_headline(&run));
            }
            _ = tokio::signal::ctrl_c() => {
                progress.finish();
                output::note(format!(
                    "stopped following; run {} goes on (drover runs show {})",
                    run.id, run.id
                ));
            }
        }
        Ok(())
    }

    async fn env(&self, name: Option<&str>) -> Result<(), ClientError> {
        match name.or(self.session.environment.as_deref()) {
            Some(name) => print_env(self.global, &self.client.environment(name).await?, true),
            None => print_env_list(self.global, &self.client.environments(false).await?),
        }
        Ok(())
    }

    async fn logs(&self, run: &str, stage: Option<&str>) -> Result<(), ClientError> {
        let chunks = self.client.logs(run, stage, None, false).await?;
        futures::pin_mut!(chunks);
        let mut out = std::io::stdout();
        while let Some(chunk) = chunks.next().await {
            let _ = out.write_all(&chunk?);
        }
        let _ = out.flush();
        Ok(())
    }

    async fn history(&self) -> Result<(), ClientError> {
        let path = format!("/chat/sessions/{}", encode(&self.session.id));
        let transcript: ChatTranscriptView = self.client.get(&path, &[]).await?;
        transcript.messages.iter().for_each(show_message);
        Ok(())
    }
}

fn show_message(message: &ChatMessageView) {
    let mark = match message.status.as_str() {
        "complete" => String::new(),
        other => format!(" ({other})"),
    };
    output::data(format!("{}{mark}› {}", message.role, message.content));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_messages_unless_they_are_commands() {
        assert_eq!(Line::parse("  hello there "), Line::Say("hello there"));
        assert_eq!(Line::parse(""), Line::Nothing);
        assert_eq!(
            Line::parse("/run Hello World API"),
            Line::Run { pipeline: None, request: "Hello World API" }
        );
        assert_eq!(
            Line::parse("/run --pipeline review fix the bug"),
            Line::Run { pipeline: Some("review"), request: "fix the bug" }
        );
        assert!(matches!(Line::parse("/run"), Line::Usage(_)));
        assert!(matches!(Line::parse("/run --pipeline x"), Line::Usage(_)));
        assert_eq!(Line::parse("/env"), Line::Env(None));
        assert_eq!(Line::parse("/env dev"), Line::Env(Some("dev")));
        assert_eq!(
            Line::parse("/logs 0190 build"),
            Line::Logs { run: "0190", stage: Some("build") }
        );
        assert!(matches!(Line::parse("/logs"), Line::Usage(_)));
        assert_eq!(Line::parse("/quit"), Line::Quit);
        assert_eq!(Line::parse("/frobnicate"), Line::Unknown("frobnicate"));
    }
}
