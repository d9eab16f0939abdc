//! jobwrap against the real single-node Slurm cluster and Garage of scripts/stack.sh.
//!
//! Needs DATANET_CONFIG and DATANET_SLURM_CONF from `$RUN/env.sh`.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::{stderr, text, Harness};

const CALCULIX_TESTS: &str = "/usr/share/doc/calculix-ccx-test/examples/test";

#[test]
fn full_flow_with_two_spaces() {
    let h = Harness::new("full");
    h.put("models", "cases/input.txt", b"from garage\n");
    h.put("models", "meshes/part 1.msh", b"mesh one\n");
    h.put("models", "meshes/sub/part2.msh", b"mesh two\n");
    std::fs::create_dir_all(h.dir.path().join("local space/params")).unwrap();
    std::fs::write(h.dir.path().join("local space/params/settings.csv"), "a,b\n").unwrap();

    let script = h.write_script(
        "run.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n\
             #DATANET --stage-in models:cases/input.txt=input.txt\n\
             #DATANET --stage-in models:meshes/ --to mesh/\n\
             #DATANET --stage-in scratchspace:params/settings.csv\n\
             #DATANET --stage-out '*.dat'\n\
             #DATANET --stage-out 'mesh/**/*.out'\n\
             #DATANET --output results:runs/one/\n\
             cat input.txt settings.csv > result.dat\n\
             cat 'mesh/part 1.msh' mesh/sub/part2.msh > mesh/sub/joined.out\n\
             echo done on stdout\n",
            h.name
        ),
    );
    let output = h.run(&["sbatch", "-t", "5", script.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    assert_eq!(text(h.get("results", "runs/one/result.dat")), "from garage\na,b\n");
    assert_eq!(text(h.get("results", "runs/one/mesh/sub/joined.out")), "mesh one\nmesh two\n");

    let record = h.only_record();
    assert_eq!(record["state"], "completed");
    assert_eq!(record["phase"], "finished");
    assert_eq!(record["workdir_removed"], true);
    assert_eq!(record["inputs"].as_array().unwrap().len(), 4);
    let verified: Vec<&str> = record["inputs"].as_array().unwrap().iter().map(|f| f["verified"].as_str().unwrap()).collect();
    assert!(verified.contains(&"size+md5"), "{verified:?}");
    assert!(record["outputs"].as_array().unwrap().iter().all(|o| o["from_failed_job"] == false));

    let job_id = record["slurm"]["job_id"].as_str().unwrap();
    let log = text(h.get("results", &format!("runs/one/slurm-{job_id}.out")));
    assert!(log.contains("done on stdout"), "{log}");
    assert!(h.workdirs().is_empty(), "{:?}", h.workdirs());
    assert_eq!(h.slurm_jobs().len(), 1);

    let status = h.run(&["status", job_id]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("completed"));
    let list = h.run(&["list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains(job_id));
}

#[test]
fn missing_input_rejected_before_submission() {
    let h = Harness::new("missing");
    h.put("models", "present.inp", b"x");
    let script = h.write_script("run.sh", &format!("#!/bin/bash\n#SBATCH -J {}\ntrue\n", h.name));
    let output = h.run(&[
        "sbatch",
        "--stage-in",
        "models:present.inp",
        "--stage-in",
        "models:cases/absent deck.inp",
        "--stage-out",
        "x=results:out/",
        script.to_str().unwrap(),
    ]);

    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("models:cases/absent deck.inp"), "{message}");
    assert!(!message.contains("present.inp not found"), "{message}");
    assert!(h.slurm_jobs().is_empty(), "a job was submitted: {:?}", h.slurm_jobs());
    assert!(h.records().is_empty());
    assert!(h.workdirs().is_empty());
}

#[test]
fn failing_job_stages_out_partial_outputs() {
    let h = Harness::new("failing");
    let script = h.write_script(
        "fail.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-out 'partial.txt' --stage-out 'never.txt' --output results:failed/\n\
             echo half > partial.txt\necho oops >&2\nexit 3\n",
            h.name
        ),
    );
    let output = h.run(&["sbatch", script.to_str().unwrap()]);

    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("never.txt"));
    assert_eq!(text(h.get("results", "failed/partial.txt")), "half\n");
    let record = h.only_record();
    assert_eq!(record["state"], "failed");
    assert_eq!(record["slurm"]["exit_code"], 3);
    assert_eq!(record["missing_outputs"], serde_json::json!(["never.txt"]));
    assert!(record["outputs"].as_array().unwrap().iter().all(|o| o["from_failed_job"] == true));
    let job_id = record["slurm"]["job_id"].as_str().unwrap();
    assert!(text(h.get("results", &format!("failed/slurm-{job_id}.out"))).contains("oops"));
    assert!(h.workdirs().is_empty());
}

