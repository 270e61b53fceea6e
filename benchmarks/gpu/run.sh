#!/usr/bin/env bash
# The one-shot device check (benchmarks/gpu/README.md).
#
#   benchmarks/gpu/run.sh [--device auto|cuda|cpu] [--quick] [--out DIR] [--budget-s S] [--sections a,b]
#
# When .whl/ holds wheels (make gpu-wheels) and the python lacks what they carry, they are installed
# with `pip install --no-index --target` into a scratch folder first (the lent-box way: no internet).
# The report (report.md, report.json) and the log (check.log) go to --out, by default $OUT.
# The whole run is held under 8 minutes: the check's own budget (420 s, --budget-s) plus a hard stop.
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

out=${OUT:-}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --out ]] && out=${args[i + 1]:-}
  [[ ${args[i]} == --out=* ]] && out=${args[i]#--out=}
done
if [[ -z "$out" ]]; then
  echo "run.sh: give --out DIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$out"
[[ " ${args[*]} " == *" --out"* ]] || args+=(--out "$out")

# Carried wheels: install only when something they provide is missing (a dev venv has it all).
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import av, pydantic, pydantic_settings, librosa" 2>/dev/null; then
  site=${LIPSERVE_WHEEL_TARGET:-/tmp/lipserve-site}
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels into $site" | tee -a "$out/check.log"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    2>&1 | tee -a "$out/check.log" || { echo "run.sh: wheel install failed" | tee -a "$out/check.log"; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
# hard stop a little after the check's own budget, so the report of what ran still comes back
timeout -k 10 "${LIPSERVE_CHECK_HARD_LIMIT_S:-470}" "$PYTHON" benchmarks/gpu/check.py "${args[@]}" 2>&1 | tee -a "$out/check.log"
rc=${PIPESTATUS[0]}
[[ $rc == 124 ]] && echo "run.sh: the check hit the hard time limit; the report holds the sections that finished" | tee -a "$out/check.log"
exit "$rc"
