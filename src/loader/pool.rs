//! The batch pool: N worker threads fill a ring of batch slots allocated once, in place.
//! Slots travel by ownership over two crossbeam channels (free: trainer -> workers, ready:
//! workers -> trainer), so a slot has exactly one owner at any time and nothing is allocated
//! per batch. Batch k is filled from an RNG seeded by (seed, k) whichever worker takes it, and
//! handed to the trainer in order k = 0, 1, 2, ...: the sequence of batches depends on the
//! seed only, not on the worker count or on timing. The worker count can change while the pool
//! runs (the thread policy adapts it each epoch): workers past the active count park, and
//! growing adds threads and slots.

use crate::hostmem::{Heap, HostAlloc, HostBuf};
use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One batch slot: images [B][D][H][W][C], labels [B][D][H][W], and the case of each sample.
pub struct Batch {
    pub slot: usize,
    /// The batch number this slot holds now.
    pub index: u64,
    pub image: HostBuf<f32>,
    pub labels: HostBuf<u8>,
    pub cases: Vec<usize>,
}

impl Batch {
    /// An empty slot from `mem` (pinned when the CUDA backend gave the allocator).
    pub fn new(slot: usize, shape: SlotShape, mem: &dyn HostAlloc) -> Result<Batch> {
        let image = mem.f32s(shape.image).with_context(|| format!("allocating batch slot {slot} ({} image values)", shape.image))?;
        let labels = mem.bytes(shape.labels).with_context(|| format!("allocating batch slot {slot} ({} label voxels)", shape.labels))?;
        Ok(Batch { slot, index: 0, image, labels, cases: vec![0; shape.batch] })
    }
}

/// Why a worker could not fill a batch.
#[derive(Debug, Clone)]
pub struct FillError {
    pub case: String,
    /// The stage that failed ("crop", "rotation/scaling", "gaussian noise", ...).
    pub stage: &'static str,
    pub cause: String,
}

/// What fills batches. Shared by all workers; each worker also owns a `Worker` scratch
/// (created once) so filling allocates nothing.
pub trait Fill: Send + Sync + 'static {
    type Worker: Send;
    fn worker(&self) -> Self::Worker;
    fn fill(&self, w: &mut Self::Worker, index: u64, batch: &mut Batch) -> std::result::Result<(), FillError>;
    /// The case and stage a worker was at (to name them when a fill panics).
    fn whereabouts(&self, w: &Self::Worker) -> (String, &'static str);
}

/// Sizes of a slot.
#[derive(Clone, Copy, Debug)]
pub struct SlotShape {
    pub image: usize,
    pub labels: usize,
    pub batch: usize,
}

type Ready = std::result::Result<Batch, (usize, u64, FillError)>;

/// Time the trainer spent waiting for batches, how many were ready when it asked, and the
/// time the workers spent filling.
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitStats {
    pub batches: u64,
    pub wait: Duration,
    /// Time spent filling batches, summed over workers (their idle time is the rest).
    pub busy: Duration,
    /// Sum over requests of ready batches (in the channel or reordered) at request time.
    pub ready_sum: u64,
}

impl WaitStats {
    pub fn mean_fill(&self) -> f64 {
        self.ready_sum as f64 / self.batches.max(1) as f64
    }
}

/// What the pool and its workers share besides the channels.
struct Shared {
    /// Workers with an id below this fill batches; the rest park.
    active: AtomicUsize,
    stop: AtomicBool,
    busy_ns: AtomicU64,
    counter: AtomicU64,
    park: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    free: Option<Sender<Batch>>,
    free_rx: Receiver<Batch>,
    ready: Receiver<Ready>,
    ready_tx: Sender<Ready>,
    workers: Vec<JoinHandle<()>>,
    next: u64,
    early: BTreeMap<u64, Batch>,
    stats: WaitStats,
    slots: usize,
    shape: SlotShape,
    shared: Arc<Shared>,
    spawn: Box<dyn Fn(usize, Receiver<Batch>, Sender<Ready>, Arc<Shared>) -> std::io::Result<JoinHandle<()>> + Send>,
}

impl Pool {
    /// Starts `workers` threads over `slots` heap slots, batches numbered from `first`.
    pub fn start<F: Fill>(filler: Arc<F>, workers: usize, slots: usize, shape: SlotShape, first: u64) -> Result<Pool> {
        Pool::start_in(filler, workers, slots, shape, first, &Heap)
    }

    /// As `start`, with the slots taken from `mem` (pinned memory for a GPU).
    pub fn start_in<F: Fill>(filler: Arc<F>, workers: usize, slots: usize, shape: SlotShape, first: u64, mem: &dyn HostAlloc) -> Result<Pool> {
        // Unbounded channels: the slots in existence bound what they hold, and slots can be added.
        let (free_tx, free_rx) = unbounded::<Batch>();
        let (ready_tx, ready_rx) = unbounded::<Ready>();
        let shared = Arc::new(Shared { active: AtomicUsize::new(0), stop: AtomicBool::new(false), busy_ns: AtomicU64::new(0), counter: AtomicU64::new(first), park: Mutex::new(()), wake: Condvar::new() });
        let spawn = Box::new(move |id: usize, free_rx: Receiver<Batch>, ready_tx: Sender<Ready>, shared: Arc<Shared>| {
            let filler = filler.clone();
            std::thread::Builder::new().name(format!("segk-aug-{id}")).spawn(move || worker_loop(id, &*filler, &free_rx, &ready_tx, &shared))
        });
        let mut pool = Pool { free: Some(free_tx), free_rx, ready: ready_rx, ready_tx, workers: Vec::new(), next: first, early: BTreeMap::new(), stats: WaitStats::default(), slots: 0, shape, shared, spawn };
        pool.add_slots(slots.max(1), mem)?;
        pool.set_workers(workers, mem)?;
        Ok(pool)
    }

