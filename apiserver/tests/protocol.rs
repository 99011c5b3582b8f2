//! The embedded API server driven by kube-rs, unmodified, as every Fairlead
//! component drives it: CRUD, optimistic concurrency, patches, status
//! subresources, selectors, pagination, watches with bookmarks and 410 Gone,
//! CRDs with schema validation, tokens, and bad input.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::Client;
use serde_json::{json, Value};

use fairlead_apiserver::{ApiServer, ServerConfig};

async fn start(cfg: ServerConfig) -> (ApiServer, Client) {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let client = Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    (server, client)
}

/// (code, reason, message) of a kube-rs API error.
fn status(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API status error, got {other:?}"),
    }
}

fn svc(name: &str, port: i64) -> Service {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}}, "spec": {"selector": {"app": name}, "ports": [{"port": port}]}})).unwrap()
}

async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    ct: &str,
    body: &str,
) -> Result<Value, kube::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ct)
        .body(body.as_bytes().to_vec())
        .unwrap();
    client.request::<Value>(req).await
}

#[tokio::test]
async fn crud_concurrency_patch_and_status() {
    let (_server, client) = start(ServerConfig::default()).await;
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
    )
    .await
    .unwrap();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "shop");

    let created = svcs
        .create(&PostParams::default(), &svc("web", 80))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(
        meta.uid.is_some() && meta.creation_timestamp.is_some() && meta.resource_version.is_some()
    );
    let spec = created.spec.clone().unwrap();
    let ip = spec.cluster_ip.clone().unwrap();
    assert!(
        ip.starts_with("10.9"),
        "clusterIP {ip} comes from 10.96.0.0/12"
    );
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.ports.unwrap()[0].protocol.as_deref(), Some("TCP"));

    // Second create of the same name: 409 AlreadyExists.
    let (code, reason, msg) = status(
        svcs.create(&PostParams::default(), &svc("web", 80))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    assert!(msg.contains("services \"web\" already exists"), "{msg}");

    // Update with the current version works; replaying the stale one is 409.
    let mut fresh = created.clone();
    fresh
        .metadata
        .labels
        .get_or_insert_default()
        .insert("tier".into(), "front".into());
    let updated = svcs
        .replace("web", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    let (code, reason, msg) = status(
        svcs.replace("web", &PostParams::default(), &fresh)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(msg.contains("the object has been modified"), "{msg}");

    // Merge patch and JSON patch.
    let p = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.annotations.unwrap()["a"], "1");
    let p = svcs
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    json!([{"op": "replace", "path": "/spec/ports/0/port", "value": 8080}]),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(p.spec.unwrap().ports.unwrap()[0].port, 8080);
    // A failing JSON-patch test op is a conflict; nothing changes.
    let e = svcs
        .patch("web", &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(json!([{"op": "test", "path": "/spec/ports/0/port", "value": 1}, {"op": "replace", "path": "/spec/ports/0/port", "value": 1}])).unwrap()))
        .await
        .unwrap_err();
    assert_eq!(status(e).0, 409);
    // The clusterIP is immutable.
    let (code, _, msg) = status(
        svcs.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clusterIP": "10.96.9.9"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        msg.contains("spec.clusterIP") && msg.contains("immutable"),
        "{msg}"
    );

    // Status subresource: the main resource ignores status; /status only changes status.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}, "status": {"phase": "Running"}})).unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let st = pods.patch_status("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "10.244.1.5"}, "spec": {"nodeName": "elsewhere"}}))).await.unwrap();
    assert_eq!(st.status.unwrap().pod_ip.as_deref(), Some("10.244.1.5"));
    assert_eq!(
        st.spec.unwrap().node_name.as_deref(),
        Some("n1"),
        "status writes leave spec alone"
    );
    let mut p2 = pods.get("p").await.unwrap();
    p2.status.as_mut().unwrap().pod_ip = Some("1.2.3.4".into());
    let p2 = pods
        .replace("p", &PostParams::default(), &p2)
        .await
        .unwrap();
    assert_eq!(
        p2.status.unwrap().pod_ip.as_deref(),
        Some("10.244.1.5"),
        "main-resource writes leave status alone"
    );
    assert!(pod.metadata.uid.is_some());

    // Delete, then 404.
    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    let (code, reason, msg) = status(svcs.get("web").await.unwrap_err());
    assert_eq!(
        (code, reason.as_str(), msg.as_str()),
        (404, "NotFound", "services \"web\" not found")
    );
    // Deleting the namespace removes what is in it.
    ns.delete("shop", &DeleteParams::default()).await.unwrap();
    assert_eq!(status(pods.get("p").await.unwrap_err()).0, 404);
    assert_eq!(
        status(
            svcs.create(&PostParams::default(), &svc("x", 1))
                .await
                .unwrap_err()
        )
        .2,
        "namespaces \"shop\" not found"
    );
}

