use anyhow::Context as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: gateway_sim::Config = orderflow_platform::config::parse();
    let _telemetry = orderflow_platform::telemetry::init("gateway-sim", &config.telemetry);
    config.telemetry.install()?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    gateway_sim::run(config, listener, orderflow_platform::shutdown_on_signals()).await
}
