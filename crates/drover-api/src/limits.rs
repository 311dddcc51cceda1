//! Abuse limits: requests per minute per credential (or, without one, per IP address) and
//! per IP address whatever the credential, as GCRA token buckets (`governor`). Every
//! answer carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`; a request
//! over the limit gets `429 rate_limited` with `Retry-After`. Health, readiness and metrics
//! are not limited (probes). The buckets are in memory, per server; idle keys are dropped
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

    /// Takes one request from `key`'s bucket: the headers to send, or the refusal.
    fn take(buckets: &Buckets, limit: u32, key: &String) -> Result<(u32, u32, u64), ApiError> {
        match buckets.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // Seconds until the bucket is full again.
                let reset = u64::from(limit - remaining.min(limit)) * 60 / u64::from(limit);
                Ok((limit, remaining, reset))
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut error = ApiError::new(
                    ErrorCode::RateLimited,
                    format!("more than {limit} requests a minute; retry in {seconds} s"),
                );
                error.retry_after = Some(seconds.max(1));
                Err(error)
            }
        }
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
    let ip_key = format!("ip:{ip}");
    let taken = RateLimits::take(&limits.per_ip, limits.ip_limit, &ip_key)
        .and_then(|_| RateLimits::take(&limits.per_caller, limits.caller_limit, &key));
    let (limit, remaining, reset) = match taken {
        Ok(state) => state,
        Err(refusal) => {
            let seconds = refusal.retry_after.unwrap_or(1);
            let mut response = refusal.into_response();
            let headers = response.headers_mut();
            headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
            headers.insert("ratelimit-reset", HeaderValue::from(seconds));
            return response;
        }
    };
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert("ratelimit-limit", HeaderValue::from(limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(reset));
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
            let (limit, remaining, _) =
                RateLimits::take(&limits.per_caller, limits.caller_limit, &key).unwrap();
            assert_eq!((limit, remaining), (3, expected));
        }
        let refused = RateLimits::take(&limits.per_caller, limits.caller_limit, &key).unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        assert!(refused.retry_after.is_some_and(|s| (1..=20).contains(&s)));
        // Another caller has a bucket of its own.
        assert!(
            RateLimits::take(&limits.per_caller, limits.caller_limit, &"cred:y".to_owned()).is_ok()
        );
    }
}
