#!/bin/bash
# make demo's comparison at 3d5f0a4 and at HEAD, alternately, default (2) threads; wall seconds
cd /tmp
for round in 1 2; do
  for tree in /tmp/wt-3d5 /work/main; do
    rm -rf /tmp/demo-$round-$(basename $tree)
    start=$(date +%s.%N)
    PYTHONPATH=$tree /work/main/.venv/bin/python -m diffopt compare --dataset sinusoid --algorithms maml,fomaml,reptile --shots 5,10 --progress False --out /tmp/demo-$round-$(basename $tree) > /tmp/demo-$round-$(basename $tree).txt 2>&1
    end=$(date +%s.%N)
    echo "$tree round $round: $(echo "$end - $start" | bc) s"
  done
done
for f in /tmp/demo-1-*.txt /tmp/demo-2-*.txt; do grep "^|" $f | cut -d'|' -f2-7 | md5sum; done
