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
