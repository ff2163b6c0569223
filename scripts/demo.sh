#!/usr/bin/env bash
# make demo: the config pipeline end to end, in a throw-away directory.
#   gen secrets -> gen config with a patch -> validate -> regenerate byte-identically
#   -> a broken patch is refused with every error named, and nothing is written.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
basaltctl="$here/.venv/bin/basaltctl"
work=$(mktemp -d -t basalt-demo.XXXXXX)
export BASALTCONFIG="$work/client-config"
fleet_pid=
cleanup() {
  if [ -f "$work/cluster/cluster.json" ]; then
    "$basaltctl" cluster destroy --name demo --state-dir "$work/cluster" >/dev/null 2>&1 || true
  fi
  if [ -f "$work/pool/cluster.json" ]; then
    "$basaltctl" cluster destroy --name pool --state-dir "$work/pool" >/dev/null 2>&1 || true
  fi
  if [ -n "$fleet_pid" ]; then kill "$fleet_pid" 2>/dev/null || true; wait "$fleet_pid" 2>/dev/null || true; fi
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

step "15. Basalt Fleet: the open fleet manager, on its embedded SQLite (127.0.0.20:18443)"
"$here/.venv/bin/basalt-fleet" serve --data-dir "$work/fleet" --listen 127.0.0.20:18443 \
  > "$work/fleet.log" 2>&1 &
fleet_pid=$!
for _ in $(seq 1 100); do [ -f "$work/fleet/admin-token" ] && break; sleep 0.2; done
sleep 1
show "$basaltctl" fleet login https://127.0.0.20:18443 \
  --token-file "$work/fleet/admin-token" --ca "$work/fleet/ca.crt"

step "16. One join token for three machines; they boot in maintenance mode and dial out"
url=$("$basaltctl" fleet token create --uses 3 --label site=demo)
redacted="${url%%token=*}token=***&ca=${url##*&ca=}"
echo "$ basaltctl cluster machines --name pool --count 3 --fleet '$redacted' ..."
"$basaltctl" cluster machines --name pool --count 3 --fleet "$url" \
  --state-dir "$work/pool" --base-address 127.0.0.21
for _ in $(seq 1 60); do
  [ "$("$basaltctl" fleet machines | grep -c ' up ')" -ge 3 ] && break; sleep 0.5
done
show "$basaltctl" fleet machines

step "17. A cluster template, kept in Git: 1 control plane, 1 worker with a patch"
cat > fleet-cluster.yaml <<'YAML'
apiVersion: fleet.basalt.dev/v1alpha1
kind: Cluster
name: edge
versionContract: "0.1"
controlPlane:
  count: 1
  machineSelector: {site: demo}
workers:
  - name: default
    count: 1
    patches:
      - {kind: SysctlConfig, sysctls: {vm.max_map_count: "262144"}}
YAML
cat fleet-cluster.yaml
show "$basaltctl" fleet apply -f fleet-cluster.yaml --dry-run
show "$basaltctl" fleet apply -f fleet-cluster.yaml
show "$basaltctl" fleet status edge

step "18. A change behind the fleet's back is caught by fleet diff (exit 2)"
"$basaltctl" fleet basaltconfig edge -o edge.basaltconfig
worker_addr=$("$basaltctl" fleet status edge | awk '$2 ~ /^worker/ {print $4}')
show "$basaltctl" --basaltconfig edge.basaltconfig patch machineconfig -n "$worker_addr" \
  -p '{kind: SysctlConfig, sysctls: {net.core.somaxconn: "4096"}}'
set +e
show "$basaltctl" fleet diff edge
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "expected fleet diff to exit 2, got $rc"; exit 1; }
echo "-> applying the template again brings the node back"
"$basaltctl" fleet apply -f fleet-cluster.yaml >/dev/null 2>&1
show "$basaltctl" fleet diff edge

step "19. No lock-in: export, regenerate with gen config, byte-identical"
show "$basaltctl" fleet export edge -o edge-export
(cd edge-export && PATH="$here/.venv/bin:$PATH" sh regenerate.sh >/dev/null 2>&1)
while IFS=$'\t' read -r host _uuid role _addr digest; do
  got=$(sha256sum "edge-export/configs/$host.yaml" | cut -d' ' -f1)
  [ "$got" = "$digest" ] || { echo "$host: regenerated config differs"; exit 1; }
  echo "$host ($role): gen config output is what the fleet applied (${digest:0:16}…)"
done < edge-export/nodes.txt

step "20. The audit log: hash-chained"
show "$basaltctl" fleet audit
show "$basaltctl" fleet audit --verify

step "21. The web UI: https://127.0.0.20:18443/ui/ (log in with a password or an API token)"
# What a browser does, in a few lines: log in with the admin's token, read the cluster's page.
"$here/.venv/bin/python" - "$work/fleet" <<'PY'
import http.cookiejar, re, ssl, sys, urllib.parse, urllib.request
data_dir = sys.argv[1]
tls = ssl.create_default_context(cafile=f"{data_dir}/ca.crt")
jar = http.cookiejar.CookieJar()
web = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls),
                                  urllib.request.HTTPCookieProcessor(jar))
token = open(f"{data_dir}/admin-token").read().strip()
base = "https://127.0.0.20:18443"
web.open(base + "/ui/login", urllib.parse.urlencode({"token": token}).encode())
page = web.open(base + "/ui/clusters/edge").read().decode()
status = re.search(r'id="cluster-status" data-status="([a-z]+)"', page)
nodes = len(re.findall(r'<tr id="n-', page))
print(f"GET /ui/clusters/edge as admin: status {status[1] if status else '?'}, {nodes} nodes "
      f"({len(page):,} bytes of HTML; live parts follow the fleet over server-sent events)")
PY

step "22. Tear down the fleet's machines and the fleet"
show "$basaltctl" cluster destroy --name pool --state-dir "$work/pool"
kill "$fleet_pid"; wait "$fleet_pid" 2>/dev/null || true; fleet_pid=

printf '\n\033[1mdemo finished\033[0m\n'
