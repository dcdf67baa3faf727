//! orderflow's published language: the gRPC API (`orders::v1`), the versioned events
//! (`events::v1`) and the envelope codec every producer and consumer shares.
//!
//! This crate holds only contracts: no database, broker or server code.

pub mod envelope;
pub mod money;
mod stored_names;
pub mod text;

/// Generated from `proto/orderflow/orders/v1/orders.proto`.
pub mod orders {
    pub mod v1 {
        tonic::include_proto!("orderflow.orders.v1");
    }
}

/// Generated from `proto/orderflow/events/v1/events.proto`.
pub mod events {
    pub mod v1 {
        tonic::include_proto!("orderflow.events.v1");
    }
}

/// Generated from `proto/orderflow/gateway/v1/gateway.proto`: the card processor's API.
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("orderflow.gateway.v1");
    }
}

/// What the order service's reflection describes: the orders API (its imports without
/// services).
pub const ORDERS_FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/orders_descriptor.bin"));

/// What the gateway's reflection describes: the gateway API (its imports without services).
pub const GATEWAY_FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gateway_descriptor.bin"));

/// The events' schema (events.proto and its imports), for tools that print events in the
/// proto3 JSON mapping.
pub const EVENTS_FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/events_descriptor.bin"));

/// Kafka topic names. Every record on them is an encoded [`events::v1::EventEnvelope`]
/// keyed by the order id.
pub mod topics {
    /// Events of the order service.
    pub const ORDERS_EVENTS: &str = "orders.events";
    /// Events of the payment service.
    pub const PAYMENTS_EVENTS: &str = "payments.events";
    /// Events of the inventory service.
    pub const INVENTORY_EVENTS: &str = "inventory.events";
    /// The dead-letter topic of `topic`.
    pub fn dead_letter(topic: &str) -> String {
        format!("{topic}.dlq")
    }
}
