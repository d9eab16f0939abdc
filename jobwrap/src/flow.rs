//! The job flow: validate, prepare the working directory, stage in, submit, track,
//! stage out, clean up.
//!
//! Every step starts from the ledger record and ends by saving it, so a jobwrap killed
//! at any point continues from the last saved phase on `resume`. Submission is made
//! idempotent by saving the intent (phase `submitting` and a unique `--comment`) before
//! sbatch runs: a resumed job in that phase first looks for a Slurm job with that
//! comment, and for the wrapper's `started` file, and submits only when neither exists.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use datanet::config::ClusterConfig;
use datanet::Config;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};

use crate::error::JobError;
use crate::fault;
use crate::ledger::{now_seconds, JobLock, JobRecord, Ledger, OutputFile, SlurmRecord};
use crate::placement::{self, Placement, Request};
use crate::progress::Progress;
use crate::sbatch_options::{has_option, inspect, script_header_options};
use crate::slurm::Slurm;
use crate::spec::JobSpec;
use crate::stage_in::{self, Spaces};
use crate::stage_out;
use crate::state::{JobState, Phase};
use crate::track;
use crate::workdir::{self, Owner};
use crate::wrapper::{self, SCRIPT_FILE, WRAPPER_FILE};

/// Begin time of a job submitted before its stage-in. The job is released earlier by
/// setting its start time to now; the wrapper refuses to run without verified inputs in
/// case jobwrap is not resumed before this time.
const OVERLAP_BEGIN: &str = "now+7days";
/// How often the record is saved while many small files are transferred.
const PROGRESS_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// How often tracking looks for the wrapper's exit-status file between Slurm polls.
const EXIT_STATUS_CHECK: Duration = Duration::from_millis(100);

/// How often the state is polled between the script's end and Slurm's final state.
const ENDING_POLL: Duration = Duration::from_millis(200);

/// Shared state of one jobwrap invocation.
pub struct Jobwrap {
    pub config: Config,
    pub ledger: Ledger,
}

/// Prints a user-facing progress line on stderr.
fn notify(record: &JobRecord, message: impl std::fmt::Display) {
    eprintln!("jobwrap: job {}: {message}", record.id);
}

impl Jobwrap {
    pub fn new(config: Config) -> Result<Jobwrap, JobError> {
        let ledger = Ledger::open(&config.jobwrap.state_dir)?;
        Ok(Jobwrap { config, ledger })
    }

    fn cluster(&self, name: Option<&str>) -> Result<&ClusterConfig, JobError> {
        let names: Vec<&str> = self.config.clusters.keys().map(String::as_str).collect();
        let chosen = match name {
            Some(name) => self.config.clusters.get(name),
            None if names.len() == 1 => self.config.clusters.values().next(),
            None => None,
        };
        chosen.ok_or_else(|| {
            let problem = match (name, names.is_empty()) {
                (_, true) => format!("no [clusters.NAME] section in {}", self.config.source.display()),
                (Some(name), false) => format!("no cluster {name:?}; configured clusters: {}", names.join(", ")),
                (None, false) => format!("several clusters are configured ({}); choose one with --cluster NAME", names.join(", ")),
            };
            JobError::Rejected(vec![problem])
        })
    }

    fn slurm(&self, record: &JobRecord) -> Result<Slurm, JobError> {
        let cluster = self.cluster(Some(&record.cluster))?;
        Ok(Slurm {
            slurm_conf: cluster.slurm_conf.clone(),
        })
    }

    fn spaces(&self, spec: &JobSpec) -> Result<Spaces, JobError> {
        let mut names: Vec<&str> = spec.stage_in.iter().map(|input| input.source.space.as_str()).collect();
        names.extend(spec.stage_out.iter().filter_map(|out| out.destination.as_ref()).map(|d| d.space.as_str()));
        names.extend(spec.output.iter().map(|output| output.space.as_str()));
        Spaces::open(&self.config, names).map_err(|err| JobError::Rejected(vec![err.to_string()]))
    }

