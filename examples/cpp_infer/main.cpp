// cpp_infer — run a scripted model with a streamcnn stem from C++.
//
//   cpp_infer MODEL.pt LIBSTREAMCNN.so H W [IMAGE.f32]
//
// Loads libstreamcnn (which registers torch.ops.streamcnn through the stable
// C ABI), loads the TorchScript model, and classifies one 3 x H x W float32
// image: read from IMAGE.f32 (raw little-endian float32, C-contiguous), or a
// deterministic synthetic one. The stem streams tile by tile, so H x W can be
// far larger than a whole-image pass could hold in memory. Prints the logits,
// one per line.
#include <torch/script.h>

#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char **argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0]
              << " MODEL.pt LIBSTREAMCNN.so H W [IMAGE.f32]\n";
    return 2;
  }
  const int64_t h = std::stoll(argv[3]), w = std::stoll(argv[4]);
  // RTLD_GLOBAL is not needed: the library only calls into libtorch.
  if (!dlopen(argv[2], RTLD_NOW)) {
    std::cerr << "cannot load " << argv[2] << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::jit::script::Module model = torch::jit::load(argv[1]);
    model.eval();
    torch::Tensor image;
    if (argc > 5) {
      std::ifstream f(argv[5], std::ios::binary);
      std::vector<float> data(static_cast<size_t>(3 * h * w));
      if (!f.read(reinterpret_cast<char *>(data.data()),
                  static_cast<std::streamsize>(data.size() * sizeof(float)))) {
        std::cerr << "cannot read " << 3 * h * w << " floats from " << argv[5]
                  << "\n";
        return 1;
      }
      image = torch::from_blob(data.data(), {1, 3, h, w}, torch::kFloat32).clone();
    } else {
      image = torch::linspace(-1.0, 1.0, 3 * h * w).reshape({1, 3, h, w}).sin();
    }
    torch::Tensor logits = model.forward({image}).toTensor().contiguous();
    for (int64_t i = 0; i < logits.numel(); i++)
      std::printf("%.9g\n", logits.data_ptr<float>()[i]);
  } catch (const std::exception &e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
