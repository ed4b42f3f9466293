#!/usr/bin/env bash
# ptxas -v report of a build log, one line per kernel: "Used N registers | stack/spills | function"
# (demangled, shortened), then ptxas warnings/errors and any spill lines, each prefixed by PREFIX.
# Used by tools/device_check.sh and tools/ab_variants.sh.
#
#   bash tools/ptxas_report.sh BUILD_LOG [PREFIX]
set -uo pipefail
log=$1 prefix=${2:-}
awk '
  /Compiling entry function/ { n = split($0, part, "\047"); if (n >= 3) fn = part[2] }
  /bytes stack frame/        { props = $0; sub(/^[ \t]+/, "", props) }
  /Used [0-9]+ registers/    { match($0, /Used [0-9]+ registers/); print substr($0, RSTART, RLENGTH) " | " props " | " fn; props = "" }
' "$log" | (command -v c++filt >/dev/null && c++filt || cat) | cut -c1-220 | sort -u
grep -E "ptxas (warning|error)|[1-9][0-9]* bytes spill (stores|loads)" "$log" | sort -u | sed "s/^/$prefix/"
exit 0
