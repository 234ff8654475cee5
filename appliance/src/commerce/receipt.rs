//! The receipt chain: each receipt carries a per-device counter, the hash of the previous
//! receipt and an Ed25519 signature over a canonical encoding, so that anyone holding the
//! device's public key can tell, offline, that no receipt is missing (a gap), none was
//! replaced by another with the same number (a fork) and none was edited.
//!
//! Canonical encoding: the ASCII line `stallnet-receipt-v1`, a newline, then the JSON of
//! `{seq, prev, order}` with fields in declaration order, no whitespace, integers only.

use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
use serde::Serialize;

use super::model::{Order, Receipt};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Serialize)]
struct Signed<'a> {
    seq: u64,
    prev: &'a str,
    order: &'a Order,
}

/// The bytes the signature covers.
pub fn canonical(seq: u64, prev: &str, order: &Order) -> Vec<u8> {
    let mut out = b"stallnet-receipt-v1\n".to_vec();
    // Serializing plain structs of strings and integers cannot fail.
    let json = serde_json::to_vec(&Signed { seq, prev, order }).unwrap_or_default();
    out.extend_from_slice(&json);
    out
}

/// Hex SHA-256 of a receipt (signature included): what the next one links to.
pub fn hash(r: &Receipt) -> String {
    let mut bytes = canonical(r.seq, &r.prev, &r.order);
    bytes.extend_from_slice(r.sig.as_bytes());
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
}

/// The next receipt after one whose hash is `prev` and number `seq - 1`.
pub fn sign(key: &Ed25519KeyPair, seq: u64, prev: &str, order: Order) -> Receipt {
    let sig = key.sign(&canonical(seq, prev, &order));
    Receipt {
        seq,
        prev: prev.to_string(),
        order,
        sig: hex::encode(sig.as_ref()),
    }
}

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("receipt {0}: bad signature (edited, or not signed by this device)")]
    Signature(u64),
    #[error("receipts {after} to {next}: a gap (missing receipts)")]
    Gap { after: u64, next: u64 },
    #[error("receipt {0}: appears twice with different contents (a fork)")]
    Fork(u64),
    #[error("receipt {0}: does not link to the receipt before it (edited or reordered)")]
    Link(u64),
    #[error("receipt {0}: the chain does not start at 1")]
    Start(u64),
}

/// Verifies a whole chain (in any order) against the device's public key; every problem
/// is reported.
pub fn verify(public_key: &[u8], receipts: &[Receipt]) -> Vec<ChainError> {
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let mut errors = Vec::new();
    let mut sorted: Vec<&Receipt> = receipts.iter().collect();
    sorted.sort_by_key(|r| r.seq);
    for r in &sorted {
        let sig = hex::decode(&r.sig).unwrap_or_default();
        if key
            .verify(&canonical(r.seq, &r.prev, &r.order), &sig)
            .is_err()
        {
            errors.push(ChainError::Signature(r.seq));
        }
    }
    if let Some(first) = sorted.first() {
        if first.seq != 1 {
            errors.push(ChainError::Start(first.seq));
        }
    }
    for w in sorted.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.seq == b.seq {
            if a != b {
                errors.push(ChainError::Fork(a.seq));
            }
            continue;
        }
        if b.seq != a.seq + 1 {
            errors.push(ChainError::Gap {
                after: a.seq,
                next: b.seq,
            });
        } else if b.prev != hash(a) {
            errors.push(ChainError::Link(b.seq));
        }
    }
    if sorted
        .first()
        .is_some_and(|r| r.seq == 1 && r.prev != GENESIS)
    {
        errors.push(ChainError::Link(1));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    fn order(n: i64) -> Order {
        Order {
            order_id: format!("o{n}"),
            client: "till".into(),
            cart_id: format!("c{n}"),
            cart_version: 1,
            currency: "EUR".into(),
            items: vec![],
            total: n * 100,
            payment: "cash".into(),
            created_at: 1_700_000_000 + n,
        }
    }

    fn chain(k: &Ed25519KeyPair, n: u64) -> Vec<Receipt> {
        let mut out: Vec<Receipt> = Vec::new();
        for i in 1..=n {
            let prev = out.last().map_or(GENESIS.to_string(), hash);
            out.push(sign(k, i, &prev, order(i as i64)));
        }
        out
    }

    #[test]
    fn a_good_chain_verifies_and_gaps_forks_and_edits_are_found() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        let c = chain(&k, 5);
        assert_eq!(verify(&pk, &c), vec![]);
        // A gap.
        let mut gap = c.clone();
        gap.remove(2);
        assert_eq!(
            verify(&pk, &gap),
            vec![ChainError::Gap { after: 2, next: 4 }]
        );
        // An edit: the signature no longer matches.
        let mut edit = c.clone();
        edit[1].order.total += 1;
        let e = verify(&pk, &edit);
        assert!(e.contains(&ChainError::Signature(2)), "{e:?}");
        assert!(e.contains(&ChainError::Link(3)), "{e:?}");
        // A fork: a second, validly signed receipt 3.
        let mut fork = c.clone();
        fork.push(sign(&k, 3, &hash(&c[1]), order(99)));
        assert!(verify(&pk, &fork).contains(&ChainError::Fork(3)));
        // Another device's key.
        let other = key();
        assert_eq!(
            verify(other.public_key().as_ref(), &c).len(),
            5,
            "every signature fails"
        );
    }
}
