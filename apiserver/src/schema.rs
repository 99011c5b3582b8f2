//! Structural openAPIV3Schema validation for custom resources, as the real API
//! server does it: type, required, enum, bounds, lengths, pattern, items,
//! additionalProperties, nullable, and the `x-kubernetes-*` extensions that
//! change pruning. Unknown fields are collected (for `fieldValidation=Strict`)
//! and pruned.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::Value;

use crate::error::Cause;

#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub ty: Option<String>,
    pub properties: BTreeMap<String, Schema>,
    pub required: Vec<String>,
    pub items: Option<Box<Schema>>,
    /// `additionalProperties` as a schema (a map), or `true`.
    pub additional: Option<Box<Schema>>,
    pub additional_any: bool,
    pub enum_values: Vec<Value>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: bool,
    pub exclusive_maximum: bool,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub min_items: Option<u64>,
    pub max_items: Option<u64>,
    pub pattern: Option<Regex>,
    pub nullable: bool,
    pub preserve_unknown: bool,
    pub int_or_string: bool,
    pub embedded_resource: bool,
}

impl Schema {
    /// Parses a CRD version's `schema.openAPIV3Schema`. Errors name the schema
    /// path that cannot be used (so a bad CRD is rejected, not half-applied).
    pub fn parse(v: &Value, path: &str) -> Result<Schema, Cause> {
        let obj = v.as_object().ok_or_else(|| {
            Cause::new(
                path,
                "FieldValueInvalid",
                "must be an object (a JSON schema)",
            )
        })?;
        let mut s = Schema::default();
        for (k, val) in obj {
            let p = format!("{path}.{k}");
            match k.as_str() {
                "type" => {
                    let t = val.as_str().unwrap_or_default();
                    if !matches!(
                        t,
                        "object" | "array" | "string" | "integer" | "number" | "boolean"
                    ) {
                        return Err(Cause::new(
                            p,
                            "FieldValueNotSupported",
                            format!("unsupported type {val}: use object, array, string, integer, number or boolean"),
                        ));
                    }
                    s.ty = Some(t.to_string());
                }
                "properties" => {
                    let props = val
                        .as_object()
                        .ok_or_else(|| Cause::new(&p, "FieldValueInvalid", "must be an object"))?;
                    for (name, sub) in props {
                        s.properties
                            .insert(name.clone(), Schema::parse(sub, &format!("{p}[{name}]"))?);
                    }
                }
                "required" => s.required = crate::strings(Some(val)),
                "items" => s.items = Some(Box::new(Schema::parse(val, &p)?)),
                "additionalProperties" => match val {
                    Value::Bool(b) => s.additional_any = *b,
                    other => s.additional = Some(Box::new(Schema::parse(other, &p)?)),
                },
                "enum" => s.enum_values = val.as_array().cloned().unwrap_or_default(),
                "minimum" => s.minimum = val.as_f64(),
                "maximum" => s.maximum = val.as_f64(),
                "exclusiveMinimum" => s.exclusive_minimum = val.as_bool().unwrap_or(false),
                "exclusiveMaximum" => s.exclusive_maximum = val.as_bool().unwrap_or(false),
                "minLength" => s.min_length = val.as_u64(),
                "maxLength" => s.max_length = val.as_u64(),
                "minItems" => s.min_items = val.as_u64(),
                "maxItems" => s.max_items = val.as_u64(),
                "pattern" => {
                    let src = val.as_str().unwrap_or_default();
                    s.pattern = Some(Regex::new(src).map_err(|e| {
                        Cause::new(
                            p,
                            "FieldValueInvalid",
                            format!("pattern {src:?} is not a valid regular expression: {e}"),
                        )
                    })?);
                }
                "nullable" => s.nullable = val.as_bool().unwrap_or(false),
                "x-kubernetes-preserve-unknown-fields" => {
                    s.preserve_unknown = val.as_bool().unwrap_or(false)
                }
                "x-kubernetes-int-or-string" => s.int_or_string = val.as_bool().unwrap_or(false),
                "x-kubernetes-embedded-resource" => {
                    s.embedded_resource = val.as_bool().unwrap_or(false)
                }
                // Documentation and keywords with no effect on validity here.
                // anyOf/oneOf/allOf/not and x-kubernetes-validations (CEL) are
                // accepted but not enforced yet: see docs/ARCHITECTURE.md.
                _ => {}
            }
        }
        Ok(s)
    }

