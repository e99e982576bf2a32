"""Does this torch's CPU convolution still get narrow outputs wrong?

oneDNN 3.10 (torch 2.11 on the CPU) computes a bfloat16 convolution with a
column stride over 1 and a one-column output of 5 or more rows wrongly
(garbage, NaN, varying between runs). Streamed tiles make such
convolutions (a one-column last tile, a narrow own part of a halo-cached
value), so op/aten.c (bf16_one_column) runs them on the window's columns
with stride 1. This sweep convolves narrow images (1 .. 30 columns) in
float32, bfloat16 and float16, NCHW and channels-last, grouped and not,
against float64 on the same rounded inputs, and counts the outputs whose
error is far beyond the dtype's rounding, by the shape's class. When a
torch upgrade shows no bad bfloat16 case, the workaround can go.

    .venv/bin/python bench/onednn_narrow_convs.py
"""

import argparse
import collections
import re

import torch
import torch.nn.functional as F

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def sweep():
    bad, total = collections.Counter(), collections.Counter()
    for dtype in TOL:
        for channels_last in (False, True):
            for c, groups in ((3, 1), (16, 1), (16, 4), (16, 16), (64, 1)):
                for k in (1, 2, 3, 5):
                    for stride in ((1, 1), (1, 2), (2, 2), (2, 1), (3, 3)):
                        for h in (1, 2, 5, 9, 21):
                            for w in (1, 2, 3, 5, 9, 30):
                                if h < k or w < k:
                                    continue
                                cout = 8 if groups == 1 else c
                                x = torch.randn(1, c, h, w).to(dtype)
                                wt = (torch.randn(cout, c // groups, k, k) / k).to(dtype)
                                b = torch.randn(cout).to(dtype)
                                if channels_last:
                                    x = x.contiguous(memory_format=torch.channels_last)
                                    wt = wt.contiguous(memory_format=torch.channels_last)
                                y = F.conv2d(x, wt, b, stride=stride, groups=groups)
                                ref = F.conv2d(x.double(), wt.double(), b.double(),
                                               stride=stride, groups=groups)
                                err = ((y.double() - ref).abs().max() /
                                       ref.abs().max()).item()
                                key = (str(dtype)[6:], channels_last, stride[1] > 1,
                                       y.shape[3] == 1, y.shape[2] >= 5)
                                total[key] += 1
                                if not err < TOL[dtype]:   # NaN counts as bad
                                    bad[key] += 1
    return bad, total


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bad, total = sweep()
    onednn = re.search(r"MKL-DNN (v[0-9.]+)", torch.__config__.show())
    print(f"# torch {torch.__version__}, oneDNN {onednn.group(1) if onednn else '?'}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print(f"{'dtype':9s} {'layout':13s} {'col stride>1':>12s} {'out cols=1':>10s} "
          f"{'out rows>=5':>11s} {'bad':>5s} {'of':>5s}")
    for key in sorted(total):
        dtype, cl, sw, ow1, oh5 = key
        print(f"{dtype:9s} {'channels_last' if cl else 'NCHW':13s} {str(sw):>12s} "
              f"{str(ow1):>10s} {str(oh5):>11s} {bad[key]:5d} {total[key]:5d}")
    print(f"bad: {sum(bad.values())} of {sum(total.values())} convolutions")


if __name__ == "__main__":
    main()
