#!/usr/bin/env bash
# Creates (once) the recipe's own virtual environment with what training, the converter and the
# checks import: torch, transformers, tokenizers, safetensors, numpy, pyyaml. It is kept apart from
# the project's .venv (which it can read: a .pth line adds the project venv's site-packages after its
# own, so `flashmoe` and the patched llama_cpp import from there).
#
#   source scripts/real_model/env.sh      # sets $RM_PY to the recipe venv's python
#
# Versions match the lent GPU machine's image (transformers 5.17.0, tokenizers 0.23.2) so the
# checkpoint it writes loads here the same way. torch==2.13.0 takes the CPU wheel that lies on this
# machine's disk (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
RM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RM_VENV="${RM_VENV:-$RM_REPO/.cache/real_model/venv}"
RM_PROJECT_VENV="${RM_PROJECT_VENV:-$RM_REPO/.venv}"
RM_TORCH="${RM_TORCH:-torch==2.13.0}"
RM_REQS=(transformers==5.17.0 tokenizers==0.23.2 safetensors numpy pyyaml)

if ! "$RM_VENV/bin/python" -c 'import torch, transformers, tokenizers, safetensors, numpy, yaml' 2>/dev/null; then
    echo "[env] creating $RM_VENV (torch, transformers, tokenizers; a few minutes the first time)" >&2
    python3 -m venv "$RM_VENV"
    "$RM_VENV/bin/pip" install -q --upgrade pip >&2
    "$RM_VENV/bin/pip" install -q "$RM_TORCH" >&2
    "$RM_VENV/bin/pip" install -q "${RM_REQS[@]}" >&2
fi
if [ -d "$RM_PROJECT_VENV" ]; then
    site="$("$RM_PROJECT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    own="$("$RM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # an `import` line in a .pth runs at start-up; addsitedir also processes the project's .pth files
    # (the editable flashmoe install); it appends, so this venv's own packages win.
    echo "import site; site.addsitedir('$site')" > "$own/zz_flashmoe_project.pth"
fi
RM_PY="$RM_VENV/bin/python"
export RM_PY RM_REPO
"$RM_PY" -c 'import sys, torch, transformers, tokenizers; print("[env] python", sys.version.split()[0], " torch", torch.__version__, " transformers", transformers.__version__, " tokenizers", tokenizers.__version__)' >&2
