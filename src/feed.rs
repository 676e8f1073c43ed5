//! Batches from the pool onto the device, the upload of batch k+1 overlapping step k.
//!
//! On a GPU the pool's slots are page-locked, the backend copies a slot into a staging buffer
//! on its copy stream, and a step begins with a device-side copy from the staging buffer into
//! its input (tens of microseconds; the staging buffer holds f32, as the slots do, and the copy
//! converts into the net's activation storage, bf16 by default); the staging buffer is then refilled with the next batch
//! while the step runs. A slot goes back to the workers only after its upload has been waited
//! for, so no worker writes into memory the copy engine is still reading. On the CPU the same
//! calls are plain copies.

use crate::backend::Backend;
use crate::loader::pool::{Batch, Pool};
use anyhow::Result;

pub struct Feed<'a, B: Backend> {
    be: &'a B,
    image: B::Arena,
    labels: B::LabelArena,
    image_len: usize,
    label_len: usize,
    /// The batch whose upload is in flight: its slot stays here until `take_staged`.
    staged: Option<Batch>,
}

impl<'a, B: Backend> Feed<'a, B> {
    /// Staging buffers for batches of `image_len` values and `label_len` label voxels.
    pub fn new(be: &'a B, image_len: usize, label_len: usize) -> Result<Feed<'a, B>> {
        Ok(Feed { be, image: be.alloc(image_len)?, labels: be.alloc_labels(label_len)?, image_len, label_len, staged: None })
    }

    /// Device bytes of the staging buffers.
    pub fn bytes(&self) -> usize {
        self.image_len * self.be.elem_bytes() + self.label_len
    }

    /// Puts the next batch into `image`/`labels` on the device and starts uploading the one
    /// after it. Returns the batch now on the device (for its cases and labels); give it back
    /// to the pool after the step. Waiting for the pool counts as the pool's data wait.
    pub fn next(&mut self, pool: &mut Pool, image: B::Buf, labels: B::LabelBuf) -> Result<Batch> {
        if self.staged.is_none() {
            let first = pool.next_batch()?;
            self.stage(first)?;
        }
        let current = self.staged.take().expect("staged above");
        let be = self.be;
        if let Err(e) = be.take_staged(be.view(&self.image, 0, self.image_len), image, be.label_view(&self.labels, 0, self.label_len), labels) {
            // `current` is freed on return: not while the copy engine may still read it.
            let _ = be.sync_staged();
            return Err(e);
        }
        let following = pool.next_batch()?;
        self.stage(following)?;
        Ok(current)
    }

    fn stage(&mut self, b: Batch) -> Result<()> {
        anyhow::ensure!(b.image.len() == self.image_len && b.labels.len() == self.label_len, "batch of {}+{} values for staging buffers of {}+{}", b.image.len(), b.labels.len(), self.image_len, self.label_len);
        let be = self.be;
        // SAFETY: `b` is kept in self.staged, untouched, until the next take_staged (in
        // `next`) has waited for this copy; Drop waits for it too.
        if let Err(e) = unsafe { be.stage(be.view(&self.image, 0, self.image_len), &b.image, be.label_view(&self.labels, 0, self.label_len), &b.labels) } {
            // Part of the copy may be queued: wait for it before `b` is freed.
            let _ = be.sync_staged();
            return Err(e);
        }
        self.staged = Some(b);
        Ok(())
    }
}

impl<B: Backend> Drop for Feed<'_, B> {
    /// A batch still uploading, or the staging buffers being written, must not be freed under
    /// the copy engine: wait for the copies first.
    fn drop(&mut self) {
        let _ = self.be.sync_staged();
    }
}
