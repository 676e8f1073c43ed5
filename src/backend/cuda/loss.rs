//! Launches of kernels/loss.cu (CPU twin: backend/cpu/loss.rs). The Dice terms between
//! the two passes are computed on the host by the CPU twin's `dice_terms`.

use super::{launch, CudaBackend, DevBuf, DevLabels};
use crate::backend::cpu::loss::{dice_terms, DiceTerms, Sums};
use crate::backend::{DiceMode, LossParts};
use crate::tensor::Dims;
use anyhow::{bail, ensure, Result};
use cudarc::driver::LaunchConfig;

pub fn softmax_dice_ce(be: &CudaBackend, z: DevBuf, ld: Dims, labels: DevLabels, mode: DiceMode, weight: f64) -> Result<LossParts> {
    let (c, v, n) = (ld.c, ld.voxels(), ld.n);
    ensure!(c >= 2, "the loss needs at least 2 classes (background + 1), got {c}");
    ensure!(z.len == ld.len() && labels.len == ld.rows(), "loss: logits {} and labels {} do not match {}", z.len, labels.len, ld);
    let per_sample_blocks = (2 * be.sms()).div_ceil(n).max(1);
    let chunk = v.div_ceil(per_sample_blocks).max(256);
    let nchunks = v.div_ceil(chunk);
    let width = 3 * c + 2;
    let part = be.scratch(n * nchunks * width + 2 * n * c)?;
    let cfg = LaunchConfig { grid_dim: (nchunks as u32, n as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: (4 * width) as u32 };
    let (vv, cc, ch) = (v as i64, c as i32, chunk as i64);
    launch!(be, loss_partial[z.dt], cfg, &z.ptr, &labels.ptr, &vv, &cc, &ch, &part);
    let host = be.read::<f32>(part, n * nchunks * width)?;
    let mut per_sample = vec![Sums::zeros(c); n];
    for (i, blk) in host.chunks_exact(width).enumerate() {
        if blk[3 * c + 1] as usize >= c {
            bail!("label {} found but the network has {c} classes", blk[3 * c + 1]);
        }
        let s = &mut per_sample[i / nchunks];
        for k in 0..c {
            s.inter[k] += blk[k] as f64;
            s.pred[k] += blk[c + k] as f64;
            s.gt[k] += blk[2 * c + k] as f64;
        }
        s.ce += blk[3 * c] as f64;
    }
    let DiceTerms { parts, coef, terms, total_vox } = dice_terms(&per_sample, mode, v);
    let flat: Vec<f32> = coef.iter().flatten().flat_map(|&(dc, inv)| [dc as f32, inv as f32]).collect();
    let coef_ptr = part + 4 * (n * nchunks * width) as u64;
    be.write(coef_ptr, &flat)?;
    let (nn, per, t, tv, w) = (n as i32, (mode == DiceMode::PerSample) as i32, terms as f32, total_vox as f32, weight as f32);
    launch!(be, loss_grad[z.dt], be.grid(ld.rows()), &z.ptr, &labels.ptr, &nn, &vv, &cc, &coef_ptr, &per, &t, &tv, &w);
    Ok(parts)
}
