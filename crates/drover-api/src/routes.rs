//! `GET /api/v1/routes`: the hostnames the routing proxy answers for, where they lead,
//! and the custom names (`[routes]`) whose service is not running, so a user can see why
//! a name does not answer. A caller sees the shared services' names and those of their
//! project's environments (services, deployed apps, custom names leading there), never
//! another project's.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::State;
use drover_domain::ProjectId;
use drover_env::manager::RouteKind;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::openapi::InProject;
use crate::{AppState, Caller};

/// Where the routing proxy listens, if it runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyAddrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

/// One routed hostname.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteView {
    pub host: String,
    /// `service` (`<service>.<env>.localhost`, `<service>.<env>.<project>.localhost` in a
    /// project other than `default`, shared `<service>.localhost`), `app` (a deployed app)
    /// or `custom` (from `[routes]`).
    pub kind: String,
    /// The service behind it (its `[routes]` target for a custom route).
    pub service: String,
    pub environment: Option<String>,
    pub environment_id: Option<String>,
    /// `host:port` the proxy forwards to.
    pub upstream: String,
    /// The URL through the proxy (HTTPS too when it is served).
    pub url: Option<String>,
    pub https_url: Option<String>,
}

/// A custom hostname whose service is not running (it answers 404 until it is).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UnroutedView {
    pub host: String,
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteList {
    /// The proxy's HTTP address, if it runs.
    pub proxy: Option<String>,
    /// Its HTTPS address, if it serves HTTPS.
    pub proxy_tls: Option<String>,
    pub items: Vec<RouteView>,
    pub unrouted: Vec<UnroutedView>,
}

/// The proxy's route table, as far as the caller's project sees it: shared services and
/// the project's own environments.
#[utoipa::path(get, path = "/api/v1/routes", tag = "routes", params(InProject), responses((status = 200, body = RouteList)))]
pub(crate) async fn list(State(state): State<AppState>, caller: Caller) -> Json<RouteList> {
    let proxy = state.inner.proxy;
    let visible = |project: Option<ProjectId>| project.is_none_or(|p| p == caller.project);
    let all_routes = state.envs().routes().borrow().clone();
    let url = |scheme: &str, addr: Option<SocketAddr>, host: &str| {
        addr.map(|addr| format!("{scheme}://{host}:{}/", addr.port()))
    };
    let unrouted = state
        .envs()
        .custom_routes()
        .into_iter()
        .filter(|custom| visible(custom.target.project()))
        .filter(|custom| !all_routes.iter().any(|r| r.host == custom.host))
        .map(|custom| UnroutedView { host: custom.host, target: custom.target.to_string() })
        .collect();
    let items = all_routes
        .into_iter()
        .filter(|route| visible(route.project.clone()))
        .map(|route| RouteView {
            url: url("http", proxy.http, &route.host),
            https_url: url("https", proxy.https, &route.host),
            kind: match route.kind {
                RouteKind::Service => "service",
                RouteKind::App => "app",
                RouteKind::Custom => "custom",
            }
            .to_owned(),
            host: route.host,
            service: route.service,
            environment: route.environment_name,
            environment_id: route.environment.map(|id| id.to_string()),
            upstream: route.upstream.to_string(),
        })
        .collect();
    Json(RouteList {
        proxy: proxy.http.map(|a| a.to_string()),
        proxy_tls: proxy.https.map(|a| a.to_string()),
        items,
        unrouted,
    })
}
