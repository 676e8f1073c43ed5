//! Launches of kernels/norm.cu (CPU twin: backend/cpu/norm.rs).

use super::{f32s, launch, same_dt, CudaBackend, DevBuf};
use crate::backend::Act;
use crate::tensor::Dims;
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

const THREADS: u32 = 256;
/// Widest channel count of the 8-channel kernels: their per-sample tables (up to 7 x C f32)
/// stay within the 48 KiB of shared memory a kernel gets unasked.
const MAX_VEC_CHANNELS: usize = 1024;

/// Voxel chunks per sample for the statistics passes: `per_sm` blocks per SM, as many as fit
/// at once (so that enough 16-byte loads are in flight to cover HBM latency, and no second
/// wave runs with the GPU mostly idle).
fn chunking(be: &CudaBackend, xd: Dims, per_sm: usize) -> (usize, usize) {
    let per_sample = (per_sm * be.sms()).div_ceil(xd.n).max(1);
    let chunk = xd.voxels().div_ceil(per_sample).max(64);
    (chunk, xd.voxels().div_ceil(chunk))
}

fn blocks(nchunks: usize, n: usize, shared: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (nchunks as u32, n as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared as u32 }
}

/// One warp per item (the finalize kernels).
fn warps(items: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (items.div_ceil(THREADS as usize / 32) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Elementwise passes of the 8-channel kernels: blocks per sample (grid-striding past ~16
/// blocks per SM in all), with a per-sample table of `table_rows` x C f32 in shared memory.
fn per_sample(be: &CudaBackend, xd: Dims, table_rows: usize) -> LaunchConfig {
    let per = (xd.voxels() * xd.c / 8).div_ceil(THREADS as usize).clamp(1, (16 * be.sms()).div_ceil(xd.n));
    blocks(per, xd.n, table_rows * xd.c * 4)
}

/// Whether the 8-channel kernels take these tensors: groups of 8 channels, 16-byte aligned,
/// a sample's groups counted in 32 bits (below 2^31, so that a grid stride past the last
/// group cannot wrap), the tables within shared memory.
fn vec8(xd: Dims, bufs: &[DevBuf]) -> bool {
    xd.c % 8 == 0 && xd.c <= MAX_VEC_CHANNELS && xd.voxels() * xd.c / 8 < 1 << 31 && bufs.iter().all(|b| b.ptr % 16 == 0)
}

pub fn stats(be: &CudaBackend, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf) -> Result<()> {
    ensure!(x.len == xd.len() && mean.len == xd.n * xd.c && rstd.len == xd.n * xd.c, "norm stats shapes");
    f32s("norm_stats", &[mean, rstd])?;
    // ptxas: 56-64 registers for the 8-channel kernel, so four blocks of 256 fit an SM.
    let (chunk, nchunks) = chunking(be, xd, 4);
    let part = be.scratch(xd.n * nchunks * xd.c * 3)?;
    let (v, c, ch, n, nc) = (xd.voxels() as i64, xd.c as i32, chunk as i64, xd.n as i32, nchunks as i32);
    if vec8(xd, &[x]) {
        launch!(be, norm_partial8[x.dt], blocks(nchunks, xd.n, 0), &x.ptr, &v, &c, &ch, &part);
    } else {
        launch!(be, norm_partial[x.dt], blocks(nchunks, xd.n, 0), &x.ptr, &v, &c, &ch, &part);
    }
    launch!(be, norm_finalize_f32, warps(xd.n * xd.c), &part, &n, &nc, &c, &mean.ptr, &rstd.ptr);
    Ok(())
}

/// y = act(norm(x) [+ residual]) (see `Backend::norm_fwd`).
#[allow(clippy::too_many_arguments)]
pub fn fwd(be: &CudaBackend, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf, gamma: DevBuf, beta: DevBuf, residual: Option<DevBuf>, act: Act, y: DevBuf) -> Result<()> {
    ensure!(x.len == xd.len() && y.len == xd.len() && residual.is_none_or(|r| r.len == xd.len()), "norm_fwd shapes");
    let mut bufs = vec![x, y];
    bufs.extend(residual);
    let dt = same_dt("norm_fwd", &bufs)?;
    f32s("norm_fwd", &[mean, rstd, gamma, beta])?;
    let (n, v, c, slope) = (xd.n as i32, xd.voxels() as i64, xd.c as i32, act.slope() as f32);
    let res = residual.map_or(0, |r| r.ptr);
    if vec8(xd, &bufs) {
        launch!(be, norm_act_fwd8[dt], per_sample(be, xd, 3), &x.ptr, &v, &c, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &res, &slope, &y.ptr);
    } else {
        launch!(be, norm_act_fwd[dt], be.grid(xd.len()), &x.ptr, &n, &v, &c, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &res, &slope, &y.ptr);
    }
    Ok(())
}

/// dx = dy * leaky'(y); dx may be the same view as dy.
pub fn leaky_bwd(be: &CudaBackend, dy: DevBuf, y: DevBuf, dx: DevBuf) -> Result<()> {
    ensure!(dy.len == y.len && dx.len == y.len, "leaky_bwd shapes");
    let dt = same_dt("leaky_bwd", &[dy, y, dx])?;
    let total = y.len as i64;
    launch!(be, leaky_bwd[dt], be.grid(y.len), &dy.ptr, &y.ptr, &total, &dx.ptr);
    Ok(())
}

/// `stats` = [mean, rstd, gamma, beta]; dx may be the same view as dy.
#[allow(clippy::too_many_arguments)]
pub fn bwd(be: &CudaBackend, dy: DevBuf, x: DevBuf, xd: Dims, stats: [DevBuf; 4], act: Act, dx: DevBuf, dgamma: DevBuf, dbeta: DevBuf) -> Result<()> {
    ensure!(dy.len == xd.len() && x.len == xd.len() && dx.len == xd.len(), "norm_act_bwd shapes");
    let dt = same_dt("norm_act_bwd", &[dy, x, dx])?;
    f32s("norm_act_bwd", &stats)?;
    f32s("norm_act_bwd", &[dgamma, dbeta])?;
    let [mean, rstd, gamma, beta] = stats;
    // ptxas: 74-79 registers for the 8-channel kernel (its per-channel parameters live in
    // registers), so three blocks of 256 fit an SM; capping it at 64 spills.
    let (chunk, nchunks) = chunking(be, xd, 3);
    let part_len = xd.n * nchunks * xd.c * 2;
    let part = be.scratch(part_len + xd.n * xd.c * 2)?;
    let sums = part + 4 * part_len as u64;
    let (n, v, c, ch, nc) = (xd.n as i32, xd.voxels() as i64, xd.c as i32, chunk as i64, nchunks as i32);
    let slope = act.slope() as f32;
    let vec = vec8(xd, &[dy, x, dx]);
    if vec {
        launch!(be, norm_bwd_partial8[dt], blocks(nchunks, xd.n, 0), &dy.ptr, &x.ptr, &v, &c, &ch, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &slope, &part);
    } else {
        launch!(be, norm_bwd_partial[dt], blocks(nchunks, xd.n, 0), &dy.ptr, &x.ptr, &v, &c, &ch, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &slope, &part);
    }
    launch!(be, norm_bwd_finalize_f32, warps(xd.c), &part, &n, &nc, &c, &sums, &dgamma.ptr, &dbeta.ptr);
    if vec {
        launch!(be, norm_bwd_apply8[dt], per_sample(be, xd, 7), &dy.ptr, &x.ptr, &v, &c, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &slope, &sums, &dx.ptr);
    } else {
        launch!(be, norm_bwd_apply[dt], be.grid(xd.len()), &dy.ptr, &x.ptr, &n, &v, &c, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &slope, &sums, &dx.ptr);
    }
    Ok(())
}
