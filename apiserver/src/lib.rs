//! The embedded Kubernetes API server. Where no cluster exists (a laptop, CI,
//! the sandbox), Fairlead brings this: it speaks the real REST protocol (list
//! with continue tokens, watch with bookmarks and 410 Gone, get, create,
//! update with optimistic concurrency, merge and JSON patch, delete, status
//! subresources, selectors, discovery, CRDs with schema validation,
//! TokenRequest and TokenReview), so kube-rs and kubectl run against it
//! unmodified and every Fairlead component learns the cluster the same way it
//! would in production. State is in memory only.

pub mod admit;
pub mod error;
mod http;
pub mod manifest;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod store;
mod table;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

pub use error::{ApiError, ApiResult, Cause};
pub use store::{Stats, StoreConfig};

use crate::admit::FieldValidation;
use crate::store::Store;
use crate::tokens::{TokenClaims, TokenSigner};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// How often an idle watch with `allowWatchBookmarks` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// The longest a watch runs when the client sets no timeoutSeconds.
    pub max_watch: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            bookmark_interval: Duration::from_secs(5),
            max_watch: Duration::from_secs(1800),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) store: Mutex<Store>,
    pub(crate) signer: TokenSigner,
    pub(crate) cfg: ServerConfig,
    /// Bumped to end every open watch (a restart, as the client sees it).
    pub(crate) kick: tokio::sync::watch::Sender<u64>,
}

/// One manifest object and what the server said: `Kind/ns/name`, and the
/// error message if it was refused.
pub type Applied = (String, Result<(), String>);

