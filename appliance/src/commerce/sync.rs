//! The outbox's delivery policy, sans-IO: which records may be attempted now (the oldest
//! of each group, so a cart's records arrive in order; never a key already in flight),
//! what an upstream answer means, and when to try again (exponential backoff with jitter).

use std::collections::HashSet;
use std::time::Duration;

use super::model::OutboxRecord;

/// What an attempt's result means for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later (409, 429, 5xx, timeouts, connection errors).
    Retry(String),
    /// The upstream refused it for good (other 4xx): a dead letter, with the reason.
    Dead(String),
}

/// The meaning of an HTTP status from the upstream.
pub fn outcome_of_status(status: u16, body: &str) -> Outcome {
    let snippet: String = body.chars().take(200).collect();
    match status {
        200..=299 => Outcome::Delivered,
        409 | 429 | 500..=599 => Outcome::Retry(format!("HTTP {status}: {snippet}")),
        400..=499 => Outcome::Dead(format!("HTTP {status}: {snippet}")),
        // 1xx/3xx: not an answer we can act on; try again.
        _ => Outcome::Retry(format!("HTTP {status}")),
    }
}

const BASE: Duration = Duration::from_secs(1);
const CAP: Duration = Duration::from_secs(300);

/// Wait before attempt `attempts + 1`: 1 s doubling to 5 min, scaled by `jitter` in
/// 0.5..1.5 (from the caller's randomness, so this stays deterministic).
pub fn backoff(attempts: u32, jitter: f64) -> Duration {
    let exp = BASE.saturating_mul(1u32 << attempts.min(16)).min(CAP);
    exp.mul_f64(jitter.clamp(0.5, 1.5))
}

/// Records to attempt now, oldest first: for each group only its oldest record (later
/// ones wait for it), due at `now_ms`, key not in flight; at most `max`.
pub fn due<'a>(
    oldest_first: impl IntoIterator<Item = &'a OutboxRecord>,
    now_ms: i64,
    in_flight: &HashSet<String>,
    max: usize,
) -> Vec<&'a OutboxRecord> {
    let mut seen_groups: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for r in oldest_first {
        if out.len() >= max {
            break;
        }
        // The oldest record of a group blocks the rest of it, due or not.
        if !seen_groups.insert(r.group.as_str()) {
            continue;
        }
        if r.next_at_ms <= now_ms && !in_flight.contains(&r.key) {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, group: &str, next_at_ms: i64) -> OutboxRecord {
        OutboxRecord {
            id,
            key: format!("k{id}"),
            group: group.into(),
            client: "till".into(),
            body: serde_json::json!({}),
            created_at: 0,
            attempts: 0,
            next_at_ms,
            last_error: None,
        }
    }

    #[test]
    fn one_record_per_group_in_order_and_never_twice_in_flight() {
        let rs = vec![
            rec(1, "a", 0),
            rec(2, "a", 0),
            rec(3, "b", 500),
            rec(4, "c", 0),
        ];
        let ids = |v: Vec<&OutboxRecord>| v.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(due(&rs, 100, &HashSet::new(), 10)), [1, 4]);
        // b's oldest is not due yet: nothing of b goes.
        let flying: HashSet<String> = ["k1".to_string()].into();
        assert_eq!(ids(due(&rs, 1000, &flying, 10)), [3, 4]);
        assert_eq!(ids(due(&rs, 1000, &HashSet::new(), 1)), [1]);
    }

    #[test]
    fn statuses_and_backoff() {
        assert_eq!(outcome_of_status(201, ""), Outcome::Delivered);
        assert!(matches!(outcome_of_status(409, ""), Outcome::Retry(_)));
        assert!(matches!(outcome_of_status(429, ""), Outcome::Retry(_)));
        assert!(matches!(outcome_of_status(503, ""), Outcome::Retry(_)));
        assert!(
            matches!(outcome_of_status(422, "bad sku"), Outcome::Dead(r) if r.contains("bad sku"))
        );
        assert_eq!(backoff(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(30, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(2, 0.5), Duration::from_secs(2));
    }
}
