//! The REST surface: path parsing in the Kubernetes layout
//! (`/api/v1/namespaces/<ns>/<resource>/<name>/<subresource>`,
//! `/apis/<group>/<version>/...`), verbs mapped to store operations, and
//! chunked watch streams with bookmarks.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admit::FieldValidation;
use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{EventType, Filter, PatchKind, WriteOpts};
use crate::Inner;

/// A parsed resource path.
#[derive(Debug)]
struct Target {
    rt: Arc<ResourceType>,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
}

fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response {
    let mut resp = (
        code,
        [(http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response();
    for w in warnings {
        if let Ok(h) = HeaderValue::from_str(&format!("299 - {:?}", w)) {
            resp.headers_mut().append(http::header::WARNING, h);
        }
    }
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = json_response(code, &self.to_status(), &[]);
        if code == StatusCode::GATEWAY_TIMEOUT {
            // As the real server: clients retry after a second.
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

pub async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query: HashMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    match route(&inner, &method, &path, &query, &headers, &body).await {
        Ok(r) => r,
        Err(e) => {
            if e.code >= 500 {
                tracing::warn!(%method, %path, error = %e, "request failed");
            } else {
                tracing::debug!(%method, %path, error = %e, "request rejected");
            }
            e.into_response()
        }
    }
}

fn parse_body(body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty: send the object as JSON",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })
}

async fn route(
    inner: &Arc<Inner>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v, &[]));
    // Discovery and health.
    match segs.as_slice() {
        ["version"] => {
            return ok(
                json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-fairlead", "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "rustc", "platform": "linux/amd64"}),
            )
        }
        ["healthz"] | ["readyz"] | ["livez"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["openapi", "v3"] => {
            return ok(inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .openapi_root())
        }
        ["openapi", "v3", "api", v] => {
            return inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .openapi_group_version("", v)
                .map(|d| json_response(StatusCode::OK, &d, &[]))
                .ok_or_else(|| ApiError::unknown_path(path))
        }
        ["openapi", "v3", "apis", g, v] => {
            return inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .openapi_group_version(g, v)
                .map(|d| json_response(StatusCode::OK, &d, &[]))
                .ok_or_else(|| ApiError::unknown_path(path))
        }
        ["api"] => {
            return ok(inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .api_versions())
        }
        ["apis"] => {
            return ok(inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .api_group_list())
        }
        ["api", "v1"] => {
            return ok(inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .resource_list("", "v1")
                .expect("core group"))
        }
        ["apis", group] => {
            return inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .api_group(group)
                .map(|d| json_response(StatusCode::OK, &d, &[]))
                .ok_or_else(|| ApiError::unknown_path(path))
        }
        ["apis", group, version] => {
            return inner
                .store
                .lock()
                .expect("store lock")
                .registry
                .resource_list(group, version)
                .map(|d| json_response(StatusCode::OK, &d, &[]))
                .ok_or_else(|| ApiError::unknown_path(path))
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::unknown_path(path)),
    };
    let target = {
        let store = inner.store.lock().expect("store lock");
        let reg = &store.registry;
        let get = |plural: &str| {
            reg.get(group, version, plural)
                .ok_or_else(|| ApiError::unknown_path(path))
        };
        match rest {
            ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => Target {
                rt: get("namespaces")?,
                namespace: String::new(),
                name: Some(ns.to_string()),
                sub: Some(sub.to_string()),
            },
            ["namespaces", ns, plural, more @ ..] if more.len() <= 2 => {
                let rt = get(plural)?;
                if !rt.namespaced {
                    return Err(ApiError::unknown_path(path));
                }
                Target {
                    rt,
                    namespace: ns.to_string(),
                    name: more.first().map(|s| s.to_string()),
                    sub: more.get(1).map(|s| s.to_string()),
                }
            }
            [plural, more @ ..] if more.len() <= 2 => {
                let rt = get(plural)?;
                if rt.namespaced && !more.is_empty() {
                    return Err(ApiError::unknown_path(path));
                }
                Target {
                    rt,
                    namespace: String::new(),
                    name: more.first().map(|s| s.to_string()),
                    sub: more.get(1).map(|s| s.to_string()),
                }
            }
            _ => return Err(ApiError::unknown_path(path)),
        }
    };
    if q.contains_key("dryRun") {
        return Err(ApiError::bad_request("dryRun is not supported by the Fairlead embedded API server; send the request without it"));
    }
    let fv = FieldValidation::parse(q.get("fieldValidation").map(String::as_str))?;
    let rt = target.rt.clone();
    let ns = target.namespace.clone();
    let version = rt.version.clone();
    let mut warnings = Vec::new();
    let as_table = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::table::wants_table);
    let out = |v: &Arc<Value>| with_version(v, &rt);

    if rt.kind == "TokenReview" {
        if *method != Method::POST || target.name.is_some() {
            return Err(ApiError::method_not_allowed(
                "tokenreviews only support create (POST)",
            ));
        }
        let req = parse_body(body)?;
        return Ok(json_response(
            StatusCode::CREATED,
            &crate::token_review(inner, &req),
            &[],
        ));
    }

    match (
        method.clone(),
        target.name.as_deref(),
        target.sub.as_deref(),
    ) {
        (Method::GET, None, None) => {
            let filter = filter_from(&rt, &ns, q)?;
            if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
                return watch(inner, rt, filter, q).await;
            }
            let limit =
                match q.get("limit") {
                    Some(l) => Some(l.parse::<usize>().map_err(|_| {
                        ApiError::bad_request(format!("limit {l:?} is not a number"))
                    })?)
                    .filter(|l| *l > 0),
                    None => None,
                };
            let min_rv = match q.get("resourceVersion").map(String::as_str) {
                None | Some("") | Some("0") => None,
                Some(rv) => Some(parse_rv(rv)?),
            };
            let res = inner.store.lock().expect("store lock").list(
                &rt,
                &filter,
                limit,
                q.get("continue")
                    .map(String::as_str)
                    .filter(|c| !c.is_empty()),
                min_rv,
            )?;
            let mut meta = json!({"resourceVersion": res.rv.to_string()});
            if let Some(c) = res.continue_token.clone() {
                meta["continue"] = json!(c);
                meta["remainingItemCount"] = json!(res.remaining);
            }
            if as_table {
                let refs: Vec<&Value> = res.items.iter().map(|i| &**i).collect();
                return ok(crate::table::table(
                    &rt.kind,
                    &refs,
                    Some(res.rv.to_string()),
                    res.continue_token,
                ));
            }
            let items: Vec<Value> = res
                .items
                .iter()
                .map(|i| (*with_version(i, &rt)).clone())
                .collect();
            ok(
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": meta, "items": items}),
            )
        }
        (Method::GET, Some(name), sub) => {
            if sub.is_some_and(|s| !(s == "status" && rt.status_subresource)) {
                return Err(ApiError::unknown_path(path));
            }
            let obj = inner
                .store
                .lock()
                .expect("store lock")
                .get(&rt, &ns, name)?;
            if as_table {
                return ok(crate::table::table(&rt.kind, &[&*obj], None, None));
            }
            ok((*out(&obj)).clone())
        }
        (Method::POST, None, None) => {
            let obj = parse_body(body)?;
            let (obj, w) = inner
                .store
                .lock()
                .expect("store lock")
                .create(&rt, &ns, obj, fv)?;
            warnings.extend(w);
            Ok(json_response(StatusCode::CREATED, &out(&obj), &warnings))
        }
        (Method::POST, Some(name), Some("token")) if rt.kind == "ServiceAccount" => {
            let req = parse_body(body)?;
            let resp = crate::token_request(inner, &ns, name, &req)?;
            Ok(json_response(StatusCode::CREATED, &resp, &[]))
        }
        (Method::PUT, Some(name), sub) => {
            let status = check_sub(&rt, sub, path)?;
            let obj = parse_body(body)?;
            let (obj, w) = inner.store.lock().expect("store lock").update(
                &rt,
                &ns,
                name,
                obj,
                WriteOpts {
                    status,
                    fv,
                    require_rv: true,
                },
            )?;
            warnings.extend(w);
            Ok(json_response(StatusCode::OK, &out(&obj), &warnings))
        }
        (Method::PATCH, Some(name), sub) => {
            let status = check_sub(&rt, sub, path)?;
            let ct = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let kind = match ct.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                "application/strategic-merge-patch+json" => {
                    return Err(ApiError::unsupported_media_type("strategic merge patch is not supported by the Fairlead embedded API server: use a JSON merge patch (application/merge-patch+json, kubectl patch --type=merge) or a JSON patch (--type=json)"))
                }
                "application/apply-patch+yaml" => {
                    return Err(ApiError::unsupported_media_type("server-side apply is not supported by the Fairlead embedded API server: use create/replace, or a JSON merge patch"))
                }
                other => return Err(ApiError::unsupported_media_type(format!("the patch content type {other:?} is not supported: use application/merge-patch+json or application/json-patch+json"))),
            };
            let patch = parse_body(body)?;
            let (obj, w) = inner.store.lock().expect("store lock").patch(
                &rt,
                &ns,
                name,
                kind,
                &patch,
                WriteOpts {
                    status,
                    fv,
                    require_rv: false,
                },
            )?;
            warnings.extend(w);
            Ok(json_response(StatusCode::OK, &out(&obj), &warnings))
        }
        (Method::DELETE, Some(name), None) => {
            let pre = if body.is_empty() {
                None
            } else {
                parse_body(body)?
                    .pointer("/preconditions/resourceVersion")
                    .and_then(|v| v.as_str())
                    .map(String::from)
            };
            let obj =
                inner
                    .store
                    .lock()
                    .expect("store lock")
                    .delete(&rt, &ns, name, pre.as_deref())?;
            ok((*out(&obj)).clone())
        }
        (Method::DELETE, None, None) => {
            let filter = filter_from(&rt, &ns, q)?;
            let gone = inner
                .store
                .lock()
                .expect("store lock")
                .delete_collection(&rt, &filter)?;
            let items: Vec<Value> = gone.iter().map(|i| (*out(i)).clone()).collect();
            ok(
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {}, "items": items}),
            )
        }
        _ => {
            let _ = version;
            Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on {path}"
            )))
        }
    }
}

