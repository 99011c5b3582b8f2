//! Shared helpers for converting k8s-openapi values, each naming the field it reads so an error
//! can say exactly what to fix.

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::ConvertErrorDetails;
use crate::labels::LabelSelector;
use crate::{ConvertError, IpFamily, IpNet, Kind, Labels, ObjectKey, PortRef, Problem, Protocol};

/// The object being converted, for error messages.
pub(crate) struct Ctx {
    pub kind: Kind,
    pub key: ObjectKey,
}

pub(crate) type Result<T> = std::result::Result<T, ConvertError>;

impl Ctx {
    /// Reads the key from metadata; an object without a name cannot be keyed.
    pub fn new(kind: Kind, meta: &ObjectMeta) -> Result<Self> {
        let namespace = meta.namespace.clone().unwrap_or_default();
        match meta.name.as_deref() {
            Some(name) if !name.is_empty() => Ok(Self {
                kind,
                key: ObjectKey::new(namespace, name),
            }),
            _ => Err(ConvertErrorDetails {
                kind,
                object: ObjectKey::new(namespace, "<unnamed>"),
                field: "metadata.name".into(),
                value: String::new(),
                problem: Problem::Missing,
            }
            .into()),
        }
    }

    pub fn err(
        &self,
        field: impl Into<String>,
        value: impl ToString,
        problem: Problem,
    ) -> ConvertError {
        ConvertErrorDetails {
            kind: self.kind,
            object: self.key.clone(),
            field: field.into(),
            value: value.to_string(),
            problem,
        }
        .into()
    }

    pub fn ip(&self, field: impl Into<String>, value: &str) -> Result<IpAddr> {
        value
            .parse()
            .map_err(|_| self.err(field, value, Problem::InvalidIp))
    }

    pub fn ips<'a>(
        &self,
        field: &str,
        values: impl IntoIterator<Item = &'a String>,
    ) -> Result<Vec<IpAddr>> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| self.ip(format!("{field}[{i}]"), v))
            .collect()
    }

    pub fn cidr(&self, field: impl Into<String>, value: &str) -> Result<IpNet> {
        value
            .parse()
            .map_err(|_| self.err(field, value, Problem::InvalidCidr))
    }

    pub fn port(&self, field: impl Into<String>, value: i32) -> Result<u16> {
        match u16::try_from(value) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(self.err(field, value, Problem::PortOutOfRange)),
        }
    }

    /// A port where 0 or absent means "not set" (nodePort, healthCheckNodePort).
    pub fn optional_port(
        &self,
        field: impl Into<String>,
        value: Option<i32>,
    ) -> Result<Option<u16>> {
        match value {
            None | Some(0) => Ok(None),
            Some(v) => self.port(field, v).map(Some),
        }
    }

    pub fn protocol(&self, field: impl Into<String>, value: Option<&str>) -> Result<Protocol> {
        match value {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(self.err(field, other, Problem::UnknownValue("TCP, UDP, SCTP"))),
        }
    }

    pub fn port_ref(&self, field: impl Into<String>, value: &IntOrString) -> Result<PortRef> {
        match value {
            IntOrString::Int(n) => self.port(field, *n).map(PortRef::Number),
            IntOrString::String(s) if s.is_empty() => Err(self.err(field, s, Problem::Missing)),
            // Kubernetes validates string ports as IANA service names, never as digits.
            IntOrString::String(s) => Ok(PortRef::Name(s.clone())),
        }
    }

    pub fn ip_family(&self, field: impl Into<String>, value: &str) -> Result<IpFamily> {
        match value {
            "IPv4" => Ok(IpFamily::IPv4),
            "IPv6" => Ok(IpFamily::IPv6),
            other => Err(self.err(field, other, Problem::UnknownValue("IPv4, IPv6"))),
        }
    }

    pub fn selector(
        &self,
        field: &str,
        value: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> Result<LabelSelector> {
        LabelSelector::try_from(value).map_err(|e| {
            self.err(
                format!("{field}.{}", e.field),
                e.value,
                Problem::Invalid(e.reason.into()),
            )
        })
    }
}

pub(crate) fn labels(value: &Option<Labels>) -> Labels {
    value.clone().unwrap_or_default()
}
