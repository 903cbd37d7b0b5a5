//! A team of spinning helper threads for the short products of a decode step.
//!
//! A decode step is a few hundred products of tens of microseconds each, separated by
//! element-wise work on one thread. Split over rayon, each product woke a pool thread that
//! had gone to sleep in the gap (rayon sleeps after a few dozen idle rounds, and that is not
//! configurable), and the caller then slept itself while the last part finished: on the
//! q4_k 8B, a tenth of the caller's samples were futex wake-ups and the helper sat idle a
//! third of the step. The team's helpers instead spin (yielding, so a runnable thread gets
//! the core) for [`SPIN`] after their last task before they park, and the caller waits for
//! the last task by spinning too.
//!
//! One caller leads the team at a time; [`try_run`] answers `false` when the team is busy
//! or absent (one configured thread), and the caller splits its work another way. Which
//! thread computes a task never changes the task's result.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a helper keeps looking for work after its last task before it parks: longer
/// than the element-wise gaps between a decode step's products (and the sampling between
/// steps), short enough that a helper is not left competing for a core long after the
/// decode loop has stopped.
const SPIN: Duration = Duration::from_millis(2);

/// Spin-loop hints between reads of the shared state before a helper or the leader yields
/// its core to the scheduler once.
const PAUSES_PER_YIELD: u32 = 64;

/// Most tasks one call may hand out (they are counted in 16 bits of the state word).
pub(crate) const MAX_TASKS: usize = u16::MAX as usize;

/// One call's work, on the leader's stack for the duration of [`try_run`].
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    /// Tasks completed (by any thread), counted after the task returns or unwinds.
    finished: AtomicUsize,
    /// The first panic of a task, re-raised on the leader once every task has finished.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Runs task `index` and counts it. Takes a raw pointer, not `&self`: once the count
    /// is in, the leader may return and free the job while this frame is still live, which
    /// a reference argument would not allow.
    ///
    /// # Safety
    /// `this` points to a live job whose task `index` this thread has claimed.
    unsafe fn run(this: *const Self, index: usize) {
        {
            // SAFETY: the job lives until this task is counted, below.
            let job = unsafe { &*this };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (job.task)(index))) {
                let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(payload);
            }
        }
        // After this the job may be gone: the leader returns once every task has counted.
        // SAFETY: not counted yet, so the job is still live.
        unsafe { (*this).finished.fetch_add(1, Ordering::Release) };
    }
}

/// The state word: the call's epoch (32 bits), its task count (16) and the next task to
/// claim (16). One word, so a helper that claims a task also proves the call it read the
/// job pointer for is still the current one (unless exactly 2³² calls went by between a
/// helper's two reads of the word, which the epoch's width makes no concern).
#[derive(Clone, Copy)]
struct State(u64);

impl State {
    fn new(epoch: u32, tasks: usize, next: usize) -> Self {
        State((epoch as u64) << 32 | (tasks as u64) << 16 | next as u64)
    }
    fn epoch(self) -> u32 {
        (self.0 >> 32) as u32
    }
    fn tasks(self) -> usize {
        (self.0 >> 16) as usize & 0xffff
    }
    fn next(self) -> usize {
        self.0 as usize & 0xffff
    }
}

struct Helper {
    thread: Thread,
    /// Set by the helper before it parks; the leader clears it and unparks the thread.
    parked: AtomicBool,
}

struct Team {
    state: AtomicU64,
    /// The current call's job (type-erased: `Job<'a>` of the leader's borrow).
    job: AtomicPtr<Job<'static>>,
    /// Held by the leading caller.
    leading: AtomicBool,
    helpers: Vec<Helper>,
}

impl Team {
    /// Claims and runs tasks of the call in `epoch` until none is left. The job pointer is
    /// read before the claim and used only when the claim succeeds: a successful claim of
    /// a task below the call's count means that call has not finished, so its leader is
    /// still waiting and the job it published is alive.
    fn work(&self, epoch: u32) {
        loop {
            let s = State(self.state.load(Ordering::Acquire));
            if s.epoch() != epoch || s.next() >= s.tasks() {
                return;
            }
            let job = self.job.load(Ordering::Acquire);
            let claimed = State::new(epoch, s.tasks(), s.next() + 1);
            if self
                .state
                .compare_exchange_weak(s.0, claimed.0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // SAFETY: the claim proves the job is live (see above), and this thread
                // now holds task `s.next()`.
                unsafe { Job::run(job, s.next()) };
            }
        }
    }

    /// A helper's life: wait for a new call (spinning, then parked), help with it, repeat.
    fn help(&self, me: usize) {
        let mut seen = State(self.state.load(Ordering::Acquire)).epoch();
        loop {
            let mut idle_since = Instant::now();
            let mut pauses = 0u32;
            let epoch = loop {
                let s = State(self.state.load(Ordering::Acquire));
                if s.epoch() != seen {
                    break s.epoch();
                }
                pauses += 1;
                if pauses < PAUSES_PER_YIELD {
                    std::hint::spin_loop();
                    continue;
                }
                pauses = 0;
                if idle_since.elapsed() < SPIN {
                    thread::yield_now();
                    continue;
                }
                let helper = &self.helpers[me];
                helper.parked.store(true, Ordering::SeqCst);
                // A call published between the last read and `parked` must not be slept
                // through: either this read sees it, or its leader sees `parked` and unparks.
                if State(self.state.load(Ordering::SeqCst)).epoch() == seen {
                    while helper.parked.load(Ordering::SeqCst) {
                        thread::park();
                    }
                } else {
                    helper.parked.store(false, Ordering::SeqCst);
                }
                idle_since = Instant::now();
            };
            seen = epoch;
            self.work(epoch);
        }
    }
}

fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let helpers = super::cpu::num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        // The helpers need the team and the team their handles: start them parked on a
        // barrier-like slot, then publish.
        let slot: &'static OnceLock<&'static Team> = Box::leak(Box::new(OnceLock::new()));
        let mut handles = Vec::with_capacity(helpers);
        for i in 0..helpers {
            let spawned = thread::Builder::new()
                .name(format!("zaya-team-{i}"))
                .spawn(move || {
                    let team = slot.wait();
                    team.help(i);
                });
            match spawned {
                Ok(h) => handles.push(Helper {
                    thread: h.thread().clone(),
                    parked: AtomicBool::new(false),
                }),
                // Without every helper the team is not worth its spinning: the callers
                // split their work on the kernels' pool as before. (Started helpers stay
                // blocked on the slot, which is never filled.)
                Err(_) => return None,
            }
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            leading: AtomicBool::new(false),
            helpers: handles,
        }));
        let _ = slot.set(team);
        Some(team)
    })
}

/// Runs `task(i)` for every `i < tasks` on the calling thread and the team's helpers, and
/// returns `true` once all have finished (re-raising the first task's panic, after every
/// task has finished). Returns `false` without running anything when there is no team (one
/// thread), when another caller leads it, or for more than [`MAX_TASKS`] tasks.
pub(crate) fn try_run(tasks: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    let Some(team) = team() else {
        return false;
    };
    if tasks > MAX_TASKS
        || team
            .leading
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        return false;
    }
    let job = Job {
        task,
        finished: AtomicUsize::new(0),
        panic: Mutex::new(None),
    };
    // SAFETY (of the lifetime erasure): the pointer is dereferenced only by claims of this
    // call's tasks, and this function returns only after all of them have finished.
    let erased = &job as *const Job<'_> as *mut Job<'static>;
    team.job.store(erased, Ordering::Release);
    let epoch = State(team.state.load(Ordering::Relaxed))
        .epoch()
        .wrapping_add(1);
    team.state
        .store(State::new(epoch, tasks, 0).0, Ordering::SeqCst);
    for helper in &team.helpers {
        if helper.parked.swap(false, Ordering::SeqCst) {
            helper.thread.unpark();
        }
    }
    team.work(epoch);
    let mut pauses = 0u32;
    while job.finished.load(Ordering::Acquire) < tasks {
        pauses += 1;
        if pauses.is_multiple_of(PAUSES_PER_YIELD) {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    team.leading.store(false, Ordering::Release);
    if let Some(payload) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(payload);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Every task runs exactly once per call, over many calls (helpers spinning between
    /// them) and after the helpers have parked.
    #[test]
    fn runs_every_task_once() {
        for round in 0..200 {
            let tasks = 1 + round % 37;
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            let ran = try_run(tasks, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            if !ran {
                // one thread configured, or another test leads the team: nothing may have run
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 0));
                continue;
            }
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            if round % 50 == 49 {
                thread::sleep(SPIN * 3); // let the helpers park
            }
        }
    }

    /// Several callers at once: each call either runs all its tasks or none (a refusal is
    /// immediate, so each caller retries until it has led the team a number of times).
    #[test]
    fn concurrent_callers() {
        if team().is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    let mut led = 0;
                    while led < 50 {
                        assert!(Instant::now() < deadline, "caller {t} led only {led} calls");
                        let sum = AtomicUsize::new(0);
                        let tasks = 8 + t;
                        if try_run(tasks, &|i| {
                            sum.fetch_add(i + 1, Ordering::Relaxed);
                        }) {
                            assert_eq!(sum.load(Ordering::Relaxed), tasks * (tasks + 1) / 2);
                            led += 1;
                        } else {
                            assert_eq!(sum.load(Ordering::Relaxed), 0);
                            thread::yield_now();
                        }
                    }
                });
            }
        });
    }

    /// A task's panic reaches the caller after every other task has run, and the team
    /// keeps working.
    #[test]
    fn panic_reaches_the_caller() {
        if team().is_none() {
            return;
        }
        let counts: Vec<AtomicU32> = (0..16).map(|_| AtomicU32::new(0)).collect();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            // retried while another test leads the team
            while !try_run(16, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
                if i == 5 {
                    panic!("task five");
                }
            }) {
                thread::yield_now();
            }
        }));
        let payload = caught.expect_err("the task's panic is re-raised");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"task five"));
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        let ok = AtomicU32::new(0);
        while !try_run(3, &|_| {
            ok.fetch_add(1, Ordering::Relaxed);
        }) {
            thread::yield_now();
        }
        assert_eq!(ok.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn too_many_tasks_are_refused() {
        assert!(!try_run(MAX_TASKS + 1, &|_| unreachable!()));
    }
}