/// The namespace, label and field selection of a collection request.
fn filter_from(rt: &ResourceType, ns: &str, q: &HashMap<String, String>) -> ApiResult<Filter> {
    let param = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    Ok(Filter {
        namespace: (rt.namespaced && !ns.is_empty()).then(|| ns.to_string()),
        labels: LabelSelector::parse(param("labelSelector"))?,
        fields: FieldSelector::parse(param("fieldSelector"), &rt.kind)?,
    })
}

fn check_sub(rt: &ResourceType, sub: Option<&str>, path: &str) -> ApiResult<bool> {
    match sub {
        None => Ok(false),
        Some("status") if rt.status_subresource => Ok(true),
        Some(_) => Err(ApiError::unknown_path(path)),
    }
}

fn parse_rv(rv: &str) -> ApiResult<u64> {
    rv.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "resourceVersion {rv:?} is not valid: pass back a resourceVersion this server returned"
        ))
    })
}

/// Objects are stored at the version they were written with; a CRD served at
/// several versions with no conversion reports the version asked for.
fn with_version(obj: &Arc<Value>, rt: &ResourceType) -> Arc<Value> {
    let av = rt.api_version();
    if obj.get("apiVersion").and_then(|v| v.as_str()) == Some(av.as_str()) {
        obj.clone()
    } else {
        let mut o = (**obj).clone();
        o["apiVersion"] = json!(av);
        Arc::new(o)
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

/// What a watcher sees of one event, given its filter: an update that moves
/// an object out of the selection is a DELETED, into it an ADDED.
fn visible(
    filter: &Filter,
    ns: &str,
    kind: EventType,
    obj: &Value,
    prev: Option<&Value>,
) -> Option<&'static str> {
    let now = filter.matches(ns, obj);
    match (kind, prev) {
        (EventType::Modified, Some(prev)) => match (filter.matches(ns, prev), now) {
            (true, true) => Some("MODIFIED"),
            (true, false) => Some("DELETED"),
            (false, true) => Some("ADDED"),
            (false, false) => None,
        },
        _ => now.then_some(kind.as_str()),
    }
}

async fn watch(
    inner: &Arc<Inner>,
    rt: Arc<ResourceType>,
    filter: Filter,
    q: &HashMap<String, String>,
) -> ApiResult<Response> {
    let bookmarks = matches!(
        q.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let send_initial = matches!(
        q.get("sendInitialEvents").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(inner.cfg.max_watch);
    let collection = (rt.group.clone(), rt.plural.clone());
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut kick = inner.kick.subscribe();

    // Replay (or initial state) and subscription are taken under one lock.
    let (initial, mut live, start_rv, initial_end) = {
        let mut store = inner.store.lock().expect("store lock");
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            let all = store.list(&rt, &filter, None, None, None)?;
            let (_, live) = store.watch_from(&collection, all.rv)?;
            let lines: Vec<Bytes> = all
                .items
                .iter()
                .map(|o| line("ADDED", &with_version(o, &rt)))
                .collect();
            (lines, live, all.rv, send_initial)
        } else {
            let rv = parse_rv(rv_param)?;
            match store.watch_from(&collection, rv) {
                Ok((replay, live)) => {
                    let lines = replay
                        .iter()
                        .filter_map(|e| {
                            visible(&filter, &e.namespace, e.kind, &e.object, e.prev.as_deref())
                                .map(|k| line(k, &with_version(&e.object, &rt)))
                        })
                        .collect();
                    (
                        lines,
                        live,
                        replay.last().map(|e| e.rv).unwrap_or(rv).max(rv),
                        false,
                    )
                }
                Err(e) if e.code == 410 => {
                    // As the real server: a 200 stream with one ERROR event.
                    let body = Body::from(line("ERROR", &e.to_status()));
                    return Ok(
                        ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
                    );
                }
                Err(e) => return Err(e),
            }
        }
    };
    let bookmark_every = inner.cfg.bookmark_interval;
    tokio::spawn(async move {
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if initial_end && tx.send(bookmark(&rt, start_rv, true)).await.is_err() {
            return;
        }
        let mut last_rv = start_rv;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            tokio::select! {
                // A restart (kick) wins over pending events, so a cut watch
                // never delivers events made after the cut.
                biased;
                _ = kick.changed() => return,
                ev = live.recv() => match ev {
                    Ok(e) => {
                        if e.rv <= last_rv {
                            continue;
                        }
                        last_rv = e.rv;
                        if e.collection != collection {
                            continue;
                        }
                        if let Some(k) = visible(&filter, &e.namespace, e.kind, &e.object, e.prev.as_deref()) {
                            if tx.send(line(k, &with_version(&e.object, &rt))).await.is_err() {
                                return;
                            }
                        }
                    }
                    // A watcher too slow for the event rate is cut off; the
                    // client resumes from the last version it saw.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    if tx.send(bookmark(&rt, last_rv, false)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => {
                    if bookmarks {
                        let _ = tx.send(bookmark(&rt, last_rv, false)).await;
                    }
                    return;
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Ok((
        [(http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}
