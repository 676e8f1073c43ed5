//! NCCL, for training on several GPUs, opened at run time: the binary starts without it and
//! says how to get it when a multi-GPU run needs it. The nine functions segk calls are bound
//! here with libloading rather than through cudarc's NCCL bindings, whose loader never tries
//! `libnccl.so.2` -- the one name every NCCL install provides (the pip wheel, the distributions'
//! libnccl2, NGC containers); `libnccl.so` (a -dev package's link) comes second, and
//! SEGK_NCCL=PATH names a library to take instead.

use anyhow::{bail, Context, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// ncclResult_t values segk names (NCCL's nccl.h).
const SUCCESS: c_int = 0;
const IN_PROGRESS: c_int = 7;
/// ncclDataType_t ncclFloat32, ncclRedOp_t ncclSum.
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

type RawComm = *mut c_void;

/// The functions, as nccl.h declares them (ncclUniqueId is 128 bytes passed by value).
struct Lib {
    _lib: libloading::Library,
    path: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut [u8; 128]) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, [u8; 128], c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> c_int,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, *mut c_void) -> c_int,
    comm_abort: unsafe extern "C" fn(RawComm) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut c_int) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(RawComm) -> *const c_char,
}

fn candidates() -> Vec<String> {
    match std::env::var("SEGK_NCCL") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    }
}

fn open() -> std::result::Result<Lib, String> {
    if cfg!(target_feature = "crt-static") {
        return Err("this is the static CPU-only build of segk: it trains on one device".into());
    }
    let mut tried = Vec::new();
    for name in candidates() {
        // SAFETY: loading NCCL runs its initialisers only, which have no preconditions.
        match unsafe { libloading::Library::new(&name) } {
            Ok(lib) => return bind(lib, name).map_err(|e| format!("{e:#}")),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "NCCL could not be loaded ({}): install it (`pip install nvidia-nccl-cu13`, then put its nvidia/nccl/lib folder on LD_LIBRARY_PATH; or your distribution's libnccl2), or name the library with SEGK_NCCL=PATH",
        tried.join("; ")
    ))
}

fn bind(lib: libloading::Library, path: String) -> Result<Lib> {
    // SAFETY (each symbol): the types are nccl.h's declarations of these functions.
    unsafe {
        macro_rules! f {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes()).with_context(|| format!("{path} has no {}", $name))?
            };
        }
        Ok(Lib {
            get_version: f!("ncclGetVersion"),
            get_unique_id: f!("ncclGetUniqueId"),
            comm_init_rank: f!("ncclCommInitRank"),
            all_reduce: f!("ncclAllReduce"),
            all_gather: f!("ncclAllGather"),
            comm_abort: f!("ncclCommAbort"),
            comm_get_async_error: f!("ncclCommGetAsyncError"),
            get_error_string: f!("ncclGetErrorString"),
            get_last_error: f!("ncclGetLastError"),
            path,
            _lib: lib,
        })
    }
}

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(open).as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Why NCCL cannot be used here, or None.
pub fn unavailable_reason() -> Option<String> {
    lib().err().map(|e| e.to_string())
}

/// "NCCL 2.32.6 (libnccl.so.2)", or why there is none (for `segk doctor`).
pub fn describe() -> std::result::Result<String, String> {
    let l = lib().map_err(|e| e.to_string())?;
    let mut v = 0;
    // SAFETY: writes one int.
    check(l, "ncclGetVersion", unsafe { (l.get_version)(&mut v) }, None).map_err(|e| e.to_string())?;
    Ok(format!("NCCL {}.{}.{} ({})", v / 10000, v / 100 % 100, v % 100, l.path))
}

fn check(l: &Lib, what: &str, r: c_int, comm: Option<RawComm>) -> Result<()> {
    if r == SUCCESS {
        return Ok(());
    }
    // SAFETY: NCCL returns static strings; the communicator (when given) is live.
    let text = unsafe { CStr::from_ptr((l.get_error_string)(r)) }.to_string_lossy().into_owned();
    let last = comm.map(|c| unsafe { CStr::from_ptr((l.get_last_error)(c)) }.to_string_lossy().into_owned()).filter(|s| !s.is_empty());
    match last {
        Some(last) => bail!("NCCL {what}: {text} ({last})"),
        None => bail!("NCCL {what}: {text}"),
    }
}

