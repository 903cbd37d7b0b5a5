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
//! - Opt-in, `ZAYA_MAP_ZEROED=1`: zeroed blocks of 32 MiB and more (`vec![0.0; n]`,
//!   `Tensor::zeros`: a training step's expert-weight gradients, the optimizer's moments)
//!   get a mapping of their own, 2 MiB aligned (whole huge pages), returned to the kernel
//!   when freed ([`Allocator`]). Such a block never pins the heap: a step's backward
//!   allocates each layer's expert gradients (192 MiB on the medium model) while that
//!   layer's activations are still alive, and on the heap they land above the later
//!   layers' freed holes, growing it by ~128 MiB per layer. Medium step, Zen 4 VM: peak
//!   RSS 14849–15037 → 14515–14518 MiB (0.80× the reference instead of 0.82×), but 5–18 %
//!   slower (six alternated pairs), since on this project's virtual machines a page the
//!   process gave back costs a host-side fault to get again (perf: `clear_page` samples of
//!   two steps 1.8 K → 6.3 K). Hence opt-in: where memory is the limit. Giving every
//!   block of 32 MiB or more a fresh mapping (a 32 MiB `M_MMAP_THRESHOLD`) cost 17 %.
//!
//! Nothing here changes a result: only where freed memory goes. It is the `zaya` binary's
//! choice; a program that links the `zaya` library gets glibc's defaults unless it makes the
//! same two `mallopt` calls and starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

use std::alloc::{GlobalAlloc, Layout, System};

/// Applies the settings above. Call before any other thread starts; may not return (the
/// re-execution), in which case the new image starts `main` again with the tunable set.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        reexec_with_huge_pages();
        mapping::ADVISE_HUGE_PAGES
            .store(heap_has_huge_pages(), std::sync::atomic::Ordering::Relaxed);
        let map_zeroed = std::env::var_os("ZAYA_MAP_ZEROED").is_some_and(|v| v == "1");
        mapping::ENABLED.store(map_zeroed, std::sync::atomic::Ordering::Relaxed);
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
        "glibc heap never trimmed, blocks up to 256 MiB{}; huge pages requested: {}; kernel THP mode {thp}",
        if mapping::ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
            ", zeroed blocks from 32 MiB in mappings of their own"
        } else {
            ""
        },
        if huge { "yes" } else { "no" }
    )
}

/// The process's allocator: glibc's (`System`), except that with `ZAYA_MAP_ZEROED=1` zeroed
/// blocks of at least [`OWN_MAPPING_MIN`] bytes get an anonymous mapping of their own
/// (module docs). Where a mapping cannot be made (or every registry slot is taken) the
/// block comes from glibc.
pub struct Allocator;

/// Zeroed blocks from this size get their own mapping.
pub const OWN_MAPPING_MIN: usize = 32 << 20;

