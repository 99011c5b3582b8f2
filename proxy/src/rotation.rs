//! Certificate rotation. The proxy's credentials live in a [`CredentialStore`]: every new
//! handshake takes the current ones, existing connections keep the ones they started with.
//! [`renew`] replaces them well before expiry (at half their lifetime) with a certificate
//! for a fresh key; when the source fails it keeps serving with the valid certificate it has
//! and retries with exponential backoff.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use tracing::{info, warn};

use crate::tls::{MeshTls, PeerId, TlsError};

/// The current credentials and the server config built from them.
pub struct CredentialStore {
    inner: RwLock<Current>,
    /// Client configurations by the identities the server must have, for the current
    /// credentials (cleared when they change). Reusing one lets rustls resume sessions and
    /// saves building a verifier per connection. Bounded: cleared when it reaches
    /// [`MAX_CLIENT_CONFIGS`].
    clients: Mutex<ClientConfigs>,
    resumption: bool,
}

/// The cached client configurations and the credential generation they were built from.
#[derive(Default)]
struct ClientConfigs {
    generation: u64,
    by_expected: HashMap<Vec<PeerId>, Arc<ClientConfig>>,
}

/// At most this many cached client configurations (one per destination identity set).
pub const MAX_CLIENT_CONFIGS: usize = 4096;

struct Current {
    tls: MeshTls,
    server: Arc<ServerConfig>,
    /// When these credentials were installed, and when the leaf expires: the renewal is
    /// due halfway between (CAs backdate certificates, so `notBefore` would make it early).
    installed: SystemTime,
    not_after: SystemTime,
    generation: u64,
}

impl CredentialStore {
    pub fn new(tls: MeshTls) -> Result<Arc<Self>, TlsError> {
        Self::with_resumption(tls, true)
    }

    /// As [`new`](Self::new); `resumption: false` makes every handshake a full one, both as
    /// client and as server (for measuring handshakes, or for peers that must not resume).
    pub fn with_resumption(tls: MeshTls, resumption: bool) -> Result<Arc<Self>, TlsError> {
        let (_, not_after) = tls.validity()?;
        Ok(Arc::new(Self {
            inner: RwLock::new(Current {
                server: server_config(&tls, resumption)?,
                tls,
                installed: SystemTime::now(),
                not_after,
                generation: 1,
            }),
            clients: Mutex::new(ClientConfigs::default()),
            resumption,
        }))
    }

    /// Installs new credentials; new handshakes use them from now on.
    pub fn update(&self, tls: MeshTls) -> Result<(), TlsError> {
        let (_, not_after) = tls.validity()?;
        let server = server_config(&tls, self.resumption)?;
        let mut cur = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *cur = Current {
            tls,
            server,
            installed: SystemTime::now(),
            not_after,
            generation: cur.generation + 1,
        };
        Ok(())
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.inner.read().unwrap_or_else(|p| p.into_inner()).server)
    }

    /// The client configuration for servers that must be one of `expected`, built once per
    /// identity set and credentials.
    pub fn client_config(&self, expected: Vec<PeerId>) -> Result<Arc<ClientConfig>, TlsError> {
        // Lock order: inner, then clients. Holding the read lock keeps the generation still
        // while the cache is checked and filled.
        let cur = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.generation != cur.generation {
            // Renewed (or first use): configs of the older credentials go.
            *clients = ClientConfigs {
                generation: cur.generation,
                by_expected: HashMap::new(),
            };
        }
        if let Some(c) = clients.by_expected.get(&expected) {
            return Ok(Arc::clone(c));
        }
        let config = self.build_client_config(&cur.tls, expected.clone())?;
        if clients.by_expected.len() >= MAX_CLIENT_CONFIGS {
            clients.by_expected.clear();
        }
        clients.by_expected.insert(expected, Arc::clone(&config));
        Ok(config)
    }

    fn build_client_config(
        &self,
        tls: &MeshTls,
        expected: Vec<PeerId>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = tls.client_config(expected)?;
        if !self.resumption {
            Arc::make_mut(&mut config).resumption = rustls::client::Resumption::disabled();
        }
        Ok(config)
    }

    pub fn tls(&self) -> MeshTls {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tls
            .clone()
    }

    /// How many credentials have been installed (1 at start).
    pub fn generation(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// When the current credentials were installed, and when their leaf expires.
    pub fn validity_window(&self) -> (SystemTime, SystemTime) {
        let cur = self.inner.read().unwrap_or_else(|p| p.into_inner());
        (cur.installed, cur.not_after)
    }
}

fn server_config(tls: &MeshTls, resumption: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = tls.server_config()?;
    if !resumption {
        let c = Arc::make_mut(&mut config);
        c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        c.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// New credentials for a new key: what the CA returned for the CSR.
pub struct Fetched {
    pub chain_pem: String,
    pub bundle_pem: String,
}

/// Where renewed certificates come from (the node agent's socket in production, the CA
/// directly in tests). Gets the CSR of a fresh key.
pub trait CertSource: Send + Sync {
    fn fetch<'a>(
        &'a self,
        csr_pem: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, String>> + Send + 'a>>;
}

/// Backoff after a failed renewal: doubles from `first` up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// Renews forever: halfway through the current certificate's remaining lifetime, a new key, a CSR, the
/// source's answer installed. Failures keep the current credentials (they are valid until
/// their expiry) and retry with backoff.
pub async fn renew(
    store: Arc<CredentialStore>,
    source: Arc<dyn CertSource>,
    new_key_and_csr: impl Fn() -> Result<(String, String), String> + Send + Sync,
    backoff: Backoff,
) {
    let mut wait_after_failure = backoff.first;
    loop {
        let (nb, na) = store.validity_window();
        let half = nb + na.duration_since(nb).unwrap_or_default() / 2;
        let due = half.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(due).await;
        loop {
            let attempt = async {
                let (key, csr) = new_key_and_csr()?;
                let fetched = source.fetch(&csr).await?;
                let tls = MeshTls::from_pem(&fetched.chain_pem, &key, &fetched.bundle_pem)
                    .map_err(|e| e.to_string())?;
                store.update(tls).map_err(|e| e.to_string())
            };
            match attempt.await {
                Ok(()) => {
                    info!(generation = store.generation(), "certificate renewed");
                    wait_after_failure = backoff.first;
                    break;
                }
                Err(e) => {
                    let (_, not_after) = store.validity_window();
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    warn!(error = %e, retry_in = ?wait_after_failure, valid_for = ?left, "certificate renewal failed; still serving with the current one");
                    tokio::time::sleep(wait_after_failure).await;
                    wait_after_failure = (wait_after_failure * 2).min(backoff.max);
                }
            }
        }
    }
}
