#!/usr/bin/env bash
# A script disguised as a document with a double extension, then run.
# expect: T1036
. "$(dirname "$0")/../lib.sh"
f="$HOME/invoice.pdf.sh"; printf '#!/bin/sh\ntrue\n' >"$f"; chmod +x "$f"
"$f"
