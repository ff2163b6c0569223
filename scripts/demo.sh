#!/usr/bin/env bash
# make demo: the config pipeline end to end, in a throw-away directory.
#   gen secrets -> gen config with a patch -> validate -> regenerate byte-identically
#   -> a broken patch is refused with every error named, and nothing is written.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
basaltctl="$here/.venv/bin/basaltctl"
work=$(mktemp -d -t basalt-demo.XXXXXX)
export BASALTCONFIG="$work/client-config"
cleanup() {
  if [ -f "$work/cluster/cluster.json" ]; then
    "$basaltctl" cluster destroy --name demo --state-dir "$work/cluster" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "1. A secrets bundle: the one long-lived secret input"
show "$basaltctl" gen secrets -o secrets.yaml

step "2. A patch kept in Git next to the secrets"
cat > node-patch.yaml <<'YAML'
apiVersion: basalt.dev/v1alpha1
kind: ClusterConfig
network:
  podSubnets: [10.32.0.0/16]      # replaces the contract default
---
apiVersion: basalt.dev/v1alpha1
kind: SysctlConfig
sysctls:
  net.ipv4.ip_forward: "1"
---
apiVersion: basalt.dev/v1alpha1
kind: TimeSyncConfig
servers: [time.example.net]
YAML
cat node-patch.yaml

step "3. Generate configs pinned to version contract 0.1"
show "$basaltctl" gen config demo https://127.0.0.11:6443 --with-secrets secrets.yaml \
  --version-contract 0.1 --install-disk /dev/vda --config-patch @node-patch.yaml -o gen1
sed -n '1,6p' gen1/controlplane.yaml
echo "  ..."
grep -n 'PRIVATE KEY' gen1/worker.yaml >/dev/null && { echo "worker holds a private key!"; exit 1; }
echo "worker.yaml holds no private key"

step "4. Validate for metal and for container mode"
show "$basaltctl" validate -c gen1/controlplane.yaml --mode metal
show "$basaltctl" validate -c gen1/worker.yaml --mode container

step "5. Regenerate from the same inputs: byte-identical"
"$basaltctl" gen config demo https://127.0.0.11:6443 --with-secrets secrets.yaml \
  --version-contract 0.1 --install-disk /dev/vda --config-patch @node-patch.yaml -o gen2 2>/dev/null
for f in controlplane.yaml worker.yaml; do
  cmp "gen1/$f" "gen2/$f"
  echo "$f  $(sha256sum "gen1/$f" | cut -c1-16)…  identical"
done

step "6. Patch a config offline"
show "$basaltctl" machineconfig patch gen1/worker.yaml \
  --patch '{apiVersion: basalt.dev/v1alpha1, kind: HostnameConfig, hostname: worker-1}' \
  -o worker-1.yaml
tail -4 worker-1.yaml

step "7. A broken patch: every error named, nothing written"
cat > broken.yaml <<'YAML'
apiVersion: basalt.dev/v1alpha1
kind: ClusterConfig
network:
  podSubnets: [10.96.0.0/16, 10.244.0.1/16]
  dnsDomian: cluster.local
---
apiVersion: basalt.dev/v1alpha1
kind: LinkConfig
name: eth0
addresses: [192.0.2.300/24]
mtu: 20
YAML
cat broken.yaml
set +e
"$basaltctl" gen config demo https://127.0.0.11:6443 --with-secrets secrets.yaml \
  --version-contract 0.1 --config-patch @broken.yaml -o gen3
rc=$?
set -e
[ "$rc" -eq 1 ] || { echo "expected exit 1, got $rc"; exit 1; }
[ ! -e gen3 ] || { echo "gen3 was written despite the error"; exit 1; }
echo "exit $rc; gen3/ was not created"

step "8. The client config"
show "$basaltctl" --basaltconfig gen1/basaltconfig config contexts
show "$basaltctl" --basaltconfig gen1/basaltconfig config info

step "9. A local cluster: 1 control plane + 1 worker, as processes on 127.0.0.11-12"
show "$basaltctl" cluster create --name demo --controlplanes 1 --workers 1 \
  --state-dir "$work/cluster" --base-address 127.0.0.11
cp=127.0.0.11
worker=127.0.0.12

step "10. One endpoint, many nodes: members, services, logs, etcd"
show "$basaltctl" get members
show "$basaltctl" etcd members
show "$basaltctl" services -n $cp,$worker
show "$basaltctl" logs apid -n $worker --tail 2
show "$basaltctl" health -n $cp,$worker

step "11. A change, previewed: dry run prints the diff and the mode"
cat > sysctl-patch.yaml <<'YAML'
apiVersion: basalt.dev/v1alpha1
kind: HostnameConfig
hostname: demo-worker-renamed
YAML
show "$basaltctl" patch machineconfig -n $worker -p @sysctl-patch.yaml --dry-run

step "12. ... and applied without a reboot"
show "$basaltctl" patch machineconfig -n $worker -p @sysctl-patch.yaml
show "$basaltctl" get hostname -n $worker

step "13. A change that needs a reboot is refused in no-reboot mode"
set +e
"$basaltctl" patch machineconfig -n $worker --mode no-reboot \
  -p '{apiVersion: basalt.dev/v1alpha1, kind: ClusterConfig, network: {podSubnets: [10.50.0.0/16]}}'
rc=$?
set -e
[ "$rc" -eq 1 ] || { echo "expected exit 1, got $rc"; exit 1; }

step "14. Tear down"
show "$basaltctl" cluster destroy --name demo --state-dir "$work/cluster"

printf '\n\033[1mdemo finished\033[0m\n'
