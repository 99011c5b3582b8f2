//! The sidecar-injection webhook over real TLS: the server on a loopback port with a
//! serving certificate from the mesh CA, a hyper client trusting that CA POSTing
//! AdmissionReviews as the API server does, and the returned JSON patch applied to the
//! pod to check what the kubelet would get.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use fairlead_apiserver::{ApiServer, ServerConfig};
use fairlead_controller::server::{self, Limits, ServingCert};
use fairlead_controller::webhook::InjectConfig;
use fairlead_controller::{CertIssuer, IssuerConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube_json_patch::Patch;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const DNS_NAME: &str = "fairlead-controller.fairlead-system.svc";

struct Webhook {
    addr: std::net::SocketAddr,
    connector: TlsConnector,
    /// The server, in this process or as the `fairlead-controller` binary.
    task: Option<tokio::task::JoinHandle<()>>,
    _child: Option<Killed>,
    _api: Option<ApiServer>,
}

/// A child process, killed (and reaped) when dropped, also when a test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A TLS client that trusts only `bundle_pem`, as the API server trusts only the caBundle.
fn connector(bundle_pem: &str) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The webhook as the binary runs it: the mesh CA from its Secret (in the embedded API
/// server), a serving certificate it issues for the Service's DNS name.
async fn start(limits: Limits) -> anyhow::Result<Webhook> {
    let api = ApiServer::start("127.0.0.1:0".parse()?, ServerConfig::default()).await?;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    let issuer = CertIssuer::load_or_create(client, IssuerConfig::default()).await?;
    let (leaf, key) = issuer.issue_serving(&[DNS_NAME.to_owned()], Duration::from_secs(3600))?;
    let tls = ServingCert::from_pem(&leaf.chain_pem, &key)?.tls_config()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(server::serve(
        listener,
        tls,
        Arc::new(InjectConfig {
            image: "example.test/fairlead-proxy:test".into(),
            ..InjectConfig::default()
        }),
        limits,
    ));
    Ok(Webhook {
        addr,
        connector: connector(&issuer.bundle())?,
        task: Some(task),
        _child: None,
        _api: Some(api),
    })
}

impl Webhook {
    async fn tls(&self, name: &str) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        self.connector
            .connect(ServerName::try_from(name.to_owned()).expect("a name"), tcp)
            .await
    }

    /// One request on a fresh connection: (status, body).
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        chunked: bool,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let tls = self.tls(DNS_NAME).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", DNS_NAME)
            .header("content-type", "application/json");
        if !chunked {
            req = req.header("content-length", body.len());
        }
        let resp = if chunked {
            // A streamed body of unknown length, as a client that does not declare one.
            let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = body
                .chunks(64 * 1024)
                .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let body = http_body_util::StreamBody::new(futures::stream::iter(chunks));
            send.send_request(req.body(http_body_util::Either::Left(body))?)
                .await?
        } else {
            send.send_request(
                req.body(http_body_util::Either::Right(Full::new(Bytes::from(body))))?,
            )
            .await?
        };
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, bytes))
    }

    async fn post(&self, body: &Value) -> anyhow::Result<(u16, Value)> {
        let (status, bytes) = self
            .request("POST", "/mutate-pods", serde_json::to_vec(body)?, false)
            .await?;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }

    /// The webhook's answer to a Pod CREATE: the response, and the pod with the patch
    /// applied (as the API server would).
    async fn admit(&self, pod: &Value) -> anyhow::Result<(Value, Value)> {
        let (status, review) = self.post(&review_of(pod, "CREATE", pod_kind())).await?;
        assert_eq!(status, 200, "{review}");
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        let response = review["response"].clone();
        assert_eq!(response["uid"], "7f3e1c52-0d9a-4a36-a1f2-0c5b3b1f9a10");
        let mut patched = pod.clone();
        if let Some(patch) = response["patch"].as_str() {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD.decode(patch)?;
            let patch: Patch = serde_json::from_slice(&bytes)?;
            kube_json_patch::patch(&mut patched, &patch)?;
        }
        Ok((response, patched))
    }
}

fn pod_kind() -> Value {
    json!({"group": "", "version": "v1", "kind": "Pod"})
}

