//! Integration tests: the built `fairlead-cni` binary driven through env and
//! stdin inside throwaway node and pod namespaces (never the root namespace).
//! They need root; without it they fail, they never skip.

mod errors;
mod handoff;
mod harness;
mod mesh;
mod storm;
mod traffic;
mod verbs;
