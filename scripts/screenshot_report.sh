#!/usr/bin/env bash
# Screenshot an HTML report with headless Chromium (Debian: apt-get install -y chromium).
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH] [HEIGHT]
#
# The report is self-contained (figures inline, no script, no network), so Chromium runs
# with networking off; a report that needed the network would show broken images here.
# Default window 1200x1500 px, the top of the page; PNGs go through optipng when present.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
width=${3:-1200}
height=${4:-1500}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "no Chromium found: apt-get install -y chromium" >&2
    exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: Chromium refuses to run as root (containers, CI) without it.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
    --proxy-server="127.0.0.1:9" --proxy-bypass-list="<-loopback>" \
    --window-size="${width},${height}" --screenshot="$out" "file://$report" >/dev/null 2>&1
[[ -s "$out" ]] || { echo "Chromium wrote no screenshot" >&2; exit 1; }
if command -v optipng >/dev/null; then optipng -quiet -o2 "$out"; fi
echo "$out: $(du -k "$out" | cut -f1) KB"