#[tokio::test]
async fn bad_input_gets_status_codes_and_the_server_keeps_serving() {
    let (_server, client) = start(ServerConfig::default()).await;
    let base = "/api/v1/namespaces/default/services";
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        (
            "POST",
            base,
            "{\"kind\": \"Service\", ",
            400,
            "not valid JSON",
        ),
        ("POST", base, "[1,2]", 400, "must be a JSON object"),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"}}"#,
            400,
            "the body is a Pod",
        ),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Service","metadata":{}}"#,
            422,
            "name or generateName is required",
        ),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"Bad_Name"}}"#,
            422,
            "metadata.name",
        ),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":"eighty"}]}}"#,
            400,
            "spec.ports[0].port",
        ),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":70000}]}}"#,
            422,
            "spec.ports[0].port: Invalid value: 70000",
        ),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"192.168.0.1","ports":[{"port":80}]}}"#,
            422,
            "not in the valid range",
        ),
        (
            "POST",
            base,
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"other"},"spec":{"ports":[{"port":80}]}}"#,
            400,
            "does not match the namespace",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/widgets",
            r#"{}"#,
            404,
            "could not find the requested resource",
        ),
        (
            "POST",
            "/apis/nope.example.com/v1/namespaces/default/things",
            r#"{}"#,
            404,
            "could not find the requested resource",
        ),
        (
            "GET",
            "/api/v1/pods?labelSelector=app%20in%20web",
            "",
            400,
            "parenthesised",
        ),
        (
            "GET",
            "/api/v1/pods?fieldSelector=spec.bogus%3Dx",
            "",
            400,
            "field label not supported: spec.bogus",
        ),
        (
            "GET",
            "/api/v1/pods?continue=garbage",
            "",
            400,
            "continue key",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/services/kubernetes",
            "{}",
            415,
            "strategic merge patch is not supported",
        ),
        (
            "PUT",
            "/api/v1/namespaces/default/services/kubernetes",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"kubernetes"},"spec":{"ports":[{"port":443}]}}"#,
            422,
            "resourceVersion",
        ),
    ];
    for (method, path, body, want_code, want_msg) in cases {
        let ct = if method == "PATCH" {
            "application/strategic-merge-patch+json"
        } else {
            "application/json"
        };
        let e = raw(&client, method, path, ct, body).await.expect_err(path);
        let (code, _, msg) = status(e);
        assert_eq!(code, want_code, "{method} {path} {body}: {msg}");
        assert!(
            msg.contains(want_msg),
            "{method} {path}: {msg:?} should mention {want_msg:?}"
        );
    }
    // Unknown fields: Strict rejects naming the field, Warn prunes.
    let e = raw(&client, "POST", &format!("{base}?fieldValidation=Strict"), "application/json", r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"portz":[],"ports":[{"port":80}]}}"#).await.unwrap_err();
    let (code, _, msg) = status(e);
    assert_eq!(code, 422);
    assert!(msg.contains("unknown field \"spec.portz\""), "{msg}");
    let ok = raw(&client, "POST", base, "application/json", r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"portz":[],"ports":[{"port":80}]}}"#).await.unwrap();
    assert!(ok["spec"].get("portz").is_none());
    // None of that disturbed what already worked.
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let names: Vec<String> = svcs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(names, ["a", "kubernetes"]);
}

