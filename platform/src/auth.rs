//! Who is calling: bearer tokens (JWT, Ed25519-signed) on every call of the public API.
//!
//! A token names its subject and role: `customer:<id>` with role `customer`, or an operator
//! (`operator:<name>`, role `operator`). The servers hold only the public key: they verify
//! the signature, the issuer, the audience and the expiry, and refuse anything else as
//! UNAUTHENTICATED. What each role may do is the server's decision (order-svc: a customer
//! places and reads its own orders; gateway-sim: only an operator changes the faults).
//!
//! The local stack plays the identity provider: `scripts/stack` generates the key pair and
//! `ordersctl` signs tokens with the private key (`ordersctl token`). A real deployment
//! hands the servers its provider's public key instead.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

/// The issuer the stack's tokens carry and the servers require.
pub const ISSUER: &str = "orderflow-local";
/// The audience the stack's tokens carry and the servers require.
pub const AUDIENCE: &str = "orderflow";

/// What a caller may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A shopper: acts for one customer id.
    Customer,
    /// Staff: admin operations, any order.
    Operator,
}

/// The verified caller of one request (in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The customer with this id.
    Customer(i64),
    /// An operator, by name.
    Operator(String),
}

/// A token's claims.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
    /// Not before: a token issued for later is refused until then (within the leeway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

impl Caller {
    /// The caller as one party for fair sharing (crate::fairness): `customer:42`,
    /// `operator:alice`.
    pub fn party(&self) -> String {
        match self {
            Self::Customer(id) => format!("customer:{id}"),
            Self::Operator(name) => format!("operator:{name}"),
        }
    }
}

/// Why a token is refused. Every variant answers UNAUTHENTICATED; the reason is logged,
/// not sent (it would help a forger).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer <token>` metadata.
    #[error("no bearer token")]
    Missing,
    /// Signature, expiry, issuer, audience or shape wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// How far apart the issuer's and the verifier's clocks may be, in seconds, for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// How many verified tokens a verifier remembers (a few hundred bytes each).
const VERIFIED_TOKENS: usize = 10_000;

/// Verifies tokens with the identity provider's public key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Tokens verified lately, by their exact text, with the caller each proves and its
    /// expiry: one caller's many calls with one token cost one signature check, not one each
    /// (one customer opening hundreds of streams at once would otherwise take the CPU from
    /// every other caller: tests/fairness.rs). A token enters only once verified (signature,
    /// issuer, audience, `nbf`) and is not used past its `exp`; bounded by
    /// [`VERIFIED_TOKENS`] (quick_cache evicts the least used).
    verified: Arc<quick_cache::sync::Cache<String, (Caller, u64)>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

impl Verifier {
    /// A verifier for tokens signed by the Ed25519 key whose public half is `pem`.
    pub fn from_public_pem(pem: &[u8]) -> anyhow::Result<Self> {
        let key = DecodingKey::from_ed_pem(pem)?;
        // EdDSA only: a token naming another algorithm (`none`, HS256 with the public key as
        // the secret) is refused before its signature is looked at.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // `nbf`, where a token has one, is held to the same bounded leeway as `exp` (clocks
        // a few seconds apart), no more.
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Ok(Self {
            key,
            validation,
            verified: Arc::new(quick_cache::sync::Cache::new(VERIFIED_TOKENS)),
        })
    }

    /// The caller a token proves.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|error| AuthError::Invalid(error.to_string()))?
            .as_secs();
        match self.verified.get(token) {
            Some((caller, exp)) if now < exp => return Ok(caller),
            // Expired: forgotten, and verified again below (where it fails on its `exp`).
            Some(_) => {
                self.verified.remove(token);
            }
            None => {}
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| AuthError::Invalid(error.to_string()))?;
        let exp = data.claims.exp;
        let caller = Self::caller_of(data.claims)?;
        self.verified.insert(token.to_owned(), (caller.clone(), exp));
        Ok(caller)
    }

    /// The caller verified claims name, if their subject and role agree.
    fn caller_of(claims: Claims) -> Result<Caller, AuthError> {
        match (claims.role, claims.sub.split_once(':')) {
            (Role::Customer, Some(("customer", id))) => id
                .parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .map(Caller::Customer)
                .ok_or_else(|| AuthError::Invalid(format!("subject {:?} is not a customer id", claims.sub))),
            (Role::Operator, Some(("operator", name))) if !name.is_empty() => Ok(Caller::Operator(name.to_owned())),
            _ => Err(AuthError::Invalid(format!(
                "subject {:?} does not match role {:?}",
                claims.sub, claims.role
            ))),
        }
    }

    /// The caller of a request, from its `authorization` metadata.
    pub fn verify_metadata(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, AuthError> {
        let value = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Missing)?;
        self.verify(token.trim())
    }
}

