//! Fairlead's eBPF Service load balancing as a `lb_scale` peer: the agent's
//! own code path (`fairlead_ebpf::lb::Lb`, `ServiceTable`) with the tc
//! programs on the router's client-facing veth, which plays a pod's host-side
//! veth: tcx ingress (`lb_from_pod`) translates the client's packets to a
//! backend, tcx egress (`lb_to_pod`) reverse-translates the replies. The
//! router's netfilter tables stay empty. Socket-level balancing is not in
//! play here (the client is not in a cgroup the programs are attached to), so
//! this is the per-packet path, the slower of the two.

use std::net::IpAddr;

use anyhow::{Context, Result};
use fairlead_ebpf::lb::{BackendAddr, Frontend, FrontendKey, Lb, Persistence, Proto, Scope};

use crate::datapath::{Datapath, Router, Svc};

struct Fairlead {
    lb: Option<Lb>,
}

/// The harness's constructor for the `fairlead` peer (untimed: load, verify,
/// attach).
pub fn new(router: &Router) -> Result<Option<Box<dyn Datapath>>> {
    let mut lb = Lb::load(
        &fairlead_testkit::unique_instance(),
        Persistence::RemoveOnDrop,
    )
    .context("loading the load-balancing programs")?;
    lb.attach_pod(&router.netns_path, &router.client_if)
        .with_context(|| format!("attaching to {} in the router", router.client_if))?;
    Ok(Some(Box::new(Fairlead { lb: Some(lb) })))
}

/// The frontend the agent would compile for this bench Service.
fn frontend(svc: &Svc) -> Frontend {
    Frontend {
        key: FrontendKey {
            addr: IpAddr::V4(svc.cluster_ip),
            port: svc.port,
            proto: Proto::Tcp,
            scope: Scope::Internal,
        },
        node: false,
        local_policy: false,
        affinity_timeout_s: None,
        maglev: false,
        backends: svc
            .endpoints
            .iter()
            .map(|e| BackendAddr {
                addr: IpAddr::V4(*e.ip()),
                port: e.port(),
                local: true,
            })
            .collect(),
    }
}

fn owner(svc: &Svc) -> String {
    format!("{}/{}", svc.namespace, svc.name)
}

impl Fairlead {
    fn lb(&mut self) -> Result<&mut Lb> {
        self.lb.as_mut().context("already cleaned up")
    }
}

impl Datapath for Fairlead {
    fn name(&self) -> &str {
        "fairlead"
    }

    fn program(&mut self, services: &[Svc]) -> Result<()> {
        let lb = self.lb()?;
        for svc in services {
            lb.set_service(&owner(svc), vec![frontend(svc)])?;
        }
        Ok(())
    }

    fn change_one(&mut self, _index: usize, _old: &Svc, new: &Svc) -> Result<()> {
        self.lb()?.set_service(&owner(new), vec![frontend(new)])?;
        Ok(())
    }

    fn cleanup(&mut self) -> Result<()> {
        if let Some(lb) = self.lb.take() {
            lb.destroy()?;
        }
        Ok(())
    }
}
