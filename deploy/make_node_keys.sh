#!/usr/bin/env bash
# Create SuperNode authentication keys: ECDSA (P-384) key pairs in OpenSSH format, as Flower requires.
#
#   deploy/make_node_keys.sh OUT_DIR NAME [NAME ...]
#
# Writes OUT_DIR/NAME (private key, stays on that SuperNode) and OUT_DIR/NAME.pub (public key, registered on
# the SuperLink with `flwr supernode register NAME.pub <connection>`). Refuses to overwrite a key.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 OUT_DIR NAME [NAME ...]" >&2
  exit 2
fi
out=$1; shift
command -v ssh-keygen >/dev/null || { echo "error: ssh-keygen not found on PATH" >&2; exit 2; }
mkdir -p "$out"
for name in "$@"; do
  [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: key name '$name' may use only letters, digits, . _ -" >&2; exit 2; }
  if [[ -e $out/$name || -e $out/$name.pub ]]; then
    echo "error: $out/$name exists; refusing to overwrite a node key" >&2
    exit 2
  fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fednl-$name" -f "$out/$name"
  echo "wrote $out/$name and $out/$name.pub"
done
