#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine: system packages, Python packages, and
# `pip install .` (which builds the C++ core and puts the `softce` program on the PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake ninja-build g++ pkg-config libhwy-dev libgtest-dev libbenchmark-dev
          libopenblas-dev libopenblas0-openmp libopenmpi-dev openmpi-bin libcli11-dev nlohmann-json3-dev
          libfmt-dev dataset-fashion-mnist clang libclang-rt-14-dev libplplot-dev
          plplot-driver-cairo zlib1g-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q "${missing[@]}"
fi

python3 -m pip install -q -r requirements-dev.txt
python3 -m pip install -q --no-build-isolation .
# pyenv keeps console scripts behind shims; refresh them so `softce` is found.
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
