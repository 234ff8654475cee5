//! stallnet: the appliance daemon (edge and hub roles) and its CLI.
//!
//! Layout:
//! - [`core`]: the `stallnet-proto` crate (`appliance/proto`), sans-IO state machines (the
//!   bond, frame codec, classifier, class queues, link health, rate control, scheduler,
//!   reorder, packet edits). No IO, no clock.
//! - [`classes`]: the config's classes, rules and uplinks turned into core parameters.
//! - [`identity`]: device keys, certificates and the pinned-identity TLS configuration.
//! - [`driver`]: tokio code that moves bytes between the TUN device, QUIC and the kernel.
//! - [`edge`], [`hub`]: the two roles, wiring drivers to cores; [`lan_setup`]: the
//!   config's LAN in the kernel and in dnsmasq.
//! - [`status`]: the status document both roles publish.
//! - [`confirm`], [`boot_import`]: the confirmed commit's rollback guard; the config
//!   imported from the SD card's boot partition.
//! - [`config_cmd`]: the `stallnet config` verbs (also used by the daemon to pin an
//!   enrolled hub).
//! - [`control`]: the control API on a Unix socket; [`events`]: the event log it serves;
//!   [`metrics`]: Prometheus metrics.

pub mod boot_import;
pub mod cap_meter;
pub mod classes;
pub mod clock;
pub mod commerce;
pub mod config_cmd;
pub mod config_lock;
pub mod confirm;
pub mod control;
pub mod control_client;
/// The sans-IO cores live in their own crate (`appliance/proto`); `crate::core` names it.
pub use stallnet_proto as core;
pub mod driver;
pub mod edge;
pub mod enroll;
pub mod events;
pub mod hub;
pub mod hub_isolation;
pub mod identity;
pub mod lan_cap;
pub mod lan_setup;
pub mod log_limit;
pub mod metrics;
pub mod modem;
pub mod plan;
pub mod reach_probe;
pub mod service;
pub mod status;
pub mod wifi_link;

/// Locks, going on with the data of a poisoned lock (a panic elsewhere is a bug; the
/// router keeps routing).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
