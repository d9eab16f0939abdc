//! Choosing the cluster where a job can start soonest.
//!
//! Every configured cluster is asked at once, with a deadline, for its nodes (`sinfo
//! --json`: CPUs and memory, total and allocated) and its pending work (`squeue -t PD`).
//! A cluster that does not respond in time is skipped with a warning. Clusters whose
//! largest node cannot hold the request are filtered out. The rest are ranked: a
//! cluster with idle CPUs and memory for the request and no pending jobs first, then by
//! the CPU demand queued ahead of the job relative to the cluster's size. Ties go to
//! the cluster with the most input bytes in its `near_spaces`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datanet::config::ClusterConfig;
use serde::{Deserialize, Serialize};

use crate::sbatch_options::{option_value, SbatchOption};

/// Maximum time a cluster may take to respond before it is skipped.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The resources a job requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub cpus: u64,
    /// Zero when the job does not ask for memory.
    pub memory_mb: u64,
}

impl Request {
    /// Reads `--cpus-per-task`, `--ntasks`, `--mem` and `--mem-per-cpu` (defaults: one
    /// CPU, no memory).
    pub fn from_options(options: &[SbatchOption]) -> Request {
        let number = |long: &str, short: Option<char>| {
            option_value(options, long, short).and_then(|value| value.parse::<u64>().ok())
        };
        let cpus = number("cpus-per-task", Some('c')).unwrap_or(1).max(1) * number("ntasks", Some('n')).unwrap_or(1).max(1);
        let memory_mb = match option_value(options, "mem", None).and_then(|value| parse_memory_mb(&value)) {
            Some(memory) => memory,
            None => option_value(options, "mem-per-cpu", None)
                .and_then(|value| parse_memory_mb(&value))
                .map(|per_cpu| per_cpu * cpus)
                .unwrap_or(0),
        };
        Request { cpus, memory_mb }
    }
}

/// Parses a Slurm memory size (default unit MiB).
pub fn parse_memory_mb(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, factor) = match text.chars().last()?.to_ascii_uppercase() {
        'K' => (&text[..text.len() - 1], 0.0009765625),
        'M' => (&text[..text.len() - 1], 1.0),
        'G' => (&text[..text.len() - 1], 1024.0),
        'T' => (&text[..text.len() - 1], 1024.0 * 1024.0),
        _ => (text, 1.0),
    };
    let value: f64 = number.parse().ok()?;
    Some((value * factor).ceil() as u64)
}

/// Load figures reported by one cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterLoad {
    pub cluster: String,
    pub total_cpus: u64,
    pub idle_cpus: u64,
    pub total_memory_mb: u64,
    pub idle_memory_mb: u64,
    pub largest_node_cpus: u64,
    pub largest_node_memory_mb: u64,
    pub pending_jobs: u64,
    pub pending_cpus: u64,
}

/// A cluster's load, or the reason it has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub cluster: String,
    pub load: Option<ClusterLoad>,
    pub error: Option<String>,
    /// Input bytes in spaces near this cluster.
    pub near_input_bytes: u64,
}

/// The chosen cluster, why, and what every cluster reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub cluster: String,
    pub reason: String,
    pub request: Request,
    pub candidates: Vec<Candidate>,
}

/// Queries every cluster's load at once, each with its own deadline.
pub fn survey(clusters: &[ClusterConfig]) -> Vec<(String, Result<ClusterLoad, String>)> {
    let handles: Vec<_> = clusters
        .iter()
        .cloned()
        .map(|cluster| std::thread::spawn(move || (cluster.name.clone(), query_load(&cluster))))
        .collect();
    handles
        .into_iter()
        .map(|handle| handle.join().unwrap_or_else(|_| (String::new(), Err("query panicked".into()))))
        .collect()
}

/// Chooses a cluster for `request`. `near_bytes` maps cluster names to the input bytes
/// stored near them.
pub fn choose(
    clusters: &[ClusterConfig],
    request: Request,
    near_bytes: &BTreeMap<String, u64>,
) -> Result<Placement, String> {
    let mut candidates = Vec::new();
    for (name, answer) in survey(clusters) {
        let near_input_bytes = near_bytes.get(&name).copied().unwrap_or(0);
        match answer {
            Ok(load) => candidates.push(Candidate {
                cluster: name,
                load: Some(load),
                error: None,
                near_input_bytes,
            }),
            Err(error) => {
                tracing::warn!(cluster = %name, %error, "cluster did not respond; skipped");
                eprintln!("jobwrap: warning: cluster {name} skipped: {error}");
                candidates.push(Candidate {
                    cluster: name,
                    load: None,
                    error: Some(error),
                    near_input_bytes,
                });
            }
        }
    }
    rank(candidates, request)
}

