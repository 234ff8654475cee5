//! Invite codes: what a box needs to join a hub, short enough to type or put in a QR
//! code. A code carries the hub's addresses, the hub's identity (so the box pins the hub
//! before it says anything) and a one-time secret; the hub keeps only the secret's
//! SHA-256, with the invite's name, LAN and expiry.
//!
//! Layout (version 1): `1 | secret (16) | hub identity (32) | n × (IPv4 (4) | port (2)) |
//! check (2)`, in base32 (no padding) grouped by four with dashes behind `SN-`. The check
//! is the first two bytes of the SHA-256 of what precedes it, so a typo is caught on the
//! box, before anything is sent. Decoding ignores case, spaces and dashes.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use data_encoding::BASE32_NOPAD;

const VERSION: u8 = 1;
const SECRET: usize = 16;
const HUB_ID: usize = 32;
const ADDR: usize = 6;
const CHECK: usize = 2;
/// Most hub addresses one code carries.
pub const MAX_ADDRESSES: usize = 4;
const PREFIX: &str = "SN-";

/// A decoded invite code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub secret: [u8; SECRET],
    /// The hub's identity (`sn1:` and 64 hex digits).
    pub hub_identity: String,
    pub hub_addresses: Vec<SocketAddrV4>,
}

/// Why a code was refused on the box.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("not an invite code: expected SN- and groups of letters A-Z and digits 2-7")]
    NotBase32,
    #[error(
        "the code is {0} bytes long: expected one with 1 to 4 hub addresses (was it cut short?)"
    )]
    Length(usize),
    #[error("the code is from a newer stallnet (version {0}): update this box")]
    Version(u8),
    #[error("the code has a typo (its check does not match): read it again from the hub")]
    Check,
    #[error("the code names no hub address")]
    NoAddress,
}

/// A hub identity that is not `sn1:` and 64 hex digits, or an address that is not IPv4.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("not a hub identity: {0}")]
    Identity(String),
    #[error("invite codes carry IPv4 hub addresses only, got {0}")]
    NotIpv4(SocketAddr),
    #[error("expected 1 to {MAX_ADDRESSES} hub addresses, got {0}")]
    Addresses(usize),
}

fn check_of(body: &[u8]) -> [u8; CHECK] {
    let d = ring::digest::digest(&ring::digest::SHA256, body);
    [d.as_ref()[0], d.as_ref()[1]]
}

impl Code {
    /// The code as printed: `SN-` and base32 in groups of four.
    pub fn encode(
        secret: [u8; SECRET],
        hub_identity: &str,
        addresses: &[SocketAddr],
    ) -> Result<String, EncodeError> {
        let id = hub_identity
            .strip_prefix("sn1:")
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() == HUB_ID)
            .ok_or_else(|| EncodeError::Identity(hub_identity.to_string()))?;
        if addresses.is_empty() || addresses.len() > MAX_ADDRESSES {
            return Err(EncodeError::Addresses(addresses.len()));
        }
        let mut b = vec![VERSION];
        b.extend_from_slice(&secret);
        b.extend_from_slice(&id);
        for a in addresses {
            let SocketAddr::V4(v4) = a else {
                return Err(EncodeError::NotIpv4(*a));
            };
            b.extend_from_slice(&v4.ip().octets());
            b.extend_from_slice(&v4.port().to_be_bytes());
        }
        let check = check_of(&b);
        b.extend_from_slice(&check);
        let text = BASE32_NOPAD.encode(&b);
        let groups: Vec<&str> = text
            .as_bytes()
            .chunks(4)
            .filter_map(|c| std::str::from_utf8(c).ok())
            .collect();
        Ok(format!("{PREFIX}{}", groups.join("-")))
    }

    /// Reads a code as a person typed it.
    pub fn decode(text: &str) -> Result<Self, CodeError> {
        let clean: String = text
            .chars()
            .filter(|c| !matches!(c, '-' | ' ' | '\n' | '\r' | '\t'))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        // The data of version 1 starts with 'A' (its first five bits are zero), never "SN".
        let clean = clean.strip_prefix("SN").unwrap_or(&clean);
        let b = BASE32_NOPAD
            .decode(clean.as_bytes())
            .map_err(|_| CodeError::NotBase32)?;
        let fixed = 1 + SECRET + HUB_ID + CHECK;
        let n = b
            .len()
            .checked_sub(fixed)
            .ok_or(CodeError::Length(b.len()))?;
        if n % ADDR != 0 || n / ADDR > MAX_ADDRESSES {
            return Err(CodeError::Length(b.len()));
        }
        if b[0] != VERSION {
            return Err(CodeError::Version(b[0]));
        }
        let (body, check) = b.split_at(b.len() - CHECK);
        if check_of(body) != check {
            return Err(CodeError::Check);
        }
        if n == 0 {
            return Err(CodeError::NoAddress);
        }
        let mut secret = [0u8; SECRET];
        secret.copy_from_slice(&body[1..1 + SECRET]);
        let id = &body[1 + SECRET..1 + SECRET + HUB_ID];
        let hub_addresses = body[1 + SECRET + HUB_ID..]
            .chunks_exact(ADDR)
            .map(|c| {
                SocketAddrV4::new(
                    Ipv4Addr::new(c[0], c[1], c[2], c[3]),
                    u16::from_be_bytes([c[4], c[5]]),
                )
            })
            .collect();
        Ok(Self {
            secret,
            hub_identity: format!("sn1:{}", hex::encode(id)),
            hub_addresses,
        })
    }
}

