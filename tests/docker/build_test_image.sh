#!/usr/bin/env bash
# Build the image the docker tests run in, without any registry: a minimal Debian bookworm with
# python3 (3.11, the ABI of this project's .venv, which the tests mount read-only into it).
# Does nothing when the image already exists.
set -euo pipefail
image=${1:-recipe-runner-test/python:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3 bookworm "$rootfs/root" >/dev/null
tar -C "$rootfs/root" -c . | docker import - "$image" >/dev/null
echo "built $image"
