//! stallnet configuration: the schema of `stallnet.toml`, parsing with exact error
//! positions (file:line:col) and semantic validation.
//!
//! Layout:
//! - [`schema`]: the typed configuration (serde, unknown fields refused).
//! - [`classes`]: traffic classes, classification rules and their built-in defaults.
//! - [`load`]: reading a file, turning parse and semantic errors into [`ConfigError`]s that
//!   carry the file, line, column, field path and what was expected.
//! - [`lan`]: the LAN section and the dnsmasq configuration rendered from it.
//! - [`docs`]: the JSON Schema and `docs/CONFIG.md`, generated from the types.
//! - [`firewall`]: the edge's nftables ruleset rendered from the config.
//! - [`wifi`]: the wpa_supplicant configuration of a wifi uplink.
//! - [`grammar`]: what the kernel, dnsmasq and nft accept as names, host names and paths
//!   (validation and the renderers both check with it).
//! - [`revisions`]: numbered revisions on disk and the confirmed commit (rollback unless
//!   confirmed in time).
//! - [`edit`]: scripted edits (`get PATH`, `set PATH=VALUE`) that keep comments, and the
//!   difference between two configs as field paths.
//!
//! Invariant: a config is either accepted whole or refused whole; every error is reported
//! at once, never only the first.

pub mod classes;
pub mod docs;
pub mod edit;
pub mod firewall;
pub mod grammar;
pub mod lan;
pub mod lan_map;
pub mod load;
pub mod revisions;
pub mod schema;
pub mod wifi;

pub use classes::{ClassMode, ClassName, ClassPath, ClassSpec, Rule};
pub use load::{load_file, parse_str, ConfigError, ConfigErrors};
pub use schema::*;
