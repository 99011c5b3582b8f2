//! Integration tests of the agent, in one binary (one link step on a 2-core machine).
//!
//! The namespace tests need root and fail loudly without it (testkit's `require_root`); they
//! never touch the root network namespace: every link, address and route lives in namespaces
//! made here, which Drop guards delete, also after a failure.

mod agent_run;
mod cni_install;
mod reaper;
mod routing;
mod status;
mod topology;
