//! Smoke tests of the running service stack: one object through Garage with the
//! project's own object access, one `sbatch` job per Slurm cluster, one SMB listing.
//! Each test uses its own key, bucket, directory or file, so they run in parallel.

use std::fs;
use std::process::Command;

use bytes::Bytes;
use datanet::open_space;
use datanet_e2e::{assert_success, run, unique_name, Stack};
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

#[tokio::test]
async fn garage_object_round_trip_through_configured_space() {
    let stack = Stack::from_env();
    let config = stack.config();
    let space = open_space(config.space("models").unwrap()).unwrap();

    let dir = unique_name("smoke");
    let path = ObjectPath::from(format!("{dir}/hello world.txt"));
    let body = Bytes::from(format!("written by {dir}\n"));
    space.store.put(&path, PutPayload::from(body.clone())).await.unwrap();

    let read = space.store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(read, body);
    let meta = space.store.head(&path).await.unwrap();
    assert_eq!(meta.size, body.len() as u64);
    assert!(meta.e_tag.is_some(), "Garage returns an ETag");

    let prefix = ObjectPath::from(dir.as_str());
    let listed: Vec<_> = space.store.list(Some(&prefix)).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].location, path);

    space.store.delete(&path).await.unwrap();
    let err = space.store.get(&path).await.unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn unique_bucket_is_writable_with_stack_key() {
    let stack = Stack::from_env();
    let bucket = stack.unique_bucket("smoke");
    let space = open_space(&stack.bucket_space("smoke", &bucket)).unwrap();

    let path = ObjectPath::from("a/b/c.bin");
    let body = Bytes::from(vec![7u8; 300 * 1024]);
    space.store.put(&path, PutPayload::from(body.clone())).await.unwrap();
    let read = space.store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(read, body);

    // The same call again is a no-op on an existing bucket, not an error.
    let output = run(Command::new("bash")
        .arg(datanet_e2e::scripts_dir().join("garage.sh"))
        .args(["bucket", &bucket])
        .env("DATANET_RUN_DIR", &stack.run_dir));
    assert_success(&output, "second scripts/garage.sh bucket");
}

/// Submits a one-line job with `sbatch --wait` and returns whether sbatch reported
/// success, together with the job's output.
fn run_one_line_job(stack: &Stack, slurm_conf: &std::path::Path, script: &str) -> (bool, String) {
    let dir = stack.scratch_root.join(unique_name("smoke-job"));
    fs::create_dir_all(&dir).unwrap();
    let output_file = dir.join("job.out");

    let output = run(Command::new("sbatch")
        .env("SLURM_CONF", slurm_conf)
        .arg("--wait")
        .arg("--parsable")
        .arg("--job-name=datanet-smoke")
        .arg(format!("--chdir={}", dir.display()))
        .arg(format!("--output={}", output_file.display()))
        .arg(format!("--wrap={script}")));
    let job_output = fs::read_to_string(&output_file).unwrap_or_default();
    fs::remove_dir_all(&dir).unwrap();
    (output.status.success(), job_output)
}

#[test]
fn sbatch_one_line_job_runs_to_completion() {
    let stack = Stack::from_env();
    let marker = unique_name("marker");
    let (ok, output) = run_one_line_job(&stack, &stack.slurm_conf, &format!("echo {marker} on $SLURM_JOB_NODELIST"));
    assert!(ok, "the job failed; output: {output}");
    assert_eq!(output.trim(), format!("{marker} on node-a"));
}

#[test]
fn sbatch_reports_a_failing_job() {
    let stack = Stack::from_env();
    let (ok, output) = run_one_line_job(&stack, &stack.slurm_conf, "echo failing; exit 3");
    assert!(!ok, "sbatch --wait must fail for a job that exits 3");
    assert_eq!(output.trim(), "failing");
}

#[test]
fn sbatch_on_second_cluster_runs_there() {
    let stack = Stack::from_env();
    let conf_b = stack.require_slurm_conf_b().to_path_buf();
    let (ok, output) = run_one_line_job(&stack, &conf_b, "echo $SLURM_CLUSTER_NAME $SLURM_JOB_NODELIST");
    assert!(ok, "the job failed; output: {output}");
    assert_eq!(output.trim(), "datanet-b node-b");
}

#[test]
fn smbclient_lists_the_smoke_share() {
    let stack = Stack::from_env();
    let name = format!("{}.txt", unique_name("listed"));
    let file = stack.shares_dir.join("smoke").join(&name);
    fs::write(&file, b"visible over SMB\n").unwrap();

    let output = run(Command::new("smbclient")
        .arg(format!("//127.0.0.1/{}", stack.smb_smoke_share))
        .args(["-p", &stack.smb_port.to_string(), "-N", "-m", "SMB3", "-c", "ls"]));
    fs::remove_file(&file).unwrap();

    assert_success(&output, "smbclient ls");
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(listing.contains(&name), "{name} missing from the listing:\n{listing}");
}
