//! CUDA backend: the kernels of kernels/*.cu, compiled by build.rs into one embedded fatbin,
//! loaded with cudarc (the driver library is opened at run time, so the binary needs only
//! the NVIDIA driver). One module load, one compute stream for the ops and one copy stream for
//! the staged batch uploads, ordered by two events of our own (cudarc's per-slice event
//! tracking is off), every launch's result checked.
//!
//! Parameters, gradients, optimizer state and statistics are f32. Activations and their
//! gradients are stored as bf16 by default (`SEGK_ACTIVATIONS=f32` keeps them f32): every view
//! carries its storage type and the launches pick the kernel variant for it. The convolutions
//! round operands to bf16 and run on tensor cores (mma.sync m16n8k16) with f32 accumulation.

mod conv;
pub mod emu;
mod loss;
mod misc;
pub mod nccl;
mod norm;
mod optim;
mod pool;

use super::{Act, Backend, ConvGeom, ConvTGeom, DiceMode, OutOfMemory, RegionMasks, SgdParams};
use crate::tensor::Dims;
use anyhow::{anyhow, bail, Result};
use crate::hostmem::{Heap, HostAlloc, HostBuf, HostElem};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};
use std::sync::{Arc, Mutex};

/// The kernels, as nvcc built them (empty when built without nvcc).
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/segk.fatbin"));
pub const KERNELS_EMBEDDED: bool = cfg!(segk_kernels);
pub const KERNEL_ARCHS: &str = "sm_80 sm_90 (SASS), compute_90 (PTX)";

/// Why `--device cuda` cannot run here, or None when it can be tried.
pub fn unavailable_reason() -> Option<String> {
    if cfg!(target_feature = "crt-static") {
        return Some("this is the static CPU-only build of segk: it cannot use a GPU (use the dynamically linked binary, which needs only the NVIDIA driver)".into());
    }
    if !KERNELS_EMBEDDED {
        return Some("built without CUDA kernels: install the CUDA toolkit (nvcc) and rebuild".into());
    }
    // SAFETY: only tries to open the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Some("no NVIDIA driver: libcuda.so could not be loaded (is this a GPU machine?)".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the NVIDIA driver reports no GPU".into()),
        Err(e) => Some(no_gpu(&e)),
        Ok(_) => None,
    }
}

/// Why the driver offers no GPU, the toolkit's stub library named as such.
fn no_gpu(e: &DriverError) -> String {
    if e.0 == sys::CUresult::CUDA_ERROR_STUB_LIBRARY {
        format!(
            "the libcuda.so loaded ({}) is the CUDA toolkit's stub, not the NVIDIA driver: put the driver's libcuda.so.1 first on the library path (LD_LIBRARY_PATH), or run where the driver is installed",
            driver_library().unwrap_or_else(|| "path unknown".into())
        )
    } else {
        format!("the NVIDIA driver reports no usable GPU: {e}")
    }
}

/// The libcuda this process loaded, as the kernel maps it (None before it is loaded).
pub fn driver_library() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.contains("libcuda.so")).map(str::to_string)
}

/// The CUDA version the loaded driver supports, as "13.0", when it says.
pub fn driver_cuda_version() -> Option<String> {
    let mut v = 0;
    // SAFETY: only called once the driver library is known to load; writes one int.
    let ok = unsafe { sys::is_culib_present() && sys::cuDriverGetVersion(&mut v) == sys::CUresult::CUDA_SUCCESS };
    ok.then(|| format!("{}.{}", v / 1000, v % 1000 / 10))
}

/// Why the embedded module did not load, in the terms that decide it: the CUDA release the
/// kernels were built with and the one the driver supports.
fn module_load_error(e: DriverError) -> anyhow::Error {
    let built = option_env!("SEGK_NVCC_RELEASE").filter(|v| !v.is_empty()).unwrap_or("unknown");
    let driver = driver_cuda_version().unwrap_or_else(|| "unknown".into());
    let lib = driver_library().unwrap_or_else(|| "libcuda.so".into());
    let older = |a: &str, b: &str| {
        let v = |s: &str| s.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
        v(a) < v(b)
    };
    let hint = if driver != "unknown" && built != "unknown" && older(&driver, built) {
        format!(": this driver is older than the kernels need; update the NVIDIA driver to one for CUDA {built} or newer, or rebuild segk with an nvcc of CUDA {driver} or older (NVCC=...)")
    } else {
        String::new()
    };
    anyhow!("loading the embedded kernels ({KERNEL_ARCHS}, built by nvcc {built}) failed: {}; the driver ({lib}) supports CUDA {driver}{hint}", describe(&e))
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// Every GPU the driver offers (opening a context on each), or why there are none.
pub fn gpus() -> std::result::Result<Vec<GpuInfo>, String> {
    if let Some(why) = unavailable_reason().filter(|_| cfg!(target_feature = "crt-static")) {
        return Err(why);
    }
    // SAFETY: only tries to open the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no NVIDIA driver: libcuda.so could not be loaded".into());
    }
    let n = CudaContext::device_count().map_err(|e| no_gpu(&e))?;
    (0..n as usize)
        .map(|i| {
            let ctx = CudaContext::new(i).map_err(|e| format!("cuda:{i}: {e}"))?;
            let (free, total) = ctx.mem_get_info().map_err(|e| format!("cuda:{i}: {e}"))?;
            Ok(GpuInfo {
                ordinal: i,
                name: ctx.name().unwrap_or_else(|_| "?".into()),
                compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
                total_bytes: total as u64,
                free_bytes: free as u64,
            })
        })
        .collect()
}

