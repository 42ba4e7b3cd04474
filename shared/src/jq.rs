//! jq expressions, compiled once per namespace version and run many times.
//!
//! jaq works on its own value type; procedures live in `serde_json`. The conversions are
//! written out here (rather than round-tripping through text) because they sit on the hot
//! path of every step.

use std::fmt;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data, unwrap_valr};
use jaq_json::{Num, Val};
use serde_json::Value;

#[path = "jq_nesting.rs"]
mod nesting;

type JqFilter = jaq_core::Filter<data::JustLut<Val>>;

/// Why an expression does not compile. Carries the source so that the message can point at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jq expression `{expr}` does not compile: {reason}")]
pub struct CompileError {
    pub expr: String,
    pub reason: String,
}

/// Why a compiled expression failed at run time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("jq expression `{expr}` failed: {message}")]
    Failed { expr: String, message: String },
    #[error("jq expression `{expr}` produced no value")]
    Empty { expr: String },
}

/// A compiled jq filter plus its source text.
pub struct Expr {
    source: String,
    filter: JqFilter,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

impl Expr {
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        let fail = |reason: String| CompileError {
            expr: source.to_owned(),
            reason,
        };
        let depth = nesting::depth(source);
        if depth > nesting::MAX_NESTING {
            return Err(fail(format!(
                "nested {depth} levels deep; at most {} are allowed",
                nesting::MAX_NESTING
            )));
        }
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(
                &arena,
                File {
                    code: source,
                    path: (),
                },
            )
            .map_err(|errs| fail(describe_load_errors(&errs)))?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errs| {
                let names: Vec<String> = errs
                    .iter()
                    .flat_map(|(_, es)| es.iter().map(|(name, kind)| format!("{name} ({kind:?})")))
                    .collect();
                fail(format!("undefined: {}", names.join(", ")))
            })?;
        Ok(Self {
            source: source.to_owned(),
            filter,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Runs the filter and returns its first output; jq's `empty` is an error because a step
    /// needs exactly one value to go on with.
    pub fn eval_one(&self, input: &Value) -> Result<Value, EvalError> {
        self.run(to_val(input))
    }

    /// As [`Expr::eval_one`], on an input object assembled from borrowed parts: a step's
    /// context is converted once, straight from the run's scope, instead of being cloned into
    /// one `serde_json` object first and converted after.
    pub fn eval_fields(&self, mut input: Fields) -> Result<Value, EvalError> {
        // serde_json's objects iterate in key order; sorting keeps `.[]` and `to_entries` on
        // the whole context as they were.
        input.0.sort_keys();
        self.run(Val::obj(input.0))
    }

    fn run(&self, input: Val) -> Result<Value, EvalError> {
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        let mut out = self.filter.id.run((ctx, input)).map(unwrap_valr);
        match out.next() {
            Some(Ok(v)) => Ok(from_val(&v)),
            Some(Err(e)) => Err(EvalError::Failed {
                expr: self.source.clone(),
                message: e.to_string(),
            }),
            None => Err(EvalError::Empty {
                expr: self.source.clone(),
            }),
        }
    }

    /// Evaluates a condition with jq's truthiness: everything but `false` and `null` is true.
    pub fn eval_bool(&self, input: &Value) -> Result<bool, EvalError> {
        Ok(truthy(&self.eval_one(input)?))
    }

    /// [`Expr::eval_bool`] on an input assembled from borrowed parts.
    pub fn eval_fields_bool(&self, input: Fields) -> Result<bool, EvalError> {
        Ok(truthy(&self.eval_fields(input)?))
    }
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
}

/// A JSON value in jq's form, converted once and handed to many expressions. jaq's values
/// share their arrays and objects, so handing one over copies no more than its top level.
#[derive(Clone, Debug, Default)]
pub struct Converted(Val);

impl Converted {
    pub fn new(v: &Value) -> Self {
        Self(to_val(v))
    }
}

/// An expression's input object, built field by field from borrowed JSON, or from parts
/// converted earlier ([`Converted`]) where those outlive the expression.
#[derive(Default)]
pub struct Fields(jaq_json::Map);

impl Fields {
    /// A field holding a JSON value, converted in place.
    pub fn value(&mut self, key: &str, v: &Value) -> &mut Self {
        self.0.insert(Val::from(key.to_owned()), to_val(v));
        self
    }

    /// A field holding an object given by its entries (a scope's map of step results).
    pub fn object<'v>(
        &mut self,
        key: &str,
        entries: impl IntoIterator<Item = (&'v String, &'v Value)>,
    ) -> &mut Self {
        let obj = entries
            .into_iter()
            .map(|(k, v)| (Val::from(k.clone()), to_val(v)))
            .collect();
        self.0.insert(Val::from(key.to_owned()), Val::obj(obj));
        self
    }

    /// A field holding a value converted earlier ([`Converted`]): what every expression of a
    /// run reads (its request, its caller, a procedure's input) is converted once per run
    /// instead of once per expression.
    pub fn converted(&mut self, key: &str, v: &Converted) -> &mut Self {
        self.0.insert(Val::from(key.to_owned()), v.0.clone());
        self
    }

    /// As [`Fields::object`], taking each entry's converted form from `cached` where it has
    /// one: a scope's step results are converted once, when their step ends, and not again
    /// for every later expression. An entry `cached` lacks is converted here.
    pub fn object_cached<'v>(
        &mut self,
        key: &str,
        entries: impl IntoIterator<Item = (&'v String, &'v Value)>,
        cached: impl Fn(&str) -> Option<&'v Converted>,
    ) -> &mut Self {
        let obj = entries
            .into_iter()
            .map(|(k, v)| {
                let v = cached(k).map_or_else(|| to_val(v), |c| c.0.clone());
                (Val::from(k.clone()), v)
            })
            .collect();
        self.0.insert(Val::from(key.to_owned()), Val::obj(obj));
        self
    }

