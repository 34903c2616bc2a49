#!/usr/bin/env bash
# Install the Debian packages the tests use, when they are missing:
# systemd-analyze and systemd-sysusers (the unit under deploy/systemd),
# shellcheck (its scripts), curl and a JDK (the README's client snippets),
# redis-server (fleet mode).
# Needs root and apt-get; otherwise it names what is missing, and the
# tests that need it skip (locally) or fail (under CI=true).
set -euo pipefail

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v curl >/dev/null || missing+=(curl)
command -v java >/dev/null || missing+=(default-jdk-headless)
command -v redis-server >/dev/null || missing+=(redis-server)

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: install the Debian packages ${missing[*]} to run every" \
        "test (needs root)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
