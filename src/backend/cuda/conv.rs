//! Launches of kernels/conv.cu (CPU twin: backend/cpu/conv.rs and convt.rs). The argument
//! structs mirror the C structs field for field (#[repr(C)], all 8-byte fields but the
//! trailing f32 pair).

use super::{f32s, launch, same_dt, CudaBackend, DevBuf, Dt, Kernels};
use crate::backend::cpu::conv::ParityClass;
use crate::backend::{ConvGeom, ConvTGeom};
use crate::tensor::Dims;
use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

const TILE: usize = 64;

// The pipelined kernels (kernels/conv_pipe.cu): tiles of PIPE_ROWS x 32, 64 or 128, PIPE_STAGES
// stages of PIPE_K, and PIPE_CTX bytes of contexts: the dynamic shared memory PTile::SMEM asks
// for (the kernels trap if a launch gives them less).
const PIPE_ROWS: usize = 128;
const PIPE_STAGES: usize = 4;
const PIPE_K: usize = 32;
const PIPE_CTX: usize = 2048;
const PIPE_WIDTHS: [usize; 3] = [32, 64, 128];

/// `SEGK_CONV`: `pipe` (default) or `simple` (every convolution on the simple kernels).
pub(crate) fn pipe_from_env() -> Result<bool> {
    match std::env::var("SEGK_CONV").ok().as_deref() {
        None | Some("") | Some("pipe") => Ok(true),
        Some("simple") => Ok(false),
        Some(other) => bail!("SEGK_CONV must be pipe or simple, got {other:?}"),
    }
}

/// The narrowest pipelined tile width that covers `n` columns of C (up to 128; wider C takes
/// several tiles), as its index in PIPE_WIDTHS.
fn pipe_width(n: usize) -> usize {
    PIPE_WIDTHS.iter().position(|&w| n <= w).unwrap_or(PIPE_WIDTHS.len() - 1)
}

fn pipe_smem(width: usize) -> usize {
    PIPE_STAGES * (PIPE_ROWS + width) * PIPE_K * 2 + PIPE_CTX
}

fn pipe_tiles(m: usize, n: usize, splits: usize) -> LaunchConfig {
    let w = PIPE_WIDTHS[pipe_width(n)];
    LaunchConfig { grid_dim: (m.div_ceil(PIPE_ROWS) as u32, n.div_ceil(w) as u32, splits as u32), block_dim: (2 * w as u32, 1, 1), shared_mem_bytes: pipe_smem(w) as u32 }
}

/// The 128-wide tiles need more than the 48 KiB of shared memory a kernel gets unasked.
pub(crate) fn allow_pipe_shared_memory(k: &Kernels) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN;
    for pass in [&k.conv_fprop_pipe, &k.conv_dgrad_pipe, &k.conv_wgrad_pipe, &k.convt_fprop_pipe, &k.convt_dgrad_pipe, &k.convt_wgrad_pipe] {
        for (f, w) in pass.iter().zip(PIPE_WIDTHS) {
            f.set_attribute(MAX_DYN, pipe_smem(w) as i32).map_err(|e| anyhow!("allowing {} bytes of shared memory to the pipelined convolutions: {e}", pipe_smem(w)))?;
        }
    }
    Ok(())
}

/// Whether a convolution pass may take the pipelined kernels: bf16 activations read as 16-byte
/// groups (16-byte aligned, the grouped channel counts multiples of 8) and addressed with 32-bit
/// offsets: every offset a gather forms, `reach` values past a tensor's start at most, below 2^31.
fn pipe_ok(be: &CudaBackend, dt: Dt, channels: &[usize], gathered: &[(DevBuf, usize)]) -> bool {
    be.conv_pipe && dt == Dt::Bf16 && channels.iter().all(|c| c % 8 == 0) && gathered.iter().all(|(b, reach)| b.ptr % 16 == 0 && b.len.max(*reach) < 1 << 31)
}

/// A bf16 copy of f32 weights in the workspace, for the pipelined kernels' 16-byte copies.
fn bf16_weights(be: &CudaBackend, w: DevBuf) -> Result<u64> {
    let ws = be.scratch(w.len.div_ceil(2))?;
    be.cast(w.ptr, Dt::F32, ws, Dt::Bf16, w.len)?;
    Ok(ws)
}

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