fn review_of(object: &Value, operation: &str, kind: Value) -> Value {
    let resource = if kind["kind"] == "Pod" {
        "pods"
    } else {
        "deployments"
    };
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f3e1c52-0d9a-4a36-a1f2-0c5b3b1f9a10",
            "kind": kind,
            "resource": {"group": kind["group"], "version": kind["version"], "resource": resource},
            "requestKind": kind,
            "requestResource": {"group": kind["group"], "version": kind["version"], "resource": resource},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    });
    // As the API server sends it: no name for a pod that has only a generateName.
    if let Some(name) = object["metadata"]["name"].as_str() {
        review["request"]["name"] = json!(name);
    }
    review
}

/// A Deployment's pod: an init container of its own, a volume, the annotation.
fn web_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-6d4cf56db6-",
            "namespace": "shop",
            "labels": {"app": "web"},
            "annotations": {"fairlead.io/inject": "true"}
        },
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [{"name": "migrate", "image": "example.test/migrate:1"}],
            "containers": [{"name": "web", "image": "example.test/web:1", "ports": [{"containerPort": 8080}]}],
            "volumes": [{"name": "config", "configMap": {"name": "web"}}]
        }
    })
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn assert_sidecar(proxy: &Value) {
    assert_eq!(proxy["name"], "fairlead-proxy");
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["image"], "example.test/fairlead-proxy:test");
    let ports: Vec<i64> = proxy["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["containerPort"].as_i64().expect("a port"))
        .collect();
    assert_eq!(ports, [15006, 15001, 15020]);
    for probe in ["startupProbe", "readinessProbe"] {
        assert_eq!(proxy[probe]["httpGet"]["path"], "/ready", "{probe}");
        assert_eq!(proxy[probe]["httpGet"]["port"], 15020, "{probe}");
    }
    let field_of = |name: &str| {
        proxy["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(field_of("FAIRLEAD_PROXY_POD_NAME"), "metadata.name");
    assert_eq!(
        field_of("FAIRLEAD_PROXY_POD_NAMESPACE"),
        "metadata.namespace"
    );
    assert_eq!(
        field_of("FAIRLEAD_PROXY_SERVICE_ACCOUNT"),
        "spec.serviceAccountName"
    );
    let sc = &proxy["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null(), "no capability added");
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(proxy["resources"]["requests"]["cpu"].is_string());
    assert!(proxy["resources"]["requests"]["memory"].is_string());
    // Arguments the proxy binary takes.
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for flag in [
        "--agent-addr",
        "--token-file",
        "--inbound",
        "--outbound",
        "--admin",
    ] {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    // The node's agent at the node's address, expanded by the kubelet from the environment.
    assert!(
        args.contains(&"$(FAIRLEAD_PROXY_HOST_IP):15012"),
        "{args:?}"
    );
    assert_eq!(field_of("FAIRLEAD_PROXY_HOST_IP"), "status.hostIP");
    assert!(
        args.contains(&"/var/run/secrets/fairlead.io/serviceaccount/token"),
        "{args:?}"
    );
    let mounts: Vec<(&str, &str)> = proxy["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or(""),
                m["mountPath"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // No host volume (Pod Security's baseline and restricted levels refuse hostPath).
    assert!(
        !mounts.iter().any(|(n, _)| n.contains("agent")),
        "{mounts:?}"
    );
    assert!(mounts.contains(&(
        "fairlead-token",
        "/var/run/secrets/fairlead.io/serviceaccount"
    )));
}

fn assert_volumes(spec: &Value) {
    let volume = |name: &str| {
        spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no volume {name} in {}", spec["volumes"]))
    };
    assert!(
        !spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v.get("hostPath").is_some()),
        "no hostPath volume: {}",
        spec["volumes"]
    );
    let token = volume("fairlead-token");
    let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "fairlead");
    assert_eq!(sat["expirationSeconds"], 600);
    assert_eq!(sat["path"], "token");
}

#[tokio::test]
async fn an_annotated_pod_gets_a_native_sidecar_first_and_only_once() -> anyhow::Result<()> {
    let hook = start(Limits::default()).await?;
    let pod = web_pod();
    let (response, patched) = hook.admit(&pod).await?;
    assert_eq!(response["allowed"], true);
    let spec = &patched["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["fairlead-proxy", "migrate"],
        "the proxy starts before the pod's own init containers"
    );
    assert_sidecar(&spec["initContainers"][0]);
    assert_eq!(names(&spec["containers"]), ["web"], "the app is untouched");
    assert_eq!(
        names(&spec["volumes"]),
        ["config", "fairlead-token", "fairlead-proxy-credentials"]
    );
    assert_volumes(spec);
    // What the API server would store is a valid Pod.
    let typed: Pod = serde_json::from_value(patched.clone())?;
    let sidecar = &typed.spec.expect("spec").init_containers.expect("init")[0];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));

    // Idempotent: the API server may call again (reinvocation), or the pod may carry the
    // container already; either way, nothing more.
    let (again, twice) = hook.admit(&patched).await?;
    assert_eq!(again["allowed"], true);
    assert!(again["patch"].is_null(), "no second patch: {again}");
    assert_eq!(twice, patched);
    Ok(())
}

#[tokio::test]
async fn the_pods_mode_and_opaque_ports_reach_the_proxy_and_bad_values_are_refused(
) -> anyhow::Result<()> {
    let hook = start(Limits::default()).await?;
    let mut pod = web_pod();
    pod["metadata"]["annotations"]["fairlead.io/mode"] = json!("permissive");
    pod["metadata"]["annotations"]["fairlead.io/opaque-ports"] = json!("3306, 25");
    let (response, patched) = hook.admit(&pod).await?;
    assert_eq!(response["allowed"], true);
    let args: Vec<&str> = patched["spec"]["initContainers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--mode", "permissive"])
            && args.windows(2).any(|w| w == ["--opaque-ports", "3306, 25"]),
        "{args:?}"
    );
    for (key, value, says) in [
        (
            "fairlead.io/mode",
            "open",
            "\"open\" is not `strict` or `permissive`",
        ),
        (
            "fairlead.io/opaque-ports",
            "3306,mysql",
            "\"mysql\" is not a port",
        ),
    ] {
        let mut bad = web_pod();
        bad["metadata"]["annotations"][key] = json!(value);
        let (status, review) = hook.post(&review_of(&bad, "CREATE", pod_kind())).await?;
        assert_eq!(status, 200);
        assert_eq!(review["response"]["allowed"], false, "{review}");
        let message = review["response"]["status"]["message"]
            .as_str()
            .unwrap_or("");
        assert!(message.contains(key) && message.contains(says), "{message}");
    }
    Ok(())
}