    /// Validates a job, chooses its cluster and creates its record. Nothing is
    /// submitted when this fails.
    pub async fn create(&self, spec: JobSpec) -> Result<(JobRecord, JobLock), JobError> {
        spec.check()?;
        let pinned = match spec.cluster.as_deref() {
            Some("auto") => None,
            Some(name) => Some(self.cluster(Some(name))?.clone()),
            None if self.config.clusters.len() <= 1 => Some(self.cluster(None)?.clone()),
            None => None,
        };
        let candidates: Vec<&ClusterConfig> = match &pinned {
            Some(cluster) => vec![cluster],
            None => self.config.clusters.values().collect(),
        };
        let conf_problems: Vec<String> = candidates
            .into_iter()
            .filter_map(|cluster| crate::slurm::check_conf(cluster, &self.config.source).err())
            .collect();
        if !conf_problems.is_empty() {
            return Err(JobError::Rejected(conf_problems));
        }
        let spaces = self.spaces(&spec)?;
        let id = crate::ledger::new_job_id();

        let mut problems = Vec::new();
        let inputs = match stage_in::plan(&spaces, &spec.stage_in).await {
            Ok(inputs) => inputs,
            Err(found) => {
                problems.extend(found);
                Vec::new()
            }
        };
        problems.extend(probe_outputs(&spaces, &spec, &id).await);
        if !problems.is_empty() {
            return Err(JobError::Rejected(problems));
        }

        let (cluster, placement) = match pinned {
            Some(cluster) => (cluster, None),
            None => {
                let placement = self.place(&spec, &inputs)?;
                (self.cluster(Some(&placement.cluster))?.clone(), Some(placement))
            }
        };
        if let Some(placement) = &placement {
            eprintln!("jobwrap: placed on cluster {}: {}", placement.cluster, placement.reason);
        }
        if !cluster.scratch_root.is_dir() {
            problems.push(format!(
                "scratch root {} of cluster {} is not a directory; create it or fix clusters.{}.scratch_root",
                cluster.scratch_root.display(),
                cluster.name,
                cluster.name
            ));
        }
        if !problems.is_empty() {
            return Err(JobError::Rejected(problems));
        }

        let owner = Owner::submitting_user();
        let mut record = JobRecord {
            id: id.clone(),
            created_at: now_seconds(),
            updated_at: now_seconds(),
            workdir: workdir::workdir_path(&cluster.scratch_root, &id),
            cluster: cluster.name.clone(),
            uid: owner.uid,
            gid: owner.gid,
            submit_comment: format!("jobwrap:{id}"),
            phase: Phase::Preparing,
            state: JobState::Unsubmitted,
            slurm: SlurmRecord::default(),
            inputs,
            outputs: Vec::new(),
            missing_outputs: Vec::new(),
            workdir_removed: false,
            error: None,
            driver_pid: None,
            placement,
            overlap: !spec.stage_first && !spec.stage_in.is_empty() && !sets_begin_time(&spec),
            spec,
        };
        let lock = self.ledger.lock(&id)?;
        self.ledger.save(&mut record)?;
        Ok((record, lock))
    }

    /// Chooses the cluster where the job can start soonest.
    fn place(&self, spec: &JobSpec, inputs: &[crate::ledger::InputFile]) -> Result<Placement, JobError> {
        let mut options = inspect(&script_header_options(&spec.script_text));
        options.extend(inspect(&spec.sbatch_options));
        let request = Request::from_options(&options);

        let clusters: Vec<ClusterConfig> = self.config.clusters.values().cloned().collect();
        let mut near_bytes = BTreeMap::new();
        for cluster in &clusters {
            let bytes: u64 = inputs
                .iter()
                .filter(|file| cluster.near_spaces.contains(&file.source.space))
                .map(|file| file.size_bytes)
                .sum();
            near_bytes.insert(cluster.name.clone(), bytes);
        }
        placement::choose(&clusters, request, &near_bytes).map_err(|problem| JobError::Rejected(vec![problem]))
    }

