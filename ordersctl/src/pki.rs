//! The local stack's keys: a CA, the servers' certificates, payment-svc's client
//! certificate, and the identity provider's token-signing key. Generated once per stack
//! (`ordersctl pki init`, run by `scripts/stack`), in Rust (rcgen), so a fresh machine needs
//! no openssl command. Private keys are written readable by their owner only.
//!
//! Server certificates name `localhost` and `127.0.0.1`, where the stack listens. They are
//! valid for a year; `scripts/stack reset` makes new ones.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Where each file of a stack's PKI is.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The directory.
    pub dir: PathBuf,
}

impl Pki {
    /// The PKI in `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// A file of it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA certificate every client trusts.
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// A server's or client's certificate and key (`order-svc`, `gateway-sim`, `payment-svc`).
    pub fn identity(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.file(&format!("{name}.pem")), self.file(&format!("{name}.key")))
    }

    /// The token-signing key (private: the identity provider's).
    pub fn signing_key(&self) -> PathBuf {
        self.file("jwt-signing.key")
    }

    /// The token-verification key (public: the servers').
    pub fn verification_key(&self) -> PathBuf {
        self.file("jwt-verification.pem")
    }

    /// A producing service's event signing key (private: that service's alone).
    pub fn event_signing_key(&self, service: &str) -> PathBuf {
        self.file(&format!("events/{service}.key"))
    }

    /// The directory of the event verifying keys every consumer trusts (public).
    pub fn event_verifying_keys(&self) -> PathBuf {
        self.file("events/verifying")
    }
}

/// Makes what is missing of the producing services' event signing keys: for each, its
/// private key and, in the verifying directory, its public key as `<service>.1.pub` (a
/// rotation adds `<service>.2.pub`: docs/runbook.md). Returns whether it made any.
pub fn init_event_keys(dir: &Path) -> anyhow::Result<bool> {
    let pki = Pki::at(dir);
    std::fs::create_dir_all(pki.event_verifying_keys())
        .with_context(|| format!("creating {}", pki.event_verifying_keys().display()))?;
    let mut made = false;
    for service in [
        orderflow_platform::signing::ORDER_SVC,
        orderflow_platform::signing::PAYMENT_SVC,
    ] {
        let private = pki.event_signing_key(service);
        if private.exists() {
            continue;
        }
        let pair = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        write(
            &pki.event_verifying_keys().join(format!("{service}.1.pub")),
            &pair.public_key_pem(),
            false,
        )?;
        // The private key last: its presence says the pair is complete.
        write(&private, &pair.serialize_pem(), true)?;
        made = true;
    }
    Ok(made)
}

/// Makes the PKI in `dir` unless it is there already (its CA exists), and the event signing
/// keys that are missing (a stack made before events were signed gets them); returns whether
/// it made anything.
pub fn init(dir: &Path) -> anyhow::Result<bool> {
    let pki = Pki::at(dir);
    if pki.ca().exists() {
        return init_event_keys(dir);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name = name("orderflow local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (year, month, day) = in_days(365);
    ca_params.not_after = rcgen::date_time_ymd(year, month, day);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    for (who, purpose) in [
        ("order-svc", ExtendedKeyUsagePurpose::ServerAuth),
        ("gateway-sim", ExtendedKeyUsagePurpose::ServerAuth),
        ("payment-svc", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params.distinguished_name = name(who);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = pki.identity(who);
        write(&cert_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
    }
    let (private, public) = orderflow_platform::auth::generate_signing_key()?;
    write(&pki.signing_key(), &private, true)?;
    write(&pki.verification_key(), &public, false)?;
    init_event_keys(dir)?;
    // The CA last: its presence says the PKI is complete.
    write(&pki.ca(), &ca_cert.pem(), false)?;
    Ok(true)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "orderflow local stack");
    name
}

/// The date `days` from today, as (year, month, day).
fn in_days(days: i64) -> (i32, u8, u8) {
    use chrono::Datelike as _;
    let day = chrono::Utc::now() + chrono::Duration::days(days);
    // Month and day of a real date always fit in u8.
    (day.year(), day.month() as u8, day.day() as u8)
}

fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
