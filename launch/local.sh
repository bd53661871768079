#!/usr/bin/env bash
# Trains on this host: one process driving all its visible GPUs, or N fake CPU devices.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [--cpu N] --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]

Runs `python -m alexnet_jax.main` with every other argument, on all GPUs this host shows
(restrict them with CUDA_VISIBLE_DEVICES=0,1,...).

  --cpu N     Run on the CPU as N devices (JAX_PLATFORMS=cpu, XLA_FLAGS=
              --xla_force_host_platform_device_count=N): tries the multi-device code
              path on a machine without GPUs.
  -h, --help  This message.

Environment (a value already set wins):
  XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX preallocates (.9 here, JAX's own default .75);
                                  or XLA_PYTHON_CLIENT_PREALLOCATE=false to allocate on demand.
  TF_CPP_MIN_LOG_LEVEL            2 here: TensorFlow (the input pipeline) logs errors only.
  PYTHON                          The interpreter (default: python, e.g. of the active venv).

Examples:
  launch/local.sh --config=configs/default.py --workdir=/tmp/digits
  CUDA_VISIBLE_DEVICES=0 launch/local.sh --config=configs/imagenet.py --workdir=/tmp/in1k \
      --config.data_dir=/data/tfds
  launch/local.sh --cpu 8 --config=configs/default.py --workdir=/tmp/digits_cpu8
EOF
}

die() {
  echo "launch/local.sh: $*" >&2
  exit 2
}

[[ "${1:-}" == --cpu=* ]] && set -- --cpu "${1#--cpu=}" "${@:2}"
case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
  '')
    usage >&2
    exit 2
    ;;
  --cpu)
    [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--cpu takes a device count, e.g. --cpu 8 (got '${2:-}')"
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$2"
    shift 2
    ;;
esac

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# alexnet_jax and configs import from the repository root, wherever this is run from.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

echo "launch/local.sh: JAX_PLATFORMS=${JAX_PLATFORMS:-auto}" \
  "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-all} XLA_FLAGS='${XLA_FLAGS:-}'" >&2
exec "${PYTHON:-python}" -m alexnet_jax.main "$@"
