//! Scripted edits and differences.
//!
//! - [`get`] and [`set`] read and change a config file by field path
//!   (`edge.uplinks[1].metered`), keeping its comments and layout (toml_edit), so scripts
//!   never hand-edit TOML. Values are TOML (`true`, `5`, `"wifi"`, `["10.1.0.0/24"]`); a
//!   bare word that is not TOML is taken as a string.
//! - [`diff`] lists what differs between two parsed configs, defaults included, as field
//!   paths with the old and the new value.

use serde::Serialize;
use serde_json::Value;
use toml_edit::{DocumentMut, Item};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EditError {
    #[error("the file is not TOML: {0}")]
    Parse(String),
    #[error(
        "bad path {0:?}: expected names separated by '.', each optionally indexed like uplinks[0]"
    )]
    BadPath(String),
    #[error("{0}: no such field")]
    NotFound(String),
    #[error("{path}: index {index} is past the end ({len} entries)")]
    Index {
        path: String,
        index: usize,
        len: usize,
    },
    #[error("{0}: not a table, cannot hold fields")]
    NotTable(String),
    #[error("bad assignment {0:?}: expected PATH=VALUE")]
    BadAssignment(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Result<Vec<Step>, EditError> {
    let bad = || EditError::BadPath(path.to_string());
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad());
        }
        steps.push(Step::Key(name.to_string()));
        while !rest.is_empty() {
            let close = rest.find(']').ok_or_else(bad)?;
            let n: usize = rest
                .get(1..close)
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            steps.push(Step::Index(n));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(bad());
            }
        }
    }
    Ok(steps)
}

