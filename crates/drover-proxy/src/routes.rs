//! The live route table: hostname → upstream address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// Where one hostname leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lowercase, without port.
    pub host: String,
    pub upstream: SocketAddr,
    /// The service behind it, for error messages (`app`).
    pub service: String,
    /// The environment it belongs to, if it is not shared.
    pub environment: Option<String>,
    /// The project of that environment: an unknown host's 404 names the route only when
    /// the proxy may name every project's (see [`crate::Proxy::naming_every_host_while`]).
    pub project: Option<String>,
    /// Reported on every request routed here (see [`crate::Proxy::on_activity`]).
    pub activity: Option<String>,
    /// The supervised instance behind it, as its owner names it: asked about when the
    /// upstream does not answer (see [`crate::UpstreamStates`]).
    pub instance: Option<String>,
}

/// Shared, cheap to clone. Reads never wait on a request; writes replace entries whole.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    // A std lock: held for a map lookup or update only, never across an await.
    routes: Arc<RwLock<BTreeMap<String, Route>>>,
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces every route at once (used to sync from the set of running services).
    pub fn replace_all(&self, routes: impl IntoIterator<Item = Route>) {
        let fresh: BTreeMap<String, Route> =
            routes.into_iter().map(|route| (normalize_host(&route.host), route)).collect();
        *self.write() = fresh;
    }

    pub fn upsert(&self, route: Route) {
        self.write().insert(normalize_host(&route.host), route);
    }

    pub fn remove(&self, host: &str) -> Option<Route> {
        self.write().remove(&normalize_host(host))
    }

    pub fn get(&self, host: &str) -> Option<Route> {
        self.read().get(&normalize_host(host)).cloned()
    }

    pub fn hosts(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<Route> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Route>> {
        // Every write replaces whole entries, so a poisoned map is still consistent.
        self.routes.read().unwrap_or_else(|poison| poison.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Route>> {
        self.routes.write().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// `App.Run-1.LOCALHOST.:7080` → `app.run-1.localhost`; `[::1]:7080` → `[::1]`.
pub(crate) fn normalize_host(host: &str) -> String {
    if let Some((address, _port)) = host.strip_prefix('[').and_then(|rest| rest.split_once(']')) {
        return format!("[{}]", address.to_ascii_lowercase());
    }
    let name = match host.rsplit_once(':') {
        // An empty port (`name:`) is the default one.
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, port: u16) -> Route {
        Route {
            host: host.into(),
            upstream: SocketAddr::from(([127, 0, 0, 1], port)),
            service: "app".into(),
            environment: None,
            project: None,
            activity: None,
            instance: None,
        }
    }

    #[test]
    fn hosts_match_without_case_port_or_trailing_dot() {
        let table = RouteTable::new();
        table.upsert(route("app.run-1.localhost", 9000));
        for host in [
            "app.run-1.localhost",
            "APP.Run-1.localhost:7080",
            "app.run-1.localhost.",
            "app.run-1.localhost:",
        ] {
            assert_eq!(table.get(host).map(|r| r.upstream.port()), Some(9000), "{host}");
        }
        assert!(table.get("other.localhost").is_none());
    }

    #[test]
    fn replacing_all_routes_drops_the_old_ones() {
        let table = RouteTable::new();
        table.upsert(route("a.localhost", 1));
        table.replace_all([route("b.localhost", 2)]);
        assert_eq!(table.hosts(), ["b.localhost"]);
        assert_eq!(table.remove("b.localhost").map(|r| r.upstream.port()), Some(2));
        assert!(table.list().is_empty());
    }
}
