#!/usr/bin/env bash
# Put promtool on PATH for `make ops-validate` and `make test`: Debian's `prometheus`
# package ships it. Its maintainer scripts would also start (and enable) a Prometheus
# server, which only promtool's users do not want: while it installs, a policy-rc.d
# refuses every service start (invoke-rc.d and deb-systemd-invoke both obey it), and
# afterwards no prometheus server may be running.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is missing: install Debian's prometheus package (apt-get install" \
    "--no-install-recommends prometheus) or put a promtool on PATH" >&2
  exit 2
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# Refuse service starts while promtool is installed.\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi

# Whether a process named prometheus runs (from /proc: pgrep may not be installed).
prometheus_running() {
  grep -qx prometheus /proc/[0-9]*/comm 2>/dev/null
}

running_before=false
if prometheus_running; then
  running_before=true
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
command -v promtool >/dev/null

# Belt and braces: if a server started anyway (an existing policy-rc.d that allows it),
# stop it through its own service script and keep it from starting at boot.
if [ "$running_before" = false ] && prometheus_running; then
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service
  else
    invoke-rc.d --force prometheus stop || service prometheus stop
  fi
fi
if [ "$running_before" = false ] && prometheus_running; then
  echo "installing promtool left a prometheus server running: stop it" >&2
  exit 1
fi
if [ -d /run/systemd/system ] && [ "$running_before" = false ]; then
  systemctl disable prometheus.service >/dev/null 2>&1 || true
fi
promtool --version | head -n 1
