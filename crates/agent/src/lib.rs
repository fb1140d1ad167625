//! `standby agent`: a hypervisor host's end of standby, and the controller's client for it.
//!
//! An agent listens on one TCP address. Until it is enrolled it serves a certificate
//! signed by its own key and accepts one request, `Enrol`, carrying the secret of the
//! one-time token it wrote to `DIR/enrolment-token` (owner-only) and printed. The token
//! also holds that certificate's fingerprint, so the controller sends its secret to this
//! agent only. Enrolment signs the agent's key with the controller's authority; from then
//! on every connection is mutual TLS 1.3 pinned to that authority, and the token is gone.
//!
//! Requests and answers are JSON lines inside TLS (`proto.rs`, `wire.rs`). An enrolled
//! agent carries out the host verbs for the controller (`serve.rs`); the controller's
//! side is [`RemoteHost`] (`remote.rs`).

mod proto;
mod remote;
mod serve;
mod wire;

use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConnection, StreamOwned};
use standby_trust::{Authority, TrustError};

pub use proto::Codec;
use proto::{Answer, Request};
pub use remote::{RemoteHost, RemoteStream};
use serve::{Peer, ServedHost, Service};
use wire::Line;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long one request may take to arrive, or an answer, before the peer is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a hello (is the agent there, and who is it) waits for its answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a controller waits to reach an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot {what} {path}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    /// The management layer this agent was told to drive VMs through does not answer.
    #[error("cannot drive this host's VMs: {0}")]
    Driver(String),
    #[error("host {host} ({address}) is unreachable")]
    Unreachable { host: String, address: String, source: std::io::Error },
    #[error("host {host} ({address}) refused the connection or its certificate: {detail}")]
    Refused { host: String, address: String, detail: String },
    #[error("host {host} refused: {why}")]
    Said { host: String, why: String },
    /// The connection ended after the agent had begun to answer: it was not refused, the
    /// agent stopped (or the link went) in the middle of the work.
    #[error(
        "host {host} ({address}) stopped answering in the middle of the request (its agent ended, or the link \
         dropped): {detail}; check that the agent runs (`standby host list`) and run again"
    )]
    Lost { host: String, address: String, detail: String },
    /// Something accepted the connection and then said nothing in time.
    #[error(
        "host {host} ({address}) accepted the connection but gave no answer in time ({detail}); check that a \
         standby agent listens there and is not stuck"
    )]
    Silent { host: String, address: String, detail: String },
    #[error("host {host} broke the protocol: {detail}")]
    Protocol { host: String, detail: String },
    #[error("the enrolment token {0:?} is not one an agent printed; copy the whole `enrolment token:` line's value")]
    BadToken(String),
    #[error(transparent)]
    Trust(#[from] TrustError),
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// An agent's files in its directory.
#[derive(Debug, Clone)]
struct Files {
    dir: PathBuf,
    /// The libvirt daemon this host's VMs are driven through; None for standby's own driver.
    libvirt: Option<String>,
}

impl Files {
    /// This machine's host, as the agent was started to drive it.
    fn host(&self, name: &str) -> std::result::Result<ServedHost, standby_host::HostError> {
        let root = self.path("host");
        Ok(match &self.libvirt {
            Some(uri) => {
                let host = standby_host::LibvirtHost::new(name, uri, &root)?;
                ServedHost { roots: host.socket_dirs(), driver: Box::new(host) }
            }
            None => ServedHost { driver: Box::new(standby_host::LocalHost::new(name, &root)?), roots: vec![root] },
        })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
    fn read(&self, f: &str) -> Result<Option<String>> {
        let p = self.path(f);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AgentError::Io { what: "read", path: p.display().to_string(), source }),
        }
    }
    fn need(&self, f: &str) -> Result<String> {
        let p = self.path(f);
        std::fs::read_to_string(&p).map_err(|source| AgentError::Io {
            what: "read",
            path: p.display().to_string(),
            source,
        })
    }
}