/// Storage type of device values; activation kernels exist once per type (segk_<name>_f32,
/// segk_<name>_bf16), and the index of a type is its column in the kernel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32 = 0,
    Bf16 = 1,
}

impl Dt {
    pub fn bytes(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 => 2,
        }
    }
    pub fn suffix(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::Bf16 => "bf16",
        }
    }
    /// The activation storage asked for by SEGK_ACTIVATIONS (f32 or bf16; bf16 when unset).
    pub fn activations_from_env() -> Result<Dt> {
        match std::env::var("SEGK_ACTIVATIONS").ok().as_deref() {
            None | Some("") | Some("bf16") => Ok(Dt::Bf16),
            Some("f32") => Ok(Dt::F32),
            Some(other) => bail!("SEGK_ACTIVATIONS must be f32 or bf16, got {other:?}"),
        }
    }
}

/// f32 values converted per step when activations are uploaded or downloaded as bf16: the
/// workspace they pass through (4 MiB) is within `workspace_bytes` for every GPU.
pub(crate) const CAST_CHUNK: usize = 1 << 20;

/// A view of device values of type `dt`.
#[derive(Clone, Copy, Debug)]
pub struct DevBuf {
    pub ptr: u64,
    pub len: usize,
    pub dt: Dt,
}

/// An arena of device values of one storage type.
pub struct DevArena {
    mem: DevMem<u8>,
    dt: Dt,
}

impl DevArena {
    /// Values it holds (its bytes over the value size; a 1-byte placeholder holds none).
    pub fn len(&self) -> usize {
        self.mem.len / self.dt.bytes()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A view of u8 device memory (label maps).
#[derive(Clone, Copy, Debug)]
pub struct DevLabels {
    pub ptr: u64,
    pub len: usize,
}

macro_rules! kernels {
    (plain: $($name:ident),* ; per storage type: $($act:ident),* ; per tile width: $($tile:ident),* $(,)?) => {
        pub(crate) struct Kernels { $(pub $name: CudaFunction,)* $(pub $act: [CudaFunction; 2],)* $(pub $tile: [CudaFunction; 3],)* }
        impl Kernels {
            fn load(m: &Arc<cudarc::driver::CudaModule>) -> Result<Kernels> {
                let f = |name: &str| m.load_function(name).map_err(|e| anyhow!("kernel {name} missing from the fatbin: {e}"));
                Ok(Kernels {
                    $($name: f(concat!("segk_", stringify!($name)))?,)*
                    $($act: [f(concat!("segk_", stringify!($act), "_f32"))?, f(concat!("segk_", stringify!($act), "_bf16"))?],)*
                    $($tile: [f(concat!("segk_", stringify!($tile), "_n32"))?, f(concat!("segk_", stringify!($tile), "_n64"))?, f(concat!("segk_", stringify!($tile), "_n128"))?],)*
                })
            }
        }
    };
}

kernels!(
    plain: sum_squares_f32, sum_partials_f64, sgd_nesterov_f32, loss_dice, downsample_labels, cast_f32_bf16, cast_bf16_f32,
    norm_finalize_f32, norm_bwd_finalize_f32, sum_splits_f32;
    per storage type: fill, concat, concat_bwd, argmax, region_bits, norm_partial, norm_act_fwd, norm_bwd_partial, norm_bwd_apply,
    colsum_partial8, concat8, concat_bwd8, norm_partial8, norm_act_fwd8, norm_bwd_partial8, norm_bwd_apply8, leaky_bwd, avg_pool, avg_pool_bwd,
    loss_partial, loss_grad, region_partial, region_grad, conv_fprop, conv_dgrad, conv_wgrad, convt_fprop, convt_dgrad, convt_wgrad, colsum_partial;
    per tile width: conv_fprop_pipe, conv_dgrad_pipe, conv_wgrad_pipe, convt_fprop_pipe, convt_dgrad_pipe, convt_wgrad_pipe,
);

/// Launches a kernel with the listed arguments (each bound to a local first, since both
/// drivers take argument addresses) and turns a failure into an error naming the kernel.
/// `name[dt]` launches the variant of an activation kernel for storage type `dt`;
/// `name@i` the variant of a pipelined conv for tile width i (0, 1, 2: 32, 64, 128 columns).
macro_rules! launch {
    (@run $be:expr, $kt:ident => $pick:expr, $name:expr, $cfg:expr, $($arg:expr),*) => {{
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        match &$be.drv {
            $crate::backend::cuda::Driver::Gpu(d) => {
                use cudarc::driver::PushKernelArg;
                let $kt = &d.k;
                let mut b = d.stream.launch_builder($pick);
                $(b.arg($arg);)*
                // SAFETY: argument types and order match the kernel's signature in kernels/*.cu.
                unsafe { b.launch(cfg) }.map_err(|e| $be.fail($name, e))?;
            }
            $crate::backend::cuda::Driver::Emu => {
                let mut params: Vec<*mut std::ffi::c_void> = vec![$($arg as *const _ as *mut std::ffi::c_void),*];
                // SAFETY: as above; the pointers in the arguments address host memory of this
                // backend's arenas (the emulator's device memory is host memory).
                unsafe { $crate::backend::cuda::emu::launch($name, cfg, &mut params) }?;
            }
        }
    }};
    ($be:expr, $k:ident [$dt:expr], $cfg:expr, $($arg:expr),* $(,)?) => {{
        let dt: $crate::backend::cuda::Dt = $dt;
        let name = [concat!("segk_", stringify!($k), "_f32"), concat!("segk_", stringify!($k), "_bf16")][dt as usize];
        $crate::backend::cuda::launch!(@run $be, kt => &kt.$k[dt as usize], name, $cfg, $($arg),*)
    }};
    ($be:expr, $k:ident @ $w:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let w: usize = $w;
        let name = [concat!("segk_", stringify!($k), "_n32"), concat!("segk_", stringify!($k), "_n64"), concat!("segk_", stringify!($k), "_n128")][w];
        $crate::backend::cuda::launch!(@run $be, kt => &kt.$k[w], name, $cfg, $($arg),*)
    }};
    ($be:expr, $k:ident, $cfg:expr, $($arg:expr),* $(,)?) => {
        $crate::backend::cuda::launch!(@run $be, kt => &kt.$k, concat!("segk_", stringify!($k)), $cfg, $($arg),*)
    };
}
pub(crate) use launch;

/// The storage type shared by activation views `bufs`; parameters and statistics are checked
/// to be f32 with [`f32s`].
pub(crate) fn same_dt(op: &str, bufs: &[DevBuf]) -> Result<Dt> {
    let dt = bufs[0].dt;
    anyhow::ensure!(bufs.iter().all(|b| b.dt == dt), "{op}: activation views of mixed storage types {:?}", bufs.iter().map(|b| b.dt).collect::<Vec<_>>());
    Ok(dt)
}

pub(crate) fn f32s(op: &str, bufs: &[DevBuf]) -> Result<()> {
    anyhow::ensure!(bufs.iter().all(|b| b.dt == Dt::F32), "{op}: parameters and statistics must be f32 views");
    Ok(())
}

/// What runs the kernels: a GPU through the driver, or the CPU emulator (`--device emu`).
pub(crate) enum Driver {
    Gpu(Box<Gpu>),
    Emu,
}

pub(crate) struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Host-to-device batch uploads (`stage`), beside the compute stream.
    copy_stream: Arc<CudaStream>,
    /// Recorded on the copy stream after a `stage`: the staging buffers hold the batch.
    staged: CudaEvent,
    /// Recorded on the compute stream at each `stage`: the ops queued so far (the previous
    /// `take_staged`'s copy out of the staging buffers, their allocation and zeroing) are done.
    ops_done: CudaEvent,
    pub(crate) k: Kernels,
}

