//! The hub's book of invites and enrolled devices (`<state_dir>/fleet.json`), and the
//! rules for them, as plain functions of `now` (seconds since the epoch): an invite is
//! good once, until it expires, for a name nobody else has; a redeemed invite is kept
//! (so a second use is told "already used", not "unknown"); a revoked name's device
//! and pending invites go. The hub is the only writer; every change is written whole
//! (temporary file, fsync, rename) before it is acted on.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::code::secret_digest;

/// The book's file in the hub's state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet.json")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub name: String,
    pub lan: Vec<IpNet>,
    /// SHA-256 of the secret, hex (the secret itself is only in the code).
    pub secret_sha256: String,
    pub created_unix: u64,
    pub expires_unix: u64,
    /// The identity that redeemed it, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub name: String,
    pub identity: String,
    pub lan: Vec<IpNet>,
    pub enrolled_unix: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub version: u32,
    #[serde(default)]
    pub invites: Vec<Invite>,
    #[serde(default)]
    pub devices: Vec<Enrolled>,
}

/// Why the hub refused a code (told to the box as `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("the hub knows no such invite (a typo, or it was revoked)")]
    Unknown,
    #[error("this invite has expired: ask the organiser for a new one")]
    Expired,
    #[error("this invite was already used: ask the organiser for a new one")]
    Used,
    #[error("this box is already enrolled on the hub (under another name)")]
    AlreadyEnrolled,
    #[error("the enrollment request was malformed")]
    BadRequest,
    #[error("the hub could not record the device (see its log): try again")]
    HubError,
}

/// Why an invite could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("expected a name of 1 to 63 letters, digits, '-' or '_', got {0:?}")]
    Name(String),
    #[error("the name {0:?} is taken (a device or a pending invite has it)")]
    Taken(String),
    #[error("expected IPv4 LAN prefixes without overlaps, got {0}")]
    Lan(String),
    #[error("expected an expiry from 1 minute to 30 days")]
    Expiry,
}

