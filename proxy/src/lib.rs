//! `fairlead-proxy`, the mesh sidecar. Built so far: mutual TLS with SPIFFE identities
//! ([`tls`]) and the two forwarding paths over opaque TCP ([`inbound`], [`outbound`]):
//! inbound terminates mTLS, checks the client's identity and hands the bytes to the
//! application on localhost; outbound originates mTLS to the peer's sidecar and checks that
//! the peer is who the destination may be. Transparent interception, protocol detection
//! (HTTP/1.1, HTTP/2, gRPC), identity headers, certificate rotation, the admin port and the
//! agent socket come next (issue 7). Certificates rotate through [`rotation`]: renewed at
//! half their lifetime, new handshakes take the new one, and a failing CA leaves the proxy
//! serving with its valid certificate while it retries with backoff.

pub mod admin;
pub mod agent;
pub mod balance;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod rotation;
pub mod routes;
pub mod tls;
pub mod transparent;

pub use tls::{spiffe_id, MeshTls, PeerId, TlsError};