    /// Validates `v` at `path`, pushing causes for invalid values and the paths
    /// of unknown fields, and prunes the unknown fields from `v`.
    pub fn validate(
        &self,
        v: &mut Value,
        path: &str,
        causes: &mut Vec<Cause>,
        unknown: &mut Vec<String>,
    ) {
        let shown = path.trim_start_matches('.');
        if v.is_null() {
            if !self.nullable && self.ty.is_some() {
                causes.push(Cause::new(
                    path,
                    "FieldValueRequired",
                    "Required value: must not be null",
                ));
            }
            return;
        }
        if self.int_or_string {
            if !(v.is_string() || v.is_i64() || v.is_u64()) {
                causes.push(Cause::new(
                    path,
                    "FieldValueTypeInvalid",
                    format!(
                        "Invalid value: {}: must be an integer or a string",
                        short(v)
                    ),
                ));
            }
            return;
        }
        if let Some(ty) = &self.ty {
            let ok = match ty.as_str() {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                _ => true,
            };
            if !ok {
                causes.push(Cause::new(
                    path,
                    "FieldValueTypeInvalid",
                    format!(
                        "Invalid value: {}: {shown} in body must be of type {ty}: \"{}\"",
                        short(v),
                        json_type(v)
                    ),
                ));
                return;
            }
        }
        if !self.enum_values.is_empty() && !self.enum_values.contains(v) {
            let allowed: Vec<String> = self.enum_values.iter().map(|e| e.to_string()).collect();
            causes.push(Cause::new(
                path,
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: {}: supported values: {}",
                    short(v),
                    allowed.join(", ")
                ),
            ));
        }
        match v {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(0.0);
                if let Some(min) = self.minimum {
                    if x < min || (self.exclusive_minimum && x == min) {
                        causes.push(Cause::new(path, "FieldValueInvalid", format!("Invalid value: {n}: {shown} in body should be greater than or equal to {min}")));
                    }
                }
                if let Some(max) = self.maximum {
                    if x > max || (self.exclusive_maximum && x == max) {
                        causes.push(Cause::new(path, "FieldValueInvalid", format!("Invalid value: {n}: {shown} in body should be less than or equal to {max}")));
                    }
                }
            }
            Value::String(s) => {
                let len = s.chars().count() as u64;
                if let Some(min) = self.min_length {
                    if len < min {
                        causes.push(Cause::new(path, "FieldValueInvalid", format!("Invalid value: {s:?}: {shown} in body should be at least {min} chars long")));
                    }
                }
                if let Some(max) = self.max_length {
                    if len > max {
                        causes.push(Cause::new(
                            path,
                            "FieldValueTooLong",
                            format!("Too long: may not be longer than {max}"),
                        ));
                    }
                }
                if let Some(re) = &self.pattern {
                    if !re.is_match(s) {
                        causes.push(Cause::new(
                            path,
                            "FieldValueInvalid",
                            format!(
                                "Invalid value: {s:?}: {shown} in body should match '{}'",
                                re.as_str()
                            ),
                        ));
                    }
                }
            }
            Value::Array(items) => {
                let n = items.len() as u64;
                if let Some(min) = self.min_items {
                    if n < min {
                        causes.push(Cause::new(path, "FieldValueInvalid", format!("Invalid value: {n}: {shown} in body should have at least {min} items")));
                    }
                }
                if let Some(max) = self.max_items {
                    if n > max {
                        causes.push(Cause::new(
                            path,
                            "FieldValueTooMany",
                            format!("Too many: {n}: must have at most {max} items"),
                        ));
                    }
                }
                if let Some(item_schema) = &self.items {
                    for (i, item) in items.iter_mut().enumerate() {
                        item_schema.validate(item, &format!("{path}[{i}]"), causes, unknown);
                    }
                }
            }
            Value::Object(map) => {
                for req in &self.required {
                    if !map.contains_key(req) {
                        causes.push(Cause::new(
                            format!("{path}.{req}"),
                            "FieldValueRequired",
                            "Required value",
                        ));
                    }
                }
                let mut prune = Vec::new();
                for (k, val) in map.iter_mut() {
                    let p = format!("{path}.{k}");
                    if let Some(sub) = self.properties.get(k) {
                        sub.validate(val, &p, causes, unknown);
                    } else if let Some(add) = &self.additional {
                        add.validate(val, &p, causes, unknown);
                    } else if self.additional_any || self.preserve_unknown {
                        // kept as is
                    } else if self.embedded_resource
                        && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    {
                        // embedded object meta is always allowed
                    } else {
                        unknown.push(p);
                        prune.push(k.clone());
                    }
                }
                for k in prune {
                    map.remove(&k);
                }
            }
            _ => {}
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::parse(
            &json!({
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "mode": {"type": "string", "enum": ["a", "b"]},
                            "hosts": {"type": "array", "items": {"type": "string", "pattern": "^[a-z.]+$"}, "maxItems": 2},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                            "target": {"x-kubernetes-int-or-string": true}
                        }
                    }
                }
            }),
            "openAPIV3Schema",
        )
        .unwrap()
    }

    fn run(v: Value) -> (Value, Vec<Cause>, Vec<String>) {
        let mut v = v;
        let (mut c, mut u) = (vec![], vec![]);
        schema().validate(&mut v, "", &mut c, &mut u);
        (v, c, u)
    }

    #[test]
    fn valid_object_passes_untouched() {
        let obj = json!({"spec": {"port": 80, "mode": "a", "hosts": ["x.y"], "labels": {"k": "v"}, "raw": {"any": [1]}, "target": "http"}});
        let (v, c, u) = run(obj.clone());
        assert!(c.is_empty(), "{c:?}");
        assert!(u.is_empty());
        assert_eq!(v, obj);
    }

    #[test]
    fn each_bad_field_is_named() {
        let (_, c, _) = run(
            json!({"spec": {"port": "80", "mode": "c", "hosts": ["A", "b", "c"], "labels": {"k": 1}, "target": 1.5}}),
        );
        let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&".spec.port"), "{fields:?}");
        assert!(fields.contains(&".spec.mode"));
        assert!(fields.contains(&".spec.hosts"));
        assert!(fields.contains(&".spec.hosts[0]"));
        assert!(fields.contains(&".spec.labels.k"));
        assert!(fields.contains(&".spec.target"));
    }

    #[test]
    fn missing_required_and_bounds() {
        let (_, c, _) = run(json!({"spec": {}}));
        assert_eq!(c[0].field, ".spec.port");
        let (_, c, _) = run(json!({"spec": {"port": 70000}}));
        assert!(
            c[0].message.contains("less than or equal to 65535"),
            "{c:?}"
        );
    }

    #[test]
    fn unknown_fields_are_reported_and_pruned() {
        let (v, c, u) = run(json!({"spec": {"port": 1, "bogus": true, "raw": {"kept": 1}}}));
        assert!(c.is_empty());
        assert_eq!(u, vec![".spec.bogus".to_string()]);
        assert_eq!(v, json!({"spec": {"port": 1, "raw": {"kept": 1}}}));
    }

    #[test]
    fn bad_schema_is_rejected_with_its_path() {
        let e = Schema::parse(
            &json!({"type": "object", "properties": {"a": {"type": "str"}}}),
            "s",
        )
        .unwrap_err();
        assert_eq!(e.field, "s.properties[a].type");
        let e = Schema::parse(&json!({"type": "string", "pattern": "("}), "s").unwrap_err();
        assert!(e.message.contains("not a valid regular expression"));
    }
}