/// The launch of a weight gradient: an m x n output over the pipelined or the simple tiles,
/// its reduction of `r` rows split (grid z) so that the GPU fills twice, at least 256 rows per
/// split. Returns the launch and the split count.
fn split_k(be: &CudaBackend, pipe: bool, m: usize, n: usize, r: usize) -> (LaunchConfig, usize) {
    let cfg = if pipe { pipe_tiles(m, n, 1) } else { tiles(m, n, 1) };
    let t = (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
    let sp = (2 * be.sms()).div_ceil(t).clamp(1, r.div_ceil(256).max(1));
    (LaunchConfig { grid_dim: (cfg.grid_dim.0, cfg.grid_dim.1, sp as u32), ..cfg }, sp)
}

/// Most f32 of workspace any op asks for (the workspace grows to the largest request). A
/// weight gradient's split-K partials sp x m x n, where sp <= ceil(2 sms / t) and the t tiles
/// cover m x n with tiles of at most 128 x 128, so sp x m x n <= 2 sms 128^2 + m x n, plus its
/// bias partials 4 sms x cout;
/// the norms' partials (4 sms + n) x c x 3 and the loss's are below the sum of the two.
/// Bf16 uploads and downloads pass through CAST_CHUNK of it.
pub(crate) fn workspace_bound(sms: usize, largest_weight: usize, widest: usize, batch: usize) -> usize {
    let ops = 2 * sms * PIPE_ROWS * 128 + largest_weight + 4 * sms * widest + 3 * (4 * sms + batch) * widest;
    ops.max(super::CAST_CHUNK)
}

/// out = column sums of x ([rows x c]) via per-chunk partials in `ws`: about four blocks of 256
/// per SM, each a chunk of rows, 8 channels per thread with 16-byte loads where c allows.
fn colsum(be: &CudaBackend, x: u64, dt: Dt, rows: usize, c: usize, out: u64, ws: u64) -> Result<()> {
    let chunks = (4 * be.sms()).min(rows.max(1));
    let chunk = rows.div_ceil(chunks).max(1);
    let chunks = rows.div_ceil(chunk).max(1);
    let cfg = LaunchConfig { grid_dim: (chunks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (r, cc, ch) = (rows as i64, c as i32, chunk as i64);
    if c % 8 == 0 && x % 16 == 0 {
        launch!(be, colsum_partial8[dt], cfg, &x, &r, &cc, &ch, &ws);
    } else {
        launch!(be, colsum_partial[dt], cfg, &x, &r, &cc, &ch, &ws);
    }
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
    if pipe_ok(be, dt, &[g.cin, g.cout], &[(x, x.len)]) {
        let wb = bf16_weights(be, w)?;
        launch!(be, conv_fprop_pipe @ pipe_width(n), pipe_tiles(m, n, 1), &p, &wb);
    } else {
        launch!(be, conv_fprop[dt], tiles(m, n, 1), &p);
    }
    Ok(())
}

pub fn dgrad(be: &CudaBackend, dy: DevBuf, w: DevBuf, dx: DevBuf, xd: Dims, g: &ConvGeom, beta: f32) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(dy.len == yd.len() && dx.len == xd.len() && w.len == g.weight_len(), "conv_dgrad shapes");
    // The kernel divides by the stride with a shift (exact within a parity class).
    ensure!(g.stride.iter().all(|&s| s == 1 || s == 2), "conv_dgrad: strides must be 1 or 2, got {:?}", g.stride);
    let dt = same_dt("conv_dgrad", &[dy, dx])?;
    f32s("conv_dgrad", &[w])?;
    // The dgrad rows index dy by a voxel's place in its parity class, which may run past dy's
    // extent along an axis where the class is longer than the output (valid padding).
    let (out, inp) = ([yd.d, yd.h, yd.w], [xd.d, xd.h, xd.w]);
    let reach = (0..3).map(|a| out[a].max(inp[a].div_ceil(g.stride[a]))).product::<usize>() * xd.n * g.cout;
    let pipe = pipe_ok(be, dt, &[g.cout], &[(dy, reach)]);
    let wb = if pipe { bf16_weights(be, w)? } else { 0 };
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
        if pipe {
            launch!(be, conv_dgrad_pipe @ pipe_width(g.cin), pipe_tiles(m, g.cin, 1), &arg, &wb);
        } else {
            launch!(be, conv_dgrad[dt], tiles(m, g.cin, 1), &arg);
        }
    }
    Ok(())
}

pub fn wgrad(be: &CudaBackend, x: DevBuf, xd: Dims, dy: DevBuf, dw: DevBuf, db: DevBuf, g: &ConvGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && dy.len == yd.len() && dw.len == g.weight_len() && db.len == g.cout, "conv_wgrad shapes");
    let dt = same_dt("conv_wgrad", &[x, dy])?;
    f32s("conv_wgrad", &[dw, db])?;
    let (m, n, r) = (g.taps() * g.cin, g.cout, yd.rows());
    let pipe = pipe_ok(be, dt, &[g.cin, g.cout], &[(x, x.len), (dy, dy.len)]);
    let (cfg, sp) = split_k(be, pipe, m, n, r);
    let ws = be.scratch(sp * m * n + 4 * be.sms() * n)?;
    let arg = Wgrad { s: shape(xd, g), x: x.ptr, dy: dy.ptr, part: ws, m: m as i64, n: n as i64, r: r as i64, per_split: r.div_ceil(sp) as i64 };
    if pipe {
        launch!(be, conv_wgrad_pipe @ pipe_width(n), cfg, &arg);
    } else {
        launch!(be, conv_wgrad[dt], cfg, &arg);
    }
    sum_splits(be, ws, sp, m * n, dw.ptr)?;
    colsum(be, dy.ptr, dt, r, n, db.ptr, ws + 4 * (sp * m * n) as u64)
}