    /// Runs the job from its recorded phase. With `detach`, returns once the job is
    /// submitted. The caller holds the job's lock.
    pub async fn drive(&self, mut record: JobRecord, detach: bool) -> Result<JobRecord, JobError> {
        record.driver_pid = Some(std::process::id());
        self.ledger.save(&mut record)?;
        let result = self.drive_phases(&mut record, detach).await;

        record.driver_pid = None;
        if !self.ledger.contains(&record.id) {
            // A job rejected before submission removed its own record.
            return result.map(|()| record);
        }
        if let Err(err) = &result {
            record.error = Some(err.to_string());
        }
        self.ledger.save(&mut record)?;
        result.map(|()| record)
    }

    async fn drive_phases(&self, record: &mut JobRecord, detach: bool) -> Result<(), JobError> {
        loop {
            if record.phase < Phase::Submitted && self.ledger.cancel_requested(&record.id) {
                self.cancel_before_release(record).await?;
            }
            match record.phase {
                Phase::Preparing => self.prepare(record)?,
                Phase::StageIn => self.stage_in(record).await?,
                Phase::Submitting => self.submit(record)?,
                Phase::Releasing => self.release(record)?,
                Phase::Submitted if detach => return Ok(()),
                Phase::Submitted => self.track(record).await?,
                Phase::StageOut => self.stage_out(record).await?,
                Phase::Finished => return Ok(()),
            }
        }
    }

    fn owner(record: &JobRecord) -> Owner {
        Owner {
            uid: record.uid,
            gid: record.gid,
        }
    }

    /// Creates the working directory, writes the script and wrapper, and checks the
    /// submission with `sbatch --test-only`.
    fn prepare(&self, record: &mut JobRecord) -> Result<(), JobError> {
        let owner = Self::owner(record);
        workdir::create(&record.workdir, owner)?;
        workdir::write_control_file(&record.workdir, SCRIPT_FILE, &record.spec.script_text, 0o700, owner)?;
        let wrapper_text = wrapper::wrapper_text(&record.spec.script_text);
        workdir::write_control_file(&record.workdir, WRAPPER_FILE, &wrapper_text, 0o700, owner)?;

        let slurm = self.slurm(record)?;
        if let Err(err) = slurm.test_only(&self.sbatch_args(record)) {
            // Nothing was submitted, so the job leaves no trace: no working directory
            // and no ledger record.
            if let Err(remove_err) = workdir::remove(&record.workdir) {
                tracing::warn!(workdir = %record.workdir.display(), error = %remove_err, "cannot remove the working directory of a rejected job");
            }
            self.ledger.remove(&record.id)?;
            return Err(JobError::Rejected(vec![format!("sbatch rejected the job options: {err}")]));
        }

        record.phase = if record.overlap { Phase::Submitting } else { Phase::StageIn };
        self.ledger.save(record)?;
        notify(record, format!("working directory {}", record.workdir.display()));
        Ok(())
    }

    /// The sbatch arguments after `--parsable`: jobwrap's settings, the user's options
    /// unchanged, the wrapper and the script arguments. Every value is one argv word.
    fn sbatch_args(&self, record: &JobRecord) -> Vec<OsString> {
        let spec = &record.spec;
        let mut chdir = OsString::from("--chdir=");
        chdir.push(&record.workdir);
        let mut args = vec![chdir, OsString::from(format!("--comment={}", record.submit_comment))];
        if record.overlap {
            // A deferred begin time keeps the job's place in the queue, which `--hold`
            // followed by `scontrol release` would reset to the end.
            args.push(OsString::from(format!("--begin={OVERLAP_BEGIN}")));
        }

        let mut declared = inspect(&spec.sbatch_options);
        declared.extend(inspect(&script_header_options(&spec.script_text)));
        if !has_option(&declared, "job-name", Some('J')) {
            args.push(OsString::from(format!("--job-name={}", spec.script_name)));
        }
        // SAFETY: geteuid takes no arguments and is always successful (POSIX, geteuid(2)).
        if record.uid != unsafe { libc::geteuid() } {
            args.push(OsString::from(format!("--uid={}", record.uid)));
            args.push(OsString::from(format!("--gid={}", record.gid)));
        }
        args.extend(spec.sbatch_options.iter().map(OsString::from));
        args.push(record.workdir.join(workdir::CONTROL_DIR).join(WRAPPER_FILE).into_os_string());
        args.extend(spec.script_args.iter().map(OsString::from));
        args
    }

