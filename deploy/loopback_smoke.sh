#!/usr/bin/env bash
# Smoke test of a real Flower deployment on loopback: TLS SuperLink with SuperNode authentication, one
# authenticated SuperNode per client of CONFIG, each reading its own client folder, `flwr run` of fednl's app,
# the isolation check, then everything is torn down.
#
#   deploy/loopback_smoke.sh CONFIG OUT_DIR [--data DIR] [--set key=value ...]
#
# CONFIG is a fednl TOML (or preset); OUT_DIR receives the run (results.json, metrics.jsonl, flower.json,
# isolation.json, ...) and OUT_DIR/loopback/ the deployment files (certs, node keys, Flower home, logs, each node's
# client state). SuperNode i serves DIR/partition-i (written by `fednl flower split-data`); without --data the
# script splits CONFIG's task into OUT_DIR/loopback/data first. The ServerApp never reads any data.
# It also starts one SuperNode with an *unregistered* key and checks that the SuperLink refuses it, and runs
# deploy/isolation: every SuperNode must refuse to train another client's data.
#
# Needs on PATH: fednl, flwr, flower-superlink, flower-supernode (the virtualenv's bin/), openssl, ssh-keygen.
# Environment: LINK_PORT (default: a free port), RUN_TIMEOUT_S (default 900), KEEP_RUNNING=1 (skip teardown).
# Every process it starts gets its own process group, listed in OUT_DIR/loopback/pgids; they are stopped on
# exit, on error and on SIGINT/SIGTERM (SIGTERM, then SIGKILL after 10 s).
set -euo pipefail

usage() { echo "usage: $0 CONFIG OUT_DIR [--data DIR] [--set key=value ...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
config=$1; out=$2; shift 2
sets=()
data=
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || usage
  case $1 in
    --set) sets+=(--set "$2") ;;
    --data) data=$(cd "$2" && pwd) || { echo "error: --data $2 is not a folder" >&2; exit 2; } ;;
    *) usage ;;
  esac
  shift 2
