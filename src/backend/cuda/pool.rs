//! Launches of kernels/pool.cu (CPU twin: backend/cpu/pool.rs).

use super::{launch, same_dt, CudaBackend, DevBuf};
use crate::backend::pooled_dims;
use crate::tensor::Dims;
use anyhow::{ensure, Result};

/// The kernels' shape arguments: n, D, H, W, C and the factors, as i32.
fn shape(xd: Dims, k: [usize; 3]) -> Result<[i32; 8]> {
    ensure!(k.iter().all(|&f| f >= 1) && xd.len() < 1 << 62, "avg_pool factors {k:?}");
    Ok([xd.n, xd.d, xd.h, xd.w, xd.c, k[0], k[1], k[2]].map(|v| v as i32))
}

pub fn avg_pool(be: &CudaBackend, x: DevBuf, xd: Dims, k: [usize; 3], y: DevBuf) -> Result<()> {
    let yd = pooled_dims(xd, k);
    ensure!(x.len == xd.len() && y.len == yd.len(), "avg_pool shapes");
    let dt = same_dt("avg_pool", &[x, y])?;
    let [n, d, h, w, c, k0, k1, k2] = shape(xd, k)?;
    launch!(be, avg_pool[dt], be.grid(yd.len()), &x.ptr, &n, &d, &h, &w, &c, &k0, &k1, &k2, &y.ptr);
    Ok(())
}

pub fn avg_pool_bwd(be: &CudaBackend, dy: DevBuf, k: [usize; 3], dx: DevBuf, xd: Dims, beta: f32) -> Result<()> {
    ensure!(dx.len == xd.len() && dy.len == pooled_dims(xd, k).len(), "avg_pool_bwd shapes");
    let dt = same_dt("avg_pool_bwd", &[dy, dx])?;
    let [n, d, h, w, c, k0, k1, k2] = shape(xd, k)?;
    launch!(be, avg_pool_bwd[dt], be.grid(xd.len()), &dy.ptr, &n, &d, &h, &w, &c, &k0, &k1, &k2, &beta, &dx.ptr);
    Ok(())
}
