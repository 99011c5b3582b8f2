#!/usr/bin/env bash
# Installs what Fairlead needs to build and test on a fresh Debian 12 machine,
# and does nothing (quickly) when it is all there already:
#   - Debian's rustc-web/cargo-web 1.96 with the prebuilt core for
#     bpfel-unknown-none (the eBPF programs build with these, not rustup's),
#   - LLVM 22 to build bpf-linker against, and bpf-linker 0.13.0 itself,
#   - iproute2 for the test network namespaces, curl and python3-grpcio for the mesh
#     tests' HTTP/2 and gRPC clients,
#   - Go with sprig and yaml.v3 to render the Helm chart in tests (charts/render).
# Needs root (apt-get). Prints one line per step it had to take.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
PACKAGES=(rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 build-essential pkg-config iputils-ping curl util-linux containernetworking-plugins podman runc busybox-static python3 python3-grpcio nftables golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup: installing $1 needs root; run as root (e.g. sudo $0)" >&2
        exit 1
    fi
}

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
# rustc-web must be the 1.96 from bookworm-security, not bookworm's 1.85.
if [ ${#missing[@]} -eq 0 ] && ! /usr/bin/rustc --version 2>/dev/null | grep -q '^rustc 1\.9[6-9]'; then
    missing+=(rustc-web cargo-web libstd-rust-web-dev-bpf)
fi
if [ ${#missing[@]} -gt 0 ]; then
    need_root "Debian packages (${missing[*]})"
    echo "setup: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "setup: no rustup toolchain found (cargo); install rustup's stable toolchain first" >&2
        exit 1
    fi
fi

linker="$HOME/.cargo/bin/bpf-linker"
if ! { [ -x "$linker" ] && "$linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; }; then
    echo "setup: cargo install bpf-linker@$BPF_LINKER_VERSION (against LLVM 22; takes a few minutes once)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked --quiet "bpf-linker@$BPF_LINKER_VERSION" \
        --no-default-features --features llvm-22
fi
