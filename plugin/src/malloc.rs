//! glibc allocator settings for training on the CPU.
//!
//! A training step allocates and frees hundreds of activation-sized buffers (0.1-4 MiB each).
//! With glibc's defaults, blocks above the mmap threshold are mapped and unmapped on every
//! allocation and the heap top is trimmed back to the kernel, so every step pays page faults
//! and the kernel zeroing fresh pages (about a tenth of a step's CPU time in `perf` on the
//! `leaf bench-train` shape). [`keep_freed_memory`] raises both thresholds so freed buffers are
//! reused. Explicit `malloc_trim(0)` calls (the server's, after unloading a model) still hand
//! memory back.

/// Serves blocks up to 32 MiB (glibc's largest mmap threshold) from the heap and trims the
/// heap only above 1 GiB of free top space. Returns whether glibc accepted both settings; a
/// no-op returning `false` on other C libraries.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's `mallopt` parameters (malloc.h).
        const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
        const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
        extern "C" {
            fn mallopt(
                param: std::os::raw::c_int,
                value: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        // SAFETY: mallopt only changes the allocator's tuning parameters; it is documented as
        // callable at any time, and both values are in range.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
