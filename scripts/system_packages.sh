#!/usr/bin/env bash
# Prometheus (the local stack's metrics store) and Chromium (the browser that the dashboard test drives)
# from Debian's packages. Installed only when run as root on Debian, as CI runs; elsewhere nothing is
# installed: `hybriddit stack up` says how to get Prometheus and runs without it, and the tests that need
# either one skip. Quiet and idempotent: with both present it does nothing and prints nothing.
set -euo pipefail
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ] || [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then
  exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "bootstrap: apt-get install ${missing[*]} failed (output above)" >&2
  exit 1
fi
echo "bootstrap: installed ${missing[*]} (Debian packages)"
