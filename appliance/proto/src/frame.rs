//! The wire format inside one QUIC DATAGRAM frame.
//!
//! ```text
//! byte 0      version (high nibble, = 1) | type (low nibble)
//! Data:       class u8 | seq u64 BE | IP packet
//! Probe:      id u32 BE | echo u64 BE (sender's timestamp)
//! ProbeAck:   id u32 BE | echo u64 BE (returned unchanged) | rx_us u64 BE (the answering
//!             end's clock when the probe arrived: a one-way delay sample, up to a constant
//!             clock offset, for the prober's rate control)
//! Report:     rx_bytes u64 BE | at_us u64 BE (the receiver's UDP byte count on this
//!             connection and its clock, for the sender's in-flight and rate estimate)
//!             [| delivered u64 BE (the highest Data sequence number received on this
//!             connection; only to a peer whose session version reads it, 3 and up)]
//! ```
//!
//! Decoding is strict: a wrong version, an unknown type or class, a short header or an
//! empty payload is an error, never a panic.

use super::Class;

pub const VERSION: u8 = 1;
/// Bytes a Data frame adds in front of the IP packet.
pub const DATA_OVERHEAD: usize = 10;
const PROBE_LEN: usize = 13;
const PROBE_ACK_LEN: usize = 21;
const REPORT_LEN: usize = 17;
/// A report with the highest delivered sequence number.
const REPORT_SEQ_LEN: usize = 25;

const T_DATA: u8 = 0;
const T_PROBE: u8 = 1;
const T_PROBE_ACK: u8 = 2;
const T_REPORT: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A tunnelled IP packet with its bond-wide sequence number.
    Data {
        class: Class,
        seq: u64,
        packet: &'a [u8],
    },
    /// A liveness probe; the peer answers with a [`Frame::ProbeAck`] carrying the same fields.
    Probe {
        id: u32,
        echo: u64,
    },
    ProbeAck {
        id: u32,
        echo: u64,
        rx_us: u64,
    },
    /// What the receiver has received on this connection, and when (its clock).
    Report {
        rx_bytes: u64,
        at_us: u64,
        /// The highest Data sequence number received on this connection, if any (and if
        /// the peer reads it): everything the sender put on the link before that packet
        /// has arrived or was lost on the way, so a resend when the link fails starts
        /// after it.
        delivered: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty datagram")]
    Empty,
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("unknown frame type {0}")]
    Type(u8),
    #[error("unknown traffic class {0}")]
    Class(u8),
    #[error("frame shorter than its header ({0} bytes)")]
    Short(usize),
    #[error("probe frame of {0} bytes, expected 13")]
    ProbeLength(usize),
    #[error("report frame of {0} bytes, expected 17 or 25")]
    ReportLength(usize),
}

