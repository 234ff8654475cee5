//! Durable state of the commerce service, behind [`CommerceStore`], with sled as the
//! engine. Every change is one sled transaction (a checkout writes the cart's removal,
//! the receipt, the outbox record and the counters together) and callers acknowledge only
//! after [`CommerceStore::flush`]. A schema version is kept in `meta` and migrated on open.
//!
//! A full disk: a write is refused up front ([`StoreError::Full`], nothing touched) while
//! the filesystem has less than [`RESERVE_BYTES`] free. If sled still fails (its first I/O
//! error is sticky: every later write fails, even once space is back), the store stops
//! answering from memory (which may hold what was never saved) and reopens itself from
//! disk as soon as there is room again: no restart needed, nothing acknowledged lost.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use ring::signature::{Ed25519KeyPair, KeyPair};
use sled::transaction::{ConflictableTransactionError as Cte, TransactionError, Transactional};
use sled::Tree;

use super::model::{Cart, DeadLetter, Order, OutboxRecord, Receipt, StoredToken};
use super::receipt;

pub const SCHEMA_VERSION: u64 = 1;

/// Free space the store leaves on its filesystem: sled writes in 512 KiB segments and
/// rewrites them as it compacts, and the daemon's own files (status, revisions) live on
/// the same card.
pub const RESERVE_BYTES: u64 = 4 * 1024 * 1024;
/// Free space above the reserve that takes a full store back to taking writes.
pub const FULL_MARGIN: u64 = 1024 * 1024;

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
    /// The disk is full: nothing was saved.
    #[error("{0}")]
    Full(String),
    /// The store failed on a full disk and is reopening from disk once there is room.
    #[error("the store is waiting for free space to reopen")]
    Unavailable,
    #[error("storage: {0}")]
    Io(String),
}

const FULL: &str =
    "the box's storage is full: this request was not saved; free space on the SD card \
                    (a retry with the same Idempotency-Key is safe)";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
                StoreError::Full(FULL.into())
            }
            e => StoreError::Io(e.to_string()),
        }
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
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
    /// Queues an event; it counts against the client's limits until it is delivered (or,
    /// refused for good, dropped from the dead letters).
    fn enqueue_event(
        &self,
        client: &str,
        group: &str,
        key: &str,
        body: serde_json::Value,
        now: i64,
        l: Limits,
    ) -> Result<OutboxRecord, StoreError>;
    /// Receipts from sequence number `from` on: at most `limit`, and no more than about
    /// `max_bytes` of them (at least one).
    fn receipts(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page<Receipt>, StoreError>;
    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError>;
    /// `client`'s undelivered records from id `from` on, bounded like [`Self::receipts`].
    fn outbox_of(
        &self,
        client: &str,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page<OutboxRecord>, StoreError>;
    fn outbox_len(&self) -> usize;
    fn delivered(&self, id: u64, now: i64) -> Result<(), StoreError>;
    fn retry_later(&self, id: u64, next_at_ms: i64, error: &str) -> Result<(), StoreError>;
    fn dead(&self, id: u64, reason: &str, now: i64) -> Result<(), StoreError>;
    /// `client`'s dead letters from id `from` on, bounded like [`Self::receipts`].
    fn dead_of(
        &self,
        client: &str,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page<DeadLetter>, StoreError>;
    fn dead_letter(&self, id: u64) -> Result<DeadLetter, StoreError>;
    fn dead_len(&self) -> usize;
    fn retry_dead(&self, id: u64) -> Result<(), StoreError>;
    fn drop_dead(&self, id: u64) -> Result<(), StoreError>;
    /// Per client: unix time of its last record delivered upstream.
    fn last_sync(&self) -> Result<Vec<(String, i64)>, StoreError>;
    fn flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send;
    /// Whether the store can take writes now (and how much room is left).
    fn storage(&self) -> Storage;
}

/// One page of a list, and where the next one starts (`None`: this was the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

/// Reads records keyed by big-endian ids from `from` on, those `keep` accepts, up to
/// `limit` of them and about `max_bytes` (always at least one).
fn page<T: serde::de::DeserializeOwned>(
    tree: &Tree,
    from: u64,
    limit: usize,
    max_bytes: usize,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>, StoreError> {
    let mut items = Vec::new();
    let mut bytes = 0usize;
    for r in tree.range(from.to_be_bytes()..) {
        let (k, v) = r?;
        let id = <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes);
        let item: T = from_json(&v)?;
        if !keep(&item) {
            continue;
        }
        if items.len() >= limit || (!items.is_empty() && bytes + v.len() > max_bytes) {
            return Ok(Page {
                items,
                next: Some(id),
            });
        }
        bytes += v.len();
        items.push(item);
    }
    Ok(Page { items, next: None })
}

/// What an event counts against its client's limits: its body, group and key as stored
/// (the same figure when queued and when it leaves).
fn event_size(rec: &OutboxRecord) -> usize {
    to_json(&rec.body).len() + rec.group.len() + rec.key.len()
}

fn is_event(rec: &OutboxRecord) -> bool {
    rec.group.starts_with("event:")
}

/// What the store's disk allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Storage {
    /// False while writes are refused for lack of space (or the store is reopening).
    pub ok: bool,
    /// Bytes free on the store's filesystem.
    pub free_bytes: u64,
}

/// The open database and its trees.
struct Trees {
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
}

impl Trees {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 * 1024 * 1024)
            .open()?;
        Ok(Self {
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
        })
    }
}

