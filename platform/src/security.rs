//! How a server proves who it is and learns who calls it, and how a client reaches it:
//! TLS (rustls) with the stack's CA, optionally client certificates (mutual TLS), and
//! bearer tokens ([`crate::auth`]). Plaintext and anonymous calls exist only when the
//! configuration says so explicitly (`INSECURE_PLAINTEXT=true`, `INSECURE_NO_AUTH=true`):
//! a server given neither a certificate nor that flag refuses to start, so a forgotten
//! setting never silently serves in clear.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::auth::Verifier;

/// A server's transport and caller settings (flattened into each server's `Config`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerSecurityArgs {
    /// The server's certificate chain (PEM).
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA whose client certificates this server accepts (mutual TLS); clients without one
    /// still connect, and each service decides what they may call.
    #[arg(long, env = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The identity provider's public key (PEM, Ed25519): bearer tokens are verified with it.
    #[arg(long, env = "AUTH_PUBLIC_KEY")]
    pub auth_public_key: Option<PathBuf>,
    /// Serve without TLS (development only).
    #[arg(long, env = "INSECURE_PLAINTEXT", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_plaintext: bool,
    /// Accept calls without a token (development only).
    #[arg(long, env = "INSECURE_NO_AUTH", default_value_t = false, action = clap::ArgAction::Set)]
    pub insecure_no_auth: bool,
}

impl ServerSecurityArgs {
    /// Plaintext and anonymous, explicitly (tests of everything but security).
    pub fn insecure() -> Self {
        Self {
            insecure_plaintext: true,
            insecure_no_auth: true,
            ..Self::default()
        }
    }

    /// The TLS settings, or None when plaintext was asked for explicitly.
    pub fn server_tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        match (&self.tls_cert, &self.tls_key, self.insecure_plaintext) {
            (Some(cert), Some(key), false) => {
                let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
                if let Some(ca) = &self.tls_client_ca {
                    tls = tls
                        .client_ca_root(Certificate::from_pem(read(ca)?))
                        .client_auth_optional(true);
                }
                Ok(Some(tls))
            }
            (None, None, true) => {
                tracing::warn!("serving PLAINTEXT (INSECURE_PLAINTEXT=true): development only");
                Ok(None)
            }
            (Some(_), Some(_), true) => anyhow::bail!("TLS_CERT and INSECURE_PLAINTEXT are both set: choose one"),
            _ => anyhow::bail!(
                "no TLS certificate: set TLS_CERT and TLS_KEY, or INSECURE_PLAINTEXT=true for development"
            ),
        }
    }

    /// The token verifier, or None when anonymous calls were asked for explicitly.
    pub fn verifier(&self) -> anyhow::Result<Option<Verifier>> {
        match (&self.auth_public_key, self.insecure_no_auth) {
            (Some(key), false) => Ok(Some(Verifier::from_public_pem(&read(key)?)?)),
            (None, true) => {
                tracing::warn!("accepting calls WITHOUT TOKENS (INSECURE_NO_AUTH=true): development only");
                Ok(None)
            }
            (Some(_), true) => anyhow::bail!("AUTH_PUBLIC_KEY and INSECURE_NO_AUTH are both set: choose one"),
            (None, false) => anyhow::bail!(
                "no token verification key: set AUTH_PUBLIC_KEY, or INSECURE_NO_AUTH=true for development"
            ),
        }
    }
}

/// How a client reaches a server.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// The CA that signed the server's certificate; None for plaintext.
    pub ca: Option<PathBuf>,
    /// This client's certificate and key, for a server that wants mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientSecurity {
    /// An endpoint for `addr` (`host:port`): https with the CA when one is set, http otherwise.
    pub fn endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let Some(ca) = &self.ca else {
            return Ok(Endpoint::from_shared(format!("http://{addr}"))?);
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?)
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}