/// Ranks the candidates. It is separate from [`choose`] so the rules can be tested without Slurm.
pub fn rank(candidates: Vec<Candidate>, request: Request) -> Result<Placement, String> {
    let fits = |load: &ClusterLoad| {
        load.largest_node_cpus >= request.cpus && (request.memory_mb == 0 || load.largest_node_memory_mb >= request.memory_mb)
    };
    let starts_now = |load: &ClusterLoad| {
        load.idle_cpus >= request.cpus && load.idle_memory_mb >= request.memory_mb && load.pending_jobs == 0
    };
    // CPU demand queued ahead of this job, per CPU of the cluster.
    let backlog = |load: &ClusterLoad| {
        let short = request.cpus.saturating_sub(load.idle_cpus);
        (load.pending_cpus + short) as f64 / load.total_cpus.max(1) as f64
    };

    let mut usable: Vec<(&Candidate, &ClusterLoad)> = candidates
        .iter()
        .filter_map(|candidate| candidate.load.as_ref().map(|load| (candidate, load)))
        .filter(|(_, load)| fits(load))
        .collect();
    if usable.is_empty() {
        let answers: Vec<String> = candidates.iter().map(describe).collect();
        return Err(format!(
            "no cluster can run a job of {} CPUs and {} MiB: {}",
            request.cpus,
            request.memory_mb,
            answers.join("; ")
        ));
    }
    usable.sort_by(|(a_candidate, a), (b_candidate, b)| {
        (!starts_now(a))
            .cmp(&!starts_now(b))
            .then(backlog(a).total_cmp(&backlog(b)))
            .then(b_candidate.near_input_bytes.cmp(&a_candidate.near_input_bytes))
            .then(a_candidate.cluster.cmp(&b_candidate.cluster))
    });

    let (best, best_load) = usable[0];
    let tie = usable.get(1).is_some_and(|(_, other)| {
        starts_now(other) == starts_now(best_load) && backlog(other) == backlog(best_load)
    });
    let mut reason = if starts_now(best_load) {
        format!("can start now ({} of {} CPUs idle, no pending jobs)", best_load.idle_cpus, best_load.total_cpus)
    } else {
        format!(
            "shortest queue ({} pending jobs, {} of {} CPUs idle)",
            best_load.pending_jobs, best_load.idle_cpus, best_load.total_cpus
        )
    };
    if tie {
        reason.push_str(&format!(
            "; tie broken by input bytes near the cluster ({} bytes)",
            best.near_input_bytes
        ));
    }
    let others: Vec<String> = candidates.iter().filter(|c| c.cluster != best.cluster).map(describe).collect();
    if !others.is_empty() {
        reason.push_str(&format!("; others: {}", others.join("; ")));
    }

    Ok(Placement {
        cluster: best.cluster.clone(),
        reason,
        request,
        candidates,
    })
}

fn describe(candidate: &Candidate) -> String {
    match (&candidate.load, &candidate.error) {
        (Some(load), _) => format!(
            "{}: {}/{} CPUs idle, {} pending jobs",
            candidate.cluster, load.idle_cpus, load.total_cpus, load.pending_jobs
        ),
        (None, Some(error)) => format!("{}: no answer ({error})", candidate.cluster),
        (None, None) => format!("{}: no answer", candidate.cluster),
    }
}

/// Queries one cluster with `sinfo --json` and `squeue`.
pub fn query_load(cluster: &ClusterConfig) -> Result<ClusterLoad, String> {
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let nodes = run_with_deadline(cluster, "sinfo", &["--json"], deadline)?;
    let pending = run_with_deadline(cluster, "squeue", &["-h", "-t", "PD", "-o", "%C|%r"], deadline)?;
    let mut load = parse_sinfo_json(&nodes, &cluster.partitions)?;
    load.cluster = cluster.name.clone();
    for line in pending.lines() {
        let Some((cpus, reason)) = line.split_once('|') else { continue };
        // Held and deferred jobs wait for a person, a begin time or jobwrap's own
        // stage-in, not for resources.
        if reason.contains("Held") || reason.contains("BeginTime") {
            continue;
        }
        load.pending_jobs += 1;
        load.pending_cpus += cpus.trim().parse::<u64>().unwrap_or(1);
    }
    Ok(load)
}

fn run_with_deadline(cluster: &ClusterConfig, program: &str, args: &[&str], deadline: Instant) -> Result<String, String> {
    let mut command = Command::new(program);
    if let Some(conf) = &cluster.slurm_conf {
        command.env("SLURM_CONF", conf);
    }
    let mut child = command
        .args(args.iter().map(OsString::from))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot run {program}: {err}"))?;

    // Read the pipes on their own threads so a large output cannot fill a pipe and block the child.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = std::io::Read::read_to_string(pipe, &mut text);
        }
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = std::io::Read::read_to_string(pipe, &mut text);
        }
        text
    });

    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let out = out_reader.join().unwrap_or_default();
                let err = err_reader.join().unwrap_or_default();
                if !status.success() {
                    let message = err.lines().next().unwrap_or("no error output").trim().to_string();
                    return Err(format!("{program} failed: {message}"));
                }
                return Ok(out);
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} did not answer within {} s", QUERY_TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(format!("cannot wait for {program}: {err}")),
        }
    }
}

