//! Launches of kernels/loss.cu (CPU twin: backend/cpu/loss.rs). The Dice terms between the two
//! passes are computed on the device (segk_loss_dice), in the order the CPU twin's
//! `dice_terms` uses; the loss parts stay on the device in the step's record. With several
//! ranks the partials of pass 1 are all-gathered first, so that every rank merges the whole
//! global batch's partials in sample order: the single-process loss and gradient, bit for bit.

use super::{f32s, launch, CudaBackend, DevBuf, DevLabels};
use crate::backend::{Backend, DiceMode, RegionMasks, LOSS_RECORD, MAX_REGIONS};
use crate::tensor::Dims;
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

const THREADS: usize = 256;

/// Both losses' pass-1 layout: chunks of a sample per block, and one workspace (f32 words):
/// the blocks' partials of every rank's samples (this rank's at `mine`; one rank: all of
/// them), the coefficients and the CE count, then f64 sums at an 8-byte boundary. The chunk
/// size follows the global batch, so that a sample's partials are the same bits whichever
/// rank computes it.
struct Work {
    chunk: usize,
    nchunks: usize,
    /// Samples over every rank, and the global index of this rank's first.
    n_all: usize,
    first: usize,
    groups: usize,
    part: u64,
    mine: u64,
    /// f32 values of this rank's partials.
    mine_len: usize,
    coef: u64,
    sums: u64,
    cfg: LaunchConfig,
}

fn workspace(be: &CudaBackend, ld: Dims, mode: DiceMode) -> Result<Work> {
    let (c, v, n) = (ld.c, ld.voxels(), ld.n);
    let (rank, ranks) = be.ranks();
    let (n_all, first) = (n * ranks, n * rank);
    let sms = be.ranks_joined().map_or(be.sms(), |r| r.sms0);
    let per_sample_blocks = (2 * sms).div_ceil(n_all).max(1);
    let chunk = v.div_ceil(per_sample_blocks).max(THREADS);
    let nchunks = v.div_ceil(chunk);
    let width = 3 * c + 3;
    let groups = if mode == DiceMode::PerSample { n_all } else { 1 };
    let (part_len, coef_len) = (n_all * nchunks * width, 2 * groups * c + 1);
    let sums_at = (part_len + coef_len).next_multiple_of(2);
    let part = be.scratch(sums_at + 2 * (3 * n_all * c + groups * c))?;
    let mine_len = n * nchunks * width;
    let (mine, coef, sums) = (part + 4 * (first * nchunks * width) as u64, part + 4 * part_len as u64, part + 4 * sums_at as u64);
    let cfg = LaunchConfig { grid_dim: (nchunks as u32, n as u32, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: (4 * width * THREADS / 32) as u32 };
    Ok(Work { chunk, nchunks, n_all, first, groups, part, mine, mine_len, coef, sums, cfg })
}

/// Every rank's partials into every rank's workspace (nothing to do for one rank).
fn gather_partials(be: &CudaBackend, w: &Work) -> Result<()> {
    if be.ranks_joined().is_none() {
        return Ok(());
    }
    // SAFETY: the workspace holds every rank's partials (ranks x mine_len f32) on this GPU.
    be.start_collective("the loss's all-gather", |c, stream| unsafe { c.all_gather_f32(w.part, w.mine_len, stream) })?;
    be.join_sums()
}

pub fn softmax_dice_ce(be: &CudaBackend, z: DevBuf, ld: Dims, labels: DevLabels, mode: DiceMode, ignore: bool, weight: f64, record: DevBuf) -> Result<()> {
    let (c, v, n) = (ld.c, ld.voxels(), ld.n);
    ensure!(c >= 2, "the loss needs at least 2 classes (background + 1), got {c}");
    ensure!(z.len == ld.len() && labels.len == ld.rows(), "loss: logits {} and labels {} do not match {}", z.len, labels.len, ld);
    ensure!(record.len == LOSS_RECORD, "loss record of {} values, not {LOSS_RECORD}", record.len);
    f32s("softmax_dice_ce record", &[record])?;
    let work = workspace(be, ld, mode)?;
    let Work { chunk, nchunks, n_all, first, groups, part, mine, coef, sums, cfg, .. } = work;
    let (vv, cc, ch, ig) = (v as i64, c as i32, chunk as i64, ignore as i32);
    launch!(be, loss_partial[z.dt], cfg, &z.ptr, &labels.ptr, &vv, &cc, &ig, &ch, &mine);
    gather_partials(be, &work)?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    let (nn, nch, per) = (n_all as i32, nchunks as i32, (mode == DiceMode::PerSample) as i32);
    let (first_class, per_output, limit) = (1i32, 0i32, (c + ignore as usize) as f32);
    launch!(be, loss_dice, one, &part, &nn, &nch, &cc, &per, &first_class, &per_output, &limit, &sums, &coef, &record.ptr);
    let (terms, w) = ((groups * (c - 1)) as f32, weight as f32);
    let (nl, f0) = (n as i32, first as i32);
    launch!(be, loss_grad[z.dt], be.grid(ld.rows()), &z.ptr, &labels.ptr, &nl, &f0, &nn, &vv, &cc, &coef, &per, &ig, &terms, &w);
    Ok(())
}

/// The region nets' loss (sigmoid + Dice over every region + BCE): region_partial, the shared
/// loss_dice merge (BCE averaged over every voxel of every region, or with an ignore label
/// over the labelled voxels), region_grad.
#[allow(clippy::too_many_arguments)]
pub fn sigmoid_dice_bce(be: &CudaBackend, z: DevBuf, ld: Dims, labels: DevLabels, regions: &RegionMasks, mode: DiceMode, ignore: bool, weight: f64, record: DevBuf) -> Result<()> {
    let (c, v, n) = (ld.c, ld.voxels(), ld.n);
    ensure!((1..=MAX_REGIONS).contains(&c), "the region loss needs 1 to {MAX_REGIONS} regions, got {c}");
    ensure!(z.len == ld.len() && labels.len == ld.rows(), "loss: logits {} and labels {} do not match {}", z.len, labels.len, ld);
    ensure!(record.len == LOSS_RECORD, "loss record of {} values, not {LOSS_RECORD}", record.len);
    f32s("sigmoid_dice_bce record", &[record])?;
    let work = workspace(be, ld, mode)?;
    let Work { chunk, nchunks, n_all, first, groups, part, mine, coef, sums, cfg, .. } = work;
    let (vv, cc, ch) = (v as i64, c as i32, chunk as i64);
    let [m01, m23, m45, m67] = regions.words();
    let ig = if ignore { regions.ignore_value() as i32 } else { -1 };
    launch!(be, region_partial[z.dt], cfg, &z.ptr, &labels.ptr, &vv, &cc, &m01, &m23, &m45, &m67, &ig, &ch, &mine);
    gather_partials(be, &work)?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    let (nn, nch, per) = (n_all as i32, nchunks as i32, (mode == DiceMode::PerSample) as i32);
    let (first_class, per_output, limit) = (0i32, !ignore as i32, crate::backend::REGION_LABELS as f32);
    launch!(be, loss_dice, one, &part, &nn, &nch, &cc, &per, &first_class, &per_output, &limit, &sums, &coef, &record.ptr);
    let (terms, w) = ((groups * c) as f32, weight as f32);
    let (nl, f0) = (n as i32, first as i32);
    launch!(be, region_grad[z.dt], be.grid(ld.rows()), &z.ptr, &labels.ptr, &nl, &f0, &nn, &vv, &cc, &m01, &m23, &m45, &m67, &ig, &coef, &per, &terms, &w);
    Ok(())
}
