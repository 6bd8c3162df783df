# Sourced by .ci/run (bash): find the real data sets for the tests that need them.
#
#   boxcaseg_find_data REPO   # exports BOXCASEG_DATA when it finds the data; prints one line
#
# Order: $BOXCASEG_DATA when set; REPO/../shared/data; ORIGIN/../shared/data where ORIGIN is
# the repository REPO was cloned from (`remote.origin.url`), when that is a local folder.
# A folder counts when it holds coco-train/instances.json. None found: the real-data tests
# skip, each saying why.
boxcaseg_find_data() {
    local repo="$1" origin cand
    if [[ -n "${BOXCASEG_DATA:-}" ]]; then
        if [[ -f "$BOXCASEG_DATA/coco-train/instances.json" ]]; then
            echo "real data: $BOXCASEG_DATA (from BOXCASEG_DATA)"
        else
            echo "real data: BOXCASEG_DATA=$BOXCASEG_DATA has no coco-train/instances.json; the real-data tests will skip"
        fi
        return 0
    fi
    local -a cands=("$repo/../shared/data")
    origin="$(git -C "$repo" config --get remote.origin.url 2>/dev/null || true)"
    origin="${origin#file://}"
    if [[ -n "$origin" && "$origin" != *://* && "$origin" != *:* ]]; then  # a local path, not a URL
        [[ "$origin" == /* ]] || origin="$repo/$origin"
        origin="${origin%/}"
        origin="${origin%/.git}"
        if [[ -d "$origin" ]]; then
            cands+=("$origin/../shared/data")
        fi
    fi
    for cand in "${cands[@]}"; do
        if [[ -f "$cand/coco-train/instances.json" ]]; then
            BOXCASEG_DATA="$(cd "$cand" && pwd -P)"
            export BOXCASEG_DATA
            echo "real data: $BOXCASEG_DATA"
            return 0
        fi
    done
    echo "real data: none found (set BOXCASEG_DATA; looked in ${cands[*]}); the real-data tests will skip"
    return 0
}
