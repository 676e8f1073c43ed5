//! Launches of kernels/misc.cu (CPU twin: backend/cpu/misc.rs).

use super::{launch, same_dt, CudaBackend, DevBuf, DevLabels};
use crate::tensor::Dims;
use anyhow::{ensure, Result};

pub fn concat(be: &CudaBackend, a: DevBuf, ca: usize, b: DevBuf, cb: usize, rows: usize, out: DevBuf) -> Result<()> {
    ensure!(a.len == rows * ca && b.len == rows * cb && out.len == rows * (ca + cb), "concat shapes");
    let dt = same_dt("concat", &[a, b, out])?;
    let (ca, cb, r) = (ca as i32, cb as i32, rows as i64);
    launch!(be, concat[dt], be.grid(out.len), &a.ptr, &ca, &b.ptr, &cb, &r, &out.ptr);
    Ok(())
}

pub fn concat_bwd(be: &CudaBackend, d: DevBuf, ca: usize, cb: usize, rows: usize, da: DevBuf, db: DevBuf, beta: f32) -> Result<()> {
    ensure!(da.len == rows * ca && db.len == rows * cb && d.len == rows * (ca + cb), "concat_bwd shapes");
    let dt = same_dt("concat_bwd", &[d, da, db])?;
    let (ca, cb, r) = (ca as i32, cb as i32, rows as i64);
    launch!(be, concat_bwd[dt], be.grid(d.len), &d.ptr, &ca, &cb, &r, &da.ptr, &db.ptr, &beta);
    Ok(())
}

pub fn downsample_labels(be: &CudaBackend, src: DevLabels, sd: Dims, dst: DevLabels, dd: Dims) -> Result<()> {
    ensure!(sd.n == dd.n && src.len == sd.rows() && dst.len == dd.rows(), "downsample shapes");
    let [n, a, b, c, x, y, z] = [sd.n, sd.d, sd.h, sd.w, dd.d, dd.h, dd.w].map(|v| v as i32);
    launch!(be, downsample_labels, be.grid(dst.len), &src.ptr, &n, &a, &b, &c, &dst.ptr, &x, &y, &z);
    Ok(())
}

pub fn argmax(be: &CudaBackend, logits: DevBuf, ld: Dims, out: DevLabels) -> Result<()> {
    ensure!(logits.len == ld.len() && out.len == ld.rows(), "argmax shapes");
    let (rows, c) = (ld.rows() as i64, ld.c as i32);
    launch!(be, argmax[logits.dt], be.grid(ld.rows()), &logits.ptr, &rows, &c, &out.ptr);
    Ok(())
}