done
for tool in fednl flwr flower-superlink flower-supernode openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found on PATH (activate the fednl virtualenv)" >&2; exit 2; }
done
[[ -e $out/flower.json ]] && { echo "error: $out already holds a run; use a new OUT_DIR" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=$(dirname "$(command -v fednl)")/python
[[ -x $py ]] || py=python3
[[ -f $config ]] && config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$out/loopback
mkdir -p "$work/logs"

export FLWR_HOME=$work/flwr-home
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=${LINK_PORT:-$(free_port)}
conn=fednl-loopback
pgids=$work/pgids
: > "$pgids"

# ------------------------------------------------------------------------------------------- teardown
stop_all() {
  [[ ${KEEP_RUNNING:-0} == 1 ]] && { echo "KEEP_RUNNING=1: leaving process groups $(tr '\n' ' ' < "$pgids")"; return; }
  local g alive
  while read -r g; do kill -TERM -- "-$g" 2>/dev/null || true; done < "$pgids"
  for _ in $(seq 1 20); do
    alive=0
    while read -r g; do kill -0 -- "-$g" 2>/dev/null && alive=1; done < "$pgids"
    [[ $alive == 0 ]] && break
    sleep 0.5
  done
  while read -r g; do kill -KILL -- "-$g" 2>/dev/null || true; done < "$pgids"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start NAME CMD...: in its own session/process group, output to logs/NAME.log
  local name=$1; shift
  setsid "$@" > "$work/logs/$name.log" 2>&1 < /dev/null &
  echo $! >> "$pgids"
}

# ------------------------------------------------------------------------------------------- 1. files
if [[ -z $data ]]; then
  data=$work/data
  fednl flower split-data "$config" --out "$data" "${sets[@]}" > "$work/data.txt"
fi
n=$(find "$data" -maxdepth 1 -name 'partition-*' -type d | wc -l)
[[ $n -ge 1 ]] || { echo "error: no partition-<i> client folders in $data" >&2; exit 2; }
echo "== $n client folders in $data -> $n SuperNodes; SuperLink on 127.0.0.1:$port; files in $work"
"$here/make_certs.sh" "$work/certs" IP:127.0.0.1 > /dev/null
names=(); for ((i = 0; i < n; i++)); do names+=("node$i"); done
"$here/make_node_keys.sh" "$work/keys" "${names[@]}" intruder > /dev/null
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$conn"

[superlink.$conn]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.pem"
EOF
fednl flower run-config "$config" --out "$out" "${sets[@]}" > "$work/run.toml"

# ------------------------------------------------------------------------------------------- 2. SuperLink
t_start=$(date +%s)
start superlink flower-superlink --ssl-certfile "$work/certs/server.pem" --ssl-keyfile "$work/certs/server.key" \
  --ssl-ca-certfile "$work/certs/ca.pem" --enable-supernode-auth --host 127.0.0.1 --port "$port" \
  --disable-runtime-dependency-installation

# ------------------------------------------------------------------------------------------- 3. register keys
registered=0
for _ in $(seq 1 120); do
  if flwr supernode register "$work/keys/node0.pub" "$conn" > "$work/logs/register-node0.log" 2>&1; then
    registered=1; break
  fi
  sleep 0.5
done
[[ $registered == 1 ]] || { echo "error: could not register node0 (SuperLink up?)" >&2; cat "$work/logs/register-node0.log" "$work/logs/superlink.log" >&2; exit 1; }
for ((i = 1; i < n; i++)); do
  flwr supernode register "$work/keys/node$i.pub" "$conn" > "$work/logs/register-node$i.log" 2>&1 \
    || { echo "error: could not register node$i" >&2; cat "$work/logs/register-node$i.log" >&2; exit 1; }
done
echo "== registered $n SuperNode keys (the intruder key is not registered)"

# ------------------------------------------------------------------------------------------- 4. SuperNodes
for ((i = 0; i < n; i++)); do
  start "supernode$i" flower-supernode --root-certificates "$work/certs/ca.pem" \
    --auth-supernode-private-key "$work/keys/node$i" --superlink "127.0.0.1:$port" --port "$(free_port)" \
    --node-config "partition-id=$i num-partitions=$n state-dir=\"$work/node-state-$i\" data-dir=\"$data/partition-$i\""
done
start intruder flower-supernode --root-certificates "$work/certs/ca.pem" \
  --auth-supernode-private-key "$work/keys/intruder" --superlink "127.0.0.1:$port" --port "$(free_port)" \
  --node-config "partition-id=0 num-partitions=$n state-dir=\"$work/node-state-intruder\" data-dir=\"$data/partition-0\"" \
  --max-retries 0

# ------------------------------------------------------------------------------------------- 5. run
t_run=$(date +%s)
set +e
timeout "${RUN_TIMEOUT_S:-900}" flwr run "$here" "$conn" --stream --run-config "$work/run.toml" > "$work/logs/run.log" 2>&1
rc=$?
iso_rc=-1
if [[ $rc == 0 ]]; then  # the isolation check: every node must refuse to train another client's data
  timeout "${RUN_TIMEOUT_S:-900}" flwr run "$here/isolation" "$conn" --stream --run-config "$work/run.toml" \
    > "$work/logs/isolation.log" 2>&1
  iso_rc=$?
fi
set -e
t_end=$(date +%s)

# ------------------------------------------------------------------------------------------- 6. checks
intruder_pgid=$(tail -n 1 "$pgids")
refused=0
for _ in $(seq 1 60); do
  if ! kill -0 -- "-$intruder_pgid" 2>/dev/null; then break; fi
  sleep 0.5
done
grep -q "Failed to activate SuperNode" "$work/logs/intruder.log" && refused=1
printf '{"refused": %s, "log": "%s"}\n' "$([[ $refused == 1 ]] && echo true || echo false)" \
  "$work/logs/intruder.log" > "$work/intruder.json"
printf '{"startup_s": %s, "run_s": %s, "flwr_run_rc": %s, "isolation_rc": %s}\n' "$((t_run - t_start))" \
  "$((t_end - t_run))" "$rc" "$iso_rc" > "$work/timing.json"

if [[ $rc != 0 || ! -f $out/results.json ]]; then
  echo "error: flwr run failed (rc=$rc); last lines of $work/logs/run.log:" >&2
  tail -n 40 "$work/logs/run.log" >&2
  exit 1
fi
[[ $refused == 1 ]] || { echo "error: the SuperNode with an unregistered key was not refused (see $work/logs/intruder.log)" >&2; exit 1; }
if [[ $iso_rc != 0 || ! -f $out/isolation.json ]]; then
  echo "error: the isolation check failed (rc=$iso_rc); last lines of $work/logs/isolation.log:" >&2
  tail -n 40 "$work/logs/isolation.log" >&2
  exit 1
fi
"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = json.loads((out / "results.json").read_text())
fl = json.loads((out / "flower.json").read_text())
print(f"== ok: {res['method']} {res['rounds']} rounds, mean {res['mean']}")
print(f"   ledger bytes up {res['comm']['bytes_up']} down {res['comm']['bytes_down']}; "
      f"hop payload up {fl['hop_bytes']['train_up']['payload']} down {fl['hop_bytes']['train_down']['payload']}")
iso = json.loads((out / "isolation.json").read_text())
assert iso["nodes"] >= 2 and iso["refused"] == iso["nodes"], iso
print("   unregistered SuperNode refused: yes")
print(f"   isolation: {iso['refused']} of {iso['nodes']} SuperNodes refused another client's data")
EOF
echo "== results in $out; deployment logs in $work/logs (stopping everything)"
