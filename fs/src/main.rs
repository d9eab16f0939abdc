//! The `datanet` command: mounts the data network and checks its configuration.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("datanet: not built yet")
}
