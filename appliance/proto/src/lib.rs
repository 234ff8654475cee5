//! stallnet's sans-IO cores: every decision the bond makes, as plain state machines.
//!
//! Invariant: nothing in this crate does IO, spawns tasks or reads the clock. Time comes
//! in as `now: Instant` arguments; results come out as return values and `poll_*` calls.
//! The crate depends on no runtime (tokio), no transport (quinn) and no config format
//! (netconf): the daemon turns its config into this crate's types ([`classify::Rule`],
//! [`bond::BondConfig`]) and pumps bytes; the simulator in `tests/` drives the same
//! [`bond::BondState`]. The `serde` feature only derives `Serialize` on status types for
//! the daemon's API.

pub mod bond;
pub mod box_state;
pub mod cap;
pub mod classify;
pub mod fallback;
pub mod frame;
pub mod handshake_guard;
pub mod health;
pub mod hub_choice;
pub mod inflight;
pub mod lan_map;
pub mod packet;
pub mod qos;
pub mod rate;
pub mod reach;
pub mod reorder;
pub mod scheduler;
pub mod source_cap;
pub mod uplink;

/// Traffic class of a packet (decided by [`classify`], queued by [`qos`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Class {
    Pos = 0,
    Stream = 1,
    Interactive = 2,
    #[default]
    Bulk = 3,
    Guest = 4,
}

impl Class {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Pos,
            1 => Self::Stream,
            2 => Self::Interactive,
            3 => Self::Bulk,
            4 => Self::Guest,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Pos => "pos",
            Self::Stream => "stream",
            Self::Interactive => "interactive",
            Self::Bulk => "bulk",
            Self::Guest => "guest",
        }
    }
}
