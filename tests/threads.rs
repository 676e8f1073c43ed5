//! The thread policy: each count from its sources in order, CPU limits, memory caps, and the
//! split adapted while training, on a model of the pipeline and on the real pool.

use segk::loader::pool::{Batch, Fill, FillError, Pool, SlotShape};
use segk::threads::{self, Count, Cpus, EpochLoad, Split, StepOn};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| m.get(k).cloned()
}

const SIXTEEN: Cpus = Cpus { online: 16, affinity: 16, quota: None };

#[test]
fn each_count_comes_from_flag_then_segk_variable_then_nnunet_variable_then_choice() {
    let all = env_of(&[("SEGK_THREADS", "6"), ("OMP_NUM_THREADS", "3"), ("SEGK_WORKERS", "5"), ("nnUNet_n_proc_DA", "2"), ("SEGK_PROCESSES", "7"), ("nnUNet_def_n_proc", "4")]);
    let nnunet = env_of(&[("OMP_NUM_THREADS", "3"), ("nnUNet_n_proc_DA", "2"), ("nnUNet_def_n_proc", "4")]);
    let none = env_of(&[]);
    let c = |flag, env: &dyn Fn(&str) -> Option<String>| threads::compute(flag, &SIXTEEN, env).unwrap();
    assert_eq!(c(Some(9), &all), Count { n: 9, from: "--threads".into(), set: true });
    assert_eq!(c(None, &all), Count { n: 6, from: "SEGK_THREADS".into(), set: true });
    assert_eq!(c(None, &nnunet), Count { n: 3, from: "OMP_NUM_THREADS".into(), set: true });
    let chosen = c(None, &none);
    assert_eq!((chosen.n, chosen.set), (16, false));
    assert!(chosen.from.contains("16 usable CPUs"), "{}", chosen.from);

    let w = |flag, env: &dyn Fn(&str) -> Option<String>, on| threads::workers(flag, &SIXTEEN, on, env).unwrap();
    assert_eq!(w(Some(9), &all, StepOn::Gpu).from, "--workers");
    assert_eq!(w(None, &all, StepOn::Gpu).n, 5);
    assert_eq!(w(None, &nnunet, StepOn::Gpu), Count { n: 2, from: "nnUNet_n_proc_DA".into(), set: true });
    assert_eq!((w(None, &none, StepOn::Gpu).n, w(None, &none, StepOn::Gpu).set), (15, false));
    assert_eq!(w(None, &none, StepOn::Cpu).n, 1);

    let p = |flag, env: &dyn Fn(&str) -> Option<String>| threads::processes(flag, &SIXTEEN, env).unwrap();
    assert_eq!(p(Some(2), &all).n, 2);
    assert_eq!(p(None, &all).from, "SEGK_PROCESSES");
    assert_eq!(p(None, &nnunet), Count { n: 4, from: "nnUNet_def_n_proc".into(), set: true });
    assert_eq!(p(None, &none).n, 16);
}

#[test]
fn nested_omp_lists_take_the_outer_level_and_bad_values_name_the_variable() {
    let c = threads::compute(None, &SIXTEEN, &env_of(&[("OMP_NUM_THREADS", "8,2")])).unwrap();
    assert_eq!((c.n, c.from.as_str()), (8, "OMP_NUM_THREADS"));
    for bad in ["0", "many", ""] {
        let e = threads::compute(None, &SIXTEEN, &env_of(&[("OMP_NUM_THREADS", bad)])).unwrap_err().to_string();
        assert!(e.contains("OMP_NUM_THREADS") && e.contains("not a positive number"), "{e}");
    }
    assert!(threads::compute(Some(0), &SIXTEEN, &env_of(&[])).unwrap_err().to_string().contains("--threads must be at least 1"));
    let e = threads::workers(None, &SIXTEEN, StepOn::Cpu, &env_of(&[("nnUNet_n_proc_DA", "-1")])).unwrap_err().to_string();
    assert!(e.contains("nnUNet_n_proc_DA"), "{e}");
}