pub struct SledStore {
    dir: PathBuf,
    /// `None` while the database is closed to be reopened after a failure.
    trees: RwLock<Option<Trees>>,
    /// Set by an I/O failure: sled's error is sticky, and its memory may hold writes that
    /// never reached the disk. Cleared by a reopen.
    failed: AtomicBool,
    /// A write was refused for room: writes stay refused (and the status says the card
    /// is full) until free space is back above the reserve plus [`FULL_MARGIN`], so sled's
    /// own flushes freeing a few kilobytes do not make it flicker.
    full: AtomicBool,
    /// Free bytes below which writes are refused up front ([`RESERVE_BYTES`]).
    reserve: u64,
    key: Ed25519KeyPair,
    /// [`device_tag`] of `key`.
    device: String,
    /// One flush at a time: sled 0.34's `flush_async` can hang when many callers flush at
    /// once (seen here with 32 concurrent outbox deliveries), so flushes are serialized and
    /// run as blocking calls; a flush covers every write made before it.
    flushing: tokio::sync::Mutex<()>,
}

/// Whether an operation writes (refused up front on a nearly full disk).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    /// Adds data: refused below [`RESERVE_BYTES`] free.
    Write,
    /// Removes or marks data (a delivery, a drop, a sweep): runs in the reserve, so a full
    /// box can still drain its outbox.
    Free,
}