const KEY: &str = "agent.key";
const BOOTSTRAP: &str = "bootstrap.pem";
const TOKEN: &str = "enrolment-token";
const CA: &str = "ca.pem";
const CERT: &str = "agent.pem";
const NAME: &str = "name";
const CONTROLLER: &str = "controller.pem";
const CRL: &str = "crl.pem";

/// Runs the agent on `listen` with its files in `dir`, forever, driving this host's VMs
/// through the libvirt daemon at `libvirt` when given (standby's own QEMU driver
/// otherwise). It says what it listens on, and before enrolment the token, on `out`.
pub fn run(listen: &str, dir: &Path, libvirt: Option<&str>, out: &mut dyn Write) -> Result<()> {
    let io = |what, path: &Path| {
        let path = path.display().to_string();
        move |source| AgentError::Io { what, path, source }
    };
    if let Some(uri) = libvirt {
        // Said now, before anything is made, not at the controller's first call.
        let version = standby_host::LibvirtHost::probe(uri).map_err(|e| AgentError::Driver(e.to_string()))?;
        let _ = writeln!(out, "driving VMs through libvirt at {uri} ({version})");
    }
    // Owner-only, like the controller's: it holds the agent's key.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(io("create", dir))?;
    let files = Files { dir: dir.into(), libvirt: libvirt.map(str::to_owned) };
    if files.read(KEY)?.is_none() {
        standby_trust::write_private(&files.path(KEY), &standby_trust::new_key()?)?;
    }
    let key = files.need(KEY)?;
    if files.read(CERT)?.is_none() && files.read(TOKEN)?.is_none() {
        let cert = standby_trust::bootstrap_cert("standby-agent", &key)?;
        let _ = std::fs::remove_file(files.path(BOOTSTRAP));
        standby_trust::write_private(&files.path(BOOTSTRAP), &cert)?;
        let token = format!("{}.{}", standby_trust::secret()?, standby_trust::fingerprint(&cert)?);
        standby_trust::write_private(&files.path(TOKEN), &token)?;
    }
    let listener = TcpListener::bind(listen).map_err(io("listen on", Path::new(listen)))?;
    let addr = listener.local_addr().map_err(io("listen on", Path::new(listen)))?;
    let _ = writeln!(out, "listening on {addr}");
    if let Some(token) = files.read(TOKEN)? {
        let _ = writeln!(out, "enrolment token: {}", token.trim());
    }
    let _ = out.flush();
    // Each connection on its own thread, so that a peer that stalls (it may be anyone
    // until its certificate is checked) holds up nobody else; at most MAX_CONNECTIONS at
    // once. Enrolment is one at a time: it changes what every later connection is served.
    let enrolling = Arc::new(std::sync::Mutex::new(()));
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        // As on the connecting side: messages are written whole, none waits on Nagle.
        let _ = tcp.set_nodelay(true);
        if open.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            continue;
        }
        let (files, key, enrolling, open) = (files.clone(), key.clone(), enrolling.clone(), open.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve_one(&files, &key, tcp, &enrolling) {
                eprintln!("standby agent: connection refused: {e}");
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    Ok(())
}

/// Connections served at once; one more is closed as soon as it is accepted.
const MAX_CONNECTIONS: usize = 64;

fn serve_one(files: &Files, key: &str, tcp: TcpStream, enrolling: &std::sync::Mutex<()>) -> Result<()> {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let proto = |detail: String| AgentError::Protocol { host: peer.clone(), detail };
    tcp.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| proto(e.to_string()))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| proto(e.to_string()))?;
    let enrolled = files.read(CERT)?;
    // Read at each connection: a list the controller sent applies to the next one.
    let crl = files.read(CRL)?;
    let config = match &enrolled {
        Some(cert) => standby_trust::server_config(&files.need(CA)?, cert, key, crl.as_deref())?,
        None => standby_trust::bootstrap_server_config(&files.need(BOOTSTRAP)?, key)?,
    };
    let conn = ServerConnection::new(config).map_err(|e| proto(e.to_string()))?;
    let mut tls = Line::new(StreamOwned::new(conn, tcp));
    let request: Request = tls.read().map_err(|e| proto(e.to_string()))?;
    let Some(cert) = enrolled else {
        return enrol_here(files, key, request, &mut tls, enrolling).map_err(|e| proto(e.to_string()));
    };
    // The handshake is done: the peer's certificate was signed by the authority. The
    // controller is the one enrolment named; anyone else is another host's agent.
    let controller = files.need(CONTROLLER)?;
    let controller = standby_trust::fingerprint(&controller)?;
    let presented =
        tls.get_ref().conn.peer_certificates().and_then(|c| c.first()).map(|c| standby_trust::fingerprint_der(c));
    let peer_kind = if presented.as_deref() == Some(controller.as_str()) { Peer::Controller } else { Peer::Agent };
    let name = files.read(NAME)?.unwrap_or_default().trim().to_owned();
    let host = files.host(&name).map_err(|e| proto(format!("cannot open this host's run directory: {e}")))?;
    let answer = match request {
        Request::Hello => Answer::Hello {
            name,
            version: VERSION.into(),
            accel: host.driver.accel(),
            crl: crl.as_deref().map(crl_fingerprint),
            libvirt: files.libvirt.clone(),
        },
        Request::Revocations { crl_pem } if peer_kind == Peer::Controller => {
            // Checked before it replaces anything: a list that does not parse would refuse
            // every peer, the controller included.
            standby_trust::server_config(&files.need(CA)?, &cert, key, Some(&crl_pem))?;
            standby_trust::replace_private(&files.path(CRL), &crl_pem)?;
            Answer::Revoked {}
        }
        Request::Revocations { .. } => Answer::Refused { why: "only the controller revokes certificates".into() },
        Request::Enrol { .. } => Answer::Refused { why: "this agent is enrolled already; its token was used".into() },
        request => {
            // A session (a run's hold on disks, a stream a transfer keeps open while others
            // work) may rest between requests for as long as the run lasts. Host calls keep
            // the short timeout: the controller reuses those connections for seconds only.
            if !matches!(request, Request::Host { .. }) {
                let _ = tls.get_ref().sock.set_read_timeout(Some(SESSION_IDLE));
            }
            let tls_config = standby_trust::client_config(&files.need(CA)?, &cert, key, crl.as_deref())?;
            let service = Service { host, tls: tls_config };
            return service.serve(peer_kind, request, &mut tls).map_err(|e| proto(e.to_string()));
        }
    };
    tls.write(&answer).map_err(|e| proto(e.to_string()))
}

