//! Launches of kernels/misc.cu (CPU twin: backend/cpu/misc.rs).

use super::{launch, same_dt, CudaBackend, DevBuf, DevLabels};
use crate::tensor::Dims;
use anyhow::{ensure, Result};

/// The 16-byte groups of a concat's output where the 8-channel kernels take it: both channel
/// counts multiples of 8, every view 16-byte aligned, the group count below 2^31 (the kernels
/// count in 32 bits, and a grid stride past the last group must not wrap).
fn groups8(rows: usize, ca: usize, cb: usize, bufs: &[DevBuf]) -> Option<u32> {
    let groups = rows * (ca + cb) / 8;
    let ok = ca % 8 == 0 && cb % 8 == 0 && groups < 1 << 31 && bufs.iter().all(|b| b.ptr % 16 == 0);
    ok.then_some(groups as u32)
}

pub fn concat(be: &CudaBackend, a: DevBuf, ca: usize, b: DevBuf, cb: usize, rows: usize, out: DevBuf) -> Result<()> {
    ensure!(a.len == rows * ca && b.len == rows * cb && out.len == rows * (ca + cb), "concat shapes");
    let dt = same_dt("concat", &[a, b, out])?;
    if let Some(groups) = groups8(rows, ca, cb, &[a, b, out]) {
        let (ca, cb) = (ca as i32, cb as i32);
        launch!(be, concat8[dt], be.grid(groups as usize), &a.ptr, &ca, &b.ptr, &cb, &groups, &out.ptr);
        return Ok(());
    }
    let (ca, cb, r) = (ca as i32, cb as i32, rows as i64);
    launch!(be, concat[dt], be.grid(out.len), &a.ptr, &ca, &b.ptr, &cb, &r, &out.ptr);
    Ok(())
}

pub fn concat_bwd(be: &CudaBackend, d: DevBuf, ca: usize, cb: usize, rows: usize, da: DevBuf, db: DevBuf, beta: f32) -> Result<()> {
    ensure!(da.len == rows * ca && db.len == rows * cb && d.len == rows * (ca + cb), "concat_bwd shapes");
    let dt = same_dt("concat_bwd", &[d, da, db])?;
    if let Some(groups) = groups8(rows, ca, cb, &[d, da, db]) {
        let (ca, cb) = (ca as i32, cb as i32);
        launch!(be, concat_bwd8[dt], be.grid(groups as usize), &d.ptr, &ca, &cb, &groups, &da.ptr, &db.ptr, &beta);
        return Ok(());
    }
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

pub fn region_bits(be: &CudaBackend, logits: DevBuf, ld: Dims, out: DevLabels) -> Result<()> {
    ensure!(logits.len == ld.len() && out.len == ld.rows() && ld.c <= 8, "region_bits shapes");
    let (rows, c) = (ld.rows() as i64, ld.c as i32);
    launch!(be, region_bits[logits.dt], be.grid(ld.rows()), &logits.ptr, &rows, &c, &out.ptr);
    Ok(())
}

pub fn argmax(be: &CudaBackend, logits: DevBuf, ld: Dims, out: DevLabels) -> Result<()> {
    ensure!(logits.len == ld.len() && out.len == ld.rows(), "argmax shapes");
    let (rows, c) = (ld.rows() as i64, ld.c as i32);
    launch!(be, argmax[logits.dt], be.grid(ld.rows()), &logits.ptr, &rows, &c, &out.ptr);
    Ok(())
}
