//! Which host a request is for, decided before anything is routed, and refused (400
//! `invalid_host`) when the request does not say it plainly:
//!
//! - HTTP/1: exactly one `Host` (none, several, or one that is not a valid `host[:port]` is
//!   a 400: RFC 9112 §3.2); an absolute-form target's authority counts instead of `Host`
//!   (§3.2.2).
//! - HTTP/2: `:authority`, which a `Host` may repeat (in any case) but not contradict
//!   (RFC 9113 §8.3.1); `Host` alone when there is no `:authority`.
//! - A valid value has a host, no user information, and a port, if any, of at most 65535.

use hyper::header::{self, HeaderMap};
use hyper::http::uri::Authority;
use hyper::{Uri, Version};

/// The host (`name[:port]`, as the client wrote it) `uri` and `headers` ask for, or why
/// there is none to route by.
pub(crate) fn requested_host(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<String, String> {
    let mut values = headers.get_all(header::HOST).iter();
    let host = values.next();
    if values.next().is_some() {
        return Err("the request has more than one `Host` header".to_owned());
    }
    let host = host
        .map(|value| value.to_str().map_err(|_| "the `Host` header is not ASCII text".to_owned()))
        .transpose()?;
    let authority = uri.authority().map(Authority::as_str);
    let chosen = match (version, authority, host) {
        (Version::HTTP_2, Some(authority), Some(host)) if !authority.eq_ignore_ascii_case(host) => {
            return Err(format!("`Host: {host}` disagrees with `:authority` `{authority}`"));
        }
        (Version::HTTP_2, Some(authority), _) => authority,
        (_, _, None) => return Err("the request names no host: send a `Host` header".to_owned()),
        // An absolute-form target (`GET http://name/ HTTP/1.1`) names the host itself.
        (_, Some(authority), Some(_)) => authority,
        (_, None, Some(host)) => host,
    };
    check(chosen)?;
    Ok(chosen.to_owned())
}

/// Whether `value` is a `host[:port]` the proxy can route by.
fn check(value: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`Host: {value}` {why}"));
    if value.is_empty() {
        return Err("the `Host` header is empty".to_owned());
    }
    if value.contains('@') {
        return bad("holds user information");
    }
    if value.parse::<Authority>().is_err() {
        return bad("is not a host[:port]");
    }
    let (name, port) = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((address, tail)) => (address, tail.strip_prefix(':')),
            None => return bad("has an unclosed `[`"),
        },
        None => match value.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (value, None),
        },
    };
    if name.is_empty() {
        return bad("names no host");
    }
    // An empty port (`name:`) is allowed (RFC 3986) and means the default one.
    if port.is_some_and(|port| !port.is_empty() && port.parse::<u16>().is_err()) {
        return bad("has a port that is not a number up to 65535");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for host in hosts {
            map.append(header::HOST, host.parse().unwrap());
        }
        map
    }

    fn http1(hosts: &[&str]) -> Result<String, String> {
        requested_host(Version::HTTP_11, &Uri::from_static("/"), &headers(hosts))
    }

    #[test]
    fn one_valid_host_is_taken_as_written() {
        for host in ["app.localhost", "APP.localhost:7080", "app.localhost.", "[::1]:8080", "a:"] {
            assert_eq!(http1(&[host]).as_deref(), Ok(host));
        }
    }

    #[test]
    fn none_several_or_a_malformed_host_is_refused() {
        assert!(http1(&[]).unwrap_err().contains("names no host"));
        assert!(http1(&["a.localhost", "a.localhost"]).unwrap_err().contains("more than one"));
        for bad in ["", "a:99999", "a:8x", ":80", "u@a", "a/x", "a b", "[::1", "a:1:2"] {
            assert!(http1(&[bad]).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_absolute_target_names_the_host_and_http2_authority_must_agree_with_host() {
        let absolute = Uri::from_static("http://app.localhost/x");
        let host = headers(&["other.localhost"]);
        assert_eq!(requested_host(Version::HTTP_11, &absolute, &host).unwrap(), "app.localhost");
        assert!(
            requested_host(Version::HTTP_2, &absolute, &host).unwrap_err().contains("disagrees")
        );
        let same = headers(&["APP.localhost"]);
        assert_eq!(requested_host(Version::HTTP_2, &absolute, &same).unwrap(), "app.localhost");
        let alone = requested_host(Version::HTTP_2, &absolute, &HeaderMap::new());
        assert_eq!(alone.unwrap(), "app.localhost");
        let no_authority = requested_host(Version::HTTP_2, &Uri::from_static("/"), &same);
        assert_eq!(no_authority.unwrap(), "APP.localhost");
    }
}
