//! `fairlead controller`: the mesh control plane. The certificate authority that gives
//! every workload a SPIFFE identity (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) after the
//! API server vouches for its ServiceAccount token ([`issuer`], the CA itself in [`ca`]),
//! and the sidecar-injection admission webhook ([`webhook`], served over HTTPS by
//! [`server`]). CRD status comes with the rest of the mesh.

pub mod api;
pub mod ca;
pub mod issuer;
pub mod server;
pub mod trust;
pub mod webhook;

pub use ca::{new_key_and_csr, Ca, CaError, Leaf, SpiffeId};
pub use issuer::{CertIssuer, IssueError, Issued, IssuerConfig};
