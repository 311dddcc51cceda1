//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from
//! the routes, then completed with what the operations share and no annotation repeats
//! ([`complete`]): the errors every JSON body, query string, credential and the abuse
//! limits can cause, the headers every answer carries, and the events of each server-sent
//! event stream. The served document is checked against the running server by the
//! schema-conformance test (`crates/drover-server/tests/openapi_conformance.rs`).

use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use utoipa::{IntoParams, OpenApi};

use crate::error::{FieldError, PROBLEM_JSON, Problem};
use crate::wire::{
    AgentList, AgentView, AttemptView, CreateRun, DeadLetterPage, DeadLetterView, DeploymentView,
    EventView, HealthView, LeaseRequest, PipelineList, PipelineView, RunPage, RunView, StageView,
    TaskSecretsRequest, TaskSecretsView, WorkerBootstrap, WorkerList, WorkerMessageAck, WorkerView,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "drover",
        description = "Control plane for fleets of AI coding agents. Every error is RFC 9457 \
                       problem+json with a stable `code` and the `request_id`.",
    ),
    paths(
        crate::system::healthz,
        crate::system::readyz,
        crate::system::metrics,
        crate::system::openapi,
        crate::system::pipelines,
        crate::system::agents,
        crate::runs::create_run,
        crate::runs::list_runs,
        crate::runs::get_run,
        crate::runs::cancel_run,
        crate::runs::run_events,
        crate::logs::run_logs,
        crate::artifacts::list,
        crate::artifacts::download,
        crate::approvals::approve,
        crate::approvals::reject,
        crate::usage::report,
        crate::events::stream,
        crate::ws::upgrade,
        crate::ws::run_presence,
        crate::chat::create,
        crate::chat::list,
        crate::chat::show,
        crate::chat::delete,
        crate::chat::send,
        crate::accounts::login,
        crate::accounts::refresh,
        crate::accounts::me,
        crate::accounts::create_token,
        crate::accounts::list_tokens,
        crate::accounts::revoke_token,
        crate::accounts::list_users,
        crate::accounts::create_user,
        crate::accounts::set_user_role,
        crate::accounts::list_projects,
        crate::accounts::create_project,
        crate::accounts::list_members,
        crate::accounts::add_member,
        crate::accounts::remove_member,
        crate::accounts::create_worker_token,
        crate::accounts::audit_log,
        crate::workers::list_workers,
        crate::workers::bootstrap,
        crate::workers::lease,
        crate::workers::worker_message,
        crate::workers::task_secrets,
        crate::dlq::list,
        crate::dlq::redrive,
        crate::dlq::discard,
        crate::environments::create,
        crate::environments::list,
        crate::environments::show,
        crate::environments::delete,
        crate::environments::start,
        crate::environments::stop,
        crate::environments::services,
        crate::environments::restart_service,
        crate::environments::service_logs,
        crate::environments::shared,
        crate::environments::overview,
        crate::routes::list,
        crate::secrets::put,
        crate::secrets::list,
        crate::secrets::delete,
        crate::webhooks::create,
        crate::webhooks::list,
        crate::webhooks::show,
        crate::webhooks::delete,
        crate::webhooks::enable,
        crate::webhooks::test,
        crate::webhooks::deliveries,
        crate::webhooks::delivery,
        crate::webhooks::redeliver,
    ),
    components(schemas(
        AgentList, AgentView, CreateRun, RunView, RunPage, crate::wire::BudgetBody,
        crate::wire::ApprovalBody, crate::ws::PresenceView, crate::wire::UsageReportView, crate::wire::UsageRow,
        crate::wire::LoginBody, crate::wire::RefreshBody, crate::wire::SessionView,
        crate::wire::MembershipView, crate::wire::MeView, crate::wire::CreateTokenBody,
        crate::wire::TokenView, crate::wire::CreatedTokenView, crate::wire::UserView,
        crate::wire::CreateUserBody, crate::wire::SetRoleBody, crate::wire::ProjectView,
        crate::wire::CreateProjectBody, crate::wire::MemberBody, crate::wire::WorkerTokenBody,
        crate::wire::WorkerTokenView, crate::wire::AuditEntryView, crate::wire::AuditPage,
        crate::wire::UsageView, AttemptView, DeploymentView, EventView, PipelineList,
        PipelineView, StageView, HealthView, Problem, FieldError, WorkerView, WorkerList,
        DeadLetterView, DeadLetterPage, WorkerBootstrap, LeaseRequest, WorkerMessageAck,
        TaskSecretsRequest, TaskSecretsView,
        crate::environments::CreateEnvironmentBody, crate::environments::EnvironmentView,
        crate::environments::EnvironmentPage, crate::environments::ServiceView,
        crate::environments::ServiceList, crate::environments::ServicesOverview,
        crate::environments::PortsView, crate::routes::RouteList, crate::routes::RouteView,
        crate::artifacts::ArtifactList, crate::artifacts::ArtifactView,
        crate::routes::UnroutedView,
        crate::secrets::SetSecretBody, crate::secrets::SecretView, crate::secrets::SecretList,
        crate::webhooks::CreateWebhookBody, crate::webhooks::WebhookView,
        crate::webhooks::CreatedWebhookView, crate::webhooks::WebhookList,
        crate::webhooks::WebhookDeliveryView, crate::webhooks::WebhookDeliveryPage,
        crate::webhooks::WebhookPayload,
        crate::chat::CreateChatSessionBody, crate::chat::ChatMessageBody,
        crate::chat::ChatSessionView, crate::chat::ChatMessageView,
        crate::chat::ChatTranscriptView, crate::chat::ChatSessionList, crate::chat::ChatDelta,
    )),
    tags(
        (name = "runs", description = "Pipeline runs"),
        (name = "pipelines", description = "Pipeline definitions"),
        (name = "system", description = "Health, readiness, metrics and this document"),
        (name = "workers", description = "Worker registry and the worker protocol over HTTP"),
        (name = "dlq", description = "Dead-letter queue"),
        (name = "environments", description = "Environments and their services"),
        (name = "routes", description = "The routing proxy's hostnames"),
        (name = "secrets", description = "Project secrets: set, list (names only), delete"),
        (name = "webhooks", description = "Webhook endpoints (Standard Webhooks signatures) and their deliveries"),
        (name = "auth", description = "Login, the caller's account and API tokens"),
        (name = "events", description = "The event log, live"),
        (name = "chat", description = "Direct chat with an `llm` agent, kept as sessions"),
        (name = "admin", description = "Users, projects, memberships, worker tokens, audit"),
    ),
    security(("bearer" = [])),
)]
struct ApiDoc;

