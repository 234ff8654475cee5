//! Which connection attempts the hub takes on while handshakes pile up: each handshake in
//! progress holds a connection's state until it finishes or times out, so a flood of
//! half-open handshakes from strangers would grow the hub's memory without bound and
//! starve the stalls it serves. Past a few in progress, an attempt from an address not
//! yet validated gets a stateless QUIC Retry (the hub keeps nothing until the client
//! proves it receives at its address: a spoofed or one-way flood ends there); past the
//! ceiling, attempts are refused outright until the backlog drains. An admitted stall
//! reconnecting meanwhile pays one more round trip, and never more than the ceiling
//! lets in.

/// What to do with one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Accept,
    /// Answer with a Retry; keep no state.
    Retry,
    /// Refuse at once.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeGuard {
    /// From this many handshakes in progress, unvalidated addresses get a Retry.
    pub retry_from: usize,
    /// From this many, every attempt is refused.
    pub refuse_from: usize,
}

impl Default for HandshakeGuard {
    /// 32 in progress before Retry (a hub restart's reconnecting stalls get through at
    /// once in a small market, with one more round trip in a large one); 2 048 at most
    /// (a few MB of handshake state).
    fn default() -> Self {
        Self {
            retry_from: 32,
            refuse_from: 2048,
        }
    }
}

impl HandshakeGuard {
    /// The verdict for an attempt while `in_progress` handshakes run; `validated`: the
    /// client already answered a Retry (its address is real).
    pub fn decide(&self, in_progress: usize, validated: bool) -> Admit {
        if in_progress >= self.refuse_from {
            Admit::Refuse
        } else if in_progress >= self.retry_from && !validated {
            Admit::Retry
        } else {
            Admit::Accept
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_hub_accepts_a_busy_one_retries_a_flooded_one_refuses() {
        let g = HandshakeGuard::default();
        assert_eq!(g.decide(0, false), Admit::Accept);
        assert_eq!(g.decide(31, false), Admit::Accept);
        assert_eq!(g.decide(32, false), Admit::Retry);
        // A client that answered the Retry is taken while there is room.
        assert_eq!(g.decide(32, true), Admit::Accept);
        assert_eq!(g.decide(2047, true), Admit::Accept);
        assert_eq!(g.decide(2048, true), Admit::Refuse);
        assert_eq!(g.decide(usize::MAX, false), Admit::Refuse);
    }
}
