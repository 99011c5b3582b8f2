//! The real `kubectl` binary against the embedded API server: create -f,
//! get -o json, delete, and what it prints for bad manifests.
//!
//! kubectl is not in Debian's archive, so a fresh machine may not have it: the
//! test then says so on stderr and checks nothing (set
//! FAIRLEAD_REQUIRE_KUBECTL=1 to make that a failure).

use std::path::Path;
use std::process::{Command, Output};

use fairlead_apiserver::{ApiServer, ServerConfig};
use serde_json::Value;

fn kubectl_path() -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(|d| format!("{d}/kubectl"))
        .find(|p| Path::new(p).is_file())
}

fn kubectl(bin: &str, kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(args)
        .output()
        .expect("run kubectl")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: kc}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: kc, labels: {app: web}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: kc}
data: {mode: fast}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.dev}
spec:
  group: example.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_get_delete() {
    let Some(bin) = kubectl_path() else {
        if std::env::var("FAIRLEAD_REQUIRE_KUBECTL").as_deref() == Ok("1") {
            panic!("kubectl is not on PATH and FAIRLEAD_REQUIRE_KUBECTL=1");
        }
        eprintln!("NOTE: kubectl is not on PATH: the kubectl test checked nothing on this machine");
        return;
    };
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("fairlead-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, server.kubeconfig()).unwrap();
    let manifest = dir.join("app.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();

    let bin2 = bin.clone();
    let kc2 = kc.clone();
    let run = move |args: Vec<String>| {
        let (bin, kc) = (bin2.clone(), kc2.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                kubectl(
                    &bin,
                    &kc,
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            })
            .await
            .unwrap()
        }
    };
    let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let m = manifest.display().to_string();

    let out = ok(&run(a(&["create", "-f", &m])).await);
    for line in [
        "namespace/kc created",
        "service/web created",
        "configmap/settings created",
        "customresourcedefinition.apiextensions.k8s.io/widgets.example.dev created",
    ] {
        assert!(out.contains(line), "{out}");
    }
    let svc: Value = serde_json::from_str(&ok(&run(a(&[
        "get", "service", "web", "-n", "kc", "-o", "json",
    ]))
    .await))
    .unwrap();
    assert!(svc["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .starts_with("10.9"));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    let list: Value =
        serde_json::from_str(&ok(&run(a(&["get", "-f", &m, "-o", "json"])).await)).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 4);
    let by_label: Value = serde_json::from_str(&ok(&run(a(&[
        "get", "svc", "-A", "-l", "app=web", "-o", "json",
    ]))
    .await))
    .unwrap();
    assert_eq!(by_label["items"].as_array().unwrap().len(), 1);

    // A custom resource through its freshly registered CRD, good and bad.
    let good = dir.join("good.yaml");
    std::fs::write(&good, "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w1, namespace: kc}\nspec: {size: 3}\n").unwrap();
    ok(&run(a(&["create", "-f", &good.display().to_string()])).await);
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w2, namespace: kc}\nspec: {size: 0, colour: red}\n").unwrap();
    let o = run(a(&["create", "-f", &bad.display().to_string()])).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("spec.size") || err.contains("colour"),
        "kubectl shows which field is wrong: {err}"
    );
    // A malformed manifest is refused with the reason.
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: kc}\nspec: {ports: [{port: 70000}]}\n").unwrap();
    let o = run(a(&["create", "-f", &broken.display().to_string()])).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("spec.ports[0].port") && err.contains("70000"),
        "{err}"
    );

    let out = ok(&run(a(&["delete", "service", "web", "-n", "kc"])).await);
    assert!(out.contains("service \"web\" deleted"), "{out}");
    let o = run(a(&["get", "service", "web", "-n", "kc", "-o", "json"])).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&run(a(&["delete", "configmap", "settings", "-n", "kc"])).await);
    ok(&run(a(&["delete", "namespace", "kc"])).await);
    server.shutdown().await;
}
