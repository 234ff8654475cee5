//! Device identity: an Ed25519 key and a self-signed certificate in the state directory,
//! and the TLS 1.3 configurations that authenticate both ends by *pinned identity*.
//!
//! An identity is `sn1:` followed by the hex SHA-256 of the device certificate. The hub
//! admits only listed identities; the edge accepts only the pinned hub identity.
//! Certificate dates are never checked: a Pi without a real-time clock may boot days
//! wrong, and a pinned key says all that dates would.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::driver::session::PROTOCOLS;
use crate::log_limit::LogLimit;

/// The name the edge asks for; the hub certificate's SAN. Authentication is by pin.
pub const HUB_NAME: &str = "stallnet-hub";
const KEY_FILE: &str = "device.key";
const CERT_FILE: &str = "device.crt";

pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    pub id: String,
}

impl Identity {
    /// The device's Ed25519 key for signing (receipts).
    pub fn signing_key(&self) -> Result<ring::signature::Ed25519KeyPair> {
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(self.key.secret_pkcs8_der())
            .map_err(|e| anyhow::anyhow!("device key is not an Ed25519 key: {e}"))
    }
}

/// `sn1:` + hex SHA-256 of a certificate.
pub fn identity_of(cert: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut s = String::with_capacity(68);
    s.push_str("sn1:");
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (state_dir.join(KEY_FILE), state_dir.join(CERT_FILE))
}

/// Creates the device key and certificate. Refuses to overwrite unless `force`.
pub fn keygen(state_dir: &Path, force: bool) -> Result<Identity> {
    let (key_path, cert_path) = paths(state_dir);
    if key_path.exists() && !force {
        bail!(
            "{} exists; a new key changes this device's identity (use --force)",
            key_path.display()
        );
    }
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("generating key")?;
    let mut params = rcgen::CertificateParams::new(vec![HUB_NAME.to_string()])
        .context("certificate parameters")?;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    // Far-apart dates: they are never checked, but some tools print them.
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2999, 1, 1);
    let cert = params.self_signed(&key).context("self-signing")?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_private(&cert_path, cert.pem().as_bytes())?;
    load(state_dir)
}

