#!/usr/bin/env bash
# Create a private CA and a SuperLink TLS certificate signed by it.
#
#   deploy/make_certs.sh OUT_DIR [SAN ...]
#
# SAN entries are openssl subjectAltName items; default "IP:127.0.0.1" (loopback smoke test). For a real
# SuperLink pass every name/address the SuperNodes and the `flwr` CLI will dial, e.g.
#   deploy/make_certs.sh certs IP:10.0.0.5 DNS:superlink.lab.example.org
# Writes OUT_DIR/{ca.pem, ca.key, server.pem, server.key}. Copy only ca.pem to SuperNodes and CLI machines;
# ca.key and server.key never leave the SuperLink machine. Refuses to overwrite an existing CA.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [SAN ...]   (SAN like IP:127.0.0.1 or DNS:host.example.org)" >&2
  exit 2
fi
out=$1; shift
sans=("$@")
[[ ${#sans[@]} -eq 0 ]] && sans=("IP:127.0.0.1")
for s in "${sans[@]}"; do
  [[ $s == IP:* || $s == DNS:* ]] || { echo "error: SAN '$s' must start with IP: or DNS:" >&2; exit 2; }
done
if [[ -e $out/ca.pem ]]; then
  echo "error: $out/ca.pem exists; refusing to overwrite a CA (use a new directory)" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "error: openssl not found on PATH" >&2; exit 2; }

mkdir -p "$out"
umask 077
san_list=$(IFS=,; echo "${sans[*]}")
tmp=$(mktemp -d "$out/.certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# CA (ECDSA P-256: fast to generate, accepted by Python's ssl on both ends)
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days 825 -subj "/CN=fednl-flower-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.pem"

# SuperLink server certificate with the SANs
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/server.key"
openssl req -new -key "$tmp/server.key" -subj "/CN=fednl-superlink" -out "$tmp/server.csr"
cat > "$tmp/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san_list
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null
openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" >/dev/null

chmod 644 "$tmp/ca.pem" "$tmp/server.pem"
for f in ca.pem ca.key server.pem server.key; do mv "$tmp/$f" "$out/$f"; done
echo "wrote $out/ca.pem $out/server.pem (SAN: $san_list) and their keys"
