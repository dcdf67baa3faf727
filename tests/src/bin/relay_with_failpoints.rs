//! The relay binary with failpoints enabled, for the crash tests only. Set e.g.
//! `FAILPOINTS=relay::after_ack_before_mark=pause` to stop it at that line, then kill -9 it.

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orderflow_platform::init_logging();
    let _failpoints = fail::FailScenario::setup();
    let config = relay::Config::parse();
    let shutdown = orderflow_platform::shutdown_on_signals();
    relay::run(config, shutdown).await
}
