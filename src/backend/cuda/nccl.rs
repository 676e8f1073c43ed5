//! NCCL, for training on several GPUs: libnccl is opened at run time through cudarc's bindings
//! (the binary starts without it, and says how to get it when a multi-GPU run needs it). One
//! communicator per process, its collectives queued on the backend's compute stream, so they
//! are ordered with the ops around them and nothing waits on the host.

use anyhow::{bail, Result};
use cudarc::nccl::sys;
use std::ffi::c_void;

/// Why NCCL cannot be used here, or None.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        return None;
    }
    Some("NCCL (libnccl.so.2) could not be loaded: install it (`pip install nvidia-nccl-cu13`, then put its lib folder on LD_LIBRARY_PATH, or the libnccl2 package of your distribution)".into())
}

fn check(what: &str, r: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> Result<()> {
    if r == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: NCCL returns static strings; the communicator (when given) is live.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(r)) }.to_string_lossy().into_owned();
    let last = comm.map(|c| unsafe { std::ffi::CStr::from_ptr(sys::ncclGetLastError(c)) }.to_string_lossy().into_owned()).filter(|s| !s.is_empty());
    match last {
        Some(l) => bail!("NCCL {what}: {text} ({l})"),
        None => bail!("NCCL {what}: {text}"),
    }
}

/// A new unique id (rank 0 makes it and hands it to the others).
pub fn unique_id() -> Result<Vec<u8>> {
    if let Some(why) = unavailable_reason() {
        bail!("{why}");
    }
    let mut id = sys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: writes one id.
    check("ncclGetUniqueId", unsafe { sys::ncclGetUniqueId(&mut id) }, None)?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// This process's communicator. Never destroyed: the watchdog may abort it until the process
/// exits, and the process ends with the run.
pub struct Comm {
    raw: sys::ncclComm_t,
    pub rank: usize,
    pub size: usize,
}

// SAFETY: NCCL communicators may be used from any thread, one call at a time (ours are made on
// the thread that queues the backend's ops; ncclCommAbort is documented as callable from
// another thread).
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl Comm {
    /// Joins the group `id` names as `rank` of `size` (blocks until every rank has joined). The
    /// GPU's context must be current on this thread.
    pub fn init(rank: usize, size: usize, id: &[u8]) -> Result<Comm> {
        if let Some(why) = unavailable_reason() {
            bail!("{why}");
        }
        anyhow::ensure!(id.len() == 128, "an NCCL unique id has 128 bytes, got {}", id.len());
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        uid.internal.iter_mut().zip(id).for_each(|(d, &s)| *d = s as _);
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: writes one communicator.
        check("ncclCommInitRank", unsafe { sys::ncclCommInitRank(&mut raw, size as i32, uid, rank as i32) }, None)?;
        let comm = Comm { raw, rank, size };
        let handle = raw as usize;
        // A rank stopped by the watchdog aborts first: a collective waiting for a lost rank returns.
        crate::dist::group::on_abort(move || {
            // SAFETY: the communicator outlives the process's last use of it (it is never
            // destroyed before exit while a watchdog may still call this).
            unsafe { sys::ncclCommAbort(handle as sys::ncclComm_t) };
        });
        crate::dist::group::on_check(move || {
            let mut err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: as above; writes one result.
            let r = unsafe { sys::ncclCommGetAsyncError(handle as sys::ncclComm_t, &mut err) };
            if r != sys::ncclResult_t::ncclSuccess || err == sys::ncclResult_t::ncclSuccess || err == sys::ncclResult_t::ncclInProgress {
                return None;
            }
            Some(check("asynchronous error", err, Some(handle as sys::ncclComm_t)).err().map(|e| e.to_string()).unwrap_or_default())
        });
        Ok(comm)
    }

    /// x <- the sum of x over every rank (f32, in place), queued on `stream`.
    pub fn all_reduce_sum_f32(&self, ptr: u64, len: usize, stream: *mut c_void) -> Result<()> {
        // SAFETY: ptr addresses len f32 on this rank's GPU; stream is the backend's.
        let r = unsafe { sys::ncclAllReduce(ptr as *const c_void, ptr as *mut c_void, len, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, self.raw, stream as sys::cudaStream_t) };
        check("all-reduce", r, Some(self.raw))
    }

    /// In place: `all` holds size x `len` f32, this rank's share at rank x `len`; every rank's
    /// share lands in every rank's `all`, in rank order.
    pub fn all_gather_f32(&self, all: u64, len: usize, stream: *mut c_void) -> Result<()> {
        let mine = all + (self.rank * len * 4) as u64;
        // SAFETY: as above; NCCL allows the in-place form (send = recv + rank * count).
        let r = unsafe { sys::ncclAllGather(mine as *const c_void, all as *mut c_void, len, sys::ncclDataType_t::ncclFloat32, self.raw, stream as sys::cudaStream_t) };
        check("all-gather", r, Some(self.raw))
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NCCL rank {} of {}", self.rank, self.size)
    }
}
