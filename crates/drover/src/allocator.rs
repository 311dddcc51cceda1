//! The process's allocator, set up before anything allocates much.
//!
//! glibc's malloc raises its mmap threshold each time a large block that came from
//! `mmap` is freed ("dynamic mmap threshold"), so later blocks of that size (an argon2id
//! hash's 19 MiB, a big response body) are carved from the per-thread arenas instead,
//! and an arena rarely gives memory back: under varied traffic a server's resident
//! memory then only grows (measured by `drover bench soak`: 46 → 184 → 279 → 355 MB over
//! three identical rounds). Pinning the threshold at glibc's own default of 128 KiB keeps
//! large blocks in `mmap`, returned to the kernel when freed (the same rounds: 46 → 51 →
//! 51 → 51 MB).

/// Pins glibc's mmap threshold (a no-op elsewhere, or with
/// `DROVER_MALLOC_GLIBC_DEFAULTS=1`, which `drover bench soak --compare-glibc-defaults`
/// sets to measure the baseline). Call first thing in `main`.
pub(crate) fn settle() {
    if std::env::var_os(drover_server::bench::GLIBC_DEFAULT_MALLOC_VAR).is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD_BYTES: nix::libc::c_int = 128 * 1024;
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; it takes
        // plain integers and is safe to call at any time (here before other threads).
        #[allow(unsafe_code)]
        let set = unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        if set != 1 {
            eprintln!("drover: note: cannot pin malloc's mmap threshold; memory may only grow");
        }
    }
}
