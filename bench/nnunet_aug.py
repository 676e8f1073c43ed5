"""nnU-Net v2's training transform chain, one thread, patch 128^3, 1 channel, 3 labels, deep
supervision: samples per second per core (the peer figure for `cargo bench --bench loader`).
The input is the loader's larger initial patch (205^3) of a smooth random image and blob labels,
so the numbers exclude loading and cropping, as the issue's reference figure does.

usage: python bench/nnunet_aug.py [seconds]   (needs: pip install nnunetv2)
"""
import sys, time
import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

torch.set_num_threads(1)
patch = (128, 128, 128)
rot = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
ds_scales = [[1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3, [0.0625] * 3]
tr = nnUNetTrainer.get_training_transforms(patch, rot, ds_scales, (0, 1, 2), False, use_mask_for_norm=[False])
rng = np.random.default_rng(0)
shape = (205, 205, 205)
zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
img = (np.sin(3 * xx) + np.cos(2 * yy) * zz + 0.1 * rng.standard_normal(shape)).astype(np.float32)[None]
seg = np.zeros(shape, np.int16)
seg[(xx ** 2 + yy ** 2 + zz ** 2) < 0.3] = 1
seg[((xx - 0.3) ** 2 + yy ** 2 + zz ** 2) < 0.05] = 2
seg = seg[None]
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
n, t0 = 0, time.time()
while time.time() - t0 < budget:
    tr(image=torch.from_numpy(img.copy()), segmentation=torch.from_numpy(seg.copy()))
    n += 1
dt = time.time() - t0
print(f"nnU-Net v2 transform chain, 1 thread, patch 128^3: {n} samples in {dt:.1f} s = {n / dt:.2f} samples/s per core")
