//! One thread policy for every command: how many compute threads, augmentation workers and
//! preprocessing processes, each from its flag, else segk's variable, else the variable an
//! nnU-Net user already sets, else segk's own choice within the CPUs this process may use; and,
//! while training, the split between compute and augmentation adapted from what each epoch
//! measured. Every count carries where it came from, so the user sees why.

use anyhow::{bail, Context, Result};

/// The CPUs this process may use: online, in its affinity mask, and under its cgroup quota.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cpus {
    pub online: usize,
    /// CPUs in the affinity mask (`taskset`, a batch system's binding).
    pub affinity: usize,
    /// The cgroup CPU quota in CPUs (`docker --cpus`, a Kubernetes limit), when set.
    pub quota: Option<f64>,
}

impl Cpus {
    pub fn detect() -> Cpus {
        let online = crate::sysinfo::online_cpus();
        Cpus { online, affinity: affinity_cpus().unwrap_or(online), quota: crate::sysinfo::cgroup_cpu_quota() }
    }

    /// What may run at once: the affinity mask, capped by the quota (rounded down, at least 1).
    pub fn usable(&self) -> usize {
        let by_quota = self.quota.map_or(usize::MAX, |q| (q.floor() as usize).max(1));
        self.affinity.min(by_quota).max(1)
    }

    /// "16 usable CPUs (affinity mask 16 of 64, cgroup quota 16.0)".
    pub fn describe(&self) -> String {
        let mut limits = Vec::new();
        if self.affinity < self.online {
            limits.push(format!("affinity mask {} of {}", self.affinity, self.online));
        }
        if let Some(q) = self.quota {
            limits.push(format!("cgroup quota {q:.1}"));
        }
        let n = crate::sysinfo::count(self.usable(), "usable CPU");
        if limits.is_empty() {
            n
        } else {
            format!("{n} ({})", limits.join(", "))
        }
    }
}

/// CPUs in this process's affinity mask.
fn affinity_cpus() -> Option<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then(|| libc::CPU_COUNT(&set) as usize).filter(|&n| n > 0)
    }
}

/// A count and where it came from; `set` when the user chose it (never overridden then).
#[derive(Clone, Debug, PartialEq)]
pub struct Count {
    pub n: usize,
    pub from: String,
    pub set: bool,
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (from {})", self.n, self.from)
    }
}

/// Reads an environment variable; tests pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The flag, else the first of `vars` that is set, else `choice`. OMP_NUM_THREADS may list one
/// count per nesting level ("8,2"): the first is the outer level, the one segk has.
pub fn count_from(flag: Option<usize>, flag_name: &str, vars: &[&str], env: Env, choice: (usize, String)) -> Result<Count> {
    if let Some(n) = flag {
        anyhow::ensure!(n > 0, "{flag_name} must be at least 1");
        return Ok(Count { n, from: flag_name.into(), set: true });
    }
    for var in vars {
        if let Some(v) = env(var) {
            let first = v.split(',').next().unwrap_or("").trim();
            let n: usize = first.parse().ok().filter(|&n| n > 0).with_context(|| format!("{var}={v:?} is not a positive number"))?;
            return Ok(Count { n, from: (*var).into(), set: true });
        }
    }
    Ok(Count { n: choice.0.max(1), from: choice.1, set: false })
}

/// What runs the training step: the CPU backend's threads, or a GPU (the CPUs then only feed it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepOn {
    Cpu,
    Gpu,
}

/// Threads of the CPU backend's compute pool (and of host-side work beside a GPU):
/// --threads, SEGK_THREADS, OMP_NUM_THREADS, else every usable CPU.
pub fn compute(flag: Option<usize>, cpus: &Cpus, env: Env) -> Result<Count> {
    count_from(flag, "--threads", &["SEGK_THREADS", "OMP_NUM_THREADS"], env, (cpus.usable(), cpus.describe()))
}

