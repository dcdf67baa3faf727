use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = orderflow_platform::telemetry::init("payment-svc");
    orderflow_platform::telemetry::install_metrics_from_env()?;
    // Reads FAILPOINTS in a build with the `failpoints` feature (the chaos harness's); does
    // nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    let config = payment_svc::Config::parse();
    payment_svc::run(config, orderflow_platform::shutdown_on_signals()).await
}