#[test]
fn affinity_and_cgroup_quota_bound_the_usable_cpus() {
    let pinned = Cpus { online: 64, affinity: 16, quota: None };
    assert_eq!(pinned.usable(), 16);
    assert!(pinned.describe().contains("affinity mask 16 of 64"), "{}", pinned.describe());
    let limited = Cpus { online: 64, affinity: 16, quota: Some(4.5) };
    assert_eq!(limited.usable(), 4);
    assert!(limited.describe().contains("cgroup quota 4.5"), "{}", limited.describe());
    assert_eq!(Cpus { online: 8, affinity: 8, quota: Some(0.5) }.usable(), 1);
    assert_eq!(Cpus { online: 8, affinity: 2, quota: Some(6.0) }.usable(), 2);
    // Every default follows the usable CPUs, not the machine's.
    let none = env_of(&[]);
    assert_eq!(threads::compute(None, &limited, &none).unwrap().n, 4);
    assert_eq!(threads::processes(None, &limited, &none).unwrap().n, 4);
    assert_eq!(threads::workers(None, &limited, StepOn::Gpu, &none).unwrap().n, 3);
    // And this machine's own are consistent.
    let here = Cpus::detect();
    assert!(here.usable() >= 1 && here.usable() <= here.online, "{here:?}");
}

#[test]
fn host_memory_caps_a_chosen_count_and_refuses_a_set_one() {
    let gib = 1u64 << 30;
    let mut chosen = Count { n: 16, from: "16 usable CPUs".into(), set: false };
    let line = threads::cap_by_memory(&mut chosen, 2 * gib, gib, Some(9 * gib), "preprocessing processes", "--processes").unwrap().unwrap();
    assert_eq!(chosen.n, 4);
    assert!(line.contains("16 preprocessing processes would need 33.00 GiB") && line.contains("4 instead"), "{line}");
    assert!(chosen.from.contains("capped by host memory"));
    let mut fits = Count { n: 4, from: "x".into(), set: false };
    assert!(threads::cap_by_memory(&mut fits, 2 * gib, gib, Some(9 * gib), "p", "--processes").unwrap().is_none());
    assert!(threads::cap_by_memory(&mut fits, 2 * gib, gib, None, "p", "--processes").unwrap().is_none());
    let mut set = Count { n: 16, from: "nnUNet_def_n_proc".into(), set: true };
    let e = threads::cap_by_memory(&mut set, 2 * gib, gib, Some(9 * gib), "preprocessing processes", "--processes").unwrap_err().to_string();
    assert!(e.contains("16 preprocessing processes (from nnUNet_def_n_proc)") && e.contains("--processes 4 or fewer"), "{e}");
    assert_eq!(set.n, 16);
    // Not even one fits: refused, never zero.
    let mut one = Count { n: 2, from: "x".into(), set: false };
    assert!(threads::cap_by_memory(&mut one, 8 * gib, gib, Some(4 * gib), "workers", "--workers").is_err());
}

/// The pipeline in numbers: each batch costs `fill` worker-seconds, the step `step` seconds
/// (divided among compute threads on the CPU). Workers fill ahead, so an iteration takes the
/// longer of the step and a batch's share of the workers' time.
fn epoch_model(fill: f64, step_cpu: f64, split: &Split, on: StepOn, iters: f64) -> EpochLoad {
    let step = match on {
        StepOn::Cpu => step_cpu / split.compute.n as f64,
        StepOn::Gpu => step_cpu,
    };
    let per_batch = fill / split.workers.n as f64;
    let iter = step.max(per_batch);
    EpochLoad { wall: iters * iter, wait: iters * (iter - step), busy: iters * fill }
}

fn converge(fill: f64, step: f64, start: Count, on: StepOn, cpus: &Cpus) -> (Split, Vec<String>) {
    let compute = Count { n: cpus.usable(), from: "cpus".into(), set: false };
    let mut s = Split::new(compute, start, on, cpus, 64);
    let mut changes = Vec::new();
    for epoch in 0..30 {
        let load = epoch_model(fill, step, &s, on, 250.0);
        if let Some(line) = s.adapt(&load) {
            changes.push(format!("epoch {epoch}: {line}"));
        }
    }
    (s, changes)
}