/// `X-Drover-Project`, the project a request acts in; every operation scoped to a project
/// lists it (`params(InProject)`).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by the `Caller` extractor from the headers, never deserialized.
pub(crate) struct InProject {
    /// The project to act in (default `default`). One the caller is not a member of is
    /// answered as if it did not exist: 404 `project_not_found`.
    #[param(rename = "X-Drover-Project", pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    project: Option<String>,
}

/// `Idempotency-Key`, on the operations that replay a retried request's first answer (see
/// `idempotency`).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by the idempotency middleware from the headers.
pub(crate) struct Idempotent {
    /// Send the same key to retry safely: the same body gets the first answer again (with
    /// `Idempotent-Replayed: true`), another body is refused (422
    /// `idempotency_key_reused`), and while the first is still being handled a second is
    /// refused (409 `idempotency_key_in_use`). 1-255 visible ASCII characters, kept a day.
    #[param(rename = "Idempotency-Key", pattern = "^[!-~]{1,255}$")]
    key: Option<String>,
}

/// Operations anyone may call: they take no credential.
const PUBLIC: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/openapi.json",
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
];

/// Paths the abuse limits leave alone (probes; see `limits::middleware`).
const UNLIMITED: &[&str] = &["/healthz", "/readyz", "/metrics"];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// What a server-sent event's `data` holds.
enum Data {
    /// A JSON document of this schema.
    Json(Value),
    /// A line of text.
    Text,
}

/// The events of the operation's server-sent event stream, by event name (`None`: the
/// event's name varies, e.g. an event log kind), if it answers with one.
fn stream_events(method: &str, path: &str) -> Option<Vec<(Option<&'static str>, Data)>> {
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let events = match (method, path) {
        ("get", "/api/v1/events" | "/api/v1/runs/{id}/events") => {
            vec![(None, Data::Json(schema("EventView")))]
        }
        ("get", "/api/v1/runs/{id}/logs") => vec![
            (
                Some("attempt"),
                Data::Json(json!({
                    "type": "object",
                    "description": "The stage attempt whose lines follow",
                    "required": ["stage", "attempt"],
                    "properties": {
                        "stage": { "type": "string" },
                        "attempt": { "type": "integer", "minimum": 1 },
                    },
                })),
            ),
            (Some("line"), Data::Text),
            (Some("end"), Data::Text),
        ],
        ("get", "/api/v1/environments/{id}/services/{name}/logs") => {
            vec![(Some("line"), Data::Text)]
        }
        ("post", "/api/v1/chat/sessions/{id}/messages") => vec![
            (Some("message"), Data::Json(schema("ChatMessageView"))),
            (Some("delta"), Data::Json(schema("ChatDelta"))),
            (Some("done"), Data::Json(schema("ChatMessageView"))),
            (Some("error"), Data::Json(schema("Problem"))),
        ],
        _ => return None,
    };
    Some(events)
}

