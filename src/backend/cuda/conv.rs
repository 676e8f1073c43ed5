//! Launches of kernels/conv.cu (CPU twin: backend/cpu/conv.rs and convt.rs). The argument
//! structs mirror the C structs field for field (#[repr(C)], all 8-byte fields but the
//! trailing f32 pair).

use super::{f32s, launch, same_dt, CudaBackend, DevBuf, Dt};
use crate::backend::cpu::conv::ParityClass;
use crate::backend::{ConvGeom, ConvTGeom};
use crate::tensor::Dims;
use anyhow::{ensure, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

const TILE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct ConvShape([i64; 18]);

#[repr(C)]
struct Fprop {
    s: ConvShape,
    x: u64,
    w: u64,
    bias: u64,
    y: u64,
    m: i64,
    n: i64,
    k: i64,
}

#[repr(C)]
struct Dgrad {
    s: ConvShape,
    dy: u64,
    w: u64,
    dx: u64,
    res: [i64; 3],
    cnt: [i64; 3],
    tapcode: [i64; 3],
    ntaps: [i64; 3],
    m: i64,
    n: i64,
    k: i64,
    beta: f32,
    pad: f32,
}

#[repr(C)]
struct Wgrad {
    s: ConvShape,
    x: u64,
    dy: u64,
    part: u64,
    m: i64,
    n: i64,
    r: i64,
    per_split: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TShape([i64; 9]);

#[repr(C)]
struct TFprop {
    s: TShape,
    x: u64,
    w: u64,
    bias: u64,
    y: u64,
    tap: i64,
    m: i64,
    n: i64,
    k: i64,
}

#[repr(C)]
struct TDgrad {
    s: TShape,
    dy: u64,
    w: u64,
    dx: u64,
    m: i64,
    n: i64,
    k: i64,
    beta: f32,
    pad: f32,
}

#[repr(C)]
struct TWgrad {
    s: TShape,
    x: u64,
    dy: u64,
    part: u64,
    m: i64,
    n: i64,
    r: i64,
    per_split: i64,
}

// SAFETY: plain-old-data mirrors of the kernels' by-value argument structs.
unsafe impl DeviceRepr for Fprop {}
unsafe impl DeviceRepr for Dgrad {}
unsafe impl DeviceRepr for Wgrad {}
unsafe impl DeviceRepr for TFprop {}
unsafe impl DeviceRepr for TDgrad {}
unsafe impl DeviceRepr for TWgrad {}

fn shape(xd: Dims, g: &ConvGeom) -> ConvShape {
    let yd = g.out_dims(xd);
    let (k, s, p) = (g.kernel, g.stride, g.pad());
    let v = [xd.n, xd.d, xd.h, xd.w, xd.c, yd.d, yd.h, yd.w, yd.c, k[0], k[1], k[2], s[0], s[1], s[2], p[0], p[1], p[2]];
    ConvShape(v.map(|x| x as i64))
}

fn tshape(xd: Dims, g: &ConvTGeom) -> TShape {
    let s = g.stride;
    TShape([xd.n, xd.d, xd.h, xd.w, g.cin, g.cout, s[0], s[1], s[2]].map(|x| x as i64))
}

fn tiles(m: usize, n: usize, splits: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (m.div_ceil(TILE) as u32, n.div_ceil(TILE) as u32, splits as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// Split-K factor for a reduction of `r` rows over an m x n output: fill the GPU twice,
/// keep at least 256 rows per split.
fn splits(be: &CudaBackend, m: usize, n: usize, r: usize) -> usize {
    let t = m.div_ceil(TILE) * n.div_ceil(TILE);
    (2 * be.sms()).div_ceil(t).clamp(1, r.div_ceil(256).max(1))
}

/// Most f32 of workspace any op asks for (the workspace grows to the largest request). A
/// weight gradient's split-K partials sp x m x n, where sp <= ceil(2 sms / t) and the t tiles
/// cover m x n, so sp x m x n <= 2 sms TILE^2 + m x n, plus its bias partials 2 sms x cout;
/// the norms' partials (2 sms + n) x c x 3 and the loss's are below the sum of the two.
/// Bf16 uploads and downloads pass through CAST_CHUNK of it.
pub(crate) fn workspace_bound(sms: usize, largest_weight: usize, widest: usize, batch: usize) -> usize {
    let ops = 2 * sms * TILE * TILE + largest_weight + 2 * sms * widest + 3 * (2 * sms + batch) * widest;
    ops.max(super::CAST_CHUNK)
}

/// out = column sums of x ([rows x c]) via per-chunk partials in `ws`.
fn colsum(be: &CudaBackend, x: u64, dt: Dt, rows: usize, c: usize, out: u64, ws: u64) -> Result<()> {
    let chunks = (2 * be.sms()).min(rows.max(1));
    let chunk = rows.div_ceil(chunks).max(1);
    let chunks = rows.div_ceil(chunk).max(1);
    let cfg = LaunchConfig { grid_dim: (chunks as u32, 1, 1), block_dim: (c.clamp(32, 256) as u32, 1, 1), shared_mem_bytes: 0 };
    let (r, cc, ch) = (rows as i64, c as i32, chunk as i64);
    launch!(be, colsum_partial[dt], cfg, &x, &r, &cc, &ch, &ws);
    sum_splits(be, ws, chunks, c, out)
}

fn sum_splits(be: &CudaBackend, part: u64, splits: usize, len: usize, out: u64) -> Result<()> {
    let (s, l) = (splits as i32, len as i64);
    launch!(be, sum_splits_f32, be.grid(len), &part, &s, &l, &out);
    Ok(())
}

pub fn fwd(be: &CudaBackend, x: DevBuf, xd: Dims, w: DevBuf, b: DevBuf, y: DevBuf, g: &ConvGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && y.len == yd.len() && w.len == g.weight_len() && b.len == g.cout, "conv_fwd shapes");
    let dt = same_dt("conv_fwd", &[x, y])?;
    f32s("conv_fwd", &[w, b])?;
    let (m, n, k) = (yd.rows(), g.cout, g.taps() * g.cin);
    let p = Fprop { s: shape(xd, g), x: x.ptr, w: w.ptr, bias: b.ptr, y: y.ptr, m: m as i64, n: n as i64, k: k as i64 };
    launch!(be, conv_fprop[dt], tiles(m, n, 1), &p);
    Ok(())
}

pub fn dgrad(be: &CudaBackend, dy: DevBuf, w: DevBuf, dx: DevBuf, xd: Dims, g: &ConvGeom, beta: f32) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(dy.len == yd.len() && dx.len == xd.len() && w.len == g.weight_len(), "conv_dgrad shapes");
    // The kernel divides by the stride with a shift (exact within a parity class).
    ensure!(g.stride.iter().all(|&s| s == 1 || s == 2), "conv_dgrad: strides must be 1 or 2, got {:?}", g.stride);
    let dt = same_dt("conv_dgrad", &[dy, dx])?;
    f32s("conv_dgrad", &[w])?;
    for class in ParityClass::all(g, xd) {
        let m = class.rows(xd.n);
        if m == 0 {
            continue;
        }
        let ntaps: [usize; 3] = std::array::from_fn(|a| class.taps[a].len());
        let tapcode = class.taps.clone().map(|t| t.iter().enumerate().map(|(i, &v)| (v as i64) << (2 * i)).sum::<i64>());
        let k = ntaps.iter().product::<usize>() * g.cout;
        let arg = Dgrad {
            s: shape(xd, g),
            dy: dy.ptr,
            w: w.ptr,
            dx: dx.ptr,
            res: class.residue.map(|v| v as i64),
            cnt: class.counts.map(|v| v as i64),
            tapcode,
            ntaps: ntaps.map(|v| v as i64),
            m: m as i64,
            n: g.cin as i64,
            k: k as i64,
            beta,
            pad: 0.0,
        };
        launch!(be, conv_dgrad[dt], tiles(m, g.cin, 1), &arg);
    }
    Ok(())
}

pub fn wgrad(be: &CudaBackend, x: DevBuf, xd: Dims, dy: DevBuf, dw: DevBuf, db: DevBuf, g: &ConvGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && dy.len == yd.len() && dw.len == g.weight_len() && db.len == g.cout, "conv_wgrad shapes");
    let dt = same_dt("conv_wgrad", &[x, dy])?;
    f32s("conv_wgrad", &[dw, db])?;
    let (m, n, r) = (g.taps() * g.cin, g.cout, yd.rows());
    let sp = splits(be, m, n, r);
    let ws = be.scratch(sp * m * n + 2 * be.sms() * n)?;
    let arg = Wgrad { s: shape(xd, g), x: x.ptr, dy: dy.ptr, part: ws, m: m as i64, n: n as i64, r: r as i64, per_split: r.div_ceil(sp) as i64 };
    launch!(be, conv_wgrad[dt], tiles(m, n, sp), &arg);
    sum_splits(be, ws, sp, m * n, dw.ptr)?;
    colsum(be, dy.ptr, dt, r, n, db.ptr, ws + 4 * (sp * m * n) as u64)
}

pub fn t_fwd(be: &CudaBackend, x: DevBuf, xd: Dims, w: DevBuf, b: DevBuf, y: DevBuf, g: &ConvTGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && y.len == yd.len() && w.len == g.weight_len() && b.len == g.cout, "convt_fwd shapes");
    let dt = same_dt("convt_fwd", &[x, y])?;
    f32s("convt_fwd", &[w, b])?;
    let m = xd.rows();
    for tap in 0..g.taps() {
        let arg = TFprop { s: tshape(xd, g), x: x.ptr, w: w.ptr, bias: b.ptr, y: y.ptr, tap: tap as i64, m: m as i64, n: g.cout as i64, k: g.cin as i64 };
        launch!(be, convt_fprop[dt], tiles(m, g.cout, 1), &arg);
    }
    Ok(())
}