#[test]
fn the_split_converges_on_a_gpu_whether_the_loader_is_slow_or_fast() {
    let cpus = SIXTEEN;
    // A slow loader: 0.5 worker-seconds a batch against a 0.1 s step needs 5 workers busy.
    let (s, changes) = converge(0.5, 0.1, Count { n: 1, from: "x".into(), set: false }, StepOn::Gpu, &cpus);
    assert!(s.workers.n >= 5 && s.workers.n <= 8, "{} workers: {changes:?}", s.workers.n);
    assert!(changes.len() <= 3, "{changes:?}");
    assert!(changes.iter().all(|c| c.contains("waited for data")), "{changes:?}");
    // A fast one, starting from segk's GPU choice: trimmed once to what the step needs.
    let start = threads::workers(None, &cpus, StepOn::Gpu, &env_of(&[])).unwrap();
    let (s, changes) = converge(0.15, 0.1, start, StepOn::Gpu, &cpus);
    assert_eq!(s.workers.n, 2, "{changes:?}");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].contains("(was 15)") && changes[0].contains("busy"), "{changes:?}");
    assert_eq!(s.compute.n, 16, "beside a GPU only the workers change");
}

#[test]
fn on_the_cpu_a_worker_beyond_the_first_takes_a_compute_core() {
    let cpus = SIXTEEN;
    let start = threads::workers(None, &cpus, StepOn::Cpu, &env_of(&[])).unwrap();
    // Typical: augmenting a batch is a small share of a CPU step: nothing changes.
    let (s, changes) = converge(0.2, 8.0, start.clone(), StepOn::Cpu, &cpus);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!((s.compute.n, s.workers.n), (16, 1));
    // Heavy augmentation: workers grow, compute gives up one core per worker past the first,
    // and it settles.
    let (s, changes) = converge(3.0, 8.0, start, StepOn::Cpu, &cpus);
    assert!(s.workers.n > 1 && !changes.is_empty(), "{changes:?}");
    assert_eq!(s.compute.n + s.workers.n, 17, "{changes:?}");
    assert!(changes.len() <= 4, "{changes:?}");
    let last = epoch_model(3.0, 8.0, &s, StepOn::Cpu, 250.0);
    assert!(last.wait / last.wall <= threads::WAIT_LIMIT, "{changes:?}");
}

#[test]
fn a_set_count_is_never_adapted_and_a_starving_count_is_never_returned_to() {
    let cpus = SIXTEEN;
    let mut set = Split::new(Count { n: 16, from: "--threads".into(), set: true }, Count { n: 2, from: "--workers".into(), set: true }, StepOn::Cpu, &cpus, 64);
    for load in [EpochLoad { wall: 10.0, wait: 5.0, busy: 10.0 }, EpochLoad { wall: 10.0, wait: 0.0, busy: 0.1 }] {
        assert!(set.adapt(&load).is_none());
    }
    assert_eq!((set.compute.n, set.workers.n), (16, 2));
    // Set compute threads stay while the workers adapt.
    let mut half = Split::new(Count { n: 8, from: "OMP_NUM_THREADS".into(), set: true }, Count { n: 1, from: "c".into(), set: false }, StepOn::Cpu, &cpus, 64);
    assert!(half.adapt(&EpochLoad { wall: 10.0, wait: 3.0, busy: 7.0 }).is_some());
    assert_eq!(half.compute.n, 8);
    assert!(half.workers.n >= 2);
    // Noise: a quiet epoch after a starved one does not take the worker away again.
    let mut s = Split::new(Count { n: 4, from: "c".into(), set: false }, Count { n: 2, from: "c".into(), set: false }, StepOn::Gpu, &Cpus { online: 4, affinity: 4, quota: None }, 64);
    assert!(s.adapt(&EpochLoad { wall: 10.0, wait: 1.0, busy: 18.0 }).is_some());
    let after = s.workers.n;
    assert_eq!(after, 3);
    assert!(s.adapt(&EpochLoad { wall: 10.0, wait: 0.0, busy: 1.0 }).is_none(), "went back below a count that starved the step");
    // The memory limit bounds the growth.
    let mut capped = Split::new(Count { n: 16, from: "c".into(), set: false }, Count { n: 2, from: "c".into(), set: false }, StepOn::Gpu, &cpus, 3);
    capped.adapt(&EpochLoad { wall: 10.0, wait: 8.0, busy: 20.0 });
    assert_eq!(capped.workers.n, 3);
    assert!(capped.adapt(&EpochLoad { wall: 10.0, wait: 8.0, busy: 30.0 }).is_none());
}

