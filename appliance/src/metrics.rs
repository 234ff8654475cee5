//! Prometheus metrics (text exposition, prometheus-client) built from the daemon's status
//! snapshot at each scrape, served on the configured `[metrics] listen` address:
//! per uplink state, RTT, jitter, loss, rates and bytes; per class packets, bytes, drops
//! and queue delay; outbox depth and oldest age; the tunnel's state.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::control::Daemon;
use crate::status::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    device: String,
    uplink: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkStateLabels {
    device: String,
    uplink: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    device: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    device: String,
    class: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    device: String,
    class: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StallLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StallStateLabels {
    device: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

const LINK_STATES: [&str; 6] = ["up", "suspect", "down", "probing", "absent", "disabled"];

/// The exposition text for one snapshot.
pub fn render(s: &Status) -> String {
    let mut reg = Registry::with_prefix("stallnet");
    let info = Family::<RoleLabels, Gauge>::default();
    info.get_or_create(&RoleLabels {
        role: s.role.clone(),
    })
    .set(1);
    reg.register("info", "The running role", info);
    let online = Gauge::<i64>::default();
    online.set(i64::from(s.state != "offline"));
    reg.register(
        "tunnel_online",
        "1 when at least one uplink reaches the peer (edge: the hub; hub: any device)",
        online,
    );
    let degraded = Gauge::<i64>::default();
    degraded.set(i64::from(s.state == "degraded"));
    reg.register("tunnel_degraded", "1 when some uplinks are down", degraded);

    let up = Family::<LinkLabels, Gauge>::default();
    let state = Family::<LinkStateLabels, Gauge>::default();
    let rtt = Family::<LinkLabels, GaugeF>::default();
    let jitter = Family::<LinkLabels, GaugeF>::default();
    let loss = Family::<LinkLabels, GaugeF>::default();
    let rate = Family::<LinkLabels, GaugeF>::default();
    let capacity = Family::<LinkLabels, GaugeF>::default();
    let cap_used = Family::<LinkLabels, Gauge>::default();
    let cap_limit = Family::<LinkLabels, Gauge>::default();
    let tx_bytes = Family::<LinkLabels, Counter>::default();
    let rx_bytes = Family::<LinkLabels, Counter>::default();
    let tx_packets = Family::<LinkLabels, Counter>::default();
    let rx_packets = Family::<LinkLabels, Counter>::default();
    let c_packets = Family::<ClassLabels, Counter>::default();
    let c_bytes = Family::<ClassLabels, Counter>::default();
    let c_drops = Family::<DropLabels, Counter>::default();
    let c_delay = Family::<QuantileLabels, GaugeF>::default();
    let c_queued = Family::<ClassLabels, Gauge>::default();

    for (device, b) in bonds(s) {
        for l in b["links"].as_array().into_iter().flatten() {
            let name = l["name"].as_str().unwrap_or("?").to_string();
            let ll = LinkLabels {
                device: device.clone(),
                uplink: name.clone(),
                kind: l["kind"].as_str().unwrap_or("unknown").to_string(),
            };
            let st = l["state"].as_str().unwrap_or("?");
            up.get_or_create(&ll).set(i64::from(st == "up"));
            for candidate in LINK_STATES {
                state
                    .get_or_create(&LinkStateLabels {
                        device: device.clone(),
                        uplink: name.clone(),
                        state: candidate.into(),
                    })
                    .set(i64::from(st == candidate));
            }
            if let Some(r) = l["rtt_ms"].as_f64() {
                rtt.get_or_create(&ll).set(r / 1e3);
            }
            jitter
                .get_or_create(&ll)
                .set(l["jitter_ms"].as_f64().unwrap_or(0.0) / 1e3);
            loss.get_or_create(&ll)
                .set(l["loss"].as_f64().unwrap_or(0.0));
            rate.get_or_create(&ll)
                .set(l["rate_mbps"].as_f64().unwrap_or(0.0) * 1e6);
            capacity
                .get_or_create(&ll)
                .set(l["capacity_mbps"].as_f64().unwrap_or(0.0) * 1e6);
            if let (Some(u), Some(lim)) = (
                l["cap"]["used_bytes"].as_i64(),
                l["cap"]["limit_bytes"].as_i64(),
            ) {
                cap_used.get_or_create(&ll).set(u);
                cap_limit.get_or_create(&ll).set(lim);
            }
            let n = |k: &str| l[k].as_u64().unwrap_or(0);
            tx_bytes.get_or_create(&ll).inc_by(n("tx_bytes"));
            rx_bytes.get_or_create(&ll).inc_by(n("rx_bytes"));
            tx_packets.get_or_create(&ll).inc_by(n("tx_packets"));
            rx_packets.get_or_create(&ll).inc_by(n("rx_packets"));
        }
        for c in b["classes"].as_array().into_iter().flatten() {
            let class = c["class"].as_str().unwrap_or("?").to_string();
            let cl = ClassLabels {
                device: device.clone(),
                class: class.clone(),
            };
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            c_packets.get_or_create(&cl).inc_by(n("packets"));
            c_bytes.get_or_create(&cl).inc_by(n("bytes"));
            c_queued
                .get_or_create(&cl)
                .set(i64::try_from(n("queued_packets")).unwrap_or(i64::MAX));
            for (reason, key) in [
                ("full", "dropped_full"),
                ("codel", "dropped_codel"),
                ("sojourn", "dropped_sojourn"),
            ] {
                c_drops
                    .get_or_create(&DropLabels {
                        device: device.clone(),
                        class: class.clone(),
                        reason: reason.into(),
                    })
                    .inc_by(n(key));
            }
            for (q, key) in [("0.5", "delay_p50_ms"), ("0.99", "delay_p99_ms")] {
                if let Some(v) = c[key].as_f64() {
                    c_delay
                        .get_or_create(&QuantileLabels {
                            device: device.clone(),
                            class: class.clone(),
                            quantile: q.into(),
                        })
                        .set(v / 1e3);
                }
            }
        }
    }
    reg.register("uplink_up", "1 when the uplink carries traffic", up);
    reg.register(
        "uplink_state",
        "1 for the uplink's current state (up, suspect, down, probing, absent, disabled)",
        state,
    );
    reg.register_with_unit("uplink_rtt", "Smoothed round-trip time", Unit::Seconds, rtt);
    reg.register_with_unit("uplink_jitter", "RTT variation", Unit::Seconds, jitter);
    reg.register("uplink_loss_ratio", "Share of recent probes lost", loss);
    reg.register(
        "uplink_send_rate_bits_per_second",
        "What rate control lets this end send",
        rate,
    );
    reg.register(
        "uplink_capacity_bits_per_second",
        "Measured delivery capacity",
        capacity,
    );
    reg.register_with_unit(
        "uplink_sent",
        "Bytes sent on the uplink (tunnel overhead included)",
        Unit::Bytes,
        tx_bytes,
    );
    reg.register_with_unit(
        "uplink_received",
        "Bytes received on the uplink (tunnel overhead included)",
        Unit::Bytes,
        rx_bytes,
    );
    reg.register(
        "uplink_sent_packets",
        "Packets sent on the uplink",
        tx_packets,
    );
    reg.register(
        "uplink_received_packets",
        "Packets received on the uplink",
        rx_packets,
    );
    reg.register("class_packets", "Packets of the class", c_packets);
    reg.register_with_unit("class", "Bytes of the class", Unit::Bytes, c_bytes);
    reg.register(
        "class_dropped_packets",
        "Packets dropped, by reason",
        c_drops,
    );
    reg.register_with_unit(
        "class_queue_delay",
        "Queue delay quantiles since start",
        Unit::Seconds,
        c_delay,
    );
    reg.register("class_queued_packets", "Packets waiting now", c_queued);

    if let Some(bps) = s
        .stream_advice
        .as_ref()
        .and_then(|a| a["bitrate_bps"].as_f64())
    {
        let g = GaugeF::default();
        g.set(bps);
        reg.register(
            "stream_advice_bits_per_second",
            "The bitrate a live-stream encoder can use now",
            g,
        );
    }
    if let Some(c) = &s.commerce {
        let depth = Gauge::<i64>::default();
        depth.set(c["undelivered"].as_i64().unwrap_or(0));
        reg.register(
            "outbox_undelivered",
            "Sales and events waiting to upload",
            depth,
        );
        let age = Gauge::<i64>::default();
        age.set(c["oldest_undelivered_age_s"].as_i64().unwrap_or(0));
        reg.register_with_unit(
            "outbox_oldest_age",
            "Age of the oldest undelivered record (0 when none)",
            Unit::Seconds,
            age,
        );
        let dead = Gauge::<i64>::default();
        dead.set(c["dead_letters"].as_i64().unwrap_or(0));
        reg.register("outbox_dead_letters", "Records the upstream refused", dead);
    }
    if let Some(stalls) = s.stalls.as_ref().and_then(|v| v.as_array()) {
        stall_metrics(&mut reg, stalls);
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::warn!("metrics encoding: {e}");
    }
    out
}

/// The hub's fleet, per stall: its state and what its box last reported (a box that
/// reports nothing has no outbox series).
fn stall_metrics(reg: &mut Registry, stalls: &[Value]) {
    let state = Family::<StallStateLabels, Gauge>::default();
    let waiting = Family::<StallLabels, Gauge>::default();
    let oldest = Family::<StallLabels, Gauge>::default();
    let dead = Family::<StallLabels, Gauge>::default();
    let as_i64 = |v: &Value| v.as_u64().map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    for r in stalls {
        let device = r["name"].as_str().unwrap_or("?").to_string();
        for candidate in ["online", "degraded", "offline"] {
            state
                .get_or_create(&StallStateLabels {
                    device: device.clone(),
                    state: candidate.into(),
                })
                .set(i64::from(r["state"] == candidate));
        }
        let l = StallLabels { device };
        if let Some(n) = as_i64(&r["sales_waiting"]) {
            waiting.get_or_create(&l).set(n);
            dead.get_or_create(&l)
                .set(as_i64(&r["dead_letters"]).unwrap_or(0));
            oldest
                .get_or_create(&l)
                .set(as_i64(&r["oldest_waiting_s"]).unwrap_or(0));
        }
    }
    reg.register(
        "stall_state",
        "1 for the stall's current state (online, degraded, offline)",
        state,
    );
    reg.register(
        "stall_outbox_undelivered",
        "Sales and events waiting on the stall's box, as it last reported",
        waiting,
    );
    reg.register_with_unit(
        "stall_outbox_oldest_age",
        "Age of the oldest record waiting on the stall's box (0 when none)",
        Unit::Seconds,
        oldest,
    );
    reg.register(
        "stall_outbox_dead_letters",
        "Records the upstream refused, on the stall's box",
        dead,
    );
}

/// (device, bond) pairs: the edge's one bond is device "local".
fn bonds(s: &Status) -> Vec<(String, &Value)> {
    s.bonds
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let device = if s.role == "edge" {
                "local"
            } else {
                k.as_str()
            };
            (device.to_string(), v)
        })
        .collect()
}