pub fn t_dgrad(be: &CudaBackend, dy: DevBuf, w: DevBuf, dx: DevBuf, xd: Dims, g: &ConvTGeom, beta: f32) -> Result<()> {
    ensure!(dy.len == g.out_dims(xd).len() && dx.len == xd.len() && w.len == g.weight_len(), "convt_dgrad shapes");
    let dt = same_dt("convt_dgrad", &[dy, dx])?;
    f32s("convt_dgrad", &[w])?;
    let m = xd.rows();
    let arg = TDgrad { s: tshape(xd, g), dy: dy.ptr, w: w.ptr, dx: dx.ptr, m: m as i64, n: g.cin as i64, k: (g.taps() * g.cout) as i64, beta, pad: 0.0 };
    launch!(be, convt_dgrad[dt], tiles(m, g.cin, 1), &arg);
    Ok(())
}

pub fn t_wgrad(be: &CudaBackend, x: DevBuf, xd: Dims, dy: DevBuf, dw: DevBuf, db: DevBuf, g: &ConvTGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && dy.len == yd.len() && dw.len == g.weight_len() && db.len == g.cout, "convt_wgrad shapes");
    let dt = same_dt("convt_wgrad", &[x, dy])?;
    f32s("convt_wgrad", &[dw, db])?;
    let (m, n, r) = (g.cin, g.taps() * g.cout, xd.rows());
    let sp = splits(be, m, n, r);
    let ws = be.scratch(sp * m * n + 2 * be.sms() * g.cout)?;
    let arg = TWgrad { s: tshape(xd, g), x: x.ptr, dy: dy.ptr, part: ws, m: m as i64, n: n as i64, r: r as i64, per_split: r.div_ceil(sp) as i64 };
    launch!(be, convt_wgrad[dt], tiles(m, n, sp), &arg);
    sum_splits(be, ws, sp, m * n, dw.ptr)?;
    colsum(be, dy.ptr, dt, yd.rows(), g.cout, db.ptr, ws + 4 * (sp * m * n) as u64)
}
