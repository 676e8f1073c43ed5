//! A backend wrapper that times every op (synchronising the device around each one), for
//! `segk bench step --profile`: where a step's time goes, op family by op family.

use super::{Act, Backend, ConvGeom, ConvTGeom, DiceMode, RegionMasks, SgdParams};
use crate::tensor::Dims;
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

pub struct Profiled<'a, B: Backend> {
    pub inner: &'a B,
    times: Mutex<BTreeMap<&'static str, (f64, usize, f64)>>,
}

impl<'a, B: Backend> Profiled<'a, B> {
    pub fn new(inner: &'a B) -> Self {
        Profiled { inner, times: Mutex::new(BTreeMap::new()) }
    }
    fn time<R>(&self, op: &'static str, flops: f64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.inner.sync()?;
        let t0 = Instant::now();
        let r = f()?;
        self.inner.sync()?;
        let dt = t0.elapsed().as_secs_f64();
        let mut m = self.times.lock().expect("profile lock");
        let e = m.entry(op).or_insert((0.0, 0, 0.0));
        e.0 += dt;
        e.1 += 1;
        e.2 += flops;
        Ok(r)
    }
    pub fn reset(&self) {
        self.times.lock().expect("profile lock").clear();
    }
    /// (op, seconds, calls, GFLOP/s where counted), slowest first.
    pub fn table(&self) -> Vec<(&'static str, f64, usize, Option<f64>)> {
        let m = self.times.lock().expect("profile lock");
        let mut v: Vec<_> = m.iter().map(|(k, &(t, n, f))| (*k, t, n, (f > 0.0).then(|| f / t / 1e9))).collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("finite"));
        v
    }
}

