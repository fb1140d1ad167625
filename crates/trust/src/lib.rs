//! standby's own certificate authority, and the mutually authenticated TLS 1.3 that every
//! connection between a controller and an agent (or two agents) uses. The authority is
//! made at first use in the controller's data directory, its key readable by its owner
//! only. A host makes its own key and a signing request ([`request`]); the key never
//! leaves it. Both ends then pin the authority: a peer without a certificate, with one
//! from another authority, with an expired one, or with one the authority revoked (its
//! revocation list, [`Authority::revoke`], goes to every agent) is refused during the
//! handshake, before anything it sends is read.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot {what} {path}")]
    Io { what: &'static str, path: String, source: std::io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{what} is not a PEM {kind}")]
    Pem { what: String, kind: &'static str },
}

pub type Result<T> = std::result::Result<T, TrustError>;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
/// Revoked serials, one per line with the Unix time of the revocation.
const REVOKED: &str = "revoked";
/// The revocation list signed over [`REVOKED`], as agents get it.
const CRL: &str = "crl.pem";
const CA_NAME: &str = "standby certificate authority";

/// The certificate authority of one standby installation.
pub struct Authority {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrustError {
    let path = path.display().to_string();
    move |source| TrustError::Io { what, path, source }
}

/// Writes `content` to a new owner-only file (refusing to replace one).
fn write_new_private(path: &Path, content: &str) -> Result<()> {
    let mut f =
        fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io("create", path))?;
    f.write_all(content.as_bytes()).and_then(|()| f.sync_all()).map_err(io("write", path))
}

impl Authority {
    /// The authority kept in `dir`, made there at first use (its key owner-only).
    pub fn open_or_create(dir: &Path) -> Result<Authority> {
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if key_path.exists() {
            let key = KeyPair::from_pem(&fs::read_to_string(&key_path).map_err(io("read", &key_path))?)?;
            let cert_pem = fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
            return Ok(Authority { dir: dir.into(), cert_pem, key });
        }
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, CA_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = SystemTime::now().into();
        params.not_after = (SystemTime::now() + Duration::from_secs(20 * 365 * 86400)).into();
        let cert = params.self_signed(&key)?;
        // The key first: a certificate without its key is useless, a key without its
        // certificate is found and refused at the next start.
        write_new_private(&key_path, &key.serialize_pem())?;
        write_new_private(&cert_path, &cert.pem())?;
        Ok(Authority { dir: dir.into(), cert_pem: cert.pem(), key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs host `host`'s request ([`request`]): a certificate naming it, for both ends of
    /// a connection, valid for `valid` from now.
    pub fn sign(&self, host: &str, csr_pem: &str, valid: Duration) -> Result<String> {
        self.sign_between(host, csr_pem, SystemTime::now(), SystemTime::now() + valid)
    }

    fn sign_between(&self, host: &str, csr_pem: &str, from: SystemTime, until: SystemTime) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        // The authority decides what a host certificate says, not the request.
        let p = &mut csr.params;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, host);
        p.subject_alt_names = vec![SanType::DnsName(host.try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = from.into();
        p.not_after = until.into();
        // Random, not derived from the key: a host enrolled again with the same key after
        // a revocation gets a certificate the revocation does not name.
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| rustls::Error::General("the system random generator failed".into()))?;
        serial[0] = (serial[0] & 0x7f) | 0x40;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(csr.signed_by(&issuer)?.pem())
    }

    /// Revokes the certificate with serial `serial` (hex, [`serial`]) and returns the new
    /// revocation list (PEM), which names every certificate revoked so far.
    pub fn revoke(&self, serial: &str) -> Result<String> {
        let path = self.dir.join(REVOKED);
        let mut list = match fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(TrustError::Io { what: "read", path: path.display().to_string(), source }),
        };
        if !list.lines().any(|l| l.split_whitespace().next() == Some(serial)) {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            list.push_str(&format!("{serial} {now}\n"));
        }
        let mut revoked = Vec::new();
        for line in list.lines() {
            let mut words = line.split_whitespace();
            let (Some(s), Some(t)) = (words.next(), words.next().and_then(|t| t.parse::<u64>().ok())) else {
                return Err(TrustError::Pem {
                    what: format!("line {line:?} of {}", path.display()),
                    kind: "revocation",
                });
            };
            let bytes = unhex(s).ok_or_else(|| TrustError::Pem { what: format!("serial {s:?}"), kind: "serial" })?;
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: (UNIX_EPOCH + Duration::from_secs(t)).into(),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let crl = CertificateRevocationListParams {
            this_update: SystemTime::now().into(),
            next_update: (SystemTime::now() + Duration::from_secs(20 * 365 * 86400)).into(),
            // Grows with every revocation: the newest list has the highest number.
            crl_number: SerialNumber::from(revoked.len() as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let pem = crl.signed_by(&Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)?.pem()?;
        // The list of serials first: a list that names more than the signed one is made
        // again at the next revocation; one that names less would forget a revocation.
        replace_private(&path, &list)?;
        replace_private(&self.dir.join(CRL), &pem)?;
        Ok(pem)
    }

    /// The revocation list, if anything was ever revoked.
    pub fn crl_pem(&self) -> Result<Option<String>> {
        let path = self.dir.join(CRL);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TrustError::Io { what: "read", path: path.display().to_string(), source }),
        }
    }
}

/// The serial number of a certificate (PEM), in hex: what a revocation names.
pub fn serial(cert_pem: &str) -> Result<String> {
    let der = certs(cert_pem, "the certificate")?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|_| TrustError::Pem { what: "the certificate".into(), kind: "X.509 certificate" })?;
    Ok(hex(cert.raw_serial()))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Replaces `path` with an owner-only file holding `content`, atomically.
pub fn replace_private(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    write_new_private(&tmp, content)?;
    fs::rename(&tmp, path).map_err(io("replace", path))
}

/// A host's own key (PEM) and its signing request for `host` (PEM), made on the host.
pub fn request(host: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?.serialize_pem();
    let csr = request_with_key(host, &key)?;
    Ok((key, csr))
}

/// A signing request for `host` with a key the host already has (PEM).
pub fn request_with_key(host: &str, key_pem: &str) -> Result<String> {
    let key = KeyPair::from_pem(key_pem)?;
    Ok(CertificateParams::new(vec![host.to_owned()])?.serialize_request(&key)?.pem()?)
}

/// A new private key (PEM).
pub fn new_key() -> Result<String> {
    Ok(KeyPair::generate()?.serialize_pem())
}

/// Writes `content` to a new owner-only file, refusing to replace one.
pub fn write_private(path: &Path, content: &str) -> Result<()> {
    write_new_private(path, content)
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| TrustError::Pem { what: what.into(), kind: "certificate" })?;
    match certs.is_empty() {
        true => Err(TrustError::Pem { what: what.into(), kind: "certificate" }),
        false => Ok(certs),
    }
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TrustError::Pem { what: "the key".into(), kind: "key" })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "the authority")? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn crls(crl_pem: Option<&str>) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let Some(pem) = crl_pem else {
        return Ok(Vec::new());
    };
    let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| TrustError::Pem { what: "the revocation list".into(), kind: "CRL" })?;
    match crls.is_empty() {
        true => Err(TrustError::Pem { what: "the revocation list".into(), kind: "CRL" }),
        false => Ok(crls),
    }
}

