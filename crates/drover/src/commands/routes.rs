//! `drover routes` (the proxy's hostnames, and `/etc/hosts` lines for custom names) and
//! `drover proxy trust` (where the local CA is and how to trust it).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use drover_config::Config;
use drover_server::Mode;

use crate::cli::GlobalArgs;
use crate::output;
use crate::target::Target;

/// Marks the block `--apply` owns in a hosts file.
const BLOCK_BEGIN: &str = "# BEGIN drover routes (managed by `drover routes --hosts --apply`)";
const BLOCK_END: &str = "# END drover routes";

pub(crate) async fn routes(
    global: &GlobalArgs,
    config: &Config,
    hosts: bool,
    apply_to: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let target = Target::connect(global, config, Mode::Inspect).await?;
    let list = target.client.routes().await;
    let embedded = target.is_embedded();
    target.close().await?;
    let list = list?;
    if hosts {
        let ip = proxy_ip(list.proxy.as_deref(), config);
        let names: std::collections::BTreeSet<&str> = list
            .items
            .iter()
            .map(|r| r.host.as_str())
            .chain(list.unrouted.iter().map(|u| u.host.as_str()))
            .filter(|host| needs_hosts_entry(host))
            .collect();
        let lines: Vec<String> = names.iter().map(|host| format!("{ip} {host}")).collect();
        match apply_to {
            Some(file) => {
                write_hosts_block(&file, &lines)
                    .with_context(|| format!("cannot update {}", file.display()))?;
                output::note(format!("{} names written to {}", lines.len(), file.display()));
            }
            None if global.json => output::json(&lines),
            None => {
                for line in &lines {
                    output::data(line);
                }
            }
        }
        if lines.is_empty() {
            output::note("no custom names outside .localhost (`.localhost` resolves by itself)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if global.json {
        output::json(&list);
        return Ok(ExitCode::SUCCESS);
    }
    if embedded {
        output::note("no drover server is running: routes exist while `drover up` runs");
    }
    let rows: Vec<Vec<String>> = list
        .items
        .iter()
        .map(|r| {
            vec![
                r.host.clone(),
                r.kind.clone(),
                r.service.clone(),
                r.environment.clone().unwrap_or_else(|| "(shared)".to_owned()),
                r.upstream.clone(),
                r.url.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["HOST", "KIND", "SERVICE", "ENVIRONMENT", "UPSTREAM", "URL"], &rows);
    for unrouted in &list.unrouted {
        output::note(format!(
            "{} → {} is not routed: that service is not running",
            unrouted.host, unrouted.target
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// `.localhost` names resolve to loopback by themselves (RFC 6761); others need a line.
fn needs_hosts_entry(host: &str) -> bool {
    host != "localhost" && !host.ends_with(".localhost")
}

/// The address hosts entries point at: the proxy's, or loopback when it listens on all.
fn proxy_ip(proxy: Option<&str>, config: &Config) -> String {
    let addr: std::net::SocketAddr =
        proxy.and_then(|p| p.parse().ok()).unwrap_or(config.proxy.listen);
    match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    }
}

/// Replaces drover's marked block in `file` (or appends one), leaving every other line
/// as it was. Written in place: `/etc/hosts` is often a bind mount that cannot be renamed
/// over.
fn write_hosts_block(file: &Path, lines: &[String]) -> std::io::Result<()> {
    let current = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err),
    };
    let mut kept = Vec::new();
    let mut inside = false;
    for line in current.lines() {
        match line {
            BLOCK_BEGIN => inside = true,
            BLOCK_END => inside = false,
            _ if !inside => kept.push(line),
            _ => {}
        }
    }
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    if !lines.is_empty() {
        text.push_str(BLOCK_BEGIN);
        text.push('\n');
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(BLOCK_END);
        text.push('\n');
    }
    std::fs::write(file, text)
}

pub(crate) async fn trust(global: &GlobalArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let dir = drover_server::proxy_ca_dir(&config.data_dir);
    let ca = tokio::task::spawn_blocking(move || drover_proxy::LocalCa::load_or_create(&dir))
        .await
        .context("loading the local CA")??;
    let path = std::fs::canonicalize(ca.cert_path()).unwrap_or_else(|_| ca.cert_path().into());
    let path = path.display();
    if global.json {
        output::json(&serde_json::json!({ "ca_cert": path.to_string() }));
        return Ok(ExitCode::SUCCESS);
    }
    output::data(format!("drover's local CA certificate: {path}"));
    output::data(format!(
        "\nIt signs the certificates `drover up --proxy-tls-listen ADDR` mints for each hostname.\n\
         Trust it once (drover never changes your trust store itself):\n\n\
         Debian/Ubuntu:  sudo cp {path} /usr/local/share/ca-certificates/drover-local-ca.crt && sudo update-ca-certificates\n\
         Fedora/RHEL:    sudo cp {path} /etc/pki/ca-trust/source/anchors/drover-local-ca.pem && sudo update-ca-trust\n\
         Arch:           sudo trust anchor --store {path}\n\
         macOS:          sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {path}\n\
         Firefox/Chrome on Linux keep their own store (NSS):\n\
                         certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n drover-local-ca -i {path}\n\
         curl only:      curl --cacert {path} https://app.run-….localhost:PORT/"
    ));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_block_is_replaced_and_other_lines_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
        write_hosts_block(&file, &["127.0.0.1 api.novu.loc".to_owned()]).unwrap();
        write_hosts_block(&file, &["127.0.0.1 mail.alice.loc".to_owned()]).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            text,
            format!(
                "127.0.0.1 localhost\n::1 localhost\n{BLOCK_BEGIN}\n127.0.0.1 mail.alice.loc\n{BLOCK_END}\n"
            )
        );
        write_hosts_block(&file, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "127.0.0.1 localhost\n::1 localhost\n");
    }

    #[test]
    fn only_names_outside_localhost_need_entries() {
        assert!(needs_hosts_entry("api.novu.loc"));
        assert!(!needs_hosts_entry("web.alice.localhost"));
        assert!(!needs_hosts_entry("localhost"));
    }
}
