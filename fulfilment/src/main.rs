#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: fulfilment::Config = orderflow_platform::config::parse();
    let _telemetry = orderflow_platform::telemetry::init("fulfilment", &config.telemetry);
    config.telemetry.install()?;
    fulfilment::run(config, orderflow_platform::shutdown_on_signals()).await
}
