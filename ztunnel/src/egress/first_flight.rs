//! A connection to the outside gated on the client's first flight (and metered when the
//! deciding policy has a budget): the first bytes the client sends are held until they are a
//! whole ClientHello (or plainly not TLS, or [`sni::MAX_PEEK`] bytes, or the client ends),
//! and the gate — the EgressPolicy decision again, now with the server name ([`recheck`]) —
//! decides them. A refused first flight is never written: the write fails, and the relay
//! resets both sides. Reads (a server that speaks first) are never held; there is no
//! deadline.
//!
//! Two paths use it. The egress gateway: its CONNECT names a host and a port, not the server
//! name the client will ask for. The node's own egress: a connection decided when the peek's
//! deadline passed without a whole ClientHello (`outbound.rs`), where a host rule or a DENY by
//! name concerns it — a client that waits, or sends its ClientHello in pieces, is decided on
//! the server name it finally sends.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use membrane_policy::egress::EgressDecision;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::EgressAttrs;
use crate::egress::budget::Metered;
use crate::relay::ResetOnError;
use crate::sni::{self, Hello};
use crate::state::{MeshState, Workload};

/// Decides the first flight: `Err(reason)` refuses the connection.
pub type HelloCheck = Box<dyn FnOnce(&Hello) -> Result<(), String> + Send>;

enum Inner {
    Plain(TcpStream),
    Metered(Metered<TcpStream>),
}

enum Gate {
    /// Collecting the first flight.
    Holding { buf: Vec<u8>, check: HelloCheck },
    /// Admitted; writing out the held bytes from `at`.
    Draining { buf: Vec<u8>, at: usize },
    /// Everything held was written.
    Open,
    /// The first flight was refused.
    Refused(String),
}

/// A connection to the outside whose first flight is held for a check.
pub struct FirstFlight {
    inner: Inner,
    gate: Gate,
}

impl std::fmt::Debug for FirstFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstFlight").finish_non_exhaustive()
    }
}

impl FirstFlight {
    /// Wraps `tcp`, metered when `meter` is given; the first flight is held for `check`.
    pub fn new(
        tcp: TcpStream,
        meter: Option<crate::egress::budget::Meter>,
        check: HelloCheck,
    ) -> Self {
        let inner = match meter {
            Some(meter) => Inner::Metered(Metered::new(tcp, meter)),
            None => Inner::Plain(tcp),
        };
        Self {
            inner,
            gate: Gate::Holding {
                buf: Vec::new(),
                check,
            },
        }
    }

    /// Runs the check on the held first flight: held for writing out, or refused.
    fn decide(&mut self, buf: Vec<u8>, check: HelloCheck, hello: &Hello) -> io::Result<()> {
        match check(hello) {
            Ok(()) => {
                self.gate = Gate::Draining { buf, at: 0 };
                Ok(())
            }
            Err(reason) => {
                let e = refused(&reason);
                self.gate = Gate::Refused(reason);
                Err(e)
            }
        }
    }

