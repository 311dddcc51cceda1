//! `drover users|projects|tokens|login|whoami|audit`: identities through the API. With no
//! server running, they work on the data directory through an embedded instance that
//! trusts the command (how the first administrator is made).

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use drover_api::wire::{
    AuditPage, CreatedTokenView, MeView, MembershipView, ProjectView, SessionView, TokenView,
    UserView, WorkerTokenView,
};
use drover_config::Config;
use drover_server::Mode;
use serde_json::json;

use crate::cli::{GlobalArgs, ProjectsCommand, TokensCommand, UsersCommand};
use crate::client::encode;
use crate::output;
use crate::target::Target;

fn read_secret(what: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read the {what}"))?;
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    anyhow::ensure!(!text.is_empty(), "the {what} on standard input is empty");
    Ok(text)
}

async fn with_target<T>(
    global: &GlobalArgs,
    config: &Config,
    work: impl AsyncFnOnce(&Target) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let result = work(&target).await;
    target.close().await?;
    result
}

pub(crate) async fn users(
    global: &GlobalArgs,
    config: &Config,
    command: UsersCommand,
) -> anyhow::Result<ExitCode> {
    with_target(global, config, async |target| {
        let client = &target.client;
        match command {
            UsersCommand::Ls => {
                let users: Vec<UserView> = client.get("/users", &[]).await?;
                if global.json {
                    output::json(&users);
                } else {
                    let rows: Vec<Vec<String>> = users
                        .iter()
                        .map(|u| vec![u.name.clone(), u.role.clone(), u.created_at.clone()])
                        .collect();
                    output::table(&["USER", "ROLE", "CREATED"], &rows);
                }
            }
            UsersCommand::Add { name, role, password_stdin } => {
                let password = password_stdin.then(|| read_secret("password")).transpose()?;
                let body = json!({ "name": name, "role": role, "password": password });
                let user: UserView =
                    client.send_json(reqwest::Method::POST, "/users", &body).await?;
                if global.json {
                    output::json(&user);
                } else if user.role == "admin" {
                    output::note(format!(
                        "administrator {name} added; make them a token: \
                         drover tokens create --user {name} --name cli",
                        name = user.name
                    ));
                } else {
                    output::note(format!(
                        "user {name} ({}) added; give them a project (drover projects add-member \
                         default {name}) and a token (drover tokens create --user {name} --name cli)",
                        user.role,
                        name = user.name
                    ));
                }
            }
            UsersCommand::Role { name, role } => {
                let path = format!("/users/{}", encode(&name));
                let user: UserView =
                    client.send_json(reqwest::Method::PATCH, &path, &json!({ "role": role })).await?;
                output::note(format!("user {} is now {}", user.name, user.role));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
}

fn members_table(members: &[MembershipView]) {
    let rows: Vec<Vec<String>> =
        members.iter().map(|m| vec![m.user.clone(), m.role.clone()]).collect();
    output::table(&["USER", "ROLE"], &rows);
}

pub(crate) async fn projects(
    global: &GlobalArgs,
    config: &Config,
    command: ProjectsCommand,
) -> anyhow::Result<ExitCode> {
    with_target(global, config, async |target| {
        let client = &target.client;
        match command {
            ProjectsCommand::Ls => {
                let projects: Vec<ProjectView> = client.get("/projects", &[]).await?;
                if global.json {
                    output::json(&projects);
                } else {
                    let rows: Vec<Vec<String>> = projects
                        .iter()
                        .map(|p| vec![p.id.clone(), p.role.clone(), p.name.clone()])
                        .collect();
                    output::table(&["PROJECT", "YOUR ROLE", "NAME"], &rows);
                }
            }
            ProjectsCommand::Create { id, name } => {
                let project: ProjectView = client
                    .send_json(
                        reqwest::Method::POST,
                        "/projects",
                        &json!({ "id": id, "name": name }),
                    )
                    .await?;
                output::note(format!("project {} created", project.id));
            }
            ProjectsCommand::Members { id } => {
                let path = format!("/projects/{}/members", encode(&id));
                let members: Vec<MembershipView> = client.get(&path, &[]).await?;
                if global.json {
                    output::json(&members);
                } else {
                    members_table(&members);
                }
            }
            ProjectsCommand::AddMember { id, user, role } => {
                let path = format!("/projects/{}/members", encode(&id));
                let member: MembershipView = client
                    .send_json(reqwest::Method::POST, &path, &json!({ "user": user, "role": role }))
                    .await?;
                output::note(format!(
                    "{} is now {} of {}",
                    member.user, member.role, member.project
                ));
            }
            ProjectsCommand::RmMember { id, user } => {
                client
                    .delete(&format!("/projects/{}/members/{}", encode(&id), encode(&user)))
                    .await?;
                output::note(format!("{user} removed from {id}"));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
}

fn tokens_table(tokens: &[TokenView]) {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let state = match (&t.revoked_at, &t.expires_at) {
                (Some(_), _) => "revoked".to_owned(),
                (None, Some(expires)) => format!("until {expires}"),
                (None, None) => "no expiry".to_owned(),
            };
            vec![
                t.id.clone(),
                t.user.clone(),
                t.name.clone(),
                t.scope.clone(),
                t.project.clone().unwrap_or_else(|| "*".to_owned()),
                state,
                t.last_used_at.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["ID", "USER", "NAME", "SCOPE", "PROJECT", "STATE", "LAST USED"], &rows);
}

pub(crate) async fn tokens(
    global: &GlobalArgs,
    config: &Config,
    command: TokensCommand,
) -> anyhow::Result<ExitCode> {
    with_target(global, config, async |target| {
        let client = &target.client;
        match command {
            TokensCommand::Create { name, scope, for_project, days, user } => {
                let body = json!({
                    "name": name, "scope": scope, "project": for_project,
                    "expires_in_days": days, "user": user,
                });
                let created: CreatedTokenView =
                    client.send_json(reqwest::Method::POST, "/tokens", &body).await?;
                if global.json {
                    output::json(&created);
                } else {
                    // The secret is data (stdout); what it is, a note.
                    output::data(&created.token);
                    output::note(format!(
                        "token {} for {} ({}), shown once: keep it now (DROVER_TOKEN or --token)",
                        created.details.id, created.details.user, created.details.scope
                    ));
                }
            }
            TokensCommand::Ls { all } => {
                let tokens: Vec<TokenView> =
                    client.get("/tokens", &[("all", all.to_string())]).await?;
                if global.json {
                    output::json(&tokens);
                } else {
                    tokens_table(&tokens);
                }
            }
            TokensCommand::Revoke { id } => {
                client.delete(&format!("/tokens/{}", encode(&id))).await?;
                output::note(format!("token {id} revoked"));
            }
            TokensCommand::Worker { name, agent, hours } => {
                let body = json!({ "worker": name, "agents": agent, "expires_in_hours": hours });
                let token: WorkerTokenView =
                    client.send_json(reqwest::Method::POST, "/workers/tokens", &body).await?;
                if global.json {
                    output::json(&token);
                } else {
                    output::data(&token.token);
                    output::note(format!(
                        "service token for worker {} (agents: {}), until {}",
                        token.worker,
                        if token.agents.is_empty() {
                            "any".to_owned()
                        } else {
                            token.agents.join(",")
                        },
                        token.expires_at
                    ));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
}

pub(crate) async fn login(
    global: &GlobalArgs,
    config: &Config,
    user: String,
    password_stdin: bool,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        password_stdin,
        "give the password on standard input with --password-stdin (it is never taken as an argument)"
    );
    let password = read_secret("password")?;
    with_target(global, config, async |target| {
        let session: SessionView = target
            .client
            .send_json(
                reqwest::Method::POST,
                "/auth/login",
                &json!({ "user": user, "password": password }),
            )
            .await?;
        if global.json {
            output::json(&session);
        } else {
            output::data(&session.access_token);
            output::note(format!(
                "access token for {user}, valid {} s; refresh with POST /api/v1/auth/refresh",
                session.expires_in
            ));
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
}

pub(crate) async fn whoami(global: &GlobalArgs, config: &Config) -> anyhow::Result<ExitCode> {
    with_target(global, config, async |target| {
        let me: MeView = target.client.get("/me", &[]).await?;
        if global.json {
            output::json(&me);
        } else {
            output::data(format!("{} ({}, {} credential)", me.user, me.role, me.scope));
            if me.local_mode {
                output::note("local mode: this server needs no credential until a user exists");
            }
            members_table(&me.memberships);
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
}

pub(crate) async fn audit(
    global: &GlobalArgs,
    config: &Config,
    project: Option<String>,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    with_target(global, config, async |target| {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(project) = project {
            query.push(("project", project));
        }
        let page: AuditPage = target.client.get("/audit", &query).await?;
        if global.json {
            output::json(&page);
        } else {
            let rows: Vec<Vec<String>> = page
                .items
                .iter()
                .map(|e| {
                    vec![
                        e.at.clone(),
                        e.project.clone(),
                        e.actor.clone(),
                        e.action.clone(),
                        e.target.clone(),
                    ]
                })
                .collect();
            output::table(&["AT", "PROJECT", "ACTOR", "ACTION", "TARGET"], &rows);
        }
        Ok(ExitCode::SUCCESS)
    })
    .await
}
