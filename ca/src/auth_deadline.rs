//! Closing gRPC connections on which no call ever authenticates.
//!
//! The listener's idle timeout counts bytes, and every HTTP/2 client answers the server's
//! keepalive PINGs, so a connection that never makes a call stays open for as long as its
//! peer likes, holding one of the listener's places (64 per address, 1,024 in all): a few
//! addresses could keep every node from reaching the controller. A connection on the node
//! port must therefore have had a call authenticate (a node credential accepted) within the
//! deadline — the gRPC idle timeout, 30 s by default — or it is closed and counted in
//! `membrane_ca_listener_timeouts_total{stage="unauthenticated"}`. After that the connection
//! is judged by the idle timeout alone, as before.
//!
//! Calls know their connection only by the peer address tonic reports; a live TCP
//! connection's peer address is unique on one listener, and an address is remembered only
//! while its connection is open (a call that authenticates after its connection closed marks
//! nothing; a connection's end never removes a later one's entry for the same address).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Sleep;

/// The node port's open connections and whether a call on each has authenticated.
/// Each entry: (the connection's generation, a call authenticated on it).
#[derive(Debug, Clone, Default)]
pub struct AuthenticatedConnections(Arc<Mutex<Connections>>);

#[derive(Debug, Default)]
struct Connections {
    next: u64,
    open: HashMap<SocketAddr, (u64, bool)>,
}

impl AuthenticatedConnections {
    /// A call from `peer` authenticated (nothing happens if no such connection is open).
    pub fn mark(&self, peer: Option<SocketAddr>) {
        if let Some(peer) = peer
            && let Some((_, seen)) = membrane_runtime::lock(&self.0).open.get_mut(&peer)
        {
            *seen = true;
        }
    }

    /// Registers the connection from `peer`; its generation tells it apart from a later
    /// connection from the same address whose entry replaced it.
    fn open(&self, peer: SocketAddr) -> u64 {
        let mut c = membrane_runtime::lock(&self.0);
        c.next += 1;
        let generation = c.next;
        c.open.insert(peer, (generation, false));
        generation
    }

    fn authenticated(&self, peer: SocketAddr, generation: u64) -> bool {
        membrane_runtime::lock(&self.0).open.get(&peer) == Some(&(generation, true))
    }

    fn close(&self, peer: SocketAddr, generation: u64) {
        let mut c = membrane_runtime::lock(&self.0);
        if c.open.get(&peer).is_some_and(|(g, _)| *g == generation) {
            c.open.remove(&peer);
        }
    }

    /// Connections open (for tests).
    pub fn len(&self) -> usize {
        membrane_runtime::lock(&self.0).open.len()
    }

    /// No connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's deadline: polled by its reads until a call authenticated or it passed.
#[derive(Debug)]
pub struct AuthDeadline {
    peer: SocketAddr,
    generation: u64,
    connections: AuthenticatedConnections,
    sleep: Pin<Box<Sleep>>,
    within: Duration,
    expired: Counter,
    settled: bool,
}

impl AuthDeadline {
    /// Starts the deadline of the connection from `peer`; `expired` counts the closures.
    pub fn start(
        peer: SocketAddr,
        connections: AuthenticatedConnections,
        within: Duration,
        expired: Counter,
    ) -> Self {
        let generation = connections.open(peer);
        Self {
            peer,
            generation,
            connections,
            sleep: Box::pin(tokio::time::sleep(within)),
            within,
            expired,
            settled: false,
        }
    }

    /// `Ready(error)` once the deadline passed without an authenticated call; the connection
    /// is then closed by failing its read.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        if self.settled || self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.settled = true;
        if self.connections.authenticated(self.peer, self.generation) {
            return Poll::Pending;
        }
        self.expired.inc();
        tracing::debug!(peer = %self.peer, within_ms = u64::try_from(self.within.as_millis()).unwrap_or(u64::MAX), "closing a connection on which no call authenticated");
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no call authenticated on this connection in time",
        ))
    }
}

impl Drop for AuthDeadline {
    fn drop(&mut self) {
        self.connections.close(self.peer, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expired_now(deadline: &mut AuthDeadline) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(deadline.poll_expired(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_an_authenticated_call_expires_once() {
        let connections = AuthenticatedConnections::default();
        let expired = Counter::default();
        let peer: SocketAddr = "10.0.0.1:40000".parse().expect("addr");
        let other: SocketAddr = "10.0.0.2:40000".parse().expect("addr");
        let mut silent = AuthDeadline::start(
            peer,
            connections.clone(),
            Duration::from_secs(30),
            expired.clone(),
        );
        let mut caller = AuthDeadline::start(
            other,
            connections.clone(),
            Duration::from_secs(30),
            expired.clone(),
        );
        // A call on an unknown connection marks nothing.
        connections.mark(Some("10.0.0.3:1".parse().expect("addr")));
        connections.mark(None);
        assert_eq!(connections.len(), 2);
        connections.mark(Some(other));
        assert!(!expired_now(&mut silent).await);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(expired_now(&mut silent).await, "expires");
        assert!(!expired_now(&mut silent).await, "only once");
        assert!(
            !expired_now(&mut caller).await,
            "the authenticated one stays"
        );
        assert_eq!(expired.get(), 1);
        drop(silent);
        drop(caller);
        assert!(connections.is_empty());
        // The same address again before the old connection is gone: the old one's end does
        // not take the new one's entry.
        let old = AuthDeadline::start(
            peer,
            connections.clone(),
            Duration::from_secs(30),
            expired.clone(),
        );
        let new = AuthDeadline::start(
            peer,
            connections.clone(),
            Duration::from_secs(30),
            expired.clone(),
        );
        drop(old);
        connections.mark(Some(peer));
        assert!(connections.authenticated(peer, new.generation));
        drop(new);
        assert!(connections.is_empty());
    }
}
