#!/bin/bash
# The guest side of `cargo xtask vm-test` (xtask/src/vm.rs puts it on the 9p
# share as /share/guest.sh; the image's vigil-vmtest.service runs it once
# systemd reached multi-user). It installs the two .deb files the host built,
# checks the units and the detection -> evidence -> collector chain, cuts
# the power once while a collector is under load (the disk is the same across
# the reboot; the page cache is not), checks that collector and the chain
# again, removes and purges, then powers the VM off.
#
# Every check appends one line to /share/results.txt: `ok NAME`,
# `FAIL NAME: DETAIL` or `skip NAME: WHY`; the host counts them. Logs of
# the units go to /share/ at the end of each phase. Nothing here talks to the
# network beyond the guest's loopback.
set -u

SHARE=/share
STATE=/var/lib/vigil-vmtest
RESULTS="$SHARE/results.txt"
METRICS_PORT=9108
mkdir -p "$STATE"
phase="$(cat "$STATE/phase" 2>/dev/null || echo 1)"
boots="$(($(cat "$STATE/boots" 2>/dev/null || echo 0) + 1))"
echo "$boots" >"$STATE/boots"

say() { echo "vmtest[$phase]: $*" >/dev/console; }
ok() { echo "ok $1" >>"$RESULTS"; say "ok    $1"; }
fail() { echo "FAIL $1: $2" >>"$RESULTS"; say "FAIL  $1: $2"; }
skip() { echo "skip $1: $2" >>"$RESULTS"; say "skip  $1: $2"; }
# config_add SECTION LINE...: adds lines to /etc/vigil/agent.toml's
# [SECTION] (a line appended at the end would land in the file's last
# section).
config_add() {
    section="$1"
    shift
    lines="$(printf '%s\n' "$@")"
    awk -v section="[$section]" -v lines="$lines" \
        '{ print } $0 == section { print lines }' \
        /etc/vigil/agent.toml >/etc/vigil/agent.toml.new &&
        mv /etc/vigil/agent.toml.new /etc/vigil/agent.toml
    grep -qF "$1" /etc/vigil/agent.toml ||
        fail "agent.toml [$section]" "could not add: $*"
}
# check NAME CMD...: ok when CMD succeeds, else FAIL with its last lines.
check() {
    local name="$1" out
    shift
    if out="$("$@" 2>&1)"; then
        ok "$name"
    else
        fail "$name" "$(printf '%s' "$out" | tail -n 8 | tr '\n' '|')"
    fi
}
# wait_for SECS CMD...: polls CMD every half second.
wait_for() {
    local end=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$end" ]; then
            return 1
        fi
        sleep 0.5
    done
}
# The agent's metrics. Not with bash's /dev/tcp: a shell connecting out is
# what the shell_network_connection rule detects (and captures).
metrics() {
    curl -sf --max-time 10 "http://127.0.0.1:$METRICS_PORT/metrics"
}
# metric NAME: the sum of every sample of NAME (0 when absent).
metric() {
    metrics | awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF } END { print s + 0 }'
}
metric_at_least() { [ "$(metric "$1" | cut -d. -f1)" -ge "$2" ]; }
units_active() { systemctl is-active --quiet vigil-collector.service vigil-agent.service; }
agent_ready() { units_active && metrics >/dev/null; }
# The processes that used the most CPU so far, on the console (the host
# echoes it: a slow run says where the guest's time went).
busiest() {
    say "busiest (cpu s, name): $(ps -eo times=,comm= --sort=-times 2>/dev/null | head -n 4 | awk '{printf "%s %s; ", $1, $2}')up $(cut -d' ' -f1 /proc/uptime) s"
}
dump_logs() {
    journalctl -b --no-pager -u vigil-agent.service >"$SHARE/agent-$phase.log" 2>&1
    journalctl -b --no-pager -u vigil-collector.service >"$SHARE/collector-$phase.log" 2>&1
    journalctl -b --no-pager -p warning >"$SHARE/warnings-$phase.log" 2>&1
    cp /var/log/vigil/*.jsonl "$SHARE/" 2>/dev/null || true
    # Where the guest's CPU went (TCG is slow: a busy process shows here).
    ps -eo pid,etimes,times,rss,comm --sort=-times 2>/dev/null | head -n 12 >"$SHARE/ps-$phase.txt"
    metrics >"$SHARE/metrics-$phase.txt" 2>/dev/null || true
    busiest
}
finish() {
    dump_logs
    echo "done" >"$SHARE/done"
    say "powering off"
    systemctl --no-block poweroff
    exit 0
}
# The detection of RULE whose process argv contains MARK, from the agent's
# detections file.
detected() { grep -F "\"$1\"" /var/log/vigil/detections.jsonl 2>/dev/null | grep -F -- "$2"; }
# The bundle id of the evidence captured for a detection whose line has MARK.
bundle_of() {
    grep -F -- "$1" /var/log/vigil/evidence.jsonl 2>/dev/null |
        jq -r 'select(.evidence.bundle_id != null) | .evidence.bundle_id' | tail -n 1
}
at_collector() { vigil detections list --json --rule "$1" 2>/dev/null | grep -F -- "$2"; }
fetch_verify() {
    local id="$1" dst="$STATE/bundles/$1.zst"
    mkdir -p "$STATE/bundles"
    vigil evidence get "$id" --output "$dst" --quiet && vigil evidence verify "$dst"
}

if [ "$boots" -gt 3 ]; then
    fail "boot loop" "booted $boots times"
    finish
fi

say "kernel $(uname -r), boot $boots"
echo "kernel $(uname -r)" >"$SHARE/kernel.txt"
cat /sys/kernel/security/lsm >"$SHARE/lsm.txt" 2>/dev/null || true

# A detection of an executable started from a hidden directory under /tmp
# (built-in rules exec_from_temp_dir / exec_from_hidden_dir, captured by
# default): the chain every phase checks.
exec_chain() {
    local tag="$1" mark dir
    mark="vmtest-$tag-$RANDOM$RANDOM"
    dir="/tmp/.vmtest-$tag"
    mkdir -p "$dir"
    cp /bin/sleep "$dir/worker"
    "$dir/worker" 2 "$mark" 2>/dev/null || true
    if wait_for 60 detected exec_from_hidden_dir "$mark"; then
        ok "$tag: detection exec_from_hidden_dir raised"
    else
        fail "$tag: detection exec_from_hidden_dir raised" "none in detections.jsonl"
        return
    fi
    local id=""
    if wait_for 180 bash -c "grep -F -- '$mark' /var/log/vigil/evidence.jsonl | grep -q bundle_id"; then
        id="$(bundle_of "$mark")"
        ok "$tag: evidence bundle sealed ($id)"
    else
        fail "$tag: evidence bundle sealed" "no bundle in evidence.jsonl"
    fi
    # After a reboot the agent may start before the collector and back off.
    if wait_for 180 at_collector exec_from_hidden_dir "$mark"; then
        ok "$tag: detection stored at the collector"
    else
        fail "$tag: detection stored at the collector" "$(vigil detections list 2>&1 | tail -n 3 | tr '\n' '|')"
    fi
    if [ -n "$id" ]; then
        if wait_for 120 fetch_verify "$id"; then
            ok "$tag: bundle downloaded from the collector and verified"
        else
            fail "$tag: bundle downloaded from the collector and verified" "$(fetch_verify "$id" 2>&1 | tail -n 3 | tr '\n' '|')"
        fi
    fi
}

# server_child_shell freeze|deny: a listening process (busybox nc) starts
# a shell for a connection; with "freeze" the kernel stops it at exec, the
# agent captures and releases it (the shell answers); with "deny" the BPF
# LSM hook refuses the exec (no answer, an exec_denied detection).
server_child_shell() {
    local want="$1" port=$((8000 + RANDOM % 1000)) server reply frozen_before denied_before
    busybox nc -ll -p "$port" -e /bin/sh </dev/null >/dev/null 2>&1 &
    server=$!
    sleep 1
    frozen_before="$(metric vigil_frozen_total)"
    denied_before="$(grep -c '"exec_denied"' /var/log/vigil/detections.jsonl 2>/dev/null)"
    reply="$(printf 'echo vmtest-shell-ran\nexit\n' | timeout 60 busybox nc 127.0.0.1 "$port" 2>&1)"
    echo "server child ($want) reply: $reply" >>"$SHARE/info.txt"
    if [ "$want" = deny ]; then
        if [ "$reply" != "vmtest-shell-ran" ] &&
            wait_for 60 bash -c "[ \"\$(grep -c '\"exec_denied\"' /var/log/vigil/detections.jsonl)\" -gt ${denied_before:-0} ]"; then
            ok "server child shell denied at exec (BPF LSM), exec_denied raised"
        else
            fail "server child shell denied at exec (BPF LSM), exec_denied raised" "reply '$reply'"
        fi
    else
        if [ "$reply" = "vmtest-shell-ran" ] &&
            wait_for 30 metric_at_least vigil_frozen_total $((${frozen_before%.*} + 1)) &&
            wait_for 60 metric_at_least vigil_resumed_total 1; then
            ok "server child shell frozen at exec, then released"
        else
            fail "server child shell frozen at exec, then released" "reply '$reply', frozen $(metric vigil_frozen_total), resumed $(metric vigil_resumed_total)"
        fi
    fi
    kill "$server" 2>/dev/null || true
}

# The power-cut test (collector/tests/powercut.rs): a collector of its own
# (the packaged binary, SQLite, data on this disk) loaded with event and
# detection batches and bundle uploads, each acknowledgement logged on the
# share; the power is cut while the load runs (sysrq b: reboot at once, no
# sync, no unmount: what the kernel had not written is gone). The packaged
# units are stopped first and everything synced: the cut hits that
# collector's load only. After the reboot, power_cut_check asks the
# collector for every item it acknowledged.
POWER_CUT_DIR=/var/lib/vigil-powercut
power_cut_env() {
    env VIGIL_COLLECTOR_BIN=/usr/bin/vigil-collector VIGIL_POWERCUT_DIR="$POWER_CUT_DIR" \
        VIGIL_POWERCUT_ACKS="$SHARE/powercut/acks.txt" "$@"
}
power_cut() {
    systemctl stop vigil-agent.service vigil-collector.service
    cp "$SHARE/powercut/powercut" /root/powercut
    sync
    (cd /root && exec env VIGIL_COLLECTOR_BIN=/usr/bin/vigil-collector \
        VIGIL_POWERCUT_DIR="$POWER_CUT_DIR" VIGIL_POWERCUT_ACKS="$SHARE/powercut/acks.txt" \
        ./powercut --ignored --exact power_cut_load >"$SHARE/powercut/load.log" 2>&1) &
    local load=$!
    # Enough of each kind, then a few seconds more of load: the cut comes
    # while calls are in flight and within the kernel's writeback delay
    # (30 s) of the latest acknowledgements.
    if wait_for 300 bash -c "[ \"\$(awk '{print \$2}' '$SHARE/powercut/acks.txt' | sort -u | wc -l)\" -eq 3 ] && [ \"\$(wc -l <'$SHARE/powercut/acks.txt')\" -ge 100 ]"; then
        sleep 3
        say "power cut after $(wc -l <"$SHARE/powercut/acks.txt") acknowledgements"
        # On the share: phase 2 checks only after a cut that happened.
        echo cut >"$SHARE/powercut/cut"
        echo b >/proc/sysrq-trigger
        sleep 60
        rm -f "$SHARE/powercut/cut"
        fail "power cut under load" "sysrq b did not reset the guest"
    else
        fail "power cut under load" "the load did not get going: $(tail -n 5 "$SHARE/powercut/load.log" | tr '\n' '|')"
    fi
    kill "$load" 2>/dev/null
    pkill -KILL -f "powercut --ignored" 2>/dev/null || true
}
power_cut_check() {
    local out rc
    cp "$SHARE/powercut/powercut" /root/powercut
    out="$(cd /root && power_cut_env timeout 600 ./powercut --ignored --exact power_cut_check --nocapture 2>&1)"
    rc=$?
    printf '%s\n' "$out" >"$SHARE/powercut/check.log"
    if [ "$rc" -eq 0 ]; then
        ok "power cut under load: $(printf '%s' "$out" | sed -n 's/^power cut: //p' | head -n 1)"
    else
        fail "power cut under load" "$(printf '%s' "$out" | grep -m 3 -E 'acknowledged items lost|panicked|Error' | tr '\n' '|')"
    fi
}

case "$phase" in
1)
    debs=("$SHARE"/debs/*.deb)
    check "dpkg -i ${debs[*]##*/}" dpkg -i "${debs[@]}"
    if wait_for 120 units_active; then
        ok "units active after install"
    else
        fail "units active after install" "$(systemctl status --no-pager vigil-agent vigil-collector 2>&1 | tail -n 20 | tr '\n' '|')"
        finish
    fi
    check "systemd-analyze verify (agent unit)" systemd-analyze verify --man=no /lib/systemd/system/vigil-agent.service
    check "systemd-analyze verify (collector unit)" systemd-analyze verify --man=no /lib/systemd/system/vigil-collector.service
    exposure="$(systemd-analyze security vigil-agent.service 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
    echo "agent unit exposure: $exposure" >>"$SHARE/info.txt"
    if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 4.5) }'; then
        ok "systemd-analyze security vigil-agent.service: $exposure"
    else
        fail "systemd-analyze security vigil-agent.service" "exposure '$exposure' (limit 4.5)"
    fi

    # Ship to the collector on this VM (the PKI its postinst made has an
    # agent certificate named after the host).
    host="$(hostname)"
    config_add ship "# Added by cargo xtask vm-test." \
        'collector = "https://127.0.0.1:7443"' \
        'collector_pki = "/etc/vigil/pki"' \
        "agent_name = \"$host\""
    if [ -n "${VMTEST_EXTRA_CONFIG:-}" ]; then
        printf '%s\n' "$VMTEST_EXTRA_CONFIG" >>/etc/vigil/agent.toml
    fi
    if [ -f "$SHARE/agent-extra.toml" ]; then
        cat "$SHARE/agent-extra.toml" >>/etc/vigil/agent.toml
    fi
    systemctl restart vigil-agent.service
    if wait_for 120 agent_ready; then
        ok "agent restarted with shipping configured"
    else
        fail "agent restarted with shipping configured" "$(journalctl -b --no-pager -u vigil-agent | tail -n 15 | tr '\n' '|')"
        finish
    fi
    metrics >"$SHARE/metrics-start.txt"
    # Which kind of hook serves what: BPF LSM for file writes and connects
    # where the kernel has it active, syscall tracepoints elsewhere.
    if grep -q bpf "$SHARE/lsm.txt"; then
        want=lsm
    else
        want=tracepoint
    fi
    for f in file_write connect; do
        check "$f served by $want hooks" grep -qF "vigil_hook_path{feature=\"$f\",path=\"$want\"} 1" "$SHARE/metrics-start.txt"
    done
    check "process events served by tracepoints" grep -qF 'vigil_hook_path{feature="process",path="tracepoint"} 1' "$SHARE/metrics-start.txt"
    journalctl -b --no-pager -u vigil-agent | grep -F "hook" >"$SHARE/hooks.txt" || true

    exec_chain "install"

    # A server's child shell: stopped at exec, captured and released (the
    # in-kernel freeze, default policy).
    server_child_shell freeze
    # The same with deny_exec: refused before it exists where BPF LSM is
    # active (the agent says whether it is), frozen instead elsewhere.
    config_add sensor 'deny_exec = ["server_child"]'
    systemctl restart vigil-agent.service
    if wait_for 120 agent_ready; then
        ok "agent restarted with deny_exec"
    else
        fail "agent restarted with deny_exec" "$(journalctl -b --no-pager -u vigil-agent | tail -n 15 | tr '\n' '|')"
        finish
    fi
    metrics >"$SHARE/metrics-deny.txt"
    if [ "$(metric vigil_exec_deny_active)" = "1" ]; then
        echo "deny_exec: BPF LSM" >>"$SHARE/info.txt"
        server_child_shell deny
    else
        echo "deny_exec: frozen instead (no BPF LSM)" >>"$SHARE/info.txt"
        if grep -q bpf "$SHARE/lsm.txt"; then
            fail "deny_exec enforced by BPF LSM" "BPF LSM is active ($(cat "$SHARE/lsm.txt")) but the agent does not use it: $(journalctl -b --no-pager -u vigil-agent | grep -F deny_exec | tail -n 2 | tr '\n' '|')"
        fi
        server_child_shell freeze
    fi
    if [ "$(metric vigil_resume_errors_total)" = "0" ]; then
        ok "no resume errors"
    else
        fail "no resume errors" "$(metric vigil_resume_errors_total)"
    fi

    dump_logs
    echo 2 >"$STATE/phase"
    sync
    if [ -x "$SHARE/powercut/powercut" ]; then
        power_cut
    fi
    say "rebooting"
    systemctl --no-block reboot
    exit 0
    ;;
