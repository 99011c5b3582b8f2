//! Sidecar injection: the mutating admission webhook that adds `fairlead-proxy` to pods
//! annotated `fairlead.io/inject: "true"` (the sandbox's kubelet honours the same
//! annotation, see `fairlead-sandbox`'s `mesh` module).
//!
//! The proxy goes in as a **native sidecar**: an init container with `restartPolicy:
//! Always` (Kubernetes 1.29+, on by default; GA in 1.33), placed first among the init
//! containers. That solves the two sidecar problems Linkerd and Istio users report most:
//!
//! * **Start-up ordering.** The kubelet starts init containers in order and, for a sidecar,
//!   moves on only once its startup probe passes. With the proxy first and a startup probe
//!   on its `/ready`, every later init container and every app container starts with the
//!   mesh already up: no "connection refused" in the first second of the app's life, no
//!   `holdApplicationUntilProxyStarts` knob, no wrapper script polling the proxy.
//! * **Jobs that never finish.** A plain sidecar container keeps a Job's pod running after
//!   its work is done. The kubelet ignores native sidecars when deciding that a pod has
//!   completed and stops them after the app containers exit, so a Job (`restartPolicy:
//!   Never` or `OnFailure`) completes with no `quitquitquit` call. Shutdown is ordered
//!   too: sidecars stop after the app containers, so the app's last requests still have
//!   their proxy.
//!
//! What the injected container carries: the proxy's ports (15006 inbound, 15001 outbound,
//! 15020 admin), startup and readiness probes on `GET /ready` at 15020, small resource
//! requests, a non-root user with every capability dropped and a read-only root
//! filesystem (the CNI plugin, not the proxy, installs the interception rules, so the
//! proxy needs no `NET_ADMIN`), and a projected ServiceAccount token with audience
//! `fairlead` that lives ten minutes (the kubelet refreshes it), with which the proxy proves
//! its identity to get its certificate. The pod's name, namespace, ServiceAccount and its
//! node's address (`status.hostIP`) reach it through the downward API, so pods made from a
//! `generateName` get their real name.
//!
//! The injected proxy runs on the agent path: it gets its certificate and routes from its
//! node agent over TCP at the node's address (`--agent-addr $(FAIRLEAD_PROXY_HOST_IP):15012`;
//! the agent answers only its own node's pods there, and the CA only the pod's own token).
//! No host volume: a hostPath mount of the agent's socket is what Pod Security Admission's
//! `baseline` and `restricted` levels forbid, and the injected container meets
//! `restricted`. Where the agent serves no mesh CA, the proxy fails its startup probe and
//! the app does not start, which is the failure we want over an app running outside the
//! mesh it asked for. The in-memory volume at [`CREDENTIALS_DIR`] is scratch space for
//! file-based credentials (`--cert` and friends), unused on the agent path.
//!
//! Decisions: only Pod CREATE requests are looked at (everything else is allowed as is);
//! `fairlead.io/inject` other than `"true"` means no sidecar; a pod that already has a
//! `fairlead-proxy` container gets no patch (the API server may call a webhook again, and
//! a re-applied manifest may carry the container); a `hostNetwork` pod is allowed without
//! a sidecar and with a warning (its proxy would bind the node's ports); a pod whose
//! volume names collide with ours is refused with a message that says which.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, Operation, META_API_VERSION_V1, META_KIND,
};
use kube::core::DynamicObject;
use kube_json_patch::jsonptr::PointerBuf;
use kube_json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{json, Value};

