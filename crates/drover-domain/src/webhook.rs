//! Webhooks, as rules: what a delivery's status may become, when a failed delivery is
//! tried again (exponential backoff with jitter, given up after a time), when an
//! endpoint's circuit breaker lets a delivery through, and which URLs an endpoint may
//! have. Sending, signing and storing happen elsewhere; everything here is a pure function
//! of its inputs (`now` and the jitter sample are passed in).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::{Timestamp, TransitionError, ValidationError};

/// The `type` of the delivery `POST …/test` sends; never an event of the log.
pub const WEBHOOK_TEST_KIND: &str = "webhook.test";
/// Longest accepted endpoint URL.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// Longest accepted endpoint description.
pub const MAX_WEBHOOK_DESCRIPTION_LEN: usize = 256;

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Not tried yet (or sent again by hand): due at its `next_attempt_at`.
    Pending,
    /// The last attempt failed; another is scheduled at its `next_attempt_at`.
    Failed,
    /// The endpoint answered 2xx.
    Succeeded,
    /// Given up: out of time, or its endpoint was disabled.
    Dead,
}

impl DeliveryStatus {
    pub const ALL: [Self; 4] = [Self::Pending, Self::Failed, Self::Succeeded, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Failed => "failed",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
        }
    }

    /// Whether the delivery is still to be sent (now or later).
    pub fn is_due_kind(self) -> bool {
        matches!(self, Self::Pending | Self::Failed)
    }

    /// The status after a change to `to`, if the change is legal: an attempt's result
    /// applies only to a delivery still to be sent, and anything may be sent again
    /// (`pending`) by hand.
    pub fn become_(self, to: Self) -> Result<Self, TransitionError> {
        let legal = match to {
            Self::Pending => true,
            Self::Failed | Self::Succeeded | Self::Dead => self.is_due_kind(),
        };
        if legal {
            Ok(to)
        } else {
            Err(TransitionError {
                entity: "webhook delivery",
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeliveryStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| {
            ValidationError::new("status", format!("`{s}` is not a delivery status"))
        })
    }
}

/// How failed deliveries are tried again: the `n`-th retry waits `initial × 5^(n-1)`,
/// times a jitter factor in `[0.8, 1.2)`, at most `max`; a retry that would come later
/// than `give_up_after` after the delivery's first attempt window opened is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    pub initial: Duration,
    pub max: Duration,
    pub give_up_after: Duration,
}

/// Growth of the delay from one retry to the next.
const BACKOFF_FACTOR: u32 = 5;

impl RetrySchedule {
    /// The wait before retry number `retry` (1 for the first retry), with `jitter` a
    /// sample from `[0, 1)`.
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let exponent = retry.saturating_sub(1).min(32);
        let factor = f64::from(BACKOFF_FACTOR).powi(i32::try_from(exponent).unwrap_or(32));
        let jitter = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        let seconds = self.initial.as_secs_f64() * factor * jitter;
        let max = self.max.as_secs_f64();
        Duration::from_secs_f64(if seconds.is_finite() { seconds.min(max) } else { max })
    }

    /// When to try again after `attempts` failed attempts, the last at `now`, for a
    /// delivery whose window opened at `window_start`; `None` once it is time to give up.
    pub fn next_attempt(
        &self,
        attempts: u32,
        now: Timestamp,
        window_start: Timestamp,
        jitter: f64,
    ) -> Option<Timestamp> {
        let at = now.plus(self.delay(attempts.max(1), jitter));
        (at <= window_start.plus(self.give_up_after)).then_some(at)
    }
}

/// The state of an endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Deliveries flow.
    Closed,
    /// Too many failures in a row: nothing is sent until the time passes.
    Open { until: Timestamp },
    /// The open time passed: one delivery goes through; its result closes or reopens it.
    HalfOpen,
}