#[tokio::test]
async fn a_jobs_pod_gets_the_native_sidecar_so_the_job_can_complete() -> anyhow::Result<()> {
    let hook = start(Limits::default()).await?;
    // A Job's pod: restartPolicy Never, no init containers, no volumes.
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "report-28413-",
            "namespace": "shop",
            "labels": {"batch.kubernetes.io/job-name": "report-28413"},
            "annotations": {"fairlead.io/inject": "true"}
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "report", "image": "example.test/report:1", "command": ["report", "--once"]}]
        }
    });
    let (response, patched) = hook.admit(&pod).await?;
    assert_eq!(response["allowed"], true);
    let spec = &patched["spec"];
    // The pod stays a run-to-completion pod; only the proxy restarts, as a native sidecar,
    // which the kubelet does not wait for when the report container exits.
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(names(&spec["initContainers"]), ["fairlead-proxy"]);
    assert_sidecar(&spec["initContainers"][0]);
    assert_eq!(names(&spec["containers"]), ["report"]);
    assert_volumes(spec);
    serde_json::from_value::<Pod>(patched.clone())?;
    Ok(())
}

#[tokio::test]
async fn pods_that_did_not_ask_and_other_requests_pass_untouched() -> anyhow::Result<()> {
    let hook = start(Limits::default()).await?;
    let mut plain = web_pod();
    plain["metadata"]["annotations"] = json!({});
    let mut declined = web_pod();
    declined["metadata"]["annotations"]["fairlead.io/inject"] = json!("false");
    let mut no_metadata_annotations = web_pod();
    no_metadata_annotations["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("annotations");
    for pod in [plain, declined, no_metadata_annotations] {
        let (response, patched) = hook.admit(&pod).await?;
        assert_eq!(response["allowed"], true);
        assert!(response["patch"].is_null(), "{response}");
        assert_eq!(patched, pod);
    }

    // A hostNetwork pod: allowed, no sidecar, and told why.
    let mut host = web_pod();
    host["spec"]["hostNetwork"] = json!(true);
    let (response, _) = hook.admit(&host).await?;
    assert_eq!(response["allowed"], true);
    assert!(response["patch"].is_null());
    assert!(
        response["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("hostNetwork")),
        "{response}"
    );

    // Another kind (even with the annotation on its pod template), another operation.
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"fairlead.io/inject": "true"}},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "x"}]}}}
    });
    let apps = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (status, review) = hook.post(&review_of(&deployment, "CREATE", apps)).await?;
    assert_eq!(status, 200);
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"]["patch"].is_null());
    let (status, review) = hook
        .post(&review_of(&web_pod(), "UPDATE", pod_kind()))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"]["patch"].is_null());
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_clear_answer_and_no_panic() -> anyhow::Result<()> {
    let hook = start(Limits::default()).await?;
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();

    // Not JSON at all.
    let (status, body) = hook
        .request("POST", "/mutate-pods", b"{not json".to_vec(), false)
        .await?;
    assert_eq!(status, 400);
    let body = String::from_utf8(body)?;
    assert!(
        body.contains("not an admission.k8s.io/v1 AdmissionReview"),
        "{body}"
    );
    // JSON, but not a review; a v1beta1 review; a review without a request.
    let (status, body) = hook.post(&json!({"hello": "world"})).await?;
    assert_eq!(status, 400, "{body}");
    let mut beta = review_of(&web_pod(), "CREATE", pod_kind());
    beta["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = hook.post(&beta).await?;
    assert_eq!(status, 400);
    assert!(text(&body).contains("admission.k8s.io/v1beta1"), "{body}");
    let (status, body) = hook
        .post(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}))
        .await?;
    assert_eq!(status, 400);
    assert!(text(&body).contains("no request"), "{body}");
    // A request whose uid is not a string.
    let mut bad_uid = review_of(&web_pod(), "CREATE", pod_kind());
    bad_uid["request"]["uid"] = json!(42);
    let (status, body) = hook.post(&bad_uid).await?;
    assert_eq!(status, 400);
    assert!(text(&body).contains("request.uid"), "{body}");

    // A review of a pod that is not a Pod: denied, saying where.
    let mut broken = web_pod();
    broken["spec"]["containers"] = json!("web");
    let (status, review) = hook.post(&review_of(&broken, "CREATE", pod_kind())).await?;
    assert_eq!(status, 200);
    assert_eq!(review["response"]["allowed"], false);
    let message = text(&review["response"]["status"]["message"]);
    assert!(
        message.contains("not a decodable Pod") && message.contains("spec.containers"),
        "{message}"
    );
    assert!(review["response"]["patch"].is_null());
    // A Pod CREATE without the pod.
    let mut missing = review_of(&web_pod(), "CREATE", pod_kind());
    missing["request"]["object"] = Value::Null;
    let (_, review) = hook.post(&missing).await?;
    assert_eq!(review["response"]["allowed"], false);
    // A pod already using one of our volume names: denied, naming it.
    let mut clash = web_pod();
    clash["spec"]["volumes"] = json!([{"name": "fairlead-token", "emptyDir": {}}]);
    let (response, _) = hook.admit(&clash).await?;
    assert_eq!(response["allowed"], false);
    assert!(
        text(&response["status"]["message"]).contains("\"fairlead-token\""),
        "{response}"
    );

    // Wrong path and method.
    let (status, _) = hook
        .request("GET", "/mutate-pods", Vec::new(), false)
        .await?;
    assert_eq!(status, 405);
    let (status, _) = hook.request("POST", "/mutate", Vec::new(), false).await?;
    assert_eq!(status, 404);
    let (status, body) = hook.request("GET", "/healthz", Vec::new(), false).await?;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    Ok(())
}

