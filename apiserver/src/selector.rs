//! `labelSelector` (equality- and set-based) and `fieldSelector` query
//! parameters, parsed once per request and matched against stored JSON.

use serde_json::Value;

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Req>);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn check_key(key: &str, whole: &str) -> ApiResult<String> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label key {key:?} in selector {whole:?}"
        )))
    }
}

fn parse_set(rest: &str, whole: &str) -> ApiResult<Vec<String>> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: expected a parenthesised value list in selector {whole:?}"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: empty requirement in selector {s:?}"
                )));
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Req::NotExists(check_key(k.trim(), s)?)
            } else if let Some((k, v)) = p.split_once("!=") {
                Req::NotEq(check_key(k.trim(), s)?, v.trim().to_string())
            } else if let Some((k, v)) = p.split_once("==") {
                Req::Eq(check_key(k.trim(), s)?, v.trim().to_string())
            } else if let Some((k, v)) = p.split_once('=') {
                Req::Eq(check_key(k.trim(), s)?, v.trim().to_string())
            } else if let Some(idx) = p.find(" notin ") {
                Req::NotIn(check_key(p[..idx].trim(), s)?, parse_set(&p[idx + 7..], s)?)
            } else if let Some(idx) = p.find(" in ") {
                Req::In(check_key(p[..idx].trim(), s)?, parse_set(&p[idx + 4..], s)?)
            } else {
                Req::Exists(check_key(p, s)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Matches the `metadata.labels` of a stored object.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(|v| v.as_str());
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Fields every kind supports, and the extra ones some kinds do, as the real
/// server registers them.
fn supported(kind: &str, field: &str) -> bool {
    matches!(field, "metadata.name" | "metadata.namespace")
        || matches!(
            (kind, field),
            ("Pod", "spec.nodeName")
                | ("Pod", "status.phase")
                | ("Pod", "spec.serviceAccountName")
                | ("Pod", "status.podIP")
                | ("Secret", "type")
                | ("Event", "involvedObject.name")
                | ("Event", "involvedObject.kind")
                | ("Event", "involvedObject.namespace")
                | ("Namespace", "status.phase")
                | ("Node", "spec.unschedulable")
        )
}

impl FieldSelector {
    pub fn parse(s: &str, kind: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in s.split(',') {
            let p = part.trim();
            let (field, eq, value) = if let Some((k, v)) = p.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = p.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = p.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {s:?}: {p:?} is not of the form field=value or field!=value"
                )));
            };
            let field = field.trim();
            if !supported(kind, field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field} (for {kind}: metadata.name, metadata.namespace{})",
                    if kind == "Pod" { ", spec.nodeName, spec.serviceAccountName, status.phase, status.podIP" } else { "" }
                )));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let ptr = format!("/{}", field.replace('.', "/"));
            let got = match obj.pointer(&ptr) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn equality_and_set_based() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, api)"));
        assert!(!m("app notin (web)"));
        assert!(m("env notin (prod)"));
        assert!(m("!env"));
        assert!(!m("!app"));
        assert!(m("app in (web),tier in (front,back),!env"));
    }

    #[test]
    fn bad_selectors_are_400() {
        for s in ["app in web", "a b c=d", "x,,y"] {
            let e = LabelSelector::parse(s).unwrap_err();
            assert_eq!(e.code, 400, "{s}");
        }
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let f = |s: &str| FieldSelector::parse(s, "Pod").unwrap().matches(&o);
        assert!(f("metadata.name=a"));
        assert!(f("spec.nodeName=n1,metadata.namespace=ns"));
        assert!(!f("spec.nodeName!=n1"));
        let e = FieldSelector::parse("spec.foo=1", "Pod").unwrap_err();
        assert!(e.message.contains("field label not supported: spec.foo"));
        assert!(FieldSelector::parse("spec.nodeName=x", "Service").is_err());
    }
}
