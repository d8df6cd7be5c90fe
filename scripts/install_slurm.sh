#!/usr/bin/env bash
# Install the Debian packages that a one-node local SLURM cluster needs (slurm/local_cluster.sh):
# slurmctld, slurmd, slurm-client and munge. Idempotent: when every package is already installed
# it touches nothing (no apt-get update), so a second run takes well under a second.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

# dpkg-query reports "install ok installed" only for fully configured packages; anything else
# (absent, half-configured, removed with config left) counts as missing and is (re)installed.
missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [ "$status" != "install ok installed" ]; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_slurm: already installed: ${packages[*]} (nothing to do)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: error: apt-get not found; install ${missing[*]} with your package manager" >&2
  exit 1
fi

# apt needs root; use sudo when we are not root, and say plainly when that is impossible.
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_slurm: error: installing ${missing[*]} needs root, and sudo is not available;" >&2
    echo "  run this script as root, or ask an administrator to run:" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  sudo_cmd=(sudo)
fi

# Non-interactive: no debconf prompts, and keep any existing config files without asking.
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
  --no-install-recommends)

echo "install_slurm: installing ${missing[*]}"
echo "install_slurm: apt-get update"
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
echo "install_slurm: apt-get install ${missing[*]}"
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${missing[@]}"

# The Debian packages try to start their services; without systemd that silently does nothing,
# which is what we want: slurm/local_cluster.sh runs the daemons itself.
for bin in slurmctld slurmd sinfo sbatch munged; do
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
    echo "install_slurm: error: $bin missing after install" >&2
    exit 1
  fi
done
# (Not `sinfo --version`: every slurm client fails without a slurm.conf, which we do not install.)
echo "install_slurm: installed ${missing[*]}; slurm $(dpkg-query -W -f='${Version}' slurmctld)"
