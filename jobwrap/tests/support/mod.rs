//! Test harness for jobwrap against the real service stack (Garage and Slurm).
//!
//! Each [`Harness`] owns a temporary directory with its own configuration, ledger,
//! scratch root and local space, and its own prefixes in the stack's buckets, so tests
//! run in parallel without seeing each other. Every Slurm job a harness submits carries
//! the harness's unique job name; dropping the harness cancels only those jobs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use datanet::Config;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const STACK_HINT: &str = "run scripts/stack.sh up and source $RUN/env.sh";

fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {STACK_HINT}"),
    }
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    /// Unique per harness; used as Slurm job name and as bucket prefix.
    pub name: String,
    pub config_path: PathBuf,
    pub config: Config,
    pub slurm_conf: PathBuf,
    pub slurm_conf_b: Option<PathBuf>,
    pub scratch_root: PathBuf,
    pub state_dir: PathBuf,
}

impl Harness {
    pub fn new(test: &str) -> Harness {
        Harness::build(test, "scratch", false)
    }

    /// Creates a harness whose scratch root is `<dir>/<scratch_name>`, a name that may
    /// contain spaces, quotes and `$`.
    pub fn with_scratch_name(test: &str, scratch_name: &str) -> Harness {
        Harness::build(test, scratch_name, false)
    }

    /// Creates a harness with clusters `a` and `b` of the stack (`scripts/stack.sh up
    /// --two-clusters`). Cluster `a` is near `models` and `results`, `b` near
    /// `scratchspace`.
    pub fn two_clusters(test: &str) -> Harness {
        Harness::build(test, "scratch-a", true)
    }

    fn build(test: &str, scratch_name: &str, two_clusters: bool) -> Harness {
        let stack_config = PathBuf::from(required_env("DATANET_CONFIG"));
        let slurm_conf = PathBuf::from(required_env("DATANET_SLURM_CONF"));
        let text = std::fs::read_to_string(&stack_config)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}; {STACK_HINT}", stack_config.display()));