    async fn stage_in(&self, record: &mut JobRecord) -> Result<(), JobError> {
        let owner = Self::owner(record);
        for file in record.inputs.iter_mut().filter(|file| file.done) {
            let present = std::fs::metadata(record.workdir.join(&file.destination))
                .map(|meta| if file.directory { meta.is_dir() } else { meta.is_file() && meta.len() == file.size_bytes })
                .unwrap_or(false);
            file.done = present;
        }
        let pending: Vec<usize> = (0..record.inputs.len()).filter(|&index| !record.inputs[index].done).collect();

        if !pending.is_empty() {
            let spaces = self.spaces(&record.spec)?;
            let files = record.inputs.clone();
            let bytes: u64 = pending.iter().map(|&index| files[index].size_bytes).sum();
            notify(record, format!("stage-in of {} files ({bytes} bytes)", pending.len()));
            let progress = Arc::new(Progress::new("stage-in", pending.len() as u64, bytes));
            let concurrency = self.config.jobwrap.transfer_concurrency;
            let workdir = record.workdir.clone();
            let mut stream =
                Box::pin(stage_in::download_all(&spaces, &files, pending, &workdir, owner, concurrency, Arc::clone(&progress)));

            let mut failures = Vec::new();
            let mut last_save = Instant::now();
            while let Some(done) = stream.next().await {
                match done.result {
                    Ok((sha256, verified)) => {
                        let file = &mut record.inputs[done.index];
                        file.done = true;
                        file.sha256 = (!file.directory).then_some(sha256);
                        file.verified = Some(verified);
                        fault::kill_point("stage-in");
                    }
                    Err(err) => failures.push(err),
                }
                if self.ledger.cancel_requested(&record.id) {
                    break;
                }
                if last_save.elapsed() >= PROGRESS_SAVE_INTERVAL {
                    self.ledger.save(record)?;
                    last_save = Instant::now();
                }
            }
            drop(stream);
            progress.finish();
            self.ledger.save(record)?;

            if self.ledger.cancel_requested(&record.id) {
                return Ok(());
            }
            if !failures.is_empty() && record.overlap {
                return self.cancel_after_failed_stage_in(record, &failures);
            }
            if !failures.is_empty() {
                record.phase = Phase::Finished;
                record.state = JobState::Failed;
                if !record.spec.keep_workdir {
                    workdir::remove(&record.workdir)?;
                    record.workdir_removed = true;
                }
                self.ledger.save(record)?;
                return Err(JobError::Transfer(format!(
                    "stage-in failed, nothing was submitted:\n  {}",
                    failures.join("\n  ")
                )));
            }
        }

        workdir::write_control_file(&record.workdir, wrapper::INPUTS_VERIFIED_FILE, "", 0o600, owner)?;
        record.phase = if record.overlap { Phase::Releasing } else { Phase::Submitting };
        self.ledger.save(record)?;
        Ok(())
    }

    /// Cancels the deferred job whose inputs could not be staged in, recording why.
    fn cancel_after_failed_stage_in(&self, record: &mut JobRecord, failures: &[String]) -> Result<(), JobError> {
        let job_id = record.slurm.job_id.clone().unwrap_or_default();
        let reason = format!("stage-in failed, so the waiting Slurm job {job_id} was cancelled:\n  {}", failures.join("\n  "));
        notify(record, &reason);
        self.slurm(record)?.scancel(&job_id)?;
        record.error = Some(reason);
        record.phase = Phase::Submitted;
        self.ledger.save(record)?;
        Ok(())
    }

