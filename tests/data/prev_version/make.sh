#!/usr/bin/env bash
# How store/ was written (by npo 0.1.0 as it was before the module split; the commands run on any version):
#   bash tests/data/prev_version/make.sh OUT   (from the repository root; OUT must not exist)
# tests/test_compat.py reads store/ with the current code: it lists, verifies, collects, resumes bitwise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; S="$1"; npo=.venv/bin/npo
export PYTHONPATH="$here"  # the recipe's verifier: fixture_reward:any_digit
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
.venv/bin/python "$here/make_micro.py" "$work/micro" >/dev/null   # a 4k-parameter Qwen2, seed 0
$npo import "$work/micro" --run base --store "$S"
$npo run "$here/r.yaml" --store "$S"
$npo rewind r@4 --branch cont --store "$S"
$npo run --resume r/cont --set train.steps=6 --store "$S"
$npo intervene --at 2 --guide 4 --run r --set npo.gate=1.0 --set npo.max_tries=4 --store "$S"
$npo run "$here/r.yaml" --set name=x --set npo.source=exgrpo --set npo.replay_ratio=0.5 --store "$S"
$npo auto "$here/r.yaml" --set name=a --set auto.bootstrap=true --set auto.scout_steps=2 --store "$S"
rm -rf "$S/tmp"
