#!/usr/bin/env bash
# Installs the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist) where apt-get exists.
# Without apt-get, point data.path at a folder with the four IDX files, or set data.download=true.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "apt-get not found: install Fashion-MNIST yourself (see README, 'Two commands')" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "installing dataset-fashion-mnist with apt-get"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
