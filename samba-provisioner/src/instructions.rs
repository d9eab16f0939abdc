//! Mount instructions that `decode` prints on a graphical node.
//!
//! The text contains the password, because the node's user needs it to mount; it goes
//! to standard output of the user who decoded the token and nowhere else.

use std::fmt::Write;
use std::time::SystemTime;

use serde::Serialize;

use crate::lease::rfc3339;
use crate::token::TokenClaims;

/// SMB's standard TCP port; Windows clients need an explicit port for any other.
const SMB_PORT: u16 = 445;

/// The decoded token in machine-readable form.
#[derive(Debug, Serialize)]
pub struct MountInfo<'a> {
    pub lease_id: &'a str,
    pub server: &'a str,
    pub port: u16,
    pub share: &'a str,
    pub unc: String,
    pub account: &'a str,
    pub password: &'a str,
    pub expires_at: u64,
    pub expires: String,
    pub read_only: bool,
    pub encrypt: &'a str,
}

impl<'a> MountInfo<'a> {
    pub fn new(claims: &'a TokenClaims) -> MountInfo<'a> {
        MountInfo {
            lease_id: &claims.lease_id,
            server: &claims.server,
            port: claims.port,
            share: &claims.share,
            unc: format!("\\\\{}\\{}", claims.server, claims.share),
            account: &claims.account,
            password: claims.password.expose(),
            expires_at: claims.expires_at,
            expires: rfc3339(claims.expires_at),
            read_only: claims.read_only,
            encrypt: &claims.encrypt,
        }
    }
}

/// Renders the Windows and Linux instructions as text.
pub fn render_text(claims: &TokenClaims, now: SystemTime) -> String {
    let info = MountInfo::new(claims);
    let remaining = claims
        .expires_at_time()
        .duration_since(now)
        .unwrap_or_default();
    let remaining = humantime::format_duration(std::time::Duration::from_secs(remaining.as_secs()));
    let mut out = String::new();

    let _ = writeln!(out, "Share {} for account {}", info.unc, info.account);
    let _ = writeln!(
        out,
        "Valid until {} ({remaining} from now){}",
        info.expires,
        if info.read_only { ", read-only" } else { "" }
    );
    let _ = writeln!(out);

    render_windows(&mut out, &info);
    let _ = writeln!(out);
    render_linux(&mut out, &info);
    out
}

fn render_windows(out: &mut String, info: &MountInfo<'_>) {
    let custom_port = info.port != SMB_PORT;
    let _ = writeln!(out, "Windows (cmd.exe):");
    let _ = writeln!(
        out,
        "  net use Z: {} /user:{} {} /persistent:no{}",
        info.unc,
        info.account,
        info.password,
        if custom_port {
            format!(" /TCPPORT:{}", info.port)
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "Windows (PowerShell):");
    let _ = writeln!(
        out,
        "  New-SmbMapping -LocalPath Z: -RemotePath '{}' -UserName '{}' -Password '{}' -Persistent $false{}{}",
        info.unc,
        info.account,
        info.password,
        if info.encrypt == "required" { " -RequirePrivacy $true" } else { "" },
        if custom_port { format!(" -TcpPort {}", info.port) } else { String::new() }
    );
    if custom_port {
        let _ = writeln!(
            out,
            "  (port {} needs Windows 11 24H2 or Windows Server 2025 or later for /TCPPORT and -TcpPort)",
            info.port
        );
    }
}

fn render_linux(out: &mut String, info: &MountInfo<'_>) {
    let credentials = format!("/root/.datanet-{}.cred", info.share);
    let mut options = format!("credentials={credentials},port={},vers=3.1.1", info.port);
    if info.encrypt == "required" {
        options.push_str(",seal");
    }
    if info.read_only {
        options.push_str(",ro");
    }
    options.push_str(",uid=$(id -u),gid=$(id -g)");

    let _ = writeln!(out, "Linux (cifs-utils, as root):");
    let _ = writeln!(
        out,
        "  (umask 077 && printf 'username=%s\\npassword=%s\\n' '{}' '{}' > {credentials})",
        info.account, info.password
    );
    let _ = writeln!(out, "  mkdir -p /mnt/{}", info.share);
    let _ = writeln!(
        out,
        "  mount -t cifs //{}/{} /mnt/{} -o {options}",
        info.server, info.share, info.share
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::secret::Password;

    fn claims(port: u16, read_only: bool) -> TokenClaims {
        TokenClaims {
            lease_id: "abcdefgh01234567".into(),
            server: "gw1".into(),
            port,
            share: "dnlabcdef012345".into(),
            account: "dnlabcdef012345".into(),
            password: Password::new("A".repeat(32)),
            expires_at: 7200,
            read_only,
            encrypt: "required".into(),
        }
    }

    #[test]
    fn text_has_windows_and_linux_commands() {
        let text = render_text(&claims(4455, false), UNIX_EPOCH + Duration::from_secs(3600));
        assert!(
            text.contains("net use Z: \\\\gw1\\dnlabcdef012345 /user:dnlabcdef012345 "),
            "{text}"
        );
        assert!(text.contains("/TCPPORT:4455"), "{text}");
        assert!(
            text.contains("New-SmbMapping -LocalPath Z: -RemotePath '\\\\gw1\\dnlabcdef012345'"),
            "{text}"
        );
        assert!(text.contains("-TcpPort 4455"), "{text}");
        assert!(text.contains("umask 077"), "{text}");
        assert!(
            text.contains(
                "mount -t cifs //gw1/dnlabcdef012345 /mnt/dnlabcdef012345 -o credentials="
            ),
            "{text}"
        );
        assert!(text.contains(",seal"), "{text}");
        assert!(text.contains("1h from now"), "{text}");
    }

    #[test]
    fn standard_port_and_read_only() {
        let text = render_text(&claims(445, true), UNIX_EPOCH);
        assert!(!text.contains("TCPPORT"), "{text}");
        assert!(!text.contains("-TcpPort"), "{text}");
        assert!(text.contains(",ro,"), "{text}");
        assert!(text.contains("read-only"), "{text}");
    }
}
