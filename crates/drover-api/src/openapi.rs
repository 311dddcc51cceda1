//! The OpenAPI document, generated from the handlers' annotations so it cannot drift from
//! the routes.

use utoipa::OpenApi;

use crate::error::{FieldError, Problem};
use crate::wire::{
    AttemptView, CreateRun, DeploymentView, EventView, HealthView, PipelineList, PipelineView,
    RunPage, RunView, StageView,
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
        crate::runs::create_run,
        crate::runs::list_runs,
        crate::runs::get_run,
        crate::runs::cancel_run,
        crate::runs::run_events,
        crate::logs::run_logs,
    ),
    components(schemas(
        CreateRun, RunView, RunPage, AttemptView, DeploymentView, EventView, PipelineList,
        PipelineView, StageView, HealthView, Problem, FieldError,
    )),
    tags(
        (name = "runs", description = "Pipeline runs"),
        (name = "pipelines", description = "Pipeline definitions"),
        (name = "system", description = "Health and readiness"),
    )
)]
struct ApiDoc;

/// The OpenAPI document as JSON.
pub fn openapi_document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|_| "{}".to_owned())
}
