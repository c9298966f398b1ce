//! A certificate authority made in the test, and server certificates it
//! signs (for the hub's leaf-node port, a proxy), written as PEM files.

use std::path::PathBuf;

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    issued: std::cell::Cell<u32>,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(2);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(30);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), issuer.pem())?;
        Ok(Self {
            dir,
            issuer,
            issued: std::cell::Cell::new(0),
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `localhost` and `127.0.0.1`, valid now.
    pub fn server(&self) -> Result<TlsFiles> {
        let now = OffsetDateTime::now_utc();
        self.issue(now - Duration::hours(1), now + Duration::days(7))
    }

    /// A server certificate for `localhost` and `127.0.0.1` that expired yesterday.
    pub fn expired_server(&self) -> Result<TlsFiles> {
        let now = OffsetDateTime::now_utc();
        self.issue(now - Duration::days(2), now - Duration::days(1))
    }

    fn issue(&self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<TlsFiles> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let n = self.issued.get() + 1;
        self.issued.set(n);
        let files = TlsFiles {
            cert_file: self.dir.path().join(format!("server-{n}.pem")),
            key_file: self.dir.path().join(format!("server-{n}.key")),
        };
        std::fs::write(&files.cert_file, cert.pem())?;
        std::fs::write(&files.key_file, key.serialize_pem())?;
        Ok(files)
    }
}
