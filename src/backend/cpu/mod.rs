//! CPU backend: the reference for every kernel and a real way to train without a GPU.
//! Generic over f32 (training) and f64 (gradient checks). Multithreaded with rayon; the
//! convolutions are tiled implicit GEMMs on the gemm crate's kernels.

pub mod bf16;
pub mod conv;
pub mod convt;
pub mod loss;
pub mod misc;
pub mod norm;
pub mod optim;
pub mod pool;

use super::{Act, Backend, ConvGeom, ConvTGeom, DiceMode, RegionMasks, SgdParams, LOSS_RECORD};
use crate::tensor::Dims;
use anyhow::Result;
use std::marker::PhantomData;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The element types the CPU backend computes in.
pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// C = alpha * A B + beta * C with arbitrary row/column strides (the gemm crate, which
    /// picks AVX2/AVX-512 kernels at run time).
    ///
    /// # Safety
    /// The pointers must address the m x k, k x n and m x n matrices their strides describe.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize, k: usize, n: usize, alpha: Self,
        a: *const Self, rsa: isize, csa: isize,
        b: *const Self, rsb: isize, csb: isize,
        beta: Self, c: *mut Self, rsc: isize, csc: isize,
    );
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            unsafe fn gemm(
                m: usize, k: usize, n: usize, alpha: Self,
                a: *const Self, rsa: isize, csa: isize,
                b: *const Self, rsb: isize, csb: isize,
                beta: Self, c: *mut Self, rsc: isize, csc: isize,
            ) {
                // gemm computes dst = alpha*dst + beta*lhs*rhs (dst unread when read_dst is
                // false), strides given (column, row). Single-threaded: callers parallelise.
                gemm::gemm(m, n, k, c, csc, rsc, beta != 0.0, a, csa, rsa, b, csb, rsb, beta, alpha, false, false, false, gemm::Parallelism::None)
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// What the convolutions' GEMMs multiply: values in the working precision, or values
/// rounded to bf16 and multiplied on AVX512-BF16 with f32 sums (f32 only; `bf16::available`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Operands {
    #[default]
    Working,
    Bf16,
}

/// C = A B + beta C with C row-major (row stride `rsc`), A and B at any strides, products
/// as `ops` says; bf16 falls back to the working precision where it cannot run.
///
/// # Safety
/// The pointers must address the m x k, k x n and m x n matrices their strides describe.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm<T: Float>(
    ops: Operands, m: usize, k: usize, n: usize,
    a: *const T, rsa: isize, csa: isize,
    b: *const T, rsb: isize, csb: isize,
    beta: T, c: *mut T, rsc: isize,
) {
    if bf16_isa::<T>(ops).is_some() {
        // T is f32 here: the casts change nothing.
        return bf16::gemm(m, k, n, a.cast(), rsa, csa, b.cast(), rsb, csb, beta.to_f64() as f32, c.cast(), rsc);
    }
    T::gemm(m, k, n, T::ONE, a, rsa, csa, b, rsb, csb, beta, c, rsc, 1)
}

impl Operands {
    /// What a layer of `cin` -> `cout` channels multiplies: the input convolutions (cin < 8)
    /// and the segmentation heads (cout < 16) stay in the working precision. They are a few
    /// per cent of the work, gain little (a 32-column kernel on 1-3 columns), and sit next to
    /// the numbers users read: in bf16 they moved nnU-Net models' probabilities by 1.6e-2.
    pub fn for_layer(self, cin: usize, cout: usize) -> Operands {
        if cin < 8 || cout < 16 {
            Operands::Working
        } else {
            self
        }
    }
}

/// The bf16 instructions when `ops` asks for bf16 and `T` is f32 (what they take).
pub(crate) fn bf16_isa<T: Float>(ops: Operands) -> Option<bf16::Isa> {
    let f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    if ops == Operands::Bf16 && f32 {
        bf16::isa()
    } else {
        None
    }
}

