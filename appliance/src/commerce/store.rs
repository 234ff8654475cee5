//! Durable state of the commerce service, behind [`CommerceStore`], with sled as the
//! engine. Every change is one sled transaction (a checkout writes the cart's removal,
//! the receipt, the outbox record and the counters together) and callers acknowledge only
//! after [`CommerceStore::flush`]. A schema version is kept in `meta` and migrated on open.

use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair};
use sled::transaction::{ConflictableTransactionError as Cte, TransactionError, Transactional};
use sled::Tree;

use super::model::{Cart, DeadLetter, Order, OutboxRecord, Receipt, StoredToken};
use super::receipt;

pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("version conflict")]
    Conflict(Option<Box<Cart>>),
    /// The idempotency key was already used for a different request (another cart,
    /// another event): never answered with the other request's result.
    #[error("{0}")]
    KeyReused(String),
    /// A checkout of a cart without items: nothing to sell.
    #[error("the cart has no items: nothing to sell")]
    EmptyCart,
    #[error("already redeemed")]
    Redeemed,
    #[error("expired")]
    Expired,
    #[error("{0}")]
    OverLimit(String),
    #[error("storage: {0}")]
    Io(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Io(e.to_string()),
        }
    }
}

/// Per-client usage limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

/// The operations the service needs; every write is durable once `flush` returns.
pub trait CommerceStore: Send + Sync {
    fn put_token(
        &self,
        client: &str,
        id: &str,
        t: &StoredToken,
        l: Limits,
    ) -> Result<(), StoreError>;
    fn get_token(&self, client: &str, id: &str) -> Result<StoredToken, StoreError>;
    fn delete_token(&self, client: &str, id: &str) -> Result<(), StoreError>;
    /// Marks the token used; exactly one of concurrent redeems succeeds.
    fn redeem_token(&self, client: &str, id: &str, now: i64) -> Result<StoredToken, StoreError>;
    fn sweep_tokens(&self, now: i64) -> Result<u64, StoreError>;
    fn get_cart(&self, client: &str, id: &str) -> Result<Cart, StoreError>;
    /// Writes `cart` if the stored version is `if_match` (None: any, or absent).
    fn put_cart(
        &self,
        client: &str,
        cart: Cart,
        if_match: Option<u64>,
        l: Limits,
    ) -> Result<Cart, StoreError>;
    fn delete_cart(&self, client: &str, id: &str, if_match: Option<u64>) -> Result<(), StoreError>;
    /// Sells the cart: removes it, appends the signed receipt and the outbox record.
    /// Repeating a checkout with the same idempotency key returns the first receipt.
    fn checkout(
        &self,
        client: &str,
        cart_id: &str,
        if_match: Option<u64>,
        payment: &str,
        idem: &str,
        now: i64,
    ) -> Result<Receipt, StoreError>;
    fn enqueue_event(
        &self,
        client: &str,
        group: &str,
        key: &str,
        body: serde_json::Value,
        now: i64,
    ) -> Result<OutboxRecord, StoreError>;
    fn receipts(&self, from: u64, limit: usize) -> Result<Vec<Receipt>, StoreError>;
    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError>;
    fn outbox_len(&self) -> usize;
    fn delivered(&self, id: u64, now: i64) -> Result<(), StoreError>;
    fn retry_later(&self, id: u64, next_at_ms: i64, error: &str) -> Result<(), StoreError>;
    fn dead(&self, id: u64, reason: &str, now: i64) -> Result<(), StoreError>;
    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError>;
    fn retry_dead(&self, id: u64) -> Result<(), StoreError>;
    fn drop_dead(&self, id: u64) -> Result<(), StoreError>;
    /// Per client: unix time of its last record delivered upstream.
    fn last_sync(&self) -> Result<Vec<(String, i64)>, StoreError>;
    fn flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
}

pub struct SledStore {
    db: sled::Db,
    tokens: Tree,
    carts: Tree,
    receipts: Tree,
    outbox: Tree,
    dead: Tree,
    meta: Tree,
    usage: Tree,
    checkouts: Tree,
    synced: Tree,
    key: Ed25519KeyPair,
    /// [`device_tag`] of `key`.
    device: String,
    /// One flush at a time: sled 0.34's `flush_async` can hang when many callers flush at
    /// once (seen here with 32 concurrent outbox deliveries), so flushes are serialized and
    /// run as blocking calls; a flush covers every write made before it.
    flushing: tokio::sync::Mutex<()>,
}

