//! stallnet's test ground: network-namespace topologies ([`topo`]), the userspace link
//! emulator ([`linkemu`]) and the deterministic simulator for the cores ([`sim`]). The
//! binaries in `src/bin/` (link emulator, traffic tool, benchmark runner, lab) and the
//! tests in `tests/` are built on them.

pub mod linkemu;
pub mod sim;
pub mod topo;
