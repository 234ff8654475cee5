//! Config revisions on disk and the confirmed commit (Junos' `commit confirmed`, netplan's
//! `try`): every applied config is kept as a numbered revision with its time, author and
//! message (the last [`KEEP`]); an apply records a *pending* confirmation with a
//! deadline, and unless it is confirmed in time the previous revision is restored — by
//! the daemon, which checks at start-up too, so a restart or a reboot does not escape it.
//!
//! Files in the store's directory (each written atomically: temporary file, fsync,
//! rename, fsync of the directory): `NNNNNN.toml` + `NNNNNN.json` per revision, `active`
//! (the revision in force), `pending.json` (the confirmation awaited). The decision itself
//! ([`decide`]) is pure.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Revisions kept (older ones are pruned).
pub const KEEP: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("no revision {0}")]
    Missing(u64),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RevisionError + '_ {
    move |source| RevisionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub number: u64,
    /// Unix time (seconds) it was stored.
    pub at: i64,
    pub author: String,
    pub message: String,
    /// Hex SHA-256 of the file's text.
    pub sha256: String,
}

/// An apply waiting for `stallnet config confirm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub revision: u64,
    /// What to restore if the deadline passes (`None`: there was nothing before).
    pub previous: Option<u64>,
    /// Unix time (seconds).
    pub deadline: i64,
}

/// What the rollback guard should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is pending.
    Idle,
    /// Pending; the deadline is this many seconds away.
    Wait(i64),
    /// The deadline passed unconfirmed: restore this revision.
    RollBack(Option<u64>),
}

/// The confirmed-commit rule.
pub fn decide(pending: Option<&Pending>, now: i64) -> Decision {
    match pending {
        None => Decision::Idle,
        Some(p) if now >= p.deadline => Decision::RollBack(p.previous),
        Some(p) => Decision::Wait(p.deadline - now),
    }
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir` (created if needed).
    pub fn open(dir: &Path) -> Result<Self, RevisionError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The usual place: `<state_dir>/config-revisions`.
    pub fn dir_for(state_dir: &Path) -> PathBuf {
        state_dir.join("config-revisions")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), RevisionError> {
        write_atomic(&self.path(name), bytes)
    }

    /// Stores `text` as a new revision.
    pub fn add(
        &self,
        text: &str,
        author: &str,
        message: &str,
        now: i64,
    ) -> Result<Revision, RevisionError> {
        let number = self.list()?.first().map_or(1, |r| r.number + 1);
        let rev = Revision {
            number,
            at: now,
            author: author.to_string(),
            message: message.to_string(),
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes())),
        };
        self.write_atomic(&format!("{number:06}.toml"), text.as_bytes())?;
        let meta = serde_json::to_vec_pretty(&rev).map_err(|e| RevisionError::Corrupt {
            path: self.path("meta"),
            message: e.to_string(),
        })?;
        self.write_atomic(&format!("{number:06}.json"), &meta)?;
        self.prune()?;
        Ok(rev)
    }

    /// Revisions, newest first.
    pub fn list(&self) -> Result<Vec<Revision>, RevisionError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if stem.parse::<u64>().is_err() {
                continue;
            }
            let p = entry.path();
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            let rev: Revision =
                serde_json::from_slice(&bytes).map_err(|e| RevisionError::Corrupt {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
            out.push(rev);
        }
        out.sort_by_key(|r| std::cmp::Reverse(r.number));
        Ok(out)
    }

    /// A revision's text.
    pub fn text(&self, number: u64) -> Result<String, RevisionError> {
        let p = self.path(&format!("{number:06}.toml"));
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(RevisionError::Missing(number))
            }
            Err(e) => Err(io(&p)(e)),
        }
    }

    fn prune(&self) -> Result<(), RevisionError> {
        let keep: Vec<u64> = [self.active()?, self.pending()?.and_then(|p| p.previous)]
            .into_iter()
            .flatten()
            .collect();
        for old in self.list()?.into_iter().skip(KEEP) {
            if keep.contains(&old.number) {
                continue;
            }
            for ext in ["toml", "json"] {
                let p = self.path(&format!("{:06}.{ext}", old.number));
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        Ok(())
    }

    /// The revision in force, if any.
    pub fn active(&self) -> Result<Option<u64>, RevisionError> {
        let p = self.path("active");
        match std::fs::read_to_string(&p) {
            Ok(t) => t
                .trim()
                .parse()
                .map(Some)
                .map_err(|e: std::num::ParseIntError| RevisionError::Corrupt {
                    path: p,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    pub fn set_active(&self, number: u64) -> Result<(), RevisionError> {
        self.write_atomic("active", format!("{number}\n").as_bytes())
    }

    pub fn pending(&self) -> Result<Option<Pending>, RevisionError> {
        let p = self.path("pending.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| RevisionError::Corrupt {
                    path: p,
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    pub fn set_pending(&self, pending: Option<&Pending>) -> Result<(), RevisionError> {
        let p = self.path("pending.json");
        match pending {
            Some(v) => {
                let bytes = serde_json::to_vec_pretty(v).map_err(|e| RevisionError::Corrupt {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
                self.write_atomic("pending.json", &bytes)
            }
            None => match std::fs::remove_file(&p) {
                Ok(()) => sync_dir(&self.dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(&p)(e)),
            },
        }
    }
}

/// Writes `path` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RevisionError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), RevisionError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sn-rev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_deadline_decides() {
        let p = Pending {
            revision: 3,
            previous: Some(2),
            deadline: 100,
        };
        assert_eq!(decide(None, 50), Decision::Idle);
        assert_eq!(decide(Some(&p), 40), Decision::Wait(60));
        assert_eq!(decide(Some(&p), 100), Decision::RollBack(Some(2)));
        assert_eq!(decide(Some(&p), 10_000), Decision::RollBack(Some(2)));
    }

    #[test]
    fn revisions_are_numbered_kept_and_pruned() {
        let d = tmp("store");
        let s = Store::open(&d).expect("store");
        assert_eq!(s.active().expect("active"), None);
        let r1 = s.add("a = 1\n", "tech", "first", 10).expect("add");
        let r2 = s.add("a = 2\n", "tech", "second", 20).expect("add");
        assert_eq!((r1.number, r2.number), (1, 2));
        assert_eq!(s.text(1).expect("text"), "a = 1\n");
        s.set_active(1).expect("active");
        s.set_pending(Some(&Pending {
            revision: 2,
            previous: Some(1),
            deadline: 99,
        }))
        .expect("pending");
        // Reopened (a restarted daemon): everything is still there.
        let s = Store::open(&d).expect("reopen");
        assert_eq!(s.active().expect("active"), Some(1));
        assert_eq!(s.pending().expect("pending").map(|p| p.deadline), Some(99));
        for i in 3..=60 {
            s.add(&format!("a = {i}\n"), "tech", "more", i)
                .expect("add");
        }
        let list = s.list().expect("list");
        assert_eq!(list[0].number, 60);
        // 50 kept, plus revision 1: active and the pending rollback's target.
        assert_eq!(
            list.len(),
            KEEP + 1,
            "{:?}",
            list.iter().map(|r| r.number).collect::<Vec<_>>()
        );
        assert!(list.iter().any(|r| r.number == 1));
        assert!(matches!(s.text(5), Err(RevisionError::Missing(5))));
        s.set_pending(None).expect("clear");
        assert_eq!(s.pending().expect("pending"), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
