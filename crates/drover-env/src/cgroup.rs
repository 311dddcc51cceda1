//! Kernel-enforced memory limits for local service processes: each limited instance gets a
//! memory cgroup of its own under drover's cgroup, with cgroup v2 `memory.max` where the
//! memory controller is delegated to drover, or cgroup v1 `memory.limit_in_bytes` where
//! that hierarchy is writable. Where neither is, the supervisor falls back to watching
//! resident memory. A kill by the kernel is recognised after the fact (`oom_kill` counter)
//! so the restart's recorded reason says so.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every cgroup drover creates, so leftovers of a killed server are found.
const PREFIX: &str = "drover-svc-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Where limited instances' cgroups are made.
#[derive(Debug)]
pub struct MemoryCgroups {
    version: CgroupVersion,
    /// drover's own memory cgroup directory; instance cgroups are its children.
    base: PathBuf,
    next: AtomicU64,
}

impl MemoryCgroups {
    /// Finds a memory cgroup drover may create children in, or says why there is none.
    pub fn detect() -> Result<Self, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        Self::detect_from(&mountinfo, &own)
    }

    /// [`Self::detect`] over given `/proc/self/mountinfo` and `/proc/self/cgroup` texts.
    pub fn detect_from(mountinfo: &str, own_cgroups: &str) -> Result<Self, String> {
        let mut reasons = Vec::new();
        // cgroup v2: the unified hierarchy, if the memory controller reaches our cgroup's
        // children.
        if let (Some(mount), Some(path)) =
            (mount_point(mountinfo, "cgroup2", None), own_path(own_cgroups, "0", ""))
        {
            let base = join(&mount, &path);
            let delegated = std::fs::read_to_string(base.join("cgroup.subtree_control"))
                .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "memory"));
            if delegated && writable(&base) {
                return Ok(Self::at(CgroupVersion::V2, base));
            }
            reasons
                .push(format!("cgroup v2: memory controller not delegated to {}", base.display()));
        }
        // cgroup v1: the memory hierarchy.
        if let (Some(mount), Some(path)) = (
            mount_point(mountinfo, "cgroup", Some("memory")),
            own_controller_path(own_cgroups, "memory"),
        ) {
            let base = join(&mount, &path);
            if base.join("memory.limit_in_bytes").is_file() && writable(&base) {
                return Ok(Self::at(CgroupVersion::V1, base));
            }
            reasons.push(format!("cgroup v1: {} is not writable", base.display()));
        }
        if reasons.is_empty() {
            reasons.push("no memory cgroup hierarchy is mounted".to_owned());
        }
        Err(reasons.join("; "))
    }

    fn at(version: CgroupVersion, base: PathBuf) -> Self {
        Self { version, base, next: AtomicU64::new(0) }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// A new cgroup for one run of `instance`, limited to `limit` bytes (no swap beyond it).
    pub fn create(&self, instance: &str, limit: u64) -> io::Result<LimitedGroup> {
        let name: String = instance
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let dir = self.base.join(format!(
            "{PREFIX}{}-{name}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)?;
        let group = LimitedGroup { version: self.version, dir, limit };
        let limited = match self.version {
            CgroupVersion::V2 => std::fs::write(group.dir.join("memory.max"), limit.to_string())
                .and_then(|()| {
                    // Where swap accounting exists, no swapping past the limit either.
                    let swap = group.dir.join("memory.swap.max");
                    if swap.exists() { std::fs::write(swap, "0") } else { Ok(()) }
                }),
            CgroupVersion::V1 => std::fs::write(
                group.dir.join("memory.limit_in_bytes"),
                limit.to_string(),
            )
            .and_then(|()| {
                let memsw = group.dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() { std::fs::write(memsw, limit.to_string()) } else { Ok(()) }
            }),
        };
        match limited {
            Ok(()) => Ok(group),
            Err(err) => {
                group.remove();
                Err(err)
            }
        }
    }

    /// Removes the empty cgroups of drover servers that are gone (their processes died with
    /// them); a live server's are left alone.
    pub fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.base) else { return 0 };
        entries
            .filter_map(Result::ok)
            .filter(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let owner = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next());
                owner.is_some_and(|pid| !Path::new("/proc").join(pid).exists())
            })
            .filter(|entry| std::fs::remove_dir(entry.path()).is_ok())
            .count()
    }
}

