//! HTTPS for the routing proxy without any set-up: a local certificate authority made on
//! first use and kept in the data directory, and a leaf certificate minted for each
//! hostname a client asks for (SNI), cached, signed by that CA. Trusting the CA once makes
//! every `https://<service>.<env>.localhost` valid.
//!
//! Minting happens off the async threads, before the handshake is resumed: rustls asks
//! the resolver synchronously, so the resolver only ever reads the cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The CA's certificate, which users add to their trust store.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Hostnames whose certificates are kept; past it the cache starts again (a client
/// inventing names cannot grow it without bound).
const MAX_CACHED_CERTS: usize = 1024;
/// The name used when a client sends no SNI (an IP address, say).
const DEFAULT_NAME: &str = "localhost";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("local CA at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("local CA at {path} is unreadable ({reason}); delete it to make a new one")]
    Unreadable { path: PathBuf, reason: String },
    #[error("cannot mint a certificate for `{host}`: {reason}")]
    Mint { host: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The local certificate authority: loaded from `dir`, or made there on first use.
pub struct LocalCa {
    cert_path: PathBuf,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("cert_path", &self.cert_path).finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads the CA kept in `dir`, making it (key, then certificate) if it is not there.
    /// Blocking file and key work: call it from a blocking context.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        if !cert_path.exists() || !key_path.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let key = KeyPair::generate().map_err(|e| unreadable(&key_path, e))?;
            let cert = ca_params().self_signed(&key).map_err(|e| unreadable(&cert_path, e))?;
            write_private(&key_path, &key.serialize_pem()).map_err(io(&key_path))?;
            std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| unreadable(&key_path, e))?;
        let cert_der: CertificateDer<'static> = pem_to_der(&cert_pem)
            .ok_or_else(|| unreadable(&cert_path, "no certificate in the file"))?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| unreadable(&cert_path, e))?;
        Ok(Self { cert_path, cert_der, issuer })
    }

    /// Where the CA certificate is, to be trusted.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A leaf certificate for `host` (with its CA after it), valid for a year.
    fn mint(&self, host: &str, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let failed = |reason: String| TlsError::Mint { host: host.to_owned(), reason };
        let mut params =
            CertificateParams::new(vec![host.to_owned()]).map_err(|e| failed(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let key = KeyPair::generate().map_err(|e| failed(e.to_string()))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| failed(e.to_string()))?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            provider.key_provider.load_private_key(private).map_err(|e| failed(e.to_string()))?;
        Ok(CertifiedKey::new(vec![cert.der().clone(), self.cert_der.clone()], signing))
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "drover local CA");
    params.distinguished_name.push(DnType::OrganizationName, "drover");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

fn unreadable(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Unreadable { path: path.to_path_buf(), reason: reason.to_string() }
}

fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// Leaf certificates by hostname, minted on demand.
pub(crate) struct CertStore {
    ca: LocalCa,
    provider: Arc<CryptoProvider>,
    certs: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("ca", &self.ca).finish_non_exhaustive()
    }
}

impl CertStore {
    pub(crate) fn new(ca: LocalCa) -> Self {
        Self {
            ca,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            certs: Mutex::new(HashMap::new()),
        }
    }

    /// The rustls configuration: HTTP/2 and HTTP/1.1 by ALPN, certificates from here.
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn cached(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.lock().get(host).cloned()
    }

    /// Makes sure a certificate for `host` (lowercase) is cached. Blocking: key generation
    /// and signing.
    pub(crate) fn ensure(&self, host: &str) -> Result<(), TlsError> {
        if self.cached(host).is_some() {
            return Ok(());
        }
        let minted = Arc::new(self.ca.mint(host, &self.provider)?);
        let mut certs = self.lock();
        if certs.len() >= MAX_CACHED_CERTS {
            certs.clear();
        }
        certs.insert(host.to_owned(), minted);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        // Entries are inserted whole, so a poisoned map is still consistent.
        self.certs.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

/// The name a client asked for, or the default one.
pub(crate) fn requested_name(hello: Option<&str>) -> String {
    hello.map_or_else(|| DEFAULT_NAME.to_owned(), str::to_ascii_lowercase)
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.cached(&requested_name(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_kept_private_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalCa::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let again = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_der(), again.cert_der(), "a second start made a new CA");
    }

    #[test]
    fn leaf_certificates_are_cached_per_host_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::new(LocalCa::load_or_create(dir.path()).unwrap());
        store.ensure("app.a.localhost").unwrap();
        let first = store.cached("app.a.localhost").unwrap();
        store.ensure("app.a.localhost").unwrap();
        assert!(Arc::ptr_eq(&first, &store.cached("app.a.localhost").unwrap()));
        assert_eq!(first.cert.len(), 2, "leaf then CA");
        for n in 0..MAX_CACHED_CERTS + 1 {
            store.lock().insert(format!("h{n}"), first.clone());
        }
        store.ensure("late.localhost").unwrap();
        assert!(store.lock().len() <= MAX_CACHED_CERTS);
    }
}
