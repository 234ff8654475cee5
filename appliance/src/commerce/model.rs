//! The records the commerce service keeps: tokens, carts with line items (money in
//! integer minor units, never floats), orders, receipts and outbox records.

use serde::{Deserialize, Serialize};

/// Identifiers chosen by clients: 1 to 128 letters, digits, `-`, `_`, `.`, `:`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIn {
    pub value: String,
    pub kind: String,
    #[serde(default)]
    pub scope: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A token as stored: its value sealed (see [`super::seal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    pub sealed: String,
    pub kind: String,
    pub scope: String,
    pub expires_at: i64,
    pub redeemed_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineItem {
    pub sku: String,
    #[serde(default)]
    pub name: String,
    pub quantity: i64,
    /// Price of one unit in minor units (cents).
    pub unit_price: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CartIn {
    /// ISO 4217 code.
    pub currency: String,
    pub items: Vec<LineItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    pub id: String,
    pub version: u64,
    pub currency: String,
    pub items: Vec<LineItem>,
    /// Computed on the box: the sum of quantity × unit price, in minor units.
    pub total: i64,
    pub updated_at: i64,
}

/// Why a cart cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CartError {
    #[error("currency must be a three-letter ISO 4217 code")]
    Currency,
    #[error("item {0}: quantity must be between 1 and 1000000")]
    Quantity(usize),
    #[error("item {0}: unit_price must be between 0 and 10^12 minor units")]
    Price(usize),
    #[error("item {0}: sku must be 1 to 128 letters, digits, '-', '_', '.', ':'")]
    Sku(usize),
    #[error("at most 500 items per cart")]
    TooMany,
    #[error("the total does not fit in 64 bits")]
    Overflow,
}

/// Checks a cart and computes its total with checked integer arithmetic.
pub fn total(c: &CartIn) -> Result<i64, CartError> {
    if c.currency.len() != 3 || !c.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(CartError::Currency);
    }
    if c.items.len() > 500 {
        return Err(CartError::TooMany);
    }
    let mut sum: i64 = 0;
    for (i, it) in c.items.iter().enumerate() {
        if !valid_id(&it.sku) {
            return Err(CartError::Sku(i));
        }
        if !(1..=1_000_000).contains(&it.quantity) {
            return Err(CartError::Quantity(i));
        }
        if !(0..=1_000_000_000_000).contains(&it.unit_price) {
            return Err(CartError::Price(i));
        }
        let line = it
            .quantity
            .checked_mul(it.unit_price)
            .ok_or(CartError::Overflow)?;
        sum = sum.checked_add(line).ok_or(CartError::Overflow)?;
    }
    Ok(sum)
}

/// What a checkout records: the cart as sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub client: String,
    pub cart_id: String,
    pub cart_version: u64,
    pub currency: String,
    pub items: Vec<LineItem>,
    pub total: i64,
    /// The client's payment reference (an offline card authorisation, cash, …).
    pub payment: String,
    pub created_at: i64,
}

/// A signed link of the receipt chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Per-device counter, from 1, no gaps.
    pub seq: u64,
    /// Hex SHA-256 of the previous receipt's canonical encoding (64 zeros for the first).
    pub prev: String,
    pub order: Order,
    /// Hex Ed25519 signature over the canonical encoding of everything above.
    pub sig: String,
}

/// A record waiting for the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// Position in the outbox (global, increasing).
    pub id: u64,
    /// The `Idempotency-Key` sent upstream.
    pub key: String,
    /// Records of one group (a cart, or an app event stream) are delivered in order.
    pub group: String,
    pub client: String,
    /// The JSON document delivered.
    pub body: serde_json::Value,
    pub created_at: i64,
    pub attempts: u32,
    /// Unix milliseconds before which no new attempt is made.
    pub next_at_ms: i64,
    pub last_error: Option<String>,
}

/// A record the upstream refused for good (a 4xx other than 409 and 429).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub record: OutboxRecord,
    pub reason: String,
    pub at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(q: i64, p: i64) -> LineItem {
        LineItem {
            sku: "sku-1".into(),
            name: String::new(),
            quantity: q,
            unit_price: p,
        }
    }

    #[test]
    fn totals_are_exact_integers_and_bad_carts_are_refused() {
        let c = CartIn {
            currency: "EUR".into(),
            items: vec![item(3, 199), item(1, 1)],
        };
        assert_eq!(total(&c), Ok(598));
        let bad = CartIn {
            currency: "eur".into(),
            ..c.clone()
        };
        assert_eq!(total(&bad), Err(CartError::Currency));
        let neg = CartIn {
            items: vec![item(-1, 10)],
            ..c.clone()
        };
        assert_eq!(total(&neg), Err(CartError::Quantity(0)));
    }

    proptest! {
        #[test]
        fn the_total_is_the_sum_of_the_lines(lines in proptest::collection::vec((1i64..1000, 0i64..100_000), 0..50)) {
            let c = CartIn {
                currency: "GBP".into(),
                items: lines.iter().map(|&(q, p)| item(q, p)).collect(),
            };
            let want: i128 = lines.iter().map(|&(q, p)| i128::from(q) * i128::from(p)).sum();
            prop_assert_eq!(total(&c).map(i128::from), Ok(want));
        }
    }
}