/// `s` as f32, for callers that checked `T` is f32 (`bf16_isa`).
pub(crate) fn as_f32<T: Float>(s: &[T]) -> &[f32] {
    assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
    // SAFETY: T is f32.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// `s` as mutable f32, for callers that checked `T` is f32.
pub(crate) fn as_f32_mut<T: Float>(s: &mut [T]) -> &mut [f32] {
    assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
    // SAFETY: T is f32.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// Row-major C[m x n] (+)= A[m x k] B[k x n] on contiguous slices.
pub fn gemm_rm<T: Float>(ops: Operands, m: usize, k: usize, n: usize, a: &[T], b: &[T], beta: T, c: &mut [T]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds checked above; row-major strides.
    unsafe { mm(ops, m, k, n, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, beta, c.as_mut_ptr(), n as isize) }
}

/// d = beta * d + v, where beta = 0 never reads d (so stale NaNs cannot leak in).
#[inline]
pub(crate) fn axpby<T: Float>(d: &mut T, beta: T, v: T) {
    *d = if beta == T::ZERO { v } else { beta * *d + v };
}

/// A raw pointer that may cross threads: ops write disjoint rows through it.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// The row slice at `offset` (in elements).
    ///
    /// # Safety
    /// The caller owns those elements exclusively for the slice's lifetime.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows<'a>(&self, offset: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// Worker threads of the rayon pool.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Splits `total` rows into chunks of at most `max_rows` (at least `min_rows`) so that every
/// thread gets about `per_thread` chunks.
pub(crate) fn chunk_rows(total: usize, per_thread: usize, min_rows: usize, max_rows: usize) -> usize {
    let want = total.div_ceil(threads() * per_thread).max(1);
    want.clamp(min_rows.min(max_rows), max_rows).max(1)
}

/// View of CPU memory: a pointer and a length. Copy, like a device pointer.
pub struct CpuBuf<T> {
    ptr: *mut T,
    len: usize,
    /// Values stored here are rounded to bf16 (activation memory of a bf16-storage backend).
    bf16: bool,
}
impl<T> Clone for CpuBuf<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for CpuBuf<T> {}
unsafe impl<T: Send> Send for CpuBuf<T> {}
unsafe impl<T: Sync> Sync for CpuBuf<T> {}

impl<T> CpuBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// # Safety
    /// No live mutable view may overlap this one.
    pub unsafe fn slice<'a>(self) -> &'a [T] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
    /// # Safety
    /// No other live view may overlap this one.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

/// The CPU backend, computing in `T`.
#[derive(Default)]
pub struct CpuBackend<T: Float> {
    _t: PhantomData<T>,
    /// The batch of the last `stage`, read only at `take_staged`, as a copy engine would read
    /// it late: a caller that reuses the host memory too early gets wrong data here too.
    staged: std::sync::Mutex<Option<Staged>>,
    /// Round the convolutions' operands to bf16 first, as the GPU's tensor-core path does.
    bf16_operands: bool,
    /// Activation arenas store bf16-rounded values, as the GPU's default storage does.
    bf16_storage: bool,
    /// Convolutions multiply on AVX512-BF16 (bf16 operands, f32 sums).
    bf16_products: bool,
}

/// CPU memory of one kind: values, and whether they are stored rounded to bf16.
pub struct CpuArena<T> {
    data: Vec<T>,
    bf16: bool,
}

impl<T> std::ops::Deref for CpuArena<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

/// Direct access for tests and tools; values written this way are not rounded.
impl<T> std::ops::DerefMut for CpuArena<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

/// `v` rounded to the nearest bf16 (ties to even) through f32, as the GPU rounds its f32
/// results. Not `bf16::from_f64`: half 2.7 misrounds f64 values just above a tie (e.g. the f32
/// 0x408E8006 becomes 0x408E, not 0x408F; half-rs issue #151), which made this reference
/// disagree with the device on a few elements in ten thousand.
fn round_bf16<T: Float>(v: T) -> T {
    T::from_f64(half::bf16::from_f32(v.to_f64() as f32).to_f64())
}

/// Host memory promised by the caller of `stage` until the next `take_staged`.
struct Staged {
    image: *const f32,
    image_len: usize,
    labels: *const u8,
    labels_len: usize,
}
// SAFETY: the pointers are only read, under `stage`'s contract.
unsafe impl Send for Staged {}

impl<T: Float> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend { _t: PhantomData, staged: Default::default(), bf16_operands: false, bf16_storage: false, bf16_products: false }
    }

    /// The reference for the GPU's default precision: bf16 conv operands (as
    /// `with_bf16_operands`) and activation arenas whose values every op stores rounded to
    /// bf16, computing in `T` in between, as the kernels compute in f32.
    pub fn with_bf16_storage() -> Self {
        CpuBackend { bf16_operands: true, bf16_storage: true, ..Self::new() }
    }

    /// Rounds what an op stored into bf16 activation views.
    fn stored(&self, outs: &[CpuBuf<T>]) {
        for o in outs.iter().filter(|o| o.bf16) {
            // SAFETY: the op that wrote `o` has returned; no other view of it is live.
            unsafe { o.slice_mut() }.iter_mut().for_each(|v| *v = round_bf16(*v));
        }
    }

    /// A backend whose convolutions (and transposed convolutions) first round their operands
    /// (activations, weights, output gradients) to bf16 and then compute exactly in `T`, as
    /// the CUDA kernels do on tensor cores; bias gradients stay unrounded, as on the GPU. It is
    /// the reference for whole GPU training steps: through a net, bf16 operand rounding alone
    /// moves the gradients by ~10 % (instance norm's mean subtraction amplifies it), far more
    /// than any kernel's own error, so only a reference that rounds alike can check them.
    pub fn with_bf16_operands() -> Self {
        CpuBackend { bf16_operands: true, ..Self::new() }
    }

    /// With bf16 operands, the bias gradient again from unrounded `dy` (column sums), as the
    /// GPU computes it apart from the tensor-core product.
    fn unrounded_bias_grad(&self, dy: CpuBuf<T>, db: CpuBuf<T>) {
        if !self.bf16_operands {
            return;
        }
        // SAFETY: dy and db are distinct views handed to this op.
        let (dy, db) = unsafe { (dy.slice(), db.slice_mut()) };
        db.fill(T::ZERO);
        for row in dy.chunks_exact(db.len()) {
            db.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
        }
    }

    /// What the convolutions multiply.
    fn ops(&self) -> Operands {
        if self.bf16_products {
            Operands::Bf16
        } else {
            Operands::Working
        }
    }

    /// `s` as the conv kernels see it: rounded to bf16 when this backend emulates them.
    fn operand<'a>(&self, s: &'a [T]) -> std::borrow::Cow<'a, [T]> {
        if !self.bf16_operands {
            return std::borrow::Cow::Borrowed(s);
        }
        std::borrow::Cow::Owned(s.iter().map(|&v| round_bf16(v)).collect())
    }
}

