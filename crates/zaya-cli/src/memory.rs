//! How the `zaya` process gets its memory from glibc: set once, first thing in `main`.
//!
//! A forward allocates and frees its intermediates (activations, attention scores, expert
//! buffers) in every layer, and a training step allocates every gradient and frees them all
//! after the optimizer. Memory that glibc hands back to the kernel has to be faulted in and
//! zeroed again on its next use, and a fault is expensive (on this project's virtual machines
//! about 10 µs per 4 KiB page, plus the TLB shootdowns of each heap shrink):
//!
//! - Blocks up to 256 MiB come from the heap (`M_MMAP_THRESHOLD`), not from a fresh mapping
//!   per block, so each layer reuses the pages of the one before (a quarter of a bf16 prefill
//!   was `clear_page` before).
//! - The heap is never trimmed (`M_TRIM_THRESHOLD` = -1): the next step or request needs the
//!   same memory again. With the old 1 GiB threshold, freeing a medium model's 3.4 GB of
//!   gradients after each optimizer step shrank the heap, and the next backward faulted ~1 M
//!   pages back in (perf: `clear_page` 29 % and TLB-shootdown IPIs 21 % of a training step;
//!   step 11.8–15.6 s against 9.6–10.7 s without trimming). The cost: freed memory stays
//!   resident, so peak RSS is the heap's high-water mark (+3 % on that step).
//! - The heap is backed by transparent huge pages where the kernel gives them on request
//!   (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`): glibc reads that choice
//!   only from `GLIBC_TUNABLES` at start-up (`glibc.malloc.hugetlb=1`), so the process
//!   re-executes itself once with the tunable added. One fault then maps 2 MiB instead of
//!   4 KiB: loading the medium model for training 6–29 s → 1.6–2.8 s, page faults of a
//!   two-step run 5.3 M → 20 K. `ZAYA_THP=0` turns this off; a `GLIBC_TUNABLES` that already
//!   names `glibc.malloc.hugetlb` is respected as it is.
//!
//! The peak of a training step is then the heap's high-water mark, not its live bytes: on
//! the medium model (f32, batch 4 × 256, the Xeon, 2026-12-06) the live peak is 13 728 MiB
//! (weights, gradients and both moments: 4 × 3402 MiB, plus 118 MiB), the peak RSS 14.6–
//! 14.9 GB then, 14.2 GB since the linear layers' weight gradients are written in their
//! final layout (no transient transposed copy of each: fewer odd-sized blocks to place).
//! glibc places each block where it fits, not where pages are already resident, so
//! over the steps activations and gradients touch more addresses than are ever live at
//! once. Tried against it and removed: zeroed blocks of 32 MiB and more in mappings of their
//! own, returned when freed (`ZAYA_MAP_ZEROED=1`, 0.80× of the reference's peak on the Zen 4
//! once, when the experts' weight gradients were zero-filled blocks; no lower now that they
//! are written without a fill, and with unfilled blocks mapped too 14.9 GB at 9.2–9.8 s per
//! step instead of 14.6–14.7 GB at 7.2–7.5 s); one arena for all threads; `malloc_trim`
//! once after the first backward (the next forward's activations land on the trimmed pages)
//! or at every large parameter's final gradient (no lower, 2 s slower per medium step).
//!
//! Nothing here changes a result: only where freed memory goes. It is the `zaya` binary's
//! choice; a program that links the `zaya` library gets glibc's defaults unless it makes the
//! same two `mallopt` calls and starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

/// Applies the settings above. Call before any other thread starts; may not return (the
/// re-execution), in which case the new image starts `main` again with the tunable set.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        reexec_with_huge_pages();
        if std::env::var_os("ZAYA_MAP_ZEROED").is_some() {
            eprintln!("note: ZAYA_MAP_ZEROED is no longer read (removed: it stopped lowering the training peak; see memory.rs)");
        }
        // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
}

/// The policy this process runs under, for benchmark records: results moved by a third
/// with it (see the module docs).
pub fn describe() -> String {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return "the platform allocator's defaults".into();
    }
    let huge = heap_has_huge_pages();
    let modes = std::fs::read_to_string(THP_ENABLED).unwrap_or_default();
    let thp = selected_thp_mode(&modes).unwrap_or("unknown");
    format!(
        "glibc heap never trimmed, blocks up to 256 MiB; huge pages requested: {}; kernel THP mode {thp}",
        if huge { "yes" } else { "no" }
    )
}

/// Whether this process runs with glibc's huge-page tunable (after the re-execution).
pub fn heap_has_huge_pages() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.hugetlb=1"))
}

/// Where Linux lists the THP modes, the selected one in brackets: `always [madvise] never`.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

fn selected_thp_mode(modes: &str) -> Option<&str> {
    modes.split_whitespace().find(|w| w.starts_with('['))
}

/// The `GLIBC_TUNABLES` value that asks for huge pages, given the current one; `None` where
/// nothing should change (already chosen either way, or the kernel would not honour it).
fn tunables_with_huge_pages(current: Option<&str>, thp_mode: &str) -> Option<String> {
    // Only `madvise` needs glibc's request: `always` backs the heap anyway, `never` refuses.
    if selected_thp_mode(thp_mode)? != "[madvise]" {
        return None;
    }
    match current {
        Some(t) if t.contains("glibc.malloc.hugetlb") => None,
        Some(t) if !t.is_empty() => Some(format!("{t}:glibc.malloc.hugetlb=1")),
        _ => Some("glibc.malloc.hugetlb=1".to_string()),
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn reexec_with_huge_pages() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("ZAYA_THP").is_some_and(|v| v == "0") {
        return;
    }
    let Ok(mode) = std::fs::read_to_string(THP_ENABLED) else {
        return;
    };
    let current = std::env::var("GLIBC_TUNABLES").ok();
    let Some(tunables) = tunables_with_huge_pages(current.as_deref(), &mode) else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // Same pid, arguments, environment and open files; only glibc's start-up reads differ.
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    // Not fatal: the process runs on as it was, with small pages.
    eprintln!("zaya: could not re-execute with huge pages for the heap ({err}); continuing");
}

#[cfg(test)]
mod tests {
    use super::tunables_with_huge_pages;

    #[test]
    fn huge_pages_are_asked_for_only_where_the_kernel_waits_for_the_request() {
        let madvise = "always [madvise] never\n";
        assert_eq!(
            tunables_with_huge_pages(None, madvise).as_deref(),
            Some("glibc.malloc.hugetlb=1")
        );
        assert_eq!(
            tunables_with_huge_pages(Some("glibc.malloc.arena_max=2"), madvise).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
        );
        // A choice already made (either way) stands, so the re-execution cannot loop.
        assert_eq!(
            tunables_with_huge_pages(Some("glibc.malloc.hugetlb=0"), madvise),
            None
        );
        assert_eq!(
            tunables_with_huge_pages(Some("glibc.malloc.hugetlb=1"), madvise),
            None
        );
        assert_eq!(
            tunables_with_huge_pages(None, "[always] madvise never"),
            None
        );
        assert_eq!(
            tunables_with_huge_pages(None, "always madvise [never]"),
            None
        );
        assert_eq!(tunables_with_huge_pages(None, ""), None);
    }
}