        let mut random = [0u8; 3];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut random).unwrap();
        let name = format!("jwt-{test}-{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>());

        let dir = tempfile::Builder::new().prefix(&format!("{name}-")).tempdir().unwrap();
        let scratch_root = dir.path().join(scratch_name);
        let state_dir = dir.path().join("state");
        let local_space = dir.path().join("local space");
        std::fs::create_dir_all(&scratch_root).unwrap();
        std::fs::create_dir_all(&local_space).unwrap();

        let mut value: toml::Table = text.parse().unwrap();
        let spaces = value["spaces"].as_table_mut().unwrap();
        for (space, bucket) in [("models", "datanet-models"), ("results", "datanet-results")] {
            let table = spaces[space].as_table_mut().unwrap();
            table.insert("url".into(), format!("s3://{bucket}/{name}").into());
        }
        let scratchspace = spaces["scratchspace"].as_table_mut().unwrap();
        scratchspace.insert("url".into(), format!("file://{}", local_space.display()).into());

        let mut clusters = toml::Table::new();
        let mut cluster_a = toml::Table::new();
        cluster_a.insert("slurm_conf".into(), slurm_conf.display().to_string().into());
        cluster_a.insert("scratch_root".into(), scratch_root.display().to_string().into());
        cluster_a.insert("near_spaces".into(), vec!["models", "results"].into());
        clusters.insert("a".into(), cluster_a.into());
        let mut slurm_conf_b = None;
        if two_clusters {
            let conf_b = PathBuf::from(required_env("DATANET_SLURM_CONF_B"));
            let scratch_b = dir.path().join("scratch-b");
            std::fs::create_dir_all(&scratch_b).unwrap();
            let mut cluster_b = toml::Table::new();
            cluster_b.insert("slurm_conf".into(), conf_b.display().to_string().into());
            cluster_b.insert("scratch_root".into(), scratch_b.display().to_string().into());
            cluster_b.insert("near_spaces".into(), vec!["scratchspace"].into());
            clusters.insert("b".into(), cluster_b.into());
            slurm_conf_b = Some(conf_b);
        }
        value.insert("clusters".into(), clusters.into());

        let mut jobwrap = toml::Table::new();
        jobwrap.insert("state_dir".into(), state_dir.display().to_string().into());
        jobwrap.insert("poll_interval".into(), "500ms".into());
        jobwrap.insert("transfer_concurrency".into(), 8.into());
        value.insert("jobwrap".into(), jobwrap.into());

        let config_path = dir.path().join("datanet.toml");
        std::fs::write(&config_path, toml::to_string(&value).unwrap()).unwrap();
        let config = Config::load(&config_path).unwrap();

        Harness {
            dir,
            name,
            config_path,
            config,
            slurm_conf,
            slurm_conf_b,
            scratch_root,
            state_dir,
        }
    }

    /// Adds a cluster whose controller does not respond (a copy of cluster a's
    /// `slurm.conf` pointing at a closed port).
    pub fn add_unreachable_cluster(&mut self, name: &str) {
        let text = std::fs::read_to_string(&self.slurm_conf).unwrap();
        let broken: String = text
            .lines()
            .map(|line| if line.starts_with("SlurmctldPort=") { "SlurmctldPort=9".to_string() } else { line.to_string() })
            .collect::<Vec<_>>()
            .join("\n");
        let conf = self.dir.path().join(format!("{name}-slurm.conf"));
        std::fs::write(&conf, broken + "\n").unwrap();
        let scratch = self.dir.path().join(format!("scratch-{name}"));
        std::fs::create_dir_all(&scratch).unwrap();

        let mut value: toml::Table = std::fs::read_to_string(&self.config_path).unwrap().parse().unwrap();
        let mut cluster = toml::Table::new();
        cluster.insert("slurm_conf".into(), conf.display().to_string().into());
        cluster.insert("scratch_root".into(), scratch.display().to_string().into());
        cluster.insert("near_spaces".into(), vec!["models", "results", "scratchspace"].into());
        value["clusters"].as_table_mut().unwrap().insert(name.into(), cluster.into());
        std::fs::write(&self.config_path, toml::to_string(&value).unwrap()).unwrap();
        self.config = Config::load(&self.config_path).unwrap();
    }

    pub fn delete(&self, space: &str, path: &str) {
        let store = self.store(space);
        block_on(store.delete(&ObjectPath::parse(path).unwrap())).unwrap();
    }

    /// Returns the `slurm.conf` of a cluster of this harness.
    pub fn slurm_conf_of(&self, cluster: &str) -> PathBuf {
        match cluster {
            "a" => self.slurm_conf.clone(),
            "b" => self.slurm_conf_b.clone().expect("harness without cluster b"),
            other => panic!("no cluster {other}"),
        }
    }

    /// Slurm job ids and states with this harness's job name on one cluster.
    pub fn slurm_jobs_on(&self, cluster: &str) -> Vec<(String, String)> {
        let output = Command::new("squeue")
            .env("SLURM_CONF", self.slurm_conf_of(cluster))
            .args(["-h", "-t", "all", "-o", "%i|%T|%r", "--name"])
            .arg(&self.name)
            .output()
            .unwrap();
        assert!(output.status.success(), "squeue failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('|'))
            .map(|(id, rest)| (id.trim().to_string(), rest.trim().to_string()))
            .collect()
    }

    fn store(&self, space: &str) -> std::sync::Arc<dyn ObjectStore> {
        datanet::open_space(&self.config.spaces[space]).unwrap().store
    }

    pub fn put(&self, space: &str, path: &str, bytes: &[u8]) {
        let store = self.store(space);
        block_on(store.put(&ObjectPath::parse(path).unwrap(), PutPayload::from(bytes.to_vec()))).unwrap();
    }

    /// Writes the zero-byte directory marker `dir_key/` the way the datanet mount's
    /// `mkdir` does.
    pub fn put_marker(&self, space: &str, dir_key: &str) {
        let client = datanet::marker::MarkerClient::for_space(&self.config.spaces[space])
            .unwrap()
            .expect("directory markers exist only in S3 spaces");
        block_on(client.put_marker(dir_key)).unwrap();
    }

    pub fn get(&self, space: &str, path: &str) -> Option<Vec<u8>> {
        let store = self.store(space);
        block_on(async {
            match store.get(&ObjectPath::parse(path).unwrap()).await {
                Ok(result) => Some(result.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(err) => panic!("cannot read {space}:{path}: {err}"),
            }
        })
    }

    pub fn list(&self, space: &str, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let store = self.store(space);
        let prefix = ObjectPath::parse(prefix).unwrap();
        let mut names: Vec<String> = block_on(store.list(Some(&prefix)).try_collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|meta| meta.location.to_string())
            .collect();
        names.sort();
        names
    }

    pub fn write_script(&self, file_name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file_name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Returns a `jobwrap` command with this harness's configuration.
    pub fn jobwrap(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobwrap"));
        command.arg("--config").arg(&self.config_path);
        command.env_remove("JOBWRAP_FAULT_KILL_AT");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.jobwrap().args(args).output().unwrap();
        eprintln!(
            "$ jobwrap {args:?} -> {:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Returns every ledger record of this harness, oldest first.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let jobs = self.state_dir.join("jobs");
        let Ok(entries) = std::fs::read_dir(&jobs) else { return Vec::new() };
        let mut records: Vec<serde_json::Value> = entries
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".json"))
            .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            .map(|entry| serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap())
            .collect();
        records.sort_by_key(|record| record["created_at"].as_u64());
        records
    }

    pub fn only_record(&self) -> serde_json::Value {
        let records = self.records();
        assert_eq!(records.len(), 1, "expected one ledger record: {records:#?}");
        records.into_iter().next().unwrap()
    }

    /// Waits until `check` accepts the only record, or panics after `timeout`.
    pub fn wait_for_record(&self, timeout: Duration, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let started = Instant::now();
        loop {
            if let Some(record) = self.records().into_iter().next() {
                if check(&record) {
                    return record;
                }
            }
            assert!(started.elapsed() < timeout, "record did not reach the expected state: {:#?}", self.records());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Slurm job ids (any state Slurm still remembers) with this harness's job name.
    pub fn slurm_jobs(&self) -> Vec<String> {
        let output = Command::new("squeue")
            .env("SLURM_CONF", &self.slurm_conf)
            .args(["-h", "-t", "all", "-o", "%i", "--name"])
            .arg(&self.name)
            .output()
            .unwrap();
        assert!(output.status.success(), "squeue failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).lines().map(|line| line.trim().to_string()).collect()
    }

    pub fn scancel_on(&self, cluster: &str, job_id: &str) {
        let conf = self.slurm_conf_of(cluster);
        let status = Command::new("scancel").env("SLURM_CONF", conf).arg(job_id).status().unwrap();
        assert!(status.success());
    }

    pub fn scancel(&self, job_id: &str) {
        let status = Command::new("scancel").env("SLURM_CONF", &self.slurm_conf).arg(job_id).status().unwrap();
        assert!(status.success());
    }

    /// Lists the working directories left under the scratch root.
    pub fn workdirs(&self) -> Vec<String> {
        std::fs::read_dir(&self.scratch_root)
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Cancel only the jobs this harness submitted (they carry its unique name).
        for conf in std::iter::once(&self.slurm_conf).chain(self.slurm_conf_b.iter()) {
            let _ = Command::new("scancel").env("SLURM_CONF", conf).arg("--name").arg(&self.name).status();
        }
    }
}

pub fn text(bytes: Option<Vec<u8>>) -> String {
    String::from_utf8(bytes.expect("object missing")).unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_path_absent(path: &Path) {
    assert!(!path.exists(), "{} still exists", path.display());
}
