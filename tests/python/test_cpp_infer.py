"""examples/cpp_infer: a C++-only program (libtorch from the pip wheel +
libstreamcnn) runs the scripted model and matches Python; under a memory
limit it classifies an image the whole-image model cannot."""

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import streamcnn

tv = pytest.importorskip("torchvision")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp_infer"


@pytest.fixture(scope="module")
def cpp_infer(tmp_path_factory):
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("needs cmake and a C++ compiler to build examples/cpp_infer")
    build = tmp_path_factory.mktemp("cpp_infer_build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(EXAMPLE), "-B", str(build), *gen,
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    return build / "cpp_infer"


def _models(tile):
    torch.manual_seed(0)
    r = tv.models.resnet18(weights=None, num_classes=4).eval()
    stem, head = streamcnn.models.split_resnet(r, stream_upto="layer2", tile_size=tile)
    streamed = nn.Sequential(stem, head).eval()
    whole = nn.Sequential(*stem.stem.children(), head).eval()
    return streamed, whole


def _run(exe, model_path, h, w, image=None, data_limit=None):
    def limit():
        if data_limit:
            resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))
    args = [str(exe), str(model_path), streamcnn.library_path(), str(h), str(w)]
    if image is not None:
        args.append(str(image))
    return subprocess.run(args, capture_output=True, text=True, preexec_fn=limit)


def test_cpp_matches_python(cpp_infer, tmp_path):
    streamed, _ = _models(256)
    path = tmp_path / "model.pt"
    torch.jit.script(streamed).save(str(path))
    x = torch.randn(1, 3, 300, 280)
    x.numpy().astype("<f4").tofile(tmp_path / "x.f32")
    res = _run(cpp_infer, path, 300, 280, tmp_path / "x.f32")
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor([float(v) for v in res.stdout.split()])
    with torch.no_grad():
        want = streamed(x).flatten()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # bad arguments: one line, exit 2 (a size that is no number was an
    # uncaught std::invalid_argument, a file larger than the image was
    # read in part)
    short = tmp_path / "short.f32"
    short.write_bytes(b"\0" * 12)
    for args, says in (((300, "abc", tmp_path / "x.f32"), "W must be a positive integer"),
                       ((0, 280, tmp_path / "x.f32"), "H must be a positive integer"),
                       ((100, 100, tmp_path / "x.f32"), "holds 1008000 bytes; a 3 x 100 x 100 "
                                                        "float32 image is 120000"),
                       ((300, 280, short), "holds 12 bytes"),
                       ((300, 280, tmp_path / "nosuch.f32"), "cannot open")):
        res = _run(cpp_infer, path, *args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert res.stderr.startswith("cpp_infer: ") and says in res.stderr, res.stderr
    res = subprocess.run([str(cpp_infer), str(path), str(tmp_path / "nosuch.so"), "300", "280"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "cpp_infer: cannot load" in res.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA semantics")
def test_cpp_streams_what_whole_image_cannot_hold(cpp_infer, tmp_path):
    """4096^2 (16.8 MP) under a 2.2 GB data limit: the whole-image model
    fails to allocate, the streamed one classifies the image. Measured on
    the development VM (2 vCPU, torch 2.11): the smallest RLIMIT_DATA each
    runs under is 3.03 GB whole-image and 1.47 GB streamed (0.69 GB of that
    the process before any image: libtorch, thread stacks), so the limit
    sits well clear of both."""
    streamed, whole = _models(512)
    torch.jit.script(streamed).save(str(tmp_path / "streamed.pt"))
    torch.jit.script(whole).save(str(tmp_path / "whole.pt"))
    limit = 2_200_000_000
    bad = _run(cpp_infer, tmp_path / "whole.pt", 4096, 4096, data_limit=limit)
    assert bad.returncode != 0
    ok = _run(cpp_infer, tmp_path / "streamed.pt", 4096, 4096, data_limit=limit)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(ok.stdout.split()) == 4