/// Device memory: a driver allocation, or (emulator) 16-byte-aligned host memory.
pub struct DevMem<T> {
    ptr: u64,
    len: usize,
    _keep: Keep<T>,
}

// The allocation stays alive for as long as the pointer is used; it is never read by name.
#[allow(dead_code)]
enum Keep<T> {
    Gpu(CudaSlice<T>),
    Host(Vec<u128>),
}

impl<T> DevMem<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub struct CudaBackend {
    pub(crate) drv: Driver,
    /// Storage type of the activation arenas (`alloc_act`).
    act: Dt,
    /// Convolutions take the pipelined kernels (conv_pipe.cu) where their shapes allow.
    conv_pipe: bool,
    /// Workspace for partial sums; grows to the largest request, then stays.
    scratch: Mutex<Option<DevMem<f32>>>,
    sms: u32,
    name: String,
    /// The ranks this backend trains with (`join_group`); none: one process alone.
    group: std::sync::OnceLock<Ranks>,
}

/// NCCL's communicator and the stream its collectives run on, beside the compute stream:
/// every collective of the communicator on this one stream, in the order they were issued
/// (the same on every rank), ordered against the ops by two events.
pub(crate) struct Ranks {
    pub(crate) comm: nccl::Comm,
    stream: Arc<CudaStream>,
    /// Recorded on the compute stream before a collective: its input is ready.
    to_comm: CudaEvent,
    /// Recorded on the collectives' stream by `join_sums`: every sum started is done.
    to_compute: CudaEvent,
    /// Rank 0's SM count, which sizes the loss's chunks on every rank: the partials all-gathered
    /// must have one layout whatever GPU each rank has (a MIG slice, a mixed node).
    pub(crate) sms0: usize,
}

impl CudaBackend {
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        if let Some(why) = unavailable_reason() {
            bail!("--device cuda:{ordinal}: {why}");
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA device count: {e}"))? as usize;
        if ordinal >= count {
            bail!("--device cuda:{ordinal}: only {count} GPU(s) visible");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("creating a CUDA context on GPU {ordinal}: {e}"))?;
        // One stream orders everything; per-slice event tracking would only add waits.
        // SAFETY: called before any allocation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| anyhow!("creating a CUDA stream: {e}"))?;
        let copy_stream = ctx.new_stream().map_err(|e| anyhow!("creating the CUDA copy stream: {e}"))?;
        let event = || ctx.new_event(None).map_err(|e| anyhow!("creating a CUDA event: {e}"));
        let (staged, ops_done) = (event()?, event()?);
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
            .map_err(module_load_error)?;
        let k = Kernels::load(&module)?;
        conv::allow_pipe_shared_memory(&k)?;
        let (maj, min) = ctx.compute_capability().unwrap_or((0, 0));
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(80).max(1) as u32;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let name = format!("cuda:{ordinal} ({gpu}, sm_{maj}{min}, {sms} SMs)");
        let gpu = Gpu { ctx, stream, copy_stream, staged, ops_done, k };
        Ok(CudaBackend { drv: Driver::Gpu(Box::new(gpu)), act: Dt::activations_from_env()?, conv_pipe: conv::pipe_from_env()?, scratch: Mutex::new(None), sms, name, group: std::sync::OnceLock::new() })
    }

