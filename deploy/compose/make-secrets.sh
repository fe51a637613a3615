#!/usr/bin/env bash
# Makes the secrets docker-compose.yml mounts, as files in one folder (default: secrets/ at the
# top of the repository, which git ignores): random tokens and passwords, and a self-signed TLS
# certificate for the gateway. It never overwrites: if any of its files exists it stops. To make
# new ones, move the folder away, run it again and restart the stack (Grafana takes a new admin
# password only with a new grafana-data volume; change it in Grafana otherwise).
#
# Modes: the folder is 0700 and the files in it 0644. Compose mounts a file secret as a bind mount
# that keeps the host file's owner and mode (outside Swarm it ignores a secret's uid/gid/mode), so
# a 0600 file would be unreadable by the containers' own users (Grafana 472, Prometheus 65534,
# MultiMed 1000); the folder is what keeps other users of this host out.
set -euo pipefail

out="${1:-$(cd "$(dirname "$0")/../.." && pwd)/secrets}"
files=(multimed_tokens metrics_token ray_token tls_cert tls_key pacs_password orthanc_users.json
  grafana_admin_password)

for f in "${files[@]}"; do
  if [[ -e "$out/$f" ]]; then
    echo "make-secrets: $out/$f exists; not overwriting (delete it to make a new one)" >&2
    exit 1
  fi
done
command -v openssl >/dev/null || { echo "make-secrets: needs openssl" >&2; exit 1; }

umask 077
mkdir -p "$out"
chmod 0700 "$out"
random() { openssl rand -hex 32; }
# Single values are written without a newline, so no reader has to trim one.

# The gateway's tokens, one "NAME TOKEN" a line; NAME is what the audit log shows. The client's
# comes first: a client given this file (--token-file) sends its first token.
client=$(random)
prometheus=$(random)
printf 'client %s\nprometheus %s\n' "$client" "$prometheus" >"$out/multimed_tokens"
printf '%s' "$prometheus" >"$out/metrics_token"  # what Prometheus sends to /metrics

printf '%s' "$(random)" >"$out/ray_token"  # RAY_AUTH_TOKEN_PATH: the same on every node

# The gateway's certificate; clients trust it as their CA (--tls-ca secrets/tls_cert). Its names
# are those clients dial: the host (localhost) and the head's name on the compose network.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
  -subj "/CN=multimed-gateway" \
  -addext "subjectAltName=DNS:localhost,DNS:ray-head,IP:127.0.0.1" \
  -keyout "$out/tls_key" -out "$out/tls_cert" 2>/dev/null

# One PACS password in the two forms its readers take: the plain file the application reads
# (pacs.main.password_file) and the Orthanc configuration that defines the user.
pacs=$(random)
printf '%s' "$pacs" >"$out/pacs_password"
printf '{"RegisteredUsers": {"multimed": "%s"}}\n' "$pacs" >"$out/orthanc_users.json"

printf '%s' "$(random)" >"$out/grafana_admin_password"

chmod 0644 "${files[@]/#/$out/}"
echo "make-secrets: wrote ${#files[@]} files to $out"