/// A device name as the config takes it.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Book {
    /// Reads the book (an empty one when the file does not exist yet).
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let p = path(state_dir);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: {e} (fix or move it aside)", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                version: 1,
                ..Self::default()
            }),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", p.display())),
        }
    }

    /// Writes the book whole (temporary file, fsync, rename), 0600.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        crate::identity::write_private(&path(state_dir), &serde_json::to_vec_pretty(self)?)
    }

    /// Records an invite for `name` (whose secret is `secret`), valid for `valid_s`.
    /// `taken` says whether a name is used elsewhere (the config's devices).
    pub fn invite(
        &mut self,
        name: &str,
        lan: Vec<IpNet>,
        secret: &[u8],
        valid_s: u64,
        now: u64,
        taken: impl Fn(&str) -> bool,
    ) -> Result<&Invite, InviteError> {
        if !valid_name(name) {
            return Err(InviteError::Name(name.into()));
        }
        if !(60..=30 * 86_400).contains(&valid_s) {
            return Err(InviteError::Expiry);
        }
        let overlap = lan.iter().enumerate().any(|(i, p)| {
            lan[..i]
                .iter()
                .any(|q| q.contains(&p.network()) || p.contains(&q.network()))
        });
        if lan.is_empty() || overlap || lan.iter().any(|p| !p.network().is_ipv4()) {
            let list: Vec<String> = lan.iter().map(ToString::to_string).collect();
            return Err(InviteError::Lan(format!("[{}]", list.join(", "))));
        }
        let pending = |i: &Invite| i.used_by.is_none() && i.expires_unix > now;
        if taken(name)
            || self.devices.iter().any(|d| d.name == name)
            || self.invites.iter().any(|i| i.name == name && pending(i))
        {
            return Err(InviteError::Taken(name.into()));
        }
        // Expired and used invites of this name are history now.
        self.invites.retain(|i| i.name != name);
        self.invites.push(Invite {
            name: name.into(),
            lan,
            secret_sha256: secret_digest(secret),
            created_unix: now,
            expires_unix: now.saturating_add(valid_s),
            used_by: None,
            used_unix: None,
        });
        self.invites.last().ok_or(InviteError::Expiry)
    }

    /// The device that redeemed the invite whose secret is `secret`, when that was
    /// `identity` and the device is still enrolled: the same box asking again (its answer
    /// was lost, or it restarted before pinning the hub) gets the same answer.
    pub fn redeemed_by(&self, secret: &[u8], identity: &str) -> Option<&Enrolled> {
        let digest = secret_digest(secret);
        self.invites
            .iter()
            .find(|i| i.secret_sha256 == digest && i.used_by.as_deref() == Some(identity))?;
        self.devices.iter().find(|d| d.identity == identity)
    }

    /// Redeems the invite whose secret is `secret` for `identity`: the new device.
    pub fn redeem(&mut self, secret: &[u8], identity: &str, now: u64) -> Result<Enrolled, Refusal> {
        let digest = secret_digest(secret);
        let Some(i) = self.invites.iter().position(|i| i.secret_sha256 == digest) else {
            return Err(Refusal::Unknown);
        };
        let inv = &self.invites[i];
        if inv.used_by.is_some() {
            return Err(Refusal::Used);
        }
        if now >= inv.expires_unix {
            return Err(Refusal::Expired);
        }
        if self.devices.iter().any(|d| d.identity == identity) {
            return Err(Refusal::AlreadyEnrolled);
        }
        let dev = Enrolled {
            name: inv.name.clone(),
            identity: identity.into(),
            lan: inv.lan.clone(),
            enrolled_unix: now,
        };
        let inv = &mut self.invites[i];
        inv.used_by = Some(identity.into());
        inv.used_unix = Some(now);
        self.devices.push(dev.clone());
        Ok(dev)
    }

    /// Takes `name` out: its device and its pending invites. True when there was any.
    pub fn revoke(&mut self, name: &str) -> bool {
        let before = (self.devices.len(), self.invites.len());
        self.devices.retain(|d| d.name != name);
        self.invites
            .retain(|i| i.name != name || i.used_by.is_some());
        before != (self.devices.len(), self.invites.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sn1:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sn1:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn lan() -> Vec<IpNet> {
        vec!["10.1.0.0/24".parse().expect("lan")]
    }

    #[test]
    fn an_invite_is_good_once_until_it_expires() {
        let mut b = Book::default();
        b.invite("fish", lan(), b"secret-1", 3600, 1000, |_| false)
            .expect("invite");
        assert_eq!(b.redeem(b"wrong", A, 1001), Err(Refusal::Unknown));
        let d = b.redeem(b"secret-1", A, 1001).expect("redeem");
        assert_eq!((d.name.as_str(), d.identity.as_str()), ("fish", A));
        assert_eq!(b.redeem(b"secret-1", B, 1002), Err(Refusal::Used));
        // The same box asking again is told it is in; another box, or the wrong secret,
        // is not.
        assert_eq!(
            b.redeemed_by(b"secret-1", A).map(|d| d.name.as_str()),
            Some("fish")
        );
        assert!(b.redeemed_by(b"secret-1", B).is_none());
        assert!(b.redeemed_by(b"wrong", A).is_none());
        b.invite("bread", lan(), b"secret-2", 60, 2000, |_| false)
            .expect("invite");
        assert_eq!(b.redeem(b"secret-2", B, 2060), Err(Refusal::Expired));
        // The wrong secret taught the book nothing.
        assert_eq!(b.devices.len(), 1);
        // Revoked: asking again does not bring the box back.
        assert!(b.revoke("fish"));
        assert!(b.redeemed_by(b"secret-1", A).is_none());
        assert_eq!(b.redeem(b"secret-1", A, 1003), Err(Refusal::Used));
    }

    #[test]
    fn names_identities_and_lans_are_checked() {
        let mut b = Book::default();
        assert!(matches!(
            b.invite("bad name", lan(), b"s", 3600, 0, |_| false),
            Err(InviteError::Name(_))
        ));
        assert!(matches!(
            b.invite("stall", lan(), b"s", 3600, 0, |n| n == "stall"),
            Err(InviteError::Taken(_))
        ));
        assert!(matches!(
            b.invite(
                "x",
                vec!["fd00::/64".parse().expect("v6")],
                b"s",
                3600,
                0,
                |_| false
            ),
            Err(InviteError::Lan(_))
        ));
        assert!(matches!(
            b.invite("x", lan(), b"s", 10, 0, |_| false),
            Err(InviteError::Expiry)
        ));
        b.invite("fish", lan(), b"s1", 3600, 0, |_| false)
            .expect("invite");
        assert!(matches!(
            b.invite("fish", lan(), b"s2", 3600, 0, |_| false),
            Err(InviteError::Taken(_))
        ));
        b.redeem(b"s1", A, 1).expect("redeem");
        b.invite("bread", lan(), b"s3", 3600, 0, |_| false)
            .expect("invite");
        assert_eq!(b.redeem(b"s3", A, 2), Err(Refusal::AlreadyEnrolled));
    }

    #[test]
    fn revoking_takes_the_device_and_its_pending_invites() {
        let mut b = Book::default();
        b.invite("fish", lan(), b"s1", 3600, 0, |_| false)
            .expect("invite");
        b.redeem(b"s1", A, 1).expect("redeem");
        b.invite("bread", lan(), b"s2", 3600, 0, |_| false)
            .expect("invite");
        assert!(b.revoke("fish"));
        assert!(b.devices.is_empty());
        assert!(b.revoke("bread"));
        assert_eq!(b.redeem(b"s2", B, 5), Err(Refusal::Unknown));
        assert!(!b.revoke("nobody"));
    }
}