/// The annotation that asks for a sidecar (`"true"` injects, anything else does not), the
/// proxy's ports, and its user: defined once in `fairlead_netns::mesh` for the CNI plugin's
/// interception rules, the proxy and this webhook. The user is fixed so the rules tell the
/// proxy's own connections from the app's by socket owner (`meta skuid`): an unprivileged
/// process cannot set `SO_MARK`, which needs `CAP_NET_ADMIN`.
pub use fairlead_netns::mesh::{
    ADMIN_PORT, AGENT_MESH_PORT, INBOUND_PORT, INJECT_ANNOTATION, MODE_ANNOTATION,
    OPAQUE_PORTS_ANNOTATION, OUTBOUND_PORT, PROXY_UID,
};
/// The injected container's name; its presence makes injection a no-op.
pub const PROXY_CONTAINER: &str = "fairlead-proxy";
/// The environment variable the node's address (`status.hostIP`) reaches the proxy in; its
/// agent listens there ([`AGENT_MESH_PORT`]).
pub const HOST_IP_ENV: &str = "FAIRLEAD_PROXY_HOST_IP";
/// Where the projected ServiceAccount token is mounted in the proxy.
pub const TOKEN_DIR: &str = "/var/run/secrets/fairlead.io/serviceaccount";
/// The in-memory volume for the proxy's certificate, key and bundle.
pub const CREDENTIALS_DIR: &str = "/var/run/fairlead-proxy";
/// The volumes injection adds.
pub const VOLUME_TOKEN: &str = "fairlead-token";
pub const VOLUME_CREDENTIALS: &str = "fairlead-proxy-credentials";

/// What the injected sidecar looks like.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The proxy image.
    pub image: String,
    /// `imagePullPolicy`; the cluster default when `None`.
    pub image_pull_policy: Option<String>,
    /// The projected token's audience (what the issuer's TokenReview will ask for).
    pub token_audience: String,
    /// The projected token's lifetime, seconds (600, the API server's minimum, by default).
    pub token_expiration_seconds: i64,
    pub cpu_request: String,
    pub memory_request: String,
    /// The proxy's arguments; [`default_proxy_args`] by default.
    pub args: Vec<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: format!("fairlead-proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            token_audience: "fairlead".into(),
            token_expiration_seconds: 600,
            cpu_request: "10m".into(),
            memory_request: "20Mi".into(),
            args: default_proxy_args(),
        }
    }
}

/// Arguments of the `fairlead-proxy` binary (see its `--help`): certificates and routes
/// from the node agent over TCP at the node's address (`$(FAIRLEAD_PROXY_HOST_IP)`, which
/// the kubelet expands from the downward API's `status.hostIP`), proved by the projected
/// token (namespace and ServiceAccount come from the downward-API environment); inbound mTLS
/// on 15006 to the app at the port the client dialed, intercepted outbound on 15001, admin on
/// 15020.
pub fn default_proxy_args() -> Vec<String> {
    [
        "--agent-addr".into(),
        format!("$({HOST_IP_ENV}):{AGENT_MESH_PORT}"),
        "--token-file".into(),
        format!("{TOKEN_DIR}/token"),
        "--inbound".into(),
        format!("[::]:{INBOUND_PORT}"),
        "--app".into(),
        "original".into(),
        "--outbound".into(),
        format!("[::]:{OUTBOUND_PORT}"),
        "--admin".into(),
        format!("[::]:{ADMIN_PORT}"),
    ]
    .into()
}