#[tokio::test]
async fn requests_are_bounded_in_size_and_time() -> anyhow::Result<()> {
    let hook = start(Limits {
        max_body: 1 << 20,
        read_timeout: Duration::from_secs(1),
    })
    .await?;
    let big = vec![b' '; (1 << 20) + 1];
    // Declared too large: refused before the body is read.
    let (status, body) = hook
        .request("POST", "/mutate-pods", big.clone(), false)
        .await?;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    // Streamed too large.
    let (status, _) = hook.request("POST", "/mutate-pods", big, true).await?;
    assert_eq!(status, 413);
    // A body just under the limit is read (and is not a review).
    let (status, _) = hook
        .request("POST", "/mutate-pods", vec![b' '; 1 << 19], false)
        .await?;
    assert_eq!(status, 400);

    // A client that stops halfway through its request head is cut off.
    let mut tls = hook.tls(DNS_NAME).await?;
    tls.write_all(b"POST /mutate-pods HTTP/1.1\r\nhost: x\r\n")
        .await?;
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf),
    )
    .await;
    assert!(read.is_ok(), "the server kept a stalled client for 10 s");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A connection that never finishes the TLS handshake is closed too.
    let mut tcp = TcpStream::connect(hook.addr).await?;
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf),
    )
    .await;
    assert!(read.is_ok(), "the server kept a silent client for 10 s");
    Ok(())
}