/// The SHA-256 of a secret, in hex: what the hub keeps of an invite's secret.
pub fn secret_digest(secret: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HUB: &str = "sn1:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_code_reads_back_as_typed_sloppily() {
        let code = Code::encode([7; 16], HUB, &[addr("203.0.113.5:4433")]).expect("code");
        assert!(code.starts_with("SN-"));
        assert!(code.len() < 120, "{code} is {} characters", code.len());
        let sloppy = code.to_lowercase().replace('-', " ");
        let c = Code::decode(&sloppy).expect("decode");
        assert_eq!(c.secret, [7; 16]);
        assert_eq!(c.hub_identity, HUB);
        assert_eq!(
            c.hub_addresses,
            vec!["203.0.113.5:4433".parse().expect("a")]
        );
    }

    #[test]
    fn typos_truncation_and_garbage_are_refused_with_a_reason() {
        let code = Code::encode([1; 16], HUB, &[addr("203.0.113.5:4433")]).expect("code");
        // One character changed: the check catches it.
        let mut typo: Vec<char> = code.chars().collect();
        let i = typo.len() / 2;
        typo[i] = if typo[i] == 'A' { 'B' } else { 'A' };
        let typo: String = typo.into_iter().collect();
        assert!(matches!(
            Code::decode(&typo),
            Err(CodeError::Check | CodeError::NotBase32)
        ));
        assert!(matches!(
            Code::decode(&code[..code.len() - 8]),
            Err(CodeError::Length(_) | CodeError::NotBase32)
        ));
        assert_eq!(Code::decode("SN-hello-world!"), Err(CodeError::NotBase32));
        assert!(matches!(Code::decode(""), Err(CodeError::Length(0))));
    }

    #[test]
    fn encoding_refuses_what_a_code_cannot_carry() {
        assert!(Code::encode([0; 16], "sn1:zz", &[addr("1.2.3.4:1")]).is_err());
        assert!(Code::encode([0; 16], HUB, &[]).is_err());
        assert!(Code::encode([0; 16], HUB, &[addr("[::1]:4433")]).is_err());
        let five: Vec<SocketAddr> = (1..=5).map(|i| addr(&format!("10.0.0.{i}:1"))).collect();
        assert!(Code::encode([0; 16], HUB, &five).is_err());
    }

    proptest! {
        #[test]
        fn any_text_decodes_or_is_refused_without_panic(s in ".{0,200}") {
            let _ = Code::decode(&s);
        }

        #[test]
        fn any_code_round_trips(secret in any::<[u8; 16]>(), ips in proptest::collection::vec(any::<([u8; 4], u16)>(), 1..=4)) {
            let addrs: Vec<SocketAddr> = ips.iter().map(|(ip, port)| SocketAddr::from((*ip, *port))).collect();
            let code = Code::encode(secret, HUB, &addrs).expect("code");
            let c = Code::decode(&code).expect("decode");
            prop_assert_eq!(c.secret, secret);
            prop_assert_eq!(c.hub_addresses.len(), addrs.len());
        }
    }
}
