//! The vigil collector: agents push events, detections and evidence over
//! gRPC with mutual TLS ([`ingest`], identities from [`pki`] via [`auth`]);
//! the collector indexes them ([`store`]), keeps evidence bytes
//! content-addressed ([`blobs`]), groups detections into incidents
//! ([`incident`]) and serves them to analysts ([`query`]). The `vigil` CLI
//! is built on [`client`], [`render`] and [`evidence`]; [`server`] wires
//! it all for `vigil-collector serve`, [`metrics`] counts it, [`web`] is
//! the incident UI.
//!
//! Data flows one way: ingest -> store/blobs -> query. Nothing here is
//! shared with the agent except the wire schema (`vigil-proto`).

#![warn(missing_docs)]

pub mod auth;
pub mod blobs;
pub mod client;
pub mod evidence;
pub mod incident;
pub mod ingest;
pub mod metrics;
pub mod origin;
pub mod pki;
pub mod query;
pub mod quota;
pub mod render;
pub mod revoke;
pub mod server;
pub mod slots;
pub mod store;
pub mod web;
