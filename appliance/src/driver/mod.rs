//! Tokio drivers: they move bytes between the kernel, QUIC and the cores, and decide
//! nothing themselves.

pub mod bond;
pub mod kernel;
pub mod lan;
pub mod netlink;
pub mod session;
pub mod sys;
pub mod tun_io;
