//! API versioning: what may change within `/api/v1`, and how a route is retired.
//!
//! Within `/api/v1` changes are additive only: new routes, new optional request fields,
//! new response fields, new error codes. Clients must ignore fields they do not know.
//! Anything else (removing or renaming a route or field, changing a type or a status)
//! needs `/api/v2`. A v1 route being retired is marked with [`Deprecation`]: its answers
//! carry `Deprecation` (RFC 9745: when it was deprecated), `Sunset` (RFC 8594: when it will
//! stop answering, at least 180 days later) and a `Link` to its successor
//! (`rel="successor-version"`), and the OpenAPI document marks it deprecated.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// A route's retirement notice.
#[derive(Debug, Clone, Copy)]
pub struct Deprecation {
    /// When it was deprecated, seconds since the Unix epoch.
    pub since: u64,
    /// When it stops answering, as an HTTP date (`Sun, 01 Nov 2027 00:00:00 GMT`).
    pub sunset: &'static str,
    /// The route that replaces it.
    pub successor: &'static str,
}

impl Deprecation {
    /// The layer that marks every answer of a route with this notice: wrap the route's
    /// handler with `.layer(axum::middleware::from_fn(move |r, n| notice.mark(r, n)))`.
    pub async fn mark(self, request: Request, next: Next) -> Response {
        let mut response = next.run(request).await;
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&format!("@{}", self.since)) {
            headers.insert("deprecation", value);
        }
        headers.insert("sunset", HeaderValue::from_static(self.sunset));
        if let Ok(value) =
            HeaderValue::from_str(&format!("<{}>; rel=\"successor-version\"", self.successor))
        {
            headers.append(axum::http::header::LINK, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_marked_route_answers_with_its_deprecation_sunset_and_successor() {
        let notice = Deprecation {
            since: 1_790_000_000,
            sunset: "Sun, 01 Nov 2027 00:00:00 GMT",
            successor: "/api/v1/new",
        };
        let app = Router::new()
            .route(
                "/old",
                get(|| async { "still here" })
                    .layer(axum::middleware::from_fn(move |r, n| notice.mark(r, n))),
            )
            .route("/new", get(|| async { "the future" }));
        let old = app
            .clone()
            .oneshot(axum::http::Request::get("/old").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(old.status(), 200);
        assert_eq!(old.headers()["deprecation"], "@1790000000");
        assert_eq!(old.headers()["sunset"], "Sun, 01 Nov 2027 00:00:00 GMT");
        assert_eq!(old.headers()["link"], "</api/v1/new>; rel=\"successor-version\"");
        let new = app
            .oneshot(axum::http::Request::get("/new").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert!(!new.headers().contains_key("deprecation"), "unmarked routes are untouched");
    }
}