/// A running server. Dropping it stops serving.
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `addr` (use port 0 for any free port) and serves in the background.
    pub async fn start(addr: SocketAddr, cfg: ServerConfig) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::new(&cfg.store)),
            signer: TokenSigner::default(),
            cfg,
            kick: tokio::sync::watch::Sender::new(0),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(http::handle)
            .with_state(inner.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let kick = inner.kick.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
                kick.send_modify(|g| *g += 1);
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "API server stopped");
            }
        });
        tracing::info!(%addr, "embedded API server listening");
        Ok(Self {
            inner,
            addr,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for kubectl and kube-rs pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fairlead\n  cluster:\n    server: {}\ncontexts:\n- name: fairlead\n  context:\n    cluster: fairlead\n    user: fairlead\n    namespace: default\ncurrent-context: fairlead\nusers:\n- name: fairlead\n  user: {{}}\n",
            self.url()
        )
    }

    /// Drops the event history, as an etcd compaction: watches resuming from
    /// before now get 410 Gone and must relist.
    pub fn compact(&self) {
        self.inner.store.lock().expect("store lock").compact();
    }

    /// Ends every open watch stream, as a server restart would.
    pub fn drop_watches(&self) {
        self.inner.kick.send_modify(|g| *g += 1);
    }

    pub fn stats(&self) -> Stats {
        self.inner.store.lock().expect("store lock").stats
    }

    pub fn resource_version(&self) -> u64 {
        self.inner.store.lock().expect("store lock").rv
    }

    /// Creates one object from a manifest (as `kubectl create` would), routed
    /// by its apiVersion and kind.
    pub fn create(&self, obj: Value) -> ApiResult<Value> {
        Txn {
            store: &mut self.inner.store.lock().expect("store lock"),
        }
        .create(obj)
    }

    /// Creates every object of a manifest file or directory, in order; one
    /// bad object is reported (as `Kind/ns/name` with the server's message)
    /// and the others still go in.
    pub fn apply_manifests(
        &self,
        path: &std::path::Path,
    ) -> Result<Vec<Applied>, manifest::ManifestError> {
        Ok(manifest::load(path)?
            .into_iter()
            .map(|d| {
                let s = |p: &str| {
                    d.pointer(p)
                        .and_then(|v| v.as_str())
                        .unwrap_or("?")
                        .to_string()
                };
                let ns = d
                    .pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default();
                let what = format!("{}/{ns}{}", s("/kind"), s("/metadata/name"));
                (what, self.create(d).map(|_| ()).map_err(|e| e.message))
            })
            .collect())
    }

    /// Simulates an API server restart with an outage: every watch is cut,
    /// `changes` are made while no client can see them, and the history is
    /// compacted, so clients resuming from their last version get 410 Gone
    /// and must relist to learn what changed. All under the store lock, so no
    /// client reconnects in between.
    pub fn restart_with(&self, changes: impl FnOnce(&mut Txn<'_>)) {
        let mut store = self.inner.store.lock().expect("store lock");
        self.inner.kick.send_modify(|g| *g += 1);
        changes(&mut Txn { store: &mut store });
        store.compact();
    }

    /// Issues a ServiceAccount token, as the TokenRequest API does.
    pub fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        ttl: Duration,
    ) -> ApiResult<String> {
        let req = json!({"spec": {"audiences": audiences, "expirationSeconds": ttl.as_secs()}});
        let resp = token_request(&self.inner, namespace, service_account, &req)?;
        Ok(resp["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Stops serving and ends open watches.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The strings of a JSON array (non-strings skipped); empty when absent.
pub(crate) fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Direct writes to the store, for the sandbox and tests (no HTTP).
pub struct Txn<'a> {
    store: &'a mut Store,
}

impl Txn<'_> {
    fn resource(&self, api_version: &str, kind: &str) -> ApiResult<Arc<resources::ResourceType>> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.store
            .registry
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
            .cloned()
            .ok_or_else(|| ApiError::bad_request(format!("no kind {kind:?} is registered for version {api_version:?}: check the apiVersion and kind, and for a custom resource create its CRD first")))
    }

    /// Creates an object routed by its apiVersion and kind; namespaced objects
    /// without a namespace go to `default`.
    pub fn create(&mut self, obj: Value) -> ApiResult<Value> {
        let av = obj.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
        let kind = obj.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if av.is_empty() || kind.is_empty() {
            return Err(ApiError::bad_request(
                "the manifest needs apiVersion and kind",
            ));
        }
        let rt = self.resource(av, kind)?;
        let ns = if rt.namespaced {
            obj.pointer("/metadata/namespace")
                .and_then(|v| v.as_str())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let (created, _) = self.store.create(&rt, &ns, obj, FieldValidation::Strict)?;
        Ok((*created).clone())
    }

    pub fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> ApiResult<()> {
        let rt = self.resource(api_version, kind)?;
        self.store.delete(&rt, namespace, name, None).map(|_| ())
    }
}

/// `POST /api/v1/namespaces/<ns>/serviceaccounts/<name>/token`
pub(crate) fn token_request(inner: &Inner, ns: &str, name: &str, req: &Value) -> ApiResult<Value> {
    let store = inner.store.lock().expect("store lock");
    let sa_type = store
        .registry
        .get("", "v1", "serviceaccounts")
        .expect("builtin");
    let sa = store.get(&sa_type, ns, name)?;
    let ttl = req
        .pointer("/spec/expirationSeconds")
        .and_then(|v| v.as_i64())
        .unwrap_or(3600);
    if ttl < 600 {
        return Err(ApiError::invalid(
            "TokenRequest",
            "authentication.k8s.io",
            name,
            vec![Cause::new(
                "spec.expirationSeconds",
                "FieldValueInvalid",
                format!("Invalid value: {ttl}: may not specify a duration less than 10 minutes"),
            )],
        ));
    }
    let audiences: Vec<String> = Some(crate::strings(req.pointer("/spec/audiences")))
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc".to_string()]);
    let pod = match req.pointer("/spec/boundObjectRef") {
        Some(r) if r["kind"] == "Pod" => {
            let pod_name = r["name"].as_str().unwrap_or("");
            let pod_type = store.registry.get("", "v1", "pods").expect("builtin");
            let pod = store.get(&pod_type, ns, pod_name)?;
            Some((
                pod_name.to_string(),
                pod["metadata"]["uid"].as_str().unwrap_or("").to_string(),
            ))
        }
        Some(r) => {
            return Err(ApiError::bad_request(format!(
                "boundObjectRef kind {} is not supported: bind tokens to a Pod",
                r["kind"]
            )))
        }
        None => None,
    };
    let expires = chrono::Utc::now().timestamp() + ttl;
    let token = inner.signer.issue(&TokenClaims {
        namespace: ns.to_string(),
        service_account: name.to_string(),
        sa_uid: sa["metadata"]["uid"].as_str().unwrap_or("").to_string(),
        pod,
        audiences: audiences.clone(),
        expires,
    });
    let exp = chrono::DateTime::from_timestamp(expires, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"audiences": audiences, "expirationSeconds": ttl},
        "status": {"token": token, "expirationTimestamp": exp},
    }))
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: a token is valid when
/// its signature and expiry check out, the audience matches, and the
/// ServiceAccount (and bound pod) still exist with the uids it names.
pub(crate) fn token_review(inner: &Inner, req: &Value) -> Value {
    let token = req
        .pointer("/spec/token")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let want_aud: Vec<String> = crate::strings(req.pointer("/spec/audiences"));
    let verdict = (|| -> Result<(TokenClaims, Vec<String>), String> {
        let claims = inner.signer.verify(token)?;
        let aud: Vec<String> = if want_aud.is_empty() {
            claims.audiences.clone()
        } else {
            want_aud
                .iter()
                .filter(|a| claims.audiences.contains(a))
                .cloned()
                .collect()
        };
        if aud.is_empty() {
            return Err(format!(
                "the token's audiences {:?} do not include any of {:?}",
                claims.audiences, want_aud
            ));
        }
        let store = inner.store.lock().expect("store lock");
        let sa_type = store
            .registry
            .get("", "v1", "serviceaccounts")
            .expect("builtin");
        let sa = store
            .get(&sa_type, &claims.namespace, &claims.service_account)
            .map_err(|_| {
                format!(
                    "service account {}/{} has been deleted",
                    claims.namespace, claims.service_account
                )
            })?;
        if sa["metadata"]["uid"].as_str() != Some(claims.sa_uid.as_str()) {
            return Err(format!(
                "service account {}/{} was recreated; the token is for the old one",
                claims.namespace, claims.service_account
            ));
        }
        if let Some((pod, uid)) = &claims.pod {
            let pod_type = store.registry.get("", "v1", "pods").expect("builtin");
            let p = store.get(&pod_type, &claims.namespace, pod).map_err(|_| {
                format!(
                    "pod {}/{pod} the token is bound to no longer exists",
                    claims.namespace
                )
            })?;
            if p["metadata"]["uid"].as_str() != Some(uid.as_str()) {
                return Err(format!(
                    "pod {}/{pod} was recreated; the token is for the old one",
                    claims.namespace
                ));
            }
        }
        Ok((claims, aud))
    })();
    let status = match verdict {
        Ok((c, aud)) => {
            let mut extra = json!({});
            if let Some((pod, uid)) = &c.pod {
                extra = json!({"authentication.kubernetes.io/pod-name": [pod], "authentication.kubernetes.io/pod-uid": [uid]});
            }
            json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{}:{}", c.namespace, c.service_account),
                    "uid": c.sa_uid,
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", c.namespace), "system:authenticated"],
                    "extra": extra,
                },
                "audiences": aud,
            })
        }
        Err(e) => json!({"authenticated": false, "error": e}),
    };
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": req.get("spec").cloned().unwrap_or(json!({})),
        "status": status,
    })
}
