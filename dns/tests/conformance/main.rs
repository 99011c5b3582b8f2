//! Conformance and end-to-end tests of the cluster DNS, in one test binary (as hickory-dns does),
//! organised by the sections of the Kubernetes DNS specification, schema 1.0.1.

mod loopback;
mod support;

mod admin;
mod api_watch;
mod e2e;
mod fuzz;
mod incremental;
mod pods;
mod prefetch;
mod protocol;
mod spec_2_2_txt;
mod spec_2_3_cluster_ip;
mod spec_2_4_headless;
mod spec_2_5_external_name;
mod stub;
