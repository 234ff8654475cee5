//! What the programs stallnet writes files for (the kernel, dnsmasq, nft) accept as a
//! name, a host name or a path. Validation checks config values with these, and the
//! renderers check them again before writing a line, so a value that reached a renderer
//! some other way still cannot add a line or a directive to another program's file.

use std::path::Path;

/// A value a renderer will not write: it does not fit the grammar of the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} cannot be written into {file}: expected {expected}")]
pub struct Unwritable {
    pub file: &'static str,
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// `Ok` when `ok(value)`, else the error naming the file, the value and what was expected.
pub fn require<T: AsRef<str> + ?Sized>(
    file: &'static str,
    what: &'static str,
    value: &T,
    ok: fn(&str) -> bool,
    expected: &'static str,
) -> Result<(), Unwritable> {
    let v = value.as_ref();
    if ok(v) {
        Ok(())
    } else {
        Err(Unwritable {
            file,
            what,
            value: v.to_owned(),
            expected,
        })
    }
}

/// What [`is_iface_name`] takes, for error texts.
pub const IFACE_EXPECTED: &str = "an interface name of 1 to 15 letters, digits, '-', '_' or '.'";

/// A kernel network interface name: 1 to 15 bytes (IFNAMSIZ less the NUL) of letters,
/// digits, '-', '_' and '.', and not "." or "..". The kernel also refuses '/', ':' and
/// white space; stallnet keeps to a narrower set that every renderer can write unquoted.
pub fn is_iface_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A DNS host label as dnsmasq takes it in `dhcp-host=`: 1 to 63 letters, digits and
/// '-', neither first nor last a '-'.
pub fn is_host_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A path that can stand as the rest of a line in a rendered file: absolute, and free of
/// control characters (a newline would start a new directive) and commas (dnsmasq's
/// separator).
pub fn is_conf_path(p: &Path) -> bool {
    p.to_str().is_some_and(is_conf_path_str)
}

/// [`is_conf_path`] of a path as text.
pub fn is_conf_path_str(s: &str) -> bool {
    s.starts_with('/') && s.len() <= 4096 && !s.chars().any(|c| c.is_control() || c == ',')
}

/// Text that stays on its line (a comment): no control characters.
pub fn is_one_line(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// A URL with `scheme` (`"https://"`) and a host, without white space or control
/// characters anywhere (they would end the URL in a log line or a header).
pub fn url_host<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let rest = url.strip_prefix(scheme)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // user:password@ is allowed before the host (NATS URLs carry it).
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel() {
        for ok in [
            "eth0",
            "br0.20",
            "wwan0",
            "stall0",
            "a-b_c",
            "123456789012345",
        ] {
            assert!(is_iface_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "eth/0",
            "eth 0",
            "eth\"0",
            "eth\n0",
            "eth\u{0}0",
            "1234567890123456",
            "eth:0",
        ] {
            assert!(!is_iface_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn host_labels_follow_dns() {
        assert!(is_host_label("till-1"));
        for bad in [
            "",
            "-till",
            "till-",
            "till\naddress=/#/6.6.6.6",
            "a.b",
            "till 1",
        ] {
            assert!(!is_host_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn urls_need_a_host_and_no_space() {
        assert_eq!(
            url_host("https://example.com/x", "https://"),
            Some("example.com")
        );
        assert_eq!(
            url_host("nats://u:p@10.0.0.1:4222", "nats://"),
            Some("10.0.0.1")
        );
        assert_eq!(url_host("https://[::1]:443/", "https://"), Some("::1"));
        for bad in [
            "https://",
            "https:///x",
            "https://exa mple.com/",
            "https://a\n",
            "http://a",
        ] {
            assert_eq!(url_host(bad, "https://"), None, "{bad:?}");
        }
    }

    #[test]
    fn paths_cannot_carry_a_line() {
        assert!(is_conf_path(Path::new("/var/lib/stallnet/dnsmasq.leases")));
        for bad in ["relative", "/a\nb", "/a,b", ""] {
            assert!(!is_conf_path(Path::new(bad)), "{bad:?}");
        }
    }
}