/// A new unique id (rank 0 makes it and hands it to the others).
pub fn unique_id() -> Result<Vec<u8>> {
    let l = lib()?;
    let mut id = [0u8; 128];
    // SAFETY: writes one id.
    check(l, "ncclGetUniqueId", unsafe { (l.get_unique_id)(&mut id) }, None)?;
    Ok(id.to_vec())
}

/// This process's communicator. Never destroyed: the watchdog may abort it until the process
/// exits, and the process ends with the run.
pub struct Comm {
    raw: RawComm,
    pub rank: usize,
    pub size: usize,
}

// SAFETY: NCCL communicators may be used from any thread, one call at a time (ours are used by
// the thread that queues the backend's ops; ncclCommAbort and ncclCommGetAsyncError are
// documented as callable from another thread).
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl Comm {
    /// Joins the group `id` names as `rank` of `size` (blocks until every rank has joined). The
    /// GPU's context must be current on this thread.
    pub fn init(rank: usize, size: usize, id: &[u8]) -> Result<Comm> {
        let l = lib()?;
        let uid: [u8; 128] = id.try_into().map_err(|_| anyhow::anyhow!("an NCCL unique id has 128 bytes, got {}", id.len()))?;
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: writes one communicator.
        check(l, "ncclCommInitRank", unsafe { (l.comm_init_rank)(&mut raw, size as c_int, uid, rank as c_int) }, None)?;
        let handle = raw as usize;
        // A rank stopped by the watchdog aborts first: a collective waiting for a lost rank returns.
        crate::dist::group::on_abort(move || {
            // SAFETY: the communicator lives until the process exits.
            unsafe { (l.comm_abort)(handle as RawComm) };
        });
        crate::dist::group::on_check(move || {
            let mut err = SUCCESS;
            // SAFETY: as above; writes one result.
            let r = unsafe { (l.comm_get_async_error)(handle as RawComm, &mut err) };
            if r != SUCCESS || err == SUCCESS || err == IN_PROGRESS {
                return None;
            }
            Some(check(l, "asynchronous error", err, Some(handle as RawComm)).err().map(|e| e.to_string()).unwrap_or_default())
        });
        Ok(Comm { raw, rank, size })
    }

    /// x <- the sum of x over every rank (f32, in place), queued on `stream`.
    ///
    /// # Safety
    /// `ptr` addresses `len` f32 of this rank's GPU and `stream` is a live stream of its context.
    pub unsafe fn all_reduce_sum_f32(&self, ptr: u64, len: usize, stream: *mut c_void) -> Result<()> {
        let l = lib()?;
        // SAFETY: ptr addresses len f32 on this rank's GPU; stream is the backend's.
        let r = unsafe { (l.all_reduce)(ptr as *const c_void, ptr as *mut c_void, len, FLOAT32, SUM, self.raw, stream) };
        check(l, "all-reduce", r, Some(self.raw))
    }

    /// In place: `all` holds size x `len` f32, this rank's share at rank x `len`; every rank's
    /// share lands in every rank's `all`, in rank order.
    ///
    /// # Safety
    /// `all` addresses size x `len` f32 of this rank's GPU and `stream` is a live stream of its
    /// context.
    pub unsafe fn all_gather_f32(&self, all: u64, len: usize, stream: *mut c_void) -> Result<()> {
        let l = lib()?;
        let mine = all + (self.rank * len * 4) as u64;
        // SAFETY: as above; NCCL allows the in-place form (send = recv + rank * count).
        let r = unsafe { (l.all_gather)(mine as *const c_void, all as *mut c_void, len, FLOAT32, self.raw, stream) };
        check(l, "all-gather", r, Some(self.raw))
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NCCL rank {} of {}", self.rank, self.size)
    }
}
