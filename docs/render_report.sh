#!/usr/bin/env bash
# Render a run's report.html to PNG with headless Chromium (Debian's `chromium` package), as in docs/.
#
#   bash docs/render_report.sh RUN_DIR OUT_PREFIX
#
# writes OUT_PREFIX.jpg (the whole page) and OUT_PREFIX-top.png (its first 1,600 pixels, for the README).
# The docs/report-oxford17* screenshots came from a copy of the Oxford-17 flowers set in /tmp/data:
#   .venv/bin/tlearn train /tmp/data/oxford17_flowers --mode finetune --epochs 4 --out runs/oxford17-finetune
#   bash docs/render_report.sh runs/oxford17-finetune docs/report-oxford17
set -euo pipefail
run=$(realpath "$1")
out=$2
command -v chromium >/dev/null || { echo "chromium is not installed: apt-get install chromium" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,12000 \
    --screenshot="$tmp/page.png" "file://$run/report.html" 2>/dev/null
"$(dirname "$0")/../.venv/bin/python" - "$tmp/page.png" "$out" <<'PY'
import sys
from PIL import Image, ImageChops

page = Image.open(sys.argv[1]).convert("RGB")
blank = Image.new("RGB", page.size, (255, 255, 255))
bottom = ImageChops.difference(page, blank).getbbox()[3] + 40  # trim the empty window below the page
page = page.crop((0, 0, page.width, min(bottom, page.height)))
page.save(sys.argv[2] + ".jpg", quality=82, optimize=True)  # the whole page is mostly photos: JPEG is 3x smaller
page.crop((0, 0, page.width, min(1600, page.height))).save(sys.argv[2] + "-top.png", optimize=True)
print(f"{sys.argv[2]}.jpg: {page.width}x{page.height}")
PY
