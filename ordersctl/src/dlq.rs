//! Dead letters: list, show and redrive what the consumers could not process.
//!
//! A dead letter is the original record (key, payload, headers) plus `dlq.*` headers saying
//! why, how often, by which consumer group and from where. Redrive republishes the original
//! record to its original topic, keyed as before, without the `dlq.*` headers and with
//! `dlq.redriven_from`. Every consumer group of that topic sees it again; their inboxes make
//! it a no-op wherever it was already processed, so a redrive is safe to repeat, as long as
//! it happens within the inbox retention (the deduplication window).
//!
//! A redrive republishes only what a trusted key of its producer signed (verified again here,
//! as a consumer would): whoever may write a dead-letter topic cannot plant a record there
//! for an operator to launder onto the main topic. What fails is counted as refused, named in
//! the log, and left where it is.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its partition in the dead-letter topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The original key.
    pub key: Option<Vec<u8>>,
    /// The original payload.
    pub payload: Vec<u8>,
    /// The original headers and the `dlq.*` ones.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        orderflow_platform::kafka::header_text(&self.headers, name)
    }

    /// The original record's coordinates: (topic, partition, offset).
    pub fn origin(&self) -> (String, String, String) {
        (
            self.header("dlq.original_topic").unwrap_or_default(),
            self.header("dlq.original_partition").unwrap_or_default(),
            self.header("dlq.original_offset").unwrap_or_default(),
        )
    }
}

/// Reads every dead letter of `topic` (a `.dlq` topic) present now.
pub fn read_all(cluster: &orderflow_platform::kafka::Cluster, topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let (consumer, partitions) = orderflow_platform::kafka::reader_from_start(cluster, topic)?;
    // Read each non-empty partition up to its high watermark as of now.
    let mut remaining = Vec::new();
    for partition in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        if high > low {
            remaining.push((partition, high));
        }
    }
    let mut letters = Vec::new();
    if remaining.is_empty() {
        return Ok(letters);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let partition = message.partition();
        letters.push(DeadLetter {
            partition,
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers: orderflow_platform::kafka::headers_of(&message),
        });
        remaining.retain(|(p, high)| *p != partition || message.offset() + 1 < *high);
    }
    Ok(letters)
}

/// Which dead letters to redrive, and how.
#[derive(Debug, Clone, Default)]
pub struct RedriveOptions {
    /// Only those a given consumer group gave up on.
    pub group: Option<String>,
    /// Only those of one record key (order id).
    pub key: Option<String>,
    /// Print, do not publish.
    pub dry_run: bool,
    /// At most this many records a second (0: no limit).
    pub rate_per_sec: u32,
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedriveSummary {
    /// Dead letters that matched.
    pub matched: usize,
    /// Distinct ones not republished: their event is not one a trusted key of its producer
    /// signed (or not an event at all).
    pub refused: usize,
    /// Distinct original records among them (several groups may have dead-lettered one record).
    pub distinct: usize,
    /// Records published again.
    pub republished: usize,
}

/// Whether `letter` holds an event a trusted key of its producer signed, keyed by its order.
fn trust(letter: &DeadLetter, verifier: &orderflow_platform::signing::EventVerifier) -> anyhow::Result<()> {
    let event = orderflow::envelope::open(&letter.payload)?;
    verifier.verify(&letter.payload, &event, letter.key.as_deref())?;
    Ok(())
}

/// Redrives the dead letters of `dlq_topic` that match `options` and whose event `verifier`
/// trusts.
pub async fn redrive(
    cluster: &orderflow_platform::kafka::Cluster,
    dlq_topic: &str,
    options: &RedriveOptions,
    verifier: &orderflow_platform::signing::EventVerifier,
) -> anyhow::Result<RedriveSummary> {
    let letters = {
        let (cluster, topic) = (cluster.clone(), dlq_topic.to_owned());
        tokio::task::spawn_blocking(move || read_all(&cluster, &topic)).await??
    };
    let matching: Vec<&DeadLetter> = letters
        .iter()
        .filter(|l| {
            options
                .group
                .as_ref()
                .is_none_or(|g| l.header("dlq.consumer_group").as_ref() == Some(g))
        })
        .filter(|l| {
            options
                .key
                .as_ref()
                .is_none_or(|k| l.key.as_deref() == Some(k.as_bytes()))
        })
        .collect();
    // Verified before anything else: a letter's origin headers are not signed, so a planted
    // letter naming a genuine one's origin must not take its place among the distinct ones.
    let (trusted, refused): (Vec<&DeadLetter>, Vec<&DeadLetter>) =
        matching
            .iter()
            .copied()
            .partition(|letter| match trust(letter, verifier) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(partition = letter.partition, offset = letter.offset, %why,
                    "dead letter refused: not redriven");
                    false
                }
            });
    let mut seen = HashSet::new();
    let trusted: Vec<&DeadLetter> = trusted.into_iter().filter(|l| seen.insert(l.origin())).collect();
    let mut seen_refused = HashSet::new();
    let refused = refused.into_iter().filter(|l| seen_refused.insert(l.origin())).count();
    let mut summary = RedriveSummary {
        matched: matching.len(),
        refused,
        distinct: trusted.len() + refused,
        republished: 0,
    };
    if options.dry_run {
        return Ok(summary);
    }
    let producer: FutureProducer = orderflow_platform::kafka::producer_config(
        cluster,
        "ordersctl-redrive",
        orderflow_platform::kafka::DEFAULT_DELIVERY_TIMEOUT,
    )
    .create()?;
    let pause = (options.rate_per_sec > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(options.rate_per_sec)));
    for letter in trusted {
        let (topic, partition, offset) = letter.origin();
        if topic.is_empty() {
            anyhow::bail!(
                "dead letter {}/{} has no dlq.original_topic header",
                letter.partition,
                letter.offset
            );
        }
        let source = format!("{dlq_topic}/{}/{}", letter.partition, letter.offset);
        let mut headers = OwnedHeaders::new();
        for (name, value) in letter.headers.iter().filter(|(name, _)| !name.starts_with("dlq.")) {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: Some(value.as_slice()),
            });
        }
        headers = headers.insert(Header {
            key: "dlq.redriven_from",
            value: Some(source.as_str()),
        });
        let mut record = FutureRecord::to(&topic).payload(&letter.payload).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(error, _)| anyhow::anyhow!(error))?;
        tracing::info!(%topic, %partition, %offset, %source, "dead letter redriven");
        summary.republished += 1;
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(summary)
}
