//! The mesh in the sandbox: pods annotated `fairlead.io/inject: "true"` get a
//! `fairlead-proxy` sidecar, run by the kubelet inside the pod's namespace as a container
//! runtime would run the injected container.
//!
//! The sandbox is the mesh CA's home (a `fairlead-controller` `CertIssuer` against the
//! sandbox's API server, its root in the Secret `fairlead-system/fairlead-ca`). Each sidecar
//! proves its pod's ServiceAccount with a token from TokenRequest and gets a certificate
//! for its own key.
//! Outbound connections are routed from the cluster snapshot: a ClusterIP or pod address
//! whose endpoint is a meshed pod becomes mTLS to that pod, checked against its
//! ServiceAccount's identity; anything else passes in the clear. Interception is the CNI
//! plugin's: the kubelet passes the pod's annotations as containerd does, and the plugin
//! installs the nftables rules at ADD, before the sidecar and the app start.
//!
//! Not the production path yet: on a real node the proxy gets its certificate and routes
//! from the node agent's socket; here the kubelet hands them over in-process.

use std::net::SocketAddr;
use std::sync::Arc;

use fairlead_agent::mesh::routes_from_snapshot;
use fairlead_controller::{new_key_and_csr, CertIssuer, IssuerConfig, SpiffeId};
use fairlead_core::{Pod, Snapshot};
use fairlead_proxy::admin::{self, Metrics, ProxyConfig};
use fairlead_proxy::inbound::{self, AppTarget, Authorization, Mode, MODE_ANNOTATION};
use fairlead_proxy::outbound;
use fairlead_proxy::rotation::{self, CertSource, CredentialStore, Fetched};
use fairlead_proxy::routes::MeshRoutes;
use fairlead_proxy::transparent::{Dialer, ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT};
use fairlead_proxy::{MeshTls, PeerId};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::netns;

/// The annotation that asks for a sidecar (the injection webhook's, on a real cluster).
pub use fairlead_netns::mesh::INJECT_ANNOTATION;

/// Whether a pod asked for a sidecar.
pub fn injected(pod: &Pod) -> bool {
    pod.annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("true")
}

