//! Fuzzing of every parser of outside input, on stable Rust.
//!
//! A [`Target`] wraps one parser (config.json, a safetensors file, a shard index, the
//! tokenizer files, a chat template with its context, training data, a GGUF file). Its input is a list
//! of parts (the files it reads). The driver ([`run`]) starts from the target's valid seeds
//! (the shipped configs, the fixtures' weights, the tokenizer files, templates, JSONL) and
//! mutates them with a seeded generator: byte-level edits and, for parts that are JSON,
//! edits of the parsed document (numbers at their limits, wrong types, removed and copied
//! keys), so inputs stay valid enough to reach the code behind the first parse. Every input
//! must end in `Ok` or a typed error; a panic is a crash, recorded with its input.
//!
//! Adding a parser (as the server's request bodies do): implement [`Target`] next to it and
//! call [`run`] from a test (see `tests/fuzz.rs`); [`targets::all`] is the registry of
//! this crate's targets.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

pub mod mutate;
pub mod targets;

pub use mutate::Mutator;

/// An error a parser returned (typed in the parser's crate; boxed here so one driver
/// serves every crate).
pub type ParseError = Box<dyn std::error::Error + Send + Sync>;

/// One input: the files (or request parts) a parser reads.
pub type Input = Vec<Vec<u8>>;

/// A parser of outside input under test.
pub trait Target: Sync {
    /// Short name (used for regression directories and test names).
    fn name(&self) -> &'static str;
    /// Valid inputs to start from.
    fn seeds(&self) -> Vec<Input>;
    /// Parses one input; `Ok` or a typed error are both fine, a panic is a crash.
    fn run(&self, input: &Input) -> Result<(), ParseError>;
    /// Mutates `input` (default: [`Mutator::mutate_input`]); a target may add its own
    /// structure-aware edits.
    fn mutate(&self, input: &mut Input, m: &mut Mutator) {
        m.mutate_input(input);
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub target: String,
    pub inputs: u64,
    /// Inputs the parser accepted.
    pub accepted: u64,
    /// Inputs rejected with a typed error.
    pub rejected: u64,
    /// Inputs that panicked: the panic message and the file the input was saved to.
    pub crashes: Vec<(String, PathBuf)>,
    pub seconds: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} inputs in {:.1} s ({} accepted, {} typed errors, {} panics)",
            self.target,
            self.inputs,
            self.seconds,
            self.accepted,
            self.rejected,
            self.crashes.len()
        )
    }
}

/// Where crashing inputs are written (`ZAYA_FUZZ_CRASHES`, default
/// `target/fuzz-crashes`); copy one into `regressions/<target>/` to keep it as a test.
pub fn crash_dir() -> PathBuf {
    std::env::var_os("ZAYA_FUZZ_CRASHES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes")
        })
}

/// Serialises an input: part count, then each part as length + bytes (u32 little endian).
pub fn encode_input(input: &Input) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(input.len() as u32).to_le_bytes());
    for part in input {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Reads an input written by [`encode_input`].
pub fn decode_input(bytes: &[u8]) -> Option<Input> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Some(a)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut parts = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        parts.push(take(len)?.to_vec());
    }
    Some(parts)
}

/// Runs `target` on its seeds and then on `inputs` mutated inputs drawn with `seed`.
/// Panics are caught (their default message silenced while the run lasts) and recorded.
pub fn run(target: &dyn Target, inputs: u64, seed: u64) -> Report {
    run_saving_to(target, inputs, seed, &crash_dir())
}

/// The test every fuzz test runs: [`run`] with `ZAYA_FUZZ_INPUTS` / `ZAYA_FUZZ_SEED` (or the
/// given defaults), the counts printed, and a failure when an input panicked, or when no
/// mutant was accepted or none rejected (a target whose mutants all die at the first parse,
/// or all pass, tests nothing behind it).
pub fn check(target: &dyn Target, default_inputs: u64, default_seed: u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let inputs = env("ZAYA_FUZZ_INPUTS").unwrap_or(default_inputs);
    let seed = env("ZAYA_FUZZ_SEED").unwrap_or(default_seed);
    let report = run(target, inputs, seed);
    eprintln!("fuzz {report} (seed {seed})");
    assert!(report.inputs > inputs, "every input ran");
    assert!(
        report.crashes.is_empty(),
        "{}: {} panics, e.g. {:?}",
        target.name(),
        report.crashes.len(),
        &report.crashes[..report.crashes.len().min(3)]
    );
    assert!(
        report.accepted > 0,
        "{}: no mutant was accepted",
        target.name()
    );
    assert!(
        report.rejected > 0,
        "{}: no mutant was rejected",
        target.name()
    );
}

