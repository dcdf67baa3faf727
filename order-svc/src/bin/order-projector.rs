#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: order_svc::projector::Config = orderflow_platform::config::parse();
    let _telemetry = orderflow_platform::telemetry::init("order-projector", &config.telemetry);
    config.telemetry.install()?;
    order_svc::projector::run(config, orderflow_platform::shutdown_on_signals()).await
}
