//! The object store: every object as JSON behind an `Arc`, in persistent maps
//! (`imbl`) so a consistent snapshot for a paginated list costs O(1), a single
//! resourceVersion counter, and a bounded event history that watches replay
//! from. A watch that asks for a version older than the history gets 410 Gone,
//! as from a compacted etcd.

use std::collections::VecDeque;
use std::sync::Arc;

use imbl::OrdMap;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::admit::{self, FieldValidation, ServiceAllocator};
use crate::error::{ApiError, ApiResult, Cause};
use crate::resources::{BuiltinKind, Registry, ResourceType, Validation};
use crate::schema::Schema;

/// (group, plural): a CRD served at several versions is one collection.
pub type Collection = (String, String);
/// (namespace, name); the namespace is empty for cluster-scoped kinds.
pub type ObjKey = (String, String);
pub type Objects = OrdMap<Collection, OrdMap<ObjKey, Arc<Value>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub collection: Collection,
    pub namespace: String,
    pub kind: EventType,
    pub object: Arc<Value>,
    /// The object before a modification, so a selector watch can turn an update
    /// that leaves (or enters) the selection into DELETED (or ADDED).
    pub prev: Option<Arc<Value>>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub history: usize,
    pub service_cidr_v4: (std::net::Ipv4Addr, u8),
    pub service_cidr_v6: (std::net::Ipv6Addr, u8),
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            history: 10_000,
            service_cidr_v4: ("10.96.0.0".parse().expect("literal"), 12),
            service_cidr_v6: ("fd00:10:96::".parse().expect("literal"), 112),
        }
    }
}

/// Counters the tests read to see the protocol at work.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub lists: u64,
    pub watches: u64,
    pub gone: u64,
}

pub struct Store {
    pub rv: u64,
    pub objects: Objects,
    pub registry: Registry,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Every event with rv <= this has been dropped from the history.
    pub compacted: u64,
    /// Snapshots held for continue tokens, newest last.
    pages: VecDeque<(u64, Objects)>,
    pub alloc: ServiceAllocator,
    pub events: broadcast::Sender<Arc<Event>>,
    pub stats: Stats,
}

pub struct ListResult {
    pub items: Vec<Arc<Value>>,
    pub rv: u64,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// Filters shared by list, watch and deletecollection.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: crate::selector::LabelSelector,
    pub fields: crate::selector::FieldSelector,
}

impl Filter {
    pub fn matches(&self, ns: &str, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(|x| x.as_str())
        .unwrap_or("")
}

pub const SYSTEM_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

impl Store {
    pub fn new(cfg: &StoreConfig) -> Self {
        let (events, _) = broadcast::channel(4096);
        let mut s = Self {
            rv: 1,
            objects: OrdMap::new(),
            registry: Registry::builtin(),
            history: VecDeque::new(),
            history_limit: cfg.history.max(1),
            compacted: 1,
            pages: VecDeque::new(),
            alloc: ServiceAllocator::new(cfg.service_cidr_v4, cfg.service_cidr_v6),
            events,
            stats: Stats::default(),
        };
        for ns in SYSTEM_NAMESPACES {
            let rt = s.registry.get("", "v1", "namespaces").expect("builtin");
            s.create(
                &rt,
                "",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                FieldValidation::Strict,
            )
            .expect("system namespace");
        }
        // The kubernetes Service, at the first address of the range, as a real cluster has.
        let rt = s.registry.get("", "v1", "services").expect("builtin");
        let first = std::net::Ipv4Addr::from(u32::from(cfg.service_cidr_v4.0) + 1).to_string();
        s.create(&rt, "default", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}}, "spec": {"clusterIP": first, "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}}), FieldValidation::Strict)
            .expect("kubernetes service");
        s
    }

