#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay::main_from_env().await
}