/// One instance's cgroup.
#[derive(Debug)]
pub struct LimitedGroup {
    version: CgroupVersion,
    dir: PathBuf,
    limit: u64,
}

impl LimitedGroup {
    /// `cgroup.procs` open for writing: a child started with it joins before `exec`
    /// ([`crate::GroupChild::spawn_in`]).
    pub fn procs(&self) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new().write(true).open(self.dir.join("cgroup.procs"))
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel killed a process of the cgroup for going over the limit.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = match self.version {
            CgroupVersion::V2 => ("memory.events", "oom_kill"),
            CgroupVersion::V1 => ("memory.oom_control", "oom_kill"),
        };
        std::fs::read_to_string(self.dir.join(file)).is_ok_and(|text| {
            text.lines().any(|line| {
                line.split_once(' ')
                    .is_some_and(|(k, v)| k == key && v.trim().parse::<u64>().is_ok_and(|n| n > 0))
            })
        })
    }

    /// Removes the cgroup (it must be empty: its processes gone). Best effort.
    pub fn remove(&self) -> bool {
        std::fs::remove_dir(&self.dir).is_ok()
    }
}

fn writable(dir: &Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// `/sys/fs/cgroup` + `/a/b` without losing the mount point.
fn join(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// The mount point of a filesystem of type `fstype` (with `option` among its super
/// options, for v1 controllers) from mountinfo text.
fn mount_point(mountinfo: &str, fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let kind = right.next()?;
        let _source = right.next()?;
        let super_options = right.next().unwrap_or("");
        if kind != fstype {
            return None;
        }
        if let Some(option) = option
            && !super_options.split(',').any(|o| o == option)
        {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        // Only the hierarchy's root mounted here: a bind of a sub-cgroup would misplace us.
        (left.split_whitespace().nth(3)? == "/").then(|| PathBuf::from(mount))
    })
}

/// Our cgroup path in hierarchy `id` with controller list `controllers` (v2: "0" and "").
fn own_path(own_cgroups: &str, id: &str, controllers: &str) -> Option<String> {
    own_cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        (parts.next()? == id && parts.next()? == controllers)
            .then(|| parts.next())?
            .map(str::to_owned)
    })
}

/// Our cgroup path in the v1 hierarchy that has `controller`.
fn own_controller_path(own_cgroups: &str, controller: &str) -> Option<String> {
    own_cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        controllers.split(',').any(|c| c == controller).then(|| parts.next())?.map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn mountinfo_and_own_cgroups_are_read_per_version() {
        assert_eq!(
            mount_point(HYBRID, "cgroup", Some("memory")),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            mount_point(HYBRID, "cgroup2", None),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point(HYBRID, "cgroup", Some("pids")), None);
        let own = "4:memory:/jobs/abc\n3:cpu,cpuacct:/\n0::/user.slice/x\n";
        assert_eq!(own_controller_path(own, "memory").as_deref(), Some("/jobs/abc"));
        assert_eq!(own_controller_path(own, "cpuacct").as_deref(), Some("/"));
        assert_eq!(own_path(own, "0", "").as_deref(), Some("/user.slice/x"));
        assert_eq!(
            join(Path::new("/sys/fs/cgroup/memory"), "/jobs/abc"),
            PathBuf::from("/sys/fs/cgroup/memory/jobs/abc")
        );
    }

    #[test]
    fn no_memory_hierarchy_is_an_explained_absence() {
        let reason = MemoryCgroups::detect_from("", "0::/\n").unwrap_err();
        assert!(reason.contains("no memory cgroup"), "{reason}");
    }
}
