//! The frame decoder must never panic, and whatever it accepts must encode back to the
//! same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stallnet::core::frame::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(f.to_vec(), data);
    }
});