impl<B: Backend> Backend for Profiled<'_, B> {
    type Buf = B::Buf;
    type LabelBuf = B::LabelBuf;
    type Arena = B::Arena;
    type LabelArena = B::LabelArena;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn computes_on_host_threads(&self) -> bool {
        self.inner.computes_on_host_threads()
    }
    fn memory_available(&self) -> Option<u64> {
        self.inner.memory_available()
    }
    fn alloc(&self, len: usize) -> Result<B::Arena> {
        self.inner.alloc(len)
    }
    fn alloc_act(&self, len: usize) -> Result<B::Arena> {
        self.inner.alloc_act(len)
    }
    fn act_bytes(&self) -> usize {
        self.inner.act_bytes()
    }
    fn view(&self, a: &B::Arena, o: usize, l: usize) -> B::Buf {
        self.inner.view(a, o, l)
    }
    fn alloc_labels(&self, len: usize) -> Result<B::LabelArena> {
        self.inner.alloc_labels(len)
    }
    fn label_view(&self, a: &B::LabelArena, o: usize, l: usize) -> B::LabelBuf {
        self.inner.label_view(a, o, l)
    }
    fn elem_bytes(&self) -> usize {
        self.inner.elem_bytes()
    }
    fn upload(&self, d: B::Buf, s: &[f32]) -> Result<()> {
        self.time("upload", 0.0, || self.inner.upload(d, s))
    }
    fn download(&self, s: B::Buf, d: &mut [f32]) -> Result<()> {
        self.time("download", 0.0, || self.inner.download(s, d))
    }
    fn download_exact(&self, s: B::Buf, len: usize) -> Result<Vec<f64>> {
        self.time("download", 0.0, || self.inner.download_exact(s, len))
    }
    fn upload_labels(&self, d: B::LabelBuf, s: &[u8]) -> Result<()> {
        self.time("upload", 0.0, || self.inner.upload_labels(d, s))
    }
    fn download_labels(&self, s: B::LabelBuf, d: &mut [u8]) -> Result<()> {
        self.time("download", 0.0, || self.inner.download_labels(s, d))
    }
    fn fill(&self, d: B::Buf, v: f32) -> Result<()> {
        self.time("fill", 0.0, || self.inner.fill(d, v))
    }
    fn copy(&self, d: B::Buf, s: B::Buf) -> Result<()> {
        self.time("copy", 0.0, || self.inner.copy(d, s))
    }
    fn copy_labels(&self, d: B::LabelBuf, s: B::LabelBuf) -> Result<()> {
        self.time("copy", 0.0, || self.inner.copy_labels(d, s))
    }
    fn host_memory(&self) -> std::sync::Arc<dyn crate::hostmem::HostAlloc> {
        self.inner.host_memory()
    }
    unsafe fn stage(&self, d: B::Buf, s: &[f32], ld: B::LabelBuf, ls: &[u8]) -> Result<()> {
        // SAFETY: the caller's promise passes through unchanged.
        self.time("upload", 0.0, || unsafe { self.inner.stage(d, s, ld, ls) })
    }
    fn take_staged(&self, s: B::Buf, d: B::Buf, ls: B::LabelBuf, ld: B::LabelBuf) -> Result<()> {
        self.time("copy", 0.0, || self.inner.take_staged(s, d, ls, ld))
    }
    fn sync_staged(&self) -> Result<()> {
        self.inner.sync_staged()
    }
    fn memory_used(&self) -> Option<u64> {
        self.inner.memory_used()
    }
    fn workspace_bytes(&self, largest_weight: usize, widest: usize, batch: usize) -> usize {
        self.inner.workspace_bytes(largest_weight, widest, batch)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn conv_fwd(&self, x: B::Buf, xd: Dims, w: B::Buf, b: B::Buf, y: B::Buf, g: &ConvGeom) -> Result<()> {
        self.time("conv_fwd", g.flops(xd), || self.inner.conv_fwd(x, xd, w, b, y, g))
    }
    fn conv_dgrad(&self, dy: B::Buf, w: B::Buf, dx: B::Buf, xd: Dims, g: &ConvGeom, beta: f32) -> Result<()> {
        self.time("conv_dgrad", g.flops(xd), || self.inner.conv_dgrad(dy, w, dx, xd, g, beta))
    }
    fn conv_wgrad(&self, x: B::Buf, xd: Dims, dy: B::Buf, dw: B::Buf, db: B::Buf, g: &ConvGeom) -> Result<()> {
        self.time("conv_wgrad", g.flops(xd), || self.inner.conv_wgrad(x, xd, dy, dw, db, g))
    }
    fn convt_fwd(&self, x: B::Buf, xd: Dims, w: B::Buf, b: B::Buf, y: B::Buf, g: &ConvTGeom) -> Result<()> {
        self.time("convt_fwd", g.flops(xd), || self.inner.convt_fwd(x, xd, w, b, y, g))
    }
    fn convt_dgrad(&self, dy: B::Buf, w: B::Buf, dx: B::Buf, xd: Dims, g: &ConvTGeom, beta: f32) -> Result<()> {
        self.time("convt_dgrad", g.flops(xd), || self.inner.convt_dgrad(dy, w, dx, xd, g, beta))
    }
    fn convt_wgrad(&self, x: B::Buf, xd: Dims, dy: B::Buf, dw: B::Buf, db: B::Buf, g: &ConvTGeom) -> Result<()> {
        self.time("convt_wgrad", g.flops(xd), || self.inner.convt_wgrad(x, xd, dy, dw, db, g))
    }
    fn norm_stats(&self, x: B::Buf, xd: Dims, m: B::Buf, r: B::Buf) -> Result<()> {
        self.time("norm_stats", 0.0, || self.inner.norm_stats(x, xd, m, r))
    }
    fn norm_fwd(&self, x: B::Buf, xd: Dims, m: B::Buf, r: B::Buf, g: B::Buf, b: B::Buf, res: Option<B::Buf>, act: Act, y: B::Buf) -> Result<()> {
        let name = match (res.is_some(), act) {
            (false, Act::LeakyRelu) => "norm_act_fwd",
            (false, Act::Identity) => "norm_fwd",
            (true, _) => "norm_add_act_fwd",
        };
        self.time(name, 0.0, || self.inner.norm_fwd(x, xd, m, r, g, b, res, act, y))
    }
    fn norm_bwd(&self, dy: B::Buf, x: B::Buf, xd: Dims, m: B::Buf, r: B::Buf, g: B::Buf, b: B::Buf, act: Act, dx: B::Buf, dg: B::Buf, db: B::Buf) -> Result<()> {
        let name = if act == Act::LeakyRelu { "norm_act_bwd" } else { "norm_bwd" };
        self.time(name, 0.0, || self.inner.norm_bwd(dy, x, xd, m, r, g, b, act, dx, dg, db))
    }
    fn leaky_bwd(&self, dy: B::Buf, y: B::Buf, dx: B::Buf) -> Result<()> {
        self.time("leaky_bwd", 0.0, || self.inner.leaky_bwd(dy, y, dx))
    }
    fn avg_pool(&self, x: B::Buf, xd: Dims, k: [usize; 3], y: B::Buf) -> Result<()> {
        self.time("avg_pool", 0.0, || self.inner.avg_pool(x, xd, k, y))
    }
    fn avg_pool_bwd(&self, dy: B::Buf, k: [usize; 3], dx: B::Buf, xd: Dims, beta: f32) -> Result<()> {
        self.time("avg_pool_bwd", 0.0, || self.inner.avg_pool_bwd(dy, k, dx, xd, beta))
    }
    fn concat(&self, a: B::Buf, ca: usize, b: B::Buf, cb: usize, rows: usize, o: B::Buf) -> Result<()> {
        self.time("concat", 0.0, || self.inner.concat(a, ca, b, cb, rows, o))
    }
    fn concat_bwd(&self, d: B::Buf, ca: usize, cb: usize, rows: usize, da: B::Buf, db: B::Buf, beta: f32) -> Result<()> {
        self.time("concat_bwd", 0.0, || self.inner.concat_bwd(d, ca, cb, rows, da, db, beta))
    }
    fn downsample_labels(&self, s: B::LabelBuf, sd: Dims, d: B::LabelBuf, dd: Dims) -> Result<()> {
        self.time("downsample_labels", 0.0, || self.inner.downsample_labels(s, sd, d, dd))
    }
    fn softmax_dice_ce(&self, l: B::Buf, ld: Dims, lab: B::LabelBuf, mode: DiceMode, ignore: bool, w: f64, record: B::Buf) -> Result<()> {
        self.time("softmax_dice_ce", 0.0, || self.inner.softmax_dice_ce(l, ld, lab, mode, ignore, w, record))
    }
    fn sigmoid_dice_bce(&self, l: B::Buf, ld: Dims, lab: B::LabelBuf, regions: &RegionMasks, mode: DiceMode, ignore: bool, w: f64, record: B::Buf) -> Result<()> {
        self.time("sigmoid_dice_bce", 0.0, || self.inner.sigmoid_dice_bce(l, ld, lab, regions, mode, ignore, w, record))
    }
    fn argmax(&self, l: B::Buf, ld: Dims, o: B::LabelBuf) -> Result<()> {
        self.time("argmax", 0.0, || self.inner.argmax(l, ld, o))
    }
    fn region_bits(&self, l: B::Buf, ld: Dims, o: B::LabelBuf) -> Result<()> {
        self.time("region_bits", 0.0, || self.inner.region_bits(l, ld, o))
    }
    fn sum_squares(&self, x: B::Buf, out: B::Buf) -> Result<()> {
        self.time("sum_squares", 0.0, || self.inner.sum_squares(x, out))
    }
    fn sgd_update(&self, p: B::Buf, g: B::Buf, m: B::Buf, sp: &SgdParams, guard: B::Buf) -> Result<()> {
        self.time("sgd_update", 0.0, || self.inner.sgd_update(p, g, m, sp, guard))
    }
}
