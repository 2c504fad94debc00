#!/usr/bin/env bash
# Installs everything wmb's tests and sandbox run, on a fresh Debian 12 machine, as root:
#   MariaDB + Redis (Debian packages), Java 17 + Maven, the pinned Kafka jars, and the .venv.
# Idempotent: each step runs only when its result is missing or out of date.
# WMB_INSTALL_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY_RUN=${WMB_INSTALL_DRY_RUN:-0}

say() { printf 'install: %s\n' "$*"; }
run() {
  say "+ $*"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

if [ "$(id -u)" != 0 ] && [ "$DRY_RUN" != 1 ]; then
  say "run me as root (apt-get needs it)"
  exit 1
fi

# --- Debian packages ------------------------------------------------------------------------
missing=()
for pkg in mariadb-server mariadb-client redis-server; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
java_major=$( (java -version 2>&1 || true) | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then missing+=(openjdk-17-jre-headless); fi
command -v mvn >/dev/null 2>&1 || missing+=(maven)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  say "missing packages: ${missing[*]}"
  # Our servers run on private ports and data dirs; the packages' own system services are not
  # wanted.  policy-rc.d (exit 101) is Debian's switch that stops postinst from starting them.
  added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ] && [ "$DRY_RUN" != 1 ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    added_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  run apt-get update -q
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
else
  say "debian packages: already installed"
fi

# --- Kafka jars (pinned by deps/kafka/pom.xml) -------------------------------------------------
LIBS=deps/kafka/target/libs
if [ ! -d "$LIBS" ] || [ -z "$(ls -A "$LIBS" 2>/dev/null)" ] || [ deps/kafka/pom.xml -nt "$LIBS" ]; then
  say "kafka jars: missing or older than deps/kafka/pom.xml, copying"
  # Start clean: a jar the new pom no longer lists must not stay on the broker's classpath.
  run rm -rf "$LIBS"
  run mvn -q -B -f deps/kafka/pom.xml dependency:copy-dependencies
  run touch "$LIBS"
else
  say "kafka jars: up to date in $LIBS"
fi

# --- Python venv -------------------------------------------------------------------------------
STAMP=.venv/.wmb-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  run python3 -m venv .venv
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  say "venv: up to date (.venv, pyproject.toml unchanged)"
else
  run .venv/bin/pip install -q --upgrade pip
  run .venv/bin/pip install -q -e '.[test]'
  if [ "$DRY_RUN" != 1 ]; then echo "$want" >"$STAMP"; fi
fi

say "done in $REPO: run tests with .venv/bin/pytest (add --long for slow tests)"
