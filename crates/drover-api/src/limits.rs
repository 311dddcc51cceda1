//! Abuse limits: requests per minute per credential (or, without one, per IP address) and
//! per IP address whatever the credential, as GCRA token buckets (`governor`). Every
//! answer, a `429` too, carries `RateLimit-Limit` (requests a minute),
//! `RateLimit-Remaining` and `RateLimit-Reset` (seconds until the bucket is full again) of
//! the tighter of the two buckets (the one that refused, else the one with fewer left); a
//! request over a limit gets `429 rate_limited` with `Retry-After` (seconds until one
//! passes). Health, readiness and metrics are not limited (probes). The buckets are in memory, per server; idle keys are dropped
//! regularly, so the state stays as large as the set of recent callers.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_domain::ErrorCode;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::AppState;
use crate::error::ApiError;

type Buckets =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// How many requests pass between two sweeps of idle keys.
const SWEEP_EVERY: u64 = 4096;
/// Keys beyond which a sweep happens at once.
const MAX_KEYS: usize = 100_000;

pub struct RateLimits {
    per_caller: Buckets,
    per_ip: Buckets,
    caller_limit: u32,
    ip_limit: u32,
    seen: AtomicU64,
}

impl RateLimits {
    /// `per_minute` for each credential (or anonymous IP), `ip_per_minute` for each IP.
    pub fn new(per_minute: u32, ip_per_minute: u32) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_caller: RateLimiter::keyed(quota(per_minute))
                .with_middleware::<StateInformationMiddleware>(),
            per_ip: RateLimiter::keyed(quota(ip_per_minute))
                .with_middleware::<StateInformationMiddleware>(),
            caller_limit: per_minute.max(1),
            ip_limit: ip_per_minute.max(1),
            seen: AtomicU64::new(0),
        }
    }

    fn sweep_now_and_then(&self) {
        let seen = self.seen.fetch_add(1, Ordering::Relaxed);
        if seen.is_multiple_of(SWEEP_EVERY)
            || self.per_caller.len() > MAX_KEYS
            || self.per_ip.len() > MAX_KEYS
        {
            for buckets in [&self.per_caller, &self.per_ip] {
                buckets.retain_recent();
                buckets.shrink_to_fit();
            }
        }
    }

    /// Takes one request from `key`'s bucket of `limit` a minute, saying where it stands.
    fn take(buckets: &Buckets, limit: u32, key: &String, holder: &'static str) -> Standing {
        let per_request = 60.0 / f64::from(limit);
        let seconds = |secs: f64| secs.max(0.0).ceil() as u64;
        match buckets.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(limit);
                // Each request taken refills in `per_request` seconds.
                let reset = seconds(f64::from(limit - remaining) * per_request);
                Standing { limit, remaining, reset, refused: None }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now()).as_secs_f64();
                // One request passes after `wait`; the bucket is full again the rest later.
                let reset = seconds(wait + f64::from(limit - 1) * per_request);
                let retry_after = seconds(wait).max(1);
                let mut error = ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {limit} requests a minute from this {holder}; \
                         retry in {retry_after} s"
                    ),
                );
                error.retry_after = Some(retry_after);
                Standing { limit, remaining: 0, reset, refused: Some(error) }
            }
        }
    }

    /// Takes one request from the address's bucket, then (if that passed) from the
    /// caller's, and answers with the tighter of the two: the one that refused, else the
    /// one with fewer requests left.
    fn admit(&self, ip_key: &String, caller_key: &String) -> Standing {
        let ip = Self::take(&self.per_ip, self.ip_limit, ip_key, "address");
        if ip.refused.is_some() {
            return ip;
        }
        let caller = Self::take(&self.per_caller, self.caller_limit, caller_key, "caller");
        if caller.refused.is_some() || caller.remaining <= ip.remaining { caller } else { ip }
    }
}

/// Where a request leaves one bucket: what its `RateLimit-*` headers say.
#[derive(Debug)]
struct Standing {
    /// Requests a minute.
    limit: u32,
    /// Requests left now.
    remaining: u32,
    /// Seconds until the bucket is full again.
    reset: u64,
    /// The refusal (`429`, with `Retry-After`), if the bucket refused.
    refused: Option<ApiError>,
}

impl Standing {
    fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset));
    }
}

/// Who a request counts against: its credential (hashed; never kept in clear), else its
/// address.
fn caller_key(headers: &HeaderMap, ip: &str) -> String {
    match headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        Some(credential) => format!("cred:{}", &drover_auth::hash_token(credential)[..24]),
        None => format!("ip:{ip}"),
    }
}

pub(crate) async fn middleware(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let limits = &state.inner.limits;
    limits.sweep_now_and_then();
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string());
    let key = caller_key(request.headers(), &ip);
    let mut standing = limits.admit(&format!("ip:{ip}"), &key);
    let mut response = match standing.refused.take() {
        Some(refusal) => refusal.into_response(),
        None => next.run(request).await,
    };
    standing.write_headers(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_limit_and_says_when_to_retry() {
        let limits = RateLimits::new(3, 100);
        let key = "cred:x".to_owned();
        for expected in [2, 1, 0] {
            let standing =
                RateLimits::take(&limits.per_caller, limits.caller_limit, &key, "caller");
            assert!(standing.refused.is_none());
            assert_eq!((standing.limit, standing.remaining), (3, expected));
            assert_eq!(standing.reset, u64::from(3 - expected) * 20);
        }
        let refused = RateLimits::take(&limits.per_caller, limits.caller_limit, &key, "caller");
        assert_eq!((refused.limit, refused.remaining), (3, 0));
        let error = refused.refused.unwrap();
        assert_eq!(error.code, ErrorCode::RateLimited);
        let retry = error.retry_after.unwrap();
        assert!((1..=20).contains(&retry), "{retry}");
        assert_eq!(refused.reset, retry + 40, "a full bucket two requests after the next");
        // Another caller has a bucket of its own.
        let other = "cred:y".to_owned();
        let standing = RateLimits::take(&limits.per_caller, limits.caller_limit, &other, "caller");
        assert!(standing.refused.is_none());
    }

    #[test]
    fn the_tighter_bucket_is_the_one_reported() {
        let limits = RateLimits::new(10, 3);
        let (ip, callers) = ("ip:a".to_owned(), ["cred:1", "cred:2", "cred:3", "cred:4"]);
        let standings: Vec<Standing> =
            callers.iter().map(|caller| limits.admit(&ip, &caller.to_string())).collect();
        let seen: Vec<(u32, u32, bool)> =
            standings.iter().map(|s| (s.limit, s.remaining, s.refused.is_some())).collect();
        assert_eq!(seen, [(3, 2, false), (3, 1, false), (3, 0, false), (3, 0, true)]);
    }
}