#[tokio::test]
async fn selectors_and_consistent_pagination() {
    let (_server, client) = start(ServerConfig::default()).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..250 {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("cm-{i:03}"), "labels": {"parity": if i % 2 == 0 { "even" } else { "odd" }, "tens": format!("{}", i / 10)}}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let even = cms
        .list(&ListParams::default().labels("parity=even"))
        .await
        .unwrap();
    assert_eq!(even.items.len(), 125);
    let set = cms
        .list(&ListParams::default().labels("tens in (1,2),parity!=even"))
        .await
        .unwrap();
    assert_eq!(set.items.len(), 10);
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=cm-007"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);

    // Page through with limit 100 while objects change underneath: the pages
    // are of the first page's snapshot, so nothing is missed or doubled.
    let first = cms.list(&ListParams::default().limit(100)).await.unwrap();
    assert_eq!(first.items.len(), 100);
    assert_eq!(first.metadata.remaining_item_count, Some(150));
    let token = first.metadata.continue_.clone().unwrap();
    cms.delete("cm-249", &DeleteParams::default())
        .await
        .unwrap();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cm-999"}})).unwrap(),
    )
    .await
    .unwrap();
    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    let mut cont = Some(token);
    while let Some(c) = cont {
        let page = cms
            .list(&ListParams::default().limit(100).continue_token(&c))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        cont = page.metadata.continue_.clone().filter(|c| !c.is_empty());
    }
    assert_eq!(names.len(), 250);
    assert!(names.contains(&"cm-249".to_string()) && !names.contains(&"cm-999".to_string()));
}