// SAFETY: every block is either glibc's, passed through unchanged, or one of `mapping`'s,
// which are told apart by the registry of mapped addresses (only blocks of at least
// `OWN_MAPPING_MIN` bytes are looked up: smaller ones are never mapped).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= OWN_MAPPING_MIN {
            if let Some(p) = mapping::map_zeroed(layout) {
                return p;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= OWN_MAPPING_MIN && mapping::unmap(ptr, layout.size()) {
            return;
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() >= OWN_MAPPING_MIN && mapping::is_mapped(ptr) {
            // A mapped block moves to glibc (its new contents are data, not zeros).
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let moved = System.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                mapping::unmap(ptr, layout.size());
            }
            return moved;
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// The mappings behind [`Allocator`]'s large zeroed blocks.
mod mapping {
    use std::alloc::Layout;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Whether large zeroed blocks are mapped at all (`ZAYA_MAP_ZEROED=1`, read in
    /// [`super::configure`]); off, every block is glibc's.
    pub static ENABLED: AtomicBool = AtomicBool::new(false);

    /// Whether mappings ask for transparent huge pages (`MADV_HUGEPAGE`): set with the
    /// heap's choice in [`super::configure`].
    pub static ADVISE_HUGE_PAGES: AtomicBool = AtomicBool::new(false);

    const HUGE_PAGE: usize = 2 << 20;

    /// The start addresses of the live mappings (0: a free slot). 4096 blocks of at least
    /// 32 MiB are 128 GiB, more than any machine this runs on holds at once.
    static MAPPED: [AtomicUsize; 4096] = [const { AtomicUsize::new(0) }; 4096];

    fn mapped_len(size: usize) -> usize {
        size.div_ceil(HUGE_PAGE) * HUGE_PAGE
    }

    /// A zeroed, `HUGE_PAGE`-aligned block of `layout.size()` bytes, registered; `None` where
    /// the kernel refuses or the registry is full.
    #[cfg(target_os = "linux")]
    pub fn map_zeroed(layout: Layout) -> Option<*mut u8> {
        if !ENABLED.load(Ordering::Relaxed) || layout.align() > HUGE_PAGE {
            return None;
        }
        let len = mapped_len(layout.size());
        // SAFETY: a fresh private anonymous mapping; the parts cut off below are within it.
        unsafe {
            let raw = libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if raw == libc::MAP_FAILED {
                return None;
            }
            let raw = raw as usize;
            let start = raw.next_multiple_of(HUGE_PAGE);
            if start > raw {
                libc::munmap(raw as *mut libc::c_void, start - raw);
            }
            let tail = raw + len + HUGE_PAGE - (start + len);
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
            if ADVISE_HUGE_PAGES.load(Ordering::Relaxed) {
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
            for slot in &MAPPED {
                if slot
                    .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(start as *mut u8);
                }
            }
            libc::munmap(start as *mut libc::c_void, len);
            None
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn map_zeroed(_layout: Layout) -> Option<*mut u8> {
        None
    }

    pub fn is_mapped(ptr: *mut u8) -> bool {
        let addr = ptr as usize;
        MAPPED.iter().any(|s| s.load(Ordering::Acquire) == addr)
    }

    /// Unmaps `ptr` if it is one of the registered blocks (of `size` bytes); false otherwise.
    pub fn unmap(ptr: *mut u8, size: usize) -> bool {
        let addr = ptr as usize;
        for slot in &MAPPED {
            if slot
                .compare_exchange(addr, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                #[cfg(target_os = "linux")]
                // SAFETY: the block was mapped by `map_zeroed` with this length and its
                // owner has given it back.
                unsafe {
                    libc::munmap(ptr as *mut libc::c_void, mapped_len(size));
                }
                return true;
            }
        }
        false
    }
}

/// Whether this process runs with glibc's huge-page tunable (after the re-execution).
fn heap_has_huge_pages() -> bool {
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
    use super::{mapping, tunables_with_huge_pages, Allocator, OWN_MAPPING_MIN};
    use std::alloc::{GlobalAlloc, Layout};

    /// Large zeroed blocks come from their own huge-page-aligned mapping, zeroed, writable,
    /// and go back on `dealloc` or move to glibc on `realloc` (contents kept); everything
    /// else is glibc's.
    #[test]
    fn large_zeroed_blocks_get_their_own_mapping_and_give_it_back() {
        let a = Allocator;
        mapping::ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
        let big = Layout::from_size_align(OWN_MAPPING_MIN + 12_345, 4).unwrap();
        unsafe {
            let p = a.alloc_zeroed(big);
            assert!(!p.is_null());
            assert_eq!(p as usize % (2 << 20), 0, "huge-page aligned");
            assert!(mapping::is_mapped(p));
            let s = std::slice::from_raw_parts_mut(p, big.size());
            assert!(s.iter().step_by(4093).all(|&b| b == 0) && s[big.size() - 1] == 0);
            s[0] = 7;
            s[big.size() - 1] = 9;
            a.dealloc(p, big);
            assert!(!mapping::is_mapped(p));

            // realloc: the contents move to a glibc block, the mapping goes
            let p = a.alloc_zeroed(big);
            *p.add(100) = 42;
            let q = a.realloc(p, big, big.size() + 1);
            assert!(!q.is_null() && !mapping::is_mapped(q));
            assert_eq!(*q.add(100), 42);
            assert_eq!(*q.add(big.size() - 1), 0);
            assert!(!mapping::is_mapped(p));
            a.dealloc(q, Layout::from_size_align(big.size() + 1, 4).unwrap());

            // uninitialised large blocks and small zeroed ones stay glibc's
            let p = a.alloc(big);
            assert!(!mapping::is_mapped(p));
            a.dealloc(p, big);
            let small = Layout::from_size_align(OWN_MAPPING_MIN - 1, 4).unwrap();
            let p = a.alloc_zeroed(small);
            assert!(!mapping::is_mapped(p) && *p.add(small.size() - 1) == 0);
            a.dealloc(p, small);
        }
    }

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
