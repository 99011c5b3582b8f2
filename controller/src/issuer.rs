//! Issuing identities: a workload proves who it is with its ServiceAccount token, checked
//! by the API server (TokenReview); the CA signs its CSR for exactly that identity and no
//! other. The CA lives in a Secret (created on first start, or brought by the user).
//!
//! A root rotation has two steps, because workloads learn the trust bundle only when they
//! renew (at half their certificates' life):
//! 1. [`CertIssuer::rotate`] stages the next root: it joins the bundle at once, but the CA
//!    keeps signing with the current root until the switch time (`propagate` later), so every
//!    workload has renewed, and trusts the next root, before any leaf chains to it.
//! 2. At the switch ([`CertIssuer::promote_if_due`], run by the controller's sync loop) the
//!    next root signs; the old root stays in the bundle for `overlap` more, so leaves it
//!    signed keep verifying until they expire.
//!
//! Every replica of the controller follows the Secret ([`CertIssuer::reload`]); writes carry
//! the resourceVersion they were based on, so two replicas cannot both promote or stage.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use time::OffsetDateTime;
use tracing::info;

use crate::ca::{Ca, CaError, Leaf, SpiffeId};

/// Where and how the CA issues.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub trust_domain: String,
    /// Lifetime of issued certificates (24 h by default).
    pub ttl: Duration,
    /// The Secret holding the CA: `<namespace>/<secret>`.
    pub namespace: String,
    pub secret: String,
    /// Lifetime of a root the controller generates.
    pub root_validity: Duration,
    /// The audience a proxy's token must carry (the projected token the injection webhook
    /// mounts asks for it), so a token minted for anything else proves nothing here.
    pub audience: String,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            ttl: Duration::from_secs(24 * 3600),
            namespace: "fairlead-system".into(),
            secret: "fairlead-ca".into(),
            root_validity: Duration::from_secs(365 * 24 * 3600),
            audience: "fairlead".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the token was not accepted by the API server: {0}")]
    Unauthenticated(String),
    #[error("the token belongs to {proved}, which may not take the identity {requested}")]
    Forbidden { proved: String, requested: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the API server request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("the CA Secret {0} is not usable: {1}")]
    Secret(String, String),
}

/// What a workload gets back.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    /// Every root to trust now (two during a rotation's overlap).
    pub bundle_pem: String,
    pub not_after: OffsetDateTime,
}

struct State {
    current: Ca,
    /// A staged root: in the bundle now, signing from its switch time.
    next: Option<Next>,
    /// Roots trusted besides the current one, each until its overlap ends.
    previous: Vec<(String, OffsetDateTime)>,
    /// The Secret's data this state was read from or written as, to tell a change.
    data: BTreeMap<String, ByteString>,
    resource_version: Option<String>,
}

impl State {
    /// The previous roots whose overlap has not ended at `now`.
    fn live_previous(&self, now: OffsetDateTime) -> Vec<(String, OffsetDateTime)> {
        self.previous
            .iter()
            .filter(|(_, until)| *until > now)
            .cloned()
            .collect()
    }
}

struct Next {
    ca: Ca,
    /// When it starts signing.
    at: OffsetDateTime,
    /// Until when the root it replaces stays trusted.
    old_until: OffsetDateTime,
}

/// The CA in service. See the module docs.
pub struct CertIssuer {
    client: kube::Client,
    config: IssuerConfig,
    state: RwLock<State>,
}

const KEY_CERT: &str = "ca.crt";
const KEY_KEY: &str = "ca.key";
/// Previous roots with the end of their overlap: `<unix seconds>\n<PEM>` blocks.
const KEY_PREVIOUS: &str = "previous.crt";
/// A staged root and its key, and `<switch unix seconds>\n<old root trusted until>`.
const KEY_NEXT_CERT: &str = "next.crt";
const KEY_NEXT_KEY: &str = "next.key";
const KEY_NEXT_TIMES: &str = "next.times";

