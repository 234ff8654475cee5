//! The wpa_supplicant configuration for a wifi uplink (pure). The SSID is written in hex
//! and the passphrase as its derived WPA2 key (PBKDF2-HMAC-SHA1, 4096 rounds over the
//! SSID), so no quoting can break the file and the passphrase itself is not written out.

use crate::WifiNetwork;

/// The WPA2 pre-shared key for `passphrase` on `ssid`, as 64 hex digits.
pub fn wpa_psk(ssid: &str, passphrase: &str) -> String {
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA1,
        std::num::NonZeroU32::MIN.saturating_add(4095),
        ssid.as_bytes(),
        passphrase.as_bytes(),
        &mut key,
    );
    hex::encode(key)
}

/// The file `wpa_supplicant -c` reads for this network.
pub fn wpa_supplicant_conf(w: &WifiNetwork, ctrl_dir: &str) -> String {
    let mut out = format!(
        "# Rendered by stallnet: do not edit, it is rewritten.\nctrl_interface={ctrl_dir}\n\
         ap_scan=1\nnetwork={{\n  scan_ssid=1\n  ssid={}\n",
        hex::encode(w.ssid.as_bytes())
    );
    match &w.passphrase {
        Some(p) => out.push_str(&format!(
            "  key_mgmt=WPA-PSK\n  psk={}\n",
            wpa_psk(&w.ssid, p)
        )),
        None => out.push_str("  key_mgmt=NONE\n"),
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_psk_is_the_standard_derivation() {
        // IEEE 802.11i-2004 Annex H.4 test vector.
        assert_eq!(
            wpa_psk("IEEE", "password"),
            "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
        );
    }

    #[test]
    fn quotes_in_names_cannot_break_the_file() {
        let c = wpa_supplicant_conf(
            &WifiNetwork {
                ssid: "Market \"Hall\"".into(),
                passphrase: Some("pa\"ss word".into()),
            },
            "/run/stallnet/wpa",
        );
        assert!(
            c.contains(&format!("ssid={}", hex::encode("Market \"Hall\""))),
            "{c}"
        );
        assert!(!c.contains("pa\"ss"), "the passphrase is not written: {c}");
        assert!(c.contains("key_mgmt=WPA-PSK"));
        let open = wpa_supplicant_conf(
            &WifiNetwork {
                ssid: "Venue".into(),
                passphrase: None,
            },
            "/run/x",
        );
        assert!(open.contains("key_mgmt=NONE"));
    }
}