/// Serves `GET /metrics` on `listen` until cancelled (retrying the bind while the
/// address does not exist yet).
pub async fn serve(
    listen: SocketAddr,
    daemon: Arc<dyn Daemon>,
    cancel: CancellationToken,
) -> Result<()> {
    let listener = loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(%listen, "metrics cannot listen yet ({e}); retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
        }
    };
    tracing::info!(%listen, "metrics on /metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let d = daemon.clone();
            async move {
                match d.snapshot() {
                    Some(s) => (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(&s),
                    )
                        .into_response(),
                    None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .context("metrics server")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub's fleet appears per stall: its state, and the outbox its box reported (a box
    /// that reports nothing has no outbox series, rather than a false 0).
    #[test]
    fn a_hubs_stalls_have_their_state_and_sales_waiting() -> anyhow::Result<()> {
        let s: Status = serde_json::from_value(serde_json::json!({
            "version": 1, "role": "hub", "state": "degraded", "fallback_active": false,
            "tunnel_address": null, "refused_handshakes": 0, "bonds": {},
            "uptime_s": 5, "clock": "synced",
            "stalls": [
                { "name": "fish", "state": "offline", "sales_waiting": 12,
                  "dead_letters": 1, "oldest_waiting_s": 600 },
                { "name": "bread", "state": "online" },
            ],
        }))?;
        let text = render(&s);
        for line in [
            r#"stallnet_stall_state{device="fish",state="offline"} 1"#,
            r#"stallnet_stall_state{device="fish",state="online"} 0"#,
            r#"stallnet_stall_state{device="bread",state="online"} 1"#,
            r#"stallnet_stall_outbox_undelivered{device="fish"} 12"#,
            r#"stallnet_stall_outbox_dead_letters{device="fish"} 1"#,
            r#"stallnet_stall_outbox_oldest_age_seconds{device="fish"} 600"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(
            !text.contains(r#"stallnet_stall_outbox_undelivered{device="bread"}"#),
            "{text}"
        );
        Ok(())
    }
}