fn shown(steps: &[Step]) -> String {
    let mut s = String::new();
    for st in steps {
        match st {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The value at `path`, as TOML text.
pub fn get(text: &str, path: &str) -> Result<String, EditError> {
    let doc: DocumentMut = text.parse().map_err(|e| EditError::Parse(format!("{e}")))?;
    let steps = parse_path(path)?;
    let mut item: &Item = doc.as_item();
    for (i, st) in steps.iter().enumerate() {
        let here = || shown(&steps[..=i]);
        item = match st {
            Step::Key(k) => item
                .get(k.as_str())
                .ok_or_else(|| EditError::NotFound(here()))?,
            Step::Index(n) => {
                let len = match item {
                    Item::ArrayOfTables(a) => a.len(),
                    Item::Value(toml_edit::Value::Array(a)) => a.len(),
                    _ => return Err(EditError::NotFound(here())),
                };
                item.get(*n).ok_or(EditError::Index {
                    path: shown(&steps[..i]),
                    index: *n,
                    len,
                })?
            }
        };
    }
    Ok(match item {
        Item::Value(v) => {
            let mut v = v.clone();
            v.decor_mut().clear();
            v.to_string().trim().to_string()
        }
        Item::Table(t) => t.to_string().trim().to_string(),
        Item::ArrayOfTables(a) => a.to_string().trim().to_string(),
        Item::None => String::new(),
    })
}

/// A value from the command line: TOML if it parses, otherwise a string.
fn value_of(raw: &str) -> toml_edit::Value {
    raw.parse::<toml_edit::Value>()
        .unwrap_or_else(|_| toml_edit::Value::from(raw))
}

/// A top-level string taken out of a config's text by [`take_string`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The string, or `None` when the key holds something else.
    pub value: Option<String>,
    /// Where the key starts (1-based).
    pub line: usize,
    pub col: usize,
    /// The text with the key and its value blanked out: every other line and column is
    /// where it was, so errors in the rest point at the file as written.
    pub rest: String,
}

/// Takes top-level key `key` out of `text` (for a value that is not config, like an
/// invite code in a card's `stallnet.toml`). `None` when the key is absent or the text
/// is not TOML (the config's own parse then says why).
pub fn take_string(text: &str, key: &str) -> Option<Taken> {
    let doc = toml_edit::Document::parse(text.to_string()).ok()?;
    let (k, item) = doc.as_table().get_key_value(key)?;
    let (start, end) = (k.span()?.start, item.span()?.end);
    let rest: String = text
        .char_indices()
        .map(|(i, c)| {
            if (start..end).contains(&i) && c != '\n' {
                ' '
            } else {
                c
            }
        })
        .collect();
    let before = text.get(..start)?;
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some(Taken {
        value: item.as_str().map(str::to_string),
        line,
        col,
        rest,
    })
}

/// Applies `PATH=VALUE` assignments in order; missing tables are created.
pub fn set(text: &str, assignments: &[String]) -> Result<String, EditError> {
    let mut doc: DocumentMut = text.parse().map_err(|e| EditError::Parse(format!("{e}")))?;
    for a in assignments {
        let (path, raw) = a
            .split_once('=')
            .ok_or_else(|| EditError::BadAssignment(a.clone()))?;
        let steps = parse_path(path.trim())?;
        assign(doc.as_table_mut(), &steps, 0, value_of(raw.trim()))?;
    }
    Ok(doc.to_string())
}

/// Sets `steps[at..]` under `table` (steps before `at` name the table, for messages).
fn assign(
    table: &mut dyn toml_edit::TableLike,
    steps: &[Step],
    at: usize,
    value: toml_edit::Value,
) -> Result<(), EditError> {
    let Some(Step::Key(k)) = steps.get(at) else {
        return Err(EditError::BadPath(shown(steps)));
    };
    let index = match steps.get(at + 1) {
        Some(Step::Index(n)) => Some(*n),
        _ => None,
    };
    let next = at + 1 + usize::from(index.is_some());
    if matches!(steps.get(next), Some(Step::Index(_))) {
        return Err(EditError::BadPath(shown(steps)));
    }
    let here = shown(&steps[..at + 1]);
    let Some(n) = index else {
        if next == steps.len() {
            let mut value = value;
            // A changed value keeps its comments.
            if let Some(Item::Value(old)) = table.get(k) {
                *value.decor_mut() = old.decor().clone();
            }
            table.insert(k, Item::Value(value));
            return Ok(());
        }
        if table.get(k).is_none() {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            table.insert(k, Item::Table(t));
        }
        let child = table
            .get_mut(k)
            .and_then(|i| i.as_table_like_mut())
            .ok_or_else(|| EditError::NotTable(here.clone()))?;
        return assign(child, steps, next, value);
    };
    let item = table
        .get_mut(k)
        .ok_or_else(|| EditError::NotFound(here.clone()))?;
    let out_of_range = |len: usize| EditError::Index {
        path: here.clone(),
        index: n,
        len,
    };
    match item {
        Item::ArrayOfTables(arr) => {
            let len = arr.len();
            let t = arr.get_mut(n).ok_or_else(|| out_of_range(len))?;
            if next == steps.len() {
                return Err(EditError::NotTable(format!("{here}[{n}] is a table:")));
            }
            assign(t, steps, next, value)
        }
        Item::Value(toml_edit::Value::Array(arr)) => {
            let len = arr.len();
            if n >= len {
                return Err(out_of_range(len));
            }
            if next == steps.len() {
                let mut value = value;
                if let Some(old) = arr.get(n) {
                    *value.decor_mut() = old.decor().clone();
                }
                arr.replace(n, value);
                return Ok(());
            }
            match arr.get_mut(n) {
                Some(toml_edit::Value::InlineTable(t)) => assign(t, steps, next, value),
                _ => Err(EditError::NotTable(format!("{here}[{n}]"))),
            }
        }
        _ => Err(EditError::NotFound(format!("{here}[{n}]"))),
    }
}

/// One difference between two configs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub path: String,
    /// `null` when the field is new.
    pub before: Value,
    /// `null` when the field is gone.
    pub after: Value,
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        // Arrays of tables by index; arrays of plain values as one value.
        Value::Array(a) if a.iter().any(Value::is_object) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        // An unset optional field and an absent one are the same thing.
        Value::Null => {}
        Value::Object(_) => {}
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// What changes from `before` to `after` (both as serialized, defaults included).
pub fn diff(before: &impl Serialize, after: &impl Serialize) -> Vec<Change> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten(
        "",
        &serde_json::to_value(before).unwrap_or_default(),
        &mut a,
    );
    flatten("", &serde_json::to_value(after).unwrap_or_default(), &mut b);
    let old: std::collections::BTreeMap<_, _> = a.into_iter().collect();
    let new: std::collections::BTreeMap<_, _> = b.into_iter().collect();
    let mut out = Vec::new();
    for (p, v) in &old {
        match new.get(p) {
            Some(n) if n == v => {}
            Some(n) => out.push(Change {
                path: p.clone(),
                before: v.clone(),
                after: n.clone(),
            }),
            None => out.push(Change {
                path: p.clone(),
                before: v.clone(),
                after: Value::Null,
            }),
        }
    }
    for (p, n) in &new {
        if !old.contains_key(p) {
            out.push(Change {
                path: p.clone(),
                before: Value::Null,
                after: n.clone(),
            });
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_key_leaves_the_rest_where_it_was() {
        let text = "# card\nrole = \"edge\"\nenroll = \"SN-AB\\u0043D\"\n[edge]\nlan = 4\n";
        let t = take_string(text, "enroll").expect("taken");
        assert_eq!(t.value.as_deref(), Some("SN-ABCD"));
        assert_eq!((t.line, t.col), (3, 1));
        assert_eq!(t.rest.lines().count(), text.lines().count());
        assert_eq!(t.rest.lines().nth(2).map(str::trim), Some(""));
        assert_eq!(t.rest.lines().nth(4), Some("lan = 4"));
        assert!(take_string(text, "other").is_none());
        assert!(take_string("enroll = [", "enroll").is_none());
        let t = take_string("  enroll = 5\n", "enroll").expect("taken");
        assert_eq!((t.value, t.col), (None, 3));
    }

    const TEXT: &str = r#"# the stall's box
role = "edge"

[edge]
lan = ["10.1.0.0/24"] # the shop
hubs = [{ address = "192.0.2.1:4433", identity = "x" }]

[[edge.uplinks]]
name = "wifi" # venue
interface = "wan0"

[[edge.uplinks]]
name = "cell"
interface = "wwan0"
"#;

    #[test]
    fn get_reads_by_path() {
        assert_eq!(get(TEXT, "role").as_deref(), Ok("\"edge\""));
        assert_eq!(get(TEXT, "edge.uplinks[1].name").as_deref(), Ok("\"cell\""));
        assert_eq!(get(TEXT, "edge.lan[0]").as_deref(), Ok("\"10.1.0.0/24\""));
        assert_eq!(
            get(TEXT, "edge.hubs[0].address").as_deref(),
            Ok("\"192.0.2.1:4433\"")
        );
        assert_eq!(
            get(TEXT, "edge.uplinks[2].name"),
            Err(EditError::Index {
                path: "edge.uplinks".into(),
                index: 2,
                len: 2
            })
        );
        assert_eq!(
            get(TEXT, "edge.mtu"),
            Err(EditError::NotFound("edge.mtu".into()))
        );
        assert!(matches!(get(TEXT, "edge..mtu"), Err(EditError::BadPath(_))));
    }

    #[test]
    fn set_keeps_comments_and_creates_tables() {
        let out = set(
            TEXT,
            &[
                "edge.uplinks[1].metered=true".into(),
                "edge.mtu = 1400".into(),
                "edge.uplinks[0].name=lobby".into(),
                "edge.lan[0]=\"10.2.0.0/24\"".into(),
                "metrics.listen=127.0.0.1:9108".into(),
                "edge.hubs[0].identity=\"sn1:y\"".into(),
            ],
        )
        .expect("set");
        assert!(
            out.contains("# the stall's box") && out.contains("# venue"),
            "{out}"
        );
        assert_eq!(get(&out, "edge.uplinks[1].metered").as_deref(), Ok("true"));
        assert_eq!(get(&out, "edge.mtu").as_deref(), Ok("1400"));
        assert_eq!(
            get(&out, "edge.uplinks[0].name").as_deref(),
            Ok("\"lobby\"")
        );
        assert_eq!(get(&out, "edge.lan[0]").as_deref(), Ok("\"10.2.0.0/24\""));
        assert_eq!(
            get(&out, "metrics.listen").as_deref(),
            Ok("\"127.0.0.1:9108\"")
        );
        assert_eq!(
            get(&out, "edge.hubs[0].identity").as_deref(),
            Ok("\"sn1:y\"")
        );
        assert!(matches!(
            set(TEXT, &["edge.uplinks[5].name=x".into()]),
            Err(EditError::Index { index: 5, .. })
        ));
        assert!(matches!(
            set(TEXT, &["role".into()]),
            Err(EditError::BadAssignment(_))
        ));
        assert!(matches!(
            set(TEXT, &["role.x=1".into()]),
            Err(EditError::NotTable(_))
        ));
    }

    #[test]
    fn diff_names_the_changed_fields() {
        let a: toml::Value = toml::from_str(TEXT).expect("toml");
        let changed = set(
            TEXT,
            &[
                "edge.uplinks[1].metered=true".into(),
                "edge.mtu=1400".into(),
            ],
        )
        .expect("set");
        let b: toml::Value = toml::from_str(&changed).expect("toml");
        let d = diff(&a, &b);
        let paths: Vec<&str> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["edge.mtu", "edge.uplinks[1].metered"]);
        assert_eq!(d[0].before, Value::Null);
        assert_eq!(d[0].after, serde_json::json!(1400));
        assert!(diff(&a, &a).is_empty());
    }
}
