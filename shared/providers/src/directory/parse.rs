//! Reading the directory's inputs and rollback data.

use chrono::{DateTime, SecondsFormat, Utc};
use provisio_provider::ProviderError;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::MAX_NAME;
use crate::input::{boolean, invalid, kind, object, string, uuid};

/// A parsed execute.
pub(super) enum Op {
    EnsureOrg {
        name: String,
    },
    CreateUser {
        org: String,
        user: String,
        display_name: Option<String>,
    },
    AddToGroup {
        user: Uuid,
        group: String,
    },
    AddAlias {
        user: Uuid,
        alias: String,
    },
    DeleteUser {
        user: Uuid,
    },
}

impl Op {
    pub(super) fn parse(action: &str, input: &Value) -> Result<Self, ProviderError> {
        let what = format!("directory.{action} input");
        let op = match action {
            "ensure_org" => {
                let m = object(input, &what)?;
                Op::EnsureOrg {
                    name: name(m, "name", &what, false)?,
                }
            }
            "create_user" => {
                let m = object(input, &what)?;
                let display_name = match m.get("display_name") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) if s.chars().count() <= MAX_NAME => Some(s.clone()),
                    Some(Value::String(_)) => {
                        return Err(invalid(format!(
                            "{what}: `display_name` is longer than {MAX_NAME} characters"
                        )));
                    }
                    Some(other) => {
                        return Err(invalid(format!(
                            "{what}: `display_name` must be a string, not {}",
                            kind(other)
                        )));
                    }
                };
                Op::CreateUser {
                    org: name(m, "org", &what, false)?,
                    user: name(m, "user", &what, true)?,
                    display_name,
                }
            }
            "add_to_group" => {
                let m = object(input, &what)?;
                Op::AddToGroup {
                    user: uuid(m, "user", &what)?,
                    group: name(m, "group", &what, false)?,
                }
            }
            "add_alias" => {
                let m = object(input, &what)?;
                Op::AddAlias {
                    user: uuid(m, "user", &what)?,
                    alias: name(m, "alias", &what, true)?,
                }
            }
            "delete_user" => {
                let m = object(input, &what)?;
                Op::DeleteUser {
                    user: uuid(m, "user", &what)?,
                }
            }
            other => {
                return Err(ProviderError::permanent(
                    "unknown_action",
                    format!("directory has no action `{other}`"),
                ));
            }
        };
        Ok(op)
    }
}

/// A parsed rollback: what the execute recorded as its rollback data.
pub(super) enum Undo {
    EnsureOrg {
        org_id: Uuid,
        created: bool,
    },
    CreateUser {
        user_id: Uuid,
    },
    AddToGroup {
        group_id: Uuid,
        user_id: Uuid,
        group_created: bool,
        member_added: bool,
    },
    AddAlias {
        alias: String,
        user_id: Uuid,
        created: bool,
    },
    DeleteUser(Box<Snapshot>),
}

/// Everything `delete_user` removed, to put it back with the same ids.
pub(super) struct Snapshot {
    pub(super) id: Uuid,
    pub(super) org_id: Uuid,
    pub(super) name: String,
    pub(super) display_name: Option<String>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) aliases: Vec<String>,
    /// `(id, name)` of each group the user was a member of.
    pub(super) groups: Vec<(Uuid, String)>,
}