impl CpuBackend<f32> {
    /// Convolutions in bf16 on AVX512-BF16: operands rounded to bf16 (as the GPU's tensor
    /// cores take them), products summed in f32; everything else in f32. None where the CPU
    /// lacks the instructions.
    pub fn with_bf16_products() -> Option<Self> {
        bf16::available().then(|| CpuBackend { bf16_products: true, ..Self::new() })
    }
}

fn view_of<E>(arena: &[E], offset: usize, len: usize, bf16: bool) -> CpuBuf<E> {
    assert!(offset + len <= arena.len(), "view {offset}+{len} outside arena of {}", arena.len());
    // Views are handed to ops that write through them; the arena is only reached through views.
    CpuBuf { ptr: arena.as_ptr().wrapping_add(offset) as *mut E, len, bf16 }
}

/// dst = src between two views of the same kind.
fn copy_view<E: Copy>(dst: CpuBuf<E>, src: CpuBuf<E>) -> Result<()> {
    anyhow::ensure!(dst.len == src.len, "copy of {} values into {}", src.len, dst.len);
    // SAFETY: an op's output view does not overlap its inputs (the trait's rule).
    unsafe { dst.slice_mut() }.copy_from_slice(unsafe { src.slice() });
    Ok(())
}

// SAFETY (all impl methods): the model hands each op views that do not overlap the op's
// outputs, as the trait documents; in-place ops take a single mutable view.
impl<T: Float> Backend for CpuBackend<T> {
    type Buf = CpuBuf<T>;
    type LabelBuf = CpuBuf<u8>;
    type Arena = CpuArena<T>;
    type LabelArena = Vec<u8>;

