#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter (3.12 preferred: the tested stack), or explain
# how to get one and exit 1.
set -u
version_ok() { "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] $2 (3, 12) else 1)" 2>/dev/null; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
command -v python3.12 >/dev/null 2>&1 && candidates+=("$(command -v python3.12)")
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.[0-9]+' | sort -V); do
    candidates+=("$(pyenv root)/versions/$v/bin/python")
  done
fi
for p in "$HOME"/.pyenv/versions/3.*/bin/python; do [ -x "$p" ] && candidates+=("$p"); done
for name in python3.13 python3; do
  command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
done
for want in "==" ">="; do
  for c in "${candidates[@]}"; do
    if version_ok "$c" "$want"; then echo "$c"; exit 0; fi
  done
done
echo "error: megatron-elastic needs Python >= 3.12 (megatron-core >= 0.17 requires it) and none was" >&2
echo "found. Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
exit 1