2)
    if wait_for 120 agent_ready; then
        ok "units active after reboot"
    else
        fail "units active after reboot" "$(systemctl status --no-pager vigil-agent vigil-collector 2>&1 | tail -n 20 | tr '\n' '|')"
        finish
    fi
    if [ -f "$SHARE/powercut/cut" ]; then
        power_cut_check
    fi
    check "configuration kept across the reboot" grep -q '^collector = "https://127.0.0.1:7443"' /etc/vigil/agent.toml
    exec_chain "reboot"
    # Every bundle of both boots, in sealing order, from the collector: one
    # agent's unbroken chain of custody.
    mapfile -t ids < <(jq -r '.evidence.bundle_id // empty' /var/log/vigil/evidence.jsonl)
    files=()
    missing=""
    for id in "${ids[@]}"; do
        if [ -f "$STATE/bundles/$id.zst" ] || wait_for 60 fetch_verify "$id"; then
            files+=("$STATE/bundles/$id.zst")
        else
            missing="$missing $id"
        fi
    done
    if [ -n "$missing" ]; then
        fail "every bundle at the collector" "missing:$missing"
    else
        ok "every bundle at the collector (${#files[@]})"
    fi
    if [ "${#files[@]}" -ge 2 ]; then
        check "chain of custody across the reboot (${#files[@]} bundles)" vigil evidence verify "${files[@]}"
    else
        fail "chain of custody across the reboot" "only ${#files[@]} bundle(s)"
    fi

    # The kernel-facing end-to-end tests (tests/tests/{sensor,deny_exec}.rs),
    # each with its own agent and its defaults (the packaged agent is
    # stopped meanwhile), on this kernel; one binary at a time.
    if [ -d "$SHARE/tests" ]; then
        systemctl stop vigil-agent.service
        for bin in "$SHARE"/tests/*; do
            t="${bin##*/}"
            cp "$bin" "/root/test-$t"
            busiest
            say "running the $t end-to-end tests"
            # Emulated (TCG), code runs tens of times slower than on the
            # host: the tests' agents get a longer capture deadline (a
            # safety bound sized for real hardware, 10 s by default).
            # One test at a time: two test agents can both freeze and capture
            # a server's shell that one test started, and with 60 s
            # capture deadlines an agent could then take longer than the
            # tests' 60 s to stop (the probable cause of four such failures
            # in one run; the agents' logs were not kept then). TCG runs
            # one vCPU at a time anyway.
            # `cargo xtask vm-test --e2e-filter` leaves a libtest filter.
            filter=$(cat "$SHARE/test-filter" 2>/dev/null)
            (cd /root && VIGIL_AGENT_BIN=/usr/bin/vigil-agent VIGIL_TEST_CAPTURE_DEADLINE_MS=60000 \
                timeout 1500 "./test-$t" --test-threads=1 ${filter:+"$filter"} \
                >"$SHARE/test-$t.log" 2>&1)
            rc=$?
            n=0
            while read -r line; do
                case "$line" in
                "test "*" ... ok")
                    n=$((n + 1))
                    name="${line#test }"
                    ok "e2e $t: ${name% ... ok}"
                    ;;
                "test "*" ... FAILED")
                    n=$((n + 1))
                    name="${line#test }"
                    fail "e2e $t: ${name% ... FAILED}" "see test-$t.log"
                    ;;
                esac
            done <"$SHARE/test-$t.log"
            if [ "$n" -eq 0 ] && [ "$rc" -eq 0 ] && [ -n "$filter" ]; then
                say "no $t test matches $filter"
            elif [ "$n" -eq 0 ] || { [ "$rc" -ne 0 ] && ! grep -q "FAILED" "$SHARE/test-$t.log"; }; then
                fail "e2e $t: tests ran" "exit $rc: $(tail -n 5 "$SHARE/test-$t.log" | tr '\n' '|')"
            fi
        done
        systemctl start vigil-agent.service
        wait_for 120 agent_ready || true
    fi

    # The harness's own curl (reading metrics while an agent starts) is no
    # shell: an agent that saw its fork but not its exec would say it is.
    check "no shell detection for a process that had exec'd curl" bash -c \
        "! jq -e 'select(.rule == \"shell_network_connection\" and .process.comm == \"curl\")' /var/log/vigil/detections.jsonl"

    dump_logs
    check "apt-get remove vigil-agent" apt-get remove -y -q vigil-agent
    check "agent unit gone after remove" bash -c '! systemctl is-active --quiet vigil-agent.service'
    check "configuration kept after remove" test -f /etc/vigil/agent.toml
    check "state kept after remove" test -d /var/lib/vigil
    check "no process left stopped" bash -c '! ps -eo stat= | grep -q "^T"'
    check "apt-get purge vigil-agent vigil-collector" apt-get purge -y -q vigil-agent vigil-collector
    check "configuration and state gone after purge" bash -c '! test -e /etc/vigil && ! test -e /var/lib/vigil && ! test -e /var/lib/vigil-collector'
    check "collector account gone after purge" bash -c '! getent passwd vigil-collector'
    check "no vigil unit left" bash -c '! systemctl list-unit-files "vigil-agent*" "vigil-collector*" --no-legend | grep -q .'
    echo 3 >"$STATE/phase"
    finish
    ;;
*)
    fail "unexpected phase" "$phase"
    finish
    ;;
esac