/// The `Idempotency-Key` (HTTP) or `Nats-Msg-Id` (JetStream) a record carries upstream:
/// unique per device, client, kind of record and the client's key, so two tills (or two
/// stalls, or a checkout and an event) that pick the same key never collide in an
/// idempotent backend, which would keep one sale and drop the others. `device` is
/// [`device_tag`] of the box's signing key.
pub fn upstream_key(device: &str, client: &str, kind: &str, key: &str) -> String {
    format!("{device}:{client}:{kind}:{key}")
}

/// 16 hex digits of the SHA-256 of the device's receipt-signing public key: names the
/// stall in upstream keys.
pub fn device_tag(public_key: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, public_key);
    hex::encode(&d.as_ref()[..8])
}

fn k(client: &str, id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(client.len() + id.len() + 1);
    v.extend_from_slice(client.as_bytes());
    v.push(0);
    v.extend_from_slice(id.as_bytes());
    v
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Io(format!("corrupt record: {e}")))
}

fn u64_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// (entries, bytes) used by a client.
fn usage_of(v: Option<sled::IVec>) -> (u64, u64) {
    v.and_then(|b| <[u8; 16]>::try_from(b.as_ref()).ok())
        .map_or((0, 0), |a| {
            let (e, b) = a.split_at(8);
            (
                u64::from_be_bytes(e.try_into().unwrap_or_default()),
                u64::from_be_bytes(b.try_into().unwrap_or_default()),
            )
        })
}

fn usage_bytes(entries: u64, bytes: u64) -> Vec<u8> {
    let mut v = entries.to_be_bytes().to_vec();
    v.extend_from_slice(&bytes.to_be_bytes());
    v
}

/// The usage change of replacing `old` with `new` (sizes in bytes).
fn apply_usage(
    usage: &sled::transaction::TransactionalTree,
    client: &str,
    old: Option<usize>,
    new: Option<usize>,
    l: Option<Limits>,
) -> Result<(), Cte<StoreError>> {
    let (mut e, mut b) = usage_of(usage.get(client.as_bytes())?);
    if let Some(o) = old {
        e = e.saturating_sub(1);
        b = b.saturating_sub(o as u64);
    }
    if let Some(n) = new {
        e += 1;
        b += n as u64;
    }
    if let Some(l) = l {
        let grew = new.unwrap_or(0) > old.unwrap_or(0) || (old.is_none() && new.is_some());
        if grew && (e > l.max_entries || b > l.max_bytes) {
            return Err(Cte::Abort(StoreError::OverLimit(format!(
                "client {client} would hold {e} entries / {b} bytes; the limits are {} / {}",
                l.max_entries, l.max_bytes
            ))));
        }
    }
    usage.insert(client.as_bytes(), usage_bytes(e, b))?;
    Ok(())
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, migrating the schema; `key` signs receipts.
    pub fn open(dir: &Path, key: Ed25519KeyPair) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 * 1024 * 1024)
            .open()?;
        let s = Self {
            tokens: db.open_tree("tokens")?,
            carts: db.open_tree("carts")?,
            receipts: db.open_tree("receipts")?,
            outbox: db.open_tree("outbox")?,
            dead: db.open_tree("dead")?,
            meta: db.open_tree("meta")?,
            usage: db.open_tree("usage")?,
            checkouts: db.open_tree("checkouts")?,
            synced: db.open_tree("synced")?,
            db,
            device: device_tag(key.public_key().as_ref()),
            key,
            flushing: tokio::sync::Mutex::new(()),
        };
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let v = u64_of(self.meta.get("schema")?);
        match v {
            0 => {
                // A new store (version 0 never existed on disk): stamp it.
                self.meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
                self.db.flush()?;
                Ok(())
            }
            SCHEMA_VERSION => Ok(()),
            newer => Err(StoreError::Io(format!(
                "the store has schema {newer}, this stallnet knows up to {SCHEMA_VERSION}: \
                 refusing to touch it (downgrade?)"
            ))),
        }
    }

    pub fn schema(&self) -> u64 {
        self.meta
            .get("schema")
            .ok()
            .flatten()
            .map_or(0, |v| u64_of(Some(v)))
    }
}

