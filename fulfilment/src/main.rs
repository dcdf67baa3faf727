#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = orderflow_platform::telemetry::init("fulfilment");
    let config: fulfilment::Config = orderflow_platform::config::parse();
    config.metrics.install()?;
    fulfilment::run(config, orderflow_platform::shutdown_on_signals()).await
}
