//! The config's reference, generated from the schema types so it cannot drift: a JSON
//! Schema for editors (`stallnet config schema`) and the field-by-field Markdown of
//! `docs/CONFIG.md` (`stallnet config docs`), both from the same doc comments.

use serde_json::{Map, Value};

/// The JSON Schema (draft 2020-12) of `stallnet.toml`.
pub fn json_schema() -> Value {
    let schema = schemars::schema_for!(crate::Config);
    serde_json::to_value(&schema).unwrap_or_default()
}

fn type_of(p: &Value) -> String {
    if let Some(r) = p["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("[{name}](#{})", name.to_ascii_lowercase());
    }
    if let Some(any) = p["anyOf"].as_array().or_else(|| p["oneOf"].as_array()) {
        let parts: Vec<String> = any
            .iter()
            .filter(|v| v["type"] != "null")
            .map(type_of)
            .collect();
        return parts.join(" or ");
    }
    if let Some(e) = p["enum"].as_array() {
        return e
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", ");
    }
    if let Some(c) = p.get("const") {
        return format!("`{c}`");
    }
    let t = match &p["type"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| *s != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => String::new(),
    };
    if t == "array" {
        return format!("list of {}", type_of(&p["items"]));
    }
    if let Some(f) = p["format"].as_str() {
        return format!("{t} ({f})");
    }
    if t.is_empty() {
        "value".into()
    } else {
        t
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn section(out: &mut String, title: &str, def: &Value) {
    out.push_str(&format!("\n## {title}\n\n"));
    if let Some(d) = def["description"].as_str() {
        out.push_str(&one_line(d));
        out.push_str("\n\n");
    }
    let empty = Map::new();
    let props = def["properties"].as_object().unwrap_or(&empty);
    if props.is_empty() {
        let values = def["oneOf"]
            .as_array()
            .or_else(|| def["anyOf"].as_array())
            .cloned()
            .unwrap_or_default();
        if !values.is_empty() {
            out.push_str("| value | meaning |\n|---|---|\n");
            for v in values {
                // A constant, every value of an enum (not only its first), or a type.
                let val = match (v.get("const"), v["enum"].as_array()) {
                    (Some(c), _) => format!("`{c}`"),
                    (None, Some(e)) => e
                        .iter()
                        .map(|c| format!("`{c}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    (None, None) => type_of(&v),
                };
                out.push_str(&format!(
                    "| {val} | {} |\n",
                    one_line(v["description"].as_str().unwrap_or(""))
                ));
            }
        } else if def.get("enum").is_some() || def.get("type").is_some() {
            out.push_str(&format!("Type: {}\n", type_of(def)));
        }
        return;
    }
    let required: Vec<&str> = def["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    out.push_str("| field | type | required | default | description |\n|---|---|---|---|---|\n");
    for (name, p) in props {
        let default = p
            .get("default")
            .filter(|d| !d.is_null())
            .map(|d| format!("`{d}`"))
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{name}` | {} | {} | {default} | {} |\n",
            type_of(p),
            if required.contains(&name.as_str()) {
                "yes"
            } else {
                ""
            },
            one_line(p["description"].as_str().unwrap_or(""))
        ));
    }
}

/// `docs/CONFIG.md`.
pub fn config_md() -> String {
    let schema = json_schema();
    let mut out = String::from(
        "# stallnet.toml reference\n\n\
         Generated from the config's types by `stallnet config docs` (a test fails when this \
         file and the code disagree). `stallnet config schema` prints the same as a JSON \
         Schema for editors. Every error `stallnet config validate` reports names the field \
         path used here.\n",
    );
    section(&mut out, "Top level", &schema);
    let empty = Map::new();
    let defs = schema["$defs"].as_object().unwrap_or(&empty);
    let mut names: Vec<&String> = defs.keys().collect();
    names.sort();
    for name in names {
        section(&mut out, name, &defs[name.as_str()]);
    }
    out
}
