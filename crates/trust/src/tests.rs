use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::*;

/// A host enrolled with `ca`: its key and certificate (PEM).
fn enrolled(ca: &Authority, host: &str) -> (String, String) {
    let (key, csr) = request(host).unwrap();
    (ca.sign(host, &csr, Duration::from_secs(3600)).unwrap(), key)
}

/// Serves one connection on loopback with `server`, answering `pong` to `ping`; returns
/// the port and a handle saying what the server read (None: the handshake was refused).
fn serve(server: Arc<ServerConfig>) -> (u16, std::thread::JoinHandle<Option<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = StreamOwned::new(ServerConnection::new(server).unwrap(), tcp);
        let mut line = String::new();
        BufReader::new(&mut tls).read_line(&mut line).ok()?;
        tls.write_all(b"pong\n").ok()?;
        tls.conn.send_close_notify();
        tls.flush().ok()?;
        Some(line)
    });
    (port, handle)
}

/// Connects as `client` to `host` on `port` and says `ping`; the answer, or the error.
fn ping(client: Arc<ClientConfig>, port: u16, host: &str) -> std::result::Result<String, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = ServerName::try_from(host.to_owned()).unwrap();
    let mut tls = StreamOwned::new(ClientConnection::new(client, name).unwrap(), tcp);
    tls.write_all(b"ping\n").and_then(|()| tls.flush()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tls.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    Ok(answer)
}

#[test]
fn enrolled_hosts_talk_and_the_authority_key_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::open_or_create(dir.path()).unwrap();
    let mode = fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the authority's key is its owner's only");
    let again = Authority::open_or_create(dir.path()).unwrap();
    assert_eq!(again.cert_pem(), ca.cert_pem(), "one authority per data directory");

    let (agent_cert, agent_key) = enrolled(&ca, "dr1");
    let (ctl_cert, ctl_key) = enrolled(&ca, "controller");
    let (port, server) = serve(server_config(ca.cert_pem(), &agent_cert, &agent_key, None).unwrap());
    let answer = ping(client_config(ca.cert_pem(), &ctl_cert, &ctl_key, None).unwrap(), port, "dr1");
    assert_eq!(answer.as_deref(), Ok("pong\n"));
    assert_eq!(server.join().unwrap().as_deref(), Some("ping\n"));
}

#[test]
fn strangers_are_refused_before_anything_they_send_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::open_or_create(&dir.path().join("ours")).unwrap();
    let foreign = Authority::open_or_create(&dir.path().join("theirs")).unwrap();
    let (agent_cert, agent_key) = enrolled(&ca, "dr1");
    let server = server_config(ca.cert_pem(), &agent_cert, &agent_key, None).unwrap();

    // A client certificate from another authority.
    let (their_cert, their_key) = enrolled(&foreign, "controller");
    let (port, handle) = serve(server.clone());
    assert!(ping(client_config(ca.cert_pem(), &their_cert, &their_key, None).unwrap(), port, "dr1").is_err());
    assert_eq!(handle.join().unwrap(), None, "a foreign certificate is refused in the handshake");

    // No client certificate at all.
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca.cert_pem()).unwrap())
        .with_no_client_auth();
    let (port, handle) = serve(server.clone());
    assert!(ping(Arc::new(anonymous), port, "dr1").is_err());
    assert_eq!(handle.join().unwrap(), None, "no certificate, no request read");

    // An expired certificate of our own authority.
    let (key, csr) = request("controller").unwrap();
    let day = Duration::from_secs(86400);
    let expired = ca.sign_between("controller", &csr, SystemTime::now() - 3 * day, SystemTime::now() - day).unwrap();
    let (port, handle) = serve(server);
    assert!(ping(client_config(ca.cert_pem(), &expired, &key, None).unwrap(), port, "dr1").is_err());
    assert_eq!(handle.join().unwrap(), None, "an expired certificate is refused");

    // The client refuses a server the authority did not sign, or one named otherwise.
    let (ctl_cert, ctl_key) = enrolled(&ca, "controller");
    let (impostor_cert, impostor_key) = enrolled(&foreign, "dr1");
    let (port, handle) = serve(server_config(foreign.cert_pem(), &impostor_cert, &impostor_key, None).unwrap());
    assert!(ping(client_config(ca.cert_pem(), &ctl_cert, &ctl_key, None).unwrap(), port, "dr1").is_err());
    assert_eq!(handle.join().unwrap(), None);
    let (port, handle) = serve(server_config(ca.cert_pem(), &agent_cert, &agent_key, None).unwrap());
    assert!(ping(client_config(ca.cert_pem(), &ctl_cert, &ctl_key, None).unwrap(), port, "prod1").is_err());
    assert_eq!(handle.join().unwrap(), None, "a certificate for dr1 does not serve prod1");
}

