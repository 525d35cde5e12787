//! The benchmark's summary: one row per workload and sensor arm, as a
//! console line per window and a markdown table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::load::Workload;
use super::{Arm, BenchArgs, Machine, WindowResult};

/// One workload under one sensor, over all rounds.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    workload: Workload,
    arm: String,
    /// Median operation rate of the no-sensor windows and of this arm's.
    ops_per_s_none: Option<f64>,
    ops_per_s: Option<f64>,
    /// Median over rounds of (this arm / the round's no-sensor window).
    ratio: Option<f64>,
    pair_ratios: Vec<f64>,
    cpu_pct: Option<f64>,
    cpu_us_per_event: Option<f64>,
    rss_max_mb: Option<f64>,
    /// Medians of the windows' first-fifth and last-fifth mean RSS.
    rss_first_mb: Option<f64>,
    rss_last_mb: Option<f64>,
    /// The agent's process tree at the end of the window (median).
    process_tree_size: Option<f64>,
    bpf_us_per_op: Option<f64>,
    /// Medians per BPF program, us per operation.
    bpf_us_per_op_by_program: BTreeMap<String, f64>,
    events_per_s: Option<f64>,
    /// Medians per kind, events/s.
    events_per_s_by_kind: BTreeMap<String, f64>,
    kernel_dropped: f64,
    decode_errors: f64,
    ship_events_dropped: f64,
    shipped: BTreeMap<String, f64>,
    collector_cpu_pct: Option<f64>,
    detections: usize,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    errors: u64,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Nearest-rank percentile (`p` in 0..=100).
pub fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