/// The schema of one event of a stream. OpenAPI 3.1 has no keyword for the items of a
/// stream; as in the OpenAPI media type registry (and 3.2's `itemSchema`), the
/// `text/event-stream` schema describes one event, as an object of its SSE fields.
fn event_schema(events: Vec<(Option<&'static str>, Data)>) -> Value {
    let frames: Vec<Value> = events
        .into_iter()
        .map(|(name, data)| {
            let event = match name {
                Some(name) => json!({ "const": name }),
                None => json!({ "type": "string", "description": "The event's kind" }),
            };
            let data = match data {
                Data::Json(schema) => json!({
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": schema,
                }),
                Data::Text => json!({ "type": "string" }),
            };
            let mut properties = json!({ "event": event, "data": data });
            if name.is_none() {
                properties["id"] = json!({
                    "type": "string",
                    "pattern": "^[0-9]+$",
                    "description": "The event's sequence number: resume after it with `Last-Event-ID`",
                });
            }
            json!({ "type": "object", "required": ["event", "data"], "properties": properties })
        })
        .collect();
    match <[Value; 1]>::try_from(frames) {
        Ok([one]) => one,
        Err(frames) => json!({ "oneOf": frames }),
    }
}

/// A problem+json answer.
fn problem(description: &str) -> Value {
    json!({
        "description": description,
        "content": { PROBLEM_JSON: { "schema": { "$ref": "#/components/schemas/Problem" } } },
    })
}

/// Declares `status` with `description` (a problem), or adds the description to the one
/// the handler declared, unless that one already names the code (the first `` `code` ``
/// of `description`).
fn declare(responses: &mut Map<String, Value>, status: &str, description: &str) {
    match responses.get_mut(status) {
        Some(existing) => {
            let said = existing["description"].as_str().unwrap_or_default().trim().to_owned();
            let code = description.split('`').nth(1).unwrap_or(description);
            existing["description"] = if said.is_empty() {
                description.into()
            } else if said.contains(&format!("`{code}`")) {
                said.into()
            } else {
                format!("{said}; or {description}").into()
            };
        }
        None => {
            responses.insert(status.to_owned(), problem(description));
        }
    }
}

/// A header of `components/headers` (where it is declared required).
fn header(name: &str) -> Value {
    json!({ "$ref": format!("#/components/headers/{name}") })
}

/// What every operation shares, added to what its annotation says.
fn complete_operation(path: &str, method: &str, operation: &mut Map<String, Value>) {
    let public = PUBLIC.contains(&path);
    let limited = !UNLIMITED.contains(&path);
    let mut has_query = false;
    let mut in_project = false;
    for parameter in
        operation.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten()
    {
        has_query |= parameter["in"] == "query";
        in_project |= parameter["in"] == "header" && parameter["name"] == "X-Drover-Project";
        // A query string or a header has no `null`: an optional parameter is one left out.
        if let Some(types) = parameter.pointer_mut("/schema/type")
            && let Some(list) = types.as_array()
        {
            let kept: Vec<Value> = list.iter().filter(|t| *t != "null").cloned().collect();
            *types = match <[Value; 1]>::try_from(kept) {
                Ok([one]) => one,
                Err(many) => Value::Array(many),
            };
        }
    }
    let json_body = operation
        .get("requestBody")
        .and_then(|body| body.pointer("/content/application~1json"))
        .is_some();
    if public {
        operation.insert("security".to_owned(), json!([{}]));
    }
    let Some(responses) = operation.entry("responses").or_insert_with(|| json!({})).as_object_mut()
    else {
        return;
    };
    let declared_429 = responses.contains_key("429");
    if let Some(events) = stream_events(method, path)
        && let Some(content) = responses.get_mut("200").and_then(|ok| ok.get_mut("content"))
    {
        content["text/event-stream"] = json!({ "schema": event_schema(events) });
    }
    if json_body {
        declare(
            responses,
            "400",
            "`malformed_json`: the body is not JSON; `empty_body`: it is empty",
        );
        declare(responses, "413", "`payload_too_large`: the body is larger than the server takes");
        declare(responses, "415", "`unsupported_media_type`: the body is not sent as JSON");
        declare(
            responses,
            "422",
            "`unknown_field`: the body has a field it may not have; `invalid_body`: a field is \
             missing or of the wrong type",
        );
    }
    if has_query {
        declare(responses, "400", "`invalid_query`: a query parameter is unknown or malformed");
    }
    if path.contains('{') {
        declare(responses, "400", "`invalid_path`: a path parameter is not valid UTF-8");
    }
    if in_project {
        declare(
            responses,
            "404",
            "`project_not_found`: `X-Drover-Project` names no project the caller is a member of",
        );
    }
    if !public {
        declare(
            responses,
            "401",
            "`unauthenticated`: no credential (and the server is not in local mode); \
             `invalid_credentials`: one that is malformed, unknown, expired or revoked",
        );
        declare(
            responses,
            "403",
            "`forbidden`: the credential may not do this (role, scope, or a user's credential \
             on a worker endpoint and the other way round)",
        );
    }
    if limited {
        declare(responses, "429", "`rate_limited`: too many requests; retry after `Retry-After`");
    }
    declare(responses, "500", "`internal`: an unexpected error; the server's log has its cause");

    for (status, response) in responses.iter_mut() {
        let Some(response) = response.as_object_mut() else { continue };
        // Bytes, whatever they are: OpenAPI 3.1 gives such a body no schema.
        if let Some(bytes) =
            response.get_mut("content").and_then(|c| c.get_mut("application/octet-stream"))
        {
            *bytes = json!({});
        }
        if response.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
            let reason = status
                .parse::<u16>()
                .ok()
                .and_then(|code| axum::http::StatusCode::from_u16(code).ok())
                .and_then(|code| code.canonical_reason())
                .unwrap_or("Answer");
            response.insert("description".to_owned(), reason.into());
        }
        let headers = response.entry("headers").or_insert_with(|| json!({}));
        headers["X-Request-Id"] = header("X-Request-Id");
        // A panic is answered outside the limits (`CatchPanicLayer`), without their headers.
        if limited && status != "500" {
            for name in ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"] {
                headers[name] = header(name);
            }
        }
        match status.as_str() {
            "401" => headers["WWW-Authenticate"] = header("WWW-Authenticate"),
            "429" if !declared_429 => headers["Retry-After"] = header("Retry-After"),
            // The operation's own 429 (a quota) says nothing of when to retry.
            "429" => {
                headers["Retry-After"] = json!({
                    "description": "Seconds to wait before trying again (with `rate_limited`)",
                    "schema": { "type": "integer", "minimum": 0 },
                });
            }
            _ => {}
        }
    }
}

