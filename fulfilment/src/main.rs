use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = orderflow_platform::telemetry::init("fulfilment");
    orderflow_platform::telemetry::install_metrics_from_env()?;
    let config = fulfilment::Config::parse();
    fulfilment::run(config, orderflow_platform::shutdown_on_signals()).await
}
