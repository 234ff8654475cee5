//! The bond state machines (edge and hub) must never panic, nor name a timer in the past,
//! on any sequence of datagrams, TUN packets, link events, time jumps and polls.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rules = stallnet::classes::core_rules(&stallnet_netconf::classes::default_rules());
    stallnet::core::bond::arbitrary::drive(data, &rules);
});
