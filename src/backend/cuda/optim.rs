//! Launches of kernels/optim.cu (CPU twin: backend/cpu/optim.rs).

use super::{f32s, launch, CudaBackend, DevBuf};
use crate::backend::SgdParams;
use anyhow::Result;
use cudarc::driver::LaunchConfig;

/// Per-block f64 partials, then one block merging them in a fixed order into out[0]: the
/// squared gradient norm stays on the device, where the update reads it.
pub fn sum_squares(be: &CudaBackend, x: DevBuf, out: DevBuf) -> Result<()> {
    f32s("sum_squares", &[x, out])?;
    anyhow::ensure!(out.len >= 1, "sum_squares into an empty view");
    let cfg = be.grid(x.len);
    let blocks = cfg.grid_dim.0;
    // f64 partials, one per block, in the f32 workspace (2 words each, 8-byte aligned).
    let part = be.scratch(2 * blocks as usize)?;
    let n = x.len as i64;
    launch!(be, sum_squares_f32, cfg, &x.ptr, &n, &part);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let nb = blocks as i32;
    launch!(be, sum_partials_f64, one, &part, &nb, &out.ptr);
    Ok(())
}

pub fn sgd_update(be: &CudaBackend, p: DevBuf, g: DevBuf, m: DevBuf, sp: &SgdParams, guard: DevBuf) -> Result<()> {
    anyhow::ensure!(p.len == g.len && p.len == m.len, "sgd arena sizes");
    anyhow::ensure!(guard.len >= 1, "sgd_update needs its guard (the squared gradient norm first)");
    f32s("sgd_update", &[p, g, m, guard])?;
    let (n, lr, mu, wd) = (p.len as i64, sp.lr as f32, sp.momentum as f32, sp.weight_decay as f32);
    let (glen, max_norm) = (guard.len as i32, sp.max_grad_norm as f32);
    launch!(be, sgd_nesterov_f32, be.grid(p.len), &p.ptr, &g.ptr, &m.ptr, &n, &lr, &mu, &wd, &guard.ptr, &glen, &max_norm);
    Ok(())
}