#[test]
fn garbage_is_an_error_that_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::open_or_create(dir.path()).unwrap();
    assert!(ca.sign("dr1", "not a request", Duration::from_secs(60)).is_err());
    let e = server_config("nothing", "nothing", "nothing", None).unwrap_err().to_string();
    assert!(e.contains("the authority") && e.contains("certificate"), "{e}");
}

#[test]
fn a_pinned_enrolment_reaches_only_the_host_the_token_names() {
    let (key, _) = request("dr1").unwrap();
    let cert = bootstrap_cert("dr1", &key).unwrap();
    let pin = fingerprint(&cert).unwrap();
    assert_eq!(pin.len(), 64);
    let (port, handle) = serve(bootstrap_server_config(&cert, &key).unwrap());
    assert_eq!(ping(pinned_client_config(&pin).unwrap(), port, "dr1").as_deref(), Ok("pong\n"));
    assert_eq!(handle.join().unwrap().as_deref(), Some("ping\n"));
    // Another host answering at that address is not the one the token names.
    let (other_key, _) = request("dr1").unwrap();
    let other = bootstrap_cert("dr1", &other_key).unwrap();
    let (port, handle) = serve(bootstrap_server_config(&other, &other_key).unwrap());
    let e = ping(pinned_client_config(&pin).unwrap(), port, "dr1").unwrap_err();
    assert!(e.contains("enrolment token"), "{e}");
    assert_eq!(handle.join().unwrap(), None);
    assert_ne!(secret().unwrap(), secret().unwrap());
}

#[test]
fn a_revoked_certificate_is_refused_both_ways_and_the_others_still_talk() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::open_or_create(dir.path()).unwrap();
    assert_eq!(ca.crl_pem().unwrap(), None, "nothing revoked yet");
    let (agent_cert, agent_key) = enrolled(&ca, "dr1");
    let (ctl_cert, ctl_key) = enrolled(&ca, "controller");
    let (gone_cert, gone_key) = enrolled(&ca, "prod2");
    let gone = serial(&gone_cert).unwrap();
    assert_eq!(gone.len(), 32, "{gone}");
    assert_ne!(gone, serial(&agent_cert).unwrap(), "each certificate has its own serial");
    let first = ca.revoke(&gone).unwrap();
    let crl = ca.revoke(&gone).unwrap();
    assert_eq!(fs::read_to_string(dir.path().join(REVOKED)).unwrap().lines().count(), 1, "revoked once");
    assert_ne!(first, crl, "the same list, signed again");
    assert_eq!(ca.crl_pem().unwrap().as_deref(), Some(crl.as_str()));
    let mode = fs::metadata(dir.path().join(CRL)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // The revoked host as a client: refused before its request is read.
    let (port, handle) = serve(server_config(ca.cert_pem(), &agent_cert, &agent_key, Some(&crl)).unwrap());
    assert!(ping(client_config(ca.cert_pem(), &gone_cert, &gone_key, None).unwrap(), port, "dr1").is_err());
    assert_eq!(handle.join().unwrap(), None, "a revoked client is refused in the handshake");
    // The revoked host as a server: its clients refuse it.
    let (port, handle) = serve(server_config(ca.cert_pem(), &gone_cert, &gone_key, None).unwrap());
    assert!(ping(client_config(ca.cert_pem(), &ctl_cert, &ctl_key, Some(&crl)).unwrap(), port, "prod2").is_err());
    assert_eq!(handle.join().unwrap(), None, "a revoked server is refused in the handshake");
    // Everyone else goes on as before, under the same list.
    let (port, handle) = serve(server_config(ca.cert_pem(), &agent_cert, &agent_key, Some(&crl)).unwrap());
    let answer = ping(client_config(ca.cert_pem(), &ctl_cert, &ctl_key, Some(&crl)).unwrap(), port, "dr1");
    assert_eq!(answer.as_deref(), Ok("pong\n"));
    assert_eq!(handle.join().unwrap().as_deref(), Some("ping\n"));
    assert!(server_config(ca.cert_pem(), &agent_cert, &agent_key, Some("not a list")).is_err());
}