/// [`run`], writing crashing inputs under `crashes` instead of [`crash_dir`].
pub fn run_saving_to(target: &dyn Target, inputs: u64, seed: u64, crashes: &Path) -> Report {
    let start = std::time::Instant::now();
    let seeds = target.seeds();
    assert!(!seeds.is_empty(), "{}: no seeds", target.name());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mutator = Mutator::new(seed ^ 0x9e37_79b9_7f4a_7c15, seeds.clone());
    let mut report = Report {
        target: target.name().to_string(),
        ..Default::default()
    };
    // Each seed once as it is (they must parse), then mutants of random seeds.
    let mut queue: Vec<Input> = seeds.clone();
    let mut n = 0u64;
    while n < inputs + seeds.len() as u64 {
        let input = match queue.pop() {
            Some(i) => i,
            None => {
                let mut input = seeds[rng.random_range(0..seeds.len())].clone();
                let rounds = 1 + rng.random_range(0..4);
                for _ in 0..rounds {
                    target.mutate(&mut input, &mut mutator);
                }
                input
            }
        };
        n += 1;
        let quiet = QuietPanics::install();
        let outcome = catch_unwind(AssertUnwindSafe(|| target.run(&input)));
        drop(quiet);
        match outcome {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(_)) => report.rejected += 1,
            Err(panic) => {
                let msg = panic_message(&panic);
                let path = save_crash(crashes, target.name(), &input);
                report.crashes.push((msg, path));
            }
        }
    }
    report.inputs = n;
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Replays the saved inputs in `dir` (files written by [`encode_input`]); returns, per
/// file that panicked, its name and the panic message.
pub fn replay_dir(target: &dyn Target, dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let _quiet = QuietPanics::install();
    let mut failures = Vec::new();
    for entry in entries.flatten() {
        let bytes = std::fs::read(entry.path()).expect("readable regression file");
        let input = decode_input(&bytes).expect("regression file in encode_input format");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target.run(&input))) {
            failures.push((
                entry.file_name().to_string_lossy().into_owned(),
                panic_message(&panic),
            ));
        }
    }
    failures
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".into()
    };
    let at = LOCATION.with(|l| std::mem::take(&mut *l.borrow_mut()));
    if at.is_empty() {
        msg
    } else {
        format!("{msg} at {at}")
    }
}

fn save_crash(crashes: &Path, target: &str, input: &Input) -> PathBuf {
    let bytes = encode_input(input);
    let dir = crashes.join(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("crash-{:016x}.bin", fnv1a(&bytes)));
    let _ = std::fs::write(&path, &bytes);
    path
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Silences the default panic message on this thread (a fuzz run would print thousands)
/// while alive; panics of other threads (other tests) are printed as usual.
struct QuietPanics {
    was: bool,
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the last silenced panic happened (reported with the crash).
    static LOCATION: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl QuietPanics {
    fn install() -> Self {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if QUIET.with(std::cell::Cell::get) {
                    let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                    LOCATION.with(|l| *l.borrow_mut() = at);
                } else {
                    default(info);
                }
            }));
        });
        QuietPanics {
            was: QUIET.with(|q| q.replace(true)),
        }
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        QUIET.with(|q| q.set(self.was));
    }
}

/// A scratch directory per thread under /dev/shm (or the temp dir), for parsers that read
/// files; removed and recreated for each input by [`Scratch::reset`].
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = base.join(format!(
            "zaya-fuzz-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Empties the directory and writes `files` (name, bytes) into it.
    pub fn reset(&self, files: &[(&str, &[u8])]) {
        for entry in std::fs::read_dir(&self.dir)
            .expect("scratch readable")
            .flatten()
        {
            let p = entry.path();
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
        for (name, bytes) in files {
            std::fs::write(self.dir.join(name), bytes).expect("scratch writable");
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The repository root (seeds are the repository's own files).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Reads a seed file of the repository.
pub fn repo_file(rel: &str) -> Vec<u8> {
    let p = repo_root().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("seed {}: {e}", p.display()))
}

/// Parses JSON or returns None (helpers for targets).
pub fn json_of(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes).ok()
}