#[tokio::test]
async fn watch_replays_bookmarks_and_410_after_compaction() {
    let cfg = ServerConfig {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let (server, client) = start(cfg).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let start_rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    for i in 0..3 {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": format!("w{i}"), "labels": {"sel": "yes"}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    }
    cms.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    // Leaving the selection shows as DELETED to a selector watch.
    cms.patch(
        "w2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"sel": "no"}}})),
    )
    .await
    .unwrap();
    cms.delete("w0", &DeleteParams::default()).await.unwrap();

    let mut wp = WatchParams::default().labels("sel=yes").timeout(5);
    wp.bookmarks = true;
    let mut stream = cms.watch(&wp, &start_rv).await.unwrap().boxed();
    let mut seen = Vec::new();
    let mut bookmark = false;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(3), stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        match ev {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.metadata.name.unwrap())),
            WatchEvent::Modified(o) => seen.push(format!("MODIFIED {}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {
                bookmark = true;
                break;
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "ADDED w0",
            "ADDED w1",
            "ADDED w2",
            "MODIFIED w1",
            "DELETED w2",
            "DELETED w0"
        ]
    );
    assert!(
        bookmark,
        "an idle watch with allowWatchBookmarks gets bookmarks"
    );

    // After compaction the same resume point is gone.
    server.compact();
    let mut stream = cms
        .watch(&WatchParams::default(), &start_rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // And a version from the future is refused rather than waited on forever.
    let mut cfg = kube::Config::new(server.url().parse().unwrap());
    cfg.default_retry = false; // kube-rs retries 504s; this test wants the one answer
    let cms: Api<ConfigMap> = Api::namespaced(Client::try_from(cfg).unwrap(), "default");
    let e = cms
        .list(
            &ListParams::default()
                .at("999999")
                .matching(kube::api::VersionMatch::NotOlderThan),
        )
        .await
        .unwrap_err();
    assert_eq!(status(e).0, 504);
}

#[tokio::test]
async fn crds_register_validate_and_unregister() {
    let (_server, client) = start(ServerConfig::default()).await;
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "routes.mesh.fairlead.dev"},
        "spec": {"group": "mesh.fairlead.dev", "scope": "Namespaced",
            "names": {"plural": "routes", "singular": "route", "kind": "Route", "shortNames": ["rt"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["host"], "properties": {
                        "host": {"type": "string", "minLength": 1},
                        "weight": {"type": "integer", "minimum": 0, "maximum": 100},
                        "mode": {"type": "string", "enum": ["http", "tcp"]}}},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}
    });
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    let created = crds
        .create(
            &PostParams::default(),
            &serde_json::from_value(crd.clone()).unwrap(),
        )
        .await
        .unwrap();
    let conds = created.data["status"]["conditions"].as_array().unwrap();
    assert!(conds
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True"));

    // Discovery shows it.
    let d = kube::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = d
        .resolve_gvk(&GroupVersionKind::gvk(
            "mesh.fairlead.dev",
            "v1alpha1",
            "Route",
        ))
        .expect("Route is discoverable");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let good = json!({"apiVersion": "mesh.fairlead.dev/v1alpha1", "kind": "Route", "metadata": {"name": "r1"}, "spec": {"host": "a", "weight": 50, "mode": "http"}});
    routes
        .create(
            &PostParams::default(),
            &serde_json::from_value(good).unwrap(),
        )
        .await
        .unwrap();
    let bad = json!({"apiVersion": "mesh.fairlead.dev/v1alpha1", "kind": "Route", "metadata": {"name": "r2"}, "spec": {"weight": 150, "mode": "udp"}});
    let (code, reason, msg) = status(
        routes
            .create(
                &PostParams::default(),
                &serde_json::from_value(bad).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    for field in [
        "spec.host: Required value",
        "spec.weight",
        "spec.mode: Unsupported value: \"udp\"",
    ] {
        assert!(msg.contains(field), "{msg:?} should name {field}");
    }
    let unknown = json!({"apiVersion": "mesh.fairlead.dev/v1alpha1", "kind": "Route", "metadata": {"name": "r3"}, "spec": {"host": "a", "retries": 3}});
    let e = raw(
        &client,
        "POST",
        "/apis/mesh.fairlead.dev/v1alpha1/namespaces/default/routes?fieldValidation=Strict",
        "application/json",
        &unknown.to_string(),
    )
    .await
    .unwrap_err();
    let (code, _, msg) = status(e);
    assert_eq!(code, 422);
    assert!(msg.contains("unknown field \"spec.retries\""), "{msg}");

    // A CRD with a broken schema is refused and nothing is registered.
    let mut broken = crd.clone();
    broken["metadata"]["name"] = json!("things.mesh.fairlead.dev");
    broken["spec"]["names"] = json!({"plural": "things", "kind": "Thing"});
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["type"] =
        json!("map");
    let (code, _, msg) = status(
        crds.create(
            &PostParams::default(),
            &serde_json::from_value(broken).unwrap(),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        msg.contains("spec.versions[0].schema.openAPIV3Schema.properties[spec].type"),
        "{msg}"
    );

    // Deleting the CRD removes its objects and its endpoint.
    crds.delete("routes.mesh.fairlead.dev", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        status(routes.list(&ListParams::default()).await.unwrap_err()).0,
        404
    );
}

#[tokio::test]
async fn token_request_and_review() {
    let (server, client) = start(ServerConfig::default()).await;
    let token = server
        .issue_token(
            "default",
            "default",
            &["fairlead"],
            Duration::from_secs(3600),
        )
        .unwrap();
    let review = |token: String, aud: &'static str| {
        let client = client.clone();
        async move {
            let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": [aud]}}).to_string();
            raw(
                &client,
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                "application/json",
                &body,
            )
            .await
            .unwrap()
        }
    };
    let ok = review(token.clone(), "fairlead").await;
    assert_eq!(ok["status"]["authenticated"], true);
    assert_eq!(
        ok["status"]["user"]["username"],
        "system:serviceaccount:default:default"
    );
    let wrong_aud = review(token.clone(), "other").await;
    assert_eq!(wrong_aud["status"]["authenticated"], false);
    let forged = review(format!("{token}x"), "fairlead").await;
    assert_eq!(forged["status"]["authenticated"], false);
    assert!(forged["status"]["error"]
        .as_str()
        .unwrap()
        .contains("signature"));
    // Through the TokenRequest subresource, as the kubelet asks.
    let resp = raw(&client, "POST", "/api/v1/namespaces/default/serviceaccounts/default/token", "application/json", r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["fairlead"],"expirationSeconds":600}}"#).await.unwrap();
    let t2 = resp["status"]["token"].as_str().unwrap().to_string();
    assert_eq!(
        review(t2.clone(), "fairlead").await["status"]["authenticated"],
        true
    );
    // Deleting the ServiceAccount revokes its tokens.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), "default");
    sas.delete("default", &DeleteParams::default())
        .await
        .unwrap();
    let revoked = review(t2, "fairlead").await;
    assert_eq!(revoked["status"]["authenticated"], false);
    assert!(revoked["status"]["error"]
        .as_str()
        .unwrap()
        .contains("deleted"));
}
