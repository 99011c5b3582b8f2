//! Every way an invocation can fail, and the CNI error code each maps to.

use std::{io, path::PathBuf};

use crate::{
    config::ConfigError,
    env::{Command, EnvError},
    ipam::IpamError,
    netlink::NetlinkError,
    netns::NetnsError,
    teardown::TeardownError,
};

/// Plugin-specific codes (the spec leaves 100 and up to plugins).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// ADD for a (container, ifname) that is already attached.
    pub const ALREADY_ATTACHED: u32 = 100;
    /// The node's PodCIDR has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 101;
    /// CHECK found the attachment different from its ADD result.
    pub const CHECK_FAILED: u32 = 102;
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(transparent)]
    Env(#[from] EnvError),

    #[error(transparent)]
    Ipam(#[from] IpamError),

    #[error(transparent)]
    Netns(#[from] NetnsError),

    #[error(transparent)]
    Netlink(#[from] NetlinkError),

    #[error(transparent)]
    Teardown(#[from] TeardownError),

    #[error("cannot read the network config from stdin: {source}")]
    Stdin { source: io::Error },

    #[error("cannot set sysctl {path} in the node namespace: {source}")]
    Sysctl { path: String, source: io::Error },

    #[error("{command} is not part of CNI {version}; the config must ask for cniVersion 1.1.0")]
    VerbNotInVersion {
        command: Command,
        version: &'static str,
    },

    #[error("interface {name} already exists {place}; DEL the old attachment first")]
    AlreadyExists { name: String, place: String },

    #[error(
        "interface {name} vanished from {place} right after it was created; is something \
         else deleting interfaces there?"
    )]
    Vanished { name: String, place: String },

    #[error("CHECK failed: {0}")]
    Check(String),

    #[error(
        "the Fairlead agent is not available at {socket}: {reason}; is the fairlead agent \
         running on this node?",
        socket = .socket.display()
    )]
    AgentUnavailable { socket: PathBuf, reason: String },

    #[error(
        "the Fairlead agent at {socket} could not attach its datapath to {ifname}: {reason}; \
         the pod would run without Service load balancing, so it is not started",
        socket = .socket.display()
    )]
    Datapath {
        socket: PathBuf,
        ifname: String,
        reason: String,
    },

    #[error(
        "the pod asks for the mesh (fairlead.io/inject), but its interception rules could \
         not be installed in {netns}: {reason}; it would bypass its sidecar, so it is not \
         started"
    )]
    Mesh { netns: String, reason: String },

    /// A failure whose rollback did not complete: the notes say what is left.
    #[error("{error}; rollback incomplete: {notes}")]
    RollbackIncomplete {
        error: Box<PluginError>,
        notes: String,
    },
}

impl PluginError {
    pub fn code(&self) -> u32 {
        use code::*;
        match self {
            PluginError::Config(e) => match e {
                ConfigError::Decode { .. } => DECODE,
                ConfigError::IncompatibleVersion { .. } => INCOMPATIBLE_VERSION,
                ConfigError::Unsupported { .. } => UNSUPPORTED_FIELD,
                ConfigError::Invalid { .. } => INVALID_CONFIG,
            },
            PluginError::Env(_) => INVALID_ENV,
            PluginError::Ipam(e) => match e {
                IpamError::LockTimeout { .. } => TRY_AGAIN_LATER,
                IpamError::Io { .. } => IO_FAILURE,
                IpamError::AlreadyAllocated { .. } => ALREADY_ATTACHED,
                IpamError::Exhausted { .. } => ADDRESSES_EXHAUSTED,
            },
            PluginError::Netns(e) => match e {
                NetnsError::NotFound { .. } => UNKNOWN_CONTAINER,
                // CNI_NETNS names something that is not a network namespace.
                NetnsError::Enter { .. } => INVALID_ENV,
                NetnsError::Open { .. } | NetnsError::Netlink { .. } => IO_FAILURE,
            },
            PluginError::Netlink(_)
            | PluginError::Stdin { .. }
            | PluginError::Sysctl { .. }
            | PluginError::Vanished { .. } => IO_FAILURE,
            PluginError::Teardown(e) => match e {
                TeardownError::Netlink(_) => IO_FAILURE,
            },
            PluginError::VerbNotInVersion { .. } => INCOMPATIBLE_VERSION,
            PluginError::AlreadyExists { .. } => ALREADY_ATTACHED,
            PluginError::Check(_) => CHECK_FAILED,
            PluginError::AgentUnavailable { .. } | PluginError::Datapath { .. } => NOT_AVAILABLE,
            PluginError::Mesh { .. } => IO_FAILURE,
            PluginError::RollbackIncomplete { error, .. } => error.code(),
        }
    }
}