    /// The same backend with every kernel run by the CPU emulator (kernels/emu): slow, exact
    /// about indexing, tails and barriers, silent about speed.
    pub fn emulated() -> Result<CudaBackend> {
        emu::available()?;
        // Few "SMs" keep grid-stride launches small: every emulated thread is a fiber.
        Ok(CudaBackend { drv: Driver::Emu, act: Dt::activations_from_env()?, conv_pipe: conv::pipe_from_env()?, scratch: Mutex::new(None), sms: 2, name: "emu (the CUDA kernels emulated on the CPU)".into(), group: std::sync::OnceLock::new() })
    }

    /// The GPU (or the emulator), without the activation storage `name` adds.
    pub fn device(&self) -> &str {
        &self.name
    }

    /// The storage type of activation arenas allocated from now on (arenas keep theirs).
    pub fn set_activations(&mut self, dt: Dt) {
        self.act = dt;
    }
    pub fn activations(&self) -> Dt {
        self.act
    }

    /// Whether convolutions may take the pipelined kernels (`SEGK_CONV=simple` says no);
    /// shapes they do not cover take the simple ones either way.
    pub fn set_conv_pipeline(&mut self, on: bool) {
        self.conv_pipe = on;
    }
    pub fn conv_pipeline(&self) -> bool {
        self.conv_pipe
    }

    fn alloc_typed(&self, len: usize, dt: Dt, what: &str) -> Result<DevArena> {
        Ok(DevArena { mem: self.alloc_mem::<u8>(len * dt.bytes(), what)?, dt })
    }

    /// `n` values of `src` into `dst` converted between storage types, in order with the ops.
    fn cast(&self, src: u64, src_dt: Dt, dst: u64, dst_dt: Dt, n: usize) -> Result<()> {
        let len = n as i64;
        match (src_dt, dst_dt) {
            (a, b) if a == b => self.copy_bytes(dst, src, n * a.bytes()),
            (Dt::F32, Dt::Bf16) => {
                launch!(self, cast_f32_bf16, self.grid(n), &src, &len, &dst);
                Ok(())
            }
            _ => {
                launch!(self, cast_bf16_f32, self.grid(n), &src, &len, &dst);
                Ok(())
            }
        }
    }

    fn gpu(&self) -> Option<&Gpu> {
        match &self.drv {
            Driver::Gpu(g) => Some(g),
            Driver::Emu => None,
        }
    }