/// A request body the handler cannot answer with an AdmissionReview at all (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error(
        "the body is not an admission.k8s.io/v1 AdmissionReview: {0} \
         (the MutatingWebhookConfiguration must list admissionReviewVersions: [\"v1\"])"
    )]
    Decode(String),
    #[error(
        "expected kind AdmissionReview, apiVersion admission.k8s.io/v1; got kind {kind:?}, \
         apiVersion {api_version:?} (the MutatingWebhookConfiguration must list \
         admissionReviewVersions: [\"v1\"])"
    )]
    Version { kind: String, api_version: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// Answers an AdmissionReview body. `Err` only for a body that is not a v1 AdmissionReview
/// with a request; every decision about the object itself is an AdmissionResponse.
pub fn review(
    body: &[u8],
    config: &InjectConfig,
) -> Result<AdmissionReview<DynamicObject>, BadReview> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|e| BadReview::Decode(e.to_string()))?;
    // The object is decoded on its own, as a Pod, so a malformed one is this request's
    // denial and not a malformed review.
    let object = value
        .get_mut("request")
        .and_then(Value::as_object_mut)
        .map(|r| {
            r.remove("oldObject");
            r.remove("object")
        })
        .unwrap_or_default();
    let review: AdmissionReview<DynamicObject> = serde_path_to_error::deserialize(value)
        .map_err(|e| BadReview::Decode(format!("at {}: {}", e.path(), e.inner())))?;
    if review.types.kind != META_KIND || review.types.api_version != META_API_VERSION_V1 {
        return Err(BadReview::Version {
            kind: review.types.kind,
            api_version: review.types.api_version,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| BadReview::NoRequest)?;
    Ok(decide(&request, object, config).into_review())
}

fn decide(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    config: &InjectConfig,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
        return allow;
    }
    let deny = |message: String| {
        let mut r = AdmissionResponse::from(request);
        r.allowed = false;
        r.result = kube::core::Status::failure(&message, "BadRequest").with_code(400);
        r
    };
    let Some(object) = object.filter(|o| !o.is_null()) else {
        return deny("a Pod CREATE review without the pod (request.object)".into());
    };
    let pod: Pod = match serde_path_to_error::deserialize(object) {
        Ok(p) => p,
        Err(e) => {
            return deny(format!(
                "request.object is not a decodable Pod: at {}: {}",
                e.path(),
                e.inner()
            ))
        }
    };
    match plan(&pod) {
        Plan::Skip => allow,
        Plan::Warn(w) => {
            let mut r = allow;
            r.warnings = Some(vec![w]);
            r
        }
        Plan::Refuse(message) => deny(message),
        Plan::Inject => match allow.with_patch(injection_patch(&pod, config)) {
            Ok(r) => r,
            Err(e) => deny(format!("the injection patch could not be written: {e}")),
        },
    }
}

enum Plan {
    Skip,
    Warn(String),
    Refuse(String),
    Inject,
}

fn plan(pod: &Pod) -> Plan {
    let asked = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .map(String::as_str)
        == Some("true");
    if !asked {
        return Plan::Skip;
    }
    let Some(spec) = &pod.spec else {
        return Plan::Refuse("the pod has no spec".into());
    };
    let has_proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER);
    if has_proxy {
        return Plan::Skip;
    }
    if spec.host_network == Some(true) {
        return Plan::Warn(format!(
            "{INJECT_ANNOTATION} ignored: a hostNetwork pod gets no sidecar (it would take the \
             node's ports {INBOUND_PORT}, {OUTBOUND_PORT} and {ADMIN_PORT})"
        ));
    }
    if let Err(e) = per_pod_args(pod) {
        return Plan::Refuse(e);
    }
    let ours = [VOLUME_TOKEN, VOLUME_CREDENTIALS];
    if let Some(clash) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| ours.contains(&v.name.as_str()))
    {
        return Plan::Refuse(format!(
            "the pod already has a volume named {:?}, which sidecar injection adds; rename it \
             or remove the {INJECT_ANNOTATION} annotation",
            clash.name
        ));
    }
    Plan::Inject
}

/// The proxy flags a pod's own annotations ask for (`fairlead.io/mode`,
/// `fairlead.io/opaque-ports`); a value the proxy would refuse is an error naming the
/// annotation, so the pod is refused at admission instead of failing at start.
fn per_pod_args(pod: &Pod) -> Result<Vec<String>, String> {
    let annotation = |k: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .map(String::as_str)
    };
    let mut args = Vec::new();
    if let Some(mode) = annotation(MODE_ANNOTATION) {
        if mode != "strict" && mode != "permissive" {
            return Err(format!(
                "{MODE_ANNOTATION}: {mode:?} is not `strict` or `permissive`"
            ));
        }
        args.extend(["--mode".to_owned(), mode.to_owned()]);
    }
    if let Some(ports) = annotation(OPAQUE_PORTS_ANNOTATION) {
        fairlead_netns::mesh::parse_ports(ports)
            .map_err(|e| format!("{OPAQUE_PORTS_ANNOTATION}: {e}"))?;
        args.extend(["--opaque-ports".to_owned(), ports.to_owned()]);
    }
    Ok(args)
}

