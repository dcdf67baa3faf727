//! payment-svc with failpoints enabled, for the crash tests only. Set e.g.
//! `FAILPOINTS=payment::before_gateway=return` to have it die there, as `kill -9` would.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    payment_svc::main_from_env().await
}