/// How long a session connection may be idle between requests.
const SESSION_IDLE: Duration = Duration::from_secs(6 * 3600);

/// The one conversation of an agent not yet enrolled: the token's secret, then its key
/// signed by the controller's authority.
fn enrol_here<S: std::io::Read + Write>(
    files: &Files,
    key: &str,
    request: Request,
    tls: &mut Line<S>,
    enrolling: &std::sync::Mutex<()>,
) -> Result<()> {
    let proto = |e: std::io::Error| AgentError::Protocol { host: "controller".into(), detail: e.to_string() };
    let Request::Enrol { secret, name, ca_pem, controller_pem } = request else {
        return tls
            .write(&Answer::Refused { why: "this agent is not enrolled yet; enrol it with `standby host add`".into() })
            .map_err(proto);
    };
    let _one = enrolling.lock().unwrap_or_else(|e| e.into_inner());
    // Another connection may have enrolled this agent meanwhile: then the token is gone
    // and this one is refused.
    let token = files.read(TOKEN)?.unwrap_or_default();
    let expected = token.trim().split('.').next().unwrap_or_default().to_owned();
    if expected.is_empty() || !same(&secret, &expected) {
        return tls.write(&Answer::Refused { why: "wrong enrolment token; nothing changed".into() }).map_err(proto);
    }
    tls.write(&Answer::Csr { csr_pem: standby_trust::request_with_key(&name, key)? }).map_err(proto)?;
    let Request::Certificate { cert_pem } = tls.read().map_err(proto)? else {
        return Err(AgentError::Protocol {
            host: "controller".into(),
            detail: "expected the signed certificate".into(),
        });
    };
    // The authority, the controller and the name first, the certificate last: an agent is
    // enrolled once its certificate exists, and then the token goes.
    for (file, content) in [(CA, &ca_pem), (CONTROLLER, &controller_pem), (NAME, &name)] {
        let _ = std::fs::remove_file(files.path(file));
        standby_trust::write_private(&files.path(file), content)?;
    }
    standby_trust::write_private(&files.path(CERT), &cert_pem)?;
    let _ = std::fs::remove_file(files.path(TOKEN));
    tls.write(&Answer::Enrolled { version: VERSION.into() }).map_err(proto)
}