/// Bytes free to unprivileged writers on the filesystem holding `dir`.
// `fsblkcnt_t` and the fragment size are not u64 on every target.
#[allow(clippy::useless_conversion)]
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
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
        let trees = Trees::open(dir)?;
        migrate(&trees)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            trees: RwLock::new(Some(trees)),
            failed: AtomicBool::new(false),
            full: AtomicBool::new(false),
            reserve: RESERVE_BYTES,
            device: device_tag(key.public_key().as_ref()),
            key,
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    /// A new outbox record with the next id (counted in `meta`): `kind` and the client's
    /// key make its upstream key.
    fn new_record(
        &self,
        meta: &sled::transaction::TransactionalTree,
        client: &str,
        (kind, key): (&str, &str),
        group: String,
        body: serde_json::Value,
        now: i64,
    ) -> Result<OutboxRecord, Cte<StoreError>> {
        let id = u64_of(meta.get("outbox_seq")?) + 1;
        meta.insert("outbox_seq", &id.to_be_bytes())?;
        Ok(OutboxRecord {
            id,
            key: upstream_key(&self.device, client, kind, key),
            group,
            client: client.to_string(),
            body,
            created_at: now,
            attempts: 0,
            next_at_ms: 0,
            last_error: None,
        })
    }

    /// The same store with `bytes` of free space kept instead of [`RESERVE_BYTES`]
    /// (0: write until the disk itself refuses, as when another process fills it).
    pub fn with_reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
        self
    }

    fn room(&self) -> u64 {
        free_bytes(&self.dir).unwrap_or(u64::MAX)
    }

    /// Whether writes are refused for room now (see `full`).
    fn short_of_room(&self) -> bool {
        let room = self.room();
        if room < self.reserve {
            self.full.store(true, Ordering::SeqCst);
            return true;
        }
        if self.full.load(Ordering::SeqCst) && room < self.reserve.saturating_add(FULL_MARGIN) {
            return true;
        }
        self.full.store(false, Ordering::SeqCst);
        false
    }

    /// After a failure: closes the database and opens it again from disk once the
    /// filesystem has room. `Ok` when the store is usable.
    fn recover(&self) -> Result<(), StoreError> {
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        if self.room() < self.reserve.max(1024 * 1024) {
            return Err(StoreError::Unavailable);
        }
        // No flush may hold the old database open meanwhile.
        let Ok(_flush) = self.flushing.try_lock() else {
            return Err(StoreError::Unavailable);
        };
        let mut slot = match self.trees.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !self.failed.load(Ordering::SeqCst) {
            return Ok(()); // another request reopened it meanwhile
        }
        // Closing first releases sled's lock on its files.
        drop(slot.take());
        let trees = Trees::open(&self.dir).inspect_err(|e| {
            tracing::warn!("reopening the commerce store: {e}");
        })?;
        migrate(&trees)?;
        *slot = Some(trees);
        self.failed.store(false, Ordering::SeqCst);
        tracing::info!("the commerce store has room again and was reopened from disk");
        Ok(())
    }

    /// Runs `f` on the open trees. A write is refused on a nearly full disk; a failed
    /// store is reopened first (or refused until it can be); an I/O error marks it failed.
    fn with<T>(
        &self,
        op: Op,
        f: impl FnOnce(&Trees) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.recover()?;
        if op == Op::Write && self.short_of_room() {
            return Err(StoreError::Full(FULL.into()));
        }
        let guard: RwLockReadGuard<'_, Option<Trees>> = match self.trees.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let trees = guard.as_ref().ok_or(StoreError::Unavailable)?;
        let r = f(trees);
        if let Err(StoreError::Io(_) | StoreError::Full(_)) = &r {
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }

    pub fn schema(&self) -> u64 {
        self.with(Op::Read, |tr| Ok(u64_of(tr.meta.get("schema")?)))
            .unwrap_or(0)
    }
}

