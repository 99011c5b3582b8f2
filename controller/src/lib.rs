//! `fairlead controller`: the mesh control plane. Today: the certificate authority that
//! gives every workload a SPIFFE identity (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) after
//! the API server vouches for its ServiceAccount token ([`issuer`]), with the CA itself in
//! [`ca`]. The sidecar-injection webhook and CRD status come with the rest of the mesh.

pub mod ca;
pub mod issuer;

pub use ca::{new_key_and_csr, Ca, CaError, Leaf, SpiffeId};
pub use issuer::{CertIssuer, IssueError, Issued, IssuerConfig};
