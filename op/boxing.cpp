// boxing.cpp — the two lines of C++ the C core needs.
//
// An optional argument with a value crosses torch_call_dispatcher as a
// pointer to a heap StableIValue, and libtorch (2.10 .. 2.12) frees it with
// C++ `delete`. So it must come from C++ `new`, not from malloc.
#include <cstdint>
#include <new>

extern "C" uint64_t _sc_box_some(uint64_t value) {
  // 0 on allocation failure; callers treat 0 as an error (0 is also None).
  return static_cast<uint64_t>(
      reinterpret_cast<std::uintptr_t>(new (std::nothrow) uint64_t(value)));
}

// Frees a box that was never handed to the dispatcher (error paths only).
extern "C" void _sc_box_free(uint64_t boxed) {
  delete reinterpret_cast<uint64_t *>(static_cast<std::uintptr_t>(boxed));
}