    fn record(
        &mut self,
        collection: Collection,
        namespace: String,
        kind: EventType,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        let ev = Arc::new(Event {
            rv: self.rv,
            collection,
            namespace,
            kind,
            object,
            prev,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(ev);
    }

    /// Drops all history, as an etcd compaction does: every watch resuming
    /// from an older version now gets 410 Gone and must relist.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
        self.pages.clear();
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Arc<Value>> {
        self.objects
            .get(&(rt.group.clone(), rt.plural.clone()))
            .and_then(|c| c.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))
    }

    fn put(&mut self, rt: &ResourceType, ns: &str, name: &str, obj: Arc<Value>) {
        let key = (rt.group.clone(), rt.plural.clone());
        let mut coll = self.objects.get(&key).cloned().unwrap_or_default();
        coll.insert((ns.to_string(), name.to_string()), obj);
        self.objects.insert(key, coll);
    }

    fn take(&mut self, rt: &ResourceType, ns: &str, name: &str) -> Option<Arc<Value>> {
        let key = (rt.group.clone(), rt.plural.clone());
        let mut coll = self.objects.get(&key).cloned()?;
        let old = coll.remove(&(ns.to_string(), name.to_string()));
        self.objects.insert(key, coll);
        old
    }

    /// Lists one collection. `continue` tokens carry the snapshot version and
    /// the last key; the snapshot is kept so later pages are consistent with
    /// the first.
    pub fn list(
        &mut self,
        rt: &ResourceType,
        filter: &Filter,
        limit: Option<usize>,
        cont: Option<&str>,
        min_rv: Option<u64>,
    ) -> ApiResult<ListResult> {
        self.stats.lists += 1;
        if let Some(rv) = min_rv {
            if rv > self.rv {
                return Err(ApiError::too_large_rv(rv));
            }
        }
        let (snap_rv, objects, start) = match cont {
            Some(token) => {
                let (rv, ns, name) = decode_continue(token)?;
                let snap = self
                    .pages
                    .iter()
                    .find(|(r, _)| *r == rv)
                    .map(|(_, o)| o.clone())
                    .or_else(|| (rv == self.rv).then(|| self.objects.clone()))
                    .ok_or_else(|| {
                        ApiError::gone(format!(
                            "The provided continue parameter is too old to display a consistent list result (resource version {rv}). Start a new list without the continue parameter."
                        ))
                    })?;
                (rv, snap, Some((ns, name)))
            }
            None => (self.rv, self.objects.clone(), None),
        };
        let empty = OrdMap::new();
        let coll = objects
            .get(&(rt.group.clone(), rt.plural.clone()))
            .unwrap_or(&empty);
        let mut items = Vec::new();
        let mut last = None;
        let mut remaining = 0;
        let iter: Box<dyn Iterator<Item = (&ObjKey, &Arc<Value>)>> = match &start {
            Some(k) => Box::new(coll.range((
                std::ops::Bound::Excluded(k.clone()),
                std::ops::Bound::Unbounded,
            ))),
            None => Box::new(coll.iter()),
        };
        for (key, obj) in iter {
            if !filter.matches(&key.0, obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
                continue;
            }
            last = Some(key.clone());
            items.push(obj.clone());
        }
        let continue_token = if remaining > 0 {
            if !self.pages.iter().any(|(r, _)| *r == snap_rv) {
                self.pages.push_back((snap_rv, objects.clone()));
                while self.pages.len() > 32 {
                    self.pages.pop_front();
                }
            }
            last.map(|(ns, name)| encode_continue(snap_rv, &ns, &name))
        } else {
            None
        };
        Ok(ListResult {
            items,
            rv: snap_rv,
            continue_token,
            remaining,
        })
    }

    fn check_namespace(&self, rt: &ResourceType, ns: &str) -> ApiResult<()> {
        if rt.namespaced
            && !self
                .objects
                .get(&(String::new(), "namespaces".to_string()))
                .is_some_and(|c| c.contains_key(&(String::new(), ns.to_string())))
        {
            return Err(ApiError::not_found("namespaces", "", ns));
        }
        Ok(())
    }

    /// Shared checks for create and update: apiVersion/kind and namespace of
    /// the body against the URL, then decoding.
    fn check_body(rt: &ResourceType, ns: &str, obj: &mut Value) -> ApiResult<()> {
        let map = obj
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
        let kind = map.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        if kind.is_empty() {
            map.insert("kind".into(), json!(rt.kind));
        } else if kind != rt.kind {
            return Err(ApiError::bad_request(format!(
                "the body is a {kind}, but the URL is for {} ({}): send it to that kind's endpoint",
                rt.kind, rt.plural
            )));
        }
        let av = map.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
        let want = rt.api_version();
        if av.is_empty() {
            map.insert("apiVersion".into(), json!(want));
        } else if av != want {
            // Same group at another served version is fine (no conversion: the
            // schemas are the same); anything else is the wrong endpoint.
            let group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            if group != rt.group {
                return Err(ApiError::bad_request(format!(
                    "the body has apiVersion {av}, but the URL is for {want}"
                )));
            }
            map.insert("apiVersion".into(), json!(want));
        }
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        if rt.namespaced {
            let body_ns = meta.get("namespace").and_then(|v| v.as_str()).unwrap_or("");
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                )));
            }
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        Ok(())
    }

    /// Decoding, metadata and per-kind validation; returns the admitted object
    /// and warnings for pruned unknown fields.
    fn admit(
        &mut self,
        rt: &ResourceType,
        mut obj: Value,
        old: Option<&Value>,
        fv: FieldValidation,
    ) -> ApiResult<(Value, Vec<String>)> {
        let name = meta_str(&obj, "name").to_string();
        let decoded = admit::decode(rt, &obj, fv)?;
        obj = decoded.obj;
        let warnings = if fv == FieldValidation::Warn {
            decoded
                .unknown
                .iter()
                .map(|p| format!("unknown field {:?}", p.trim_start_matches('.')))
                .collect()
        } else {
            Vec::new()
        };
        let mut causes = Vec::new();
        admit::check_metadata(rt, &obj, &mut causes);
        if let Validation::Builtin(kind) = rt.validation {
            causes.extend(admit::validate_kind(kind, &obj));
            if kind == BuiltinKind::CustomResourceDefinition {
                if let Err(c) = crd_types(&obj) {
                    causes.extend(c);
                }
            }
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(&rt.kind, &rt.group, &name, causes));
        }
        if rt.validation_kind() == Some(BuiltinKind::Service) {
            // Work on a copy so a rejected update leaves the allocator as it was.
            let mut alloc = self.alloc.clone();
            if let Some(old) = old {
                // Its node ports are re-taken by admit_service; its cluster IPs are immutable.
                alloc.release(old);
                for ip in old
                    .pointer("/spec/clusterIPs")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                {
                    if let Some(ip) = ip.as_str().and_then(|s| s.parse().ok()) {
                        alloc.ips.insert(ip);
                    }
                }
            }
            admit::admit_service(&mut obj, old, &mut alloc)
                .map_err(|c| ApiError::invalid(&rt.kind, &rt.group, &name, c))?;
            self.alloc = alloc;
        }
        Ok((obj, warnings))
    }

    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        fv: FieldValidation,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        Self::check_body(rt, ns, &mut obj)?;
        self.check_namespace(rt, ns)?;
        let meta = &mut obj["metadata"];
        let mut name = meta
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            let gen = meta
                .get("generateName")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if gen.is_empty() {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    "",
                    vec![Cause::new(
                        "metadata.name",
                        "FieldValueRequired",
                        "Required value: name or generateName is required",
                    )],
                ));
            }
            loop {
                let suffix: String = (0..5)
                    .map(|_| {
                        let c = b"bcdfghjklmnpqrstvwxz2456789";
                        c[rand::random_range(0..c.len())] as char
                    })
                    .collect();
                name = format!("{gen}{suffix}");
                if self.get(rt, ns, &name).is_err() {
                    break;
                }
            }
            meta["name"] = json!(name);
        }
        if self.get(rt, ns, &name).is_ok() {
            return Err(ApiError::already_exists(&rt.plural, &rt.group, &name));
        }
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
        ] {
            if let Some(m) = meta.as_object_mut() {
                m.remove(k);
            }
        }
        let (mut obj, warnings) = self.admit(rt, obj, None, fv)?;
        if rt.kind == "Namespace" {
            obj["status"] = json!({"phase": "Active"});
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        if rt.kind == "CustomResourceDefinition" {
            self.register_crd(&mut obj)?;
        }
        let rv = self.next_rv();
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["resourceVersion"] = json!(rv.to_string());
        meta["creationTimestamp"] = json!(now());
        if obj.get("spec").is_some() || matches!(rt.validation, Validation::Schema(_)) {
            obj["metadata"]["generation"] = json!(1);
        }
        let obj = Arc::new(obj);
        self.put(rt, ns, &name, obj.clone());
        self.record(
            (rt.group.clone(), rt.plural.clone()),
            ns.to_string(),
            EventType::Added,
            obj.clone(),
            None,
        );
        if rt.kind == "Namespace" {
            // The ServiceAccount controller's job in a real cluster.
            let sa = self
                .registry
                .get("", "v1", "serviceaccounts")
                .expect("builtin");
            self.create(
                &sa,
                &name,
                json!({"metadata": {"name": "default"}}),
                FieldValidation::Strict,
            )?;
        }
        Ok((obj, warnings))
    }

    /// PUT (whole object or its status). Optimistic concurrency: a
    /// resourceVersion that is not the stored one is a 409.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
        opts: WriteOpts,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        let WriteOpts {
            status,
            fv,
            require_rv,
        } = opts;
        Self::check_body(rt, ns, &mut obj)?;
        let body_name = meta_str(&obj, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        obj["metadata"]["name"] = json!(name);
        let old = self.get(rt, ns, name)?;
        let rv = meta_str(&obj, "resourceVersion").to_string();
        if rv.is_empty() {
            if require_rv {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    name,
                    vec![Cause::new(
                        "metadata.resourceVersion",
                        "FieldValueInvalid",
                        "Invalid value: 0x0: must be specified for an update",
                    )],
                ));
            }
        } else if rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::conflict(&rt.plural, &rt.group, name));
        }
        // Server-owned metadata is kept from the stored object.
        for k in ["uid", "creationTimestamp", "generation"] {
            match old["metadata"].get(k) {
                Some(v) => obj["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        if rt.status_subresource {
            let map = obj.as_object_mut().expect("checked");
            if status {
                // /status changes only status.
                let new_status = map.get("status").cloned();
                let mut merged = (*old).clone();
                match new_status {
                    Some(s) => merged["status"] = s,
                    None => {
                        merged.as_object_mut().expect("object").remove("status");
                    }
                }
                for k in ["labels", "annotations"] {
                    if let Some(v) = obj["metadata"].get(k) {
                        merged["metadata"][k] = v.clone();
                    }
                }
                obj = merged;
            } else {
                match old.get("status") {
                    Some(s) => {
                        map.insert("status".into(), s.clone());
                    }
                    None => {
                        map.remove("status");
                    }
                }
            }
        }
        let (mut obj, warnings) = self.admit(rt, obj, Some(&old), fv)?;
        if rt.kind == "CustomResourceDefinition" {
            self.register_crd(&mut obj)?;
        }
        let spec_changed = obj.get("spec") != old.get("spec");
        if spec_changed {
            let g = old["metadata"]
                .get("generation")
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        if obj == *old {
            // A no-op write does not bump resourceVersion, as on a real server.
            return Ok((old, warnings));
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = Arc::new(obj);
        self.put(rt, ns, name, obj.clone());
        self.record(
            (rt.group.clone(), rt.plural.clone()),
            ns.to_string(),
            EventType::Modified,
            obj.clone(),
            Some(old),
        );
        Ok((obj, warnings))
    }

    /// PATCH: applied to the stored object, then stored as an update. A patch
    /// that names a resourceVersion gets optimistic concurrency; one that does
    /// not applies to whatever is stored.
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        kind: PatchKind,
        patch: &Value,
        opts: WriteOpts,
    ) -> ApiResult<(Arc<Value>, Vec<String>)> {
        let old = self.get(rt, ns, name)?;
        let mut doc = (*old).clone();
        match kind {
            PatchKind::Merge => json_patch::merge(&mut doc, patch),
            PatchKind::Json => {
                let ops: json_patch::Patch =
                    serde_json::from_value(patch.clone()).map_err(|e| {
                        ApiError::bad_request(format!(
                            "the JSON patch is not a valid RFC 6902 operation list: {e}"
                        ))
                    })?;
                json_patch::patch(&mut doc, &ops).map_err(|e| {
                    // A failed `test` op is a conflict in Kubernetes terms.
                    if matches!(e.kind, json_patch::PatchErrorKind::TestFailed) {
                        ApiError::conflict(&rt.plural, &rt.group, name)
                    } else {
                        ApiError::invalid(
                            &rt.kind,
                            &rt.group,
                            name,
                            vec![Cause::new(
                                e.path.to_string(),
                                "FieldValueInvalid",
                                format!("the JSON patch cannot be applied: {e}"),
                            )],
                        )
                    }
                })?;
            }
        }
        if !doc.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        let patched_rv = meta_str(&doc, "resourceVersion").to_string();
        if patched_rv.is_empty() {
            doc["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        }
        self.update(
            rt,
            ns,
            name,
            doc,
            WriteOpts {
                require_rv: false,
                ..opts
            },
        )
    }

    pub fn delete(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        precondition_rv: Option<&str>,
    ) -> ApiResult<Arc<Value>> {
        let old = self.get(rt, ns, name)?;
        if let Some(want) = precondition_rv {
            if want != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(&rt.plural, &rt.group, name));
            }
        }
        self.take(rt, ns, name);
        let rv = self.next_rv();
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        let gone = Arc::new(gone);
        if rt.validation_kind() == Some(BuiltinKind::Service) {
            self.alloc.release(&old);
        }
        self.record(
            (rt.group.clone(), rt.plural.clone()),
            ns.to_string(),
            EventType::Deleted,
            gone.clone(),
            None,
        );
        if rt.kind == "Namespace" {
            // The namespace controller's job: everything in it goes too.
            let namespaced: Vec<Arc<ResourceType>> = self
                .all_types()
                .into_iter()
                .filter(|t| t.namespaced)
                .collect();
            for t in namespaced {
                let f = Filter {
                    namespace: Some(name.to_string()),
                    ..Default::default()
                };
                self.delete_collection(&t, &f)?;
            }
        }
        if rt.kind == "CustomResourceDefinition" {
            self.unregister_crd(&old)?;
        }
        Ok(gone)
    }

    pub fn delete_collection(
        &mut self,
        rt: &ResourceType,
        filter: &Filter,
    ) -> ApiResult<Vec<Arc<Value>>> {
        let keys: Vec<ObjKey> = self
            .objects
            .get(&(rt.group.clone(), rt.plural.clone()))
            .map(|c| {
                c.iter()
                    .filter(|(k, o)| filter.matches(&k.0, o))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::new();
        for (ns, name) in keys {
            out.push(self.delete(rt, &ns, &name, None)?);
        }
        Ok(out)
    }

    /// One type per (group, plural), at its first registered version.
    fn all_types(&self) -> Vec<Arc<ResourceType>> {
        let mut seen = std::collections::BTreeSet::new();
        self.registry
            .all()
            .into_iter()
            .filter(|t| seen.insert((t.group.clone(), t.plural.clone())))
            .collect()
    }

    fn register_crd(&mut self, crd: &mut Value) -> ApiResult<()> {
        let types = crd_types(crd).map_err(|c| {
            ApiError::invalid(
                "CustomResourceDefinition",
                "apiextensions.k8s.io",
                meta_str(crd, "name"),
                c,
            )
        })?;
        let (group, plural) = (types[0].group.clone(), types[0].plural.clone());
        self.registry.remove_group_plural(&group, &plural);
        for t in types {
            self.registry.insert(t);
        }
        let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
        let ts = now();
        crd["status"] = json!({
            "acceptedNames": names,
            "storedVersions": crd.pointer("/spec/versions").and_then(|v| v.as_array()).map(|vs| vs.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": ts},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": ts},
            ]
        });
        Ok(())
    }

    fn unregister_crd(&mut self, crd: &Value) -> ApiResult<()> {
        let group = crd
            .pointer("/spec/group")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let versions: Vec<Arc<ResourceType>> = self
            .registry
            .all()
            .into_iter()
            .filter(|t| t.group == group && t.plural == plural)
            .collect();
        if let Some(t) = versions.first() {
            self.delete_collection(t, &Filter::default())?;
        }
        self.registry.remove_group_plural(&group, &plural);
        Ok(())
    }

    /// Events after `rv` for a watch, or 410 Gone when the history no longer
    /// reaches back that far. Subscribes while holding the store so no event
    /// falls between the replay and the live stream.
    pub fn watch_from(&mut self, collection: &Collection, rv: u64) -> ApiResult<WatchStart> {
        self.stats.watches += 1;
        if rv < self.compacted {
            self.stats.gone += 1;
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.compacted
            )));
        }
        if rv > self.rv {
            return Err(ApiError::too_large_rv(rv));
        }
        let replay = self
            .history
            .iter()
            .filter(|e| e.rv > rv && &e.collection == collection)
            .cloned()
            .collect();
        Ok((replay, self.events.subscribe()))
    }
}