impl Snapshot {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "user": {
                "id": self.id,
                "org_id": self.org_id,
                "name": self.name,
                "display_name": self.display_name,
                "created_at": self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            },
            "aliases": self.aliases,
            "groups": self
                .groups
                .iter()
                .map(|(id, name)| json!({"id": id, "name": name}))
                .collect::<Vec<_>>(),
        })
    }

    pub(super) fn from_json(data: &Value, what: &str) -> Result<Self, ProviderError> {
        let m = object(data, what)?;
        let user_what = format!("{what} `user`");
        let user = object(m.get("user").unwrap_or(&Value::Null), &user_what)?;
        let created_at = string(user, "created_at", &user_what)?;
        let created_at = DateTime::parse_from_rfc3339(created_at)
            .map_err(|e| invalid(format!("{user_what}: `created_at` is not RFC 3339: {e}")))?
            .with_timezone(&Utc);
        let display_name = match user.get("display_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(invalid(format!(
                    "{user_what}: `display_name` must be a string or null, not {}",
                    kind(other)
                )));
            }
        };
        let aliases = array(m, "aliases", what)?
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(format!("{what}: `aliases` must hold strings")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let groups = array(m, "groups", what)?
            .iter()
            .map(|g| {
                let gwhat = format!("{what} `groups` item");
                let g = object(g, &gwhat)?;
                Ok((
                    uuid(g, "id", &gwhat)?,
                    string(g, "name", &gwhat)?.to_owned(),
                ))
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(Self {
            id: uuid(user, "id", &user_what)?,
            org_id: uuid(user, "org_id", &user_what)?,
            name: string(user, "name", &user_what)?.to_owned(),
            display_name,
            created_at,
            aliases,
            groups,
        })
    }
}

impl Undo {
    pub(super) fn parse(action: &str, data: &Value) -> Result<Self, ProviderError> {
        let what = format!("directory.{action} rollback data");
        let m = || object(data, &what);
        let undo = match action {
            "ensure_org" => {
                let m = m()?;
                Undo::EnsureOrg {
                    org_id: uuid(m, "org_id", &what)?,
                    created: boolean(m, "created", &what)?,
                }
            }
            "create_user" => Undo::CreateUser {
                user_id: uuid(m()?, "user_id", &what)?,
            },
            "add_to_group" => {
                let m = m()?;
                Undo::AddToGroup {
                    group_id: uuid(m, "group_id", &what)?,
                    user_id: uuid(m, "user_id", &what)?,
                    group_created: boolean(m, "group_created", &what)?,
                    member_added: boolean(m, "member_added", &what)?,
                }
            }
            "add_alias" => {
                let m = m()?;
                Undo::AddAlias {
                    alias: string(m, "alias", &what)?.to_owned(),
                    user_id: uuid(m, "user_id", &what)?,
                    created: boolean(m, "created", &what)?,
                }
            }
            "delete_user" => Undo::DeleteUser(Box::new(Snapshot::from_json(data, &what)?)),
            other => {
                return Err(ProviderError::permanent(
                    "unknown_action",
                    format!("directory has no action `{other}` to roll back"),
                ));
            }
        };
        Ok(undo)
    }
}

fn array<'v>(
    m: &'v Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<&'v Vec<Value>, ProviderError> {
    match m.get(field) {
        None | Some(Value::Null) => Err(invalid(format!("{what}: `{field}` is required"))),
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(invalid(format!(
            "{what}: `{field}` must be an array, not {}",
            kind(other)
        ))),
    }
}

/// A name: non-empty, at most [`MAX_NAME`] characters, no surrounding blanks, no control
/// characters; `local` (user names and aliases) also forbids blanks and `@`.
fn name(
    m: &Map<String, Value>,
    field: &str,
    what: &str,
    local: bool,
) -> Result<String, ProviderError> {
    let s = string(m, field, what)?;
    let problem = if s.is_empty() {
        Some("is empty")
    } else if s.chars().count() > MAX_NAME {
        Some("is too long")
    } else if s.trim() != s {
        Some("has leading or trailing blanks")
    } else if s.chars().any(char::is_control) {
        Some("contains control characters")
    } else if local && s.chars().any(|c| c.is_whitespace() || c == '@') {
        Some("may not contain blanks or `@`")
    } else {
        None
    };
    match problem {
        Some(p) => Err(invalid(format!("{what}: `{field}` {p}: {s:?}"))),
        None => Ok(s.to_owned()),
    }
}