#[tokio::test]
async fn the_serving_certificate_is_for_the_webhook_service_only() -> anyhow::Result<()> {
    let hook = start(Limits::default()).await?;
    assert!(hook.tls(DNS_NAME).await.is_ok());
    let err = hook
        .tls("other.fairlead-system.svc")
        .await
        .expect_err("another name must not verify");
    assert!(err.to_string().contains("certificate"), "{err}");
    Ok(())
}

/// The `fairlead-controller` binary as the chart runs it, against the embedded API server:
/// it creates the mesh CA, issues its serving certificate, writes the CA bundle into the
/// webhook configuration's caBundle, and injects with that certificate.
#[tokio::test]
async fn the_binary_sets_its_ca_bundle_and_injects() -> anyhow::Result<()> {
    let (api, client) = api_with_webhook_config().await?;
    let dir = std::env::temp_dir().join(format!("fairlead-controller-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Removed also when an assertion below fails.
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveDir(dir.clone());
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_fairlead-controller"))
            .env("KUBECONFIG", &kubeconfig)
            .args([
                format!("--listen={addr}"),
                "--webhook-config=fairlead-sidecar-injector".into(),
                "--proxy-image=example.test/fairlead-proxy:test".into(),
                "--ca-sync-secs=1".into(),
            ])
            .spawn()?,
    );
    let hooks: kube::Api<
        k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    > = kube::Api::all(client.clone());
    let bundle = first_ca_bundle(&hooks).await?;
    // The trust bundle is published for the node agents too.
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), "fairlead-system");
    let published = cms.get("fairlead-ca-bundle").await?;
    assert_eq!(
        published.data.unwrap_or_default().get("ca.crt"),
        Some(&bundle)
    );
    let mut hook = Webhook {
        addr,
        connector: connector(&bundle)?,
        task: None,
        _child: Some(child),
        _api: Some(api),
    };
    // The server may still be binding its port.
    for _ in 0..100 {
        if hook.tls(DNS_NAME).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (response, patched) = hook.admit(&web_pod()).await?;
    assert_eq!(response["allowed"], true);
    assert_eq!(
        names(&patched["spec"]["initContainers"]),
        ["fairlead-proxy", "migrate"]
    );
    assert_sidecar(&patched["spec"]["initContainers"][0]);

    // A root rotation staged from the command line (here signing at once) reaches the
    // running controller within its sync period: caBundle and the bundle ConfigMap hold both
    // roots, and the webhook serves a certificate from the new root.
    // Not std's Command: waiting on it would block this runtime, which also serves the API.
    let cli = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fairlead-controller"))
            .env("KUBECONFIG", &kubeconfig)
            .args(args)
            .kill_on_drop(true)
            .output()
    };
    let bad = cli(&["rotate-root", "--overlap", "5x"]).await?;
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("the unit must be s, m, h or d"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        cli(&["rotate-root", "--propagate", "0s", "--overlap", "1h"]),
    )
    .await??;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("signing from"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rotated = None;
    for _ in 0..100 {
        let config = hooks.get("fairlead-sidecar-injector").await?;
        let b = config.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone()
            .map(|b| String::from_utf8(b.0))
            .transpose()?
            .unwrap_or_default();
        if b.matches("BEGIN CERTIFICATE").count() == 2 {
            rotated = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = rotated.expect("caBundle holds both roots within 10 s");
    assert!(
        rotated.contains(bundle.trim()),
        "the old root stays trusted"
    );
    let published = cms.get("fairlead-ca-bundle").await?;
    assert_eq!(
        published.data.unwrap_or_default().get("ca.crt"),
        Some(&rotated)
    );
    // The new root (first in the bundle) alone verifies the webhook's certificate now.
    let new_root = rotated
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .to_owned();
    hook.connector = connector(&new_root)?;
    hook.tls(DNS_NAME).await?;
    Ok(())
}

/// The first certificate of a PEM chain, DER.
fn leaf_der(chain_pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// cert-manager renews the Secret and the kubelet updates the mounted files: the next
/// handshake presents the new certificate, and a pair that does not load leaves the last
/// good one in service.
#[tokio::test]
async fn a_renewed_certificate_file_is_served_from_the_next_handshake() -> anyhow::Result<()> {
    let ca = fairlead_controller::Ca::generate("cluster.local", Duration::from_secs(3600))?;
    let issue = || ca.issue_serving(&[DNS_NAME.to_owned()], Duration::from_secs(3600));
    let dir = std::env::temp_dir().join(format!("fairlead-webhook-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let write = |chain: &str, key: &str| -> std::io::Result<()> {
        std::fs::write(&cert_path, chain)?;
        std::fs::write(&key_path, key)
    };
    let (first, first_key) = issue()?;
    write(&first.chain_pem, &first_key)?;
    let cert = ServingCert::from_files(&cert_path, &key_path)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let hook = Webhook {
        addr: listener.local_addr()?,
        connector: connector(ca.cert_pem())?,
        task: Some(tokio::spawn(server::serve(
            listener,
            cert.tls_config()?,
            Arc::new(InjectConfig::default()),
            Limits::default(),
        ))),
        _child: None,
        _api: None,
    };
    let presented = || async {
        let tls = hook.tls(DNS_NAME).await.expect("a handshake");
        tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
    };
    assert_eq!(presented().await, leaf_der(&first.chain_pem));

    let (second, second_key) = issue()?;
    write(&second.chain_pem, &second_key)?;
    assert_eq!(presented().await, leaf_der(&second.chain_pem), "renewed");

    // Half-written: a new certificate with the old key. Still the last good pair.
    let (third, _) = issue()?;
    std::fs::write(&cert_path, &third.chain_pem)?;
    assert_eq!(presented().await, leaf_der(&second.chain_pem), "kept");
    std::fs::write(&cert_path, "garbage")?;
    assert_eq!(presented().await, leaf_der(&second.chain_pem), "kept");

    // The binary's renewal of an issued certificate: replaced in place.
    let (fourth, fourth_key) = issue()?;
    cert.set(&fourth.chain_pem, &fourth_key)?;
    assert_eq!(presented().await, leaf_der(&fourth.chain_pem), "set");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Two replicas started at the same moment (as a Deployment with `replicas: 2` starts them)
/// settle on one CA: one Secret, one root in the bundle and in caBundle, and both serve the
/// webhook with a certificate that caBundle verifies. No leader is needed.
#[tokio::test]
async fn two_replicas_started_together_share_one_ca() -> anyhow::Result<()> {
    let (api, client) = api_with_webhook_config().await?;
    let dir = std::env::temp_dir().join(format!("fairlead-controller-two-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let addrs = [
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?,
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?,
    ];
    let children: Vec<Killed> = addrs
        .iter()
        .map(|addr| {
            std::process::Command::new(env!("CARGO_BIN_EXE_fairlead-controller"))
                .env("KUBECONFIG", &kubeconfig)
                .args([
                    format!("--listen={addr}"),
                    "--webhook-config=fairlead-sidecar-injector".into(),
                    "--ca-sync-secs=1".into(),
                ])
                .spawn()
                .map(Killed)
        })
        .collect::<Result<_, _>>()?;
    let hooks: kube::Api<
        k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    > = kube::Api::all(client.clone());
    let bundle = first_ca_bundle(&hooks).await?;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "one root");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, "fairlead-system");
    let stored = secrets.get("fairlead-ca").await?.data.unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&stored["ca.crt"].0).trim(),
        bundle.trim(),
        "the Secret's root is the one published"
    );
    for addr in addrs {
        let hook = Webhook {
            addr,
            connector: connector(&bundle)?,
            task: None,
            _child: None,
            _api: None,
        };
        let mut served = false;
        for _ in 0..100 {
            if hook.tls(DNS_NAME).await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            served,
            "the replica on {addr} serves a certificate caBundle verifies"
        );
    }
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The embedded API server with the chart's MutatingWebhookConfiguration (no caBundle yet).
async fn api_with_webhook_config() -> anyhow::Result<(ApiServer, kube::Client)> {
    let api = ApiServer::start("127.0.0.1:0".parse()?, ServerConfig::default()).await?;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    api.create(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "fairlead-sidecar-injector"},
        "webhooks": [{
            "name": "inject.fairlead.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"name": "fairlead-controller", "namespace": "fairlead-system", "path": "/mutate-pods", "port": 443}}
        }]
    }))?;
    Ok((api, client))
}

/// The caBundle a controller writes into that configuration, waited for up to 20 s.
async fn first_ca_bundle(
    hooks: &kube::Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>,
) -> anyhow::Result<String> {
    for _ in 0..200 {
        let config = hooks.get("fairlead-sidecar-injector").await?;
        if let Some(b) = config.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone()
        {
            return Ok(String::from_utf8(b.0)?);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no caBundle within 20 s")
}
