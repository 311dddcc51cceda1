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
    ),
    components(schemas(
        AgentList, AgentView, CreateRun, RunView, RunPage, crate::wire::BudgetBody,
        crate::wire::ApprovalBody, crate::wire::UsageReportView, crate::wire::UsageRow,
        crate::wire::UsageView, AttemptView, DeploymentView, EventView, PipelineList,
        PipelineView, StageView, HealthView, Problem, FieldError, WorkerView, WorkerList,
        DeadLetterView, DeadLetterPage, WorkerBootstrap, LeaseRequest, WorkerMessageAck,
        crate::environments::CreateEnvironmentBody, crate::environments::EnvironmentView,
        crate::environments::EnvironmentPage, crate::environments::ServiceView,
        crate::environments::ServiceList, crate::environments::ServicesOverview,
        crate::environments::PortsView, crate::routes::RouteList, crate::routes::RouteView,
        crate::artifacts::ArtifactList, crate::artifacts::ArtifactView,
        crate::routes::UnroutedView,
    )),
    tags(
        (name = "runs", description = "Pipeline runs"),
        (name = "pipelines", description = "Pipeline definitions"),
        (name = "system", description = "Health and readiness"),
        (name = "workers", description = "Worker registry and the worker protocol over HTTP"),
        (name = "dlq", description = "Dead-letter queue"),
        (name = "environments", description = "Environments and their services"),
        (name = "routes", description = "The routing proxy's hostnames"),
    )
)]
struct ApiDoc;

/// The OpenAPI document as JSON.
pub fn openapi_document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|_| "{}".to_owned())
}
