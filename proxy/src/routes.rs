//! The mesh's routing table as the node agent hands it to the proxies on its socket
//! (`MESH-ROUTES`, one JSON object per line, the whole table again on every change), and the
//! lookup an intercepted outbound connection goes through.
//!
//! ```json
//! {"pods": {"10.244.1.5": "spiffe://cluster.local/ns/shop/sa/catalog"},
//!  "services": {"10.96.0.20:80": [{"addr": "10.244.1.5:8080",
//!                                  "identity": "spiffe://cluster.local/ns/shop/sa/catalog"},
//!                                 {"addr": "10.244.2.7:8080", "identity": null}]}}
//! ```
//!
//! `pods` are the meshed pods (their sidecar's identity); `services` are Service frontends
//! (ClusterIP and port, both families) with their ready endpoints, `identity: null` for an
//! endpoint outside the mesh.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::outbound::{Endpoint, Route};
use crate::tls::PeerId;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshRoutes {
    #[serde(default)]
    pub pods: BTreeMap<IpAddr, String>,
    #[serde(default)]
    pub services: BTreeMap<SocketAddr, Vec<MeshEndpoint>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshEndpoint {
    pub addr: SocketAddr,
    pub identity: Option<String>,
}

impl MeshRoutes {
    /// Where an intercepted connection to `orig` goes: a Service frontend is balanced over
    /// its endpoints (mTLS to the meshed ones), a meshed pod gets mTLS checked against its
    /// identity, anything else passes in the clear.
    pub fn route(&self, orig: SocketAddr) -> Route {
        if let Some(endpoints) = self.services.get(&orig) {
            if endpoints.is_empty() {
                return Route::Passthrough;
            }
            return Route::Balance(
                endpoints
                    .iter()
                    .map(|e| Endpoint {
                        addr: e.addr,
                        expected: e.identity.clone().map(|id| vec![PeerId(id)]),
                    })
                    .collect(),
            );
        }
        match self.pods.get(&orig.ip()) {
            Some(id) => Route::Mesh {
                endpoint: orig,
                expected: vec![PeerId(id.clone())],
            },
            None => Route::Passthrough,
        }
    }
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
pub fn spiffe_uri(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontends_balance_meshed_pods_get_mtls_the_rest_passes() {
        let table: MeshRoutes = serde_json::from_str(
            r#"{"pods": {"10.244.1.5": "spiffe://td/ns/a/sa/b"},
                "services": {"10.96.0.20:80": [{"addr": "10.244.1.5:8080", "identity": "spiffe://td/ns/a/sa/b"},
                                               {"addr": "10.244.2.7:8080", "identity": null}],
                             "10.96.0.21:80": []}}"#,
        )
        .unwrap();
        match table.route("10.96.0.20:80".parse().unwrap()) {
            Route::Balance(eps) => {
                assert_eq!(eps.len(), 2);
                assert_eq!(
                    eps[0].expected,
                    Some(vec![PeerId("spiffe://td/ns/a/sa/b".into())])
                );
                assert_eq!(eps[1].expected, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.route("10.96.0.21:80".parse().unwrap()),
            Route::Passthrough
        ));
        assert!(matches!(
            table.route("10.244.1.5:9090".parse().unwrap()),
            Route::Mesh { endpoint, .. } if endpoint.port() == 9090
        ));
        assert!(matches!(
            table.route("1.2.3.4:443".parse().unwrap()),
            Route::Passthrough
        ));
        // The wire form round-trips.
        let back: MeshRoutes =
            serde_json::from_str(&serde_json::to_string(&table).unwrap()).unwrap();
        assert_eq!(back, table);
    }
}
