#!/usr/bin/env python3
"""PyTorch peer of `segk bench step`: the same PlainConvUNet (nnU-Net v2's layout: conv with
bias -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01), 2 convs per stage, strided conv
downsampling, transposed-conv upsampling, skip concat, a 1x1x1 seg head per decoder stage),
the same deep-supervision Dice+CE loss and SGD-nesterov step, timed the same way (median of
--steps after --warmup). On a GPU: cuDNN benchmark mode, AMP bf16, channels_last_3d.

    python3 bench/torch_step.py --device cuda --stages 6 --patch 128 128 128 --batch 2
    python3 bench/torch_step.py --device cpu --threads 2        # nnU-Net's 5-stage default
    python3 bench/torch_step.py --device cpu --threads 2 --cpu-bf16 --channels-last  # oneDNN bf16
    python3 bench/torch_step.py --device cpu --blocks 1 3 4 6 6  # ResEnc's residual encoder

With --blocks the encoder is dynamic_network_architectures' ResidualEncoderUNet's (a stem, then
per stage that many ResNet-D basic blocks: conv-norm-LeakyReLU-conv-norm + skip, LeakyReLU; the
skip average-pooled when strided, projected by a bias-free 1x1x1 conv + norm when the width
changes) and the decoder has one conv per stage, as nnU-Net's ResEnc presets build it.

Prints one JSON object (keys as segk's --json where they mean the same)."""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def block(cin, cout, k, s):
    pad = tuple(x // 2 for x in k)
    return nn.Sequential(nn.Conv3d(cin, cout, k, s, pad, bias=True), nn.InstanceNorm3d(cout, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))


class BasicBlockD(nn.Module):
    def __init__(self, cin, cout, k, s):
        super().__init__()
        pad = tuple(x // 2 for x in k)
        self.conv1 = block(cin, cout, k, s)
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, k, 1, pad, bias=True), nn.InstanceNorm3d(cout, eps=1e-5, affine=True))
        skip = []
        if tuple(s) != (1, 1, 1):
            skip.append(nn.AvgPool3d(s, s))
        if cin != cout:
            skip += [nn.Conv3d(cin, cout, 1, 1, 0, bias=False), nn.InstanceNorm3d(cout, eps=1e-5, affine=True)]
        self.skip = nn.Sequential(*skip)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class PlainConvUNet(nn.Module):
    def __init__(self, cin, classes, feats, kernels, strides, convs=2, blocks=None):
        super().__init__()
        n = len(feats)
        self.enc = nn.ModuleList()
        for s in range(n):
            c0 = cin if s == 0 else feats[s - 1]
            if blocks:
                c0 = feats[0] if s == 0 else c0
                layers = [block(cin, feats[0], kernels[0], (1, 1, 1))] if s == 0 else []
                layers += [BasicBlockD(c0 if j == 0 else feats[s], feats[s], kernels[s], strides[s] if j == 0 else (1, 1, 1)) for j in range(blocks[s])]
            else:
                layers = [block(c0, feats[s], kernels[s], strides[s])] + [block(feats[s], feats[s], kernels[s], (1, 1, 1)) for _ in range(convs - 1)]
            self.enc.append(nn.Sequential(*layers))
        self.up, self.dec, self.seg = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in reversed(range(n - 1)):
            self.up.append(nn.ConvTranspose3d(feats[s + 1], feats[s], strides[s + 1], strides[s + 1], bias=True))
            layers = [block(2 * feats[s], feats[s], kernels[s], (1, 1, 1))] + [block(feats[s], feats[s], kernels[s], (1, 1, 1)) for _ in range(convs - 1)]
            self.dec.append(nn.Sequential(*layers))
            self.seg.append(nn.Conv3d(feats[s], classes, 1, 1, 0, bias=True))
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x, weights):
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
        outs = []
        x = skips[-1]
        n = len(skips)
        for i, (u, d, h) in enumerate(zip(self.up, self.dec, self.seg)):
            s = n - 2 - i
            x = d(torch.cat((u(x), skips[s]), 1))
            outs.append(h(x) if weights[s] > 0 else None)
        return outs[::-1]  # full resolution first


def ds_weights(n_out):
    if n_out == 1:
        return [1.0]
    w = [0.5 ** i for i in range(n_out)]
    w[-1] = 0.0
    t = sum(w)
    return [x / t for x in w]


def dice_ce(logits, target, classes):
    ce = F.cross_entropy(logits.float(), target)
    p = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(target, classes).movedim(-1, 1).float()
    axes = [0] + list(range(2, p.ndim))  # batch dice
    inter = (p * onehot).sum(axes)[1:]
    denom = (p.sum(axes) + onehot.sum(axes))[1:]
    dc = (2 * inter + 1e-5) / torch.clamp(denom + 1e-5, min=1e-8)
    return ce - dc.mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--patch", type=int, nargs=3, default=[80, 96, 80])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="no AMP")
    ap.add_argument("--cpu-bf16", action="store_true", help="on the CPU, torch.autocast('cpu', bfloat16): oneDNN's bf16 convolutions (AVX512-BF16/AMX)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last_3d on the CPU too (oneDNN's preferred layout)")
    ap.add_argument("--blocks", type=int, nargs="+", help="residual blocks per encoder stage (ResEnc)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    feats = [min(32 * 2 ** i, 320) for i in range(a.stages)]
    kernels = [(3, 3, 3)] * a.stages
    strides = [(1, 1, 1)] + [(2, 2, 2)] * (a.stages - 1)
    w = ds_weights(a.stages - 1)
    net = PlainConvUNet(a.in_channels, a.classes, feats, kernels, strides, convs=1 if a.blocks else 2, blocks=a.blocks).to(dev)
    fmt = torch.channels_last_3d if cuda or a.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(a.batch, a.in_channels, *a.patch, device=dev).to(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch, *a.patch), device=dev)
    targets = []
    size = list(a.patch)
    for s in range(a.stages - 1):
        targets.append(F.interpolate(y[:, None].float(), size=size, mode="nearest-exact")[:, 0].long())
        size = [v // 2 for v in size]
    amp = (cuda and not a.fp32) or (not cuda and a.cpu_bf16)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, fwd, bwd = [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            outs = net(x, w)
            loss = sum(w[s] * dice_ce(o, targets[s], a.classes) for s, o in enumerate(outs) if o is not None)
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= a.warmup:
            times.append(t2 - t0)
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    out = {
        "peer": f"torch {torch.__version__}" + (f" cudnn {torch.backends.cudnn.version()}" if cuda else f" {torch.get_num_threads()} threads"),
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "amp_bf16": amp,
        "channels_last": cuda or a.channels_last,
        "patch": a.patch,
        "batch": a.batch,
        "features": feats,
        "blocks": a.blocks,
        "steps": a.steps,
        "step_median_s": statistics.median(times),
        "step_min_s": min(times),
        "forward_median_s": statistics.median(fwd),
        "backward_median_s": statistics.median(bwd),
        # Device memory the caching allocator held at most (segk's figure is the device memory
        # its run holds, context excluded); the tensors' own peak beside it.
        "peak_gpu_bytes": torch.cuda.max_memory_reserved(dev) if cuda else None,
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
        "params": sum(p.numel() for p in net.parameters()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
