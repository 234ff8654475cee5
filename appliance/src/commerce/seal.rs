//! Token values at rest: sealed with ChaCha20-Poly1305 under a key kept in the state
//! directory (`commerce.key`, 0600, created on first use). A sealed value is
//! `hex(nonce || ciphertext || tag)`; the token's storage key is the associated data, so
//! a sealed value moved to another token does not open.

use std::path::Path;

use anyhow::{Context, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    /// Loads the key from `state_dir/commerce.key`, creating it (0600) if absent.
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("commerce.key");
        let rng = SystemRandom::new();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                rng.fill(&mut k)
                    .map_err(|_| anyhow::anyhow!("no randomness"))?;
                write_private(&path, &k)?;
                k.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        anyhow::ensure!(bytes.len() == 32, "{} is not a 32-byte key", path.display());
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| anyhow::anyhow!("bad key in {}", path.display()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    pub fn seal(&self, aad: &[u8], value: &[u8]) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut buf = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| anyhow::anyhow!("seal failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(hex::encode(out))
    }

    pub fn open(&self, aad: &[u8], sealed: &str) -> Option<Vec<u8>> {
        let raw = hex::decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (n, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(n).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let dir = std::env::temp_dir().join(format!("sn-seal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Sealer::load_or_create(&dir).expect("key");
        let mode = std::fs::metadata(dir.join("commerce.key"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .expect("meta");
        assert_eq!(mode, 0o600);
        let sealed = s.seal(b"till/t1", b"secret-token").expect("seal");
        assert!(!sealed.contains("secret"));
        assert_eq!(
            s.open(b"till/t1", &sealed).as_deref(),
            Some(&b"secret-token"[..])
        );
        assert_eq!(s.open(b"till/t2", &sealed), None);
        // The same key file opens it after a restart.
        let again = Sealer::load_or_create(&dir).expect("key");
        assert!(again.open(b"till/t1", &sealed).is_some());
        assert_eq!(again.open(b"till/t1", "zz"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
