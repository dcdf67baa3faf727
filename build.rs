//! Compiles the published language in `proto/` with protox (a pure-Rust protobuf
//! compiler: no system `protoc`), then generates prost messages and tonic stubs.

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/orderflow/orders/v1/orders.proto",
    "proto/orderflow/events/v1/events.proto",
    "proto/orderflow/gateway/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // tonic-prost-build writes no descriptor set when it is handed descriptors, so the ones
    // tonic-reflection serves are written here. Each server's reflection describes what that
    // server serves and nothing else: its own file with its services, the files it imports
    // with their services removed (the gateway's API imports Money from the orders API, not
    // the OrderService).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The events' descriptors, whole: tools print events in the proto3 JSON mapping from them
    // (`ordersctl events --json`).
    std::fs::write(
        out_dir.join("events_descriptor.bin"),
        protox::compile(["proto/orderflow/events/v1/events.proto"], ["proto"])?.encode_to_vec(),
    )?;
    for (name, served) in [
        ("orders_descriptor.bin", "orderflow/orders/v1/orders.proto"),
        ("gateway_descriptor.bin", "orderflow/gateway/v1/gateway.proto"),
    ] {
        let mut set = protox::compile([format!("proto/{served}")], ["proto"])?;
        for file in &mut set.file {
            if file.name() != served {
                file.service.clear();
            }
        }
        std::fs::write(out_dir.join(name), set.encode_to_vec())?;
    }
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
