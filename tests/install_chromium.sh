#!/usr/bin/env bash
# Debian's Chromium, which the report and notebook tests render pages in (headless), when it
# is missing. Part of the README's test command; needs root or sudo.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null; then
  as_root=(sudo)
else
  echo "the report and notebook tests need Chromium: as root, apt-get install chromium" >&2
  exit 1
fi
echo "installing Debian's chromium for the report and notebook tests ..."
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
command -v chromium