/// The headers answers carry, described once; each is there whenever it is declared.
fn headers() -> Value {
    let integer = |description: &str| {
        json!({
            "description": description,
            "required": true,
            "schema": { "type": "integer", "minimum": 0 },
        })
    };
    json!({
        "X-Request-Id": {
            "description": "The request's id: the client's `X-Request-Id` if it is 1-128 \
                            characters of letters, digits, `-`, `_`, `.` and `:`, else a new \
                            one. Every log line of the request names it",
            "required": true,
            "schema": { "type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$" },
        },
        "RateLimit-Limit": integer("Requests a minute the caller may make"),
        "RateLimit-Remaining": integer("Requests left in the current window"),
        "RateLimit-Reset": integer("Seconds until the window is full again"),
        "Retry-After": integer("Seconds to wait before trying again"),
        "WWW-Authenticate": {
            "description": "How to authenticate: `Bearer realm=\"drover\"`",
            "required": true,
            "schema": { "type": "string" },
        },
    })
}

/// Completes the generated document (see the module documentation).
fn complete(doc: &mut Value) {
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            for method in METHODS {
                if let Some(operation) = item.get_mut(method).and_then(Value::as_object_mut) {
                    complete_operation(path, method, operation);
                }
            }
        }
    }
    let components = doc
        .as_object_mut()
        .and_then(|doc| doc.entry("components").or_insert_with(|| json!({})).as_object_mut());
    if let Some(components) = components {
        components.insert("headers".to_owned(), headers());
        // How callers authenticate: `Authorization: Bearer <credential>`. Every operation
        // requires one unless it says otherwise; a server in local mode accepts none.
        let schemes = components.entry("securitySchemes").or_insert_with(|| json!({}));
        schemes["bearer"] = json!({
            "type": "http",
            "scheme": "bearer",
            "description": "An API token (`drv_…`), an access token from `POST /api/v1/auth/login`, \
                            or a worker's service token on the worker endpoints. A server in \
                            local mode (loopback, no users yet) needs none",
        });
    }
}

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    complete(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".to_owned())
});

