#!/bin/bash
# make demo's comparison at two checkouts, alternately, two rounds, default (2) torch threads:
# wall seconds of each, then an md5 of each table's score columns (equal: the same table).
#   benchmarks/demo_timing.sh OLD_CHECKOUT NEW_CHECKOUT   (python: $PYTHON, default .venv's)
set -e
PYTHON=${PYTHON:-$(pwd)/.venv/bin/python}
OUT=$(mktemp -d)
for round in 1 2; do
  for tree in "$1" "$2"; do
    name=$round-$(basename "$tree")
    start=$(date +%s.%N)
    (cd "$OUT" && PYTHONPATH=$tree "$PYTHON" -m diffopt compare --dataset sinusoid \
      --algorithms maml,fomaml,reptile --shots 5,10 --progress False --out "$OUT/$name" > "$OUT/$name.txt" 2>&1)
    echo "$tree round $round: $(echo "$(date +%s.%N) - $start" | bc) s"
  done
done
for table in "$OUT"/*.txt; do grep "^|" "$table" | cut -d'|' -f2-7 | md5sum; done
