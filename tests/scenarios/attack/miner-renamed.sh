#!/usr/bin/env bash
# A miner under a name known from cloud intrusions, with miner options.
# expect: T1496
. "$(dirname "$0")/../lib.sh"
cp /bin/sleep "$VS_DIR/kdevtmpfsi"
"$VS_DIR/kdevtmpfsi" 0.3 --donate-level 1 2>/dev/null
true
