#!/usr/bin/env bash
# Install what sampling needs into this Python (a Colab runtime): jax at the project's pin with the
# extra for the accelerator found here, requirements-sample.txt, and dit_jax itself (no training
# dependencies). Usage: notebooks/install.sh [SOURCE_DIR (default: this checkout)]
#   PYTHON (default python3): the interpreter to install into.
#   DIT_JAX_ACCELERATOR=tpu|cuda12|cpu: skip the detection.
# Detection: a Google TPU chip on the PCI bus (as JAX looks for it) -> tpu; an NVIDIA device node or
# a working nvidia-smi -> cuda12; otherwise cpu. PCI_DEVICES and DEV_DIR move /sys/bus/pci/devices and /dev.
set -euo pipefail

src=${1:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-python3}
pci=${PCI_DEVICES:-/sys/bus/pci/devices}
dev=${DEV_DIR:-/dev}
# PCI device ids of TPU chips (v2/v3, v4, v5p, v5e, v6e, 7x), vendor 0x1ae0 (Google).
TPU_DEVICE_IDS=" 0x0027 0x0056 0x005e 0x0062 0x0063 0x006f 0x0076 "

detect() {
    local vendor device
    for vendor in "$pci"/*/vendor; do
        [[ -f $vendor ]] || continue
        [[ $(<"$vendor") == 0x1ae0 ]] || continue
        device=$(<"${vendor%/vendor}/device")
        if [[ $TPU_DEVICE_IDS == *" $device "* ]]; then
            echo tpu
            return
        fi
    done
    if [[ -e $dev/nvidia0 || -e $dev/nvidiactl ]] || nvidia-smi -L >/dev/null 2>&1; then
        echo cuda12
        return
    fi
    echo cpu
}

accelerator=${DIT_JAX_ACCELERATOR:-$(detect)}
pin=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$src/requirements-sample.txt")
[[ -n $pin ]] || { echo "error: no jax==VERSION line in $src/requirements-sample.txt" >&2; exit 2; }
case $accelerator in
    tpu|cuda12) extra=("jax[$accelerator]==$pin") ;;
    cpu) extra=() ;;
    *) echo "error: DIT_JAX_ACCELERATOR must be tpu, cuda12 or cpu, not '$accelerator'" >&2; exit 2 ;;
esac
echo "dit_jax: installing for $accelerator: jax==$pin ${extra[*]}" >&2
"$python" -m pip install --quiet -r "$src/requirements-sample.txt" "${extra[@]}"
"$python" -m pip install --quiet --no-deps "$src"