    /// Writes out held bytes; ready once none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { inner, gate } = self;
        let Gate::Draining { buf, at } = gate else {
            return Poll::Ready(Ok(()));
        };
        while *at < buf.len() {
            let n = ready!(Pin::new(&mut *inner).poll_write(cx, &buf[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
        }
        *gate = Gate::Open;
        Poll::Ready(Ok(()))
    }
}

// Static dispatch to the one concrete stream (the relay's hot path).
impl AsyncRead for Inner {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Metered(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Inner {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, data),
            Inner::Metered(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Metered(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Metered(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

fn refused(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("egress first flight denied: {reason}"),
    )
}

/// A refused first flight: the decision on it and the server name it asked for.
#[derive(Debug, Clone)]
pub struct FlightRefusal {
    /// The decision with the first flight's server name and TLS-ness.
    pub decision: EgressDecision,
    /// The ClientHello's server name.
    pub sni: Option<String>,
}

/// The check of a connection of `source` admitted on `attrs` (the pins it was decided on):
/// the EgressPolicy decision again against the mesh state of the moment, with the first
/// flight's server name and TLS-ness; `admits` says which decisions let it go on. A refusal
/// is logged (`at` says where: `gateway`, `node`) and kept in `refused`.
pub fn recheck(
    state: watch::Receiver<Arc<MeshState>>,
    source: Arc<Workload>,
    attrs: EgressAttrs,
    admits: impl FnOnce(&EgressDecision) -> bool + Send + 'static,
    at: &'static str,
    refused: Arc<OnceLock<FlightRefusal>>,
) -> HelloCheck {
    Box::new(move |hello: &Hello| {
        let attrs = EgressAttrs {
            sni: match hello {
                Hello::Sni(name) => Some(name.clone()),
                _ => None,
            },
            tls: super::is_tls(hello, attrs.dst.port()),
            sni_unreadable: *hello == Hello::UnreadableTls,
            ..attrs
        };
        let decision = super::decide_attrs(&state.borrow(), &source, &attrs);
        if admits(&decision) {
            return Ok(());
        }
        let reason = decision.reason.as_str().to_owned();
        tracing::info!(
            at,
            src = %source.identity,
            dst = %attrs.dst,
            sni = attrs.sni.as_deref(),
            policy = decision.policy.as_deref(),
            reason,
            "egress first flight refused"
        );
        let _ = refused.set(FlightRefusal {
            decision,
            sni: attrs.sni,
        });
        Err(reason)
    })
}

impl AsyncRead for FirstFlight {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FirstFlight {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match std::mem::replace(&mut this.gate, Gate::Open) {
            Gate::Refused(reason) => {
                let e = refused(&reason);
                this.gate = Gate::Refused(reason);
                return Poll::Ready(Err(e));
            }
            Gate::Holding { mut buf, check } => {
                let take = data.len().min(sni::MAX_PEEK.saturating_sub(buf.len()));
                buf.extend_from_slice(&data[..take]);
                let hello = sni::client_hello(&buf);
                if hello == Hello::Incomplete && buf.len() < sni::MAX_PEEK {
                    this.gate = Gate::Holding { buf, check };
                    return Poll::Ready(Ok(take));
                }
                this.decide(buf, check, &hello)?;
                // The bytes are held: they go out now, or on the next write or flush.
                if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(take));
            }
            other => this.gate = other,
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match std::mem::replace(&mut this.gate, Gate::Open) {
            // The client ended before a whole first flight: decide on what came.
            Gate::Holding { buf, check } => {
                let hello = sni::client_hello(&buf);
                this.decide(buf, check, &hello)?;
            }
            Gate::Refused(reason) => {
                let e = refused(&reason);
                this.gate = Gate::Refused(reason);
                return Poll::Ready(Err(e));
            }
            other => this.gate = other,
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Reads pass straight to the upstream (the gate holds back writes only): ready to read when
/// it is.
impl crate::relay::Chunks for FirstFlight {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => s.poll_readable(cx),
            Inner::Metered(s) => s.poll_readable(cx),
        }
    }
}

impl ResetOnError for FirstFlight {
    fn reset(self) {
        match self.inner {
            Inner::Plain(s) => s.reset(),
            Inner::Metered(s) => s.reset(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream over loopback whose gate records the hello it was asked about and answers
    /// `verdict`; returns it and the far end.
    async fn pair(
        verdict: Result<(), String>,
    ) -> (FirstFlight, TcpStream, Arc<Mutex<Option<Hello>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let asked = Arc::new(Mutex::new(None));
        let seen = asked.clone();
        let check: HelloCheck = Box::new(move |hello: &Hello| {
            *seen.lock().expect("lock") = Some(hello.clone());
            verdict
        });
        let upstream = FirstFlight::new(near.expect("connect"), None, check);
        (upstream, far.expect("accept").0, asked)
    }

    async fn nothing_arrives(far: &mut TcpStream) {
        let mut buf = [0u8; 1];
        let read =
            tokio::time::timeout(std::time::Duration::from_millis(100), far.read(&mut buf)).await;
        assert!(
            !matches!(read, Ok(Ok(n)) if n > 0),
            "bytes went out before the gate decided"
        );
    }

    #[tokio::test]
    async fn the_first_flight_waits_for_a_whole_client_hello() {
        let (mut up, mut far, asked) = pair(Ok(())).await;
        let hello = crate::sni::hello_for("huggingface.co");
        up.write_all(&hello[..20]).await.expect("write");
        nothing_arrives(&mut far).await;
        assert!(asked.lock().expect("lock").is_none());
        up.write_all(&hello[20..]).await.expect("write");
        up.write_all(b"more").await.expect("write");
        up.flush().await.expect("flush");
        let mut got = vec![0u8; hello.len() + 4];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..hello.len()], &hello[..]);
        assert_eq!(&got[hello.len()..], b"more");
        assert_eq!(
            *asked.lock().expect("lock"),
            Some(Hello::Sni("huggingface.co".into()))
        );
    }

    #[tokio::test]
    async fn a_refused_first_flight_never_leaves() {
        let (mut up, mut far, asked) = pair(Err("sni_mismatch".into())).await;
        let hello = crate::sni::hello_for("paste.example");
        let err = up.write_all(&hello).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(up.write_all(b"again").await.is_err(), "stays refused");
        assert_eq!(
            *asked.lock().expect("lock"),
            Some(Hello::Sni("paste.example".into()))
        );
        up.reset();
        let mut rest = Vec::new();
        let _ = far.read_to_end(&mut rest).await;
        assert!(
            rest.is_empty(),
            "{} bytes reached the destination",
            rest.len()
        );
    }

    #[tokio::test]
    async fn plain_protocols_are_decided_on_their_first_bytes() {
        let (mut up, mut far, asked) = pair(Ok(())).await;
        up.write_all(b"PUT /upload HTTP/1.1\r\n")
            .await
            .expect("write");
        up.flush().await.expect("flush");
        let mut got = [0u8; 3];
        far.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"PUT");
        assert_eq!(*asked.lock().expect("lock"), Some(Hello::NotTls));
    }
}
