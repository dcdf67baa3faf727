//! The inbox: "this consumer has processed this message", recorded in the same transaction
//! as the message's effect. A redelivered message finds its id and does nothing.

/// Records `message_id` for `consumer` inside the caller's transaction. Returns `true` the
/// first time, `false` for a message already processed (the caller then rolls back or
/// commits nothing else: the redelivery is a no-op). Only the consumer runtime calls it
/// (`consumer::Worker::attempt`). A concurrent transaction recording the same id makes this
/// insert wait for it: two deliveries of one message never run their effects side by side.
pub async fn record(tx: &mut sqlx::PgConnection, consumer: &str, message_id: uuid::Uuid) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(consumer)
        .bind(message_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    Ok(inserted == 1)
}

/// Records the ids of a batch of messages for `consumer` in one statement inside the caller's
/// transaction, and returns those recorded now: an id missing from the answer was processed
/// already (or is recorded by a concurrent transaction, which this insert then waits for, as
/// [`record`] does). An id given twice is recorded once. The ids are inserted in sorted order,
/// so two transactions recording overlapping batches take their locks in the same order
/// instead of deadlocking.
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

/// Takes back, inside the caller's transaction, the ids [`record_all`] recorded in it for
/// messages whose effects the transaction leaves out (a batch's deferred messages): they are
/// handled later, and must not find themselves processed. Through the migrations'
/// `forget_own_inbox_rows`, which deletes only rows this very transaction inserted (the
/// service roles hold no DELETE on the inbox); fewer rows than ids means an id was not
/// recorded here, and the batch must not commit.
pub async fn forget_all(
    tx: &mut sqlx::PgConnection,
    consumer: &str,
    message_ids: &[uuid::Uuid],
) -> Result<(), sqlx::Error> {
    let mut distinct = message_ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let forgotten: i64 = sqlx::query_scalar("SELECT forget_own_inbox_rows($1, $2)")
        .bind(consumer)
        .bind(&distinct)
        .fetch_one(&mut *tx)
        .await?;
    if usize::try_from(forgotten).ok() != Some(distinct.len()) {
        return Err(sqlx::Error::Protocol(format!(
            "{forgotten} of {} deferred messages' inbox rows taken back: some were not recorded by this transaction",
            distinct.len()
        )));
    }
    Ok(())
}
