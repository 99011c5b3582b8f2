//! Issuing identities: a workload proves who it is with its ServiceAccount token, checked
//! by the API server (TokenReview); the CA signs its CSR for exactly that identity and no
//! other. The CA lives in a Secret (created on first start, or brought by the user); a root
//! rotation keeps the old root trusted for an overlap period, so workloads that have not
//! renewed yet keep working.

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
    /// Roots trusted besides the current one, each until its overlap ends.
    previous: Vec<(String, OffsetDateTime)>,
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
                let data = secret.data.unwrap_or_default();
                let text = |k: &str| {
                    data.get(k)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                        .ok_or_else(|| IssueError::Secret(name.clone(), format!("no key {k}")))
                };
                let current =
                    Ca::from_pem(&config.trust_domain, &text(KEY_CERT)?, &text(KEY_KEY)?)?;
                let previous = text(KEY_PREVIOUS)
                    .map(|t| parse_previous(&t))
                    .unwrap_or_default();
                info!(secret = %name, "mesh CA loaded");
                State { current, previous }
            }
            None => {
                ensure_namespace(&client, &config.namespace).await?;
                let current = Ca::generate(&config.trust_domain, config.root_validity)?;
                let state = State {
                    current,
                    previous: Vec::new(),
                };
                secrets
                    .create(&PostParams::default(), &secret_of(&config, &state))
                    .await?;
                info!(secret = %name, "mesh CA generated");
                state
            }
        };
        Ok(Self {
            client,
            config,
            state: RwLock::new(state),
        })
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    /// The roots workloads must trust now.
    pub fn bundle(&self) -> String {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let now = OffsetDateTime::now_utc();
        let mut pem = state.current.cert_pem().to_owned();
        for (root, until) in &state.previous {
            if *until > now {
                pem.push_str(root);
            }
        }
        pem
    }

    /// A serving certificate for the controller's own `dns_names` (its webhook), signed by
    /// the current root, so the API server trusts it with [`Self::bundle`] as `caBundle`.
    /// Returns the leaf (chain PEM) and its key (PEM).
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Leaf, String), IssueError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
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
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
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

    /// Replaces the root with a new one; the old stays in the bundle for `overlap`. Stored in
    /// the Secret before it is used.
    pub async fn rotate(&self, overlap: Duration) -> Result<(), IssueError> {
        let next = Ca::generate(&self.config.trust_domain, self.config.root_validity)?;
        let secret = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            let now = OffsetDateTime::now_utc();
            let mut previous: Vec<(String, OffsetDateTime)> = state
                .previous
                .iter()
                .filter(|(_, until)| *until > now)
                .cloned()
                .collect();
            previous.push((state.current.cert_pem().to_owned(), now + overlap));
            let draft = State {
                current: Ca::from_pem(&self.config.trust_domain, next.cert_pem(), &next.key_pem())?,
                previous,
            };
            let s = secret_of(&self.config, &draft);
            (s, draft)
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let mut current = secrets.get(&self.config.secret).await?;
        current.data = secret.0.data;
        secrets
            .replace(&self.config.secret, &PostParams::default(), &current)
            .await?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = secret.1;
        info!(overlap = ?overlap, "mesh root rotated; the old root stays trusted for the overlap");
        Ok(())
    }
}

fn secret_of(config: &IssuerConfig, state: &State) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        KEY_CERT.to_owned(),
        ByteString(state.current.cert_pem().as_bytes().to_vec()),
    );
    data.insert(
        KEY_KEY.to_owned(),
        ByteString(state.current.key_pem().into_bytes()),
    );
    let previous: String = state
        .previous
        .iter()
        .map(|(pem, until)| format!("{}\n{pem}", until.unix_timestamp()))
        .collect();
    data.insert(KEY_PREVIOUS.to_owned(), ByteString(previous.into_bytes()));
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
