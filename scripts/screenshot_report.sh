#!/usr/bin/env bash
# Render a report.html in headless Chromium and save a PNG of the whole page, to check it renders.
#   bash scripts/screenshot_report.sh runs/banking77/report.html report.png
# Needs Debian's chromium (apt-get install chromium); the page loads nothing from the network.
set -euo pipefail
report="$(realpath "$1")"; out="$(realpath -m "${2:-report.png}")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1100,5200 \
  --screenshot="$out" "file://$report" 2>/dev/null
echo "screenshot: $out"