/// Sums the usable nodes of `sinfo --json` output, counting each node once and only
/// nodes in `partitions` when that list is not empty.
pub fn parse_sinfo_json(text: &str, partitions: &[String]) -> Result<ClusterLoad, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|err| format!("invalid sinfo --json output: {err}"))?;
    let nodes = value["nodes"].as_array().ok_or("sinfo --json output has no nodes")?;
    let mut load = ClusterLoad::default();
    let mut seen = std::collections::BTreeSet::new();
    for node in nodes {
        let name = node["name"].as_str().unwrap_or_default().to_string();
        if !seen.insert(name) {
            continue;
        }
        if !partitions.is_empty() {
            let in_partition = node["partitions"]
                .as_array()
                .is_some_and(|list| list.iter().any(|p| p.as_str().is_some_and(|p| partitions.iter().any(|want| want == p))));
            if !in_partition {
                continue;
            }
        }
        let state = node["state"].as_str().unwrap_or_default().to_ascii_lowercase();
        if ["down", "drain", "fail", "unknown", "future"].iter().any(|bad| state.contains(bad)) {
            continue;
        }
        let number = |key: &str| node[key].as_u64().unwrap_or(0);
        let cpus = number("cpus");
        let memory = number("real_memory");
        load.total_cpus += cpus;
        load.idle_cpus += number("idle_cpus").min(cpus.saturating_sub(number("alloc_cpus")));
        load.total_memory_mb += memory;
        load.idle_memory_mb += memory.saturating_sub(number("alloc_memory"));
        load.largest_node_cpus = load.largest_node_cpus.max(cpus);
        load.largest_node_memory_mb = load.largest_node_memory_mb.max(memory);
    }
    Ok(load)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, idle: u64, pending: u64) -> Candidate {
        Candidate {
            cluster: name.into(),
            load: Some(ClusterLoad {
                cluster: name.into(),
                total_cpus: 2,
                idle_cpus: idle,
                total_memory_mb: 1000,
                idle_memory_mb: 1000,
                largest_node_cpus: 2,
                largest_node_memory_mb: 1000,
                pending_jobs: pending,
                pending_cpus: pending,
            }),
            error: None,
            near_input_bytes: 0,
        }
    }

    const ONE_CPU: Request = Request { cpus: 1, memory_mb: 0 };

    #[test]
    fn idle_cluster_beats_full_one() {
        let placement = rank(vec![load("a", 0, 0), load("b", 2, 0)], ONE_CPU).unwrap();
        assert_eq!(placement.cluster, "b");
        assert!(placement.reason.contains("can start now"), "{}", placement.reason);
    }

    #[test]
    fn tie_goes_to_near_inputs() {
        let mut b = load("b", 2, 0);
        b.near_input_bytes = 10;
        let placement = rank(vec![load("a", 2, 0), b], ONE_CPU).unwrap();
        assert_eq!(placement.cluster, "b");
        assert!(placement.reason.contains("tie broken"), "{}", placement.reason);
    }

    #[test]
    fn unanswered_and_too_small_clusters_skipped() {
        let down = Candidate {
            cluster: "c".into(),
            load: None,
            error: Some("timed out".into()),
            near_input_bytes: 100,
        };
        let placement = rank(vec![down.clone(), load("a", 0, 3)], ONE_CPU).unwrap();
        assert_eq!(placement.cluster, "a");
        assert!(placement.reason.contains("c: no answer"), "{}", placement.reason);

        let err = rank(vec![down, load("a", 2, 0)], Request { cpus: 8, memory_mb: 0 }).unwrap_err();
        assert!(err.contains("8 CPUs"), "{err}");
    }

    #[test]
    fn request_reads_sbatch_options() {
        let options = crate::sbatch_options::inspect(&["-c".into(), "2".into(), "-n2".into(), "--mem=2G".into()]);
        assert_eq!(Request::from_options(&options), Request { cpus: 4, memory_mb: 2048 });
        assert_eq!(parse_memory_mb("500"), Some(500));
    }

    #[test]
    fn sinfo_json_counts_nodes_once() {
        let text = r#"{"nodes": [
            {"name": "n1", "cpus": 4, "alloc_cpus": 1, "idle_cpus": 3, "real_memory": 100, "alloc_memory": 40, "partitions": ["main"], "state": "mixed"},
            {"name": "n1", "cpus": 4, "alloc_cpus": 1, "idle_cpus": 3, "real_memory": 100, "alloc_memory": 40, "partitions": ["debug"], "state": "mixed"},
            {"name": "n2", "cpus": 8, "alloc_cpus": 0, "idle_cpus": 8, "real_memory": 200, "alloc_memory": 0, "partitions": ["main"], "state": "down"}
        ]}"#;
        let load = parse_sinfo_json(text, &[]).unwrap();
        assert_eq!(load.total_cpus, 4);
        assert_eq!(load.idle_cpus, 3);
        assert_eq!(load.idle_memory_mb, 60);
    }
}