/// An error and its causes, as one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Compares two secrets in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn connect(
    host: &str,
    address: &str,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<Line<StreamOwned<ClientConnection, TcpStream>>> {
    let unreachable = |source| AgentError::Unreachable { host: host.into(), address: address.into(), source };
    let addr = address
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| unreachable(std::io::Error::other("the address names no socket")))?;
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(unreachable)?;
    // Each message is written whole (`wire::Line`): Nagle would only hold its last
    // segment back until the peer's delayed acknowledgement.
    tcp.set_nodelay(true).map_err(unreachable)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    tcp.set_write_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| AgentError::Protocol { host: host.into(), detail: e.to_string() })?;
    let conn = ClientConnection::new(config, name)
        .map_err(|e| AgentError::Protocol { host: host.into(), detail: e.to_string() })?;
    Ok(Line::new(StreamOwned::new(conn, tcp)))
}

/// Turns what failed on the wire into what the operator needs: a refused handshake says
/// so (TLS errors arrive as I/O errors wrapping them).
pub(crate) fn wire_error<'a>(host: &'a str, address: &'a str) -> impl Fn(std::io::Error) -> AgentError + 'a {
    move |e| {
        use std::io::ErrorKind::{ConnectionReset, TimedOut, UnexpectedEof, WouldBlock};
        let tls = e.get_ref().is_some_and(|i| i.is::<rustls::Error>());
        match e.kind() {
            // A read timeout: WouldBlock is how a socket's timeout ends a read on Linux.
            WouldBlock | TimedOut => {
                AgentError::Silent { host: host.into(), address: address.into(), detail: e.to_string() }
            }
            UnexpectedEof | ConnectionReset => {
                AgentError::Refused { host: host.into(), address: address.into(), detail: e.to_string() }
            }
            _ if tls => AgentError::Refused { host: host.into(), address: address.into(), detail: e.to_string() },
            _ => AgentError::Protocol { host: host.into(), detail: e.to_string() },
        }
    }
}

/// Like `wire_error`, for a connection whose agent has answered already: its end is a loss,
/// not a refusal.
pub(crate) fn lost_error<'a>(host: &'a str, address: &'a str) -> impl Fn(std::io::Error) -> AgentError + 'a {
    move |e| AgentError::Lost { host: host.into(), address: address.into(), detail: e.to_string() }
}

