//! Cluster placement and overlapped staging against the stack's two Slurm clusters.
//!
//! Needs `scripts/stack.sh up --two-clusters` (DATANET_SLURM_CONF_B). The tests observe
//! cluster load, so they run one at a time.

mod support;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::{stderr, text, Harness};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn workdir_exists_without_marker(record: &serde_json::Value) -> bool {
    let workdir = std::path::PathBuf::from(record["workdir"].as_str().unwrap());
    workdir.is_dir() && !workdir.join(".jobwrap/inputs-verified").exists()
}

/// Waits until neither cluster has active jobs, because placement depends on load and
/// other test suites may share the stack's clusters.
fn wait_until_idle(h: &Harness) {
    let started = Instant::now();
    loop {
        let busy: Vec<String> = ["a", "b"]
            .iter()
            .flat_map(|cluster| {
                let output = Command::new("squeue")
                    .env("SLURM_CONF", h.slurm_conf_of(cluster))
                    .args(["-h", "-t", "PD,CF,R,CG", "-o", "%i %j %T"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&output.stdout).lines().map(|line| format!("{cluster}: {line}")).collect::<Vec<_>>()
            })
            .collect();
        if busy.is_empty() {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "clusters stay busy with other jobs: {busy:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Submits a job that takes both CPUs of a cluster and waits until it runs.
fn fill_cluster(h: &Harness, cluster: &str) -> String {
    let output = Command::new("sbatch")
        .env("SLURM_CONF", h.slurm_conf_of(cluster))
        .args(["--parsable", "-c", "2", "-t", "5", "-o", "/dev/null", "-J", &h.name, "--wrap", "sleep 300"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let job_id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let started = Instant::now();
    while !h.slurm_jobs_on(cluster).iter().any(|(id, state)| *id == job_id && state.starts_with("RUNNING")) {
        assert!(started.elapsed() < Duration::from_secs(30), "filler job did not start on {cluster}");
        std::thread::sleep(Duration::from_millis(200));
    }
    job_id
}

fn simple_script(h: &Harness, input: &str) -> std::path::PathBuf {
    h.write_script(
        "job.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in {input}=input.txt\n\
             #DATANET --stage-out result.txt=results:out/result.txt\ncat input.txt > result.txt\n",
            h.name
        ),
    )
}

#[test]
fn busy_cluster_sends_job_elsewhere() {
    let _serial = serial();
    let h = Harness::two_clusters("busy");
    wait_until_idle(&h);
    let filler = fill_cluster(&h, "a");

    // The input is near cluster a, but a is full, so the job goes to b.
    h.put("models", "in.txt", b"payload\n");
    let script = simple_script(&h, "models:in.txt");
    let output = h.run(&["sbatch", "-t", "5", script.to_str().unwrap()]);
    h.scancel_on("a", &filler);
    assert!(output.status.success(), "{}", stderr(&output));

    let record = h.only_record();
    assert_eq!(record["cluster"], "b", "{record:#}");
    assert_eq!(record["placement"]["cluster"], "b");
    assert!(record["placement"]["reason"].as_str().unwrap().contains("can start now"));
    assert!(record["workdir"].as_str().unwrap().contains("scratch-b"));
    assert_eq!(text(h.get("results", "out/result.txt")), "payload\n");

    let status = h.run(&["status", record["id"].as_str().unwrap()]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("placement:  b"));
}

#[test]
fn idle_clusters_prefer_near_inputs() {
    let _serial = serial();
    let h = Harness::two_clusters("near");
    std::fs::write(h.dir.path().join("local space/local.txt"), "local\n").unwrap();
    h.put("models", "remote.txt", b"remote\n");

    let near_b = simple_script(&h, "scratchspace:local.txt");
    wait_until_idle(&h);
    let output = h.run(&["sbatch", "--stage-out", "input.txt=results:b/", near_b.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let near_a = simple_script(&h, "models:remote.txt");
    wait_until_idle(&h);
    let output = h.run(&["sbatch", "--stage-out", "input.txt=results:a/", near_a.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    let records = h.records();
    assert_eq!(records[0]["cluster"], "b", "{:#}", records[0]);
    assert_eq!(records[1]["cluster"], "a", "{:#}", records[1]);
    assert!(records[0]["placement"]["reason"].as_str().unwrap().contains("tie broken"));
    assert_eq!(text(h.get("results", "b/input.txt")), "local\n");
    assert_eq!(text(h.get("results", "a/input.txt")), "remote\n");
}

#[test]
fn unreachable_cluster_skipped() {
    let _serial = serial();
    let mut h = Harness::two_clusters("down");
    h.add_unreachable_cluster("c");
    std::fs::write(h.dir.path().join("local space/local.txt"), "local\n").unwrap();

    // Cluster c is near every space, so only its silence keeps the job away from it.
    let script = simple_script(&h, "scratchspace:local.txt");
    wait_until_idle(&h);
    let output = h.run(&["sbatch", script.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("cluster c skipped"), "{}", stderr(&output));

    let record = h.only_record();
    assert_ne!(record["cluster"], "c");
    let reason = record["placement"]["reason"].as_str().unwrap();
    assert!(reason.contains("c: no answer"), "{reason}");

    let clusters = h.run(&["clusters"]);
    let table = String::from_utf8_lossy(&clusters.stdout).into_owned();
    assert!(table.lines().any(|line| line.starts_with("c ") && line.contains("unreachable")), "{table}");
}

#[test]
fn cancel_and_resume_reach_chosen_cluster() {
    let _serial = serial();
    let h = Harness::two_clusters("remote-cancel");
    std::fs::write(h.dir.path().join("local space/local.txt"), "local\n").unwrap();
    let script = h.write_script(
        "long.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in scratchspace:local.txt\n\
             #DATANET --stage-out 'ckpt_*'=results:ckpt/\n\
             for i in $(seq 100); do echo $i > ckpt_$i; sleep 1; done\n",
            h.name
        ),
    );
    wait_until_idle(&h);
    let output = h.run(&["sbatch", "--detach", script.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert_eq!(h.only_record()["cluster"], "b");

    let started = Instant::now();
    while !h.slurm_jobs_on("b").iter().any(|(_, state)| state.starts_with("RUNNING")) {
        assert!(started.elapsed() < Duration::from_secs(30), "job did not start on b");
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = h.run(&["cancel", &id]);
    assert!(output.status.success(), "{}", stderr(&output));

    let record = h.only_record();
    assert_eq!(record["state"], "cancelled", "{record:#}");
    let on_b = h.slurm_jobs_on("b");
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert!(on_b[0].1.starts_with("CANCELLED"), "{on_b:?}");
    assert!(h.slurm_jobs_on("a").is_empty());

    // A second job on b, killed while it runs, is resumed on b.
    let resumed = Harness::two_clusters("remote-resume");
    std::fs::write(resumed.dir.path().join("local space/local.txt"), "local\n").unwrap();
    let script = simple_script(&resumed, "scratchspace:local.txt");
    wait_until_idle(&resumed);
    let status = resumed
        .jobwrap()
        .args(["sbatch", script.to_str().unwrap()])
        .env("JOBWRAP_FAULT_KILL_AT", "after-sbatch")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    let id = resumed.only_record()["id"].as_str().unwrap().to_string();
    let output = resumed.run(&["resume", &id]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(resumed.only_record()["state"], "completed");
    assert_eq!(resumed.slurm_jobs_on("b").len(), 1);
    assert!(resumed.slurm_jobs_on("a").is_empty());
}

/// A held job stays held while its inputs are incomplete, and a killed jobwrap
/// resumes the staging without a second submission.
#[test]
fn held_job_released_after_inputs_verified() {
    let _serial = serial();
    let h = Harness::new("held");
    h.put("models", "in/a.txt", b"alpha\n");
    h.put("models", "in/b.txt", b"beta\n");
    let script = h.write_script(
        "job.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in models:in/ --to in/\n\
             #DATANET --stage-out seen.txt=results:held/seen.txt\ncat in/a.txt in/b.txt > seen.txt\n",
            h.name
        ),
    );
    let status = h
        .jobwrap()
        .args(["sbatch", script.to_str().unwrap()])
        .env("JOBWRAP_FAULT_KILL_AT", "stage-in")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());

    let record = h.only_record();
    assert_eq!(record["phase"], "stage-in");
    let jobs = h.slurm_jobs_on("a");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].1.starts_with("PENDING|BeginTime"), "{jobs:?}");
    assert!(workdir_exists_without_marker(&record), "inputs marked verified before stage-in finished");
    let workdir = std::path::PathBuf::from(record["workdir"].as_str().unwrap());
    assert!(!workdir.join(".jobwrap/started").exists());

    let output = h.run(&["resume", record["id"].as_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(h.only_record()["state"], "completed");
    assert_eq!(text(h.get("results", "held/seen.txt")), "alpha\nbeta\n");
    assert_eq!(h.slurm_jobs_on("a").len(), 1);
}

#[test]
fn failed_stage_in_cancels_held_job() {
    let _serial = serial();
    let h = Harness::new("stagefail");
    h.put("models", "in/a.txt", b"alpha\n");
    h.put("models", "in/b.txt", b"beta\n");
    let script = h.write_script(
        "job.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in models:in/ --to in/\n\
             #DATANET --stage-out seen.txt=results:fail/seen.txt\ncat in/* > seen.txt\n",
            h.name
        ),
    );
    let status = h
        .jobwrap()
        .args(["sbatch", script.to_str().unwrap()])
        .env("JOBWRAP_FAULT_KILL_AT", "stage-in")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    h.delete("models", "in/a.txt");
    h.delete("models", "in/b.txt");

    let record = h.only_record();
    let output = h.run(&["resume", record["id"].as_str().unwrap()]);
    assert!(!output.status.success());

    let record = h.only_record();
    assert_eq!(record["state"], "cancelled", "{record:#}");
    assert_eq!(record["phase"], "finished");
    let error = record["error"].as_str().unwrap();
    assert!(error.contains("stage-in failed"), "{error}");
    assert!(error.contains("models:in/"), "{error}");
    let jobs = h.slurm_jobs_on("a");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].1.starts_with("CANCELLED"), "{jobs:?}");
    assert!(h.get("results", "fail/seen.txt").is_none());
}
