//! From the config's classes, rules and uplinks to what the cores run with: the
//! scheduler's per-class modes and QoS parameters, each uplink's class mask and rate
//! bounds, and the ordered rule list (configured rules, the POS-source shortcut, then the
//! built-in ones).

use stallnet_netconf::classes::{default_rules, effective_classes, parse_mac, ClassSpec, Rate};
use stallnet_netconf::UplinkPriority;
use stallnet_netconf::{ClassMode, ClassName, EdgeConfig, Rule, SchedMode, Uplink, UplinkKind};

use crate::core::classify;
use crate::core::qos::{bit, ClassMask, ClassParams, QosConfig, CLASSES};
use crate::core::rate::{RateBounds, RateConfig};
use crate::core::scheduler::{Mode, SchedulerConfig};
use crate::core::Class;

/// The scheduler for these classes; `all_redundant` (mode = "redundant") duplicates every
/// class.
pub fn sched_config(specs: &[ClassSpec], mode: SchedMode) -> SchedulerConfig {
    let mut cfg = SchedulerConfig::default();
    let mut qos = QosConfig::default();
    for s in specs {
        let i = class_of(s.name) as usize;
        if i >= CLASSES {
            continue;
        }
        cfg.modes[i] = match (mode, s.mode) {
            (SchedMode::Redundant, _) | (_, ClassMode::Redundant) => Mode::Redundant,
            (_, ClassMode::LowestLatency) => Mode::LowestLatency,
            (_, ClassMode::Aggregate) => Mode::Aggregate,
        };
        qos.classes[i] = ClassParams {
            weight: s.weight,
            min_rate: s.min_rate.map(|r| r as f64 / 8.0),
            max_rate: s.max_rate.map(|r| r as f64 / 8.0),
        };
    }
    cfg.qos = qos;
    cfg
}

/// The classes an uplink may carry.
pub fn link_mask(specs: &[ClassSpec], u: &Uplink) -> ClassMask {
    let backup = u.priority == UplinkPriority::Backup;
    let cellular = u.kind == UplinkKind::Cellular;
    mask_for(specs, &u.name, backup, u.metered, cellular)
}

pub fn mask_for(
    specs: &[ClassSpec],
    name: &str,
    backup: bool,
    metered: bool,
    cellular: bool,
) -> ClassMask {
    specs
        .iter()
        .filter(|s| s.allows(name, backup, metered, cellular))
        .fold(0, |m, s| m | bit(class_of(s.name)))
}

/// Rate-control bounds of an uplink. A bound the config sets moves the default of the
/// other one out of its way: a SIM throttled to `max_rate = "256kbit"` gets no 500 kbit/s
/// floor, a `min_rate` above 1 Gbit/s raises the ceiling to it.
pub fn rate_config(u: &Uplink) -> RateConfig {
    let d = RateConfig::default();
    let bytes = |r: Rate| r.0 as f64 / 8.0;
    let min = u.min_rate.map(bytes);
    let max = u.max_rate.map(bytes);
    let lo = min.unwrap_or_else(|| max.map_or(d.bounds.min(), |m| d.bounds.min().min(m)));
    let hi = max.unwrap_or_else(|| d.bounds.max().max(lo));
    RateConfig {
        // Validation refuses min_rate above max_rate; were one to come through, the
        // ceiling wins.
        bounds: RateBounds::new(lo.min(hi), hi).unwrap_or(d.bounds),
        initial: max.unwrap_or(d.initial),
        ..d
    }
}

/// The edge's classes with its overrides.
pub fn specs(e: &EdgeConfig) -> Vec<ClassSpec> {
    effective_classes(&e.classes)
}

/// The core's class for a config class name.
pub fn class_of(n: ClassName) -> Class {
    match n {
        ClassName::Pos => Class::Pos,
        ClassName::Stream => Class::Stream,
        ClassName::Interactive => Class::Interactive,
        ClassName::Bulk => Class::Bulk,
        ClassName::Guest => Class::Guest,
    }
}

/// A config rule in the classifier's terms (MAC addresses parsed: validation has
/// refused a malformed one already).
pub fn core_rule(r: &Rule) -> classify::Rule {
    let ports = |v: &[stallnet_netconf::classes::PortRange]| {
        v.iter().map(|p| classify::PortRange(p.0, p.1)).collect()
    };
    classify::Rule {
        class: class_of(r.class),
        macs: r.mac.iter().filter_map(|m| parse_mac(m)).collect(),
        hostnames: r.hostname.clone(),
        interfaces: r.interface.clone(),
        src: r.src.clone(),
        dst: r.dst.clone(),
        hosts: r.host.clone(),
        proto: r.proto.iter().map(|p| p.0).collect(),
        src_port: ports(&r.src_port),
        dst_port: ports(&r.dst_port),
        dscp: r.dscp.clone(),
    }
}

/// Config rules in the classifier's terms, in order.
pub fn core_rules(rules: &[Rule]) -> Vec<classify::Rule> {
    rules.iter().map(core_rule).collect()
}