    /// Runs `n` workers from now on (at least one): parks the ones past `n`, or starts more
    /// and adds slots so that each worker has two to fill ahead.
    pub fn set_workers(&mut self, n: usize, mem: &dyn HostAlloc) -> Result<()> {
        let n = n.max(1);
        // At start the caller chose the slots; growing later keeps two per worker ahead.
        if self.slots < 2 * n + 2 && !self.workers.is_empty() {
            self.add_slots(2 * n + 2 - self.slots, mem)?;
        }
        while self.workers.len() < n {
            let id = self.workers.len();
            self.workers.push((self.spawn)(id, self.free_rx.clone(), self.ready_tx.clone(), self.shared.clone())?);
        }
        self.shared.active.store(n, Ordering::SeqCst);
        let _guard = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.wake.notify_all();
        Ok(())
    }

    fn add_slots(&mut self, more: usize, mem: &dyn HostAlloc) -> Result<()> {
        let tx = self.free.as_ref().ok_or_else(|| anyhow!("batch ring closed"))?;
        for slot in self.slots..self.slots + more {
            tx.send(Batch::new(slot, self.shape, mem)?).map_err(|_| anyhow!("batch ring closed while adding slots"))?;
        }
        self.slots += more;
        Ok(())
    }

    /// The next batch in order (blocks until it is filled). A worker's failure comes back
    /// as "augmentation worker N failed on case X during T: cause".
    pub fn next_batch(&mut self) -> Result<Batch> {
        let t0 = Instant::now();
        self.stats.ready_sum += (self.ready.len() + self.early.len()) as u64;
        let b = loop {
            if let Some(b) = self.early.remove(&self.next) {
                break b;
            }
            // The pool keeps a sender (to start workers later), so a closed channel cannot tell
            // that every worker is gone: look at the threads while waiting.
            match self.ready.recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(b)) if b.index == self.next => break b,
                Ok(Ok(b)) => {
                    self.early.insert(b.index, b);
                }
                Ok(Err((worker, index, e))) => {
                    return Err(anyhow!("augmentation worker {worker} failed on case {} during {} (batch {index}): {}", e.case, e.stage, e.cause));
                }
                Err(_) if self.workers.iter().all(|h| h.is_finished()) && self.ready.is_empty() => return Err(anyhow!("every augmentation worker has stopped")),
                Err(_) => {}
            }
        };
        self.next += 1;
        self.stats.batches += 1;
        self.stats.wait += t0.elapsed();
        Ok(b)
    }

    /// Returns a used slot to the workers.
    pub fn give_back(&mut self, b: Batch) {
        if let Some(tx) = &self.free {
            // Fails only when the workers are gone, and then the slot is not needed.
            let _ = tx.send(b);
        }
    }

    /// Wait and busy statistics since the last call (the counters restart).
    pub fn take_stats(&mut self) -> WaitStats {
        let mut s = std::mem::take(&mut self.stats);
        s.busy = Duration::from_nanos(self.shared.busy_ns.swap(0, Ordering::Relaxed));
        s
    }

    pub fn slots(&self) -> usize {
        self.slots
    }
    /// Workers filling batches now (parked ones not counted).
    pub fn workers(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for Pool {
    /// Closes the free channel and drains the ready one, so every worker sees a closed
    /// channel at its next blocking point and exits; then joins them.
    fn drop(&mut self) {
        self.free = None;
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        while !self.workers.iter().all(|h| h.is_finished()) {
            while self.ready.try_recv().is_ok() {}
            std::thread::sleep(Duration::from_millis(1));
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "panic".into())
}

fn worker_loop<F: Fill>(id: usize, filler: &F, free: &Receiver<Batch>, ready: &Sender<Ready>, shared: &Shared) {
    let mut scratch = match catch_unwind(AssertUnwindSafe(|| filler.worker())) {
        Ok(w) => w,
        Err(p) => {
            let e = FillError { case: "-".into(), stage: "worker start", cause: panic_message(&*p) };
            let _ = ready.send(Err((id, 0, e)));
            return;
        }
    };
    loop {
        if !wait_until_active(id, shared) {
            return;
        }
        // Take the slot before the batch number: then the batches in slots are always the
        // oldest unfinished ones, and the trainer's in-order wait can never deadlock.
        let Ok(mut b) = free.recv() else { return };
        let index = shared.counter.fetch_add(1, Ordering::Relaxed);
        b.index = index;
        let t0 = Instant::now();
        let r = match catch_unwind(AssertUnwindSafe(|| filler.fill(&mut scratch, index, &mut b))) {
            Ok(r) => r,
            Err(p) => {
                let (case, stage) = filler.whereabouts(&scratch);
                Err(FillError { case, stage, cause: format!("panic: {}", panic_message(&*p)) })
            }
        };
        shared.busy_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let failed = r.is_err();
        let msg = r.map(|_| b).map_err(|e| (id, index, e));
        if ready.send(msg).is_err() || failed {
            return;
        }
    }
}

/// Parks worker `id` while it is past the active count; false when the pool is closing.
fn wait_until_active(id: usize, shared: &Shared) -> bool {
    let mut guard = shared.park.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        if id < shared.active.load(Ordering::SeqCst) {
            return true;
        }
        guard = shared.wake.wait_timeout(guard, Duration::from_millis(100)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
}
