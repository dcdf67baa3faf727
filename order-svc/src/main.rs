use anyhow::Context as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: order_svc::Config = orderflow_platform::config::parse();
    let _telemetry = orderflow_platform::telemetry::init("order-svc", &config.telemetry);
    config.telemetry.install()?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    let shutdown = orderflow_platform::shutdown_on_signals();
    order_svc::run(config, listener, shutdown).await
}
