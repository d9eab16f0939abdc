//! Samba's side of a lease: the passdb entry, its expiry, the registry share, and
//! disconnecting sessions.
//!
//! Every command gets the configured `smb.conf` with `-s`, so the provisioner manages
//! the smbd that serves leases and never the host's default configuration. Shares live
//! in the registry (`net conf`), which smbd reads on demand without a reload. Each share
//! is imported as one named section, which replaces only that share.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::secret::Password;
use crate::share::ShareDefinition;
use crate::tool::run;
use crate::ProvisionError;

#[derive(Debug, Clone)]
pub struct Samba {
    smb_conf: PathBuf,
    /// Directory for the 0600 temporary files that `net conf import` reads.
    temp_dir: PathBuf,
}

/// One line of `pdbedit -L`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassdbEntry {
    pub name: String,
    pub full_name: String,
}

impl Samba {
    pub fn new(smb_conf: &Path, temp_dir: &Path) -> Samba {
        Samba {
            smb_conf: smb_conf.to_path_buf(),
            temp_dir: temp_dir.to_path_buf(),
        }
    }

    fn conf(&self) -> &str {
        self.smb_conf.to_str().unwrap_or_default()
    }

    /// Adds a passdb entry for an existing Unix account. The password goes to
    /// `pdbedit -t` on standard input, twice, because pdbedit reads a confirmation.
    pub fn add_user(&self, name: &str, password: &Password) -> Result<(), ProvisionError> {
        let mut input =
            zeroize::Zeroizing::new(Vec::with_capacity(2 * password.expose().len() + 2));
        for _ in 0..2 {
            input.extend_from_slice(password.expose().as_bytes());
            input.push(b'\n');
        }
        run(
            "pdbedit",
            &["-s", self.conf(), "-a", "-t", "-u", name],
            Some(&input),
            "adding the Samba user",
        )?
        .check()?;
        Ok(())
    }

    /// Sets the account's expiry (kickoff time) in passdb, so Samba rejects logins from
    /// `expires_at` on even if no gc runs. `pdbedit -a` ignores `-K`, hence a second call.
    pub fn set_expiry(&self, name: &str, expires_at: u64) -> Result<(), ProvisionError> {
        let epoch = expires_at.to_string();
        run(
            "pdbedit",
            &["-s", self.conf(), "-u", name, "-K", &epoch],
            None,
            "setting the Samba user's expiry",
        )?
        .check()?;
        Ok(())
    }

    /// Removes a passdb entry; an entry that does not exist is not an error.
    pub fn remove_user(&self, name: &str) -> Result<(), ProvisionError> {
        let output = run(
            "pdbedit",
            &["-s", self.conf(), "-x", "-u", name],
            None,
            "removing the Samba user",
        )?;
        if output.success || output.stderr.contains("does not exist") {
            return Ok(());
        }
        Err(output.into_error())
    }

    pub fn list_users(&self) -> Result<Vec<PassdbEntry>, ProvisionError> {
        let output = run(
            "pdbedit",
            &["-s", self.conf(), "-L"],
            None,
            "listing Samba users",
        )?
        .check()?;
        Ok(output
            .stdout
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ':');
                let name = fields.next()?.to_string();
                let _uid = fields.next()?;
                let full_name = fields.next().unwrap_or_default().to_string();
                Some(PassdbEntry { name, full_name })
            })
            .collect())
    }

    /// Creates or replaces one registry share. The section goes through a 0600 file,
    /// and naming the section keeps `net conf import` from dropping the rest of the
    /// registry configuration.
    pub fn import_share(&self, share: &ShareDefinition) -> Result<(), ProvisionError> {
        let section = share.to_section()?;
        let mut file = tempfile::Builder::new()
            .prefix("share-")
            .suffix(".conf")
            .tempfile_in(&self.temp_dir)
            .map_err(|err| ProvisionError::io("create a temporary file in", &self.temp_dir, err))?;
        file.write_all(section.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|err| ProvisionError::io("write", file.path().to_path_buf(), err))?;

        let file_path = file.path().to_str().unwrap_or_default().to_string();
        run(
            "net",
            &["conf", "import", "-s", self.conf(), &file_path, &share.name],
            None,
            "importing the share into the registry",
        )?
        .check()?;
        Ok(())
    }

    /// Removes a registry share; a share that does not exist is not an error.
    pub fn remove_share(&self, name: &str) -> Result<(), ProvisionError> {
        let output = run(
            "net",
            &["conf", "delshare", "-s", self.conf(), name],
            None,
            "removing the share from the registry",
        )?;
        if output.success || output.stderr.contains("SBC_ERR_NO_SUCH_SERVICE") {
            return Ok(());
        }
        Err(output.into_error())
    }

    pub fn list_shares(&self) -> Result<Vec<String>, ProvisionError> {
        let output = run(
            "net",
            &["conf", "listshares", "-s", self.conf()],
            None,
            "listing registry shares",
        )?
        .check()?;
        Ok(output
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Returns a registry share's `comment`, or `None` when it has none.
    pub fn share_comment(&self, name: &str) -> Result<Option<String>, ProvisionError> {
        let output = run(
            "net",
            &["conf", "getparm", "-s", self.conf(), name, "comment"],
            None,
            "reading a share's comment",
        )?;
        if !output.success {
            return Ok(None);
        }
        Ok(Some(output.stdout.trim().to_string()))
    }

    /// Disconnects every session's connection to the share at once. Removing the share
    /// and the user alone leaves open connections working.
    pub fn close_share(&self, name: &str) -> Result<(), ProvisionError> {
        run(
            "smbcontrol",
            &["-s", self.conf(), "smbd", "close-share", name],
            None,
            "disconnecting the share's sessions",
        )?
        .check()?;
        Ok(())
    }

    /// Checks the global settings that lease shares depend on: registry shares, which
    /// smbd must load, and SMB3 as the minimum protocol, which share sections cannot set.
    pub fn check_server_settings(&self) -> Result<(), ProvisionError> {
        let registry = self.global_parameter("registry shares")?;
        if !registry.eq_ignore_ascii_case("yes") {
            return Err(ProvisionError::invalid(
                "smb.conf setting `registry shares`",
                registry,
                format!("lease shares live in the registry; add `registry shares = yes` to [global] of {}", self.smb_conf.display()),
            ));
        }
        let protocol = self.global_parameter("server min protocol")?;
        if !protocol.to_ascii_uppercase().starts_with("SMB3") {
            return Err(ProvisionError::invalid(
                "smb.conf setting `server min protocol`",
                protocol,
                format!(
                    "leases require SMB3; add `server min protocol = SMB3` to [global] of {}",
                    self.smb_conf.display()
                ),
            ));
        }
        Ok(())
    }

    fn global_parameter(&self, name: &str) -> Result<String, ProvisionError> {
        let parameter = format!("--parameter-name={name}");
        let output = run(
            "testparm",
            &["-s", &parameter, self.conf()],
            None,
            "reading smb.conf",
        )?
        .check()?;
        Ok(output.stdout.trim().to_string())
    }
}
