# The orderflow binaries, for docker-compose.yml. The same binaries run in the local stack.
# The image carries libssl-dev and pkg-config: librdkafka's SASL/SCRAM links OpenSSL.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p order-svc -p relay -p ordersctl -p payment-svc -p gateway-sim -p fulfilment

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 orderflow
COPY --from=build /src/target/release/order-svc /src/target/release/order-projector /src/target/release/relay /src/target/release/ordersctl /src/target/release/payment-svc /src/target/release/gateway-sim /src/target/release/fulfilment /usr/local/bin/
USER orderflow
