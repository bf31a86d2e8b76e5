#!/usr/bin/env bash
# What cron runs every minute: one runjobs cycle.
#
#   * * * * * root /opt/runjobs/bin/runjobs.sh
#
# Reads /etc/default/runjobs (KEY=value lines, e.g. RUNJOBS_DATABASE_URL) when
# it exists, then execs `runjobs run` with this script's arguments. Works from
# any working directory; run by hand, it prints to the terminal.
set -eu

# cron's PATH is minimal; commands run by actions expect the usual one.
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

defaults="${RUNJOBS_DEFAULTS:-/etc/default/runjobs}"
if [ -r "$defaults" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$defaults"
    set +a
fi

here="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
if [ -n "${RUNJOBS_PYTHON:-}" ]; then
    python="$RUNJOBS_PYTHON"
elif [ -x "$here/.venv/bin/python" ]; then
    python="$here/.venv/bin/python"
else
    python="$(command -v python3)"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m runjobs run "$@"
