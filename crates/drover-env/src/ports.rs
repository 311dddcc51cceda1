//! Free TCP ports for apps under test and deployed apps.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

/// A port on 127.0.0.1 that was free a moment ago: the OS picks it, we release it.
/// Another process could take it before ours binds; callers that start a server on it
/// verify it came up (health check) and retry on failure.
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port is free");
    }
}
