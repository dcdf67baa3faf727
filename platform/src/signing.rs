//! Events no relay can forge (docs/adr/0006-signed-events.md). The service that decides an
//! event signs its envelope when it writes it to the outbox, with its own Ed25519 key; every
//! consumer verifies before it acts, against the public keys it trusts, each bound to the one
//! service that may produce the event types it signs. A stolen relay or broker credential can
//! delay, duplicate or reorder what the services wrote, not invent or change an event.
//!
//! What is signed is every byte of the envelope as written: the producer encodes the envelope
//! with `signing_key_id` set (field 9) and `signature` empty, signs those bytes, and appends
//! the `signature` field (field 10, 64 bytes) after them. A verifier checks the signature over
//! the bytes before that trailer exactly as they arrived, never over a re-encoding, so a
//! consumer built before a field was added still verifies what a newer producer signed (a
//! decoder drops unknown fields, and re-encoding would change the bytes). Any protobuf decoder
//! reads the appended field like any other.
//!
//! Keys: a producer's private key is a PKCS#8 PEM file (`EVENT_SIGNING_KEY`); a consumer
//! trusts every `<service>.<name>.pub` file (SPKI PEM) of a directory (`EVENT_VERIFYING_KEYS`),
//! the service named by the file name. A key's id is its service and the first eight bytes of
//! its public key in hex (`order-svc/1a2b3c4d5e6f7a8b`), so one service may have several keys
//! trusted at once: a rotation (docs/runbook.md, "Rotating an event signing key").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use orderflow::events::v1::EventEnvelope;
use orderflow::events::v1::event_envelope::Payload;
use prost::Message as _;

/// The service that decides order events.
pub const ORDER_SVC: &str = "order-svc";
/// The service that decides payment events.
pub const PAYMENT_SVC: &str = "payment-svc";
/// The service that decides stock events.
pub const INVENTORY_SVC: &str = "inventory-svc";

/// The one service whose key may sign `payload`'s event type.
pub fn producer_of(payload: &Payload) -> &'static str {
    match payload {
        Payload::OrderPlaced(_) | Payload::OrderConfirmed(_) | Payload::OrderCancelled(_) => ORDER_SVC,
        Payload::PaymentAuthorized(_)
        | Payload::PaymentFailed(_)
        | Payload::PaymentCaptured(_)
        | Payload::PaymentVoided(_) => PAYMENT_SVC,
        Payload::StockReserved(_)
        | Payload::StockRejected(_)
        | Payload::StockReleased(_)
        | Payload::StockCommitted(_)
        | Payload::StockCameShort(_) => INVENTORY_SVC,
    }
}

/// The protobuf key of the envelope's `signature` field (field 10, length-delimited).
const SIGNATURE_TAG: u8 = (10 << 3) | 2;
/// The protobuf key of the envelope's `signing_key_id` field (field 9, length-delimited).
const KEY_ID_TAG: u8 = (9 << 3) | 2;
/// The signature field as appended: its key, its length (64), the signature.
const TRAILER_LEN: usize = 2 + ed25519_dalek::SIGNATURE_LENGTH;

/// The id of `key` as `service`'s.
fn key_id(service: &str, key: &VerifyingKey) -> String {
    format!("{service}/{}", hex::encode(&key.as_bytes()[..8]))
}

/// Signs the envelopes of one producing service.
#[derive(Clone)]
pub struct EventSigner {
    key: Arc<SigningKey>,
    key_id: String,
}

impl std::fmt::Debug for EventSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventSigner({})", self.key_id)
    }
}

impl EventSigner {
    /// `service`'s signer with the private key (PKCS#8 PEM) in the file at `path`.
    pub fn from_file(service: &str, path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(path).with_context(|| format!("the event signing key {}", path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|error| anyhow::anyhow!("the event signing key {}: {error}", path.display()))?;
        Ok(Self::new(service, key))
    }

    /// `service`'s signer with `key`.
    pub fn new(service: &str, key: SigningKey) -> Self {
        let key_id = key_id(service, &key.verifying_key());
        Self {
            key: Arc::new(key),
            key_id,
        }
    }

    /// `service`'s signer with a key made now, whose public half nobody trusts unless told
    /// ([`EventSigner::verifying_key`]): tests, and benchmarks of the relay, which publishes
    /// whatever its outbox holds without reading it.
    pub fn ephemeral(service: &str) -> anyhow::Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let key = SigningKey::from_pkcs8_pem(&pair.serialize_pem()).map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(Self::new(service, key))
    }