impl CommerceStore for SledStore {
    fn put_token(
        &self,
        client: &str,
        id: &str,
        t: &StoredToken,
        l: Limits,
    ) -> Result<(), StoreError> {
        let key = k(client, id);
        let val = to_json(t);
        (&self.tokens, &self.usage).transaction(|(tokens, usage)| {
            let old = tokens.get(&key)?;
            // A redeemed token stays redeemed: a PUT over it would make it spendable again.
            if let Some(o) = &old {
                if from_json::<StoredToken>(o).is_ok_and(|t| t.redeemed_at.is_some()) {
                    return Err(Cte::Abort(StoreError::Redeemed));
                }
            }
            let old = old.map(|v| v.len());
            apply_usage(usage, client, old, Some(val.len()), Some(l))?;
            tokens.insert(key.as_slice(), val.as_slice())?;
            Ok(())
        })?;
        Ok(())
    }

    fn get_token(&self, client: &str, id: &str) -> Result<StoredToken, StoreError> {
        let v = self
            .tokens
            .get(k(client, id))?
            .ok_or(StoreError::NotFound)?;
        from_json(&v)
    }

    fn delete_token(&self, client: &str, id: &str) -> Result<(), StoreError> {
        let key = k(client, id);
        (&self.tokens, &self.usage).transaction(|(tokens, usage)| {
            let Some(old) = tokens.remove(key.as_slice())? else {
                return Err(Cte::Abort(StoreError::NotFound));
            };
            apply_usage(usage, client, Some(old.len()), None, None)?;
            Ok(())
        })?;
        Ok(())
    }

    fn redeem_token(&self, client: &str, id: &str, now: i64) -> Result<StoredToken, StoreError> {
        let key = k(client, id);
        let t = self.tokens.transaction(|tokens| {
            let Some(v) = tokens.get(&key)? else {
                return Err(Cte::Abort(StoreError::NotFound));
            };
            let mut t: StoredToken = from_json(&v).map_err(Cte::Abort)?;
            if t.expires_at <= now {
                return Err(Cte::Abort(StoreError::Expired));
            }
            if t.redeemed_at.is_some() {
                return Err(Cte::Abort(StoreError::Redeemed));
            }
            t.redeemed_at = Some(now);
            tokens.insert(key.as_slice(), to_json(&t))?;
            Ok(t)
        })?;
        Ok(t)
    }

