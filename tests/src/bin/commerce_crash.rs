//! `stallnet-commerce-crash DIR [PAUSE_MS]`: hammers checkouts on the commerce store in DIR (the real
//! sled store and receipt signing), printing each sale's idempotency key only after the
//! store has flushed it: the line is the acknowledgement. Run until killed; the crash test
//! kills it with SIGKILL at random moments.

use std::io::Write;

use anyhow::{Context, Result};
use ring::signature::Ed25519KeyPair;
use stallnet::commerce::model::Cart;
use stallnet::commerce::store::{CommerceStore, Limits, SledStore};

fn main() -> Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).context("usage: DIR")?);
    let pk = dir.join("device.pk8");
    let key = match std::fs::read(&pk) {
        Ok(b) => b,
        Err(_) => {
            let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("keygen"))?;
            std::fs::write(&pk, doc.as_ref())?;
            doc.as_ref().to_vec()
        }
    };
    let key = Ed25519KeyPair::from_pkcs8(&key).map_err(|_| anyhow::anyhow!("bad key"))?;
    let store = SledStore::open(&dir.join("commerce"), key).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let limits = Limits {
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
    };
    let pause: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let me = std::process::id();
    let mut out = std::io::stdout().lock();
    for n in 0u64.. {
        let id = format!("c{me}-{n}");
        let cart = Cart {
            id: id.clone(),
            version: 0,
            currency: "EUR".into(),
            items: vec![stallnet::commerce::model::LineItem {
                sku: "coffee".into(),
                name: String::new(),
                quantity: 1,
                unit_price: n as i64,
            }],
            total: n as i64,
            updated_at: 0,
        };
        store
            .put_cart("till", cart, None, limits)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = format!("k{me}-{n}");
        store
            .checkout("till", &id, None, "cash", &key, 0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        rt.block_on(store.flush())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        writeln!(out, "{key}")?;
        out.flush()?;
        if pause > 0 {
            std::thread::sleep(std::time::Duration::from_millis(pause));
        }
    }
    Ok(())
}