    /// The public half of its key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Its key's id, as the envelopes it signs name it.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The envelope's bytes as written to the outbox: encoded with this key's id, then signed
    /// (see the module's documentation).
    pub fn seal(&self, envelope: &EventEnvelope) -> Vec<u8> {
        let key_id = self.key_id.as_bytes();
        let mut bytes = Vec::with_capacity(envelope.encoded_len() + key_id.len() + 2 + TRAILER_LEN);
        // The envelope as the service made it (its own key id and signature fields empty:
        // written here once, at the end, so the last value is the one a decoder keeps).
        envelope.encode_raw(&mut bytes);
        bytes.push(KEY_ID_TAG);
        prost::encoding::encode_varint(key_id.len() as u64, &mut bytes);
        bytes.extend_from_slice(key_id);
        let signature = self.key.sign(&bytes);
        bytes.push(SIGNATURE_TAG);
        bytes.push(ed25519_dalek::SIGNATURE_LENGTH as u8);
        bytes.extend_from_slice(&signature.to_bytes());
        bytes
    }
}

/// Why a record's event is not trusted. Never retried: the same bytes fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    /// No signature trailer.
    #[error("the envelope is not signed")]
    Unsigned,
    /// Signed by a key this consumer does not trust.
    #[error("signed by key {0:?}, which is not trusted here")]
    UnknownKey(String),
    /// Signed by a trusted key of a service that does not produce this event type.
    #[error("{event_type} signed by {key_id}: only {producer}'s keys sign it")]
    WrongProducer {
        /// The event's type.
        event_type: String,
        /// The key that signed it.
        key_id: String,
        /// The service that produces that type.
        producer: &'static str,
    },
    /// The signature does not match the bytes.
    #[error("the signature of key {0} does not match the envelope")]
    BadSignature(String),
    /// The record's key is not the event's order (a signed event moved to another key).
    #[error("the record's key {record_key:?} is not the event's order {order}")]
    KeyMismatch {
        /// The record's key as text.
        record_key: String,
        /// The envelope's aggregate id.
        order: uuid::Uuid,
    },
}

impl Untrusted {
    /// Every reason's label (to start each count at zero: a counter first seen at 1 shows no
    /// increase, and the first forged event would raise no alert).
    pub const LABELS: [&'static str; 5] = [
        "unsigned",
        "unknown_key",
        "wrong_producer",
        "bad_signature",
        "key_mismatch",
    ];

    /// A short label for metrics (each spelled once, in [`Untrusted::LABELS`]).
    pub fn label(&self) -> &'static str {
        Self::LABELS[match self {
            Self::Unsigned => 0,
            Self::UnknownKey(_) => 1,
            Self::WrongProducer { .. } => 2,
            Self::BadSignature(_) => 3,
            Self::KeyMismatch { .. } => 4,
        }]
    }
}

/// The public keys a consumer trusts, each bound to its service.
#[derive(Clone, Default)]
pub struct EventVerifier {
    keys: Arc<HashMap<String, (String, VerifyingKey)>>,
}

impl std::fmt::Debug for EventVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventVerifier({:?})", self.key_ids())
    }
}

