//! The sandbox cluster: where no real cluster exists, Fairlead makes one on
//! this machine. Nodes are network namespaces on an underlay (no link to the
//! host's namespace); the embedded API server is the control plane; per node
//! an agent (routes, CNI config) and a kubelet (pods as namespaces wired by the
//! real `fairlead-cni` binary, each running a built-in HTTP/TCP/UDP echo
//! workload); one EndpointSlice controller; and one snapshot watcher for the
//! whole process, as everywhere else.

pub mod agents;
pub mod cgroup;
pub mod cluster;
pub mod endpoints;
pub mod kubelet;
pub mod mesh;
pub mod netns;
pub mod topology;
pub mod workload;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Cni(#[from] kubelet::CniCallError),
    #[error("pod {pod}: cannot start its workload: {source}")]
    Workload { pod: String, source: std::io::Error },
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
}
