#!/usr/bin/env bash
# Make sure the Debian packages named as arguments are installed, before `make` runs anything
# that needs them. Each package is judged present by the command it provides.
#   nothing missing:           silent, exit 0
#   missing, root + apt-get:   installs them quietly, prints one line
#   missing, otherwise:        prints what to install and how, exit 1
# Overrides (for tests/test_sysdeps.py): SYSDEPS_PATH, where the commands are looked up
# (default $PATH); SYSDEPS_APT, the apt-get to use (default apt-get).
set -euo pipefail

command_of() {  # the command that proves a package is installed
  case "$1" in
    chromium-driver) echo chromedriver ;;
    *) echo "$1" ;;  # espeak-ng, chromium, redis-server: named as their package
  esac
}

lookup_path=${SYSDEPS_PATH:-$PATH}
apt=${SYSDEPS_APT:-apt-get}

missing_packages=() missing_commands=()
for package in "$@"; do
  cmd=$(command_of "$package")
  if ! PATH=$lookup_path command -v "$cmd" >/dev/null 2>&1; then
    missing_packages+=("$package")
    missing_commands+=("$cmd")
  fi
done
[ ${#missing_packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v "$apt" >/dev/null 2>&1; then
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  start=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  if ! { "$apt" update -qq && "$apt" install -y -qq --no-install-recommends "${missing_packages[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "sysdeps: $apt install ${missing_packages[*]} failed (its last lines are above)" >&2
    exit 1
  fi
  still_missing=()
  for cmd in "${missing_commands[@]}"; do
    PATH=$lookup_path command -v "$cmd" >/dev/null 2>&1 || still_missing+=("$cmd")
  done
  if [ ${#still_missing[@]} -gt 0 ]; then
    echo "sysdeps: installed ${missing_packages[*]}, but ${still_missing[*]} is still not on PATH" >&2
    exit 1
  fi
  echo "sysdeps: installed ${missing_packages[*]} with apt-get ($((SECONDS - start)) s)"
  exit 0
fi

why="not root"
command -v "$apt" >/dev/null 2>&1 || why="no apt-get here"
commands_listed=$(IFS=,; echo "${missing_commands[*]}" | sed 's/,/, /g')
{
  echo "sysdeps: missing system packages ${missing_packages[*]} (no $commands_listed on PATH), not installed: $why."
  echo "Install them, then run make again:"
  echo "    sudo apt-get install ${missing_packages[*]}"
  echo "Without apt, install what provides the commands $commands_listed."
} >&2
exit 1
