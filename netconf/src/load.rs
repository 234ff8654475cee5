//! Reading and validating a config file. Errors carry `file:line:col`, the field path and
//! what was expected; semantic errors are all collected before the config is refused.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_spanned::Spanned;

use crate::classes::{is_host_pattern, parse_mac, ClassName, ClassPath};
use crate::grammar::{self, IFACE_EXPECTED};
use crate::schema::{is_identity, Config, Role};

/// One thing wrong with a config, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// Dotted field path (`edge.uplinks[1].name`), empty when unknown.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a config; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads and validates `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let bytes = std::fs::read(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            col: 0,
            path: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let good = e.utf8_error().valid_up_to();
        let prefix = String::from_utf8_lossy(&e.as_bytes()[..good]);
        let (line, col) = line_col(&prefix, good);
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line,
            col,
            path: path_at(&prefix, good),
            message: format!(
                "expected UTF-8 text (TOML), found byte 0x{:02x}",
                e.as_bytes().get(good).copied().unwrap_or(0)
            ),
        }])
    })?;
    parse_str(path, &text)
}

/// The state and runtime directories `path` names (or their defaults), read without
/// validating the rest: a device's first key is made before its config is complete (the
/// config needs the hub's identity, which needs the hub's key first).
pub fn dirs(path: &Path) -> Result<(PathBuf, PathBuf), ConfigErrors> {
    let fail = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            col: 0,
            path: String::new(),
            message,
        }])
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.message().to_string()))?;
    let dir = |key: &str, default: &str| {
        table
            .get(key)
            .and_then(|v| v.as_str())
            .map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    Ok((
        dir("state_dir", "/var/lib/stallnet"),
        dir("runtime_dir", "/run/stallnet"),
    ))
}

/// Parses and validates `text`, naming `file` in errors.
pub fn parse_str(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let cfg: Config = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        let (line, col) = line_col(text, at);
        let message = e.message().trim().to_string();
        // A span at the very start is the whole document (a missing top-level field).
        let mut path = if at == 0 {
            String::new()
        } else {
            path_at(text, at)
        };
        // A missing field is reported at its table: name the field too.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            path = if path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
        }
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            line: line.max(1),
            col: col.max(1),
            path,
            message,
        }])
    })?;
    let mut v = Validator {
        file,
        text,
        doc: toml::de::DeTable::parse(text).ok().map(Spanned::into_inner),
        errors: Vec::new(),
    };
    v.check(&cfg);
    if v.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(v.errors))
    }
}

/// The field path of the key at byte offset `at`: the table header in force there (with
/// the index of an array-of-tables entry, and a dotted key's prefix) and the line's key.
/// Good for what serde reports (a value of the wrong type, an unknown field, a missing
/// one); inline tables and multi-line values are named by their key.
fn path_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let mut header = String::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in text[..line_start].lines() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let h = h.trim().to_string();
            let n = counts.entry(h.clone()).or_insert(0);
            header = format!("{h}[{n}]");
            *n += 1;
        } else if let Some(h) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            header = h.trim().to_string();
        }
    }
    let this = text[line_start..].lines().next().unwrap_or("").trim();
    let key = if this.starts_with('[') {
        // The error is about the table itself.
        return this
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
    } else {
        this.split('=')
            .next()
            .filter(|_| this.contains('='))
            .map(str::trim)
            .unwrap_or("")
    };
    match (header.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => header,
        (false, false) => format!("{header}.{key}"),
    }
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
    (line, col)
}