/// The mesh's control plane in the sandbox: the CA.
pub struct Mesh {
    issuer: Arc<CertIssuer>,
    client: kube::Client,
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

/// A running sidecar; dropping it stops its listeners (the pod's namespace goes with it).
pub struct Sidecar {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub identity: PeerId,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Mesh {
    pub async fn start(
        client: kube::Client,
        snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> anyhow::Result<Arc<Self>> {
        let issuer = CertIssuer::load_or_create(client.clone(), IssuerConfig::default()).await?;
        Ok(Arc::new(Self {
            issuer: Arc::new(issuer),
            client,
            snapshots,
        }))
    }

    /// The identity the mesh gives `pod`.
    pub fn identity_of(&self, pod: &Pod) -> SpiffeId {
        SpiffeId::new(
            &self.issuer.config().trust_domain,
            &pod.namespace,
            &pod.service_account,
        )
    }

    /// Issues the pod's certificate and starts its sidecar inside `pod_netns`.
    pub async fn start_sidecar(
        self: &Arc<Self>,
        pod_netns: &str,
        pod: &Pod,
    ) -> anyhow::Result<Sidecar> {
        let id = self.identity_of(pod);
        let source = Arc::new(PodSource {
            mesh: Arc::clone(self),
            id: id.clone(),
        });
        let (key, csr) = new_key_and_csr()?;
        let fetched = source
            .fetch(&csr)
            .await
            .map_err(|e| anyhow::anyhow!("issuing {id}: {e}"))?;
        let creds = CredentialStore::new(MeshTls::from_pem(
            &fetched.chain_pem,
            &key,
            &fetched.bundle_pem,
        )?)?;

        let (inbound_l, outbound_l, admin_l) =
            netns::run_in(pod_netns, || -> std::io::Result<_> {
                let bind = |port: u16| {
                    let l = std::net::TcpListener::bind(SocketAddr::from((
                        std::net::Ipv6Addr::UNSPECIFIED,
                        port,
                    )))?;
                    l.set_nonblocking(true)?;
                    Ok::<_, std::io::Error>(l)
                };
                Ok((bind(INBOUND_PORT)?, bind(OUTBOUND_PORT)?, bind(ADMIN_PORT)?))
            })??;

        let dialer = Dialer::in_netns(std::fs::File::open(netns::path(pod_netns))?)?;
        let metrics = Metrics::new();
        // Strict unless the pod (annotation) or its namespace (label) asks for permissive.
        let mode = {
            let snap = self.snapshots.borrow();
            let ns_label = snap
                .namespace(&pod.namespace)
                .and_then(|n| n.labels.get(MODE_ANNOTATION).cloned());
            Mode::for_workload(
                pod.annotations.get(MODE_ANNOTATION).map(String::as_str),
                ns_label.as_deref(),
            )
            .unwrap_or_else(|e| {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "bad mesh mode; staying strict");
                Mode::Strict
            })
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn({
            let (creds, metrics, dialer) =
                (Arc::clone(&creds), Arc::clone(&metrics), dialer.clone());
            async move {
                let _ = inbound::serve_mode(
                    tokio::net::TcpListener::from_std(inbound_l).expect("tokio listener"),
                    creds,
                    AppTarget::OriginalPort,
                    Authorization::TrustDomain,
                    mode,
                    Arc::new(|_| {}),
                    metrics,
                    dialer,
                )
                .await;
            }
        }));
        // The routing table, as the node agent's MESH-ROUTES serves it to real sidecars,
        // rebuilt on every snapshot.
        let (routes_tx, routes) = watch::channel(Arc::new(MeshRoutes::default()));
        tasks.push(tokio::spawn({
            let mut snapshots = self.snapshots.clone();
            let td = self.issuer.config().trust_domain.clone();
            async move {
                loop {
                    let table = routes_from_snapshot(&snapshots.borrow_and_update(), &td);
                    routes_tx.send_replace(Arc::new(table));
                    if snapshots.changed().await.is_err() {
                        break;
                    }
                }
            }
        }));
        tasks.push(tokio::spawn({
            let (creds, metrics) = (Arc::clone(&creds), Arc::clone(&metrics));
            async move {
                let route = Arc::new(move |orig: SocketAddr| routes.borrow().route(orig));
                let _ = outbound::serve_transparent(
                    tokio::net::TcpListener::from_std(outbound_l).expect("tokio listener"),
                    creds,
                    route,
                    metrics,
                    dialer,
                )
                .await;
            }
        }));
        tasks.push(tokio::spawn({
            let (creds, metrics) = (Arc::clone(&creds), Arc::clone(&metrics));
            async move {
                admin::serve(
                    tokio::net::TcpListener::from_std(admin_l).expect("tokio listener"),
                    creds,
                    metrics,
                    ProxyConfig {
                        inbound: Some(SocketAddr::from(([0, 0, 0, 0], INBOUND_PORT))),
                        outbound: Some(SocketAddr::from(([0, 0, 0, 0], OUTBOUND_PORT))),
                        application: None,
                        mode: mode.to_string(),
                    },
                )
                .await;
            }
        }));
        tasks.push(tokio::spawn(rotation::renew(
            creds,
            source,
            || new_key_and_csr().map_err(|e| e.to_string()),
            rotation::Backoff::default(),
        )));
        Ok(Sidecar {
            tasks,
            identity: PeerId(id.uri()),
        })
    }

    async fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), namespace);
        let request = k8s_openapi::api::authentication::v1::TokenRequest {
            spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
                audiences: vec![],
                expiration_seconds: Some(3600),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let resp = api
            .create_token_request(service_account, &PostParams::default(), &request)
            .await?;
        resp.status.map(|s| s.token).ok_or_else(|| {
            anyhow::anyhow!("TokenRequest for {namespace}/{service_account} returned no token")
        })
    }
}

/// The CA as a renewal source for one pod: a fresh token, then the CSR.
struct PodSource {
    mesh: Arc<Mesh>,
    id: SpiffeId,
}

impl CertSource for PodSource {
    fn fetch<'a>(
        &'a self,
        csr_pem: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let token = self
                .mesh
                .token(&self.id.namespace, &self.id.service_account)
                .await
                .map_err(|e| e.to_string())?;
            let issued = self
                .mesh
                .issuer
                .issue(&token, csr_pem, &self.id)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Fetched {
                chain_pem: issued.chain_pem,
                bundle_pem: issued.bundle_pem,
            })
        })
    }
}
