#!/bin/bash
# What cron runs every minute: one runjobs cycle.
#
#   * * * * * root /opt/runjobs/bin/runjobs.sh
#
# Reads /etc/default/runjobs (KEY=value lines, e.g. RUNJOBS_DATABASE_URL or
# RUNJOBS_PYTHON) when it exists, then execs `runjobs run` with this script's
# arguments. Works from any working directory; run by hand, it prints to the
# terminal. Installed by pip beside the `runjobs` console script, or used from
# a checkout.
set -eu

defaults="${RUNJOBS_DEFAULTS:-/etc/default/runjobs}"
if [ -r "$defaults" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$defaults"
    set +a
fi

# cron's PATH is minimal and commands run by actions expect the usual
# directories; they go after the caller's own, so a virtualenv's bin that the
# caller (or a PATH= line in the crontab) put first still comes first.
export PATH="${PATH:+$PATH:}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

script_dir="$(cd "$(dirname "$(readlink -f "$0")")" && pwd)"

# The interpreter of the `runjobs` console script on PATH, from its #! line
# (pip writes `#!/bin/sh` and an `exec '/path/python'` line when the path is
# too long for a #! line).
runjobs_python() {
    local found first second
    found="$(command -v runjobs 2>/dev/null)" || return 0
    { IFS= read -r first; IFS= read -r second; } < "$found" || true
    case "$first" in
        '#!/bin/sh'*) second="${second#*exec\' }"; second="${second#[\"\']}"
                      printf '%s\n' "${second%%[\"\']*}" ;;
        '#!/'*) first="${first#\#!}"; printf '%s\n' "${first%% *}" ;;
    esac
}

# Candidates, in the contract's order: RUNJOBS_PYTHON; the .venv beside the
# script (a checkout's bin/../.venv, or the virtualenv whose bin/ pip
# installed this script into); the interpreter of the `runjobs` on PATH;
# python3.
candidates=()
if [ -n "${RUNJOBS_PYTHON:-}" ]; then
    candidates+=("$(command -v "$RUNJOBS_PYTHON" 2>/dev/null || printf '%s' "$RUNJOBS_PYTHON")")
fi
candidates+=("$script_dir/../.venv/bin/python" "$script_dir/python")
candidate="$(runjobs_python)"
[ -n "$candidate" ] && candidates+=("$candidate")
candidate="$(command -v python3 2>/dev/null)" && candidates+=("$candidate")

# The first that can import runjobs and what it needs. find_spec imports
# nothing, so the check costs one interpreter start, not runjobs' imports.
probe='import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("runjobs", "click", "sqlalchemy", "filelock")))'
tried=()
for python in "${candidates[@]}"; do
    if [ -x "$python" ] && "$python" -c "$probe" 2>/dev/null; then
        exec "$python" -m runjobs run "$@"
    fi
    tried+=("$python")
done
echo "runjobs.sh: no Python here can import runjobs; tried: ${tried[*]:-nothing} (set RUNJOBS_PYTHON in $defaults)" >&2
exit 1