/// Checkpoints of a job killed by its time limit are staged out.
#[test]
fn timeout_stages_out_checkpoints() {
    let h = Harness::new("timeout");
    let script = h.write_script(
        "ckpt.sh",
        "#!/bin/bash\nfor i in $(seq 1000); do echo $i > ckpt_$i.txt; sleep 5; done\n",
    );
    let output = h.run(&[
        "sbatch",
        "--stage-out",
        "ckpt_*.txt=results:ckpt/",
        "--time=00:01:00",
        "-J",
        &h.name,
        script.to_str().unwrap(),
    ]);

    assert!(!output.status.success());
    let record = h.only_record();
    assert_eq!(record["state"], "timeout", "{record:#}");
    let staged = h.list("results", "ckpt");
    assert!(staged.iter().filter(|name| name.contains("ckpt_")).count() > 5, "{staged:?}");
    assert!(record["outputs"].as_array().unwrap().iter().all(|o| o["from_failed_job"] == true));
    assert!(h.workdirs().is_empty());
}

/// A job cancelled with scancel while jobwrap waits in the foreground.
#[test]
fn scancel_stages_out_checkpoints() {
    let h = Harness::new("scancel");
    let script = h.write_script(
        "ckpt.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-out 'ckpt_*.txt'=results:ckpt/\n\
             for i in $(seq 1000); do echo $i > ckpt_$i.txt; sleep 1; done\n",
            h.name
        ),
    );
    let child = h.jobwrap().args(["sbatch", script.to_str().unwrap()]).stderr(Stdio::piped()).spawn().unwrap();

    let record = h.wait_for_record(Duration::from_secs(60), |record| record["state"] == "running");
    let workdir = std::path::PathBuf::from(record["workdir"].as_str().unwrap());
    let started = std::time::Instant::now();
    while !workdir.join("ckpt_3.txt").exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "no checkpoints appeared");
        std::thread::sleep(Duration::from_millis(200));
    }
    h.scancel(record["slurm"]["job_id"].as_str().unwrap());

    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let record = h.only_record();
    assert_eq!(record["state"], "cancelled", "{record:#}");
    assert!(h.list("results", "ckpt").len() >= 3);
    assert!(h.workdirs().is_empty());
}

/// `jobwrap cancel` on a detached job cancels it and stages out what it wrote.
#[test]
fn cancel_command_stages_out_detached_job() {
    let h = Harness::new("cancel");
    let script = h.write_script(
        "ckpt.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-out 'ckpt_*.txt'=results:ckpt/\n\
             for i in $(seq 1000); do echo $i > ckpt_$i.txt; sleep 1; done\n",
            h.name
        ),
    );
    let output = h.run(&["sbatch", "--detach", script.to_str().unwrap()]);
    assert!(output.status.success());
    let id = String::from_utf8_lossy(&output.stdout).trim().to_string();

    let record = h.only_record();
    let workdir = std::path::PathBuf::from(record["workdir"].as_str().unwrap());
    let started = std::time::Instant::now();
    while !workdir.join("ckpt_2.txt").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoints appeared");
        std::thread::sleep(Duration::from_millis(200));
    }

    let output = h.run(&["cancel", &id]);
    assert!(output.status.success());
    let record = h.only_record();
    assert_eq!(record["state"], "cancelled", "{record:#}");
    assert_eq!(record["phase"], "finished");
    assert!(h.list("results", "ckpt").len() >= 2);
    assert!(h.workdirs().is_empty());
    assert_eq!(h.slurm_jobs().len(), 1);
}

