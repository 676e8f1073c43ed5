//! The batch pool: N worker threads fill a ring of batch slots allocated once, in place.
//! Slots travel by ownership over two crossbeam channels (free: trainer -> workers, ready:
//! workers -> trainer), so a slot has exactly one owner at any time and nothing is allocated
//! per batch. Batch k is filled from an RNG seeded by (seed, k) whichever worker takes it, and
//! handed to the trainer in order k = 0, 1, 2, ...: the sequence of batches depends on the
//! seed only, not on the worker count or on timing.

use crate::hostmem::{Heap, HostAlloc, HostBuf};
use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Time the trainer spent waiting for batches, and how many were ready when it asked.
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitStats {
    pub batches: u64,
    pub wait: Duration,
    /// Sum over requests of ready batches (in the channel or reordered) at request time.
    pub ready_sum: u64,
}

impl WaitStats {
    pub fn mean_fill(&self) -> f64 {
        self.ready_sum as f64 / self.batches.max(1) as f64
    }
}

pub struct Pool {
    free: Option<Sender<Batch>>,
    ready: Receiver<Ready>,
    workers: Vec<JoinHandle<()>>,
    next: u64,
    early: BTreeMap<u64, Batch>,
    stats: WaitStats,
    slots: usize,
}

impl Pool {
    /// Starts `workers` threads over `slots` heap slots, batches numbered from `first`.
    pub fn start<F: Fill>(filler: Arc<F>, workers: usize, slots: usize, shape: SlotShape, first: u64) -> Result<Pool> {
        Pool::start_in(filler, workers, slots, shape, first, &Heap)
    }

    /// As `start`, with the slots taken from `mem` (pinned memory for a GPU).
    pub fn start_in<F: Fill>(filler: Arc<F>, workers: usize, slots: usize, shape: SlotShape, first: u64, mem: &dyn HostAlloc) -> Result<Pool> {
        let workers = workers.max(1);
        let slots = slots.max(1);
        let (free_tx, free_rx) = bounded::<Batch>(slots);
        let (ready_tx, ready_rx) = bounded::<Ready>(slots);
        for slot in 0..slots {
            free_tx.send(Batch::new(slot, shape, mem)?).map_err(|_| anyhow!("batch ring closed while starting"))?;
        }
        let counter = Arc::new(AtomicU64::new(first));
        let handles = (0..workers)
            .map(|id| {
                let (free_rx, ready_tx, filler, counter) = (free_rx.clone(), ready_tx.clone(), filler.clone(), counter.clone());
                std::thread::Builder::new().name(format!("segk-aug-{id}")).spawn(move || worker_loop(id, &*filler, &free_rx, &ready_tx, &counter))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool { free: Some(free_tx), ready: ready_rx, workers: handles, next: first, early: BTreeMap::new(), stats: WaitStats::default(), slots })
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
            match self.ready.recv() {
                Ok(Ok(b)) if b.index == self.next => break b,
                Ok(Ok(b)) => {
                    self.early.insert(b.index, b);
                }
                Ok(Err((worker, index, e))) => {
                    return Err(anyhow!("augmentation worker {worker} failed on case {} during {} (batch {index}): {}", e.case, e.stage, e.cause));
                }
                Err(_) => return Err(anyhow!("every augmentation worker has stopped")),
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

    /// Wait statistics since the last call (the counters restart).
    pub fn take_stats(&mut self) -> WaitStats {
        std::mem::take(&mut self.stats)
    }

    pub fn slots(&self) -> usize {
        self.slots
    }
    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}

impl Drop for Pool {
    /// Closes the free channel and drains the ready one, so every worker sees a closed
    /// channel at its next blocking point and exits; then joins them.
    fn drop(&mut self) {
        self.free = None;
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

fn worker_loop<F: Fill>(id: usize, filler: &F, free: &Receiver<Batch>, ready: &Sender<Ready>, counter: &AtomicU64) {
    let mut scratch = match catch_unwind(AssertUnwindSafe(|| filler.worker())) {
        Ok(w) => w,
        Err(p) => {
            let e = FillError { case: "-".into(), stage: "worker start", cause: panic_message(&*p) };
            let _ = ready.send(Err((id, 0, e)));
            return;
        }
    };
    // Take the slot before the batch number: then the batches in slots are always the
    // oldest unfinished ones, and the trainer's in-order wait can never deadlock.
    while let Ok(mut b) = free.recv() {
        let index = counter.fetch_add(1, Ordering::Relaxed);
        b.index = index;
        let r = match catch_unwind(AssertUnwindSafe(|| filler.fill(&mut scratch, index, &mut b))) {
            Ok(r) => r,
            Err(p) => {
                let (case, stage) = filler.whereabouts(&scratch);
                Err(FillError { case, stage, cause: format!("panic: {}", panic_message(&*p)) })
            }
        };
        let failed = r.is_err();
        let msg = r.map(|_| b).map_err(|e| (id, index, e));
        if ready.send(msg).is_err() || failed {
            return;
        }
    }
}
