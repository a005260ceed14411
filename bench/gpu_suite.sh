#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py): one NVIDIA GPU, under 8 minutes, one markdown table.
#
#   bash bench/gpu_suite.sh --fetch-wheels         # once, on a machine with PyPI: wheels the GPU image lacks
#                                                  # (soundfile, cffi, pycparser, faiss-cpu; py3.12) -> .whl/
#   bash bench/gpu_suite.sh --out table.md         # on the GPU machine; installs .whl/*.whl into /tmp/site
#   bash bench/gpu_suite.sh --cpu-smoke            # reduced, on CPU, with this environment (the tests run it)
#
# Other arguments go to bench/gpu_suite.py (--sections, --workdir, --out). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = --fetch-wheels ]; then
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 faiss-cpu==1.15.1
fi

if [[ " $* " != *" --cpu-smoke "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
exec "$PY" bench/gpu_suite.py "$@"
