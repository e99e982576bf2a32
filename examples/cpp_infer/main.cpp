// cpp_infer — run a scripted model with a streamcnn stem from C++.
//
//   cpp_infer MODEL.pt LIBSTREAMCNN.so H W [IMAGE.f32]
//
// Loads libstreamcnn (which registers torch.ops.streamcnn through the stable
// C ABI), loads the TorchScript model, and classifies one 3 x H x W float32
// image: read from IMAGE.f32 (raw little-endian float32, C-contiguous, values
// 0..255, exactly 3 x H x W of them), or a deterministic synthetic one. The
// stem streams tile by tile, so H x W can be far larger than a whole-image
// pass could hold in memory. Prints the logits, one per line; a bad argument
// is one line on stderr and exit status 2.
#include <torch/script.h>

#include <dlfcn.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

// H or W: a positive integer, or -1 (with a message).
static int64_t parse_size(const char *arg, const char *what) {
  char *end = nullptr;
  errno = 0;
  long long v = std::strtoll(arg, &end, 10);
  if (errno != 0 || end == arg || *end != '\0' || v < 1 || v > (1LL << 31)) {
    std::cerr << "cpp_infer: " << what << " must be a positive integer, got '" << arg
              << "'\n";
    return -1;
  }
  return v;
}

int main(int argc, char **argv) {
  if (argc < 5 || argc > 6) {
    std::cerr << "usage: " << argv[0]
              << " MODEL.pt LIBSTREAMCNN.so H W [IMAGE.f32]\n";
    return 2;
  }
  const int64_t h = parse_size(argv[3], "H"), w = parse_size(argv[4], "W");
  if (h < 0 || w < 0)
    return 2;
  const uint64_t bytes = 3ULL * static_cast<uint64_t>(h) * static_cast<uint64_t>(w) * 4;
  std::ifstream f;
  if (argc > 5) {
    // the file must be exactly the image: a larger one read in part gave
    // logits of the wrong pixels without a word
    f.open(argv[5], std::ios::binary | std::ios::ate);
    if (!f) {
      std::cerr << "cpp_infer: cannot open " << argv[5] << "\n";
      return 2;
    }
    const uint64_t size = static_cast<uint64_t>(f.tellg());
    if (size != bytes) {
      std::cerr << "cpp_infer: " << argv[5] << " holds " << size << " bytes; a 3 x " << h
                << " x " << w << " float32 image is " << bytes << "\n";
      return 2;
    }
    f.seekg(0);
  }
  // RTLD_GLOBAL is not needed: the library only calls into libtorch.
  if (!dlopen(argv[2], RTLD_NOW)) {
    std::cerr << "cpp_infer: cannot load " << argv[2] << ": " << dlerror() << "\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::jit::script::Module model = torch::jit::load(argv[1]);
    model.eval();
    torch::Tensor image;
    if (argc > 5) {
      image = torch::empty({1, 3, h, w}, torch::kFloat32);
      if (!f.read(reinterpret_cast<char *>(image.data_ptr<float>()),
                  static_cast<std::streamsize>(bytes))) {
        std::cerr << "cpp_infer: cannot read " << bytes << " bytes from " << argv[5] << "\n";
        return 1;
      }
    } else {
      // pixel values in 0 .. 255, as the models the application exports take
      image = torch::linspace(-1.0, 1.0, 3 * h * w).sin_().add_(1.0).mul_(127.5)
                  .reshape({1, 3, h, w});
    }
    torch::Tensor logits = model.forward({image}).toTensor().contiguous();
    for (int64_t i = 0; i < logits.numel(); i++)
      std::printf("%.9g\n", logits.data_ptr<float>()[i]);
  } catch (const std::exception &e) {
    std::cerr << "cpp_infer: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
