use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orderflow_platform::init_logging();
    // Reads FAILPOINTS (e.g. `relay::after_ack_before_mark=pause`) when built with the
    // `failpoints` feature; does nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    let config = relay::Config::parse();
    let shutdown = orderflow_platform::shutdown_on_signals();
    relay::run(config, shutdown).await
}