impl EventVerifier {
    /// Trusts every `<service>.<name>.pub` file (SPKI PEM) in `dir`; at least one.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        let entries = std::fs::read_dir(dir).with_context(|| format!("the event verifying keys {}", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        paths.sort();
        for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "pub")) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let service = name
                .split_once('.')
                .map(|(service, _)| service)
                .filter(|service| !service.is_empty())
                .with_context(|| format!("{}: not <service>.<name>.pub", path.display()))?;
            let pem = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            let key = VerifyingKey::from_public_key_pem(&pem)
                .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
            keys.push((service.to_owned(), key));
        }
        anyhow::ensure!(!keys.is_empty(), "no event verifying key (*.pub) in {}", dir.display());
        Ok(Self::trusting(keys))
    }

    /// Trusts `keys`, each as its service's.
    pub fn trusting(keys: impl IntoIterator<Item = (String, VerifyingKey)>) -> Self {
        let keys = keys
            .into_iter()
            .map(|(service, key)| (key_id(&service, &key), (service, key)))
            .collect();
        Self { keys: Arc::new(keys) }
    }

    /// The ids of the keys trusted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Checks that `bytes` (a record's value, whose envelope `envelope::open` accepted as
    /// `event`) were signed by a trusted key of the service that produces its type, and that
    /// the record's key (`record_key`) is its order.
    pub fn verify(
        &self,
        bytes: &[u8],
        event: &orderflow::envelope::OpenedEvent,
        record_key: Option<&[u8]>,
    ) -> Result<(), Untrusted> {
        let order = event.aggregate_id;
        if record_key != Some(order.to_string().as_bytes()) {
            return Err(Untrusted::KeyMismatch {
                record_key: String::from_utf8_lossy(record_key.unwrap_or_default()).into_owned(),
                order,
            });
        }
        let Some(signed_len) = bytes.len().checked_sub(TRAILER_LEN) else {
            return Err(Untrusted::Unsigned);
        };
        let (signed, trailer) = bytes.split_at(signed_len);
        if trailer[0] != SIGNATURE_TAG || usize::from(trailer[1]) != ed25519_dalek::SIGNATURE_LENGTH {
            return Err(Untrusted::Unsigned);
        }
        let key_id = event.signing_key_id.as_deref().ok_or(Untrusted::Unsigned)?;
        let (service, key) = self
            .keys
            .get(key_id)
            .ok_or_else(|| Untrusted::UnknownKey(key_id.to_owned()))?;
        // The signature first: a key id is written by whoever wrote the record, and only a
        // signature that holds says the key's owner wrote it (a forger naming payment-svc's
        // key must read as a bad signature, not as payment-svc signing an order event).
        // Cannot fail: the trailer is exactly SIGNATURE_LENGTH bytes after its two-byte key.
        let signature = ed25519_dalek::Signature::from_slice(&trailer[2..])
            .map_err(|_| Untrusted::BadSignature(key_id.to_owned()))?;
        key.verify_strict(signed, &signature)
            .map_err(|_| Untrusted::BadSignature(key_id.to_owned()))?;
        let producer = producer_of(&event.payload);
        if service != producer {
            return Err(Untrusted::WrongProducer {
                event_type: orderflow::envelope::event_type_of(&event.payload).to_owned(),
                key_id: key_id.to_owned(),
                producer,
            });
        }
        Ok(())
    }
}

/// The producing service's signing key file (`EVENT_SIGNING_KEY`).
#[derive(Debug, Clone, clap::Args)]
pub struct SigningArgs {
    /// The private key (PKCS#8 PEM) this service signs the events it writes with.
    #[arg(long = "event-signing-key", env = "EVENT_SIGNING_KEY")]
    pub event_signing_key: PathBuf,
}

/// The consumer's trusted keys (`EVENT_VERIFYING_KEYS`).
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyingArgs {
    /// The directory of the public keys (`<service>.<name>.pub`, SPKI PEM) whose signatures
    /// this consumer trusts; a record no trusted key of its producer signed is dead-lettered.
    /// Required wherever the process consumes events.
    #[arg(long = "event-verifying-keys", env = "EVENT_VERIFYING_KEYS")]
    pub event_verifying_keys: Option<PathBuf>,
}

impl VerifyingArgs {
    /// The verifier; an error without the directory (a consumer never runs unverified).
    pub fn verifier(&self) -> anyhow::Result<EventVerifier> {
        let dir = self
            .event_verifying_keys
            .as_deref()
            .context("EVENT_VERIFYING_KEYS is not set: a consumer acts only on events it can verify")?;
        EventVerifier::from_dir(dir)
    }
}

