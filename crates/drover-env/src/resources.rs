//! What processes use and whether they are still ours, read from `/proc`.

use std::path::Path;

/// Resident memory of every process in the process group `pgid`, in bytes.
pub fn group_rss_bytes(pgid: u32) -> u64 {
    let page =
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096)
            as u64;
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may contain spaces) in `(…)`.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let group: u32 = fields.get(2)?.parse().ok()?;
            let rss_pages: u64 = fields.get(21)?.parse().ok()?;
            (group == pgid).then_some(rss_pages * page)
        })
        .sum()
}

/// The live (non-zombie) processes of the process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                let Some((_, rest)) = stat.rsplit_once(')') else { return false };
                let fields: Vec<&str> = rest.split_whitespace().collect();
                fields.first().is_some_and(|state| *state != "Z")
                    && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
            })
        })
        .collect()
}

/// Whether `pid` is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Whether `pid`'s environment has `key=value`: how drover recognises its own processes
/// (and not a stranger that reused the pid).
pub fn has_env(pid: u32, key: &str, value: &str) -> bool {
    let Ok(environ) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ"))
    else {
        return false;
    };
    let wanted = format!("{key}={value}");
    environ.split(|b| *b == 0).any(|entry| entry == wanted.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_uses_memory() {
        let me = std::process::id();
        assert!(alive(me));
        let pgid = nix::unistd::getpgrp().as_raw() as u32;
        assert!(group_rss_bytes(pgid) > 0);
        assert!(!has_env(me, "DROVER_SURELY_NOT_SET", "x"));
    }
}
