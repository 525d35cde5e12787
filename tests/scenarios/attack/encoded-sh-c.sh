#!/usr/bin/env bash
# An encoded payload decoded and executed in one `sh -c` command string.
# expect: T1140|T1027|T1059
. "$(dirname "$0")/../lib.sh"
sh -c "echo dW5hbWUgLXIgPi9kZXYvbnVsbAo= | base64 --decode | bash"
