"""Write the committed seed corpora of the fuzz targets (tests/fuzz/corpus/).

Run from the repository root with the package importable:
    PYTHONPATH=python STREAMCNN_LIBRARY=build/dev/libstreamcnn.so \
        python tests/fuzz/make_seeds.py [targets...]   (default: all)
Programs come from real stems converted by streamcnn.program.convert (so
the decoder's seeds are valid and mutations start deep inside it); the
geometry / memory seeds prefix a header of six uint32 (h, w, tile_h,
tile_w, flags, mask; see fuzz_common.h); the slide seeds are tiny tiled
pyramidal TIFFs written by sc_tiff_write_pyramid; the resample seeds are
fuzz_resample.c's 28-byte header and a few pixel bytes (plain bytes: they
need neither torch nor the package, `make_seeds.py resample`).
"""
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def stems():
    import torch
    import torch.nn as nn
    import torchvision

    torch.manual_seed(0)
    r18 = torchvision.models.resnet18().eval()
    yield "resnet18_layer1", nn.Sequential(r18.conv1, r18.bn1, r18.relu, r18.maxpool, r18.layer1)
    yield "resnet18_layer2", nn.Sequential(r18.conv1, r18.bn1, r18.relu, r18.maxpool, r18.layer1,
                                           r18.layer2)
    yield "convs", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 4, 5, stride=2, padding=2, dilation=1),
                                 nn.LeakyReLU(0.1), nn.AvgPool2d(3, 2, 1, ceil_mode=True),
                                 nn.Conv2d(4, 2, 3, dilation=2), nn.GELU())
    yield "pools", nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(3, 3, (1, 3)),
                                 nn.AvgPool2d(2, count_include_pad=False, divisor_override=3),
                                 nn.Sigmoid(), nn.Tanh(), nn.SiLU(), nn.Hardswish())
    cnx = torchvision.models.convnext_tiny().eval()
    yield "convnext_stage0", nn.Sequential(cnx.features[0], cnx.features[1][0])
    # cat instructions: a dense block (a chain of joins), inception branches
    f = torchvision.models.densenet121().features.eval()
    yield "densenet_block1", nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0, f.denseblock1,
                                           f.transition1)
    g = torchvision.models.googlenet(aux_logits=False, init_weights=False).eval()
    yield "googlenet_inception3a", nn.Sequential(g.conv1, g.maxpool1, g.conv2, g.conv3,
                                                 g.maxpool2, g.inception3a)
    # channels instructions: chunks of channel shuffles
    s = torchvision.models.shufflenet_v2_x0_5().eval()
    yield "shufflenet_stage2", nn.Sequential(s.conv1, s.maxpool, s.stage2)


def words_bytes(words):
    return struct.pack(f"<{len(words)}q", *words)


def header(h, w, th, tw, flags, mask=0xFFFFFFFF):
    return struct.pack("<6I", h - 1, w - 1, th - 1, tw - 1, flags, mask)


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def resample_header(planes, mode, in_h, in_w, out_h, out_w, box, threads, bad, value):
    """fuzz_resample.c's header: box = (y, x, h, w) of the output; the
    fields are taken modulo there, so the values here are the ones used."""
    by, bx, bh, bw = box
    return struct.pack("<BB8HBBQ", planes - 1, mode, in_h - 1, in_w - 1, out_h - 1, out_w - 1,
                       by, bx, bh - 1, bw - 1, threads - 1, bad, value)


def resample_seeds():
    ramp = bytes((7 * i + (i * i >> 3)) & 255 for i in range(97))
    seeds = {
        # downscale by non-integer factors, three planes, an inner box
        "down_rgb": resample_header(3, 0, 40, 57, 11, 7, (3, 2, 5, 4), 2, 0, 5) + ramp,
        # upscale a tiny image, a box over both 64-row strips
        "up_gray": resample_header(1, 0, 5, 3, 90, 80, (10, 7, 70, 50), 3, 4, 2) + ramp[:11],
        # many row taps (4000 -> 3) and many column taps (4096 -> 1), the
        # other axis at most 16
        "long_rows": resample_header(2, 1, 4000, 15, 3, 11, (1, 4, 2, 6), 1, 6, 1 << 40) + ramp,
        "long_cols": resample_header(1, 2, 13, 4096, 16, 1, (5, 0, 9, 1), 3, 8, 9) + ramp[:64],
        # equal sizes: a copy
        "copy": resample_header(3, 0, 33, 20, 33, 20, (0, 0, 33, 20), 1, 12, 3) + ramp,
        # no pixel bytes (the pattern), one-pixel output, span queries
        "no_pixels_one_out": resample_header(1, 0, 96, 96, 1, 1, (0, 0, 1, 1), 2, 11, 7),
        # a constant image, a 1 x 1 source stretched
        "constant_stretch": resample_header(2, 0, 1, 1, 47, 61, (46, 60, 1, 1), 2, 9, 0) + b"\x9c",
    }
    for name, data in seeds.items():
        write("resample", name, data)


def main(targets=()):
    want = set(targets) or {"program", "geometry", "memory", "slide", "resample"}
    if "resample" in want:
        resample_seeds()
    if want & {"program", "geometry", "memory"}:
        programs(want)
    if "slide" in want:
        slides()
    for t in sorted(os.listdir(ROOT)):
        files = os.listdir(os.path.join(ROOT, t))
        size = sum(os.path.getsize(os.path.join(ROOT, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")


def programs(want):
    from streamcnn.program import convert

    for name, stem in stems():
        prog = convert(stem).program
        if "program" in want:
            write("program", name, words_bytes(prog))
        for tag, hdr in [("small", header(300, 257, 128, 96, 0)),
                         ("huge", header(1 << 20, (1 << 31), 1 << 16, 1 << 12, 1)),
                         ("tiny_tile", header(97, 64, 40, 300, 0))]:
            if "geometry" in want:
                write("geometry", f"{name}_{tag}", hdr + words_bytes(prog))
        for tag, hdr in [("cached_cpu_f32", header(512, 384, 160, 200, 2 | 4 | (2 << 3))),
                         ("cone_f16_mask", header(300, 300, 96, 128, (1 << 3) | 32, 0x5))]:
            if "memory" in want:
                write("memory", f"{name}_{tag}", hdr + words_bytes(prog))


def slides():
    import torch
    from streamcnn.data.synthetic import write_slide, aperio_description

    g = torch.Generator().manual_seed(0)
    # smooth content with a little noise: small files (fast fuzzing), real
    # compressed tiles
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    noise = torch.randint(0, 8, (48, 64, 3), dtype=torch.int64, generator=g)
    lv0 = (torch.stack([xx * 4, yy * 5, (xx + yy) * 2], -1) + noise).clamp(0, 255).to(torch.uint8)
    lv1 = lv0[::2, ::2].contiguous()
    d = os.path.join(ROOT, "slide")
    os.makedirs(d, exist_ok=True)
    write_slide(os.path.join(d, "generic_deflate.tiff"), [lv0, lv1], tile=16)
    write_slide(os.path.join(d, "generic_jpeg.tiff"), [lv0[:32, :32].contiguous()], tile=16,
                compression="jpeg", quality=50)
    # a small tiled directory first (as a Leica SCN's macro image): only
    # Aperio files are held to shrinking levels, the others reach OpenSlide
    write_slide(os.path.join(d, "generic_small_first.tiff"), [lv1, lv0], tile=16)
    write_slide(os.path.join(d, "aperio.svs"), [lv0, lv1], tile=16,
                description=aperio_description(64, 48, 16, 0.25))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