/// The rows of a run, in the order the workloads and arms ran.
pub fn rows(results: &[WindowResult]) -> Vec<Row> {
    let mut out = Vec::new();
    let mut keys: Vec<(Workload, Arm)> = Vec::new();
    for r in results {
        if r.arm != Arm::None && !keys.contains(&(r.workload, r.arm.clone())) {
            keys.push((r.workload, r.arm.clone()));
        }
    }
    for (workload, arm) in keys {
        let of = |a: &Arm| {
            results
                .iter()
                .filter(|r| r.workload == workload && &r.arm == a)
                .collect::<Vec<_>>()
        };
        let mine = of(&arm);
        let none = of(&Arm::None);
        let pair_ratios: Vec<f64> = mine
            .iter()
            .filter_map(|m| {
                let n = none.iter().find(|n| n.round == m.round)?;
                (n.ops_per_s > 0.0).then(|| m.ops_per_s / n.ops_per_s)
            })
            .collect();
        let stats: Vec<_> = mine.iter().filter_map(|r| r.sensor.as_ref()).collect();
        let col = |f: &dyn Fn(&super::SensorStats) -> Option<f64>| {
            stats.iter().filter_map(|s| f(s)).collect::<Vec<_>>()
        };
        let sum_map = |f: &dyn Fn(&super::SensorStats) -> &BTreeMap<String, f64>| {
            stats
                .iter()
                .flat_map(|s| f(s).values())
                .copied()
                .sum::<f64>()
        };
        let mut kinds = BTreeMap::new();
        for s in &stats {
            for k in s.events.keys() {
                kinds.entry(k.clone()).or_insert_with(Vec::new);
            }
        }
        for (k, v) in kinds.iter_mut() {
            for r in &mine {
                if let Some(s) = &r.sensor {
                    v.push(s.events.get(k).copied().unwrap_or(0.0) / r.seconds);
                }
            }
        }
        let mut programs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for s in &stats {
            for (k, v) in &s.bpf_ns_per_op_by_program {
                programs.entry(k.clone()).or_default().push(v / 1000.0);
            }
        }
        let mut shipped = BTreeMap::new();
        for s in &stats {
            for (k, v) in &s.shipped {
                *shipped.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        let latencies: Vec<f64> = stats
            .iter()
            .flat_map(|s| s.detection_latency_ms.iter().copied())
            .collect();
        out.push(Row {
            workload,
            arm: arm.label(),
            ops_per_s_none: median(none.iter().map(|r| r.ops_per_s).collect()),
            ops_per_s: median(mine.iter().map(|r| r.ops_per_s).collect()),
            ratio: median(pair_ratios.clone()),
            pair_ratios,
            cpu_pct: median(col(&|s| s.cpu_pct)),
            cpu_us_per_event: median(col(&|s| s.cpu_us_per_event)),
            rss_max_mb: col(&|s| s.rss_max_mb).into_iter().reduce(f64::max),
            rss_first_mb: median(col(&|s| s.rss_first_mb)),
            rss_last_mb: median(col(&|s| s.rss_last_mb)),
            process_tree_size: median(col(&|s| s.process_tree_size)),
            bpf_us_per_op: median(col(&|s| s.bpf_ns_per_op)).map(|ns| ns / 1000.0),
            bpf_us_per_op_by_program: programs
                .into_iter()
                .filter_map(|(k, v)| Some((k, median(v)?)))
                .collect(),
            events_per_s: median(col(&|s| s.events_per_s)),
            events_per_s_by_kind: kinds
                .into_iter()
                .filter_map(|(k, v)| Some((k, median(v)?)))
                .collect(),
            kernel_dropped: sum_map(&|s| &s.kernel_dropped),
            decode_errors: col(&|s| s.decode_errors).iter().sum(),
            ship_events_dropped: col(&|s| s.ship_events_dropped).iter().sum(),
            shipped,
            collector_cpu_pct: median(mine.iter().filter_map(|r| r.collector_cpu_pct).collect()),
            detections: latencies.len(),
            latency_p50_ms: percentile(latencies.clone(), 50.0),
            latency_p99_ms: percentile(latencies, 99.0),
            errors: mine.iter().map(|r| r.errors).sum(),
        });
    }
    out
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    }
}

/// Thousands as `k`.
fn rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// One console line per window.
pub fn window_line(r: &WindowResult) -> String {
    let mut line = format!(
        "{:<8} round {} {:<12} {:>6.1} s {:>9.0} {}/s",
        r.workload.name(),
        r.round,
        r.arm.label(),
        r.seconds,
        r.ops_per_s,
        r.workload.op(),
    );
    if let Some(s) = &r.sensor {
        line += &format!(
            "  cpu {}%  rss {} MB",
            opt(s.cpu_pct, 1),
            opt(s.rss_max_mb, 1)
        );
        if !s.events.is_empty() {
            let drops: f64 = s.kernel_dropped.values().sum::<f64>().max(0.0) + 0.0;
            line += &format!(
                "  events {}/s  drops {drops:.0}  detections {}",
                opt(s.events_per_s, 0),
                s.detection_latency_ms.len()
            );
        }
        line += &format!("  (exit: {})", s.exit);
    }
    if r.errors > 0 {
        line += &format!("  errors {}", r.errors);
    }
    line
}

/// The markdown table of a run, with how it was made.
pub fn markdown(rows: &[Row], args: &BenchArgs, machine: &Machine) -> String {
    let mut t = format!(
        "`cargo xtask bench --workload {} --rounds {} --window-secs {}{}{}{}{}{}`, {} CPUs, kernel {}. \
         Ratio: median over rounds of (op/s with the sensor / op/s of the round's no-sensor window), \
         pairs in brackets; arms in a balanced order per round (Williams design).\n\n",
        args.workload
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(","),
        args.rounds,
        args.window_secs,
        if args.workload.contains(&Workload::Churn) {
            format!(" --churn-live {}", args.churn_live)
        } else {
            String::new()
        },
        if args.ship { " --ship" } else { "" },
        if args.bpf_stats { " --bpf-stats" } else { "" },
        if args.inherit_env {
            " --inherit-env"
        } else {
            ""
        },
        args.compare
            .iter()
            .map(|c| format!(" --compare '{c}'"))
            .collect::<String>(),
        machine.cpus,
        machine.kernel,
    );
    t += "| workload | sensor | op/s without | op/s with | ratio | CPU % core | CPU us/event | RSS max MB | BPF us/op | events/s | dropped | detection p50 / p99 ms (n) |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        let pairs = r
            .pair_ratios
            .iter()
            .map(|p| format!("{p:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let by_kind = r
            .events_per_s_by_kind
            .iter()
            .filter(|(_, v)| **v >= 1.0)
            .map(|(k, v)| format!("{k} {}", rate(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        let events = match r.events_per_s {
            Some(e) if !by_kind.is_empty() => format!("{} ({by_kind})", rate(e)),
            Some(e) => rate(e),
            None => "-".into(),
        };
        let latency = if r.detections > 0 {
            format!(
                "{} / {} ({})",
                opt(r.latency_p50_ms, 1),
                opt(r.latency_p99_ms, 1),
                r.detections
            )
        } else {
            "-".into()
        };
        t += &format!(
            "| {} ({}/s) | {} | {} | {} | {} [{pairs}] | {} | {} | {} | {} | {} | {} | {latency} |\n",
            r.workload.name(),
            r.workload.op(),
            r.arm,
            opt(r.ops_per_s_none, 0),
            opt(r.ops_per_s, 0),
            opt(r.ratio, 3),
            opt(r.cpu_pct, 1),
            opt(r.cpu_us_per_event, 1),
            opt(r.rss_max_mb, 1),
            opt(r.bpf_us_per_op, 1),
            events,
            if r.events_per_s.is_some() {
                format!("{:.0}", r.kernel_dropped.max(0.0) + 0.0)
            } else {
                "-".into()
            },
        );
    }
    let shipped: Vec<String> = rows
        .iter()
        .filter(|r| !r.shipped.is_empty() || r.ship_events_dropped > 0.0)
        .map(|r| {
            format!(
                "{}: collector CPU {} % of a core, shipped {}, events dropped before shipping {:.0}",
                r.workload.name(),
                opt(r.collector_cpu_pct, 1),
                r.shipped
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.ship_events_dropped
            )
        })
        .collect();
    if !shipped.is_empty() {
        t += &format!("\nShipping: {}.\n", shipped.join("; "));
    }
    let memory: Vec<String> = rows
        .iter()
        .filter(|r| r.rss_first_mb.is_some())
        .map(|r| {
            format!(
                "{} ({}): {} -> {} MB, tree {}",
                r.workload.name(),
                r.arm,
                opt(r.rss_first_mb, 1),
                opt(r.rss_last_mb, 1),
                opt(r.process_tree_size, 0),
            )
        })
        .collect();
    if !memory.is_empty() {
        t += &format!(
            "\nRSS over each window, mean of its first -> last fifth, and the process tree's size at its end: {}.\n",
            memory.join("; ")
        );
    }
    let bpf: Vec<String> = rows
        .iter()
        .filter(|r| !r.bpf_us_per_op_by_program.is_empty())
        .map(|r| {
            let mut progs: Vec<_> = r.bpf_us_per_op_by_program.iter().collect();
            progs.sort_by(|a, b| b.1.total_cmp(a.1));
            format!(
                "{} ({}): {}",
                r.workload.name(),
                r.arm,
                progs
                    .iter()
                    .filter(|(_, us)| **us >= 0.05)
                    .map(|(k, us)| format!("{k} {us:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    if !bpf.is_empty() {
        t += &format!("\nBPF us per operation by program: {}.\n", bpf.join("; "));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(v.clone(), 50.0), Some(50.0));
        assert_eq!(percentile(v.clone(), 99.0), Some(99.0));
        assert_eq!(percentile(v, 100.0), Some(100.0));
        assert_eq!(percentile(vec![7.0], 99.0), Some(7.0));
    }
}
