//! The one error of conversion: which object, which field, which value, what is wrong with it.

use crate::{Kind, ObjectKey};

/// A Kubernetes object that cannot be represented in the model. The watcher logs it and leaves the
/// object out of the snapshot; every other object is unaffected. Boxed so that the `Result`s of
/// the many small conversion steps stay small; the details are reached through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(Box<ConvertErrorDetails>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} {object}: field `{field}` has value {value:?}, which {problem}; \
     Fairlead ignores this object until the field is fixed"
)]
pub struct ConvertErrorDetails {
    pub kind: Kind,
    pub object: ObjectKey,
    /// JSON path of the field, e.g. `spec.ports[1].port`.
    pub field: String,
    pub value: String,
    pub problem: Problem,
}

impl From<ConvertErrorDetails> for ConvertError {
    fn from(details: ConvertErrorDetails) -> Self {
        Self(Box::new(details))
    }
}

impl std::ops::Deref for ConvertError {
    type Target = ConvertErrorDetails;
    fn deref(&self) -> &ConvertErrorDetails {
        &self.0
    }
}

/// What is wrong with a field's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is not an IP address")]
    InvalidIp,
    #[error("is not a CIDR (address/prefix-length)")]
    InvalidCidr,
    #[error("is not a port in 1..=65535")]
    PortOutOfRange,
    #[error("is out of range ({0})")]
    OutOfRange(&'static str),
    #[error("is not one of {0}")]
    UnknownValue(&'static str),
    #[error("is missing but required")]
    Missing,
    #[error("is invalid: {0}")]
    Invalid(String),
}
