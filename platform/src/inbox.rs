//! The inbox: "this consumer has processed this message", recorded in the same transaction
//! as the message's effect. A redelivered message finds its id and does nothing.

/// Records `message_id` for `consumer` inside the caller's transaction. Returns `true` the
/// first time, `false` for a message already processed (the caller then rolls back or
/// commits nothing else: the redelivery is a no-op).
pub async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    consumer: &str,
    message_id: uuid::Uuid,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(consumer)
        .bind(message_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(inserted == 1)
}

/// Whether `consumer` already processed `message_id` (a read outside any transaction, to
/// skip work such as a gateway call early; the insert in [`record`] stays the real guard).
pub async fn seen(pool: &sqlx::PgPool, consumer: &str, message_id: uuid::Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)")
        .bind(consumer)
        .bind(message_id)
        .fetch_one(pool)
        .await
}
