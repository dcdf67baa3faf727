#[tokio::main]
async fn main() -> anyhow::Result<()> {
    payment_svc::main_from_env().await
}