    fn name(&self) -> String {
        let products = if self.bf16_products { ", bf16 convolutions on AVX512-BF16" } else { "" };
        format!("cpu ({} threads, {}{products})", threads(), std::any::type_name::<T>())
    }
    fn computes_on_host_threads(&self) -> bool {
        true
    }
    fn memory_available(&self) -> Option<u64> {
        crate::sysinfo::host_memory_available()
    }
    fn alloc(&self, len: usize) -> Result<CpuArena<T>> {
        Ok(CpuArena { data: vec![T::ZERO; len], bf16: false })
    }
    fn alloc_act(&self, len: usize) -> Result<CpuArena<T>> {
        Ok(CpuArena { data: vec![T::ZERO; len], bf16: self.bf16_storage })
    }
    fn view(&self, arena: &CpuArena<T>, offset: usize, len: usize) -> CpuBuf<T> {
        view_of(arena, offset, len, arena.bf16)
    }
    fn alloc_labels(&self, len: usize) -> Result<Vec<u8>> {
        Ok(vec![0; len])
    }
    fn label_view(&self, arena: &Vec<u8>, offset: usize, len: usize) -> CpuBuf<u8> {
        view_of(arena, offset, len, false)
    }
    fn elem_bytes(&self) -> usize {
        std::mem::size_of::<T>()
    }
    fn upload(&self, dst: CpuBuf<T>, src: &[f32]) -> Result<()> {
        let d = unsafe { dst.slice_mut() };
        anyhow::ensure!(d.len() == src.len(), "upload of {} values into {}", src.len(), d.len());
        d.iter_mut().zip(src).for_each(|(d, &s)| *d = T::from_f64(s as f64));
        self.stored(&[dst]);
        Ok(())
    }
    fn download_exact(&self, src: CpuBuf<T>, len: usize) -> Result<Vec<f64>> {
        anyhow::ensure!(src.len == len, "download of {} values into {len}", src.len);
        Ok(unsafe { src.slice() }.iter().map(|v| v.to_f64()).collect())
    }
    fn download(&self, src: CpuBuf<T>, dst: &mut [f32]) -> Result<()> {
        let s = unsafe { src.slice() };
        anyhow::ensure!(s.len() == dst.len(), "download of {} values into {}", s.len(), dst.len());
        dst.iter_mut().zip(s).for_each(|(d, &s)| *d = s.to_f64() as f32);
        Ok(())
    }
    fn upload_labels(&self, dst: CpuBuf<u8>, src: &[u8]) -> Result<()> {
        unsafe { dst.slice_mut() }.copy_from_slice(src);
        Ok(())
    }
    fn download_labels(&self, src: CpuBuf<u8>, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(unsafe { src.slice() });
        Ok(())
    }
    fn fill(&self, dst: CpuBuf<T>, value: f32) -> Result<()> {
        misc::fill(unsafe { dst.slice_mut() }, T::from_f64(value as f64));
        self.stored(&[dst]);
        Ok(())
    }
    fn copy(&self, dst: CpuBuf<T>, src: CpuBuf<T>) -> Result<()> {
        copy_view(dst, src)?;
        self.stored(&[dst]);
        Ok(())
    }
    fn copy_labels(&self, dst: CpuBuf<u8>, src: CpuBuf<u8>) -> Result<()> {
        copy_view(dst, src)
    }
    /// Copies nothing yet: the staged batch goes straight from host memory into the step's
    /// input at `take_staged` (the staging buffers stay unused on the CPU).
    unsafe fn stage(&self, dst: CpuBuf<T>, src: &[f32], ldst: CpuBuf<u8>, lsrc: &[u8]) -> Result<()> {
        anyhow::ensure!(dst.len == src.len() && ldst.len == lsrc.len(), "staged batch of {}+{} values into {}+{}", src.len(), lsrc.len(), dst.len, ldst.len);
        let pending = Staged { image: src.as_ptr(), image_len: src.len(), labels: lsrc.as_ptr(), labels_len: lsrc.len() };
        *self.staged.lock().map_err(|_| anyhow::anyhow!("staging lock poisoned"))? = Some(pending);
        Ok(())
    }
    /// Forgets the staged batch: its memory may be freed after this.
    fn sync_staged(&self) -> Result<()> {
        self.staged.lock().map_err(|_| anyhow::anyhow!("staging lock poisoned"))?.take();
        Ok(())
    }
    fn take_staged(&self, _src: CpuBuf<T>, dst: CpuBuf<T>, _lsrc: CpuBuf<u8>, ldst: CpuBuf<u8>) -> Result<()> {
        let s = self.staged.lock().map_err(|_| anyhow::anyhow!("staging lock poisoned"))?.take().ok_or_else(|| anyhow::anyhow!("take_staged without a staged batch"))?;
        // SAFETY: `stage`'s caller keeps this memory alive and unwritten until now.
        let (image, labels) = unsafe { (std::slice::from_raw_parts(s.image, s.image_len), std::slice::from_raw_parts(s.labels, s.labels_len)) };
        self.upload(dst, image)?;
        anyhow::ensure!(ldst.len == labels.len(), "staged labels: {} voxels into {}", labels.len(), ldst.len);
        self.upload_labels(ldst, labels)
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn conv_fwd(&self, x: CpuBuf<T>, xd: Dims, w: CpuBuf<T>, b: CpuBuf<T>, y: CpuBuf<T>, g: &ConvGeom) -> Result<()> {
        unsafe { conv::conv_fwd(&self.operand(x.slice()), xd, &self.operand(w.slice()), b.slice(), y.slice_mut(), g, self.ops()) };
        self.stored(&[y]);
        Ok(())
    }
    fn conv_dgrad(&self, dy: CpuBuf<T>, w: CpuBuf<T>, dx: CpuBuf<T>, xd: Dims, g: &ConvGeom, beta: f32) -> Result<()> {
        unsafe { conv::conv_dgrad(&self.operand(dy.slice()), &self.operand(w.slice()), dx.slice_mut(), xd, g, T::from_f64(beta as f64), self.ops()) };
        self.stored(&[dx]);
        Ok(())
    }
    fn conv_wgrad(&self, x: CpuBuf<T>, xd: Dims, dy: CpuBuf<T>, dw: CpuBuf<T>, db: CpuBuf<T>, g: &ConvGeom) -> Result<()> {
        unsafe { conv::conv_wgrad(&self.operand(x.slice()), xd, &self.operand(dy.slice()), dw.slice_mut(), db.slice_mut(), g, self.ops()) };
        self.unrounded_bias_grad(dy, db);
        Ok(())
    }
    fn convt_fwd(&self, x: CpuBuf<T>, xd: Dims, w: CpuBuf<T>, b: CpuBuf<T>, y: CpuBuf<T>, g: &ConvTGeom) -> Result<()> {
        unsafe { convt::convt_fwd(&self.operand(x.slice()), xd, &self.operand(w.slice()), b.slice(), y.slice_mut(), g, self.ops()) };
        self.stored(&[y]);
        Ok(())
    }
    fn convt_dgrad(&self, dy: CpuBuf<T>, w: CpuBuf<T>, dx: CpuBuf<T>, xd: Dims, g: &ConvTGeom, beta: f32) -> Result<()> {
        unsafe { convt::convt_dgrad(&self.operand(dy.slice()), &self.operand(w.slice()), dx.slice_mut(), xd, g, T::from_f64(beta as f64), self.ops()) };
        self.stored(&[dx]);
        Ok(())
    }
    fn convt_wgrad(&self, x: CpuBuf<T>, xd: Dims, dy: CpuBuf<T>, dw: CpuBuf<T>, db: CpuBuf<T>, g: &ConvTGeom) -> Result<()> {
        unsafe { convt::convt_wgrad(&self.operand(x.slice()), xd, &self.operand(dy.slice()), dw.slice_mut(), db.slice_mut(), g, self.ops()) };
        self.unrounded_bias_grad(dy, db);
        Ok(())
    }

    fn norm_stats(&self, x: CpuBuf<T>, xd: Dims, mean: CpuBuf<T>, rstd: CpuBuf<T>) -> Result<()> {
        unsafe { norm::norm_stats(x.slice(), xd, mean.slice_mut(), rstd.slice_mut()) };
        Ok(())
    }
    fn norm_fwd(&self, x: CpuBuf<T>, xd: Dims, mean: CpuBuf<T>, rstd: CpuBuf<T>, gamma: CpuBuf<T>, beta: CpuBuf<T>, residual: Option<CpuBuf<T>>, act: Act, y: CpuBuf<T>) -> Result<()> {
        anyhow::ensure!(residual.is_none_or(|r| r.ptr != y.ptr), "norm_fwd: the residual cannot be the output");
        unsafe { norm::norm_fwd(x.slice(), xd, mean.slice(), rstd.slice(), gamma.slice(), beta.slice(), residual.map(|r| r.slice()), act.slope(), y.slice_mut()) };
        self.stored(&[y]);
        Ok(())
    }
    fn norm_bwd(&self, dy: CpuBuf<T>, x: CpuBuf<T>, xd: Dims, mean: CpuBuf<T>, rstd: CpuBuf<T>, gamma: CpuBuf<T>, beta: CpuBuf<T>, act: Act, dx: CpuBuf<T>, dgamma: CpuBuf<T>, dbeta: CpuBuf<T>) -> Result<()> {
        unsafe {
            let stats = (mean.slice(), rstd.slice(), gamma.slice(), beta.slice());
            let (dg, db) = (dgamma.slice_mut(), dbeta.slice_mut());
            if dy.ptr != dx.ptr {
                dx.slice_mut().copy_from_slice(dy.slice());
            }
            norm::norm_bwd_inplace(dx.slice_mut(), x.slice(), xd, stats, act.slope(), dg, db);
        }
        self.stored(&[dx]);
        Ok(())
    }
    fn leaky_bwd(&self, dy: CpuBuf<T>, y: CpuBuf<T>, dx: CpuBuf<T>) -> Result<()> {
        unsafe {
            if dy.ptr != dx.ptr {
                dx.slice_mut().copy_from_slice(dy.slice());
            }
            norm::leaky_bwd_inplace(dx.slice_mut(), y.slice());
        }
        self.stored(&[dx]);
        Ok(())
    }
    fn avg_pool(&self, x: CpuBuf<T>, xd: Dims, k: [usize; 3], y: CpuBuf<T>) -> Result<()> {
        unsafe { pool::avg_pool(x.slice(), xd, k, y.slice_mut()) };
        self.stored(&[y]);
        Ok(())
    }
    fn avg_pool_bwd(&self, dy: CpuBuf<T>, k: [usize; 3], dx: CpuBuf<T>, xd: Dims, beta: f32) -> Result<()> {
        unsafe { pool::avg_pool_bwd(dy.slice(), k, dx.slice_mut(), xd, T::from_f64(beta as f64)) };
        self.stored(&[dx]);
        Ok(())
    }

    fn concat(&self, a: CpuBuf<T>, ca: usize, b: CpuBuf<T>, cb: usize, rows: usize, out: CpuBuf<T>) -> Result<()> {
        unsafe { misc::concat(a.slice(), ca, b.slice(), cb, rows, out.slice_mut()) };
        self.stored(&[out]);
        Ok(())
    }
    fn concat_bwd(&self, dout: CpuBuf<T>, ca: usize, cb: usize, rows: usize, da: CpuBuf<T>, db: CpuBuf<T>, beta_b: f32) -> Result<()> {
        unsafe { misc::concat_bwd(dout.slice(), ca, cb, rows, da.slice_mut(), db.slice_mut(), T::from_f64(beta_b as f64)) };
        self.stored(&[da, db]);
        Ok(())
    }
    fn downsample_labels(&self, src: CpuBuf<u8>, sd: Dims, dst: CpuBuf<u8>, dd: Dims) -> Result<()> {
        unsafe { misc::downsample_labels(src.slice(), sd, dst.slice_mut(), dd) };
        Ok(())
    }

    fn softmax_dice_ce(&self, logits: CpuBuf<T>, ld: Dims, labels: CpuBuf<u8>, mode: DiceMode, ignore: bool, weight: f64, record: CpuBuf<T>) -> Result<()> {
        let parts = unsafe { loss::softmax_dice_ce(logits.slice_mut(), ld, labels.slice(), mode, ignore, weight) }?;
        anyhow::ensure!(record.len == LOSS_RECORD, "loss record of {} values, not {LOSS_RECORD}", record.len);
        unsafe { record.slice_mut() }.iter_mut().zip(parts).for_each(|(r, v)| *r = T::from_f64(v));
        self.stored(&[logits]);
        Ok(())
    }
    fn sigmoid_dice_bce(&self, logits: CpuBuf<T>, ld: Dims, labels: CpuBuf<u8>, regions: &RegionMasks, mode: DiceMode, ignore: bool, weight: f64, record: CpuBuf<T>) -> Result<()> {
        let parts = unsafe { loss::sigmoid_dice_bce(logits.slice_mut(), ld, labels.slice(), regions, mode, ignore, weight) }?;
        anyhow::ensure!(record.len == LOSS_RECORD, "loss record of {} values, not {LOSS_RECORD}", record.len);
        unsafe { record.slice_mut() }.iter_mut().zip(parts).for_each(|(r, v)| *r = T::from_f64(v));
        self.stored(&[logits]);
        Ok(())
    }
    fn argmax(&self, logits: CpuBuf<T>, ld: Dims, out: CpuBuf<u8>) -> Result<()> {
        unsafe { misc::argmax(logits.slice(), ld, out.slice_mut()) };
        Ok(())
    }
    fn region_bits(&self, logits: CpuBuf<T>, ld: Dims, out: CpuBuf<u8>) -> Result<()> {
        anyhow::ensure!(ld.c <= crate::backend::MAX_REGIONS, "region_bits: {} regions, at most {}", ld.c, crate::backend::MAX_REGIONS);
        unsafe { misc::region_bits(logits.slice(), ld, out.slice_mut()) };
        Ok(())
    }

    fn sum_squares(&self, x: CpuBuf<T>, out: CpuBuf<T>) -> Result<()> {
        anyhow::ensure!(out.len >= 1, "sum_squares into an empty view");
        unsafe { out.slice_mut()[0] = T::from_f64(optim::sum_squares(x.slice())) };
        Ok(())
    }
    fn sgd_update(&self, params: CpuBuf<T>, grads: CpuBuf<T>, momentum: CpuBuf<T>, p: &SgdParams, guard: CpuBuf<T>) -> Result<()> {
        anyhow::ensure!(guard.len >= 1, "sgd_update needs its guard (the squared gradient norm first)");
        unsafe { optim::sgd_update(params.slice_mut(), grads.slice(), momentum.slice_mut(), p, guard.slice()) };
        Ok(())
    }
}
