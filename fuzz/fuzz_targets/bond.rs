//! The bond state machines (edge and hub) must never panic, nor name a timer in the past,
//! on any sequence of datagrams, TUN packets, link events, time jumps and polls.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stallnet::core::bond::arbitrary::drive(data);
});
