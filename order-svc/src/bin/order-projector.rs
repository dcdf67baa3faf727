#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = orderflow_platform::telemetry::init("order-projector");
    let config: order_svc::projector::Config = orderflow_platform::config::parse();
    config.metrics.install()?;
    order_svc::projector::run(config, orderflow_platform::shutdown_on_signals()).await
}
