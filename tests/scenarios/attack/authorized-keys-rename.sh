#!/usr/bin/env bash
# An SSH key file prepared elsewhere and renamed into place.
# expect: T1098
. "$(dirname "$0")/../lib.sh"
mkdir -p /root/.ssh; f=/root/.ssh/authorized_keys2; vs_protect "$f"
t=/root/.ssh/.vs-$$; echo "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIVigilScenarioKeyOnly000000000000000000000 vs" >"$t"
mv "$t" "$f"