/// A loader whose batches take a known time, without using a CPU (so the test means the same
/// on a 2-core machine as on 64).
struct Sleepy(Duration);

impl Fill for Sleepy {
    type Worker = ();
    fn worker(&self) {}
    fn fill(&self, _: &mut (), index: u64, b: &mut Batch) -> Result<(), FillError> {
        std::thread::sleep(self.0);
        b.labels[0] = (index % 251) as u8;
        Ok(())
    }
    fn whereabouts(&self, _: &()) -> (String, &'static str) {
        ("-".into(), "sleeping")
    }
}

/// Runs epochs of a fake step against the pool, adapting the worker count after each; returns
/// the worker count of each epoch and the changes.
fn run_pool(fill_ms: u64, step_ms: u64, start: usize, epochs: usize) -> (Vec<usize>, Vec<String>, Vec<u8>) {
    let shape = SlotShape { image: 8, labels: 8, batch: 1 };
    let mut pool = Pool::start(Arc::new(Sleepy(Duration::from_millis(fill_ms))), start, 2 * start + 2, shape, 0).unwrap();
    let cpus = Cpus { online: 12, affinity: 12, quota: None };
    let mut split = Split::new(Count { n: 12, from: "c".into(), set: false }, Count { n: start, from: "c".into(), set: false }, StepOn::Gpu, &cpus, 12);
    let (mut counts, mut changes, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..epochs {
        counts.push(pool.workers());
        pool.take_stats();
        let t0 = Instant::now();
        for _ in 0..20 {
            let b = pool.next_batch().unwrap();
            seen.push(b.labels[0]);
            std::thread::sleep(Duration::from_millis(step_ms));
            pool.give_back(b);
        }
        let st = pool.take_stats();
        let load = EpochLoad { wall: t0.elapsed().as_secs_f64(), wait: st.wait.as_secs_f64(), busy: st.busy.as_secs_f64() };
        if let Some(line) = split.adapt(&load) {
            pool.set_workers(split.workers.n, &segk::hostmem::Heap).unwrap();
            changes.push(line);
        }
    }
    (counts, changes, seen)
}

#[test]
fn the_pool_grows_for_a_slow_loader_and_shrinks_for_a_fast_one_in_order() {
    // 40 ms a batch against a 10 ms step: four workers keep up, five with the headroom.
    let (counts, changes, seen) = run_pool(40, 10, 1, 8);
    eprintln!("slow loader: workers per epoch {counts:?}; {changes:?}");
    let last = *counts.last().unwrap();
    assert!((4..=8).contains(&last), "{counts:?} {changes:?}");
    assert!(counts.windows(2).all(|w| w[1] >= w[0]), "grew and shrank again: {counts:?} {changes:?}");
    // Batches still come in order 0, 1, 2, ... whatever the worker count did.
    assert!(seen.iter().enumerate().all(|(i, &l)| l == (i % 251) as u8), "out of order");
    // 2 ms a batch against a 10 ms step: one worker is plenty.
    let (counts, changes, _) = run_pool(2, 10, 8, 4);
    eprintln!("fast loader: workers per epoch {counts:?}; {changes:?}");
    assert_eq!(*counts.last().unwrap(), 1, "{counts:?} {changes:?}");
    assert_eq!(changes.len(), 1, "{changes:?}");
}