impl<'a> Frame<'a> {
    pub fn decode(buf: &'a [u8]) -> Result<Self, FrameError> {
        let first = *buf.first().ok_or(FrameError::Empty)?;
        let (version, ty) = (first >> 4, first & 0x0f);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        match ty {
            T_DATA => {
                if buf.len() <= DATA_OVERHEAD {
                    return Err(FrameError::Short(buf.len()));
                }
                let class = Class::from_u8(buf[1]).ok_or(FrameError::Class(buf[1]))?;
                let seq = u64::from_be_bytes(array(&buf[2..10]));
                Ok(Frame::Data {
                    class,
                    seq,
                    packet: &buf[DATA_OVERHEAD..],
                })
            }
            T_PROBE | T_PROBE_ACK => {
                let want = if ty == T_PROBE {
                    PROBE_LEN
                } else {
                    PROBE_ACK_LEN
                };
                if buf.len() != want {
                    return Err(FrameError::ProbeLength(buf.len()));
                }
                let id = u32::from_be_bytes(array(&buf[1..5]));
                let echo = u64::from_be_bytes(array(&buf[5..13]));
                Ok(if ty == T_PROBE {
                    Frame::Probe { id, echo }
                } else {
                    let rx_us = u64::from_be_bytes(array(&buf[13..21]));
                    Frame::ProbeAck { id, echo, rx_us }
                })
            }
            T_REPORT => {
                let delivered = match buf.len() {
                    REPORT_LEN => None,
                    REPORT_SEQ_LEN => Some(u64::from_be_bytes(array(&buf[17..25]))),
                    n => return Err(FrameError::ReportLength(n)),
                };
                Ok(Frame::Report {
                    rx_bytes: u64::from_be_bytes(array(&buf[1..9])),
                    at_us: u64::from_be_bytes(array(&buf[9..17])),
                    delivered,
                })
            }
            other => Err(FrameError::Type(other)),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Frame::Data { class, seq, packet } => {
                out.reserve(DATA_OVERHEAD + packet.len());
                out.push(VERSION << 4 | T_DATA);
                out.push(class as u8);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(packet);
            }
            Frame::Probe { id, echo } => {
                out.push(VERSION << 4 | T_PROBE);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&echo.to_be_bytes());
            }
            Frame::ProbeAck { id, echo, rx_us } => {
                out.push(VERSION << 4 | T_PROBE_ACK);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&echo.to_be_bytes());
                out.extend_from_slice(&rx_us.to_be_bytes());
            }
            Frame::Report {
                rx_bytes,
                at_us,
                delivered,
            } => {
                out.push(VERSION << 4 | T_REPORT);
                out.extend_from_slice(&rx_bytes.to_be_bytes());
                out.extend_from_slice(&at_us.to_be_bytes());
                if let Some(seq) = delivered {
                    out.extend_from_slice(&seq.to_be_bytes());
                }
            }
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Copies a slice whose length the caller has already checked into an array.
fn array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn data_round_trip() {
        let f = Frame::Data {
            class: Class::Pos,
            seq: 0x0102_0304_0506_0708,
            packet: &[0x45, 0, 0, 20],
        };
        let v = f.to_vec();
        assert_eq!(v.len(), DATA_OVERHEAD + 4);
        assert_eq!(Frame::decode(&v), Ok(f));
    }

    #[test]
    fn probe_round_trip() {
        for f in [
            Frame::Probe { id: 7, echo: 99 },
            Frame::ProbeAck {
                id: u32::MAX,
                echo: u64::MAX,
                rx_us: 5,
            },
            Frame::Report {
                rx_bytes: 123_456,
                at_us: 42,
                delivered: None,
            },
            Frame::Report {
                rx_bytes: 7,
                at_us: 9,
                delivered: Some(u64::MAX - 1),
            },
        ] {
            assert_eq!(Frame::decode(&f.to_vec()), Ok(f));
        }
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[0x20, 0]), Err(FrameError::Version(2)));
        assert_eq!(Frame::decode(&[0x1f]), Err(FrameError::Type(15)));
        assert_eq!(Frame::decode(&[0x10, 0, 1]), Err(FrameError::Short(3)));
        assert_eq!(
            Frame::decode(&[0x10, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(FrameError::Class(9))
        );
        assert_eq!(Frame::decode(&[0x11, 0]), Err(FrameError::ProbeLength(2)));
        assert_eq!(Frame::decode(&[0x13; 5]), Err(FrameError::ReportLength(5)));
        // Between the two report forms, or past the longer one.
        assert_eq!(
            Frame::decode(&[0x13; 21]),
            Err(FrameError::ReportLength(21))
        );
        assert_eq!(
            Frame::decode(&[0x13; 26]),
            Err(FrameError::ReportLength(26))
        );
        // A data frame must carry a packet.
        assert_eq!(Frame::decode(&[0x10; 10]), Err(FrameError::Short(10)));
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_reencodes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(f) = Frame::decode(&bytes) {
                prop_assert_eq!(f.to_vec(), bytes);
            }
        }
    }
}
