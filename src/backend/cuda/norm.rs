//! Launches of kernels/norm.cu (CPU twin: backend/cpu/norm.rs).

use super::{f32s, launch, same_dt, CudaBackend, DevBuf};
use crate::tensor::Dims;
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

const THREADS: u32 = 256;

/// Voxel chunks per sample: enough blocks to fill the GPU twice.
fn chunking(be: &CudaBackend, xd: Dims) -> (usize, usize) {
    let per_sample = (2 * be.sms()).div_ceil(xd.n).max(1);
    let chunk = xd.voxels().div_ceil(per_sample).max(64);
    (chunk, xd.voxels().div_ceil(chunk))
}

fn blocks(nchunks: usize, n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (nchunks as u32, n as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

pub fn stats(be: &CudaBackend, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf) -> Result<()> {
    ensure!(x.len == xd.len() && mean.len == xd.n * xd.c && rstd.len == xd.n * xd.c, "norm stats shapes");
    f32s("norm_stats", &[mean, rstd])?;
    let (chunk, nchunks) = chunking(be, xd);
    let part = be.scratch(xd.n * nchunks * xd.c * 3)?;
    let (v, c, ch, n, nc) = (xd.voxels() as i64, xd.c as i32, chunk as i64, xd.n as i32, nchunks as i32);
    launch!(be, norm_partial[x.dt], blocks(nchunks, xd.n), &x.ptr, &v, &c, &ch, &part);
    launch!(be, norm_finalize_f32, be.grid(xd.n * xd.c), &part, &n, &nc, &c, &mean.ptr, &rstd.ptr);
    Ok(())
}

pub fn act_fwd(be: &CudaBackend, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf, gamma: DevBuf, beta: DevBuf, y: DevBuf) -> Result<()> {
    ensure!(x.len == xd.len() && y.len == xd.len(), "norm_act_fwd shapes");
    let dt = same_dt("norm_act_fwd", &[x, y])?;
    f32s("norm_act_fwd", &[mean, rstd, gamma, beta])?;
    let (n, v, c) = (xd.n as i32, xd.voxels() as i64, xd.c as i32);
    launch!(be, norm_act_fwd[dt], be.grid(xd.len()), &x.ptr, &n, &v, &c, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &y.ptr);
    Ok(())
}

/// `stats` = [mean, rstd, gamma, beta]; dx may be the same view as dy.
pub fn act_bwd(be: &CudaBackend, dy: DevBuf, x: DevBuf, xd: Dims, stats: [DevBuf; 4], dx: DevBuf, dgamma: DevBuf, dbeta: DevBuf) -> Result<()> {
    ensure!(dy.len == xd.len() && x.len == xd.len() && dx.len == xd.len(), "norm_act_bwd shapes");
    let dt = same_dt("norm_act_bwd", &[dy, x, dx])?;
    f32s("norm_act_bwd", &stats)?;
    f32s("norm_act_bwd", &[dgamma, dbeta])?;
    let [mean, rstd, gamma, beta] = stats;
    let (chunk, nchunks) = chunking(be, xd);
    let part_len = xd.n * nchunks * xd.c * 2;
    let part = be.scratch(part_len + xd.n * xd.c * 2)?;
    let sums = part + 4 * part_len as u64;
    let (n, v, c, ch, nc) = (xd.n as i32, xd.voxels() as i64, xd.c as i32, chunk as i64, nchunks as i32);
    launch!(be, norm_bwd_partial[dt], blocks(nchunks, xd.n), &dy.ptr, &x.ptr, &v, &c, &ch, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &part);
    launch!(be, norm_bwd_finalize_f32, be.grid(xd.c), &part, &n, &nc, &c, &sums, &dgamma.ptr, &dbeta.ptr);
    launch!(be, norm_bwd_apply[dt], be.grid(xd.len()), &dy.ptr, &x.ptr, &n, &v, &c, &mean.ptr, &rstd.ptr, &gamma.ptr, &beta.ptr, &sums, &dx.ptr);
    Ok(())
}
