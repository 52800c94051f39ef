//! HBONE's TLS handshake: rustls' unbuffered API over the buffer the socket is read into,
//! then its TLS 1.3 traffic secrets handed to [`TlsStream`] (`rustls::kernel`), which opens
//! and seals the records from then on. Only TLS 1.3 is accepted; the configuration must allow
//! secret extraction (`super::with_h2` makes sure it does).

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ExtractedSecrets, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::SOCKET_BUFFER;
use super::tls::{Kernel, Session, TlsStream, tls_error};

/// An unbuffered rustls connection of either side.
trait Handshake: Sized {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshake for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    }
}

impl Handshake for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    }
}

/// Runs a client handshake over `io` (the config must allow secret extraction).
pub(crate) async fn connect<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<TlsStream<T>> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    handshake(io, conn).await
}

/// Runs a server handshake over `io` (the config must allow secret extraction).
pub(crate) async fn accept<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<TlsStream<T>> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    handshake(io, conn).await
}

async fn handshake<T, C>(mut io: T, mut conn: C) -> io::Result<TlsStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Handshake,
{
    let mut incoming = vec![0u8; SOCKET_BUFFER].into_boxed_slice();
    let mut filled = 0;
    let mut outgoing = vec![0u8; 4096];
    let mut encoded = 0;
    // Application data that arrived with the handshake's last flight.
    let mut early = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..filled]);
        let mut read_more = false;
        let mut done = false;
        match state.map_err(tls_error)? {
            ConnectionState::EncodeTlsData(mut encode) => loop {
                match encode.encode(&mut outgoing[encoded..]) {
                    Ok(n) => {
                        encoded += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(short)) => {
                        outgoing.resize(encoded + short.required_size, 0);
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            },
            ConnectionState::TransmitTlsData(transmit) => {
                io.write_all(&outgoing[..encoded]).await?;
                io.flush().await?;
                encoded = 0;
                transmit.done();
            }
            ConnectionState::BlockedHandshake => read_more = true,
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
            }
            // A server may send before the client's Finished arrives; the handshake is
            // complete (and the client verified) only once it has.
            ConnectionState::WriteTraffic(_) => {
                if conn.common().is_handshaking() {
                    read_more = true;
                } else {
                    done = true;
                }
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected TLS handshake state {other:?}"),
                ));
            }
        }
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        if done {
            break;
        }
        if read_more {
            if filled == incoming.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake message over the read buffer",
                ));
            }
            let n = io.read(&mut incoming[filled..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
            filled += n;
        }
    }
    let common = conn.common();
    if common.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "HBONE requires TLS 1.3",
        ));
    }
    let session = Session {
        alpn: common.alpn_protocol().map(<[u8]>::to_vec),
        peer_certificates: common.peer_certificates().unwrap_or_default().to_vec(),
        kx_group: common.negotiated_key_exchange_group().map(|g| g.name()),
    };
    tracing::debug!(kx = ?session.kx_group, "TLS handshake complete");
    let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
    TlsStream::established(io, session, kernel, secrets, incoming, filled, early)
}