/// The JSON patch that injects the sidecar: first among the init containers, and its
/// volumes appended.
fn injection_patch(pod: &Pod, config: &InjectConfig) -> Patch {
    let spec = pod.spec.as_ref();
    let mut container = sidecar(config);
    if let Some(args) = container.args.as_mut() {
        args.extend(per_pod_args(pod).unwrap_or_default());
    }
    let sidecar = to_value(&container);
    let volumes: Vec<Value> = volumes(config).iter().map(to_value).collect();
    let mut ops = Vec::new();
    if spec.is_some_and(|s| s.init_containers.as_ref().is_some_and(|c| !c.is_empty())) {
        ops.push(add(&["spec", "initContainers", "0"], sidecar));
    } else {
        ops.push(add(&["spec", "initContainers"], json!([sidecar])));
    }
    if spec.is_some_and(|s| s.volumes.is_some()) {
        for v in volumes {
            ops.push(add(&["spec", "volumes", "-"], v));
        }
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(volumes)));
    }
    Patch(ops)
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    // k8s-openapi types always serialize.
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The native sidecar container.
pub fn sidecar(config: &InjectConfig) -> Container {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: port.into(),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let ready = |period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::Int(ADMIN_PORT.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(config.args.clone()),
        // The native sidecar: kept running, started before the next init container once
        // its startup probe passes, ignored when the pod's completion is decided.
        restart_policy: Some("Always".into()),
        env: Some(vec![
            field("FAIRLEAD_PROXY_POD_NAME", "metadata.name"),
            field("FAIRLEAD_PROXY_POD_NAMESPACE", "metadata.namespace"),
            field("FAIRLEAD_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            EnvVar {
                name: "FAIRLEAD_PROXY_TOKEN".into(),
                value: Some(format!("{TOKEN_DIR}/token")),
                ..Default::default()
            },
            field(HOST_IP_ENV, "status.hostIP"),
        ]),
        ports: Some(vec![
            port("fl-inbound", INBOUND_PORT),
            port("fl-outbound", OUTBOUND_PORT),
            port("fl-admin", ADMIN_PORT),
        ]),
        // Up to two minutes to get credentials, probed every second so the app starts
        // within a second of the proxy being ready.
        startup_probe: Some(ready(1, 120)),
        readiness_probe: Some(ready(5, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity(config.cpu_request.clone())),
                ("memory".to_owned(), Quantity(config.memory_request.clone())),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(i64::from(PROXY_UID)),
            run_as_group: Some(i64::from(PROXY_UID)),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount(VOLUME_TOKEN, TOKEN_DIR, true),
            mount(VOLUME_CREDENTIALS, CREDENTIALS_DIR, false),
        ]),
        ..Default::default()
    }
}

/// The volumes the sidecar mounts.
pub fn volumes(config: &InjectConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: VOLUME_TOKEN.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(config.token_audience.clone()),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                default_mode: None,
            }),
            ..Default::default()
        },
        Volume {
            name: VOLUME_CREDENTIALS.into(),
            empty_dir: Some(k8s_openapi::api::core::v1::EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Default::default()
        },
    ]
}

/// The AdmissionReview as the API server reads it. `patch` is a Go `[]byte`, which the
/// admission API documents as base64 in JSON; kube-core writes it as an array of numbers
/// (which Go also accepts), so it is rewritten to the documented form.
pub fn encode(review: &AdmissionReview<DynamicObject>) -> Result<Vec<u8>, serde_json::Error> {
    use base64::Engine as _;
    let mut value = serde_json::to_value(review)?;
    if let Some(response) = value.get_mut("response").and_then(Value::as_object_mut) {
        if let Some(patch) = &review.response.as_ref().and_then(|r| r.patch.as_ref()) {
            response.insert(
                "patch".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(patch)),
            );
        }
    }
    serde_json::to_vec(&value)
}
