//! Host memory for the batch slots. Plain heap memory on the CPU; page-locked (pinned) memory
//! when the CUDA backend runs, so the copy engine reads a slot directly (async, full PCIe rate)
//! instead of the driver staging it through its own buffer first. The loader asks a
//! [`HostAlloc`] for its slots and never knows which kind it got; the backend provides one.

use anyhow::Result;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Memory a device copy may read; `Pod` so that zeroed bytes are a valid value.
pub trait HostElem: bytemuck::Pod + Send + Sync {}
impl HostElem for f32 {}
impl HostElem for u8 {}

/// A zeroed array of `T` in host memory, owned. `owner` keeps the allocation alive (a `Vec`
/// whose heap buffer does not move when the Vec does, or a pinned block freed on drop).
pub struct HostBuf<T: HostElem> {
    ptr: NonNull<T>,
    len: usize,
    pinned: bool,
    _owner: Box<dyn Send + Sync>,
}

// SAFETY: a HostBuf owns its memory exclusively (the pointer is never shared outside it), and
// T is Send + Sync.
unsafe impl<T: HostElem> Send for HostBuf<T> {}
unsafe impl<T: HostElem> Sync for HostBuf<T> {}

impl<T: HostElem> HostBuf<T> {
    /// Heap memory, zeroed.
    pub fn heap(len: usize) -> HostBuf<T> {
        let mut v = vec![T::zeroed(); len];
        let ptr = NonNull::new(v.as_mut_ptr()).expect("Vec pointers are never null");
        HostBuf { ptr, len, pinned: false, _owner: Box::new(v) }
    }

    /// Wraps foreign memory of `len` elements at `ptr` that `owner` frees on drop.
    ///
    /// # Safety
    /// `ptr` must address `len` initialised, aligned `T` that nothing else uses, valid for as
    /// long as `owner` lives.
    pub unsafe fn from_owner(ptr: NonNull<T>, len: usize, pinned: bool, owner: Box<dyn Send + Sync>) -> HostBuf<T> {
        HostBuf { ptr, len, pinned, _owner: owner }
    }

    /// Page-locked: a device copy from it runs asynchronously to the host.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }
}

impl<T: HostElem> Deref for HostBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr addresses len initialised T owned by self (see from_owner / heap).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: HostElem> DerefMut for HostBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref; &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Where batch slots come from. One per backend: heap memory on the CPU, pinned on CUDA.
pub trait HostAlloc: Send + Sync {
    fn f32s(&self, len: usize) -> Result<HostBuf<f32>>;
    fn bytes(&self, len: usize) -> Result<HostBuf<u8>>;
    /// What the slots are, for the start-up line ("pinned", "pageable").
    fn kind(&self) -> &'static str;
}

/// Ordinary heap memory.
pub struct Heap;

impl HostAlloc for Heap {
    fn f32s(&self, len: usize) -> Result<HostBuf<f32>> {
        Ok(HostBuf::heap(len))
    }
    fn bytes(&self, len: usize) -> Result<HostBuf<u8>> {
        Ok(HostBuf::heap(len))
    }
    fn kind(&self) -> &'static str {
        "pageable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_zeroed_writable_and_survive_moves() {
        let mut a = Heap.f32s(1000).unwrap();
        assert!(a.iter().all(|&v| v == 0.0));
        a[999] = 3.5;
        let moved = [a];
        let b = &moved[0];
        assert_eq!(b.len(), 1000);
        assert_eq!(b[999], 3.5);
        assert!(!b.is_pinned());
        let c = Heap.bytes(0).unwrap();
        assert!(c.is_empty());
        // A buffer crosses threads with its contents.
        let h = std::thread::spawn(move || moved[0][999]);
        assert_eq!(h.join().unwrap(), 3.5);
    }
}
