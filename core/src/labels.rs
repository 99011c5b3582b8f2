//! Label selectors with Kubernetes semantics (metav1.LabelSelector).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use serde::Serialize;

/// Labels or annotations of an object.
pub type Labels = BTreeMap<String, String>;

/// `matchLabels` plus `matchExpressions`, all ANDed. The empty selector matches every object, as
/// in Kubernetes; where Kubernetes has a nil selector that matches nothing, the model uses
/// `Option<LabelSelector>` or a dedicated enum variant instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<LabelRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: LabelOperator,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum LabelOperator {
    In(BTreeSet<String>),
    /// Also matches objects without the key, as in Kubernetes.
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// A selector Kubernetes would reject (it validates the same rules on create).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` = {value:?}: {reason}")]
pub struct SelectorError {
    /// Path inside the selector, e.g. `matchExpressions[0].operator`.
    pub field: String,
    pub value: String,
    pub reason: &'static str,
}

impl LabelSelector {
    /// The selector that matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Selector with only `matchLabels`.
    pub fn from_labels<K: Into<String>, V: Into<String>>(
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            match_labels: labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            match_expressions: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelRequirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            LabelOperator::In(values) => value.is_some_and(|v| values.contains(v)),
            LabelOperator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
        }
    }
}

impl TryFrom<&metav1::LabelSelector> for LabelSelector {
    type Error = SelectorError;

    fn try_from(sel: &metav1::LabelSelector) -> Result<Self, SelectorError> {
        let match_labels = sel.match_labels.clone().unwrap_or_default();
        let mut match_expressions = Vec::new();
        for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
            let err = |field: &str, value: &str, reason| SelectorError {
                field: format!("matchExpressions[{i}].{field}"),
                value: value.to_owned(),
                reason,
            };
            if req.key.is_empty() {
                return Err(err("key", "", "the key must not be empty"));
            }
            let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
            let operator = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(err("values", "", "In and NotIn need at least one value"));
                }
                "In" => LabelOperator::In(values),
                "NotIn" => LabelOperator::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    let shown = values.into_iter().collect::<Vec<_>>().join(",");
                    return Err(err(
                        "values",
                        &shown,
                        "Exists and DoesNotExist take no values",
                    ));
                }
                "Exists" => LabelOperator::Exists,
                "DoesNotExist" => LabelOperator::DoesNotExist,
                other => {
                    return Err(err(
                        "operator",
                        other,
                        "must be one of In, NotIn, Exists, DoesNotExist",
                    ));
                }
            };
            match_expressions.push(LabelRequirement {
                key: req.key.clone(),
                operator,
            });
        }
        Ok(Self {
            match_labels,
            match_expressions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(json: serde_json::Value) -> Result<LabelSelector, SelectorError> {
        let k8s: metav1::LabelSelector = serde_json::from_value(json).unwrap();
        LabelSelector::try_from(&k8s)
    }

    #[test]
    fn empty_selector_matches_everything() {
        let sel = selector(serde_json::json!({})).unwrap();
        assert!(sel.is_empty());
        assert!(sel.matches(&labels(&[])));
        assert!(sel.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn match_labels_are_anded() {
        let sel =
            selector(serde_json::json!({"matchLabels": {"app": "web", "tier": "front"}})).unwrap();
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let sel = selector(serde_json::json!({"matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "staging"]},
            {"key": "canary", "operator": "NotIn", "values": ["true"]},
            {"key": "app", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ]}))
        .unwrap();
        assert!(sel.matches(&labels(&[("env", "prod"), ("app", "a")])));
        // NotIn matches when the key is absent and when the value differs.
        assert!(sel.matches(&labels(&[
            ("env", "staging"),
            ("app", "a"),
            ("canary", "false")
        ])));
        assert!(!sel.matches(&labels(&[
            ("env", "prod"),
            ("app", "a"),
            ("canary", "true")
        ])));
        assert!(!sel.matches(&labels(&[("env", "dev"), ("app", "a")])));
        assert!(!sel.matches(&labels(&[("env", "prod")])));
        assert!(!sel.matches(&labels(&[("env", "prod"), ("app", "a"), ("legacy", "")])));
    }

    #[test]
    fn combines_labels_and_expressions() {
        let sel = selector(serde_json::json!({
            "matchLabels": {"app": "db"},
            "matchExpressions": [{"key": "role", "operator": "In", "values": ["primary"]}],
        }))
        .unwrap();
        assert!(sel.matches(&labels(&[("app", "db"), ("role", "primary")])));
        assert!(!sel.matches(&labels(&[("app", "db"), ("role", "replica")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("role", "primary")])));
    }

    #[test]
    fn rejects_invalid_selectors() {
        let err = selector(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "Exists"},
            {"key": "b", "operator": "Equals", "values": ["x"]},
        ]}))
        .unwrap_err();
        assert_eq!(err.field, "matchExpressions[1].operator");
        assert_eq!(err.value, "Equals");

        let err =
            selector(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]}))
                .unwrap_err();
        assert_eq!(err.field, "matchExpressions[0].values");

        let err = selector(serde_json::json!({"matchExpressions": [
            {"key": "a", "operator": "Exists", "values": ["x"]}
        ]}))
        .unwrap_err();
        assert_eq!(err.value, "x");
    }
}
