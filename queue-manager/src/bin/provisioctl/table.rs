//! Output: `-o json` prints the API's JSON as it came; `-o table` prints aligned columns of the
//! main fields under a header.

use serde_json::Value;

/// A column: its header and where its value is in a row (a JSON pointer). A pointer starting
/// with `#` shows the length of the array at the rest of it.
pub type Col = (&'static str, &'static str);

pub const REQUEST: &[Col] = &[
    ("ID", "/id"),
    ("NAMESPACE", "/namespace"),
    ("PROCEDURE", "/procedure"),
    ("STATUS", "/status"),
    ("ATTEMPTS", "/attempts"),
    ("SUBMITTED", "/submitted_at"),
    ("FINISHED", "/finished_at"),
    ("ERROR", "/error/code"),
];
pub const ACCEPTED: &[Col] = &[("ID", "/id"), ("STATUS", "/status")];
pub const NAMESPACES: &[Col] = &[
    ("NAME", "/name"),
    ("VERSION", "/version"),
    ("APPLIED", "/applied_at"),
];
pub const HISTORY: &[Col] = &[
    ("VERSION", "/version"),
    ("APPLIED", "/applied_at"),
    ("BY", "/applied_by"),
];
pub const IN_DOUBT: &[Col] = &[
    ("ID", "/id"),
    ("REQUEST", "/request_id"),
    ("NAMESPACE", "/namespace"),
    ("PROCEDURE", "/procedure"),
    ("SERVER", "/server"),
    ("NOT_UNDONE", "#/not_undone"),
    ("FINISHED", "/finished_at"),
];
pub const AUDIT: &[Col] = &[
    ("ID", "/id"),
    ("REQUEST", "/request_id"),
    ("NAMESPACE", "/namespace"),
    ("PROCEDURE", "/procedure"),
    ("OUTCOME", "/outcome"),
    ("STARTED", "/started_at"),
    ("FINISHED", "/finished_at"),
];
pub const DEAD_LETTERS: &[Col] = &[
    ("ID", "/id"),
    ("REQUEST", "/request_id"),
    ("NAMESPACE", "/namespace"),
    ("PROCEDURE", "/procedure"),
    ("REASON", "/reason"),
    ("STATUS", "/status"),
    ("DEAD_AT", "/dead_at"),
];
pub const POOLS: &[Col] = &[
    ("NAME", "/name"),
    ("STRATEGY", "/strategy"),
    ("CAPACITY", "/capacity"),
    ("USED", "/used"),
    ("FREE", "/free"),
    ("RESOURCES", "#/resources"),
];
pub const COMMAND: &[Col] = &[
    ("COMMAND", "/command"),
    ("KIND", "/kind"),
    ("TRANSACTION", "/transaction"),
    ("REQUEST", "/request_id"),
    ("STATUS", "/status"),
    ("RESULT", "/result/transaction_status"),
];
pub const REQUEUED_ONE: &[Col] = &[
    ("DEAD_LETTER", "/dead_letter/id"),
    ("REQUEST", "/request/id"),
    ("STATUS", "/request/status"),
];
pub const REQUEUED: &[Col] = &[
    ("DEAD_LETTER", "/id"),
    ("REQUEST", "/request_id"),
    ("STATUS", "/request_status"),
];
pub const DELETED: &[Col] = &[("ID", "/id"), ("DELETED", "/deleted")];
pub const PRINCIPAL: &[Col] = &[
    ("ID", "/id"),
    ("NAME", "/name"),
    ("KIND", "/kind"),
    ("GROUPS", "/groups"),
];
pub const GROUPS: &[Col] = &[("NAME", "/name"), ("GROUPS", "/groups")];
pub const KEY: &[Col] = &[
    ("ID", "/id"),
    ("PRINCIPAL", "/principal"),
    ("KEY", "/key"),
    ("EXPIRES", "/expires_at"),
];
pub const GRANTS: &[Col] = &[
    ("NAME", "/name"),
    ("GRANTS", "/grants"),
    ("GROUPS", "/groups"),
    ("PERMISSIONS", "/permissions"),
];
pub const REVOKED: &[Col] = &[("ID", "/id"), ("REVOKED", "/revoked")];
pub const STEPS: &[Col] = &[
    ("PATH", "/path"),
    ("ID", "/id"),
    ("CALL", "/call"),
    ("STATUS", "/status"),
    ("ERROR", "/error"),
];