impl ResourceType {
    pub fn validation_kind(&self) -> Option<BuiltinKind> {
        match self.validation {
            Validation::Builtin(k) => Some(k),
            _ => None,
        }
    }
}

impl Registry {
    pub fn all(&self) -> Vec<Arc<ResourceType>> {
        self.iter().cloned().collect()
    }
}

/// Replayed events plus the live feed a watch continues with.
pub type WatchStart = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

/// How an update or patch is applied.
#[derive(Debug, Clone, Copy)]
pub struct WriteOpts {
    /// Write the status subresource (only status changes) rather than the object.
    pub status: bool,
    pub fv: FieldValidation,
    /// PUT needs metadata.resourceVersion; a patch may leave it out.
    pub require_rv: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!({"rv": rv, "ns": ns, "name": name})).expect("json"))
}

fn decode_continue(token: &str) -> ApiResult<(u64, String, String)> {
    use base64::Engine;
    let bad = || {
        ApiError::bad_request(format!("continue key {token:?} is not valid: pass back the token from the previous list unchanged"))
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v["rv"].as_u64().ok_or_else(bad)?,
        v["ns"].as_str().ok_or_else(bad)?.to_string(),
        v["name"].as_str().ok_or_else(bad)?.to_string(),
    ))
}

/// The resource types a CRD defines, one per served version, or the causes
/// that make it unusable.
pub fn crd_types(crd: &Value) -> Result<Vec<ResourceType>, Vec<Cause>> {
    let mut causes = Vec::new();
    let s = |p: &str| {
        crd.pointer(p)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let group = s("/spec/group");
    let plural = s("/spec/names/plural");
    let kind = s("/spec/names/kind");
    let scope = s("/spec/scope");
    if group.is_empty() || !group.contains('.') {
        causes.push(Cause::new(
            "spec.group",
            "FieldValueInvalid",
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        ));
    }
    if plural.is_empty() {
        causes.push(Cause::new(
            "spec.names.plural",
            "FieldValueRequired",
            "Required value",
        ));
    }
    if kind.is_empty() {
        causes.push(Cause::new(
            "spec.names.kind",
            "FieldValueRequired",
            "Required value",
        ));
    }
    if !matches!(scope.as_str(), "Namespaced" | "Cluster") {
        causes.push(Cause::new(
            "spec.scope",
            "FieldValueNotSupported",
            format!("Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""),
        ));
    }
    let name = s("/metadata/name");
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::new("metadata.name", "FieldValueInvalid", format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group ({plural}.{group})")));
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::new(
            "spec.versions",
            "FieldValueRequired",
            "Required value: must have exactly one version marked as storage version",
        ));
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if !versions.is_empty() && storage != 1 {
        causes.push(Cause::new("spec.versions", "FieldValueInvalid", format!("Invalid value: must have exactly one version marked as storage version, found {storage}")));
    }
    let mut out = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let vname = v["name"].as_str().unwrap_or("").to_string();
        let Some(raw_schema) = v.pointer("/schema/openAPIV3Schema") else {
            causes.push(Cause::new(
                format!("spec.versions[{i}].schema.openAPIV3Schema"),
                "FieldValueRequired",
                "Required value: schemas are required",
            ));
            continue;
        };
        let schema = match Schema::parse(
            raw_schema,
            &format!("spec.versions[{i}].schema.openAPIV3Schema"),
        ) {
            Ok(s) => s,
            Err(c) => {
                causes.push(c);
                continue;
            }
        };
        if v["served"] != true {
            continue;
        }
        out.push(ResourceType {
            group: group.clone(),
            version: vname,
            kind: kind.clone(),
            plural: plural.clone(),
            singular: crd
                .pointer("/spec/names/singular")
                .and_then(|v| v.as_str())
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            short_names: crate::strings(crd.pointer("/spec/names/shortNames")),
            namespaced: scope == "Namespaced",
            status_subresource: v.pointer("/subresources/status").is_some(),
            validation: Validation::Schema(Arc::new(schema)),
        });
    }
    if out.is_empty() && causes.is_empty() {
        causes.push(Cause::new(
            "spec.versions",
            "FieldValueInvalid",
            "Invalid value: no version is served",
        ));
    }
    if causes.is_empty() {
        Ok(out)
    } else {
        Err(causes)
    }
}
