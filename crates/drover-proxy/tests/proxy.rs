//! The proxy over real sockets: two upstreams behind hostnames, forwarding headers, live
//! route changes, and the 404, 502 and loop problems.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use drover_proxy::{Proxy, Route, RouteTable};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// An upstream that answers with its name and the headers it received.
async fn upstream(name: &'static str) -> SocketAddr {
    let app =
        Router::new().fallback(get(move |headers: HeaderMap, uri: axum::http::Uri| async move {
            let forwarded_for = headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let forwarded_host = headers
                .get("x-forwarded-host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            axum::Json(serde_json::json!({
                "upstream": name,
                "path": uri.to_string(),
                "x_forwarded_for": forwarded_for,
                "x_forwarded_host": forwarded_host,
                "via": headers.get("via").and_then(|v| v.to_str().ok()),
            }))
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn route(host: &str, upstream: SocketAddr, environment: &str) -> Route {
    Route {
        host: host.into(),
        upstream,
        service: "app".into(),
        environment: Some(environment.into()),
        activity: Some(environment.into()),
    }
}

async fn start(routes: RouteTable) -> (SocketAddr, CancellationToken) {
    start_reporting(routes, tokio::sync::mpsc::channel(16).0).await
}

async fn start_reporting(
    routes: RouteTable,
    activity: tokio::sync::mpsc::Sender<String>,
) -> (SocketAddr, CancellationToken) {
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap()).await.unwrap().on_activity(activity);
    let addr = proxy.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.run(routes, stop.clone()));
    (addr, stop)
}

async fn get_via(proxy: SocketAddr, host: &str, path: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{proxy}{path}"))
        .header("host", host)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_hostname_reaches_its_own_upstream_with_forwarding_headers() {
    let routes = RouteTable::new();
    routes.upsert(route("app.run-a.localhost", upstream("a").await, "run-a"));
    routes.upsert(route("app.run-b.localhost", upstream("b").await, "run-b"));
    let (proxy, stop) = start(routes).await;

    let a: Value = get_via(proxy, "app.run-a.localhost:7080", "/x?y=1").await.json().await.unwrap();
    assert_eq!(a["upstream"], "a");
    assert_eq!(a["path"], "/x?y=1");
    assert_eq!(a["x_forwarded_for"], "127.0.0.1");
    assert_eq!(a["x_forwarded_host"], "app.run-a.localhost:7080");
    assert_eq!(a["via"], "1.1 drover");
    let b: Value = get_via(proxy, "APP.run-b.localhost", "/").await.json().await.unwrap();
    assert_eq!(b["upstream"], "b");
    stop.cancel();
}

#[tokio::test]
async fn routes_change_live_without_restarting_the_proxy() {
    let routes = RouteTable::new();
    let (proxy, stop) = start(routes.clone()).await;
    assert_eq!(get_via(proxy, "app.late.localhost", "/").await.status(), 404);

    routes.upsert(route("app.late.localhost", upstream("late").await, "late"));
    let answer: Value = get_via(proxy, "app.late.localhost", "/").await.json().await.unwrap();
    assert_eq!(answer["upstream"], "late");

    routes.remove("app.late.localhost");
    assert_eq!(get_via(proxy, "app.late.localhost", "/").await.status(), 404);
    stop.cancel();
}

#[tokio::test]
async fn an_unknown_host_gets_a_404_problem_listing_the_known_hosts() {
    let routes = RouteTable::new();
    routes.upsert(route("app.run-a.localhost", upstream("a").await, "run-a"));
    let (proxy, stop) = start(routes).await;

    let response = get_via(proxy, "nope.localhost", "/").await;
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "unknown_host");
    assert_eq!(problem["known_hosts"], serde_json::json!(["app.run-a.localhost"]));
    stop.cancel();
}

#[tokio::test]
async fn a_dead_upstream_gets_a_502_naming_the_service() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let routes = RouteTable::new();
    routes.upsert(route("app.gone.localhost", closed, "gone"));
    let (proxy, stop) = start(routes).await;

    let response = get_via(proxy, "app.gone.localhost", "/").await;
    assert_eq!(response.status(), 502);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "upstream_unavailable");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("service `app` of environment `gone`"), "{detail}");
    stop.cancel();
}

#[tokio::test]
async fn a_request_that_already_passed_a_drover_proxy_is_refused() {
    let routes = RouteTable::new();
    let (proxy, stop) = start(routes.clone()).await;
    // The route points back at the proxy itself.
    routes.upsert(route("loop.localhost", proxy, "loop"));
    let response = get_via(proxy, "loop.localhost", "/").await;
    assert_eq!(response.status(), 508);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "proxy_loop");
    stop.cancel();
}

#[tokio::test]
async fn every_routed_request_reports_activity_for_its_environment() {
    let routes = RouteTable::new();
    routes.upsert(route("app.busy.localhost", upstream("busy").await, "busy"));
    let (sender, mut activity) = tokio::sync::mpsc::channel(16);
    let (proxy, stop) = start_reporting(routes, sender).await;
    get_via(proxy, "app.busy.localhost", "/").await;
    assert_eq!(activity.recv().await.as_deref(), Some("busy"));
    get_via(proxy, "nope.localhost", "/").await;
    assert!(activity.try_recv().is_err(), "unknown hosts are not activity");
    stop.cancel();
}