    /// Zeroed device memory of `len` elements.
    fn alloc_mem<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize, what: &str) -> Result<DevMem<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        match &self.drv {
            Driver::Gpu(g) => {
                let s = g.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| self.fail_alloc(what, Some(bytes as u64), e))?;
                let ptr = {
                    let (ptr, _sync) = s.device_ptr(&g.stream);
                    ptr
                };
                Ok(DevMem { ptr, len: len.max(1), _keep: Keep::Gpu(s) })
            }
            Driver::Emu => {
                let mut host = vec![0u128; bytes.div_ceil(16)];
                Ok(DevMem { ptr: host.as_mut_ptr() as u64, len: len.max(1), _keep: Keep::Host(host) })
            }
        }
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match self.gpu() {
            Some(g) => g.ctx.mem_get_info().map_err(|e| anyhow!("cuMemGetInfo: {e}")),
            None => {
                let free = crate::sysinfo::host_memory_available().unwrap_or(0) as usize;
                Ok((free, free))
            }
        }
    }

    /// An error of `what`; out of memory becomes the typed `OutOfMemory` (with the bytes asked
    /// for) so the trainer can give the pre-flight's advice.
    pub(crate) fn fail(&self, what: &str, e: DriverError) -> anyhow::Error {
        self.fail_alloc(what, None, e)
    }

    pub(crate) fn fail_alloc(&self, what: &str, requested: Option<u64>, e: DriverError) -> anyhow::Error {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let free = self.mem_info().ok().map(|(f, _)| f as u64);
            return anyhow::Error::new(OutOfMemory { what: format!("CUDA {what}"), requested, free });
        }
        anyhow!("CUDA error in {what}: {}", describe(&e))
    }

    /// Grid-stride launch shape for `n` independent elements.
    pub(crate) fn grid(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 32 * self.sms as usize) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    pub(crate) fn sms(&self) -> usize {
        self.sms as usize
    }

    /// The ranks, once joined.
    pub(crate) fn ranks_joined(&self) -> Option<&Ranks> {
        self.group.get()
    }

    /// The GPU, for NCCL (the emulator without the driver runs one rank).
    fn gpu_for(&self, what: &str) -> Result<&Gpu> {
        match self.gpu() {
            Some(g) => Ok(g),
            None => bail!("{what}: the kernel emulator (--device emu) runs one rank; several ranks need the driver (a GPU, or the fake driver)"),
        }
    }

    /// Queues `collective` on the collectives' stream after the ops queued so far; ops queued
    /// later wait for it only once `join_sums` says so.
    pub(crate) fn start_collective(&self, what: &str, collective: impl FnOnce(&nccl::Comm, *mut std::ffi::c_void) -> Result<()>) -> Result<()> {
        let (g, r) = (self.gpu_for(what)?, self.group.get().ok_or_else(|| anyhow!("{what}: no group of ranks joined"))?);
        r.to_comm.record(&g.stream).map_err(|e| self.fail("event record (to the collectives)", e))?;
        r.stream.wait(&r.to_comm).map_err(|e| self.fail("collectives' stream wait", e))?;
        collective(&r.comm, r.stream.cu_stream() as *mut std::ffi::c_void)
    }

    /// Device pointer to at least `len` f32 of workspace, valid until the next call.
    pub(crate) fn scratch(&self, len: usize) -> Result<u64> {
        let mut s = self.scratch.lock().map_err(|_| anyhow!("scratch lock poisoned"))?;
        if s.as_ref().is_none_or(|b| b.len < len) {
            *s = None;
            *s = Some(self.alloc_mem::<f32>(len, "workspace allocation")?);
        }
        Ok(s.as_ref().expect("allocated above").ptr)
    }

    fn read_into<T: Copy>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        match self.gpu() {
            Some(g) => {
                // SAFETY: src addresses dst.len() T on this context; synchronised before use.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, g.stream.cu_stream()) }.map_err(|e| self.fail("device-to-host copy", e))?;
                g.stream.synchronize().map_err(|e| self.fail("stream synchronize", e))
            }
            // SAFETY: emulator memory is host memory; src addresses dst.len() T.
            None => unsafe {
                std::ptr::copy_nonoverlapping(src as *const T, dst.as_mut_ptr(), dst.len());
                Ok(())
            },
        }
    }

    /// Copies host values to the device (asynchronously when `src` is pinned).
    pub(crate) fn write<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        match self.gpu() {
            // SAFETY: dst addresses src.len() T. From pinned memory the copy may still run after
            // this returns: callers keep src untouched until the stream is synchronised.
            Some(g) => unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, g.stream.cu_stream()) }.map_err(|e| self.fail("host-to-device copy", e)),
            // SAFETY: emulator memory is host memory; dst addresses src.len() T.
            None => unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut T, src.len());
                Ok(())
            },
        }
    }

    fn copy_bytes(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        match self.gpu() {
            // SAFETY: both address `bytes` bytes on this context.
            Some(g) => unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, g.stream.cu_stream()) }.map_err(|e| self.fail("device-to-device copy", e)),
            // SAFETY: emulator memory is host memory; views of one op never overlap.
            None => unsafe {
                std::ptr::copy(src as *const u8, dst as *mut u8, bytes);
                Ok(())
            },
        }
    }
}

/// A driver error as its name and the driver's words for it; for the errors a faulting kernel
/// leaves (they surface at whatever call comes next, and the context is lost), what to do.
fn describe(e: &DriverError) -> String {
    use sys::CUresult::*;
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let words = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let text = if words.is_empty() || words == name { name } else { format!("{name} ({words})") };
    let fault = matches!(
        e.0,
        CUDA_ERROR_LAUNCH_FAILED | CUDA_ERROR_ILLEGAL_ADDRESS | CUDA_ERROR_MISALIGNED_ADDRESS | CUDA_ERROR_ILLEGAL_INSTRUCTION | CUDA_ERROR_INVALID_ADDRESS_SPACE | CUDA_ERROR_INVALID_PC | CUDA_ERROR_HARDWARE_STACK_ERROR | CUDA_ERROR_ASSERT
    );
    if fault {
        format!("{text}: a kernel queued before this call faulted and the GPU context is lost; `segk selftest --device cuda` checks every kernel, and CUDA_LAUNCH_BLOCKING=1 makes the error name the kernel that faulted")
    } else {
        text
    }
}

/// Page-locked host memory from this context (cached, not write-combined: the trainer also
/// reads the labels of a slot). Falls back to heap memory, once said, when the driver refuses.
struct Pinned {
    ctx: Arc<CudaContext>,
    refused: std::sync::atomic::AtomicBool,
}

impl Pinned {
    fn alloc<T: HostElem + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<HostBuf<T>> {
        if len == 0 || self.refused.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(HostBuf::heap(len));
        }
        // SAFETY: the block is zeroed below before anyone reads it.
        match unsafe { self.ctx.alloc_pinned_with_flags::<T>(len, 0) } {
            Ok(mut block) => {
                let ptr = block.as_mut_ptr().map_err(|e| anyhow!("pinned host memory: {e}"))?;
                // SAFETY: ptr addresses len T of the block, which `owner` keeps alive and frees.
                unsafe {
                    std::ptr::write_bytes(ptr, 0, len);
                    let ptr = std::ptr::NonNull::new(ptr).ok_or_else(|| anyhow!("pinned host memory: null pointer"))?;
                    Ok(HostBuf::from_owner(ptr, len, true, Box::new(block)))
                }
            }
            Err(e) => {
                if !self.refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    println!("note: the driver refused page-locked host memory ({e}); batch slots use ordinary memory (uploads are then not overlapped with the step)");
                }
                Ok(HostBuf::heap(len))
            }
        }
    }
}

