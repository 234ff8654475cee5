//! The classifier (rules, flow table, DNS learning, the hub's mirroring, download
//! accounting) and the offline answers must never panic on any input.
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use stallnet::core::classify::{Classifier, ClassifyConfig};
use stallnet::core::{packet, Class};
use stallnet_netconf::classes::default_rules;

fuzz_target!(|data: &[u8]| {
    let t = Instant::now();
    let rules = stallnet::classes::core_rules(&default_rules());
    let mut c = Classifier::new(&rules, ClassifyConfig::default());
    let _ = c.classify(data, t);
    c.observe_download(data, t);
    c.learn_dns(data, t);
    c.mirror(data, Class::Pos, t);
    let _ = c.top_flows(3);
    let _ = packet::offline_reply(data, std::net::IpAddr::from([10, 1, 0, 1]));
});