/// Where the file writes the field at `path` (`edge.uplinks[1].max_rate`): the span of
/// its key (of the element, for an index), or of the nearest enclosing one that is
/// written (a field left at its default is reported at its table). `None` when not even
/// the first part is written.
fn locate(doc: &toml::de::DeTable<'_>, path: &str) -> Option<Range<usize>> {
    use toml::de::DeValue;
    let mut table = Some(doc);
    let mut found = None;
    for part in path.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => part.split_at(i),
            None => (part, ""),
        };
        let (key, mut value) = table?.iter().find(|(k, _)| k.get_ref().as_ref() == name)?;
        found = Some(key.span());
        for ix in indexes.split('[').skip(1) {
            let i: usize = ix.trim_end_matches(']').parse().ok()?;
            let DeValue::Array(a) = value.get_ref() else {
                return found;
            };
            value = a.get(i)?;
            found = Some(value.span());
        }
        table = match value.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    found
}

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    /// The document with the span of every key and value, to point at a field.
    doc: Option<toml::de::DeTable<'a>>,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    /// Records an error about the field at `path`, at the field's own position in the
    /// file when it is written there, else at `span` (its table).
    fn err(&mut self, span: Range<usize>, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let span = self
            .doc
            .as_ref()
            .and_then(|d| locate(d, &path))
            .unwrap_or(span);
        let (line, col) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: line.max(1),
            col: col.max(1),
            path,
            message: message.into(),
        });
    }

    fn check(&mut self, cfg: &Config) {
        if let Some(d) = &cfg.device {
            let ok = !d.is_empty()
                && d.len() <= 63
                && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !d.starts_with('-')
                && !d.ends_with('-');
            if !ok {
                self.err(
                    0..0,
                    "device",
                    format!("expected a host name (letters, digits, '-'; 1 to 63), got {d:?}"),
                );
            }
        }
        match cfg.role {
            Role::Edge if cfg.edge.is_none() => {
                self.err(0..0, "edge", "role = \"edge\" needs an [edge] section")
            }
            Role::Hub if cfg.hub.is_none() => {
                self.err(0..0, "hub", "role = \"hub\" needs a [hub] section")
            }
            _ => {}
        }
        if let Some(edge) = &cfg.edge {
            self.check_edge(edge, cfg.lan.as_ref().map(Spanned::get_ref));
        }
        if let Some(hub) = &cfg.hub {
            self.check_hub(hub);
        }
        if let (Some(c), Role::Hub) = (&cfg.commerce, cfg.role) {
            self.err(
                c.span(),
                "commerce",
                "[commerce] belongs to an edge config (the hub keeps no sales)",
            );
        }
        self.check_listeners(cfg);
        if let (Some(c), Some(edge)) = (&cfg.commerce, &cfg.edge) {
            let ip = c.get_ref().listen.ip();
            let lan = &edge.get_ref().lan;
            if !ip.is_loopback() && !ip.is_unspecified() && !lan.iter().any(|n| n.contains(&ip)) {
                self.err(
                    c.span(),
                    "commerce.listen",
                    format!("{ip} is not an address on the LAN ({})", display_list(lan)),
                );
            }
        }
        if let Some(lan) = &cfg.lan {
            self.check_lan(lan, cfg);
        }
        if let Some(c) = &cfg.commerce {
            self.check_commerce(c);
        }
    }

    /// Every address the box listens on has a port, and no two share one.
    fn check_listeners(&mut self, cfg: &Config) {
        let mut seen: Vec<(&str, std::net::SocketAddr)> = Vec::new();
        let listeners = [
            ("hub.listen", cfg.hub().map(|h| h.listen)),
            ("commerce.listen", cfg.commerce().map(|c| c.listen)),
            ("metrics.listen", cfg.metrics.as_ref().map(|m| m.listen)),
        ];
        for (path, addr) in listeners {
            let Some(addr) = addr else { continue };
            if addr.port() == 0 {
                self.err(
                    0..0,
                    path,
                    "expected a port from 1 to 65535 (0 would be a different one at every start)",
                );
                continue;
            }
            // Same port on the same address, or on any address while the other listens
            // on all of them (a TCP API and TCP metrics; the hub's QUIC is UDP).
            let clash = seen.iter().find(|(other, a)| {
                a.port() == addr.port()
                    && (*other != "hub.listen" && path != "hub.listen")
                    && (a.ip() == addr.ip()
                        || a.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some((other, _)) = clash {
                self.err(
                    0..0,
                    path,
                    format!("{addr} is already taken by {other}: give each its own port"),
                );
            }
            seen.push((path, addr));
        }
    }

    fn check_edge(
        &mut self,
        edge: &Spanned<crate::EdgeConfig>,
        lan: Option<&crate::lan::LanConfig>,
    ) {
        let e = edge.get_ref();
        if !grammar::is_iface_name(&e.tun_name) {
            self.err(
                edge.span(),
                "edge.tun_name",
                format!("expected {IFACE_EXPECTED}, got {:?}", e.tun_name),
            );
        }
        if e.uplinks.len() > MAX_UPLINKS {
            self.err(
                edge.span(),
                "edge.uplinks",
                format!(
                    "expected at most {MAX_UPLINKS} uplinks, got {}",
                    e.uplinks.len()
                ),
            );
        }
        if !table_base_ok(e.table_base) {
            self.err(
                edge.span(),
                "edge.table_base",
                format!(
                    "expected 1 to {} or 256 to {} (the tunnel's table and one per uplink \
                     follow it; 0 and 253-255 are the kernel's own), got {}",
                    252 - TABLES_USED,
                    i32::MAX as u32 - TABLES_USED,
                    e.table_base
                ),
            );
        }
        if !grammar::is_conf_path(&e.dhcp_leases) {
            self.err(
                edge.span(),
                "edge.dhcp_leases",
                format!(
                    "expected an absolute path without commas or control characters, got {:?}",
                    e.dhcp_leases
                ),
            );
        }
        if e.hubs.is_empty() && e.fallback != crate::Fallback::Direct {
            self.err(
                edge.span(),
                "edge.hubs",
                "expected at least one hub (or, to run without a hub until one is set up, \
                 fallback = \"direct\")",
            );
        }
        for (i, h) in e.hubs.iter().enumerate() {
            if !is_identity(h.identity.get_ref()) {
                self.err(
                    h.identity.span(),
                    format!("edge.hubs[{i}].identity"),
                    "expected an identity printed by `stallnet id` (sn1: and 64 hex digits)",
                );
            }
        }
        if e.uplinks.is_empty() {
            self.err(edge.span(), "edge.uplinks", "expected at least one uplink");
        }
        if !(576..=9000).contains(&e.mtu) {
            self.err(
                edge.span(),
                "edge.mtu",
                "expected an MTU between 576 and 9000",
            );
        }
        if e.lan.is_empty() {
            self.err(edge.span(), "edge.lan", "expected at least one LAN prefix");
        }
        for (i, a) in e.lan.iter().enumerate() {
            for (j, b) in e.lan.iter().enumerate().skip(i + 1) {
                if a.contains(&b.network()) || b.contains(&a.network()) {
                    self.err(
                        edge.span(),
                        format!("edge.lan[{j}]"),
                        format!("{b} overlaps edge.lan[{i}] ({a})"),
                    );
                }
            }
        }
        for (i, p) in e.pos_sources.iter().enumerate() {
            if !e.lan.iter().any(|l| l.contains(p)) {
                self.err(
                    edge.span(),
                    format!("edge.pos_sources[{i}]"),
                    format!("{p} is not inside any LAN prefix"),
                );
            }
        }
        self.check_classes(edge, lan);
        self.check_reachability(edge.span(), &e.reachability);
        let mut names = HashSet::new();
        let mut ifaces = HashSet::new();
        for (i, u) in e.uplinks.iter().enumerate() {
            let r = u.get_ref();
            if r.name.is_empty() || r.name.len() > 32 || !r.name.bytes().all(name_byte) {
                self.err(
                    u.span(),
                    format!("edge.uplinks[{i}].name"),
                    "expected 1 to 32 letters, digits, '-' or '_'",
                );
            }
            if !names.insert(r.name.clone()) {
                self.err(
                    u.span(),
                    format!("edge.uplinks[{i}].name"),
                    format!("duplicate uplink name {:?}", r.name),
                );
            }
            if !grammar::is_iface_name(&r.interface) {
                self.err(
                    u.span(),
                    format!("edge.uplinks[{i}].interface"),
                    format!("expected {IFACE_EXPECTED}, got {:?}", r.interface),
                );
            }
            if let (Some(lo), Some(hi)) = (r.min_rate, r.max_rate) {
                if lo > hi {
                    self.err(
                        u.span(),
                        format!("edge.uplinks[{i}].min_rate"),
                        format!("min_rate {lo} is above max_rate {hi}"),
                    );
                }
            }
            self.check_uplink_extras(u.span(), i, r);
            if !ifaces.insert(r.interface.clone()) {
                self.err(
                    u.span(),
                    format!("edge.uplinks[{i}].interface"),
                    format!("interface {:?} is used by two uplinks", r.interface),
                );
            }
        }
    }

    fn check_reachability(&mut self, at: Range<usize>, r: &crate::Reachability) {
        if grammar::url_host(&r.portal_url, "http://").is_none() {
            self.err(
                at.clone(),
                "edge.reachability.portal_url",
                format!(
                    "expected an http:// URL with a host and no spaces (a portal only shows \
                     on plain HTTP), got {:?}",
                    r.portal_url
                ),
            );
        }
        if grammar::url_host(&r.https_url, "https://").is_none() {
            self.err(
                at.clone(),
                "edge.reachability.https_url",
                format!(
                    "expected an https:// URL with a host and no spaces, got {:?}",
                    r.https_url
                ),
            );
        }
        if let Some(ca) = &r.ca_file {
            if !ca.is_file() {
                self.err(
                    at.clone(),
                    "edge.reachability.ca_file",
                    format!("no such file: {}", ca.display()),
                );
            }
        }
        for (field, v, lo, hi) in [
            ("interval_s", r.interval_s, 1, 300),
            ("https_interval_s", r.https_interval_s, 5, 3600),
            ("backup_interval_s", r.backup_interval_s, 30, 86_400),
        ] {
            if !(lo..=hi).contains(&v) {
                self.err(
                    at.clone(),
                    format!("edge.reachability.{field}"),
                    format!("expected {lo} to {hi} (seconds)"),
                );
            }
        }
    }

    fn check_classes(
        &mut self,
        edge: &Spanned<crate::EdgeConfig>,
        lan: Option<&crate::lan::LanConfig>,
    ) {
        let e = edge.get_ref();
        // With [lan], the box creates the LAN's interfaces itself: a rule can only meet
        // traffic arriving on one of them.
        let lan_ifaces: Option<Vec<String>> = lan.map(|l| {
            let mut v = vec![l.interface.clone()];
            v.extend(l.ports.iter().cloned());
            v.extend(l.segments.iter().map(|s| s.interface(l)));
            v
        });
        let uplinks: HashSet<&str> = e
            .uplinks
            .iter()
            .map(|u| u.get_ref().name.as_str())
            .collect();
        for name in ClassName::ALL {
            let Some(c) = e.classes.get(name) else {
                continue;
            };
            let at = c.span();
            let path = format!("edge.classes.{}", name.as_str());
            let r = c.get_ref();
            if r.weight == Some(0) || r.weight.is_some_and(|w| w > 1000) {
                self.err(
                    at.clone(),
                    format!("{path}.weight"),
                    "expected a weight from 1 to 1000",
                );
            }
            if let (Some(lo), Some(hi)) = (r.min_rate, r.max_rate) {
                if lo > hi {
                    self.err(
                        at.clone(),
                        format!("{path}.min_rate"),
                        format!("min_rate {lo} is above max_rate {hi}"),
                    );
                }
            }
            for u in r.uplinks.iter().flatten() {
                if !uplinks.contains(u.as_str()) {
                    self.err(
                        at.clone(),
                        format!("{path}.uplinks"),
                        format!("no uplink is named {u:?}"),
                    );
                }
            }
            if r.path == Some(ClassPath::Direct) {
                self.err(
                    at.clone(),
                    format!("{path}.path"),
                    "path = \"direct\" per class is not available in this version; \
                     use fallback = \"direct\" for traffic that may leave untunnelled",
                );
            }
        }
        for (i, rule) in e.rules.iter().enumerate() {
            let at = rule.span();
            let path = format!("edge.rules[{i}]");
            let r = rule.get_ref();
            if r.is_empty() {
                self.err(at.clone(), path.clone(), "expected at least one match field (mac, hostname, interface, src, dst, host, proto, src_port, dst_port, dscp)");
            }
            for m in &r.mac {
                if parse_mac(m).is_none() {
                    self.err(
                        at.clone(),
                        format!("{path}.mac"),
                        format!("expected a MAC address like \"aa:bb:cc:dd:ee:ff\", got {m:?}"),
                    );
                }
            }
            for h in &r.host {
                if !is_host_pattern(h) {
                    self.err(
                        at.clone(),
                        format!("{path}.host"),
                        format!("expected a host name or \"*.domain\", got {h:?}"),
                    );
                }
            }
            for h in &r.hostname {
                if h.is_empty() || h.len() > 63 {
                    self.err(
                        at.clone(),
                        format!("{path}.hostname"),
                        "expected a DHCP host name of 1 to 63 characters",
                    );
                }
            }
            for n in &r.interface {
                if !grammar::is_iface_name(n) {
                    self.err(
                        at.clone(),
                        format!("{path}.interface"),
                        format!("expected {IFACE_EXPECTED}, got {n:?}"),
                    );
                } else if let Some(known) = lan_ifaces.as_ref().filter(|k| !k.contains(n)) {
                    self.err(
                        at.clone(),
                        format!("{path}.interface"),
                        format!(
                            "no LAN interface is named {n:?}: [lan] creates {} (a VLAN \
                             segment is the LAN interface, a dot and its id)",
                            known.join(", ")
                        ),
                    );
                }
            }
            for d in &r.dscp {
                if *d > 63 {
                    self.err(
                        at.clone(),
                        format!("{path}.dscp"),
                        format!("expected a DSCP code point 0-63, got {d}"),
                    );
                }
            }
        }
    }

    fn check_uplink_extras(&mut self, at: Range<usize>, i: usize, u: &crate::Uplink) {
        let path = format!("edge.uplinks[{i}]");
        if let Some(w) = &u.wifi {
            if u.kind != crate::UplinkKind::Wifi {
                self.err(
                    at.clone(),
                    format!("{path}.wifi"),
                    "wifi applies to kind = \"wifi\" uplinks only",
                );
            }
            if w.ssid.is_empty() || w.ssid.len() > 32 {
                self.err(
                    at.clone(),
                    format!("{path}.wifi.ssid"),
                    "expected an SSID of 1 to 32 bytes",
                );
            }
            if let Some(p) = &w.passphrase {
                if !(8..=63).contains(&p.len()) || !p.bytes().all(|b| (32..127).contains(&b)) {
                    self.err(
                        at.clone(),
                        format!("{path}.wifi.passphrase"),
                        "expected a WPA passphrase of 8 to 63 printable ASCII characters",
                    );
                }
            }
        }
        if let Some(a) = &u.apn {
            if u.kind != crate::UplinkKind::Cellular {
                self.err(
                    at.clone(),
                    format!("{path}.apn"),
                    "apn applies to kind = \"cellular\" uplinks only",
                );
            } else if a.is_empty()
                || a.len() > 100
                || !a
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                self.err(
                    at.clone(),
                    format!("{path}.apn"),
                    format!("expected an APN like \"internet\" or \"data.example.net\", got {a:?}"),
                );
            }
        }
        if let Some(c) = &u.cap {
            if crate::schema::parse_bytes(&c.bytes).is_none() {
                self.err(
                    at.clone(),
                    format!("{path}.cap.bytes"),
                    format!(
                        "expected an amount like \"20GB\" or \"500MB\", got {:?}",
                        c.bytes
                    ),
                );
            }
            match (c.period, c.reset_day) {
                (crate::CapPeriod::Monthly, None) => self.err(
                    at.clone(),
                    format!("{path}.cap.reset_day"),
                    "a monthly cap needs the day of the month it resets (1-28)",
                ),
                (crate::CapPeriod::Monthly, Some(d)) if !(1..=28).contains(&d) => self.err(
                    at.clone(),
                    format!("{path}.cap.reset_day"),
                    format!("expected a day 1-28 (every month has it), got {d}"),
                ),
                (crate::CapPeriod::Daily, Some(_)) => self.err(
                    at.clone(),
                    format!("{path}.cap.reset_day"),
                    "a daily cap resets every day at midnight: no reset_day",
                ),
                _ => {}
            }
        }
    }

    fn check_dhcp(
        &mut self,
        at: &Range<usize>,
        path: &str,
        net: ipnet::Ipv4Net,
        d: &crate::lan::Dhcp,
    ) {
        for (f, a) in [("start", d.start), ("end", d.end)] {
            if !net.contains(&a) || a == net.network() || a == net.broadcast() {
                self.err(
                    at.clone(),
                    format!("{path}.dhcp.{f}"),
                    format!("{a} is not a host address of {}", net.trunc()),
                );
            }
        }
        if d.start > d.end {
            self.err(
                at.clone(),
                format!("{path}.dhcp"),
                format!("start {} is after end {}", d.start, d.end),
            );
        }
        if (d.start..=d.end).contains(&net.addr()) {
            self.err(
                at.clone(),
                format!("{path}.dhcp"),
                format!("the range includes the box's own address {}", net.addr()),
            );
        }
        if !crate::lan::valid_lease(&d.lease) {
            self.err(
                at.clone(),
                format!("{path}.dhcp.lease"),
                format!(
                    "expected a lease time like \"12h\", \"30m\" or \"infinite\", got {:?}",
                    d.lease
                ),
            );
        }
    }

    fn check_lan(&mut self, lan: &Spanned<crate::lan::LanConfig>, cfg: &Config) {
        let at = lan.span();
        let l = lan.get_ref();
        if cfg.role != Role::Edge {
            self.err(at.clone(), "lan", "[lan] belongs to an edge config");
        }
        let iface_ok = grammar::is_iface_name;
        if !iface_ok(&l.interface) {
            self.err(
                at.clone(),
                "lan.interface",
                format!("expected {IFACE_EXPECTED}, got {:?}", l.interface),
            );
        }
        for (i, p) in l.ports.iter().enumerate() {
            if !iface_ok(p) || *p == l.interface {
                self.err(
                    at.clone(),
                    format!("lan.ports[{i}]"),
                    format!("expected a port other than the bridge itself, got {p:?}"),
                );
            }
        }
        let net = l.address;
        if net.prefix_len() > 30 || net.addr() == net.network() || net.addr() == net.broadcast() {
            self.err(
                at.clone(),
                "lan.address",
                format!(
                    "expected the box's address with the LAN prefix, like 10.1.0.1/24, got {net}"
                ),
            );
        }
        if let Some(d) = &l.dhcp {
            self.check_dhcp(&at, "lan", net, d);
        }
        if let Some(e) = cfg.edge() {
            let inside = e.lan.iter().any(|p| {
                p.contains(&IpAddr::V4(net.network())) && p.prefix_len() <= net.prefix_len()
            });
            if !inside {
                self.err(
                    at.clone(),
                    "lan.address",
                    format!(
                        "edge.lan must include {} (this LAN) for its traffic to enter the tunnel",
                        net.trunc()
                    ),
                );
            }
        }
        let mut macs = HashSet::new();
        let mut addrs = HashSet::new();
        let mut hosts = HashSet::new();
        for (i, r) in l.reservations.iter().enumerate() {
            let path = format!("lan.reservations[{i}]");
            if let Some(n) = &r.name {
                if !grammar::is_host_label(n) {
                    self.err(
                        at.clone(),
                        format!("{path}.name"),
                        format!("expected a host name of 1 to 63 letters, digits and '-' (not first or last), got {n:?}"),
                    );
                } else if !hosts.insert(n.to_ascii_lowercase()) {
                    self.err(
                        at.clone(),
                        format!("{path}.name"),
                        format!("{n:?} is reserved twice"),
                    );
                }
            }
            if parse_mac(&r.mac).is_none() {
                self.err(
                    at.clone(),
                    format!("{path}.mac"),
                    format!(
                        "expected a MAC address like \"aa:bb:cc:dd:ee:ff\", got {:?}",
                        r.mac
                    ),
                );
            } else if !macs.insert(r.mac.to_ascii_lowercase()) {
                self.err(
                    at.clone(),
                    format!("{path}.mac"),
                    format!("{} is reserved twice", r.mac),
                );
            }
            if !net.contains(&r.address)
                || r.address == net.addr()
                || r.address == net.network()
                || r.address == net.broadcast()
            {
                self.err(
                    at.clone(),
                    format!("{path}.address"),
                    format!(
                        "{} is not a free host address of {}",
                        r.address,
                        net.trunc()
                    ),
                );
            } else if !addrs.insert(r.address) {
                self.err(
                    at.clone(),
                    format!("{path}.address"),
                    format!("{} is reserved twice", r.address),
                );
            }
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let mut nets = vec![net.trunc()];
        for (i, v) in l.segments.iter().enumerate() {
            let path = format!("lan.segments[{i}]");
            match (v.vlan, &v.interface) {
                (Some(id), None) => {
                    if !(1..=4094).contains(&id) || !ids.insert(id) {
                        self.err(
                            at.clone(),
                            format!("{path}.vlan"),
                            format!("expected a VLAN id 1-4094 used once, got {id}"),
                        );
                    }
                }
                (None, Some(p)) => {
                    if !iface_ok(p) || *p == l.interface || l.ports.contains(p) {
                        self.err(
                            at.clone(),
                            format!("{path}.interface"),
                            format!("expected a port of its own (not the LAN's), got {p:?}"),
                        );
                    }
                }
                _ => self.err(
                    at.clone(),
                    path.clone(),
                    "expected either vlan = ID or interface = \"PORT\"",
                ),
            }
            if v.name.is_empty()
                || v.name.len() > 32
                || !v.name.bytes().all(name_byte)
                || !names.insert(v.name.clone())
                || v.name == "lan"
            {
                self.err(at.clone(), format!("{path}.name"), format!("expected a unique name of letters, digits, '-' or '_' (not \"lan\"), got {:?}", v.name));
            }
            if v.interface.is_none() && !iface_ok(&v.interface(l)) {
                self.err(
                    at.clone(),
                    format!("{path}.vlan"),
                    format!(
                        "the interface name {:?} is longer than 15 characters",
                        v.interface(l)
                    ),
                );
            }
            let vn = v.address.trunc();
            if let Some(other) = nets
                .iter()
                .find(|n| n.contains(&vn.network()) || vn.contains(&n.network()))
            {
                self.err(
                    at.clone(),
                    format!("{path}.address"),
                    format!("{vn} overlaps {other}"),
                );
            }
            nets.push(vn);
            if let Some(d) = &v.dhcp {
                self.check_dhcp(&at, &path, v.address, d);
            }
        }
    }

    fn check_commerce(&mut self, c: &Spanned<crate::CommerceConfig>) {
        let r = c.get_ref();
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for (i, cl) in r.clients.iter().enumerate() {
            let v = cl.get_ref();
            if !keys.insert(v.key_sha256.to_ascii_lowercase()) {
                self.err(
                    cl.span(),
                    format!("commerce.clients[{i}].key_sha256"),
                    "the same key is listed twice (hex digits compare without case): \
                     each client needs a key of its own",
                );
            }
            if v.key_sha256.len() != 64 || !v.key_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.err(
                    cl.span(),
                    format!("commerce.clients[{i}].key_sha256"),
                    "expected 64 hex digits (the SHA-256 of the key; `stallnet hash-key`)",
                );
            }
            if v.name.is_empty() || v.name.len() > 64 || !v.name.bytes().all(name_byte) {
                self.err(
                    cl.span(),
                    format!("commerce.clients[{i}].name"),
                    "expected 1 to 64 letters, digits, '-' or '_'",
                );
            }
            if !names.insert(v.name.clone()) {
                self.err(
                    cl.span(),
                    format!("commerce.clients[{i}].name"),
                    format!("duplicate client name {:?}", v.name),
                );
            }
        }
        if let Some(u) = &r.upstream {
            self.check_upstream(u.span(), u.get_ref());
        }
        if r.limits.max_body_bytes < 1024 || r.limits.max_body_bytes > 16 * 1024 * 1024 {
            self.err(
                c.span(),
                "commerce.limits.max_body_bytes",
                "expected 1024 to 16777216",
            );
        }
    }

    fn check_upstream(&mut self, span: std::ops::Range<usize>, u: &crate::Upstream) {
        let has_host = ["https://", "http://", "nats://", "tls://"]
            .iter()
            .any(|scheme| grammar::url_host(&u.url, scheme).is_some());
        if !has_host {
            self.err(
                span.clone(),
                "commerce.upstream.url",
                format!(
                    "expected an https:// (or http://) URL with a host and no spaces, or \
                     nats:// (or tls://) for JetStream, got {:?}",
                    u.url
                ),
            );
        }
        match (&u.subject, u.is_nats()) {
            (None, true) => self.err(
                span.clone(),
                "commerce.upstream.subject",
                "a NATS upstream needs the JetStream subject for this stall's records",
            ),
            (Some(_), false) => self.err(
                span.clone(),
                "commerce.upstream.subject",
                "subject applies to nats:// upstreams only",
            ),
            (Some(s), true) if !valid_subject(s) => self.err(
                span.clone(),
                "commerce.upstream.subject",
                format!(
                    "expected dot-separated tokens of letters, digits, '-' or '_' (no \
                     wildcards), got {s:?}"
                ),
            ),
            _ => {}
        }
        if let Some(ca) = &u.ca_file {
            if u.url.starts_with("http://") || u.url.starts_with("nats://") {
                self.err(
                    span.clone(),
                    "commerce.upstream.ca_file",
                    "ca_file applies to https:// and tls:// upstreams only",
                );
            } else if !ca.is_file() {
                self.err(
                    span.clone(),
                    "commerce.upstream.ca_file",
                    format!("no such file: {}", ca.display()),
                );
            }
        }
        if !(100..=600_000).contains(&u.timeout_ms) {
            self.err(
                span,
                "commerce.upstream.timeout_ms",
                "expected 100 to 600000 (milliseconds)",
            );
        }
    }

    fn check_hub(&mut self, hub: &Spanned<crate::HubConfig>) {
        let h = hub.get_ref();
        if !grammar::is_iface_name(&h.tun_name) {
            self.err(
                hub.span(),
                "hub.tun_name",
                format!("expected {IFACE_EXPECTED}, got {:?}", h.tun_name),
            );
        }
        if !(576..=9000).contains(&h.mtu) {
            self.err(
                hub.span(),
                "hub.mtu",
                "expected an MTU between 576 and 9000",
            );
        }
        match h.pool {
            ipnet::IpNet::V4(n) if n.prefix_len() <= 30 => {}
            ipnet::IpNet::V4(n) => self.err(
                hub.span(),
                "hub.pool",
                format!("expected an IPv4 prefix of /30 or wider (the hub and at least one device), got {n}"),
            ),
            ipnet::IpNet::V6(n) => self.err(
                hub.span(),
                "hub.pool",
                format!("expected an IPv4 prefix like 100.64.0.0/24 (tunnel addresses are IPv4 in this version), got {n}"),
            ),
        }
        let hosts = match h.pool {
            ipnet::IpNet::V4(n) => 32u32.saturating_sub(u32::from(n.prefix_len())),
            ipnet::IpNet::V6(n) => 128u32.saturating_sub(u32::from(n.prefix_len())),
        };
        let room = if hosts >= 16 {
            usize::MAX
        } else {
            (1usize << hosts).saturating_sub(3)
        };
        if h.devices.len() > room {
            self.err(
                hub.span(),
                "hub.pool",
                format!(
                    "pool {} has room for {room} devices, {} are listed",
                    h.pool,
                    h.devices.len()
                ),
            );
        }
        if let Some(i) = h.stall_services.iter().position(|p| *p == 0) {
            self.err(
                hub.span(),
                format!("hub.stall_services[{i}]"),
                "expected a TCP port from 1 to 65535",
            );
        }
        match h.lan_map {
            ipnet::IpNet::V4(space) => {
                if h.pool.contains(&h.lan_map.network()) || h.lan_map.contains(&h.pool.network()) {
                    self.err(
                        hub.span(),
                        "hub.lan_map",
                        format!(
                            "{space} overlaps hub.pool {}: expected a prefix of its own",
                            h.pool
                        ),
                    );
                }
                let lans: Vec<&[ipnet::IpNet]> = h
                    .devices
                    .iter()
                    .map(|d| d.get_ref().lan.as_slice())
                    .collect();
                if let Err(e) = crate::lan_map::blocks(space, &lans) {
                    self.err(
                        hub.span(),
                        "hub.lan_map",
                        format!("{e}: expected a wider prefix"),
                    );
                }
            }
            ipnet::IpNet::V6(n) => self.err(
                hub.span(),
                "hub.lan_map",
                format!("expected an IPv4 prefix like 10.100.0.0/14, got {n}"),
            ),
        }
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        let mut lans: Vec<(usize, ipnet::IpNet)> = Vec::new();
        for (i, d) in h.devices.iter().enumerate() {
            let r = d.get_ref();
            if r.name.is_empty() || r.name.len() > 63 || !r.name.bytes().all(name_byte) {
                self.err(
                    d.span(),
                    format!("hub.devices[{i}].name"),
                    format!(
                        "expected 1 to 63 letters, digits, '-' or '_', got {:?}",
                        r.name
                    ),
                );
            }
            for (j, p) in r.lan.iter().enumerate() {
                let overlaps =
                    |q: &ipnet::IpNet| q.contains(&p.network()) || p.contains(&q.network());
                if let Some(q) = r.lan[..j].iter().find(|q| overlaps(q)) {
                    self.err(
                        d.span(),
                        format!("hub.devices[{i}].lan[{j}]"),
                        format!("{p} overlaps {q} of the same device: expected separate prefixes"),
                    );
                }
                // IPv4 LANs may repeat across devices (each gets its own block of
                // hub.lan_map); IPv6 prefixes are routed as they are.
                if let Some((k, q)) = lans
                    .iter()
                    .find(|(_, q)| matches!(p, ipnet::IpNet::V6(_)) && overlaps(q))
                {
                    self.err(
                        d.span(),
                        format!("hub.devices[{i}].lan[{j}]"),
                        format!("{p} overlaps {q} of hub.devices[{k}]: the hub routes IPv6 downloads by LAN prefix, so each device needs its own"),
                    );
                }
                lans.push((i, *p));
            }
            for (j, p) in r.pos_sources.iter().enumerate() {
                if !r.lan.iter().any(|l| l.contains(p)) {
                    self.err(
                        d.span(),
                        format!("hub.devices[{i}].pos_sources[{j}]"),
                        format!("{p} is not inside this device's lan"),
                    );
                }
            }
            if !is_identity(&r.identity) {
                self.err(
                    d.span(),
                    format!("hub.devices[{i}].identity"),
                    "expected an identity printed by `stallnet id` (sn1: and 64 hex digits)",
                );
            }
            if !names.insert(r.name.clone()) {
                self.err(
                    d.span(),
                    format!("hub.devices[{i}].name"),
                    format!("duplicate device name {:?}", r.name),
                );
            }
            if !ids.insert(r.identity.clone()) {
                self.err(
                    d.span(),
                    format!("hub.devices[{i}].identity"),
                    "the same identity is listed twice",
                );
            }
        }
    }
}

fn display_list(v: &[ipnet::IpNet]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most uplinks one edge runs.
pub const MAX_UPLINKS: usize = 16;
/// Routing tables from `table_base` on: the tunnel's, then one per uplink, twice over
/// (a reload starts new uplinks before it stops the ones they replace).
const TABLES_USED: u32 = 1 + 2 * MAX_UPLINKS as u32;

/// Whether `base` leaves room for every table the edge uses without reaching the
/// kernel's own (0 unspecified, 253 default, 254 main, 255 local) or overflowing.
pub fn table_base_ok(base: u32) -> bool {
    (1..=252 - TABLES_USED).contains(&base) || (256..=i32::MAX as u32 - TABLES_USED).contains(&base)
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A concrete NATS subject: dot-separated, non-empty tokens without wildcards.
fn valid_subject(s: &str) -> bool {
    s.len() <= 255
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sn1:0000000000000000000000000000000000000000000000000000000000000000";

    fn edge(extra: &str) -> String {
        format!(
            r#"role = "edge"
[edge]
lan = ["10.1.0.0/24"]
hubs = [{{ address = "192.0.2.1:4433", identity = "{ID}" }}]
{extra}
[[edge.uplinks]]
name = "wifi"
interface = "wan0"
kind = "wifi"
"#
        )
    }

    #[test]
    fn accepts_a_minimal_edge() {
        let cfg = parse_str(Path::new("s.toml"), &edge("")).expect("valid");
        let e = cfg.edge().expect("edge");
        assert_eq!(e.uplinks.len(), 1);
        assert_eq!(e.mtu, 1424);
    }

    #[test]
    fn unknown_field_is_refused_with_position() {
        let err = parse_str(Path::new("s.toml"), &edge("mtuu = 1400")).expect_err("typo");
        let e = &err.0[0];
        assert_eq!((e.line, e.col), (5, 1), "{err}");
        assert!(e.message.contains("unknown field `mtuu`"), "{err}");
        assert!(err.to_string().starts_with("s.toml:5:1: "), "{err}");
    }

    #[test]
    fn bad_value_type_points_at_the_value() {
        let err = parse_str(Path::new("s.toml"), &edge("mtu = \"big\"")).expect_err("type");
        assert_eq!(err.0[0].line, 5, "{err}");
        assert!(err.0[0].message.contains("u16"), "{err}");
    }

    #[test]
    fn all_semantic_errors_are_reported_at_once() {
        let text = edge("pos_sources = [\"10.9.9.9/32\"]").replace(ID, "sn1:nothex")
            + "[[edge.uplinks]]\nname = \"wifi\"\ninterface = \"wan0\"\nkind = \"cellular\"\n";
        let err = parse_str(Path::new("s.toml"), &text).expect_err("bad");
        let paths: Vec<_> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "edge.hubs[0].identity",
                "edge.pos_sources[0]",
                "edge.uplinks[1].name",
                "edge.uplinks[1].interface"
            ],
            "{err}"
        );
        assert!(err.0.iter().all(|e| e.line > 0), "{err}");
        // Each at its field: the second uplink's name, not its table header (line 10).
        assert_eq!(err.0[2].line, 11, "{err}");
    }

    #[test]
    fn role_needs_its_section() {
        let err = parse_str(Path::new("h.toml"), "role = \"hub\"\n").expect_err("no hub");
        assert_eq!(err.0[0].path, "hub");
    }

    #[test]
    fn rules_and_classes_are_checked_with_positions() {
        let text = edge(
            r#"[edge.classes.guest]
max_rate = "2mbit"
uplinks = ["lte"]
[[edge.rules]]
class = "pos"
host = ["*.squareup.com", "bad host"]
mac = ["aa:bb"]
[[edge.rules]]
class = "guest"
[[edge.rules]]
class = "stream"
dst_port = ["2000-1000"]
"#,
        );
        let err = parse_str(Path::new("s.toml"), &text).expect_err("bad rules");
        // Ports are checked while parsing: that error comes alone, with its position.
        assert!(err.0[0].message.contains("8000-8999"), "{err}");
        let text = text.replace("\"2000-1000\"", "1935");
        let err = parse_str(Path::new("s.toml"), &text).expect_err("bad rules");
        let got: Vec<_> = err.0.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [
                ("edge.classes.guest.uplinks", 7),
                ("edge.rules[0].mac", 11),
                ("edge.rules[0].host", 10),
                ("edge.rules[1]", 12),
            ],
            "{err}"
        );
        let ok = parse_str(
            Path::new("s.toml"),
            &edge("[edge.classes.stream]\nmin_rate = \"6mbit\"\n[[edge.rules]]\nclass = \"pos\"\nsrc = [\"10.1.0.7/32\"]\ndst_port = [443, \"8443-8444\"]\n"),
        )
        .expect("valid");
        let e = ok.edge().expect("edge");
        let classes = crate::classes::effective_classes(&e.classes);
        assert_eq!(classes[1].min_rate, Some(6_000_000));
        assert_eq!(e.rules[0].get_ref().dst_port.len(), 2);
    }

    #[test]
    fn upstreams_are_checked_with_positions() {
        let commerce = |up: &str| {
            edge(&format!(
                "[commerce]\nlisten = \"10.1.0.1:8080\"\nclients = []\n[commerce.upstream]\n{up}\n"
            ))
        };
        let nats = parse_str(
            Path::new("s.toml"),
            &commerce(
                "url = \"nats://till:pw@198.18.0.1:4222\"\nsubject = \"sales.square.stall-17\"",
            ),
        )
        .expect("valid");
        let up = nats
            .commerce
            .as_ref()
            .and_then(|c| c.get_ref().upstream.clone());
        let up = up.expect("upstream").into_inner();
        assert!(up.is_nats());
        assert_eq!(up.via, crate::UpstreamPath::Tunnel);
        for (body, path, says) in [
            (
                "url = \"nats://h:4222\"",
                "commerce.upstream.subject",
                "needs",
            ),
            (
                "url = \"nats://h:4222\"\nsubject = \"sales.*\"",
                "commerce.upstream.subject",
                "wildcards",
            ),
            (
                "url = \"nats://h:4222\"\nsubject = \"a..b\"",
                "commerce.upstream.subject",
                "tokens",
            ),
            (
                "url = \"https://h/s\"\nsubject = \"a\"",
                "commerce.upstream.subject",
                "nats://",
            ),
            ("url = \"ftp://h/s\"", "commerce.upstream.url", "nats://"),
            (
                "url = \"https://h/s\"\ntimeout_ms = 5",
                "commerce.upstream.timeout_ms",
                "100",
            ),
        ] {
            let text = commerce(body);
            let err = parse_str(Path::new("s.toml"), &text).expect_err(body);
            let e = &err.0[0];
            // At the field's own line, a subject that is missing at its table's.
            let field = path.rsplit('.').next().unwrap_or(path);
            let line = text
                .lines()
                .position(|l| l.starts_with(&format!("{field} =")))
                .map_or(8, |i| i + 1);
            assert_eq!((e.path.as_str(), e.line, e.col), (path, line, 1), "{err}");
            assert!(e.message.contains(says), "{body}: {err}");
        }
        let err = parse_str(
            Path::new("s.toml"),
            &commerce("url = \"https://h/s\"\nvia = \"moon\""),
        )
        .expect_err("bad via");
        assert!(err.to_string().contains("tunnel"), "{err}");
    }
}