/// Names with spaces, quotes, `$` and `*` reach the job and the store unchanged.
#[test]
fn names_with_spaces_survive() {
    let h = Harness::new("names");
    std::fs::create_dir_all(h.dir.path().join("local space/in/test space")).unwrap();
    std::fs::write(h.dir.path().join("local space/in/test space/barcode.txt"), "AC\n").unwrap();
    h.put("models", "in/Experiment Settings.csv", b"s\n");
    h.put("models", "in/it's $HOME (1) *.txt", b"odd\n");

    let script = h.write_script(
        "job.sh",
        "#!/bin/bash\n\
         #DATANET --stage-in 'scratchspace:in/test space/barcode.txt' --to barcode.txt\n\
         #DATANET --stage-in \"models:in/Experiment Settings.csv\"\n\
         #DATANET --stage-in \"models:in/it's \\$HOME (1) *.txt\"\n\
         #DATANET --stage-out 'out file.txt' --to 'results:res dir/out file.txt'\n\
         #DATANET --stage-out 'args.txt' --to 'results:res dir/args.txt'\n\
         cat \"Experiment Settings.csv\" barcode.txt \"it's \\$HOME (1) *.txt\" > \"out file.txt\"\n\
         printf '%s\\n' \"$@\" > args.txt\n",
    );
    let job_name = format!("{} 'q' $x", h.name);
    let output = h.run(&["sbatch", "--job-name", &job_name, script.to_str().unwrap(), "a b", "$HOME", "*", "it's"]);
    assert!(output.status.success(), "{}", stderr(&output));

    assert_eq!(text(h.get("results", "res dir/out file.txt")), "s\nAC\nodd\n");
    assert_eq!(text(h.get("results", "res dir/args.txt")), "a b\n$HOME\n*\nit's\n");
    let record = h.only_record();
    let job_id = record["slurm"]["job_id"].as_str().unwrap().to_string();
    let shown = Command::new("scontrol")
        .env("SLURM_CONF", &h.slurm_conf)
        .args(["show", "job", &job_id])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&format!("JobName={job_name}")));
}