impl HostAlloc for Pinned {
    fn f32s(&self, len: usize) -> Result<HostBuf<f32>> {
        self.alloc(len)
    }
    fn bytes(&self, len: usize) -> Result<HostBuf<u8>> {
        self.alloc(len)
    }
    fn kind(&self) -> &'static str {
        if self.refused.load(std::sync::atomic::Ordering::Relaxed) {
            Heap.kind()
        } else {
            "pinned"
        }
    }
}

impl Backend for CudaBackend {
    type Buf = DevBuf;
    type LabelBuf = DevLabels;
    type Arena = DevArena;
    type LabelArena = DevMem<u8>;

    fn name(&self) -> String {
        let conv = if self.conv_pipe { "" } else { ", simple conv kernels" };
        format!("{}, {} activations{conv}", self.name, self.act.suffix())
    }
    fn memory_available(&self) -> Option<u64> {
        self.mem_info().ok().map(|(free, _)| free as u64)
    }
    fn memory_used(&self) -> Option<u64> {
        self.gpu().and_then(|_| self.mem_info().ok()).map(|(free, total)| (total - free) as u64)
    }
    fn workspace_bytes(&self, largest_weight: usize, widest: usize, batch: usize) -> usize {
        4 * conv::workspace_bound(self.sms(), largest_weight, widest, batch)
    }
    fn alloc(&self, len: usize) -> Result<DevArena> {
        self.alloc_typed(len, Dt::F32, "arena allocation")
    }
    fn alloc_act(&self, len: usize) -> Result<DevArena> {
        self.alloc_typed(len, self.act, "activation arena allocation")
    }
    fn act_bytes(&self) -> usize {
        self.act.bytes()
    }
    fn view(&self, arena: &DevArena, offset: usize, len: usize) -> DevBuf {
        assert!(offset + len <= arena.len(), "view {offset}+{len} outside arena of {}", arena.len());
        DevBuf { ptr: arena.mem.ptr + (arena.dt.bytes() * offset) as u64, len, dt: arena.dt }
    }
    fn alloc_labels(&self, len: usize) -> Result<DevMem<u8>> {
        self.alloc_mem(len, "label map allocation")
    }
    fn label_view(&self, arena: &DevMem<u8>, offset: usize, len: usize) -> DevLabels {
        assert!(offset + len <= arena.len, "label view {offset}+{len} outside arena of {}", arena.len);
        DevLabels { ptr: arena.ptr + offset as u64, len }
    }
    fn elem_bytes(&self) -> usize {
        4
    }
    // Uploads wait for their copy: the source may be a pinned batch slot, which the caller is
    // free to hand back once this returns (only `stage` is asynchronous).
    fn upload(&self, dst: DevBuf, src: &[f32]) -> Result<()> {
        anyhow::ensure!(dst.len == src.len(), "upload of {} values into {}", src.len(), dst.len);
        if dst.dt == Dt::F32 {
            self.write(dst.ptr, src)?;
        } else {
            // Through f32 workspace a chunk at a time (the workspace stays within its bound;
            // the stream orders each chunk's write after the previous chunk's cast).
            let tmp = self.scratch(CAST_CHUNK.min(src.len()))?;
            for (i, part) in src.chunks(CAST_CHUNK).enumerate() {
                self.write(tmp, part)?;
                self.cast(tmp, Dt::F32, dst.ptr + (i * CAST_CHUNK * dst.dt.bytes()) as u64, dst.dt, part.len())?;
            }
        }
        self.sync()
    }
    fn download(&self, src: DevBuf, dst: &mut [f32]) -> Result<()> {
        anyhow::ensure!(src.len == dst.len(), "download of {} values into {}", src.len, dst.len());
        if src.dt == Dt::F32 {
            return self.read_into(src.ptr, dst);
        }
        let tmp = self.scratch(CAST_CHUNK.min(dst.len()))?;
        for (i, part) in dst.chunks_mut(CAST_CHUNK).enumerate() {
            self.cast(src.ptr + (i * CAST_CHUNK * src.dt.bytes()) as u64, src.dt, tmp, Dt::F32, part.len())?;
            self.read_into(tmp, part)?;
        }
        Ok(())
    }
    fn upload_labels(&self, dst: DevLabels, src: &[u8]) -> Result<()> {
        anyhow::ensure!(dst.len == src.len(), "label upload of {} into {}", src.len(), dst.len);
        self.write(dst.ptr, src)?;
        self.sync()
    }
    fn download_labels(&self, src: DevLabels, dst: &mut [u8]) -> Result<()> {
        anyhow::ensure!(src.len == dst.len(), "label download of {} into {}", src.len, dst.len());
        self.read_into(src.ptr, dst)
    }
    fn fill(&self, dst: DevBuf, value: f32) -> Result<()> {
        let n = dst.len as i64;
        launch!(self, fill[dst.dt], self.grid(dst.len), &dst.ptr, &n, &value);
        Ok(())
    }
    /// Converts between storage types where they differ (the f32 staging buffer into a bf16
    /// input image).
    fn copy(&self, dst: DevBuf, src: DevBuf) -> Result<()> {
        anyhow::ensure!(dst.len == src.len, "copy of {} values into {}", src.len, dst.len);
        self.cast(src.ptr, src.dt, dst.ptr, dst.dt, dst.len)
    }
    fn copy_labels(&self, dst: DevLabels, src: DevLabels) -> Result<()> {
        anyhow::ensure!(dst.len == src.len, "label copy of {} voxels into {}", src.len, dst.len);
        self.copy_bytes(dst.ptr, src.ptr, dst.len)
    }
    fn host_memory(&self) -> Arc<dyn HostAlloc> {
        match self.gpu() {
            Some(g) => Arc::new(Pinned { ctx: g.ctx.clone(), refused: false.into() }),
            None => Arc::new(Heap),
        }
    }
    unsafe fn stage(&self, dst: DevBuf, src: &[f32], ldst: DevLabels, lsrc: &[u8]) -> Result<()> {
        anyhow::ensure!(dst.len == src.len() && ldst.len == lsrc.len(), "staged batch of {}+{} values into {}+{}", src.len(), lsrc.len(), dst.len, ldst.len);
        anyhow::ensure!(dst.dt == Dt::F32, "stage: the staging buffer must be f32 (a raw copy of the host batch)");
        let Some(g) = self.gpu() else {
            // The emulator is synchronous: the batch is in the staging buffers on return.
            self.write(dst.ptr, src)?;
            return self.write(ldst.ptr, lsrc);
        };
        let cs = g.copy_stream.cu_stream();
        g.ops_done.record(&g.stream).map_err(|e| self.fail("event record (ops done)", e))?;
        g.copy_stream.wait(&g.ops_done).map_err(|e| self.fail("copy stream wait", e))?;
        // SAFETY: the views address the lengths checked above; the caller keeps src and lsrc
        // alive and unwritten until take_staged has waited for `staged`.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst.ptr, src, cs).map_err(|e| self.fail("staged image upload", e))?;
            cudarc::driver::result::memcpy_htod_async(ldst.ptr, lsrc, cs).map_err(|e| self.fail("staged label upload", e))?;
        }
        g.staged.record(&g.copy_stream).map_err(|e| self.fail("event record (staged)", e))
    }
    fn take_staged(&self, src: DevBuf, dst: DevBuf, lsrc: DevLabels, ldst: DevLabels) -> Result<()> {
        if let Some(g) = self.gpu() {
            g.stream.wait(&g.staged).map_err(|e| self.fail("compute stream wait", e))?;
        }
        self.copy(dst, src)?;
        self.copy_labels(ldst, lsrc)?;
        match self.gpu() {
            Some(g) => g.staged.synchronize().map_err(|e| self.fail("staged upload", e)),
            None => Ok(()),
        }
    }
    fn sync_staged(&self) -> Result<()> {
        match self.gpu() {
            Some(g) => g.copy_stream.synchronize().map_err(|e| self.fail("copy stream synchronize", e)),
            None => Ok(()),
        }
    }
    fn sync(&self) -> Result<()> {
        match self.gpu() {
            Some(g) => g.stream.synchronize().map_err(|e| self.fail("stream synchronize", e)),
            None => Ok(()),
        }
    }

    fn conv_fwd(&self, x: DevBuf, xd: Dims, w: DevBuf, b: DevBuf, y: DevBuf, g: &ConvGeom) -> Result<()> {
        conv::fwd(self, x, xd, w, b, y, g)
    }
    fn conv_dgrad(&self, dy: DevBuf, w: DevBuf, dx: DevBuf, xd: Dims, g: &ConvGeom, beta: f32) -> Result<()> {
        conv::dgrad(self, dy, w, dx, xd, g, beta)
    }
    fn conv_wgrad(&self, x: DevBuf, xd: Dims, dy: DevBuf, dw: DevBuf, db: DevBuf, g: &ConvGeom) -> Result<()> {
        conv::wgrad(self, x, xd, dy, dw, db, g)
    }
    fn convt_fwd(&self, x: DevBuf, xd: Dims, w: DevBuf, b: DevBuf, y: DevBuf, g: &ConvTGeom) -> Result<()> {
        conv::t_fwd(self, x, xd, w, b, y, g)
    }
    fn convt_dgrad(&self, dy: DevBuf, w: DevBuf, dx: DevBuf, xd: Dims, g: &ConvTGeom, beta: f32) -> Result<()> {
        conv::t_dgrad(self, dy, w, dx, xd, g, beta)
    }
    fn convt_wgrad(&self, x: DevBuf, xd: Dims, dy: DevBuf, dw: DevBuf, db: DevBuf, g: &ConvTGeom) -> Result<()> {
        conv::t_wgrad(self, x, xd, dy, dw, db, g)
    }
    fn norm_stats(&self, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf) -> Result<()> {
        norm::stats(self, x, xd, mean, rstd)
    }
    fn norm_fwd(&self, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf, gamma: DevBuf, beta: DevBuf, residual: Option<DevBuf>, act: Act, y: DevBuf) -> Result<()> {
        norm::fwd(self, x, xd, mean, rstd, gamma, beta, residual, act, y)
    }
    fn norm_bwd(&self, dy: DevBuf, x: DevBuf, xd: Dims, mean: DevBuf, rstd: DevBuf, gamma: DevBuf, beta: DevBuf, act: Act, dx: DevBuf, dgamma: DevBuf, dbeta: DevBuf) -> Result<()> {
        norm::bwd(self, dy, x, xd, [mean, rstd, gamma, beta], act, dx, dgamma, dbeta)
    }
    fn leaky_bwd(&self, dy: DevBuf, y: DevBuf, dx: DevBuf) -> Result<()> {
        norm::leaky_bwd(self, dy, y, dx)
    }
    fn avg_pool(&self, x: DevBuf, xd: Dims, k: [usize; 3], y: DevBuf) -> Result<()> {
        pool::avg_pool(self, x, xd, k, y)
    }
    fn avg_pool_bwd(&self, dy: DevBuf, k: [usize; 3], dx: DevBuf, xd: Dims, beta: f32) -> Result<()> {
        pool::avg_pool_bwd(self, dy, k, dx, xd, beta)
    }
    fn concat(&self, a: DevBuf, ca: usize, b: DevBuf, cb: usize, rows: usize, out: DevBuf) -> Result<()> {
        misc::concat(self, a, ca, b, cb, rows, out)
    }
    fn concat_bwd(&self, dout: DevBuf, ca: usize, cb: usize, rows: usize, da: DevBuf, db: DevBuf, beta_b: f32) -> Result<()> {
        misc::concat_bwd(self, dout, ca, cb, rows, da, db, beta_b)
    }
    fn downsample_labels(&self, src: DevLabels, sd: Dims, dst: DevLabels, dd: Dims) -> Result<()> {
        misc::downsample_labels(self, src, sd, dst, dd)
    }
    fn softmax_dice_ce(&self, logits: DevBuf, ld: Dims, labels: DevLabels, mode: DiceMode, ignore: bool, weight: f64, record: DevBuf) -> Result<()> {
        loss::softmax_dice_ce(self, logits, ld, labels, mode, ignore, weight, record)
    }
    fn sigmoid_dice_bce(&self, logits: DevBuf, ld: Dims, labels: DevLabels, regions: &RegionMasks, mode: DiceMode, ignore: bool, weight: f64, record: DevBuf) -> Result<()> {
        loss::sigmoid_dice_bce(self, logits, ld, labels, regions, mode, ignore, weight, record)
    }
    fn argmax(&self, logits: DevBuf, ld: Dims, out: DevLabels) -> Result<()> {
        misc::argmax(self, logits, ld, out)
    }
    fn region_bits(&self, logits: DevBuf, ld: Dims, out: DevLabels) -> Result<()> {
        misc::region_bits(self, logits, ld, out)
    }
    fn sum_squares(&self, x: DevBuf, out: DevBuf) -> Result<()> {
        optim::sum_squares(self, x, out)
    }
    fn sgd_update(&self, params: DevBuf, grads: DevBuf, momentum: DevBuf, p: &SgdParams, guard: DevBuf) -> Result<()> {
        optim::sgd_update(self, params, grads, momentum, p, guard)
    }

    /// NCCL's 128-byte id, then rank 0's SM count (4 bytes).
    fn group_id(&self) -> Result<Vec<u8>> {
        self.gpu_for("NCCL")?;
        let mut id = nccl::unique_id()?;
        id.extend(self.sms.to_le_bytes());
        Ok(id)
    }
    fn join_group(&self, rank: usize, size: usize, id: &[u8]) -> Result<()> {
        let g = self.gpu_for("NCCL")?;
        anyhow::ensure!(id.len() == 132, "a group id of {} bytes: rank 0 runs another segk build", id.len());
        let (id, sms0) = (&id[..128], u32::from_le_bytes(id[128..].try_into().expect("4 bytes")) as usize);
        anyhow::ensure!(self.group.get().is_none(), "this backend already joined a group of ranks");
        g.ctx.bind_to_thread().map_err(|e| self.fail("binding the context for NCCL", e))?;
        let stream = g.ctx.new_stream().map_err(|e| anyhow!("creating the collectives' CUDA stream: {e}"))?;
        let event = || g.ctx.new_event(None).map_err(|e| anyhow!("creating a CUDA event: {e}"));
        let (to_comm, to_compute) = (event()?, event()?);
        let comm = nccl::Comm::init(rank, size, id)?;
        let _ = self.group.set(Ranks { comm, stream, to_comm, to_compute, sms0 });
        Ok(())
    }
    fn ranks(&self) -> (usize, usize) {
        self.group.get().map_or((0, 1), |r| (r.comm.rank, r.comm.size))
    }
    fn start_sum(&self, x: DevBuf) -> Result<()> {
        if self.group.get().is_none() {
            return Ok(());
        }
        f32s("start_sum", &[x])?;
        // SAFETY: x is a live f32 view of this backend's memory; the stream is the collectives'.
        self.start_collective("all-reduce", |c, stream| unsafe { c.all_reduce_sum_f32(x.ptr, x.len, stream) })
    }
    fn join_sums(&self) -> Result<()> {
        let Some(r) = self.group.get() else { return Ok(()) };
        let g = self.gpu_for("join_sums")?;
        r.to_compute.record(&r.stream).map_err(|e| self.fail("event record (collectives done)", e))?;
        g.stream.wait(&r.to_compute).map_err(|e| self.fail("compute stream wait (collectives)", e))
    }
}