impl CertIssuer {
    /// Loads the CA from its Secret, or generates a root and stores it there.
    pub async fn load_or_create(
        client: kube::Client,
        config: IssuerConfig,
    ) -> Result<Self, IssueError> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
        let name = format!("{}/{}", config.namespace, config.secret);
        let state = match secrets.get_opt(&config.secret).await? {
            Some(secret) => {
                let state = state_of(&config, &secret)?;
                info!(secret = %name, "mesh CA loaded");
                state
            }
            None => {
                ensure_namespace(&client, &config.namespace).await?;
                let current = Ca::generate(&config.trust_domain, config.root_validity)?;
                let secret = secret_of(&config, &current, None, &[]);
                match secrets.create(&PostParams::default(), &secret).await {
                    Ok(stored) => {
                        info!(secret = %name, "mesh CA generated");
                        state_of(&config, &stored)?
                    }
                    // Another replica created it first: use that one.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        state_of(&config, &secrets.get(&config.secret).await?)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        Ok(Self {
            client,
            config,
            state: RwLock::new(state),
        })
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Reads the Secret again; returns whether it changed (a rotation staged or promoted by
    /// another replica, or by `fairlead-controller rotate-root`).
    pub async fn reload(&self) -> Result<bool, IssueError> {
        let secret = self.secrets().get(&self.config.secret).await?;
        let data = secret.data.clone().unwrap_or_default();
        if self.read().data == data {
            return Ok(false);
        }
        let state = state_of(&self.config, &secret)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        info!("mesh CA Secret changed; reloaded");
        Ok(true)
    }

    /// A second handle on `ca` (the state keeps its own).
    fn copy(&self, ca: &Ca) -> Result<Ca, IssueError> {
        Ok(Ca::from_pem(
            &self.config.trust_domain,
            ca.cert_pem(),
            &ca.key_pem(),
        )?)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a new state, based on the resourceVersion last read (a conflict means another
    /// writer came first: reload and decide again).
    async fn store(
        &self,
        current: &Ca,
        next: Option<&Next>,
        previous: &[(String, OffsetDateTime)],
    ) -> Result<(), IssueError> {
        // The stored object keeps its metadata (labels, annotations a user or a tool set);
        // only the data is ours. The resourceVersion is the one this state was read at, so a
        // change in between fails the write (409).
        let mut secret = self.secrets().get(&self.config.secret).await?;
        secret.data = secret_of(&self.config, current, next, previous).data;
        secret.metadata.resource_version = self.read().resource_version.clone();
        let stored = self
            .secrets()
            .replace(&self.config.secret, &PostParams::default(), &secret)
            .await?;
        let state = state_of(&self.config, &stored)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        Ok(())
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    /// The roots workloads must trust now: the current one, a staged next one, and previous
    /// ones until their overlap ends.
    pub fn bundle(&self) -> String {
        let state = self.read();
        let now = OffsetDateTime::now_utc();
        let mut pem = state.current.cert_pem().to_owned();
        if let Some(next) = &state.next {
            pem.push_str(next.ca.cert_pem());
        }
        for (root, until) in &state.previous {
            if *until > now {
                pem.push_str(root);
            }
        }
        pem
    }

    /// The root that signs now (PEM).
    pub fn signing_root(&self) -> String {
        self.read().current.cert_pem().to_owned()
    }

    /// When a staged root starts signing, if one is staged.
    pub fn staged_switch(&self) -> Option<OffsetDateTime> {
        self.read().next.as_ref().map(|n| n.at)
    }

    /// A serving certificate for the controller's own `dns_names` (its webhook), signed by
    /// the current root, so the API server trusts it with [`Self::bundle`] as `caBundle`.
    /// Returns the leaf (chain PEM) and its key (PEM).
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Leaf, String), IssueError> {
        let state = self.read();
        Ok(state.current.issue_serving(dns_names, ttl)?)
    }

    /// Signs `csr_pem` for `requested`, once the API server confirms that `token` is a
    /// ServiceAccount token of exactly that namespace and account.
    pub async fn issue(
        &self,
        token: &str,
        csr_pem: &str,
        requested: &SpiffeId,
    ) -> Result<Issued, IssueError> {
        let proved = self.review(token).await?;
        let proved_id = SpiffeId::new(&self.config.trust_domain, &proved.0, &proved.1);
        if proved_id != *requested {
            return Err(IssueError::Forbidden {
                proved: proved_id.uri(),
                requested: requested.uri(),
            });
        }
        let leaf = {
            let state = self.read();
            state.current.issue(csr_pem, requested, self.config.ttl)?
        };
        Ok(Issued {
            chain_pem: leaf.chain_pem,
            bundle_pem: self.bundle(),
            not_after: leaf.not_after,
        })
    }

    /// (namespace, service account) of a valid ServiceAccount token.
    async fn review(&self, token: &str) -> Result<(String, String), IssueError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            status: None,
        };
        let status = api
            .create(&PostParams::default(), &review)
            .await?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(IssueError::Unauthenticated(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        match user
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() => Ok((ns.into(), sa.into())),
            _ => Err(IssueError::Unauthenticated(format!(
                "{user:?} is not a ServiceAccount; only workload tokens get mesh identities"
            ))),
        }
    }

    /// Stages a new root (see the module docs): trusted from now, signing `propagate` from
    /// now (at least half the certificates' life, so every workload has renewed and learnt
    /// it), and the root it replaces trusted `overlap` past the switch (at least the
    /// certificates' life, so the leaves it signed expire first). Returns the switch time.
    /// Refused while another rotation is staged.
    pub async fn rotate(
        &self,
        propagate: Duration,
        overlap: Duration,
    ) -> Result<OffsetDateTime, IssueError> {
        self.reload().await?;
        let (current, previous) = {
            let state = self.read();
            if let Some(next) = &state.next {
                return Err(IssueError::Secret(
                    format!("{}/{}", self.config.namespace, self.config.secret),
                    format!(
                        "a rotation is already staged (its root starts signing at {})",
                        next.at
                    ),
                ));
            }
            let now = OffsetDateTime::now_utc();
            (self.copy(&state.current)?, state.live_previous(now))
        };
        let at = OffsetDateTime::now_utc() + propagate;
        let next = Next {
            ca: Ca::generate(&self.config.trust_domain, self.config.root_validity)?,
            at,
            old_until: at + overlap,
        };
        self.store(&current, Some(&next), &previous).await?;
        info!(switch_at = %at, old_root_trusted_until = %next.old_until, "mesh root rotation staged: the next root is in the bundle");
        if propagate.is_zero() {
            self.promote_if_due().await?;
        }
        Ok(at)
    }

    /// Makes a staged root the signing one once its switch time has come; the replaced root
    /// stays in the bundle until its overlap ends. Returns whether it switched here.
    pub async fn promote_if_due(&self) -> Result<bool, IssueError> {
        let (current, previous) = {
            let state = self.read();
            let now = OffsetDateTime::now_utc();
            let Some(next) = state.next.as_ref().filter(|n| n.at <= now) else {
                return Ok(false);
            };
            let mut previous = state.live_previous(now);
            previous.push((state.current.cert_pem().to_owned(), next.old_until));
            (self.copy(&next.ca)?, previous)
        };
        match self.store(&current, None, &previous).await {
            Ok(()) => {
                info!("mesh root rotated: the next root signs now; the old one stays trusted for the overlap");
                Ok(true)
            }
            // Another replica promoted it first.
            Err(IssueError::Api(kube::Error::Api(e))) if e.code == 409 => {
                self.reload().await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn state_of(config: &IssuerConfig, secret: &Secret) -> Result<State, IssueError> {
    let name = format!("{}/{}", config.namespace, config.secret);
    let data = secret.data.clone().unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| IssueError::Secret(name.clone(), format!("no key {k}")))
    };
    let current = Ca::from_pem(&config.trust_domain, &text(KEY_CERT)?, &text(KEY_KEY)?)?;
    let previous = text(KEY_PREVIOUS)
        .map(|t| parse_previous(&t))
        .unwrap_or_default();
    let next = match text(KEY_NEXT_CERT) {
        Err(_) => None,
        Ok(cert) => {
            let ca = Ca::from_pem(&config.trust_domain, &cert, &text(KEY_NEXT_KEY)?)?;
            let times: Vec<OffsetDateTime> = text(KEY_NEXT_TIMES)?
                .lines()
                .filter_map(|l| l.trim().parse::<i64>().ok())
                .filter_map(|s| OffsetDateTime::from_unix_timestamp(s).ok())
                .collect();
            let [at, old_until] = times[..] else {
                return Err(IssueError::Secret(
                    name,
                    format!("{KEY_NEXT_TIMES} must hold two unix times (switch, old root trusted until)"),
                ));
            };
            Some(Next { ca, at, old_until })
        }
    };
    Ok(State {
        current,
        next,
        previous,
        data,
        resource_version: secret.metadata.resource_version.clone(),
    })
}

fn secret_of(
    config: &IssuerConfig,
    current: &Ca,
    next: Option<&Next>,
    previous: &[(String, OffsetDateTime)],
) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        data.insert(k.to_owned(), ByteString(v.into_bytes()));
    };
    put(KEY_CERT, current.cert_pem().to_owned());
    put(KEY_KEY, current.key_pem());
    put(
        KEY_PREVIOUS,
        previous
            .iter()
            .map(|(pem, until)| format!("{}\n{pem}", until.unix_timestamp()))
            .collect(),
    );
    if let Some(n) = next {
        put(KEY_NEXT_CERT, n.ca.cert_pem().to_owned());
        put(KEY_NEXT_KEY, n.ca.key_pem());
        put(
            KEY_NEXT_TIMES,
            format!(
                "{}\n{}\n",
                n.at.unix_timestamp(),
                n.old_until.unix_timestamp()
            ),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(config.secret.clone()),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

fn parse_previous(text: &str) -> Vec<(String, OffsetDateTime)> {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(stamp) = lines.next() {
        let Ok(secs) = stamp.trim().parse::<i64>() else {
            continue;
        };
        let mut pem = String::new();
        for l in lines.by_ref() {
            pem.push_str(l);
            pem.push('\n');
            if l.starts_with("-----END") {
                break;
            }
        }
        if let Ok(until) = OffsetDateTime::from_unix_timestamp(secs) {
            out.push((pem, until));
        }
    }
    out
}

async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), IssueError> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_none() {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
