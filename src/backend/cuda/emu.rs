//! The CPU emulator of the CUDA kernels (kernels/emu, built by build.rs with a C++ compiler):
//! `--device emu` runs the CUDA backend's own launches, grids and workspace layout with every
//! kernel executed on the host, so the GPU code path is checked against the CPU twins where no
//! GPU is. One launch at a time (the emulator's state is global).

use anyhow::Result;
use cudarc::driver::LaunchConfig;
use std::ffi::c_void;

#[cfg(segk_emu)]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    extern "C" {
        pub fn segk_emu_launch(name: *const c_char, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shared_bytes: c_uint, params: *mut *mut c_void) -> c_int;
        pub fn segk_emu_error() -> *const c_char;
        pub fn segk_emu_set_schedule(seed: u64);
    }
}

/// Whether this build carries the emulator.
pub fn available() -> Result<()> {
    if cfg!(segk_emu) {
        Ok(())
    } else {
        anyhow::bail!("--device emu: this build has no kernel emulator (no C++ compiler was found when it was built)")
    }
}

#[cfg(segk_emu)]
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the blocks of every later launch, and the threads of a block between barriers, in an
/// order shuffled from `seed` (0: grid order, thread order; `SEGK_EMU_SCHEDULE=seed` sets it
/// for a whole process, the fake driver's included). A kernel whose result depends on the order
/// its warps or blocks run in gives different bits under two seeds, as on a GPU from run to run.
pub fn set_schedule(seed: u64) -> Result<()> {
    available()?;
    #[cfg(not(segk_emu))]
    let _ = seed;
    #[cfg(segk_emu)]
    {
        let _one_at_a_time = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: sets a global the launches (serialised by LOCK) read.
        unsafe { ffi::segk_emu_set_schedule(seed) };
    }
    Ok(())
}

/// Runs kernel `name` over `cfg`'s grid on the host.
///
/// # Safety
/// `params` must point at the kernel's arguments in order, with the types of its signature;
/// pointer arguments must address host memory valid for the kernel's accesses.
#[cfg(segk_emu)]
pub unsafe fn launch(name: &str, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let cname = std::ffi::CString::new(name)?;
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    // SAFETY: the caller's promise; the emulator reads params[i] as the i-th argument.
    let rc = unsafe { ffi::segk_emu_launch(cname.as_ptr(), g.0, g.1, g.2, b.0, b.1, b.2, cfg.shared_mem_bytes, params.as_mut_ptr()) };
    if rc != 0 {
        // SAFETY: the emulator returns a NUL-terminated message it owns.
        let msg = unsafe { std::ffi::CStr::from_ptr(ffi::segk_emu_error()) }.to_string_lossy().into_owned();
        anyhow::bail!("emulated kernel launch failed: {msg}");
    }
    Ok(())
}

/// # Safety
/// Never runs: without the emulator `CudaBackend::emulated` refuses first.
#[cfg(not(segk_emu))]
pub unsafe fn launch(name: &str, _cfg: LaunchConfig, _params: &mut [*mut c_void]) -> Result<()> {
    anyhow::bail!("{name}: this build has no kernel emulator")
}
