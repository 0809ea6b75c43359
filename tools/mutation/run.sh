#!/usr/bin/env bash
# Mutation testing (mutmut 3.8.1) of one group of modules against the tests that
# cover them. Each stage runs in its own copy of the checkout (/tmp/mutation-STAGE),
# so the project's pyproject.toml and `make test` are untouched; the stage's mutmut
# configuration is tools/mutation/STAGE.cfg, copied there as setup.cfg.
#
# usage: tools/mutation/run.sh STAGE [mutmut run args...]   (STAGE: prior, predictive,
#        parametric, kron_assembly); then, in /tmp/mutation-STAGE:
#        mutmut results; mutmut show NAME
set -euo pipefail
stage=$1; shift
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
venv=${VENV:-$root/.venv}
[ -x "$venv/bin/mutmut" ] || venv=/work/main/.venv
work=${MUTATION_DIR:-/tmp/mutation-$stage}
mkdir -p "$work"
# tracked and untracked (not ignored) files of the checkout, mutants/ results kept
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work")
cp "$root/tools/mutation/$stage.cfg" "$work/setup.cfg"
cd "$work"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$venv/bin/mutmut" run --max-children "${MAX_CHILDREN:-2}" "$@"
