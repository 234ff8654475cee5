//! From the config's classes, rules and uplinks to what the cores run with: the
//! scheduler's per-class modes and QoS parameters, each uplink's class mask and rate
//! bounds, and the ordered rule list (configured rules, the POS-source shortcut, then the
//! built-in ones).

use stallnet_netconf::classes::{default_rules, effective_classes, ClassSpec, Rate};
use stallnet_netconf::UplinkPriority;
use stallnet_netconf::{ClassMode, ClassName, EdgeConfig, Rule, SchedMode, Uplink, UplinkKind};

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
        let i = Class::from_name(s.name) as usize;
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
        .fold(0, |m, s| m | bit(Class::from_name(s.name)))
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

/// The rules in the order they are tried.
pub fn rules(e: &EdgeConfig) -> Vec<Rule> {
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
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallnet_netconf::classes::ClassesConfig;

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
