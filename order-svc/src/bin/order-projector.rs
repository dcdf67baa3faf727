use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = orderflow_platform::telemetry::init("order-projector");
    orderflow_platform::telemetry::install_metrics_from_env()?;
    let config = order_svc::projector::Config::parse();
    order_svc::projector::run(config, orderflow_platform::shutdown_on_signals()).await
}
