#!/usr/bin/env bash
# Makes (or completes) the vigil PKI on an admin's machine and prints the two
# Secrets the manifests mount, as YAML for `kubectl apply -f -`:
#
#     deploy/kubernetes/make-pki-secrets.sh PKI_DIR [NODE...] | kubectl apply -f -
#
# NODE...: the agents' names, i.e. the nodes' names (the DaemonSet passes
# --agent-name $(NODE_NAME)); default: every node `kubectl get nodes` lists.
# Run it again with new nodes to add their certificates: existing ones are
# kept (init-pki is idempotent) and the agents' Secret is rewritten whole.
#
#   vigil-collector-pki  ca.pem server.pem server.key   (the collector)
#   vigil-agent-pki      ca.pem NODE.pem NODE.key ...    (every agent pod)
#
# PKI_DIR keeps ca.key, which never goes into the cluster: keep it offline.
# The server certificate names the collector's Service
# (vigil-collector.vigil.svc and its longer forms) besides localhost.
# Needs `vigil-collector` (or VIGIL_COLLECTOR=/path/to/it) and kubectl
# (offline: `kubectl create secret --dry-run=client`).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 PKI_DIR [NODE...]" >&2
  exit 2
fi
dir=$1
shift
collector=${VIGIL_COLLECTOR:-vigil-collector}
namespace=${VIGIL_NAMESPACE:-vigil}

if [ $# -gt 0 ]; then
  nodes=("$@")
else
  mapfile -t nodes < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
fi
if [ ${#nodes[@]} -eq 0 ]; then
  echo "$0: no node names (give them as arguments)" >&2
  exit 2
fi

args=(init-pki --dir "${dir}")
# SANs only when the server certificate is first made: --san re-issues it,
# and the collector would then need a restart for nothing.
if [ ! -e "${dir}/server.pem" ]; then
  for san in vigil-collector "vigil-collector.${namespace}" "vigil-collector.${namespace}.svc" \
    "vigil-collector.${namespace}.svc.cluster.local"; do
    args+=(--san "${san}")
  done
fi
for n in "${nodes[@]}"; do
  args+=(--agent "${n}")
done
# init-pki reports what it wrote on stdout: keep stdout for the YAML.
"${collector}" "${args[@]}" >&2

kubectl create secret generic vigil-collector-pki --namespace "${namespace}" \
  --from-file=ca.pem="${dir}/ca.pem" \
  --from-file=server.pem="${dir}/server.pem" \
  --from-file=server.key="${dir}/server.key" \
  --dry-run=client -o yaml
echo "---"
# Every agent certificate in PKI_DIR (not only the nodes named this time).
# A Secret key cannot hold '/': NODE.pem here is agents/NODE.pem in the pod
# (the DaemonSet mounts this Secret at /etc/vigil/pki/agents).
files=(--from-file=ca.pem="${dir}/ca.pem")
for cert in "${dir}"/agents/*.pem; do
  n=$(basename "${cert}" .pem)
  files+=(--from-file="${n}.pem=${cert}" --from-file="${n}.key=${dir}/agents/${n}.key")
done
kubectl create secret generic vigil-agent-pki --namespace "${namespace}" \
  "${files[@]}" --dry-run=client -o yaml
