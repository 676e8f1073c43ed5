//! The residual encoder of nnU-Net's ResidualEncoderUNet (the ResEnc presets), forward and
//! backward, written out op by op as the PlainConvUNet's are: a stem (conv -> norm ->
//! LeakyReLU), then per stage ResNet-D basic blocks (dynamic_network_architectures'
//! BasicBlockD): y = LeakyReLU(norm(conv2(LeakyReLU(norm(conv1(x))))) + skip(x)), the skip
//! x itself, average-pooled by the stride, and/or projected by a bias-free 1x1x1 conv + norm.
//! The decoder is the PlainConvUNet's (model/unet.rs).

use super::plan::{res_bwd_roles, Checkpointing, GradBuf, ResSlots, Slot};
use super::unet::{BlockId, Pass};
use crate::backend::{Act, Backend};
use anyhow::Result;

impl<B: Backend> Pass<'_, B> {
    fn res_slots(&self, s: usize, j: usize) -> ResSlots {
        self.a.plan.res[s][j]
    }

    /// The input of block j of stage s: the previous block's output, the previous stage's
    /// output, or the stem's.
    fn res_input(&self, s: usize, j: usize) -> B::Buf {
        let p = &self.a.plan;
        let y: Slot = match (s, j) {
            (0, 0) => p.stem.expect("a residual encoder's plan has a stem").y,
            (_, 0) => p.res[s - 1].last().expect("every stage has a block").y,
            _ => p.res[s][j - 1].y,
        };
        self.act(&y)
    }

    /// Zeros (the projections' bias) and the discard area for their bias gradient.
    fn spare(&self, c: usize) -> (B::Buf, B::Buf) {
        let arena = self.net.spare.as_ref().expect("a residual net has its spare arena");
        let widest = self.net.topo.features.iter().copied().max().unwrap_or(0);
        (self.be.view(arena, 0, c), self.be.view(arena, widest, c))
    }

    pub(super) fn res_stage_fwd(&self, s: usize) -> Result<()> {
        if s == 0 {
            self.block_fwd(BlockId::Stem, self.act(&self.a.plan.image))?;
        }
        for j in 0..self.net.topo.blocks_per_stage[s] {
            self.res_block_fwd(s, j)?;
        }
        Ok(())
    }

    fn res_block_fwd(&self, s: usize, j: usize) -> Result<()> {
        let (be, rb, p, a) = (self.be, self.net.topo.res_block(s, j), self.net.layout.res[s][j], self.res_slots(s, j));
        let out = a.x2.dims;
        let stat = |o| self.stat(o, out.n * out.c);
        let input = self.res_input(s, j);
        self.block_fwd(BlockId::Res(s, j), input)?;
        let h1 = self.y(BlockId::Res(s, j))?;
        let c2 = p.conv2;
        be.conv_fwd(h1, a.c1.y.dims, self.par(c2.conv.w, rb.conv2.weight_len()), self.par(c2.conv.b, out.c), self.act(&a.x2), &rb.conv2)?;
        be.norm_stats(self.act(&a.x2), out, stat(a.mean2), stat(a.rstd2))?;
        let (src, src_dims) = match (rb.pool, a.pooled) {
            (Some(k), Some(pooled)) => {
                be.avg_pool(input, a.input, k, self.act(&pooled))?;
                (self.act(&pooled), pooled.dims)
            }
            _ => (input, a.input),
        };
        let residual = match (rb.proj, p.proj, a.proj) {
            (Some(g), Some((w, gamma, beta)), Some((xs, ms, rs, r))) => {
                be.conv_fwd(src, src_dims, self.par(w, g.weight_len()), self.spare(out.c).0, self.act(&xs), &g)?;
                be.norm_stats(self.act(&xs), out, stat(ms), stat(rs))?;
                be.norm_fwd(self.act(&xs), out, stat(ms), stat(rs), self.par(gamma, out.c), self.par(beta, out.c), None, Act::Identity, self.act(&r))?;
                self.act(&r)
            }
            _ => src,
        };
        be.norm_fwd(self.act(&a.x2), out, stat(a.mean2), stat(a.rstd2), self.par(c2.gamma, out.c), self.par(c2.beta, out.c), Some(residual), Act::LeakyRelu, self.act(&a.y))
    }

    /// Backward through block j of stage s. `g` holds d(output) and is used up; `dst`
    /// receives d(input) (`beta` 1 adds to it); `h` and `q` are scratch of the largest
    /// block output.
    fn res_block_bwd(&self, s: usize, j: usize, g: usize, dst: (usize, f32), h: usize, q: usize) -> Result<()> {
        let (be, rb, p, a) = (self.be, self.net.topo.res_block(s, j), self.net.layout.res[s][j], self.res_slots(s, j));
        let out = a.x2.dims;
        let stat = |o| self.stat(o, out.n * out.c);
        let (dx, beta) = (self.act_at(dst.0, a.input.len()), dst.1);
        let dpre = self.act_at(g, out.len());
        be.leaky_bwd(dpre, self.act(&a.y), dpre)?;
        // The skip: d(residual) = d(pre-activation); through the projection (its gradient in
        // `h`, free until conv2's), then the pooling (from `q`), into dx.
        let input = self.res_input(s, j);
        match (rb.proj, p.proj, a.proj) {
            (Some(pg), Some((w, gamma, beta_p)), Some((xs, ms, rs, _))) => {
                let ds = self.act_at(h, out.len());
                be.norm_bwd(dpre, self.act(&xs), out, stat(ms), stat(rs), self.par(gamma, out.c), self.par(beta_p, out.c), Act::Identity, ds, self.grad(gamma, out.c), self.grad(beta_p, out.c))?;
                let (src, src_dims) = match a.pooled {
                    Some(pooled) => (self.act(&pooled), pooled.dims),
                    None => (input, a.input),
                };
                be.conv_wgrad(src, src_dims, ds, self.grad(w, pg.weight_len()), self.spare(out.c).1, &pg)?;
                match rb.pool {
                    Some(k) => {
                        let dq = self.act_at(q, src_dims.len());
                        be.conv_dgrad(ds, self.par(w, pg.weight_len()), dq, src_dims, &pg, 0.0)?;
                        be.avg_pool_bwd(dq, k, dx, a.input, beta)?;
                    }
                    None => be.conv_dgrad(ds, self.par(w, pg.weight_len()), dx, a.input, &pg, beta)?,
                }
            }
            // Pooled, or the input itself (a pooling by 1 copies, or adds with beta 1).
            _ => be.avg_pool_bwd(dpre, rb.pool.unwrap_or([1, 1, 1]), dx, a.input, beta)?,
        }
        // The main path: conv2's norm (no activation), conv2, then conv1's block, whose input
        // gradient adds to the skip's.
        let c2 = p.conv2;
        be.norm_bwd(dpre, self.act(&a.x2), out, stat(a.mean2), stat(a.rstd2), self.par(c2.gamma, out.c), self.par(c2.beta, out.c), Act::Identity, dpre, self.grad(c2.gamma, out.c), self.grad(c2.beta, out.c))?;
        let h1 = self.y(BlockId::Res(s, j))?;
        let h1_dims = a.c1.y.dims;
        be.conv_wgrad(h1, h1_dims, dpre, self.grad(c2.conv.w, rb.conv2.weight_len()), self.grad(c2.conv.b, out.c), &rb.conv2)?;
        be.conv_dgrad(dpre, self.par(c2.conv.w, rb.conv2.weight_len()), self.act_at(h, h1_dims.len()), h1_dims, &rb.conv2, 0.0)?;
        self.block_bwd(BlockId::Res(s, j), input, h, Some((dst.0, 1.0)))
    }

    /// The encoder's backward, bottleneck first, with the buffers [`res_bwd_roles`] assigns:
    /// d(bottleneck output) arrives in gb; each other stage's output gradient waits in its
    /// skip buffer (the decoder's share, to which the next stage's first block adds its own).
    pub(super) fn res_encoder_bwd(&self) -> Result<()> {
        let p = &self.a.plan;
        let rotation = [p.ga, p.gb, p.gd, p.gp];
        let at = |b: GradBuf| match b {
            GradBuf::Rot(i) => rotation[i],
            GradBuf::Skip(s) => p.skip_grad[s],
        };
        let roles = res_bwd_roles(&self.net.topo.blocks_per_stage);
        for s in (0..roles.len()).rev() {
            if self.policy() == Checkpointing::Level2 {
                self.res_stage_fwd(s)?;
            }
            for (j, r) in roles[s].iter().enumerate().rev() {
                let adds = matches!(r.dst, GradBuf::Skip(_));
                self.res_block_bwd(s, j, at(r.g), (at(r.dst), if adds { 1.0 } else { 0.0 }), rotation[r.h], rotation[r.q])?;
            }
            self.sum_ready(false)?;
        }
        // The stem: d(its output) is where block (0, 0) put it; the image needs no gradient.
        self.block_bwd(BlockId::Stem, self.act(&p.image), at(roles[0][0].dst), None)
    }
}