impl Breaker {
    /// The breaker of an endpoint that failed `failures` times in a row (it opens at
    /// `threshold`), open until `open_until` when it last failed.
    pub fn state(
        failures: u32,
        threshold: u32,
        open_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Self {
        if failures < threshold.max(1) {
            return Self::Closed;
        }
        match open_until {
            Some(until) if until > now => Self::Open { until },
            _ => Self::HalfOpen,
        }
    }
}

/// An endpoint URL: absolute `http://` or `https://` with a host, no whitespace or control
/// characters, at most [`MAX_WEBHOOK_URL_LEN`] bytes. Returns its origin
/// (`scheme://host[:port]`), which may be shown where the whole URL (which may carry a
/// token in its path or query) should not.
pub fn parse_webhook_url(url: &str) -> Result<String, ValidationError> {
    let invalid = |message: &str| ValidationError::new("url", message);
    if url.is_empty() {
        return Err(invalid("is required"));
    }
    if url.len() > MAX_WEBHOOK_URL_LEN {
        return Err(invalid(&format!("must be at most {MAX_WEBHOOK_URL_LEN} bytes")));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("must not contain spaces or control characters"));
    }
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")
        })
        .ok_or_else(|| invalid("must be an absolute http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    if name.is_empty() {
        return Err(invalid("must name a host"));
    }
    Ok(format!("{}://{host}", scheme.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }

    #[test]
    fn retries_back_off_exponentially_with_bounded_jitter_up_to_the_cap() {
        let s = schedule();
        let mid: Vec<u64> = (1..=7).map(|n| s.delay(n, 0.5).as_secs()).collect();
        assert_eq!(mid, [5, 25, 125, 625, 3125, 3600, 3600]);
        assert_eq!(s.delay(1, 0.0), Duration::from_secs(4));
        assert!(s.delay(1, 0.999_999) < Duration::from_secs(6));
        assert!(s.delay(1, 0.999_999) > Duration::from_millis(5990));
        assert_eq!(s.delay(u32::MAX, 0.7), Duration::from_secs(3600), "no overflow");
        assert_eq!(s.delay(0, 0.5), Duration::from_secs(5), "the first retry at least");
        assert_eq!(s.delay(2, 7.0), Duration::from_secs(30), "jitter is clamped");
    }

    #[test]
    fn a_delivery_is_given_up_once_its_next_try_would_pass_the_window() {
        let s = schedule();
        let start = Timestamp::from_millis(1_000_000);
        let soon = s.next_attempt(1, start, start, 0.5).unwrap();
        assert_eq!(soon, start.plus(Duration::from_secs(5)));
        let late = start.plus(Duration::from_secs(23 * 3600 + 1800));
        assert!(s.next_attempt(9, late, start, 0.5).is_none(), "an hour more passes the day");
        let early = start.plus(Duration::from_secs(3600));
        assert_eq!(s.next_attempt(9, early, start, 0.5), Some(early.plus(s.max)));
    }

    #[test]
    fn the_breaker_opens_at_its_threshold_then_lets_one_through_after_the_wait() {
        let now = Timestamp::from_millis(10_000);
        let later = Some(Timestamp::from_millis(20_000));
        let past = Some(Timestamp::from_millis(5_000));
        assert_eq!(Breaker::state(4, 5, later, now), Breaker::Closed);
        assert_eq!(
            Breaker::state(5, 5, later, now),
            Breaker::Open { until: Timestamp::from_millis(20_000) }
        );
        assert_eq!(Breaker::state(7, 5, past, now), Breaker::HalfOpen);
        assert_eq!(Breaker::state(7, 5, None, now), Breaker::HalfOpen);
    }

    #[test]
    fn results_apply_only_to_deliveries_still_to_be_sent() {
        use DeliveryStatus::*;
        assert_eq!(Pending.become_(Succeeded), Ok(Succeeded));
        assert_eq!(Failed.become_(Dead), Ok(Dead));
        assert_eq!(Failed.become_(Failed), Ok(Failed));
        assert!(Succeeded.become_(Failed).is_err());
        assert!(Dead.become_(Succeeded).is_err());
        for status in DeliveryStatus::ALL {
            assert_eq!(status.become_(Pending), Ok(Pending), "redelivery");
            assert_eq!(status.as_str().parse::<DeliveryStatus>().unwrap(), status);
        }
    }

    #[test]
    fn endpoint_urls_are_absolute_http_with_a_host() {
        assert_eq!(
            parse_webhook_url("https://example.com/hook?t=1").unwrap(),
            "https://example.com"
        );
        assert_eq!(
            parse_webhook_url("HTTP://user:pw@127.0.0.1:9000/x").unwrap(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(parse_webhook_url("http://[::1]:8080/").unwrap(), "http://[::1]:8080");
        for bad in [
            "",
            "example.com/hook",
            "ftp://example.com",
            "http://",
            "http:///path",
            "http://:80/x",
            "https://exa mple.com",
            "javascript:alert(1)",
        ] {
            let err = parse_webhook_url(bad).unwrap_err();
            assert_eq!(err.field, "url", "{bad}");
        }
        assert!(parse_webhook_url(&format!("https://e.com/{}", "a".repeat(3000))).is_err());
    }
}