impl SigningArgs {
    /// `service`'s signer.
    pub fn signer(&self, service: &str) -> anyhow::Result<EventSigner> {
        EventSigner::from_file(service, &self.event_signing_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow::envelope::{EventMeta, seal};
    use orderflow::events::v1::{OrderPlaced, PaymentAuthorized};

    fn key() -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        SigningKey::from_pkcs8_pem(&pair.serialize_pem()).unwrap()
    }

    fn envelope(payload: Payload) -> (EventEnvelope, uuid::Uuid) {
        let id = uuid::Uuid::now_v7();
        let meta = EventMeta {
            message_id: id,
            aggregate_id: id,
            correlation_id: id,
            causation_id: None,
            traceparent: None,
            occurred_at: prost_types::Timestamp::default(),
        };
        (seal(meta, payload), id)
    }

    fn placed() -> (EventEnvelope, uuid::Uuid) {
        envelope(Payload::OrderPlaced(OrderPlaced::default()))
    }

    fn check(verifier: &EventVerifier, bytes: &[u8], order: uuid::Uuid) -> Result<(), Untrusted> {
        let event = orderflow::envelope::open(bytes).expect("a valid envelope");
        verifier.verify(bytes, &event, Some(order.to_string().as_bytes()))
    }

    #[test]
    fn a_sealed_envelope_decodes_as_usual_and_verifies() {
        let signer = EventSigner::new(ORDER_SVC, key());
        let verifier = EventVerifier::trusting([(ORDER_SVC.to_owned(), signer.key.verifying_key())]);
        let (envelope, order) = placed();
        let bytes = signer.seal(&envelope);
        let decoded = EventEnvelope::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.signing_key_id, signer.key_id());
        assert_eq!(decoded.signature.len(), 64);
        assert_eq!(decoded.payload, envelope.payload);
        assert_eq!(check(&verifier, &bytes, order), Ok(()));
    }

    #[test]
    fn a_changed_byte_an_unsigned_envelope_or_a_moved_record_is_refused() {
        let signer = EventSigner::new(ORDER_SVC, key());
        let verifier = EventVerifier::trusting([(ORDER_SVC.to_owned(), signer.key.verifying_key())]);
        let (envelope, order) = placed();
        let sealed = signer.seal(&envelope);
        // A forger edits the order id inside the signed bytes (the message id's text).
        let mut edited = sealed.clone();
        let at = edited.iter().position(|b| *b == b'-').unwrap();
        edited[at + 1] = if edited[at + 1] == b'a' { b'b' } else { b'a' };
        if let Ok(event) = orderflow::envelope::open(&edited) {
            assert!(matches!(
                verifier.verify(&edited, &event, Some(event.aggregate_id.to_string().as_bytes())),
                Err(Untrusted::BadSignature(_))
            ));
        }
        assert_eq!(
            check(&verifier, &envelope.encode_to_vec(), order),
            Err(Untrusted::Unsigned)
        );
        let event = orderflow::envelope::open(&sealed).unwrap();
        assert!(matches!(
            verifier.verify(&sealed, &event, Some(b"another-order")),
            Err(Untrusted::KeyMismatch { .. })
        ));
    }

    #[test]
    fn only_a_trusted_key_of_the_producing_service_signs_its_events() {
        let order_svc = EventSigner::new(ORDER_SVC, key());
        let payment_svc = EventSigner::new(PAYMENT_SVC, key());
        let stranger = EventSigner::new(ORDER_SVC, key());
        let verifier = EventVerifier::trusting([
            (ORDER_SVC.to_owned(), order_svc.key.verifying_key()),
            (PAYMENT_SVC.to_owned(), payment_svc.key.verifying_key()),
        ]);
        let (placed, order) = placed();
        assert_eq!(
            check(&verifier, &stranger.seal(&placed), order),
            Err(Untrusted::UnknownKey(stranger.key_id().to_owned()))
        );
        // payment-svc's key (a stolen one, or a bug) cannot make an OrderPlaced...
        assert!(matches!(
            check(&verifier, &payment_svc.seal(&placed), order),
            Err(Untrusted::WrongProducer {
                producer: ORDER_SVC,
                ..
            })
        ));
        // A forger naming payment-svc's key id without its key: a bad signature, not payment-svc.
        let impostor = EventSigner::new(PAYMENT_SVC, key());
        let forged = {
            let mut bytes = impostor.seal(&placed);
            let stranger_id = impostor.key_id().as_bytes().to_vec();
            let real_id = payment_svc.key_id().as_bytes().to_vec();
            let at = bytes
                .windows(stranger_id.len())
                .position(|w| w == stranger_id.as_slice())
                .unwrap();
            bytes[at..at + real_id.len()].copy_from_slice(&real_id);
            bytes
        };
        assert!(matches!(
            check(&verifier, &forged, order),
            Err(Untrusted::BadSignature(_))
        ));
        // ...and signs its own events.
        let (authorized, order) = envelope(Payload::PaymentAuthorized(PaymentAuthorized::default()));
        assert_eq!(check(&verifier, &payment_svc.seal(&authorized), order), Ok(()));
    }

