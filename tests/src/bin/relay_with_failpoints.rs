//! The relay binary with failpoints enabled, for the crash tests only. Set e.g.
//! `FAILPOINTS=relay::after_ack_before_mark=pause` to stop it at that line, then kill -9 it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay::main_from_env().await
}