/// What an agent serves with: its certificate and key, and only clients the authority
/// signed and did not revoke (`crl_pem`, when it revoked any), over TLS 1.3.
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str, crl_pem: Option<&str>) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .with_crls(crls(crl_pem)?)
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "the host certificate")?, key(key_pem)?)?;
    Ok(Arc::new(config))
}

/// What a controller (or an agent reaching another) connects with: its certificate and
/// key, and only servers the authority signed and did not revoke, over TLS 1.3.
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str, crl_pem: Option<&str>) -> Result<Arc<ClientConfig>> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .with_crls(crls(crl_pem)?)
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs(cert_pem, "the host certificate")?, key(key_pem)?)?;
    Ok(Arc::new(config))
}

/// The SHA-256 of a certificate's DER bytes, in hex: what an enrolment token pins.
pub fn fingerprint(cert_pem: &str) -> Result<String> {
    Ok(fingerprint_der(&certs(cert_pem, "the certificate")?.remove(0)))
}

/// [`fingerprint`] of a certificate as a TLS peer presented it.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random secret in hex (an enrolment token's), from the system's generator.
pub fn secret() -> Result<String> {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| rustls::Error::General("the system random generator failed".into()))?;
    Ok(hex(&bytes))
}

/// A host's certificate before it is enrolled: signed by its own key, for the one
/// connection that enrols it. Its fingerprint travels in the enrolment token, so the
/// controller knows it talks to that host and no other.
pub fn bootstrap_cert(host: &str, key_pem: &str) -> Result<String> {
    let key = KeyPair::from_pem(key_pem)?;
    let params = CertificateParams::new(vec![host.to_owned()])?;
    Ok(params.self_signed(&key)?.pem())
}

/// An agent's configuration before enrolment: its bootstrap certificate, no client
/// certificate asked for (the token, sent inside the connection, authenticates the
/// controller).
pub fn bootstrap_server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "the bootstrap certificate")?, key(key_pem)?)?;
    Ok(Arc::new(config))
}

/// The controller's configuration for enrolling a host: the server must present exactly
/// the certificate whose fingerprint the token holds.
pub fn pinned_client_config(fingerprint: &str) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let verifier = Arc::new(Pinned { fingerprint: fingerprint.to_lowercase(), provider: provider.clone() });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts one certificate, named by its fingerprint; signatures are still checked.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let got = hex(ring::digest::digest(&ring::digest::SHA256, end_entity).as_ref());
        match got == self.fingerprint {
            true => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            false => Err(rustls::Error::General(format!(
                "the host presented certificate {got}, not the one its enrolment token names"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken here".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