    /// Releases the deferred job once its inputs are staged in and verified.
    fn release(&self, record: &mut JobRecord) -> Result<(), JobError> {
        let slurm = self.slurm(record)?;
        let job_id = record.slurm.job_id.clone().unwrap_or_default();
        if let Err(err) = slurm.release(&job_id) {
            // A release that already happened before a crash may fail the second time.
            let deferred = slurm.show_job(&job_id)?.is_some_and(|info| info.deferred);
            if deferred {
                return Err(err);
            }
        }
        notify(record, format!("inputs verified; released Slurm job {job_id}"));
        record.phase = Phase::Submitted;
        self.ledger.save(record)?;
        Ok(())
    }

    /// Submits the job unless an earlier, interrupted run already did.
    fn submit(&self, record: &mut JobRecord) -> Result<(), JobError> {
        let slurm = self.slurm(record)?;
        let existing = self.find_submitted(record, &slurm)?;
        let job_id = match existing {
            Some(job_id) => {
                notify(record, format!("found Slurm job {job_id} from an interrupted submission"));
                job_id
            }
            None => {
                let job_id = slurm.sbatch(&self.sbatch_args(record))?;
                fault::kill_point("after-sbatch");
                notify(record, format!("submitted as Slurm job {job_id}"));
                job_id
            }
        };
        record.slurm.job_id = Some(job_id);
        record.state = JobState::Pending;
        record.phase = if record.overlap { Phase::StageIn } else { Phase::Submitted };
        self.ledger.save(record)?;
        Ok(())
    }

    /// Looks for a job submitted by an earlier run that died before recording the id.
    fn find_submitted(&self, record: &JobRecord, slurm: &Slurm) -> Result<Option<String>, JobError> {
        let mut found = slurm.find_by_comment(&record.submit_comment)?;
        found.sort();
        if found.len() > 1 {
            tracing::warn!(job = %record.id, ids = ?found, "several Slurm jobs carry this job's comment");
        }
        if let Some(job_id) = found.into_iter().next() {
            return Ok(Some(job_id));
        }
        Ok(wrapper::read_status(&record.workdir).job_id)
    }

    async fn track(&self, record: &mut JobRecord) -> Result<(), JobError> {
        let slurm = self.slurm(record)?;
        let job_id = record.slurm.job_id.clone().unwrap_or_default();
        let mut cancel_sent = false;

        let final_state = loop {
            if !cancel_sent && self.ledger.cancel_requested(&record.id) {
                notify(record, format!("cancelling Slurm job {job_id}"));
                if let Err(err) = slurm.scancel(&job_id) {
                    tracing::warn!(job = %record.id, error = %err, "scancel failed");
                }
                cancel_sent = true;
            }

            match slurm.show_job(&job_id) {
                Ok(Some(info)) => {
                    let state = track::apply_job_info(record, &info);
                    if let Some(state) = state {
                        if state != record.state {
                            record.state = state;
                            self.ledger.save(record)?;
                            notify(record, format!("Slurm job {job_id} is {state}"));
                            if state == JobState::Running {
                                fault::kill_point("running");
                            }
                        }
                        if state.is_final() {
                            record.slurm.verdict_source = Some("scontrol".into());
                            break state;
                        }
                    }
                }
                Ok(None) => break track::verdict_without_scontrol(record, &slurm),
                Err(err) => tracing::warn!(job = %record.id, error = %err, "cannot query the job; retrying"),
            }
            wait_for_poll(&record.workdir, self.config.jobwrap.poll_interval).await;
        };

        track::wait_for_completion(&slurm, &job_id, &record.workdir);
        let status = wrapper::read_status(&record.workdir);
        if final_state != JobState::Completed {
            if let Some(code) = status.exit_code.filter(|&code| code != 0) {
                record.slurm.exit_code = Some(code);
            }
        }
        record.state = final_state;
        record.phase = Phase::StageOut;
        self.ledger.save(record)?;
        notify(record, format!("Slurm job {job_id} ended: {final_state}"));
        Ok(())
    }

    fn log_files(record: &JobRecord) -> Vec<PathBuf> {
        let mut logs = Vec::new();
        let job_id = record.slurm.job_id.clone().unwrap_or_default();
        let default = record.workdir.join(format!("slurm-{job_id}.out"));
        for path in [record.slurm.stdout.clone(), record.slurm.stderr.clone(), Some(default)].into_iter().flatten() {
            let path = if path.is_absolute() { path } else { record.workdir.join(path) };
            if !logs.contains(&path) {
                logs.push(path);
            }
        }
        logs
    }

