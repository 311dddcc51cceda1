//! Where webhook deliveries may go (SSRF). A server that is not in local mode sends
//! nothing to this machine or a private network unless `[webhooks] allow_private_targets`
//! says so: an endpoint's URL is refused when it is made if its host is such an address,
//! a name like `localhost`, or a name resolving to such an address; and because a name may
//! resolve elsewhere later (DNS rebinding), the delivery loop checks every address it is
//! about to connect to with the same rules ([`check_address`]). The ranges are the
//! domain's ([`drover_domain::non_public_range`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_domain::{is_loopback_name, non_public_range};

use crate::AuthState;

/// How long resolving an endpoint's name at creation may take; a name that does not
/// resolve in time is accepted (each delivery checks it again).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A target this server does not send to, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{host} is {reason}: this server does not send webhooks to this machine or private \
     networks (`[webhooks] allow_private_targets = true` allows it)"
)]
pub struct TargetRefused {
    /// The host as the URL names it (or the address it resolved to).
    pub host: String,
    pub reason: String,
}

/// Whether private targets are allowed now: by configuration, or while the server is in
/// local mode (loopback, no users), which ends when the first user is made.
#[derive(Clone)]
pub struct TargetPolicy {
    allow_private: bool,
    /// Whose local mode counts; `None`: never local.
    auth: Option<Arc<AuthState>>,
}

impl TargetPolicy {
    pub fn new(allow_private: bool, auth: Arc<AuthState>) -> Self {
        Self { allow_private, auth: Some(auth) }
    }

    /// A policy that follows no server's local mode: private targets are allowed exactly
    /// when `allow_private` says.
    pub fn fixed(allow_private: bool) -> Self {
        Self { allow_private, auth: None }
    }

    pub fn private_allowed(&self) -> bool {
        self.allow_private || self.auth.as_ref().is_some_and(|auth| auth.is_local())
    }
}

/// Refuses `ip` (which `host` named or resolved to) when it is not a public address.
pub fn check_address(host: &str, ip: IpAddr) -> Result<(), TargetRefused> {
    match non_public_range(ip) {
        Some(range) => Err(TargetRefused {
            host: host.to_owned(),
            reason: if host == ip.to_string() {
                format!("a {range} address")
            } else {
                format!("resolved to {ip}, a {range} address")
            },
        }),
        None => Ok(()),
    }
}

/// What a URL's host is, for the checks: an address (checked here) or a name to resolve
/// (`localhost` and `*.localhost` are refused without resolving). `url` is parsed as HTTP
/// clients parse it, so `http://2130706433/` is `127.0.0.1` here as it is to them.
pub fn check_host(url: &url::Url) -> Result<Option<(String, u16)>, TargetRefused> {
    let port = url.port_or_known_default().unwrap_or(80);
    match url.host() {
        Some(url::Host::Ipv4(ip)) => check_address(&ip.to_string(), IpAddr::V4(ip)).map(|()| None),
        Some(url::Host::Ipv6(ip)) => check_address(&ip.to_string(), IpAddr::V6(ip)).map(|()| None),
        Some(url::Host::Domain(name)) if is_loopback_name(name) => Err(TargetRefused {
            host: name.to_owned(),
            reason: "a name for this machine".to_owned(),
        }),
        Some(url::Host::Domain(name)) => Ok(Some((name.to_owned(), port))),
        None => Err(TargetRefused { host: String::new(), reason: "not a host".to_owned() }),
    }
}

/// Checks an endpoint URL when it is made: its host, and every address its name resolves
/// to now. A name that does not resolve (now) passes: deliveries check again.
pub async fn check_url(url: &url::Url) -> Result<(), TargetRefused> {
    let Some((name, port)) = check_host(url)? else { return Ok(()) };
    let resolved =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name.as_str(), port)));
    let addresses = match resolved.await {
        Ok(Ok(addresses)) => addresses,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "a webhook host does not resolve now; deliveries check it");
            return Ok(());
        }
        Err(_) => {
            tracing::debug!("resolving a webhook host timed out; deliveries check it");
            return Ok(());
        }
    };
    for address in addresses {
        check_address(&name, address.ip())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(url: &str) -> Result<Option<(String, u16)>, TargetRefused> {
        check_host(&url::Url::parse(url).unwrap())
    }

    #[test]
    fn literal_addresses_and_localhost_names_are_judged_without_resolving() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://10.0.0.7/",
            "http://100.64.1.1/",
            "http://[fd00::1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://localhost:9/",
            "https://app.LOCALHOST./",
        ] {
            let refused = host_of(url).unwrap_err();
            assert!(refused.to_string().contains("allow_private_targets"), "{url}: {refused}");
        }
        assert_eq!(
            host_of("http://[::ffff:127.0.0.1]/").unwrap_err().reason,
            "a loopback (127.0.0.0/8) address"
        );
        assert_eq!(host_of("https://93.184.215.14/").unwrap(), None);
        assert_eq!(
            host_of("https://hooks.example.com/x").unwrap(),
            Some(("hooks.example.com".to_owned(), 443))
        );
    }

    #[test]
    fn a_resolved_address_is_named_with_the_host_it_came_from() {
        let refused = check_address("rebind.example", "127.0.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(refused.reason, "resolved to 127.0.0.1, a loopback (127.0.0.0/8) address");
        assert!(check_address("dns.google", "8.8.8.8".parse().unwrap()).is_ok());
    }
}
