//! Kubernetes `Status` errors: every failure the server returns is one of these,
//! with the HTTP code, the `reason` clients switch on, and a message that names
//! the object and field at fault.

use serde_json::{json, Value};

/// One field-level cause inside an `Invalid` status (`details.causes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl Cause {
    pub fn new(field: impl Into<String>, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason,
            message: message.into(),
        }
    }
}

/// An API error rendered as a `metav1.Status` body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// Boxed so the error (returned everywhere) stays small.
    pub details: Box<Details>,
}

/// `details` of a Status: which object, and per-field causes.
#[derive(Debug, Clone, Default)]
pub struct Details {
    pub kind: String,
    pub group: String,
    pub name: String,
    pub causes: Vec<Cause>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Box::default(),
        }
    }

    fn set_object(&mut self, kind: &str, group: &str, name: &str) {
        self.details.kind = kind.to_string();
        self.details.group = group.to_string();
        self.details.name = name.to_string();
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(plural: &str, group: &str, name: &str) -> Self {
        Self::about(404, "NotFound", plural, group, name, |what| {
            format!("{what} \"{name}\" not found")
        })
    }

    pub fn unknown_path(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({path}); \
                 check the kind and apiVersion, and for a custom resource that its CRD is created"
            ),
        )
    }

    /// An error about one object; `message` gets its qualified name
    /// (`services` or `routes.mesh.example.dev`).
    fn about(
        code: u16,
        reason: &'static str,
        plural: &str,
        group: &str,
        name: &str,
        message: impl FnOnce(&str) -> String,
    ) -> Self {
        let mut e = Self::new(code, reason, message(&qualified(plural, group)));
        e.set_object(plural, group, name);
        e
    }

    pub fn already_exists(plural: &str, group: &str, name: &str) -> Self {
        Self::about(409, "AlreadyExists", plural, group, name, |what| {
            format!("{what} \"{name}\" already exists")
        })
    }

    pub fn conflict(plural: &str, group: &str, name: &str) -> Self {
        Self::about(409, "Conflict", plural, group, name, |what| {
            format!(
                "Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again"
            )
        })
    }

    /// 422 with one cause per invalid field, as the real server words it:
    /// `Kind "name" is invalid: field: message`.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let list = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect::<Vec<_>>()
            .join(", ");
        let mut e = Self::about(422, "Invalid", kind, group, name, |what| {
            format!("{what} \"{name}\" is invalid: {list}")
        });
        e.details.causes = causes;
        e
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn too_large_rv(rv: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {rv}, the server has not reached it yet"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `metav1.Status` JSON body.
    pub fn to_status(&self) -> Value {
        let d = &self.details;
        let mut details = serde_json::Map::new();
        if !d.name.is_empty() {
            details.insert("name".into(), json!(d.name));
        }
        if !d.group.is_empty() {
            details.insert("group".into(), json!(d.group));
        }
        if !d.kind.is_empty() {
            details.insert("kind".into(), json!(d.kind));
        }
        if !d.causes.is_empty() {
            details.insert(
                "causes".into(),
                Value::Array(
                    d.causes
                        .iter()
                        .map(
                            |c| json!({"reason": c.reason, "message": c.message, "field": c.field}),
                        )
                        .collect(),
                ),
            );
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !details.is_empty() {
            status["details"] = Value::Object(details);
        }
        status
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `plural` for the core group, `plural.group` otherwise, as the server words it.
fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}