pub fn t_fwd(be: &CudaBackend, x: DevBuf, xd: Dims, w: DevBuf, b: DevBuf, y: DevBuf, g: &ConvTGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && y.len == yd.len() && w.len == g.weight_len() && b.len == g.cout, "convt_fwd shapes");
    let dt = same_dt("convt_fwd", &[x, y])?;
    f32s("convt_fwd", &[w, b])?;
    let m = xd.rows();
    let pipe = pipe_ok(be, dt, &[g.cin, g.cout], &[(x, x.len)]);
    let wb = if pipe { bf16_weights(be, w)? } else { 0 };
    for tap in 0..g.taps() {
        let arg = TFprop { s: tshape(xd, g), x: x.ptr, w: w.ptr, bias: b.ptr, y: y.ptr, tap: tap as i64, m: m as i64, n: g.cout as i64, k: g.cin as i64 };
        if pipe {
            launch!(be, convt_fprop_pipe @ pipe_width(g.cout), pipe_tiles(m, g.cout, 1), &arg, &wb);
        } else {
            launch!(be, convt_fprop[dt], tiles(m, g.cout, 1), &arg);
        }
    }
    Ok(())
}

pub fn t_dgrad(be: &CudaBackend, dy: DevBuf, w: DevBuf, dx: DevBuf, xd: Dims, g: &ConvTGeom, beta: f32) -> Result<()> {
    ensure!(dy.len == g.out_dims(xd).len() && dx.len == xd.len() && w.len == g.weight_len(), "convt_dgrad shapes");
    let dt = same_dt("convt_dgrad", &[dy, dx])?;
    f32s("convt_dgrad", &[w])?;
    let m = xd.rows();
    let arg = TDgrad { s: tshape(xd, g), dy: dy.ptr, w: w.ptr, dx: dx.ptr, m: m as i64, n: g.cin as i64, k: (g.taps() * g.cout) as i64, beta, pad: 0.0 };
    if pipe_ok(be, dt, &[g.cout], &[(dy, dy.len)]) {
        let wb = bf16_weights(be, w)?;
        launch!(be, convt_dgrad_pipe @ pipe_width(g.cin), pipe_tiles(m, g.cin, 1), &arg, &wb);
    } else {
        launch!(be, convt_dgrad[dt], tiles(m, g.cin, 1), &arg);
    }
    Ok(())
}

pub fn t_wgrad(be: &CudaBackend, x: DevBuf, xd: Dims, dy: DevBuf, dw: DevBuf, db: DevBuf, g: &ConvTGeom) -> Result<()> {
    let yd = g.out_dims(xd);
    ensure!(x.len == xd.len() && dy.len == yd.len() && dw.len == g.weight_len() && db.len == g.cout, "convt_wgrad shapes");
    let dt = same_dt("convt_wgrad", &[x, dy])?;
    f32s("convt_wgrad", &[dw, db])?;
    let (m, n, r) = (g.cin, g.taps() * g.cout, xd.rows());
    let pipe = pipe_ok(be, dt, &[g.cin, g.cout], &[(x, x.len), (dy, dy.len)]);
    let (cfg, sp) = split_k(be, pipe, m, n, r);
    let ws = be.scratch(sp * m * n + 4 * be.sms() * g.cout)?;
    let arg = TWgrad { s: tshape(xd, g), x: x.ptr, dy: dy.ptr, part: ws, m: m as i64, n: n as i64, r: r as i64, per_split: r.div_ceil(sp) as i64 };
    if pipe {
        launch!(be, convt_wgrad_pipe @ pipe_width(n), cfg, &arg);
    } else {
        launch!(be, convt_wgrad[dt], cfg, &arg);
    }
    sum_splits(be, ws, sp, m * n, dw.ptr)?;
    colsum(be, dy.ptr, dt, yd.rows(), g.cout, db.ptr, ws + 4 * (sp * m * n) as u64)
}