    fn sweep_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self.tokens.iter() {
            let (key, v) = item?;
            let Ok(t) = from_json::<StoredToken>(&v) else {
                continue;
            };
            if t.expires_at <= now {
                let client = key.split(|b| *b == 0).next().unwrap_or_default();
                let client = String::from_utf8_lossy(client).to_string();
                let removed = (&self.tokens, &self.usage).transaction(|(tokens, usage)| {
                    if let Some(old) = tokens.remove(&key)? {
                        apply_usage(usage, &client, Some(old.len()), None, None)?;
                        return Ok(true);
                    }
                    Ok(false)
                });
                if matches!(removed, Ok(true)) {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn get_cart(&self, client: &str, id: &str) -> Result<Cart, StoreError> {
        let v = self.carts.get(k(client, id))?.ok_or(StoreError::NotFound)?;
        from_json(&v)
    }

    fn put_cart(
        &self,
        client: &str,
        cart: Cart,
        if_match: Option<u64>,
        l: Limits,
    ) -> Result<Cart, StoreError> {
        let key = k(client, &cart.id);
        let c = (&self.carts, &self.usage).transaction(|(carts, usage)| {
            let old = carts.get(&key)?;
            let current: Option<Cart> = match &old {
                Some(v) => Some(from_json(v).map_err(Cte::Abort)?),
                None => None,
            };
            if let Some(want) = if_match {
                if current.as_ref().map(|c| c.version) != Some(want) {
                    return Err(Cte::Abort(StoreError::Conflict(current.map(Box::new))));
                }
            }
            let mut cart = cart.clone();
            cart.version = current.as_ref().map_or(1, |c| c.version + 1);
            let val = to_json(&cart);
            apply_usage(
                usage,
                client,
                old.map(|v| v.len()),
                Some(val.len()),
                Some(l),
            )?;
            carts.insert(key.as_slice(), val)?;
            Ok(cart)
        })?;
        Ok(c)
    }

    fn delete_cart(&self, client: &str, id: &str, if_match: Option<u64>) -> Result<(), StoreError> {
        let key = k(client, id);
        (&self.carts, &self.usage).transaction(|(carts, usage)| {
            let Some(old) = carts.get(&key)? else {
                return Err(Cte::Abort(StoreError::NotFound));
            };
            let current: Cart = from_json(&old).map_err(Cte::Abort)?;
            if if_match.is_some_and(|v| v != current.version) {
                return Err(Cte::Abort(StoreError::Conflict(Some(Box::new(current)))));
            }
            carts.remove(key.as_slice())?;
            apply_usage(usage, client, Some(old.len()), None, None)?;
            Ok(())
        })?;
        Ok(())
    }

    fn checkout(
        &self,
        client: &str,
        cart_id: &str,
        if_match: Option<u64>,
        payment: &str,
        idem: &str,
        now: i64,
    ) -> Result<Receipt, StoreError> {
        let ckey = k(client, cart_id);
        let ikey = k(client, idem);
        let r = (
            &self.carts,
            &self.usage,
            &self.receipts,
            &self.outbox,
            &self.meta,
            &self.checkouts,
        )
            .transaction(|(carts, usage, receipts, outbox, meta, checkouts)| {
                // The same checkout again: the receipt it already got. The same key on
                // another cart is refused: that cart is not sold.
                if let Some(seq) = checkouts.get(&ikey)? {
                    let r = receipts.get(seq)?.ok_or(Cte::Abort(StoreError::NotFound))?;
                    let r = from_json::<Receipt>(&r).map_err(Cte::Abort)?;
                    if r.order.cart_id != cart_id {
                        return Err(Cte::Abort(StoreError::KeyReused(format!(
                            "this Idempotency-Key already sold cart {:?} (receipt {}); \
                             cart {cart_id:?} is not sold: use a new key for a new checkout",
                            r.order.cart_id, r.seq
                        ))));
                    }
                    return Ok(r);
                }
                let Some(old) = carts.get(&ckey)? else {
                    return Err(Cte::Abort(StoreError::NotFound));
                };
                let cart: Cart = from_json(&old).map_err(Cte::Abort)?;
                if cart.items.is_empty() {
                    return Err(Cte::Abort(StoreError::EmptyCart));
                }
                if if_match.is_some_and(|v| v != cart.version) {
                    return Err(Cte::Abort(StoreError::Conflict(Some(Box::new(cart)))));
                }
                let seq = u64_of(meta.get("receipt_seq")?) + 1;
                let prev = meta
                    .get("receipt_head")?
                    .map(|v| String::from_utf8_lossy(&v).to_string())
                    .unwrap_or_else(|| receipt::GENESIS.to_string());
                let order = Order {
                    order_id: format!("{client}-{seq}"),
                    client: client.to_string(),
                    cart_id: cart.id.clone(),
                    cart_version: cart.version,
                    currency: cart.currency.clone(),
                    items: cart.items.clone(),
                    total: cart.total,
                    payment: payment.to_string(),
                    created_at: now,
                };
                let r = receipt::sign(&self.key, seq, &prev, order);
                let seq_key = seq.to_be_bytes();
                receipts.insert(&seq_key, to_json(&r))?;
                meta.insert("receipt_seq", &seq_key)?;
                meta.insert("receipt_head", receipt::hash(&r).as_bytes())?;
                checkouts.insert(ikey.as_slice(), &seq_key)?;
                carts.remove(ckey.as_slice())?;
                apply_usage(usage, client, Some(old.len()), None, None)?;
                let id = u64_of(meta.get("outbox_seq")?) + 1;
                meta.insert("outbox_seq", &id.to_be_bytes())?;
                let rec = OutboxRecord {
                    id,
                    key: upstream_key(&self.device, client, "checkout", idem),
                    group: format!("cart:{client}:{cart_id}"),
                    client: client.to_string(),
                    body: serde_json::json!({ "type": "checkout", "receipt": r }),
                    created_at: now,
                    attempts: 0,
                    next_at_ms: 0,
                    last_error: None,
                };
                outbox.insert(&id.to_be_bytes(), to_json(&rec))?;
                Ok(r)
            })?;
        Ok(r)
    }

    fn enqueue_event(
        &self,
        client: &str,
        group: &str,
        key: &str,
        body: serde_json::Value,
        now: i64,
    ) -> Result<OutboxRecord, StoreError> {
        let ikey = k(client, &format!("event:{key}"));
        let rec = (&self.outbox, &self.meta, &self.checkouts).transaction(
            |(outbox, meta, checkouts)| {
                if let Some(id) = checkouts.get(&ikey)? {
                    // Already queued: the same record, once; the same key on another
                    // event is refused.
                    if let Some(v) = outbox.get(&id)? {
                        let old = from_json::<OutboxRecord>(&v).map_err(Cte::Abort)?;
                        if old.body != body || old.group != format!("event:{client}:{group}") {
                            return Err(Cte::Abort(StoreError::KeyReused(
                                "this Idempotency-Key already queued a different event: \
                                 use a new key for a new event"
                                    .into(),
                            )));
                        }
                        return Ok(old);
                    }
                    return Err(Cte::Abort(StoreError::KeyReused(
                        "this Idempotency-Key's event was already delivered".into(),
                    )));
                }
                let id = u64_of(meta.get("outbox_seq")?) + 1;
                meta.insert("outbox_seq", &id.to_be_bytes())?;
                let rec = OutboxRecord {
                    id,
                    key: upstream_key(&self.device, client, "event", key),
                    group: format!("event:{client}:{group}"),
                    client: client.to_string(),
                    body: body.clone(),
                    created_at: now,
                    attempts: 0,
                    next_at_ms: 0,
                    last_error: None,
                };
                outbox.insert(&id.to_be_bytes(), to_json(&rec))?;
                checkouts.insert(ikey.as_slice(), &id.to_be_bytes())?;
                Ok(rec)
            },
        )?;
        Ok(rec)
    }

    fn receipts(&self, from: u64, limit: usize) -> Result<Vec<Receipt>, StoreError> {
        self.receipts
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(|r| from_json(&r?.1))
            .collect()
    }

    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError> {
        self.outbox
            .iter()
            .take(limit)
            .map(|r| from_json(&r?.1))
            .collect()
    }

    fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    fn delivered(&self, id: u64, now: i64) -> Result<(), StoreError> {
        (&self.outbox, &self.synced).transaction(|(outbox, synced)| {
            if let Some(v) = outbox.remove(&id.to_be_bytes())? {
                let rec: OutboxRecord = from_json(&v).map_err(Cte::Abort)?;
                synced.insert(rec.client.as_bytes(), &now.to_be_bytes())?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn retry_later(&self, id: u64, next_at_ms: i64, error: &str) -> Result<(), StoreError> {
        self.outbox.transaction(|outbox| {
            if let Some(v) = outbox.get(id.to_be_bytes())? {
                let mut rec: OutboxRecord = from_json(&v).map_err(Cte::Abort)?;
                rec.attempts += 1;
                rec.next_at_ms = next_at_ms;
                rec.last_error = Some(error.to_string());
                outbox.insert(&id.to_be_bytes(), to_json(&rec))?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn dead(&self, id: u64, reason: &str, now: i64) -> Result<(), StoreError> {
        (&self.outbox, &self.dead).transaction(|(outbox, dead)| {
            if let Some(v) = outbox.remove(&id.to_be_bytes())? {
                let mut record: OutboxRecord = from_json(&v).map_err(Cte::Abort)?;
                record.attempts += 1;
                let d = DeadLetter {
                    record,
                    reason: reason.to_string(),
                    at: now,
                };
                dead.insert(&id.to_be_bytes(), to_json(&d))?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead.iter().map(|r| from_json(&r?.1)).collect()
    }

    fn retry_dead(&self, id: u64) -> Result<(), StoreError> {
        (&self.outbox, &self.dead).transaction(|(outbox, dead)| {
            let Some(v) = dead.remove(&id.to_be_bytes())? else {
                return Err(Cte::Abort(StoreError::NotFound));
            };
            let d: DeadLetter = from_json(&v).map_err(Cte::Abort)?;
            let mut rec = d.record;
            rec.next_at_ms = 0;
            // Back in its original place: order within its group is kept.
            outbox.insert(&id.to_be_bytes(), to_json(&rec))?;
            Ok(())
        })?;
        Ok(())
    }

    fn drop_dead(&self, id: u64) -> Result<(), StoreError> {
        self.dead
            .remove(id.to_be_bytes())?
            .map(|_| ())
            .ok_or(StoreError::NotFound)
    }

    fn last_sync(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.synced
            .iter()
            .map(|r| {
                let (k, v) = r?;
                let t = <[u8; 8]>::try_from(v.as_ref()).map_or(0, i64::from_be_bytes);
                Ok((String::from_utf8_lossy(&k).to_string(), t))
            })
            .collect()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let _one = self.flushing.lock().await;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Io(format!("flush task: {e}")))??;
        Ok(())
    }
}
