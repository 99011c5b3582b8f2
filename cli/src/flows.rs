//! `fairlead flows`: the datapath's flow events (NetworkPolicy verdicts) from every node's
//! agent, filtered by pod, namespace and verdict, printed one per line (or as JSON); with
//! `--follow`, new ones as they come.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(clap::Args, Debug, Clone)]
pub struct FlowsArgs {
    /// Read the agents of this sandbox.
    #[arg(long, default_value = "default")]
    name: String,
    /// Read one agent's socket instead (a real node: /run/fairlead/agent.sock).
    #[arg(long)]
    socket: Vec<PathBuf>,
    /// Only flows of this pod (`namespace/name`), as either side.
    #[arg(long)]
    pod: Option<String>,
    /// Only flows with a pod of this namespace on either side.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Only this verdict: forwarded or dropped.
    #[arg(long, value_parser = ["forwarded", "dropped"])]
    verdict: Option<String>,
    /// Keep printing new flows until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

impl FlowsArgs {
    fn keep(&self, flow: &Value) -> bool {
        let names = [&flow["pod"]["name"], &flow["peer"]["name"]];
        if let Some(pod) = &self.pod {
            if !names.iter().any(|n| n.as_str() == Some(pod)) {
                return false;
            }
        }
        if let Some(ns) = &self.namespace {
            let prefix = format!("{ns}/");
            if !names
                .iter()
                .any(|n| n.as_str().is_some_and(|n| n.starts_with(&prefix)))
            {
                return false;
            }
        }
        if let Some(v) = &self.verdict {
            if !flow["verdict"]
                .as_str()
                .is_some_and(|x| x.eq_ignore_ascii_case(v))
            {
                return false;
            }
        }
        true
    }
}

fn side(v: &Value) -> String {
    let addr = v["address"].as_str().unwrap_or("?");
    match v["name"].as_str() {
        Some(name) => format!("{name} ({addr})"),
        None => addr.to_owned(),
    }
}

/// One flow as a line: `TIME NODE POD <- PEER PROTO ingress VERDICT [reason] [policy]`.
fn line(flow: &Value) -> String {
    let arrow = if flow["direction"] == "ingress" {
        "<-"
    } else {
        "->"
    };
    let mut out = format!(
        "{} {} {} {arrow} {} {} {} {}",
        flow["time"].as_str().unwrap_or(""),
        flow["node"].as_str().unwrap_or(""),
        side(&flow["pod"]),
        side(&flow["peer"]),
        flow["protocol"].as_str().unwrap_or(""),
        flow["direction"].as_str().unwrap_or(""),
        flow["verdict"].as_str().unwrap_or(""),
    );
    if let Some(r) = flow["reason"].as_str() {
        out += &format!(" ({r})");
    }
    if let Some(p) = flow["policy"].as_str() {
        out += &format!(" by {p}");
    }
    out
}

pub async fn run(args: FlowsArgs, sandbox_state: PathBuf) -> anyhow::Result<()> {
    let sockets = if args.socket.is_empty() {
        let nodes = sandbox_state.join("nodes");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&nodes)
            .with_context(|| {
                format!(
                    "no sandbox {:?} is running ({} not found); start one with `fairlead sandbox up`, or pass --socket",
                    args.name,
                    nodes.display()
                )
            })?
            .flatten()
            .map(|e| e.path().join("run/fairlead/agent.sock"))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        found
    } else {
        args.socket.clone()
    };
    if sockets.is_empty() {
        bail!("no agent socket found");
    }
    let request = if args.follow {
        "FLOWS follow\n"
    } else {
        "FLOWS\n"
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<String>>(1024);
    for socket in sockets {
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = async {
                let mut stream = tokio::net::UnixStream::connect(&socket)
                    .await
                    .with_context(|| format!("cannot reach the agent at {}", socket.display()))?;
                stream.write_all(request.as_bytes()).await?;
                let mut lines = BufReader::new(stream).lines();
                while let Some(l) = lines.next_line().await? {
                    if tx.send(Ok(l)).await.is_err() {
                        break;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);
    let mut stdout = std::io::stdout().lock();
    while let Some(item) = rx.recv().await {
        let l = item?;
        if let Some(err) = l.strip_prefix("ERROR ") {
            bail!("agent: {err}");
        }
        let Ok(flow) = serde_json::from_str::<Value>(&l) else {
            continue;
        };
        if flow.get("lost").is_some() {
            writeln!(stdout, "... {} flows lost (reader too slow)", flow["lost"])?;
            continue;
        }
        if !args.keep(&flow) {
            continue;
        }
        if args.json {
            writeln!(stdout, "{l}")?;
        } else {
            writeln!(stdout, "{}", line(&flow))?;
        }
    }
    Ok(())
}

impl FlowsArgs {
    pub fn sandbox(&self) -> &str {
        &self.name
    }
}
