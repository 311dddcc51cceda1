//! Which network addresses drover may connect to on a user's behalf (webhook targets):
//! addresses of the public internet, not this machine, its private networks nor its
//! cloud's metadata service (SSRF). [`non_public_range`] names the range an address falls
//! in when it is not public; [`is_loopback_name`] catches names that mean this machine
//! whatever the resolver says. Resolving names and refusing connections happen where the
//! network is; these are the rules.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The special-purpose range `ip` is in, if it is not an address of the public internet:
/// loopback, private networks (RFC 1918, unique-local), link-local (cloud metadata
/// services live there), carrier-grade NAT, unspecified, documentation, benchmarking,
/// multicast and reserved ranges. IPv6 forms that carry an IPv4 address (mapped,
/// compatible, NAT64, 6to4) are judged by that address.
pub fn non_public_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let range = match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (169, 254, _) => "link-local (169.254.0.0/16, cloud metadata)",
        (100, 64..=127, _) => "carrier-grade NAT (100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved (240.0.0.0/4)",
        _ => return None,
    };
    Some(range)
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback (::1)");
    }
    let segments = ip.segments();
    let embedded_v4 = |high: usize| {
        let [a, b] = segments[high].to_be_bytes();
        let [c, d] = segments[high + 1].to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match segments {
        // IPv4-mapped (::ffff:a.b.c.d): the IPv4 address itself.
        [0, 0, 0, 0, 0, 0xffff, _, _] => non_public_v4(embedded_v4(6)),
        // IPv4-compatible (::a.b.c.d), deprecated: nothing public uses it.
        [0, 0, 0, 0, 0, 0, _, _] => {
            Some(non_public_v4(embedded_v4(6)).unwrap_or("IPv4-compatible (::/96)"))
        }
        // NAT64 (64:ff9b::a.b.c.d) translates to the IPv4 address; its local-use range
        // (64:ff9b:1::/48) is private.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => non_public_v4(embedded_v4(6)),
        [0x64, 0xff9b, 1, ..] => Some("local-use NAT64 (64:ff9b:1::/48)"),
        // 6to4 (2002:a.b.c.d::/48) reaches the IPv4 address's network.
        [0x2002, _, _, ..] => non_public_v4(embedded_v4(1)),
        [0x0100, 0, 0, 0, ..] => Some("discard-only (100::/64)"),
        [0x2001, 0x0db8, ..] => Some("documentation (2001:db8::/32)"),
        [first, ..] if first & 0xfe00 == 0xfc00 => Some("unique-local (fc00::/7)"),
        [first, ..] if first & 0xffc0 == 0xfe80 => Some("link-local (fe80::/10)"),
        [first, ..] if first & 0xffc0 == 0xfec0 => Some("site-local (fec0::/10)"),
        [first, ..] if first & 0xff00 == 0xff00 => Some("multicast (ff00::/8)"),
        _ => None,
    }
}

/// Whether a host name means this machine by definition: `localhost` and every name under
/// `.localhost` (RFC 6761), with or without a trailing dot, in any case.
pub fn is_loopback_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(text: &str) -> Option<&'static str> {
        non_public_range(text.parse().unwrap())
    }

    #[test]
    fn loopback_private_link_local_and_other_special_ranges_are_not_public() {
        for (address, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.255", "carrier-grade NAT"),
            ("192.0.2.10", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::127.0.0.1", "loopback"),
            ("::8.8.8.8", "IPv4-compatible"),
            ("64:ff9b::a00:1", "private"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("2002:7f00:1::1", "loopback"),
            ("2002:c0a8:101::1", "private"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("100::1", "discard-only"),
        ] {
            let found = range(address).unwrap_or_else(|| panic!("{address} was taken as public"));
            assert!(found.starts_with(kind), "{address}: {found}");
        }
    }

    #[test]
    fn public_addresses_are_public() {
        for address in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.1.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(range(address), None, "{address}");
        }
    }

    #[test]
    fn localhost_names_mean_this_machine() {
        for name in ["localhost", "LOCALHOST", "localhost.", "app.localhost", "a.b.Localhost."] {
            assert!(is_loopback_name(name), "{name}");
        }
        for name in ["localhost.example.com", "mylocalhost", "example.com", "localhostx"] {
            assert!(!is_loopback_name(name), "{name}");
        }
    }
}
