#!/usr/bin/env bash
# mypy (strict) over the package as it installs: edgekit/ with converters/, agent/ and profiles/
# mapped under it (pyproject's package-dir), through a tree of symlinks mypy can follow.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .typecheck
mkdir -p .typecheck/edgekit
for entry in edgekit/*; do
  ln -s "../../$entry" ".typecheck/edgekit/$(basename "$entry")"
done
ln -s ../../converters .typecheck/edgekit/converters
ln -s ../../agent .typecheck/edgekit/agent
ln -s ../../profiles .typecheck/edgekit/profiles_builtin
cd .typecheck
exec ../.venv/bin/mypy --config-file ../pyproject.toml -p edgekit
