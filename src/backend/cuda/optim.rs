//! Launches of kernels/optim.cu (CPU twin: backend/cpu/optim.rs).

use super::{f32s, launch, CudaBackend, DevBuf};
use crate::backend::SgdParams;
use anyhow::Result;

pub fn sum_squares(be: &CudaBackend, x: DevBuf) -> Result<f64> {
    f32s("sum_squares", &[x])?;
    let cfg = be.grid(x.len);
    let blocks = cfg.grid_dim.0 as usize;
    // f64 partials, one per block, in the f32 workspace (2 words each, 8-byte aligned).
    let part = be.scratch(2 * blocks)?;
    let n = x.len as i64;
    launch!(be, sum_squares_f32, cfg, &x.ptr, &n, &part);
    Ok(be.read::<f64>(part, blocks)?.iter().sum())
}

pub fn scale(be: &CudaBackend, x: DevBuf, s: f64) -> Result<()> {
    f32s("scale", &[x])?;
    let (n, s) = (x.len as i64, s as f32);
    launch!(be, scale_f32, be.grid(x.len), &x.ptr, &n, &s);
    Ok(())
}

pub fn sgd_update(be: &CudaBackend, p: DevBuf, g: DevBuf, m: DevBuf, sp: &SgdParams) -> Result<()> {
    anyhow::ensure!(p.len == g.len && p.len == m.len, "sgd arena sizes");
    f32s("sgd_update", &[p, g, m])?;
    let (n, lr, mu, wd, first) = (p.len as i64, sp.lr as f32, sp.momentum as f32, sp.weight_decay as f32, sp.first_step as i32);
    launch!(be, sgd_nesterov_f32, be.grid(p.len), &p.ptr, &g.ptr, &m.ptr, &n, &lr, &mu, &wd, &first);
    Ok(())
}