    async fn stage_out(&self, record: &mut JobRecord) -> Result<(), JobError> {
        if record.workdir_removed {
            // An earlier run finished stage-out and was killed while removing the
            // working directory: only the removal is left.
            return self.finish_stage_out(record);
        }
        let spaces = self.spaces(&record.spec)?;
        let from_failed_job = record.state != JobState::Completed;
        let (planned, missing) = stage_out::plan(&record.spec, &record.workdir, &Self::log_files(record));
        record.missing_outputs = missing;
        for pattern in &record.missing_outputs {
            notify(record, format!("declared output {pattern:?} matched no file"));
        }

        let pending: Vec<_> = planned
            .into_iter()
            .filter(|output| {
                !record
                    .outputs
                    .iter()
                    .any(|done| done.local == output.local_name && done.destination == output.destination)
            })
            .collect();
        let bytes: u64 = pending.iter().filter_map(|o| std::fs::metadata(&o.path).ok()).map(|m| m.len()).sum();
        let total_files = pending.len();
        let progress = Progress::new("stage-out", total_files as u64, bytes);
        let concurrency = self.config.jobwrap.transfer_concurrency;
        let mut stream = futures::stream::iter(pending)
            .map(|output| {
                let space = spaces.get(&output.destination.space).clone();
                async move {
                    let result = stage_out::upload_with_retries(&space, &output).await;
                    (output, result)
                }
            })
            .buffer_unordered(concurrency);

        let mut failures = Vec::new();
        let mut last_save = Instant::now();
        while let Some((output, result)) = stream.next().await {
            match result {
                Ok((size_bytes, sha256, verified)) => {
                    progress.add_bytes(size_bytes);
                    record.outputs.push(OutputFile {
                        local: output.local_name,
                        destination: output.destination,
                        size_bytes,
                        sha256,
                        verified,
                        from_failed_job,
                    });
                    fault::kill_point("stage-out");
                }
                Err(err) => failures.push(err),
            }
            progress.file_done();
            if last_save.elapsed() >= PROGRESS_SAVE_INTERVAL {
                self.ledger.save(record)?;
                last_save = Instant::now();
            }
        }
        if total_files > 0 {
            progress.finish();
        }

        if !failures.is_empty() {
            self.ledger.save(record)?;
            return Err(JobError::Transfer(format!(
                "stage-out incomplete, working directory {} kept; run `jobwrap resume {}` to retry:\n  {}",
                record.workdir.display(),
                record.id,
                failures.join("\n  ")
            )));
        }

        if record.spec.keep_workdir {
            notify(record, format!("working directory kept at {}", record.workdir.display()));
            record.phase = Phase::Finished;
            self.ledger.save(record)?;
            return Ok(());
        }
        record.workdir_removed = true;
        self.ledger.save(record)?;
        self.finish_stage_out(record)
    }

    /// Removes the working directory (stage-out is verified) and finishes the job.
    fn finish_stage_out(&self, record: &mut JobRecord) -> Result<(), JobError> {
        workdir::remove(&record.workdir)?;
        record.phase = Phase::Finished;
        self.ledger.save(record)?;
        Ok(())
    }

    /// Handles a cancel request before the job was released to run: a submitted (deferred)
    /// job goes to tracking, which cancels it; otherwise nothing is ever submitted.
    async fn cancel_before_release(&self, record: &mut JobRecord) -> Result<(), JobError> {
        if record.slurm.job_id.is_some() {
            record.phase = Phase::Submitted;
            self.ledger.save(record)?;
            return Ok(());
        }
        if record.phase == Phase::Submitting {
            let slurm = self.slurm(record)?;
            if let Some(job_id) = self.find_submitted(record, &slurm)? {
                // The job was submitted after all: record it and let tracking cancel it.
                record.slurm.job_id = Some(job_id);
                record.phase = Phase::Submitted;
                record.state = JobState::Pending;
                self.ledger.save(record)?;
                return Ok(());
            }
        }
        record.state = JobState::Cancelled;
        record.phase = Phase::Finished;
        if !record.spec.keep_workdir {
            workdir::remove(&record.workdir)?;
            record.workdir_removed = true;
        }
        self.ledger.save(record)?;
        Err(JobError::CancelledBeforeSubmit(record.id.clone()))
    }

