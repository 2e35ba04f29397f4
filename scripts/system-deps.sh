#!/usr/bin/env bash
# Install the Debian packages tenement needs, only those that are missing.
#   scripts/system-deps.sh run    what `make run` needs (venv support, Node for the demo app)
#   scripts/system-deps.sh test   what `make test` needs (also PostgreSQL, Chromium, promtool,
#                                 pebble)
#   scripts/system-deps.sh bench  what `make bench` needs (also nginx and wrk)
set -euo pipefail

mode=${1:-run}
missing=()

python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
# isolation = "namespace" (the default) runs tenants in bubblewrap sandboxes.
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
case "$mode" in
  run) ;;
  test)
    # A real PostgreSQL for the scaled-mode tests (the suite starts a throwaway cluster).
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    # The dashboard's browser tests drive Debian's Chromium through Playwright.
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    # promtool checks the live /metrics and the alerting rules.
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    # Reverse proxies in front of tenement (tests/test_behind_proxy.py), and the
    # self-signed certificate the nginx test makes.
    [[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
    command -v caddy >/dev/null 2>&1 || missing+=(caddy)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    # Upstream's multi-runtime example (run unchanged by the drop-in tests) has a Go app.
    command -v go >/dev/null 2>&1 || missing+=(golang-go)
    # The Node PORT-only test app's WebSockets (Debian's ws module, /usr/share/nodejs).
    [[ -d /usr/share/nodejs/ws ]] || missing+=(node-ws)
    # A real ACME server for the TLS tests (the package ships pebble-challtestsrv too).
    [[ -x /usr/bin/pebble && -x /usr/bin/pebble-challtestsrv ]] || missing+=(pebble)
    ;;
  bench)
    # The proxy benchmark's peer and its load generator.
    [[ -x /usr/sbin/nginx ]] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    ;;
  *) echo "usage: $0 run|test|bench" >&2; exit 2 ;;
esac

# Tenants run as their own uids: the checkout (their apps, the venv's python) must be
# reachable by other users. In CI, on a throwaway machine, open the folders above the
# clone for passing through (not listing); anywhere else, say what to change.
check_reachable() {
  local dir blocked=()
  dir=$(cd "$(dirname "$0")/.." && pwd)
  while [[ "$dir" != "/" ]]; do
    [[ $(( 0$(stat -c %a "$dir") & 01 )) -ne 0 ]] || blocked+=("$dir")
    dir=$(dirname "$dir")
  done
  ((${#blocked[@]} == 0)) && return 0
  if [[ "${CI:-}" == "true" && $(id -u) -eq 0 ]]; then
    echo "CI: letting tenant uids pass through ${blocked[*]} (chmod o+x)"
    chmod o+x "${blocked[@]}"
  else
    echo "warning: tenants (their own uids) cannot reach this checkout through: ${blocked[*]}" >&2
    echo "         the isolation tests will fail; run: chmod o+x ${blocked[*]}" >&2
  fi
}
[[ "$mode" == "test" ]] && check_reachable

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "Installing Debian packages: ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || {
    echo "need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