/// Enrols the agent at `address` as host `name`, with the token it printed: signs its key
/// with `authority`.
pub fn enrol(name: &str, address: &str, token: &str, authority: &Authority, controller_pem: &str) -> Result<Enrolled> {
    let (secret, pin) = token.trim().split_once('.').ok_or_else(|| AgentError::BadToken(token.into()))?;
    if secret.is_empty() || pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AgentError::BadToken(token.into()));
    }
    let wire = wire_error(name, address);
    let mut line = connect(name, address, standby_trust::pinned_client_config(pin)?, "standby-agent")?;
    let request = Request::Enrol {
        secret: secret.into(),
        name: name.into(),
        ca_pem: authority.cert_pem().into(),
        controller_pem: controller_pem.into(),
    };
    line.write(&request).map_err(&wire)?;
    let csr_pem = match line.read().map_err(&wire)? {
        Answer::Csr { csr_pem } => csr_pem,
        Answer::Refused { why } => return Err(AgentError::Said { host: name.into(), why }),
        other => return Err(AgentError::Protocol { host: name.into(), detail: format!("answered {other:?}") }),
    };
    let cert_pem = authority.sign(name, &csr_pem, Duration::from_secs(5 * 365 * 86400))?;
    let serial = standby_trust::serial(&cert_pem)?;
    line.write(&Request::Certificate { cert_pem }).map_err(&wire)?;
    match line.read().map_err(&wire)? {
        Answer::Enrolled { version } => Ok(Enrolled { version, serial }),
        Answer::Refused { why } => Err(AgentError::Said { host: name.into(), why }),
        other => Err(AgentError::Protocol { host: name.into(), detail: format!("answered {other:?}") }),
    }
}

/// An agent just enrolled: its version, and its certificate's serial (what revokes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub version: String,
    pub serial: String,
}

/// What an enrolled agent says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub name: String,
    pub version: String,
    /// The fingerprint of the revocation list it holds ([`crl_fingerprint`]).
    pub crl: Option<String>,
    /// The libvirt daemon it drives its VMs through; None for standby's own driver.
    pub libvirt: Option<String>,
}

/// Names a revocation list: whether an agent holds the controller's newest.
pub fn crl_fingerprint(crl_pem: &str) -> String {
    standby_host::transfer::block_digest(crl_pem.trim().as_bytes())
}

/// Sends the authority's revocation list to enrolled host `name` at `address`.
pub fn send_revocations(name: &str, address: &str, config: Arc<ClientConfig>, crl_pem: &str) -> Result<()> {
    let wire = wire_error(name, address);
    let mut line = connect(name, address, config, name)?;
    line.write(&Request::Revocations { crl_pem: crl_pem.into() }).map_err(&wire)?;
    match line.read().map_err(&wire)? {
        Answer::Revoked {} => Ok(()),
        Answer::Refused { why } => Err(AgentError::Said { host: name.into(), why }),
        other => Err(AgentError::Protocol { host: name.into(), detail: format!("answered {other:?}") }),
    }
}

/// Whether anything accepts a TCP connection at `address` within `timeout`: Err (why
/// not) when nothing does. Only a first look: it proves no agent, just a host that is up.
pub fn knocks(address: &str, timeout: Duration) -> std::io::Result<()> {
    let addr = address.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("the address names no socket"))?;
    TcpStream::connect_timeout(&addr, timeout).map(drop)
}

/// Asks enrolled host `name` at `address` who it is, over mutual TLS with `config`.
pub fn hello(name: &str, address: &str, config: Arc<ClientConfig>) -> Result<Hello> {
    let wire = wire_error(name, address);
    let mut line = connect(name, address, config, name)?;
    // `host list` and every daemon check ask each agent in turn: one that accepts and
    // hangs may cost them a few seconds, not the 30 s a long request may take.
    let _ = line.get_ref().sock.set_read_timeout(Some(HELLO_TIMEOUT));
    line.write(&Request::Hello).map_err(&wire)?;
    match line.read().map_err(&wire)? {
        Answer::Hello { name, version, crl, libvirt, .. } => Ok(Hello { name, version, crl, libvirt }),
        Answer::Refused { why } => Err(AgentError::Said { host: name.into(), why }),
        other => Err(AgentError::Protocol { host: name.into(), detail: format!("answered {other:?}") }),
    }
}
