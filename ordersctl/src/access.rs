//! How ordersctl (and the benchmark and chaos harness built on it) reaches the servers: TLS
//! with the stack's CA, and a bearer token on every call, either given (`ORDERFLOW_TOKEN`)
//! or signed here with the stack's identity-provider key (`ORDERFLOW_JWT_SIGNING_KEY`) for
//! the caller each call needs: the order's customer to place it, an operator to read any
//! order or change the gateway's faults.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use orderflow_platform::auth::{Caller, Issuer};
use orderflow_platform::security::ClientSecurity;
use tonic::transport::Channel;

/// How long the tokens signed here last (longer than any benchmark or chaos run).
const TOKEN_TTL: Duration = Duration::from_secs(3 * 3600);

/// The command line's (and environment's) access settings.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// CA of the servers' certificates; without it, plaintext (a development stack).
    #[arg(long, env = "ORDERFLOW_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// A bearer token to send as is.
    #[arg(long, env = "ORDERFLOW_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The identity provider's private key: tokens are signed here for each call's caller.
    #[arg(long, env = "ORDERFLOW_JWT_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,
}

enum Tokens {
    None,
    Given(String),
    Signed(Issuer, Mutex<HashMap<String, String>>),
}

/// Channels and tokens for the servers.
pub struct Access {
    security: ClientSecurity,
    tokens: Tokens,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = match self.tokens {
            Tokens::None => "none",
            Tokens::Given(_) => "given",
            Tokens::Signed(..) => "signed here",
        };
        f.debug_struct("Access")
            .field("ca", &self.security.ca)
            .field("tokens", &tokens)
            .finish()
    }
}

impl Access {
    /// From the settings; a signing key wins over a given token.
    pub fn new(args: &AccessArgs) -> anyhow::Result<Self> {
        let tokens = match (&args.signing_key, &args.token) {
            (Some(key), _) => {
                let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                Tokens::Signed(Issuer::from_private_pem(&pem)?, Mutex::default())
            }
            (None, Some(token)) => Tokens::Given(token.clone()),
            (None, None) => Tokens::None,
        };
        Ok(Self {
            security: ClientSecurity {
                ca: args.ca_cert.clone(),
                identity: None,
            },
            tokens,
        })
    }

    /// An endpoint for `addr` (TLS when a CA is set), to configure further.
    pub fn endpoint(&self, addr: &str) -> anyhow::Result<tonic::transport::Endpoint> {
        self.security.endpoint(addr)
    }

    /// A connected channel to `addr`.
    pub async fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        self.security
            .endpoint(addr)?
            .connect()
            .await
            .with_context(|| format!("cannot reach {addr}"))
    }

    /// An order service client on a new connection to `addr`.
    pub async fn order_client(&self, addr: &str) -> anyhow::Result<OrderServiceClient<Channel>> {
        Ok(OrderServiceClient::new(self.channel(addr).await?))
    }

    /// A token for `caller`: signed here, or the given one, or none.
    pub fn token(&self, caller: &Caller) -> anyhow::Result<Option<String>> {
        match &self.tokens {
            Tokens::None => Ok(None),
            Tokens::Given(token) => Ok(Some(token.clone())),
            Tokens::Signed(issuer, cache) => {
                let key = format!("{caller:?}");
                // A poisoned cache only means another thread panicked mid-insert: the map
                // is still a valid map.
                let mut cache = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(token) = cache.get(&key) {
                    return Ok(Some(token.clone()));
                }
                let token = issuer.issue(caller, TOKEN_TTL)?;
                cache.insert(key, token.clone());
                Ok(Some(token))
            }
        }
    }

    /// `message` as a request carrying `caller`'s token.
    pub fn request<T>(&self, message: T, caller: &Caller) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = self.token(caller)? {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        Ok(request)
    }
}

/// The caller ordersctl acts as to read orders and change faults.
pub fn operator() -> Caller {
    Caller::Operator("ordersctl".to_owned())
}