/// Signs tokens (the local stack's identity provider; tests).
#[derive(Clone)]
pub struct Issuer {
    key: EncodingKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issuer([redacted])")
    }
}

impl Issuer {
    /// An issuer signing with the Ed25519 private key in `pem` (PKCS#8).
    pub fn from_private_pem(pem: &[u8]) -> anyhow::Result<Self> {
        Ok(Self {
            key: EncodingKey::from_ed_pem(pem)?,
        })
    }

    /// A token for `caller`, valid for `ttl`.
    pub fn issue(&self, caller: &Caller, ttl: Duration) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let (sub, role) = match caller {
            Caller::Customer(id) => (format!("customer:{id}"), Role::Customer),
            Caller::Operator(name) => (format!("operator:{name}"), Role::Operator),
        };
        let claims = Claims {
            sub,
            role,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + ttl.as_secs(),
            nbf: Some(now),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &self.key,
        )?)
    }
}

/// A new Ed25519 key pair for signing tokens: (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_signing_key() -> anyhow::Result<(String, String)> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    Ok((pair.serialize_pem(), pair.public_key_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(pem: &str, nbf: u64) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims = Claims {
            sub: "customer:42".to_owned(),
            role: Role::Customer,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + 300,
            nbf: Some(now + nbf),
        };
        let key = EncodingKey::from_ed_pem(pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap()
    }

    #[test]
    fn a_token_is_refused_before_its_not_before_time_beyond_the_leeway() {
        let (private, public) = generate_signing_key().unwrap();
        let verifier = Verifier::from_public_pem(public.as_bytes()).unwrap();
        assert!(matches!(verifier.verify(&token(&private, 0)), Ok(Caller::Customer(42))));
        // A clock a little ahead of ours: within the leeway.
        assert!(verifier.verify(&token(&private, LEEWAY_SECS - 2)).is_ok());
        let early = verifier.verify(&token(&private, 60));
        assert!(
            matches!(&early, Err(AuthError::Invalid(reason)) if reason.contains("ImmatureSignature")),
            "{early:?}"
        );
        // What the issuer here signs carries its nbf, and is valid at once.
        let issued = Issuer::from_private_pem(private.as_bytes())
            .unwrap()
            .issue(&Caller::Operator("ops".to_owned()), Duration::from_secs(60))
            .unwrap();
        assert!(verifier.verify(&issued).is_ok());
    }

    #[test]
    fn a_remembered_token_is_honoured_until_its_expiry_and_never_after() {
        let (private, public) = generate_signing_key().unwrap();
        let verifier = Verifier::from_public_pem(public.as_bytes()).unwrap();
        let good = token(&private, 0);
        assert!(verifier.verify(&good).is_ok());
        assert!(
            verifier.verified.get(good.as_str()).is_some(),
            "verified, then remembered"
        );
        // An entry is trusted while its expiry is ahead: text that is no token at all is
        // accepted from it (which shows that the cache is consulted) ...
        verifier
            .verified
            .insert("not-a-token".to_owned(), (Caller::Customer(7), u64::MAX));
        assert!(matches!(verifier.verify("not-a-token"), Ok(Caller::Customer(7))));
        // ... and refused once the expiry has passed: it is verified again, and fails.
        verifier
            .verified
            .insert("not-a-token".to_owned(), (Caller::Customer(7), 0));
        assert!(verifier.verify("not-a-token").is_err());
        // A token that fails verification is never remembered.
        let early = token(&private, 60);
        assert!(verifier.verify(&early).is_err());
        assert!(verifier.verified.get(early.as_str()).is_none());
    }
}
