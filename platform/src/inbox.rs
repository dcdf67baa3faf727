//! The inbox: "this consumer has processed this message", recorded in the same transaction
//! as the message's effect. A redelivered message finds its id and does nothing.

/// Records the ids of a unit of work's messages for `consumer` in one statement inside the
/// caller's transaction, and returns those recorded now: an id missing from the answer was
/// processed already. A concurrent transaction recording one of the same ids makes this insert
/// wait for it, so two deliveries of one message never run their effects side by side. An id
/// given twice is recorded once. Only the consumer runtime calls it (`consumer::unit`). The
/// ids are inserted in sorted order, so two transactions recording overlapping units take
/// their locks in the same order instead of deadlocking.
pub async fn record_all(
    tx: &mut sqlx::PgConnection,
    consumer: &str,
    message_ids: &[uuid::Uuid],
) -> Result<std::collections::HashSet<uuid::Uuid>, sqlx::Error> {
    let mut sorted = message_ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let recorded: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO inbox (consumer, message_id) SELECT $1, id FROM unnest($2::uuid[]) WITH ORDINALITY AS t(id, n)
         ORDER BY n ON CONFLICT DO NOTHING RETURNING message_id",
    )
    .bind(consumer)
    .bind(&sorted)
    .fetch_all(&mut *tx)
    .await?;
    Ok(recorded.into_iter().collect())
}