/// Augmentation workers to start with: --workers, SEGK_WORKERS, nnUNet_n_proc_DA, else segk's
/// choice, which training then adapts. On the CPU one worker shares the compute cores (a CPU
/// step is long against the augmentation of its batch) and more are added only if the step
/// waits; beside a GPU, every CPU but the trainer's, trimmed after the first epoch to what the
/// measured step needs.
pub fn workers(flag: Option<usize>, cpus: &Cpus, on: StepOn, env: Env) -> Result<Count> {
    let choice = match on {
        StepOn::Cpu => (1, "segk's choice on the CPU backend: one beside the compute threads, adapted each epoch".to_string()),
        StepOn::Gpu => {
            let n = cpus.usable().saturating_sub(1).max(1);
            (n, format!("segk's choice beside a GPU: {n} of {}, trimmed after the first epoch to what the step needs", cpus.describe()))
        }
    };
    count_from(flag, "--workers", &["SEGK_WORKERS", "nnUNet_n_proc_DA"], env, choice)
}

/// Cases preprocessed at once: --processes, SEGK_PROCESSES, nnUNet_def_n_proc, else every
/// usable CPU (each case runs on one thread).
pub fn processes(flag: Option<usize>, cpus: &Cpus, env: Env) -> Result<Count> {
    count_from(flag, "--processes", &["SEGK_PROCESSES", "nnUNet_def_n_proc"], env, (cpus.usable(), cpus.describe()))
}

/// Caps a count so that `n` units of `per_unit` bytes, beside `base`, fit in `available`
/// bytes; returns the line saying so. A count the user set is refused instead of lowered.
pub fn cap_by_memory(c: &mut Count, per_unit: u64, base: u64, available: Option<u64>, what: &str, flag: &str) -> Result<Option<String>> {
    use crate::sysinfo::bytes_text;
    let Some(avail) = available else { return Ok(None) };
    let need = |n: usize| base + n as u64 * per_unit;
    if need(c.n) <= avail {
        return Ok(None);
    }
    let fits = (avail.saturating_sub(base) / per_unit.max(1)) as usize;
    if c.set || fits == 0 {
        bail!(
            "{} {what} (from {}) need {} of host memory ({} each{}) but {} is available: use {flag} {} or fewer",
            c.n,
            c.from,
            bytes_text(need(c.n)),
            bytes_text(per_unit),
            if base > 0 { format!(", and {} shared", bytes_text(base)) } else { String::new() },
            bytes_text(avail),
            fits.max(1)
        );
    }
    let line = format!("memory: {} {what} would need {}, {} is available: {fits} instead ({} each)", c.n, bytes_text(need(c.n)), bytes_text(avail), bytes_text(per_unit));
    c.n = fits;
    c.from = format!("{}, capped by host memory", c.from);
    Ok(Some(line))
}

/// What one training epoch measured, for [`Split::adapt`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EpochLoad {
    /// Wall seconds of the epoch's training iterations.
    pub wall: f64,
    /// Seconds the trainer waited for batches.
    pub wait: f64,
    /// Seconds the workers spent filling batches, summed over workers.
    pub busy: f64,
}

/// Share of the wall time the trainer may wait for data before a worker is added.
pub const WAIT_LIMIT: f64 = 0.02;
/// Workers are removed only while the rest would stay at most this busy.
pub const BUSY_TARGET: f64 = 0.75;

/// The split of the CPUs between compute threads and augmentation workers while training,
/// adapted after each epoch until the trainer neither waits for data nor leaves workers idle.
/// On the CPU backend the first worker shares the compute cores and each further worker takes
/// one from compute (`compute + workers <= usable + 1`); beside a GPU only the workers change.
/// A count the user set never changes. Once a worker count has starved the step, the split
/// never goes back below it, so it cannot oscillate.
#[derive(Clone, Debug)]
pub struct Split {
    pub compute: Count,
    pub workers: Count,
    on: StepOn,
    usable: usize,
    /// Most workers the host memory allows.
    max_workers: usize,
    /// Fewest workers known not to starve the step.
    min_workers: usize,
}

impl Split {
    pub fn new(compute: Count, workers: Count, on: StepOn, cpus: &Cpus, max_workers: usize) -> Split {
        let usable = cpus.usable();
        let mut s = Split { compute, workers, on, usable, max_workers: max_workers.max(1), min_workers: 1 };
        if s.on == StepOn::Cpu && !s.compute.set && s.compute.n + s.workers.n > usable + 1 {
            s.compute.n = (usable + 1).saturating_sub(s.workers.n).max(1);
            s.compute.from = format!("{} less the workers' cores", s.compute.from);
        }
        s
    }

