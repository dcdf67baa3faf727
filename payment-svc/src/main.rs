use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = orderflow_platform::telemetry::init("payment-svc");
    orderflow_platform::telemetry::install_metrics_from_env()?;
    let config = payment_svc::Config::parse();
    payment_svc::run(config, orderflow_platform::shutdown_on_signals()).await
}