/// A scratch root whose name has spaces, quotes and `$`: the job runs there and its
/// log is written there.
#[test]
fn workdir_with_spaces_accepted_by_sbatch() {
    let h = Harness::with_scratch_name("workdir", "work with space 'q' $x");
    let script = h.write_script(
        "job.sh",
        &format!("#!/bin/bash\n#SBATCH -J {}\npwd > where.txt\necho logged\n", h.name),
    );
    let output = h.run(&[
        "sbatch",
        "--keep",
        "--stage-out",
        "where.txt=results:res/where.txt",
        script.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    let record = h.only_record();
    let workdir = record["workdir"].as_str().unwrap();
    assert!(workdir.contains("work with space 'q' $x"));
    assert_eq!(text(h.get("results", "res/where.txt")), format!("{workdir}\n"));
    let job_id = record["slurm"]["job_id"].as_str().unwrap();
    let log = std::path::Path::new(workdir).join(format!("slurm-{job_id}.out"));
    assert_eq!(std::fs::read_to_string(log).unwrap(), "logged\n");
    assert_eq!(text(h.get("results", &format!("res/slurm-{job_id}.out"))), "logged\n");
}

/// jobwrap killed at each phase, then resumed: one submission, all outputs, no scratch.
#[test]
fn kill_at_each_phase_then_resume() {
    let points: [&'static str; 5] = ["stage-in", "after-sbatch", "running", "stage-out", "external-kill"];
    let cases: Vec<_> = points
        .iter()
        .map(|&point| std::thread::spawn(move || kill_and_resume(point)))
        .collect();
    for (point, case) in points.iter().zip(cases) {
        if let Err(panic) = case.join() {
            panic!("kill at {point}: {panic:?}");
        }
    }
}

fn kill_and_resume(point: &str) {
    let h = Harness::new(&format!("kill-{point}"));
    h.put("models", "in/a.txt", b"alpha\n");
    h.put("models", "in/b.txt", b"beta\n");
    let script = h.write_script(
        "job.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in models:in/ --to in/\n\
             #DATANET --stage-out 'out*.txt' --output results:out/\n\
             sleep 3\ncat in/a.txt > out1.txt\ncat in/b.txt > out2.txt\n",
            h.name
        ),
    );

    let mut command = h.jobwrap();
    command.args(["sbatch", script.to_str().unwrap()]).stderr(Stdio::piped());
    if point != "external-kill" {
        command.env("JOBWRAP_FAULT_KILL_AT", point);
    }
    let mut child = command.spawn().unwrap();
    if point == "external-kill" {
        h.wait_for_record(Duration::from_secs(60), |record| record["state"] == "running");
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "jobwrap was not killed at {point}");
    let expected_phase = match point {
        "stage-in" => "stage-in",
        "after-sbatch" => "submitting",
        "stage-out" => "stage-out",
        _ => "submitted",
    };
    assert_eq!(h.only_record()["phase"], expected_phase, "killed at {point}");

    let id = h.only_record()["id"].as_str().unwrap().to_string();
    let output = h.run(&["resume", &id]);
    assert!(output.status.success(), "resume after kill at {point}: {}", stderr(&output));

    let record = h.only_record();
    assert_eq!(record["state"], "completed", "{record:#}");
    assert_eq!(record["phase"], "finished");
    assert_eq!(text(h.get("results", "out/out1.txt")), "alpha\n");
    assert_eq!(text(h.get("results", "out/out2.txt")), "beta\n");
    assert!(h.workdirs().is_empty(), "{:?}", h.workdirs());
    assert_eq!(h.slurm_jobs().len(), 1, "submissions after kill at {point}: {:?}", h.slurm_jobs());
}

/// The CalculiX deck achtel2 from Debian's calculix-ccx-test, run by a job file.
#[test]
fn calculix_achtel2_matches_reference() {
    let h = Harness::new("ccx");
    let deck = std::fs::read(format!("{CALCULIX_TESTS}/achtel2.inp"))
        .expect("install calculix-ccx-test (scripts/setup.sh) for the CalculiX deck");
    h.put("models", "cases/achtel2.inp", &deck);

    let job_file = h.write_script(
        "job.toml",
        &format!(
            "name = \"{}\"\n\
             [software]\nexecutable = \"ccx\"\nargs = [\"-i\", \"achtel2\"]\n\
             [resources]\ncpus = 1\ntime_limit = \"00:05:00\"\n\
             [[inputs]]\nfrom = \"models:cases/achtel2.inp\"\n\
             [output]\nto = \"results:runs/achtel2/\"\nfiles = [\"*.dat\", \"*.frd\"]\n",
            h.name
        ),
    );
    let output = h.run(&["submit", job_file.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    let reference = Command::new("zcat").arg(format!("{CALCULIX_TESTS}/achtel2.dat.ref.gz")).output().unwrap();
    assert!(reference.status.success());
    let dat = text(h.get("results", "runs/achtel2/achtel2.dat"));
    assert_numbers_match(&dat, &String::from_utf8(reference.stdout).unwrap(), 1e-6);
    let frd = h.get("results", "runs/achtel2/achtel2.frd").expect("achtel2.frd staged out");
    assert!(!frd.is_empty());
}

/// Compares two CalculiX .dat files word by word, numbers with a relative tolerance.
fn assert_numbers_match(actual: &str, expected: &str, tolerance: f64) {
    let actual_words: Vec<&str> = actual.split_whitespace().collect();
    let expected_words: Vec<&str> = expected.split_whitespace().collect();
    assert_eq!(actual_words.len(), expected_words.len(), "different number of words");
    for (index, (a, e)) in actual_words.iter().zip(&expected_words).enumerate() {
        match (a.parse::<f64>(), e.parse::<f64>()) {
            (Ok(a), Ok(e)) => {
                let scale = e.abs().max(1e-12);
                assert!((a - e).abs() <= tolerance * scale + 1e-12, "word {index}: {a} differs from {e}");
            }
            _ => assert_eq!(a, e, "word {index}"),
        }
    }
}

/// An object large enough for ranged GETs arrives intact, with its MD5 checked.
#[test]
fn large_object_ranged_stage_in() {
    let h = Harness::new("large");
    // 72 MiB plus a few bytes: nine full ranges and a short last one.
    let mut data = Vec::with_capacity((72 << 20) + 5);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < (72 << 20) + 5 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate((72 << 20) + 5);
    h.put("models", "big/data.bin", &data);
    let local = h.dir.path().join("expected.bin");
    std::fs::write(&local, &data).unwrap();
    let expected = Command::new("sha256sum").arg(&local).output().unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout).split_whitespace().next().unwrap().to_string();

    let script = h.write_script(
        "sum.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in models:big/data.bin\n\
             #DATANET --stage-out sum.txt=results:big/sum.txt\n\
             sha256sum data.bin | cut -d' ' -f1 > sum.txt\n",
            h.name
        ),
    );
    let output = h.run(&["sbatch", script.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    assert_eq!(text(h.get("results", "big/sum.txt")).trim(), expected);
    let record = h.only_record();
    assert_eq!(record["inputs"][0]["verified"], "size+md5");
    assert_eq!(record["inputs"][0]["sha256"], expected.as_str());
}

/// A cluster whose `slurm_conf` is missing is rejected at once, naming the key and the
/// path, and leaves no ledger record.
#[test]
fn missing_slurm_conf_rejected_without_record() {
    let mut h = Harness::new("noconf");
    let missing = h.dir.path().join("no such slurm.conf");
    let mut value: toml::Table = std::fs::read_to_string(&h.config_path).unwrap().parse().unwrap();
    value["clusters"]["a"].as_table_mut().unwrap().insert("slurm_conf".into(), missing.display().to_string().into());
    std::fs::write(&h.config_path, toml::to_string(&value).unwrap()).unwrap();
    h.config = datanet::Config::load(&h.config_path).unwrap();
    let script = h.write_script("run.sh", &format!("#!/bin/bash\n#SBATCH -J {}\ntrue\n", h.name));

    let started = std::time::Instant::now();
    let output = h.run(&["sbatch", script.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("clusters.a.slurm_conf"), "{message}");
    assert!(message.contains(&missing.display().to_string()), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "jobwrap waited for sbatch's retries");
    assert!(h.records().is_empty(), "{:#?}", h.records());
    assert!(h.workdirs().is_empty());
}

/// An option sbatch rejects leaves no ledger record and no working directory.
#[test]
fn rejected_sbatch_option_leaves_no_record() {
    let h = Harness::new("bogus");
    let script = h.write_script("run.sh", &format!("#!/bin/bash\n#SBATCH -J {}\ntrue\n", h.name));
    let output = h.run(&["sbatch", "--bogus-option", script.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("bogus-option"), "{}", stderr(&output));
    assert!(h.records().is_empty(), "{:#?}", h.records());
    assert!(h.workdirs().is_empty());
    let list = h.run(&["list"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 1, "only the header expected");
    assert!(h.slurm_jobs().is_empty());
}

/// A script with Windows line endings is rejected before submission, naming the script
/// and `dos2unix`.
#[test]
fn crlf_script_rejected_before_submission() {
    let h = Harness::new("crlf");
    let script = h.write_script("dos.sh", &format!("#!/bin/bash\r\n#SBATCH -J {}\r\necho hello\r\n", h.name));
    let output = h.run(&["sbatch", script.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains(script.to_str().unwrap()), "{message}");
    assert!(message.contains("dos2unix"), "{message}");
    assert!(h.records().is_empty(), "{:#?}", h.records());
    assert!(h.slurm_jobs().is_empty());
}