/// The OpenAPI document as JSON, built once.
pub fn openapi_document() -> &'static str {
    &DOCUMENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Value {
        serde_json::from_str(openapi_document()).unwrap()
    }

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut all = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if let Some(operation) = item.get(method) {
                    all.push((path.clone(), method.to_owned(), operation.clone()));
                }
            }
        }
        all
    }

    #[test]
    fn every_operation_documents_its_auth_and_its_errors() {
        let doc = document();
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert!(doc["security"][0]["bearer"].is_array(), "a credential is required by default");
        let operations = operations(&doc);
        for (path, method, operation) in &operations {
            let responses = &operation["responses"];
            assert_eq!(
                responses["429"].is_object(),
                !UNLIMITED.contains(&path.as_str()),
                "{method} {path}: 429"
            );
            if PUBLIC.contains(&path.as_str()) {
                assert_eq!(operation["security"], json!([{}]), "{method} {path}");
            } else {
                for status in ["401", "403"] {
                    let content = &responses[status]["content"][PROBLEM_JSON];
                    assert!(content.is_object(), "{method} {path}: no {status} problem");
                }
            }
            for (status, response) in responses.as_object().unwrap() {
                let description = response["description"].as_str().unwrap_or_default();
                assert!(!description.is_empty(), "{method} {path} {status}: no description");
                assert!(response["headers"]["X-Request-Id"].is_object(), "{method} {path}");
            }
        }
        assert!(operations.len() > 50, "{} operations", operations.len());
    }

    /// The root cause of query parameters once declared `in: path`: an `IntoParams` struct
    /// read by our own `ApiQuery` extractor, which utoipa cannot see as a query.
    #[test]
    fn parameters_are_where_the_server_reads_them() {
        let doc = document();
        for (path, method, operation) in operations(&doc) {
            let parameters = operation["parameters"].as_array().cloned().unwrap_or_default();
            let in_path: Vec<&str> = parameters
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            let template: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            assert_eq!(in_path, template, "{method} {path}: path parameters");
            for parameter in &parameters {
                assert!(
                    !parameter["schema"]["type"]
                        .as_array()
                        .is_some_and(|t| t.contains(&json!("null"))),
                    "{method} {path}: {parameter} may be null"
                );
            }
            let query: Vec<&str> = parameters
                .iter()
                .filter(|p| p["in"] == "query")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            if path == "/api/v1/runs" && method == "get" {
                assert_eq!(query, ["limit", "cursor", "status"]);
            }
            if path == "/api/v1/usage" {
                assert_eq!(query, ["hours"]);
            }
        }
    }

    #[test]
    fn every_json_body_may_be_refused_as_malformed_unsupported_or_too_large() {
        let doc = document();
        let mut bodies = 0;
        for (path, method, operation) in operations(&doc) {
            if operation.pointer("/requestBody/content/application~1json").is_none() {
                continue;
            }
            bodies += 1;
            for status in ["400", "413", "415", "422"] {
                let problem = &operation["responses"][status]["content"][PROBLEM_JSON];
                assert!(problem.is_object(), "{method} {path}: no {status}");
            }
        }
        assert!(bodies >= 18, "{bodies} operations take a JSON body");
    }

    #[test]
    fn event_streams_describe_their_events_and_only_they_stream() {
        let doc = document();
        let mut streams = 0;
        for (path, method, operation) in operations(&doc) {
            let declared = operation.pointer("/responses/200/content/text~1event-stream");
            assert_eq!(
                declared.is_some(),
                stream_events(&method, &path).is_some(),
                "{method} {path}: its annotation and `stream_events` disagree"
            );
            let Some(declared) = declared else { continue };
            streams += 1;
            let schema = &declared["schema"];
            let frames =
                schema["oneOf"].as_array().cloned().unwrap_or_else(|| vec![schema.clone()]);
            for frame in frames {
                assert_eq!(frame["type"], "object", "{method} {path}");
                assert_eq!(frame["properties"]["data"]["type"], "string", "{method} {path}");
            }
        }
        assert_eq!(streams, 5);
    }
}
