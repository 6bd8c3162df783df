# Sourced by bench/gpu_checks.sh and bench/gpu_train.sh: the step runner of one device call.
#
# The caller sets STEPS (NAME:SECONDS ...), DEADLINE (seconds for all steps), DRY (1: a dry run on
# this CPU), LOG (the log folder), FULL (the whole log), SUMMARY (one line per step) and
# SUMMARY_PATTERN (grep -E: the lines of a step's output its summary line keeps), then calls
#   budget_check      prints "budget: STEPS = N s of DEADLINE D s"; status 1 when N > D
#   install_wheels    packages the device image lacks, carried as wheels in .whl/ (not in a dry run)
#   step NAME CMD...  CMD with NAME's limit (DRY_FACTOR x, default 4, in a dry run), stopped at its limit or when the
#                     deadline is near; its output is appended to FULL and one line to SUMMARY as
#                     soon as it ends, so a cut-off call loses only the step in flight.

limit_of() { local s; for s in "${STEPS[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }

budget_check() {
  local s total=0
  for s in "${STEPS[@]}"; do total=$((total + ${s##*:})); done
  echo "budget: ${STEPS[*]} = ${total} s of DEADLINE ${DEADLINE} s"
  if [ "$total" -gt "$DEADLINE" ]; then echo "budget: the steps' limits exceed DEADLINE"; return 1; fi
}

install_wheels() {
  [ "$DRY" = 1 ] && return 0
  if ls .whl/*.whl >/dev/null 2>&1; then
    ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}

step() {  # step NAME CMD...
  local name=$1; shift
  local secs; secs=$(limit_of "$name")
  local factor=1; [ "$DRY" = 1 ] && factor=${DRY_FACTOR:-4}   # this CPU is slower than the GPU machine at anything
  secs=$((secs * factor))
  local left=$((DEADLINE * factor - SECONDS))
  if [ "$left" -lt 10 ]; then echo "=== $name: skipped (the budget is spent)" | tee -a "$SUMMARY"; return 1; fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "=== $name (limit ${secs} s): $*" | tee -a "$FULL"
  local t0=$SECONDS out="$LOG/.step.out"
  timeout "$secs" "$@" > "$out" 2>&1
  local rc=$?
  cat "$out" >> "$FULL"
  local verdict="rc $rc"; [ "$rc" = 124 ] && verdict="cut at its limit"
  echo "=== $name: $verdict, $((SECONDS - t0)) s" | tee -a "$FULL"
  printf '%s: %s, %s s; %s\n' "$name" "$verdict" "$((SECONDS - t0))" \
    "$(grep -E "$SUMMARY_PATTERN" "$out" | cut -c1-300 | tail -n 8 | tr '\n' ' ')" >> "$SUMMARY"
  rm -f "$out"
  return "$rc"
}