    /// The change this epoch's load calls for, applied, with its reason; None when none.
    pub fn adapt(&mut self, load: &EpochLoad) -> Option<String> {
        if self.workers.set || load.wall <= 0.0 {
            return None;
        }
        let wait = load.wait / load.wall;
        let w = self.workers.n;
        let want = if wait > WAIT_LIMIT {
            // Workers in proportion to the missing time, at least one more.
            let more = ((w as f64 / (1.0 - wait.min(0.9))).ceil() as usize).max(w + 1);
            let want = more.min(self.max_workers).min(self.cap());
            self.min_workers = self.min_workers.max(want);
            want
        } else {
            // As few as keep each at most BUSY_TARGET busy, never below what once starved the step.
            let enough = ((load.busy / load.wall / BUSY_TARGET).ceil() as usize).max(self.min_workers).max(1);
            enough.min(w)
        };
        if want == w {
            return None;
        }
        let why = if want > w {
            format!("the step waited for data {:.1} % of the epoch", wait * 100.0)
        } else {
            format!("the workers were busy {:.0} % of the epoch: {want} keep up", 100.0 * load.busy / load.wall / w as f64)
        };
        self.workers.n = want;
        self.workers.from = "adapted by segk".into();
        let mut line = format!("threads: {} (was {w}): {why}", crate::sysinfo::count(want, "augmentation worker"));
        if self.on == StepOn::Cpu && !self.compute.set {
            let c = (self.usable + 1).saturating_sub(want).clamp(1, self.usable);
            if c != self.compute.n {
                line += &format!("; {} compute threads (was {})", c, self.compute.n);
                self.compute.n = c;
                self.compute.from = "adapted by segk".into();
            }
        }
        Some(line)
    }

    /// Most workers worth having: on the CPU, all but one core left to compute.
    fn cap(&self) -> usize {
        match self.on {
            StepOn::Cpu if !self.compute.set => self.usable.max(1),
            _ => self.usable.saturating_sub(1).max(1),
        }
    }
}

/// `segk doctor`'s lines: each count segk would use, and where it comes from.
pub fn doctor_lines(cpus: &Cpus, compute: &Count, env: Env) -> Result<Vec<String>> {
    Ok(vec![
        format!("compute threads: {compute}"),
        format!("augmentation workers, training on the CPU: {}", workers(None, cpus, StepOn::Cpu, env)?),
        format!("augmentation workers, training on a GPU: {}", workers(None, cpus, StepOn::Gpu, env)?),
        format!("preprocessing processes: {}", processes(None, cpus, env)?),
    ])
}

static GLOBAL: std::sync::OnceLock<Count> = std::sync::OnceLock::new();

/// Sizes rayon's global pool, every command's compute, from the policy; once, at start-up.
pub fn init_global(flag: Option<usize>) -> Result<Count> {
    let c = compute(flag, &Cpus::detect(), &process_env)?;
    rayon::ThreadPoolBuilder::new().num_threads(c.n).thread_name(|i| format!("segk-compute-{i}")).build_global().context("starting the compute threads")?;
    let _ = GLOBAL.set(c.clone());
    Ok(c)
}

/// The compute threads count and its source (the policy's, if `init_global` did not run, as in
/// tests).
pub fn global() -> Count {
    match GLOBAL.get() {
        Some(c) => c.clone(),
        None => Count { n: rayon::current_num_threads(), from: "rayon's global pool".into(), set: false },
    }
}

/// A pool of `n` compute threads for the CPU step, resized by building another.
pub fn compute_pool(n: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).thread_name(|i| format!("segk-step-{i}")).build().context("starting the compute threads")
}

/// Runs `f` on `pool`, this thread waiting for it, or here when there is none.
pub fn on_pool<R>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R) -> R {
    /// `install` wants Send: what a CPU step borrows (Cell-holding activations) is not Sync.
    struct Handed<T>(T);
    // SAFETY: `install` blocks this thread until `f` has returned on the pool, so what `f`
    // borrows is used by one thread at a time; it is only given the CPU backend's step, whose
    // state is plain memory with no tie to a thread.
    unsafe impl<T> Send for Handed<T> {}
    impl<T> Handed<T> {
        fn take(self) -> T {
            self.0
        }
    }
    match pool {
        None => f(),
        Some(p) => {
            let f = Handed(f);
            p.install(move || Handed(f.take()())).take()
        }
    }
}