/// Writes `data` to `path` readable by its owner only, whole or not at all (a temporary
/// file, fsync, rename).
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Loads the device identity written by [`keygen`].
pub fn load(state_dir: &Path) -> Result<Identity> {
    let (key_path, cert_path) = paths(state_dir);
    let key_pem = fs::read_to_string(&key_path).with_context(|| {
        format!(
            "reading {} (run `stallnet keygen` first)",
            key_path.display()
        )
    })?;
    let cert_pem = fs::read_to_string(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    let key = rcgen::KeyPair::from_pem(&key_pem).context("parsing device key")?;
    let cert_der = pem_der(&cert_pem).context("parsing device certificate")?;
    Ok(Identity {
        id: identity_of(&cert_der),
        cert: CertificateDer::from(cert_der),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

fn pem_der(pem: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .context("certificate base64")
}

/// ring with ChaCha20-Poly1305 first: a Pi 4 has no AES instructions.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// Shared set of identities the hub admits, replaceable on reload.
pub type AllowList = Arc<RwLock<HashSet<String>>>;

/// QUIC is TLS 1.3 only; both verifiers refuse a TLS 1.2 signature.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// A certificate that is not the pinned (or an allowed) identity.
fn not_pinned() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
}

#[derive(Debug)]
struct PinnedServer {
    pins: HashSet<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.contains(&identity_of(end_entity)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(not_pinned())
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug)]
struct AllowedClients {
    allow: AllowList,
    refused: Arc<AtomicU64>,
    /// A stranger can refuse itself thousands of times a second: one WARN per 10 s.
    refused_log: Mutex<LogLimit>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    /// A client without a certificate gets through the handshake, to the enrollment
    /// exchange only (`crate::enroll`); a certificate that is not admitted never does.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = identity_of(end_entity);
        let known = self.allow.read().map(|a| a.contains(&id)).unwrap_or(false);
        if known {
            Ok(ClientCertVerified::assertion())
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let allowed = self
                .refused_log
                .lock()
                .ok()
                .and_then(|mut l| l.allow(Instant::now()));
            if let Some(more) = allowed {
                tracing::warn!(
                    identity = %id,
                    more_since_last_line = more,
                    "refused unknown device (all refusals are counted in the status's refused_handshakes)"
                );
            }
            Err(not_pinned())
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Transport settings shared by both ends: a small datagram buffer (our own queues sit in
/// front of quinn), keep-alives that outlive cellular NAT timeouts, and path-MTU
/// discovery from a size most paths carry up to what a 1500-byte IPv4 path carries.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.datagram_send_buffer_size(8 * 1024)
        .datagram_receive_buffer_size(Some(2 * 1024 * 1024))
        // Probes keep a link busier than this (an idle backup's every 4 s): a PING only
        // goes out when they stop, so the keep-alive costs an idle backup nothing.
        .keep_alive_interval(Some(Duration::from_secs(5)))
        // 1350 bytes of UDP fit nearly every path from the start (and a 1 302-byte tunnel
        // packet); each connection's path-MTU discovery then searches up to 1 472 (a
        // 1500-byte IPv4 path, 1 424-byte tunnel packets) in steps down to 8 bytes, and
        // falls back when large packets stop arriving. The bond's path MTU follows.
        .initial_mtu(1350)
        .mtu_discovery_config(Some(mtu_discovery()))
        // The edge's link updates (`driver::session`), read one at a time by the hub.
        .max_concurrent_uni_streams(4u32.into())
        .max_concurrent_bidi_streams(4u32.into())
        // quinn's congestion window is only a ceiling: the bond's own in-flight cap
        // (`core::inflight`) and rate control (`core::rate`) keep a modem's buffer short.
        .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Path-MTU discovery for the uplinks (IPv4: a UDP payload of at most 1 472 bytes).
///
/// After a black hole it searches again within half a second, not quinn's minute. An
/// outage under load (large packets lost, the ACK-only packets between them splitting
/// the losses into bursts) can read as one, and the connection would then carry only
/// 1 200-byte datagrams for a minute: a restored uplink could not take the tunnel's
/// full-size packets (the likely cause of one failover run whose restored uplink stayed
/// unused to the end of the load). A real drop of the path's MTU is found by that
/// search, which then rests for the usual 600 s.
fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut m = quinn::MtuDiscoveryConfig::default();
    m.upper_bound(1472)
        .minimum_change(8)
        .black_hole_cooldown(Duration::from_millis(500));
    m
}

/// QUIC client configuration for the edge: our certificate, the hub pinned.
pub fn client_config(me: &Identity, hub_pins: &[String]) -> Result<quinn::ClientConfig> {
    client(hub_pins, Some(me), &PROTOCOLS)
}

/// [`client_config`] offering only the session versions `protocols` (an older edge, for
/// tests of the version choice).
pub fn client_config_speaking(
    me: &Identity,
    hub_pins: &[String],
    protocols: &[&[u8]],
) -> Result<quinn::ClientConfig> {
    client(hub_pins, Some(me), protocols)
}

/// QUIC client configuration for enrolling: the hub pinned, no certificate of ours (the
/// box proves the invite's secret instead, inside the connection).
pub fn enroll_client_config(hub_pin: &str) -> Result<quinn::ClientConfig> {
    client(&[hub_pin.to_string()], None, &PROTOCOLS)
}

fn client(
    hub_pins: &[String],
    me: Option<&Identity>,
    protocols: &[&[u8]],
) -> Result<quinn::ClientConfig> {
    let prov = provider();
    let verifier = Arc::new(PinnedServer {
        pins: hub_pins.iter().cloned().collect(),
        algs: prov.signature_verification_algorithms,
    });
    let builder = rustls::ClientConfig::builder_with_provider(prov)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match me {
        Some(me) => builder
            .with_client_auth_cert(
                vec![me.cert.clone()],
                PrivateKeyDer::Pkcs8(me.key.clone_key()),
            )
            .context("client certificate")?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC client TLS")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

/// QUIC server configuration for the hub: only `allow`ed identities get through the
/// handshake (or a client with no certificate, for enrollment); refusals are counted in
/// `refused`.
pub fn server_config(
    me: &Identity,
    allow: AllowList,
    refused: Arc<AtomicU64>,
) -> Result<quinn::ServerConfig> {
    server_config_speaking(me, allow, refused, &PROTOCOLS)
}

/// [`server_config`] accepting only the session versions `protocols` (an older hub, for
/// tests of the version choice).
pub fn server_config_speaking(
    me: &Identity,
    allow: AllowList,
    refused: Arc<AtomicU64>,
    protocols: &[&[u8]],
) -> Result<quinn::ServerConfig> {
    let prov = provider();
    let verifier = Arc::new(AllowedClients {
        allow,
        refused,
        refused_log: Mutex::new(LogLimit::new(Duration::from_secs(10))),
        algs: prov.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(prov)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![me.cert.clone()],
            PrivateKeyDer::Pkcs8(me.key.clone_key()),
        )
        .context("server certificate")?;
    tls.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    // No session resumption: a resumed session skips the client certificate check, and a
    // revoked device must be refused on its very next handshake.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC server TLS")?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_private_files_and_a_stable_identity() {
        let dir = std::env::temp_dir().join(format!("stallnet-id-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = keygen(&dir, false).expect("keygen");
        assert!(stallnet_netconf::is_identity(&a.id), "{}", a.id);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(keygen(&dir, false).is_err(), "must not overwrite");
        assert_eq!(load(&dir).expect("load").id, a.id);
        let b = keygen(&dir, true).expect("forced");
        assert_ne!(a.id, b.id);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A Pi without a real-time clock may boot years off: a pinned certificate is accepted
    /// whatever its dates and whatever the clock says; an unpinned one never is.
    #[test]
    fn pinned_certificates_are_accepted_whatever_the_dates_and_the_clock() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![HUB_NAME.to_string()]).expect("p");
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        let expired = params.self_signed(&key).expect("cert");
        let der = CertificateDer::from(expired.der().to_vec());
        let v = PinnedServer {
            pins: [identity_of(&der)].into_iter().collect(),
            algs: provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from(HUB_NAME).expect("name");
        for secs in [0u64, 1_000_000_000, 4_000_000_000] {
            let now = UnixTime::since_unix_epoch(Duration::from_secs(secs));
            assert!(v.verify_server_cert(&der, &[], &name, &[], now).is_ok());
        }
        let other = rcgen::KeyPair::generate().expect("key");
        let stranger = rcgen::CertificateParams::new(vec![HUB_NAME.to_string()])
            .expect("p")
            .self_signed(&other)
            .expect("cert");
        let stranger = CertificateDer::from(stranger.der().to_vec());
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000));
        assert!(v
            .verify_server_cert(&stranger, &[], &name, &[], now)
            .is_err());
    }
}
