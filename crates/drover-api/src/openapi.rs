//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from
//! the routes.

use utoipa::OpenApi;

use crate::error::{FieldError, Problem};
use crate::wire::{
    AgentList, AgentView, AttemptView, CreateRun, DeadLetterPage, DeadLetterView, DeploymentView,
    EventView, HealthView, LeaseRequest, PipelineList, PipelineView, RunPage, RunView, StageView,
    WorkerBootstrap, WorkerList, WorkerMessageAck, WorkerView,
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
        (name = "system", description = "Health and readiness"),
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
    modifiers(&Security),
    security(("bearer" = [])),
)]
struct ApiDoc;

/// Declares how callers authenticate: `Authorization: Bearer <credential>`, where the
/// credential is an API token (`drv_…`), a login's access token (JWT) or, on the worker
/// endpoints, a worker's service token (JWT). Every operation requires one unless it
/// says otherwise (login, refresh, health); a server in local mode accepts none.
struct Security;

/// Operations anyone may call: they take no credential.
const PUBLIC: &[&str] =
    &["/healthz", "/readyz", "/api/v1/openapi.json", "/api/v1/auth/login", "/api/v1/auth/refresh"];

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};
        let problem = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/problem+json",
                        Content::new(Some(Ref::from_schema_name("Problem"))),
                    )
                    .build(),
            )
        };
        // Every operation may be refused by the abuse limits, every one with path parameters
        // for a parameter that is not UTF-8, and every protected one by authentication and
        // authorization: say so once, here, for all of them.
        for (path, item) in &mut openapi.paths.paths {
            let public = PUBLIC.contains(&path.as_str());
            for operation in
                [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete]
                    .into_iter()
                    .flatten()
            {
                let responses = &mut operation.responses.responses;
                responses.entry("429".to_owned()).or_insert_with(|| {
                    problem("Too many requests (`rate_limited`); see `Retry-After`")
                });
                if path.contains('{') {
                    responses.entry("400".to_owned()).or_insert_with(|| {
                        problem("A path parameter is not valid UTF-8 (`invalid_path`)")
                    });
                }
                if public {
                    operation.security = Some(vec![SecurityRequirement::default()]);
                } else {
                    responses.entry("401".to_owned()).or_insert_with(|| {
                        problem("No credential, or one that is unknown, expired or revoked")
                    });
                    responses.entry("403".to_owned()).or_insert_with(|| {
                        problem("The credential may not do this (role, scope, token kind)")
                    });
                }
            }
        }
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`drv_…`), an access token from `POST /api/v1/auth/login`, \
                         or a worker's service token on the worker endpoints",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as JSON.
pub fn openapi_document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_documents_its_auth_and_its_errors() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_document()).unwrap();
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert!(doc["security"][0]["bearer"].is_array(), "a credential is required by default");
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                seen += 1;
                let responses = &operation["responses"];
                assert!(responses["429"].is_object(), "{method} {path}: no 429");
                if path.contains('{') {
                    let content = &responses["400"]["content"]["application/problem+json"];
                    assert!(content.is_object(), "{method} {path}: no 400 problem");
                }
                if PUBLIC.contains(&path.as_str()) {
                    assert_eq!(operation["security"], serde_json::json!([{}]), "{method} {path}");
                } else {
                    for status in ["401", "403"] {
                        let content = &responses[status]["content"]["application/problem+json"];
                        assert!(content.is_object(), "{method} {path}: no {status} problem");
                    }
                }
            }
        }
        assert!(seen > 50, "{seen} operations");
    }
}