    /// A field holding a string.
    pub fn string(&mut self, key: &str, s: &str) -> &mut Self {
        self.0
            .insert(Val::from(key.to_owned()), Val::from(s.to_owned()));
        self
    }
}

fn describe_load_errors<P>(errs: &jaq_core::load::Errors<&str, P>) -> String {
    use jaq_core::load::Error;
    let mut parts = Vec::new();
    for (_, e) in errs {
        match e {
            Error::Io(v) => parts.extend(v.iter().map(|(p, m)| format!("cannot import {p}: {m}"))),
            Error::Lex(v) => {
                parts.extend(v.iter().map(|(expect, at)| {
                    format!("expected {} at `{}`", expect.as_str(), truncate(at))
                }));
            }
            Error::Parse(v) => {
                parts.extend(v.iter().map(|(expect, at)| {
                    format!("expected {} at `{}`", expect.as_str(), truncate(at))
                }));
            }
        }
    }
    if parts.is_empty() {
        "syntax error".to_owned()
    } else {
        parts.join("; ")
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(20) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// serde_json → jaq.
pub fn to_val(v: &Value) -> Val {
    match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Val::Num(Num::from_integral(i))
            } else if let Some(u) = n.as_u64() {
                Val::Num(Num::from_integral(u))
            } else {
                Val::Num(Num::Float(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Val::from(s.clone()),
        Value::Array(a) => a.iter().map(to_val).collect(),
        Value::Object(o) => Val::obj(
            o.iter()
                .map(|(k, v)| (Val::from(k.clone()), to_val(v)))
                .collect(),
        ),
    }
}

/// jaq → serde_json. Values JSON cannot hold (NaN, byte strings, non-string keys) are mapped
/// the way jq prints them.
pub fn from_val(v: &Val) -> Value {
    match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => num_to_json(n),
        Val::TStr(b) | Val::BStr(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(a) => Value::Array(a.iter().map(from_val).collect()),
        Val::Obj(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                        other => other.to_string(),
                    };
                    (key, from_val(v))
                })
                .collect(),
        ),
    }
}

fn num_to_json(n: &Num) -> Value {
    match n {
        Num::Int(i) => Value::from(*i as i64),
        Num::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        other => {
            let text = other.to_string();
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text))
        }
    }
}

#[cfg(test)]
#[path = "jq_tests.rs"]
mod tests;