/// The rules in the order they are tried.
pub fn rules(e: &EdgeConfig) -> Vec<classify::Rule> {
    let mut v: Vec<Rule> = e.rules.iter().map(|r| r.get_ref().clone()).collect();
    if !e.pos_sources.is_empty() {
        v.push(Rule {
            class: ClassName::Pos,
            src: e.pos_sources.clone(),
            ..Default::default()
        });
    }
    if e.default_rules {
        v.extend(default_rules());
    }
    core_rules(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallnet_netconf::classes::ClassesConfig;

    /// The shipped rules and a configured device rule, as the classifier runs them: the
    /// conversion keeps every field the config gives (ports, protocols, hosts, MACs).
    #[test]
    fn config_rules_reach_the_classifier_whole() {
        use crate::core::classify::{Classifier, ClassifyConfig};
        use std::time::Instant;
        let mut rules = vec![Rule {
            class: ClassName::Guest,
            mac: vec!["AA:bb:cc:dd:ee:0f".into()],
            hostname: vec!["Till-1".into()],
            ..Default::default()
        }];
        rules.extend(default_rules());
        let core = core_rules(&rules);
        assert_eq!(core.len(), rules.len());
        assert_eq!(core[0].macs, vec![[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]]);
        assert_eq!(core[1].class, Class::Pos);
        assert!(core[1].hosts.iter().any(|h| h == "*.sumup.com"));
        let mut c = Classifier::new(&core, ClassifyConfig::default());
        let packet = |proto: u8, dport: u16| {
            let b = etherparse::PacketBuilder::ipv4([10, 1, 0, 7], [198, 51, 100, 9], 64);
            let mut out = Vec::new();
            let r = if proto == 17 {
                b.udp(40000, dport).write(&mut out, &[0; 40])
            } else {
                b.tcp(40000, dport, 1, 1000).syn().write(&mut out, &[])
            };
            r.expect("a packet");
            out
        };
        let t = Instant::now();
        let class = |c: &mut Classifier, p: Vec<u8>| c.classify(&p, t).expect("ok").flow_class;
        assert_eq!(class(&mut c, packet(6, 1935)), Class::Stream);
        assert_eq!(class(&mut c, packet(17, 9000)), Class::Stream);
        assert_eq!(class(&mut c, packet(17, 53)), Class::Interactive);
        assert_eq!(class(&mut c, packet(6, 22)), Class::Interactive);
        assert_eq!(class(&mut c, packet(17, 9002)), Class::Bulk);
        // The device rule waits for the driver to resolve the MAC and the host name.
        let devices = c.rules()[0].devices.clone().expect("a device rule");
        assert_eq!(devices.hostnames, vec!["till-1".to_string()]);
    }

    #[test]
    fn masks_follow_the_classes_allowed_uplinks() {
        let specs = effective_classes(&ClassesConfig::default());
        let m = mask_for(&specs, "lte", false, true, true);
        assert_eq!(m & bit(Class::Bulk), 0, "bulk avoids metered");
        assert_ne!(m & bit(Class::Pos), 0);
        let cfg = sched_config(&specs, SchedMode::Aggregate);
        assert_eq!(cfg.modes[Class::Pos as usize], Mode::Redundant);
        assert_eq!(cfg.modes[Class::Stream as usize], Mode::LowestLatency);
        assert_eq!(
            cfg.qos.classes[Class::Stream as usize].min_rate,
            Some(500_000.0)
        );
        let all = sched_config(&specs, SchedMode::Redundant);
        assert!(all.modes.iter().all(|m| *m == Mode::Redundant));
    }

    fn uplink(min: Option<&str>, max: Option<&str>) -> Uplink {
        let rate = |s: &str| s.parse::<Rate>().expect("rate");
        Uplink {
            name: "lte".into(),
            interface: "wwan0".into(),
            kind: UplinkKind::Cellular,
            priority: UplinkPriority::Primary,
            gateway: None,
            metered: false,
            min_rate: min.map(rate),
            max_rate: max.map(rate),
            wifi: None,
            apn: None,
            cap: None,
        }
    }

    #[test]
    fn a_throttled_sim_gets_bounds_that_fit_it() {
        // 256 kbit/s is below the default floor of 500 kbit/s: the floor gives way.
        let r = rate_config(&uplink(None, Some("256kbit")));
        assert_eq!((r.bounds.min(), r.bounds.max()), (32_000.0, 32_000.0));
        assert_eq!(crate::core::rate::RateControl::new(r).rate(), 32_000.0);
        // Above the default ceiling, the ceiling gives way.
        let r = rate_config(&uplink(Some("2gbit"), None));
        assert_eq!(
            (r.bounds.min(), r.bounds.max()),
            (250_000_000.0, 250_000_000.0)
        );
        // Both set, in the wrong order (validation refuses it): no panic, the ceiling wins.
        let r = rate_config(&uplink(Some("10mbit"), Some("1mbit")));
        assert_eq!((r.bounds.min(), r.bounds.max()), (125_000.0, 125_000.0));
        let r = rate_config(&uplink(None, None));
        assert_eq!(r.bounds, RateBounds::DEFAULT);
    }
}
