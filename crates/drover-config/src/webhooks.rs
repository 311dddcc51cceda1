//! `[webhooks]`: how deliveries to webhook endpoints are sent and retried, and what
//! happens to an endpoint that keeps failing (its circuit breaker opens, then it is
//! disabled), and whether endpoints may be private addresses. Endpoints themselves are
//! data, made through the API.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// The wait before the first retry; each next one waits 5× longer (±20% jitter).
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest wait between two retries.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// A delivery not answered 2xx this long after it was made is given up (`dead`).
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// Failed attempts in a row (any delivery) that disable an endpoint.
    pub disable_after_failures: u32,
    /// Failed attempts in a row that open an endpoint's circuit breaker.
    pub breaker_after_failures: u32,
    /// How long an open breaker holds deliveries back before letting one through.
    #[serde(with = "humantime_serde")]
    pub breaker_open_for: Duration,
    /// How long one attempt may take, connection to answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often due deliveries are looked for.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Attempts in flight at once, over all endpoints.
    pub concurrency: u32,
    /// Whether endpoints may be on this machine or a private network (loopback, RFC 1918,
    /// link-local, carrier-grade NAT, unique-local, …) when the server is not in local
    /// mode. Off: such URLs are refused when an endpoint is made and every address a
    /// delivery would connect to is checked (SSRF). Local mode (loopback, no users)
    /// always allows them.
    pub allow_private_targets: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(24 * 3600),
            disable_after_failures: 20,
            breaker_after_failures: 5,
            breaker_open_for: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            concurrency: 16,
            allow_private_targets: false,
        }
    }
}

impl WebhooksConfig {
    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if self.retry_initial < Duration::from_millis(10) {
            return invalid("webhooks.retry_initial", "must be at least 10ms");
        }
        if self.retry_max < self.retry_initial {
            return invalid("webhooks.retry_max", "must be at least webhooks.retry_initial");
        }
        if self.give_up_after < self.retry_initial {
            return invalid("webhooks.give_up_after", "must be at least webhooks.retry_initial");
        }
        if self.disable_after_failures == 0 {
            return invalid("webhooks.disable_after_failures", "must be at least 1");
        }
        if self.breaker_after_failures == 0 {
            return invalid("webhooks.breaker_after_failures", "must be at least 1");
        }
        if self.request_timeout < Duration::from_millis(100)
            || self.request_timeout > Duration::from_secs(300)
        {
            return invalid("webhooks.request_timeout", "must be between 100ms and 5m");
        }
        if self.poll_interval < Duration::from_millis(10) {
            return invalid("webhooks.poll_interval", "must be at least 10ms");
        }
        if !(1..=256).contains(&self.concurrency) {
            return invalid("webhooks.concurrency", "must be between 1 and 256");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_values_name_their_key() {
        WebhooksConfig::default().validate().unwrap();
        let bad = [
            WebhooksConfig { retry_initial: Duration::ZERO, ..WebhooksConfig::default() },
            WebhooksConfig { retry_max: Duration::from_secs(1), ..WebhooksConfig::default() },
            WebhooksConfig { disable_after_failures: 0, ..WebhooksConfig::default() },
            WebhooksConfig {
                request_timeout: Duration::from_secs(900),
                ..WebhooksConfig::default()
            },
            WebhooksConfig { concurrency: 0, ..WebhooksConfig::default() },
        ];
        for config in bad {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("webhooks."), "{err}");
        }
    }
}