fn migrate(tr: &Trees) -> Result<(), StoreError> {
    let v = u64_of(tr.meta.get("schema")?);
    match v {
        0 => {
            // A new store (version 0 never existed on disk): stamp it.
            tr.meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            tr.db.flush()?;
            Ok(())
        }
        SCHEMA_VERSION => Ok(()),
        newer => Err(StoreError::Io(format!(
            "the store has schema {newer}, this stallnet knows up to {SCHEMA_VERSION}: \
             refusing to touch it (downgrade?)"
        ))),
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
        self.with(Op::Write, |tr| {
            let key = k(client, id);
            let val = to_json(t);
            (&tr.tokens, &tr.usage).transaction(|(tokens, usage)| {
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
        })
    }

    fn get_token(&self, client: &str, id: &str) -> Result<StoredToken, StoreError> {
        self.with(Op::Read, |tr| {
            let v = tr.tokens.get(k(client, id))?.ok_or(StoreError::NotFound)?;
            from_json(&v)
        })
    }

    fn delete_token(&self, client: &str, id: &str) -> Result<(), StoreError> {
        self.with(Op::Free, |tr| {
            let key = k(client, id);
            (&tr.tokens, &tr.usage).transaction(|(tokens, usage)| {
                let Some(old) = tokens.remove(key.as_slice())? else {
                    return Err(Cte::Abort(StoreError::NotFound));
                };
                apply_usage(usage, client, Some(old.len()), None, None)?;
                Ok(())
            })?;
            Ok(())
        })
    }

    fn redeem_token(&self, client: &str, id: &str, now: i64) -> Result<StoredToken, StoreError> {
        self.with(Op::Write, |tr| {
            let key = k(client, id);
            let t = tr.tokens.transaction(|tokens| {
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
        })
    }

    fn sweep_tokens(&self, now: i64) -> Result<u64, StoreError> {
        self.with(Op::Free, |tr| {
            let mut n = 0;
            for item in tr.tokens.iter() {
                let (key, v) = item?;
                let Ok(t) = from_json::<StoredToken>(&v) else {
                    continue;
                };
                if t.expires_at <= now {
                    let client = key.split(|b| *b == 0).next().unwrap_or_default();
                    let client = String::from_utf8_lossy(client).to_string();
                    let removed = (&tr.tokens, &tr.usage).transaction(|(tokens, usage)| {
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
        })
    }

    fn get_cart(&self, client: &str, id: &str) -> Result<Cart, StoreError> {
        self.with(Op::Read, |tr| {
            let v = tr.carts.get(k(client, id))?.ok_or(StoreError::NotFound)?;
            from_json(&v)
        })
    }

    fn put_cart(
        &self,
        client: &str,
        cart: Cart,
        if_match: Option<u64>,
        l: Limits,
    ) -> Result<Cart, StoreError> {
        self.with(Op::Write, |tr| {
            let key = k(client, &cart.id);
            let c = (&tr.carts, &tr.usage).transaction(|(carts, usage)| {
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
        })
    }

    fn delete_cart(&self, client: &str, id: &str, if_match: Option<u64>) -> Result<(), StoreError> {
        self.with(Op::Free, |tr| {
            let key = k(client, id);
            (&tr.carts, &tr.usage).transaction(|(carts, usage)| {
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
        })
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
        self.with(Op::Write, |tr| {
            let ckey = k(client, cart_id);
            let ikey = k(client, idem);
            let r = (
                &tr.carts,
                &tr.usage,
                &tr.receipts,
                &tr.outbox,
                &tr.meta,
                &tr.checkouts,
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
                    let rec = self.new_record(
                        meta,
                        client,
                        ("checkout", idem),
                        format!("cart:{client}:{cart_id}"),
                        serde_json::json!({ "type": "checkout", "receipt": r }),
                        now,
                    )?;
                    outbox.insert(&rec.id.to_be_bytes(), to_json(&rec))?;
                    Ok(r)
                })?;
            Ok(r)
        })
    }

    fn enqueue_event(
        &self,
        client: &str,
        group: &str,
        key: &str,
        body: serde_json::Value,
        now: i64,
        l: Limits,
    ) -> Result<OutboxRecord, StoreError> {
        self.with(Op::Write, |tr| {
            let ikey = k(client, &format!("event:{key}"));
            let rec = (&tr.outbox, &tr.meta, &tr.checkouts, &tr.usage).transaction(
                |(outbox, meta, checkouts, usage)| {
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
                    let rec = self.new_record(
                        meta,
                        client,
                        ("event", key),
                        format!("event:{client}:{group}"),
                        body.clone(),
                        now,
                    )?;
                    apply_usage(usage, client, None, Some(event_size(&rec)), Some(l))?;
                    outbox.insert(&rec.id.to_be_bytes(), to_json(&rec))?;
                    checkouts.insert(ikey.as_slice(), &rec.id.to_be_bytes())?;
                    Ok(rec)
                },
            )?;
            Ok(rec)
        })
    }

    fn receipts(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page<Receipt>, StoreError> {
        self.with(Op::Read, |tr| {
            page(&tr.receipts, from, limit, max_bytes, |_| true)
        })
    }

    fn outbox_of(
        &self,
        client: &str,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page<OutboxRecord>, StoreError> {
        self.with(Op::Read, |tr| {
            page(&tr.outbox, from, limit, max_bytes, |r: &OutboxRecord| {
                r.client == client
            })
        })
    }

    fn dead_of(
        &self,
        client: &str,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page<DeadLetter>, StoreError> {
        self.with(Op::Read, |tr| {
            page(&tr.dead, from, limit, max_bytes, |d: &DeadLetter| {
                d.record.client == client
            })
        })
    }

    fn dead_letter(&self, id: u64) -> Result<DeadLetter, StoreError> {
        self.with(Op::Read, |tr| {
            from_json(&tr.dead.get(id.to_be_bytes())?.ok_or(StoreError::NotFound)?)
        })
    }

    fn dead_len(&self) -> usize {
        self.with(Op::Read, |tr| Ok(tr.dead.len())).unwrap_or(0)
    }

    fn outbox(&self, limit: usize) -> Result<Vec<OutboxRecord>, StoreError> {
        self.with(Op::Read, |tr| {
            tr.outbox
                .iter()
                .take(limit)
                .map(|r| from_json(&r?.1))
                .collect()
        })
    }

    fn outbox_len(&self) -> usize {
        self.with(Op::Read, |tr| Ok(tr.outbox.len())).unwrap_or(0)
    }

    fn delivered(&self, id: u64, now: i64) -> Result<(), StoreError> {
        self.with(Op::Free, |tr| {
            (&tr.outbox, &tr.synced, &tr.usage).transaction(|(outbox, synced, usage)| {
                if let Some(v) = outbox.remove(&id.to_be_bytes())? {
                    let rec: OutboxRecord = from_json(&v).map_err(Cte::Abort)?;
                    synced.insert(rec.client.as_bytes(), &now.to_be_bytes())?;
                    if is_event(&rec) {
                        apply_usage(usage, &rec.client, Some(event_size(&rec)), None, None)?;
                    }
                }
                Ok(())
            })?;
            Ok(())
        })
    }

    fn retry_later(&self, id: u64, next_at_ms: i64, error: &str) -> Result<(), StoreError> {
        self.with(Op::Free, |tr| {
            tr.outbox.transaction(|outbox| {
                if let Some(v) = outbox.get(id.to_be_bytes())? {
                    let mut rec: OutboxRecord = from_json(&v).map_err(Cte::Abort)?;
                    rec.attempts += 1;
                    rec.next_at_ms = next_at_ms;
                    rec.last_error = Some(error.to_string());
                    outbox.insert(&rec.id.to_be_bytes(), to_json(&rec))?;
                }
                Ok(())
            })?;
            Ok(())
        })
    }

    fn dead(&self, id: u64, reason: &str, now: i64) -> Result<(), StoreError> {
        self.with(Op::Free, |tr| {
            (&tr.outbox, &tr.dead).transaction(|(outbox, dead)| {
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
        })
    }

    fn retry_dead(&self, id: u64) -> Result<(), StoreError> {
        self.with(Op::Write, |tr| {
            (&tr.outbox, &tr.dead).transaction(|(outbox, dead)| {
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
        })
    }

    fn drop_dead(&self, id: u64) -> Result<(), StoreError> {
        self.with(Op::Free, |tr| {
            (&tr.dead, &tr.usage).transaction(|(dead, usage)| {
                let Some(v) = dead.remove(&id.to_be_bytes())? else {
                    return Err(Cte::Abort(StoreError::NotFound));
                };
                let d: DeadLetter = from_json(&v).map_err(Cte::Abort)?;
                if is_event(&d.record) {
                    let size = Some(event_size(&d.record));
                    apply_usage(usage, &d.record.client, size, None, None)?;
                }
                Ok(())
            })?;
            Ok(())
        })
    }

    fn last_sync(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.with(Op::Read, |tr| {
            tr.synced
                .iter()
                .map(|r| {
                    let (k, v) = r?;
                    let t = <[u8; 8]>::try_from(v.as_ref()).map_or(0, i64::from_be_bytes);
                    Ok((String::from_utf8_lossy(&k).to_string(), t))
                })
                .collect()
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let _one = self.flushing.lock().await;
        let db = self.with(Op::Read, |tr| Ok(tr.db.clone()))?;
        let r = tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Io(format!("flush task: {e}")))?;
        if let Err(e) = r {
            // What the request changed may be in memory only: serve nothing from memory
            // until the store is reopened from disk.
            self.failed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(())
    }

    fn storage(&self) -> Storage {
        let full = self.short_of_room();
        let free_bytes = self.room();
        Storage {
            ok: !self.failed.load(Ordering::SeqCst) && !full,
            free_bytes,
        }
    }
}
