//! TLS for NBD connections (proto.md "TLS support"): STARTTLS during the handshake, X.509
//! certificates, client certificates optional (rustls with the ring provider).
//!
//! The supervisor reads the certificate directory (QEMU's `tls-creds-x509` layout:
//! `server-cert.pem`, `server-key.pem`, `ca-cert.pem`) and hands the bytes over in one
//! descriptor ([`encode_credentials`]); the sandboxed driver opens no file.
//!
//! After STARTTLS the connection's own code is unchanged: [`TlsServer::upgrade`] runs the TLS
//! handshake on the client's socket, then gives the connection one end of a socket pair and
//! moves bytes between the pair and the TLS session on a thread of its own (the pump). The
//! pump reads from one side only while the other can take what it read, so backpressure,
//! the stall timeouts and the byte budgets act through the pair exactly as on a plain socket.
//! It costs one copy more than a plaintext connection; TLS connections are for remote clients,
//! where the network dominates.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the credentials handed over are malformed ({0})")]
    Bundle(&'static str),
    #[error("server-cert.pem holds no certificate")]
    NoCertificate,
    #[error("reading {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("ca-cert.pem holds no certificate, and verify_peer needs one")]
    NoCa,
    #[error("setting up TLS")]
    Rustls(#[from] rustls::Error),
    #[error("the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The supervisor's bundle: certificate chain, key and CA certificates (possibly empty), each
/// as a big-endian u32 length and the bytes.
pub fn encode_credentials(cert: &[u8], key: &[u8], ca: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + cert.len() + key.len() + ca.len());
    for part in [cert, key, ca] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn decode_credentials(mut bytes: &[u8]) -> Result<[&[u8]; 3], TlsError> {
    let mut parts: [&[u8]; 3] = [&[]; 3];
    for part in &mut parts {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or(TlsError::Bundle("truncated length"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(TlsError::Bundle("truncated section"));
        }
        (*part, bytes) = rest.split_at(len);
    }
    if !bytes.is_empty() {
        return Err(TlsError::Bundle("trailing bytes"));
    }
    Ok(parts)
}

/// The TLS side of every connection of one driver.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    required: bool,
}

impl TlsServer {
    /// From the supervisor's bundle; `required` refuses plaintext clients, `verify_peer`
    /// requires a client certificate signed by the bundle's CA certificates.
    pub fn new(bundle: &[u8], required: bool, verify_peer: bool) -> Result<TlsServer, TlsError> {
        let [cert, key, ca] = decode_credentials(bundle)?;
        let pem = |what| move |source| TlsError::Pem { what, source };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert).collect::<Result<_, _>>().map_err(pem("server-cert.pem"))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(pem("server-key.pem"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = if verify_peer {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots.add(c.map_err(pem("ca-cert.pem"))?)?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCa);
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key)?;
        Ok(TlsServer { config: Arc::new(config), required })
    }

    /// How the handshake treats STARTTLS before TLS is active.
    pub fn negotiation(&self) -> session::Tls {
        if self.required {
            session::Tls::Required
        } else {
            session::Tls::Offered
        }
    }

    /// Runs the TLS handshake on `stream` (by `deadline`), then returns the plaintext end of
    /// a socket pair whose other end a pump thread connects to the TLS session.
    pub fn upgrade(&self, mut stream: UnixStream, deadline: Instant) -> std::io::Result<UnixStream> {
        let mut tls = rustls::ServerConnection::new(self.config.clone()).map_err(std::io::Error::other)?;
        while tls.is_handshaking() {
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
            let left = left.ok_or_else(|| std::io::Error::new(ErrorKind::TimedOut, "TLS handshake"))?;
            stream.set_read_timeout(Some(left))?;
            stream.set_write_timeout(Some(left))?;
            let (read, wrote) = tls.complete_io(&mut stream)?;
            if read == 0 && wrote == 0 && tls.is_handshaking() {
                return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the client left during the TLS handshake"));
            }
        }
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        let (ours, theirs) = UnixStream::pair()?;
        std::thread::Builder::new().name("rblk-tls".into()).spawn(move || pump(tls, stream, ours))?;
        Ok(theirs)
    }
}

/// How long records still owed to the client may take to leave once the connection has
/// ended (its last replies; a client that does not read them is not waited for longer).
const DRAIN: Duration = Duration::from_secs(5);

/// Moves bytes between the client's socket (`net`, TLS records) and the connection's end of
/// the pair (`plain`) until either side ends or fails; then both are closed, which the other
/// side sees as the end of its stream.
///
/// A hang-up is acted on whatever was asked for: the kernel reports it even for a descriptor
/// polled for nothing, so ignoring it would wake this loop at once, again and again. When the
/// connection ends (its stall timeout dropped a client that stopped reading, say), what it
/// sent is still written to the client for up to [`DRAIN`], then the pump ends.
fn pump(mut tls: rustls::ServerConnection, net: UnixStream, plain: UnixStream) {
    if net.set_nonblocking(true).is_err() || plain.set_nonblocking(true).is_err() {
        return;
    }
    let (mut net, mut plain) = (net, plain);
    let mut to_plain = Vec::new(); // decrypted, not yet taken by the connection
    let mut sent = 0;
    let mut buf = vec![0u8; 64 << 10];
    // Set when the connection has ended: only records owed to the client still move.
    let mut draining: Option<Instant> = None;
    loop {
        let mut moved = false;
        // Decrypted bytes to the connection.
        if draining.is_none() && sent == to_plain.len() {
            to_plain.clear();
            sent = 0;
            match tls.reader().read(&mut buf) {
                Ok(0) => return, // the client said close_notify
                Ok(n) => to_plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if draining.is_none() && sent < to_plain.len() {
            match plain.write(&to_plain[sent..]) {
                Ok(n) => {
                    sent += n;
                    moved |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => draining = Some(Instant::now()),
            }
        }
        // Records to the client.
        while tls.wants_write() {
            match tls.write_tls(&mut net) {
                Ok(n) => moved |= n > 0,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        if let Some(since) = draining {
            if !tls.wants_write() {
                tls.send_close_notify();
                let _ = tls.write_tls(&mut net);
                return;
            }
            if since.elapsed() >= DRAIN {
                return;
            }
        }
        // The connection's replies, while the client takes records.
        if draining.is_none() && !tls.wants_write() {
            match plain.read(&mut buf) {
                Ok(0) => draining = Some(Instant::now()),
                Ok(n) => {
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        return;
                    }
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => draining = Some(Instant::now()),
            }
        }
        // Records from the client, while the connection takes what was decrypted.
        if draining.is_none() && sent == to_plain.len() && tls.wants_read() {
            match tls.read_tls(&mut net) {
                Ok(0) => return,
                Ok(_) => {
                    if tls.process_new_packets().is_err() {
                        let _ = tls.write_tls(&mut net); // the alert, best effort
                        return;
                    }
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if moved || (draining.is_some() && !tls.wants_write()) {
            continue;
        }
        let mut net_events = PollFlags::empty();
        if draining.is_none() && sent == to_plain.len() && tls.wants_read() {
            net_events |= PollFlags::POLLIN;
        }
        if tls.wants_write() {
            net_events |= PollFlags::POLLOUT;
        }
        let mut plain_events = PollFlags::empty();
        if !tls.wants_write() {
            plain_events |= PollFlags::POLLIN;
        }
        if sent < to_plain.len() {
            plain_events |= PollFlags::POLLOUT;
        }
        let net_fd = PollFd::new(net.as_fd(), net_events);
        let plain_fd = PollFd::new(plain.as_fd(), plain_events);
        // Once draining, the ended connection is not polled at all (it would report its
        // hang-up at once, every time).
        let mut fds: Vec<PollFd<'_>> = if draining.is_some() { vec![net_fd] } else { vec![net_fd, plain_fd] };
        // The timeout only bounds a missed wake-up and the drain. ppoll: aarch64 has no poll,
        // and the sandbox allows only ppoll.
        match ppoll(&mut fds, Some(TimeSpec::new(1, 0)), None) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(_) => return,
        }
        let gone = |fd: Option<&PollFd<'_>>| {
            fd.and_then(|f| f.revents()).is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        };
        if gone(fds.first()) {
            return; // the client hung up or its socket failed
        }
        if draining.is_none() && gone(fds.get(1)) && !plain_events.contains(PollFlags::POLLIN) {
            // The connection ended while its replies wait for the client (POLLIN would have
            // let the read above see the end).
            draining = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_and_malformed_bundles_are_refused() {
        let bundle = encode_credentials(b"cert", b"key", b"");
        assert_eq!(decode_credentials(&bundle).unwrap(), [&b"cert"[..], &b"key"[..], &b""[..]]);
        assert!(decode_credentials(&bundle[..bundle.len() - 1]).is_err());
        let mut long = bundle.clone();
        long.push(0);
        assert!(decode_credentials(&long).is_err());
        assert!(decode_credentials(&[0, 0, 0, 9, 1]).is_err());
        assert!(matches!(
            TlsServer::new(&encode_credentials(b"", b"", b""), true, false),
            Err(TlsError::NoCertificate)
        ));
    }
}