    #[test]
    fn during_a_rotation_both_keys_verify_and_after_it_only_the_new_one() {
        let dir = std::env::temp_dir().join(format!("orderflow-event-keys-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let pairs: Vec<rcgen::KeyPair> = (0..2)
            .map(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap())
            .collect();
        let signer = |pair: &rcgen::KeyPair| {
            EventSigner::new(ORDER_SVC, SigningKey::from_pkcs8_pem(&pair.serialize_pem()).unwrap())
        };
        let (old, new) = (signer(&pairs[0]), signer(&pairs[1]));
        // Before the rotation: the old key alone.
        std::fs::write(dir.join("order-svc.1.pub"), pairs[0].public_key_pem()).unwrap();
        // Step 1: the new public key is trusted next to the old one (every consumer restarted
        // with both); step 2: the producer signs with the new key.
        std::fs::write(dir.join("order-svc.2.pub"), pairs[1].public_key_pem()).unwrap();
        let during = EventVerifier::from_dir(&dir).unwrap();
        assert_eq!(during.key_ids(), {
            let mut ids = vec![old.key_id().to_owned(), new.key_id().to_owned()];
            ids.sort();
            ids
        });
        let (envelope, order) = placed();
        let (by_old, by_new) = (old.seal(&envelope), new.seal(&envelope));
        assert_eq!(check(&during, &by_old, order), Ok(()));
        assert_eq!(check(&during, &by_new, order), Ok(()));
        // Step 3: once nothing the old key signed remains to be consumed, its file goes.
        std::fs::remove_file(dir.join("order-svc.1.pub")).unwrap();
        let after = EventVerifier::from_dir(&dir).unwrap();
        assert_eq!(check(&after, &by_new, order), Ok(()));
        assert_eq!(
            check(&after, &by_old, order),
            Err(Untrusted::UnknownKey(old.key_id().to_owned()))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The cost of signing and verifying one envelope, printed (a measurement, not a check:
    /// `cargo test --release -p orderflow-platform --lib signing_cost -- --ignored --nocapture`).
    /// docs/adr/0006-signed-events.md multiplies it by the signatures and verifications of one
    /// order.
    #[test]
    #[ignore = "a measurement; run it in a release build"]
    fn signing_cost() {
        let signer = EventSigner::new(ORDER_SVC, key());
        let verifier = EventVerifier::trusting([(ORDER_SVC.to_owned(), signer.verifying_key())]);
        let (envelope, order) = placed();
        let rounds = 20_000u32;
        let started = std::time::Instant::now();
        let mut sealed = Vec::new();
        for _ in 0..rounds {
            sealed = signer.seal(&envelope);
        }
        let seal = started.elapsed() / rounds;
        let event = orderflow::envelope::open(&sealed).unwrap();
        let key = order.to_string();
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            verifier.verify(&sealed, &event, Some(key.as_bytes())).unwrap();
        }
        let verify = started.elapsed() / rounds;
        println!(
            "seal {:.1} us, verify {:.1} us per envelope of {} bytes; per approved order (4 signed, 10 verified): {:.2} ms",
            seal.as_secs_f64() * 1e6,
            verify.as_secs_f64() * 1e6,
            sealed.len(),
            (4.0 * seal.as_secs_f64() + 10.0 * verify.as_secs_f64()) * 1e3
        );
    }
}