    /// Cancels a job: records the request, cancels the Slurm job, and finishes the job
    /// here unless another jobwrap process is driving it.
    pub async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, JobError> {
        let record = self.ledger.find(id)?;
        self.ledger.request_cancel(&record.id)?;
        let slurm = self.slurm(&record)?;
        let mut job_ids: Vec<String> = record.slurm.job_id.iter().cloned().collect();
        if record.phase == Phase::Submitting && job_ids.is_empty() {
            job_ids = slurm.find_by_comment(&record.submit_comment)?;
        }
        if record.phase < Phase::StageOut {
            for job_id in &job_ids {
                slurm.scancel(job_id)?;
            }
        }

        match self.ledger.lock(&record.id) {
            Ok(_lock) => {
                let record = self.ledger.load(&record.id)?;
                match self.drive(record, false).await {
                    Ok(record) => Ok(Some(record)),
                    Err(JobError::CancelledBeforeSubmit(_)) => Ok(Some(self.ledger.load(id)?)),
                    Err(err) => Err(err),
                }
            }
            Err(JobError::Locked { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// True when the user sets a begin time, which overlapped staging would override.
fn sets_begin_time(spec: &JobSpec) -> bool {
    let mut options = inspect(&script_header_options(&spec.script_text));
    options.extend(inspect(&spec.sbatch_options));
    has_option(&options, "begin", Some('b'))
}

/// Sleeps for one poll interval, but returns early once the wrapper has written the
/// exit status, so the end of a short job is noticed without waiting a whole interval.
/// After the script has ended, Slurm takes a moment to record the final state, so the
/// state is then polled every [`ENDING_POLL`] instead of every interval.
async fn wait_for_poll(workdir: &std::path::Path, poll_interval: Duration) {
    let exit_status = workdir.join(workdir::CONTROL_DIR).join(wrapper::EXIT_STATUS_FILE);
    if exit_status.exists() {
        tokio::time::sleep(ENDING_POLL.min(poll_interval)).await;
        return;
    }
    let started = Instant::now();
    while started.elapsed() < poll_interval {
        tokio::time::sleep(EXIT_STATUS_CHECK.min(poll_interval)).await;
        if exit_status.exists() {
            return;
        }
    }
}

/// Checks that every output location accepts writes: a small probe object is written
/// and deleted. Returns one problem line per location that fails.
async fn probe_outputs(spaces: &Spaces, spec: &JobSpec, id: &str) -> Vec<String> {
    let mut locations: Vec<crate::location::SpaceLocation> = Vec::new();
    for destination in spec.stage_out.iter().filter_map(|out| out.destination.clone()).chain(spec.output.clone()) {
        let prefix = if destination.is_prefix() {
            destination
        } else {
            let parent = destination.path.rsplit_once('/').map(|(parent, _)| format!("{parent}/")).unwrap_or_default();
            crate::location::SpaceLocation {
                space: destination.space,
                path: parent,
            }
        };
        if !locations.contains(&prefix) {
            locations.push(prefix);
        }
    }

    let mut problems = Vec::new();
    for location in locations {
        let space = spaces.get(&location.space);
        if space.config.read_only {
            problems.push(format!("output location {location} is in read-only space {:?}", location.space));
            continue;
        }
        let probe = match location.join(&format!(".jobwrap-probe-{id}")).object_path() {
            Ok(probe) => probe,
            Err(err) => {
                problems.push(format!("output location {location} is not usable: {err}"));
                continue;
            }
        };
        let result = match space.store.put(&probe, PutPayload::from_static(b"jobwrap write probe\n")).await {
            Ok(_) => space.store.delete(&probe).await,
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            problems.push(format!("output location {location} is not writable: {err}"));
        }
    }
    problems
}