/// The rows of a list answer: the array under `key`, or — the API may name it otherwise —
/// the first array in the object, or the answer itself when it is an array.
pub fn list_of<'a>(answer: &'a Value, key: &str) -> &'a [Value] {
    if let Some(a) = answer.get(key).and_then(Value::as_array) {
        return a;
    }
    if let Some(a) = answer.as_array() {
        return a;
    }
    answer
        .as_object()
        .and_then(|m| m.values().find_map(Value::as_array))
        .map_or(&[], Vec::as_slice)
}

/// A cell: text as is, timestamps to the second, arrays of scalars comma-joined, other
/// structures as compact JSON, absent or null as `-`.
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s).map_or_else(
            |_| s.clone(),
            |t| {
                t.with_timezone(&chrono::Utc)
                    .format("%Y-%m-%dT%H:%M:%SZ")
                    .to_string()
            },
        ),
        Some(Value::Array(a)) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            if a.is_empty() {
                "-".to_owned()
            } else {
                a.iter()
                    .map(|x| cell(Some(x)))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }
        Some(other) => other.to_string(),
    }
}

fn value_at(row: &Value, pointer: &str) -> String {
    if let Some(p) = pointer.strip_prefix('#') {
        return row
            .pointer(p)
            .and_then(Value::as_array)
            .map_or_else(|| "-".to_owned(), |a| a.len().to_string());
    }
    cell(row.pointer(pointer))
}

/// Aligned columns under a header. When none of `cols` is found in any row (an answer of a
/// shape this client does not know), the columns are the first row's scalar fields instead.
pub fn render(rows: &[Value], cols: &[Col]) -> String {
    let known = rows.is_empty()
        || rows.iter().any(|r| {
            cols.iter()
                .any(|(_, p)| r.pointer(p.trim_start_matches('#')).is_some())
        });
    let (headers, cells): (Vec<String>, Vec<Vec<String>>) = if known {
        (
            cols.iter().map(|(h, _)| (*h).to_owned()).collect(),
            rows.iter()
                .map(|r| cols.iter().map(|(_, p)| value_at(r, p)).collect())
                .collect(),
        )
    } else {
        let keys: Vec<String> = rows
            .first()
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| !v.is_object() && !v.is_array())
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        (
            keys.iter().map(|k| k.to_uppercase()).collect(),
            rows.iter()
                .map(|r| keys.iter().map(|k| cell(r.get(k))).collect())
                .collect(),
        )
    };
    grid(&headers, &cells)
}

/// Pads every column to its widest cell.
pub fn grid(headers: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            s.extend(std::iter::repeat_n(' ', w - c.chars().count()));
        }
        s.trim_end().to_owned()
    };
    let mut out = line(headers);
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_align_and_unknown_shapes_fall_back_to_their_fields() {
        let rows = vec![
            json!({"id": "a", "status": "queued", "groups": ["x", "y"]}),
            json!({"id": "longer", "status": null}),
        ];
        let cols: &[Col] = &[("ID", "/id"), ("STATUS", "/status"), ("GROUPS", "/groups")];
        assert_eq!(
            render(&rows, cols),
            "ID      STATUS  GROUPS\na       queued  x,y\nlonger  -       -\n"
        );
        let odd = vec![json!({"thing": 1, "nested": {"a": 1}})];
        assert_eq!(render(&odd, POOLS), "THING\n1\n");
        assert_eq!(
            cell(Some(&json!("2024-05-01T12:00:00.123456+00:00"))),
            "2024-05-01T12:00:00Z"
        );
        assert_eq!(
            list_of(&json!({"items": [1], "next": null}), "pools").len(),
            1
        );
    }
}
