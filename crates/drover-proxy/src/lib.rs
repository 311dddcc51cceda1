//! The routing proxy: clients reach a service by a stable hostname
//! (`app.run-1a2b3c4d.localhost`), never by its port. Requests are routed by their `Host`
//! header through a [`RouteTable`] that changes live as services start and stop, without
//! restarting the listener or touching connections to other hosts.
//!
//! An unknown host gets a 404 problem listing the known hostnames; a route whose upstream
//! does not answer gets a 502 naming the service. A request that already passed through a
//! drover proxy is refused (508) so a misrouted table cannot loop.

mod forward;
mod routes;

use std::net::SocketAddr;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use routes::{Route, RouteTable};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A bound proxy listener, not yet serving.
pub struct Proxy {
    listener: TcpListener,
    addr: SocketAddr,
    activity: Option<tokio::sync::mpsc::Sender<String>>,
}

impl Proxy {
    pub async fn bind(addr: SocketAddr) -> Result<Self, ProxyError> {
        let listener =
            TcpListener::bind(addr).await.map_err(|source| ProxyError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind { addr, source })?;
        Ok(Self { listener, addr, activity: None })
    }

    /// Sends the `activity` key of every route a request goes through (dropping reports
    /// when the receiver lags: activity is a hint, not a log).
    pub fn on_activity(mut self, sender: tokio::sync::mpsc::Sender<String>) -> Self {
        self.activity = Some(sender);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` fires, then lets open requests finish (up to 5 s).
    pub async fn run(self, routes: RouteTable, shutdown: CancellationToken) {
        let forwarder = forward::Forwarder::new(routes, self.activity.clone());
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "proxy accept failed");
                        continue;
                    }
                },
            };
            let forwarder = forwarder.clone();
            let service = hyper::service::service_fn(move |request| {
                let forwarder = forwarder.clone();
                async move { Ok::<_, std::convert::Infallible>(forwarder.handle(request, peer).await) }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let connection = graceful.watch(connection.into_owned());
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(error = %err, "proxy connection ended with an error");
                }
            });
        }
        if tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("proxy connections still open after 5s; dropping them");
        }
    }
}
