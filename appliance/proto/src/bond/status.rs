//! What a bond shows of itself: typed figures for the status document, the dashboard and
//! the metrics (serialized by the API layer as they are).

use super::link::LinkCondition;
use crate::classify::ClassifyStats;
use crate::qos::ClassStats;
use crate::reorder::ReorderStats;
use crate::scheduler::SchedStats;

#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LinkStatus {
    pub name: String,
    pub state: LinkCondition,
    pub connected: bool,
    pub backup: bool,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss: f64,
    pub capacity_mbps: f64,
    pub in_flight_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub probes_sent: u64,
    pub probes_lost: u64,
    pub flaps: u32,
    /// Times the uplink turned Suspect (a probe overdue, or its delivery reports silent).
    pub suspects: u64,
    /// Of those, the times its delivery reports fell silent first.
    pub silences: u64,
    pub degraded: bool,
    /// Whether point-of-sale traffic may use the uplink now (its classes, and the HTTPS
    /// reachability check).
    pub carries_pos: bool,
    /// What rate control lets this end send on the uplink.
    pub rate_mbps: f64,
    pub queue_delay_ms: f64,
    pub rate_decreases: u64,
    /// The largest tunnelled packet the uplink's connection carries now (its path-MTU
    /// discovery's datagram size less the bond's frame header); absent while unconnected.
    pub max_packet: Option<usize>,
    /// Its connection's path-MTU discovery has had its time: `max_packet` counts in the
    /// tunnel's path MTU.
    pub mtu_settled: bool,
    /// UDP datagrams the connection sent per system call (above 1 when the transport
    /// batches them with segmentation offload); 0 before the first.
    pub tx_datagrams_per_send: f64,
}

#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FlowStatus {
    pub flow: String,
    pub class: &'static str,
    pub bytes: u64,
    pub packets: u64,
    pub age_s: f64,
    /// The uplink a lowest-latency flow is pinned to; absent for spread or duplicated ones.
    pub uplink: Option<String>,
}

/// Packets the bond counted and dropped (or answered) instead of carrying.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets from the TUN that could not be classified (not IP, truncated).
    pub malformed: u64,
    /// POS packets answered at once (RST / unreachable) because nothing reached the peer.
    pub refused_offline: u64,
    /// Datagrams from the peer that are not a valid frame.
    pub bad_frames: u64,
    /// Packets too large for the uplinks' datagrams: answered with ICMP "too big", or
    /// dropped unanswered when the only uplink's smaller size has not settled yet.
    pub too_big: u64,
    /// IPv4 packets (without "don't fragment") cut to fit the uplinks' datagrams.
    pub fragmented: u64,
    /// Packets too large for the link that took them, sent on another that carries them.
    pub handed_over: u64,
    /// Packets from the peer with a source it may not use.
    pub spoofed: u64,
    /// Released packets the TUN writer had no room for.
    pub tun_overflow: u64,
}

#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BondStatus {
    pub online: bool,
    pub links: Vec<LinkStatus>,
    pub scheduler: SchedStats,
    pub classes: Vec<ClassStats>,
    pub classify: ClassifyStats,
    pub top_flows: Vec<FlowStatus>,
    /// Packets that could not be classified (not IP, truncated): dropped.
    pub malformed: u64,
    /// POS packets answered at once (RST / unreachable) because nothing reached the peer.
    pub refused_offline: u64,
    pub reorder: ReorderStats,
    pub reorder_hold_ms: f64,
    pub bad_frames: u64,
    pub too_big: u64,
    pub fragmented: u64,
    pub handed_over: u64,
    /// The tunnel's MTU now (see `BondState::path_mtu`): what TCP's MSS is clamped to.
    pub path_mtu: usize,
    pub spoofed: u64,
    pub tun_overflow: u64,
}
