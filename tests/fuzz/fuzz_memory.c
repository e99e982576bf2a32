/*
 * fuzz_memory.c — libFuzzer target: the work and memory models
 * (sc_work_info, sc_memory_info, which StreamingModule.budget_tile and
 * memory_budget search over).
 *
 * Input: fuzz_common.h's header + program words. flags bit 0: huge
 * extents; bit 1: halo caching; bit 2: CPU convolutions; bits 3-4: the
 * itemsize (1, 2, 4, 8); bit 5: a gradient mask from `mask` (bit k % 32 for
 * entry k) instead of NULL (all). Checked: both models succeed exactly
 * when the tiling does, every number is finite and >= 0, halo caching
 * computes no more than the whole image, strips exist only with caching, and the backward's peak
 * holds at least the forward's. Tilings of more than MAX_TILES tiles per
 * axis are skipped: both models visit every tile (linear in the count).
 */
#include "fuzz_common.h"
#include "internal.h"

#include <math.h>

#define MAX_TILES 1024

static int finite_nonneg(double x) { return isfinite(x) && x >= 0.0; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_params q;
  if (!fz_params_read(data, size, &q)) return 0;
  int64_t n;
  int64_t *words = fz_words(data + FZ_HEADER, size - FZ_HEADER, &n);
  if (!words) return 0;
  int64_t info[SC_PLAN_WORDS];
  char msg[256];
  if (sc_tiling_info(words, n, q.h, q.w, q.tile_h, q.tile_w, info, msg,
                     sizeof msg) != SC_OK ||
      info[4] > MAX_TILES || info[5] > MAX_TILES) {
    free(words);
    return 0;
  }
  const int64_t n_params = words[4]; /* decoded: header checked */
  const int flags = (q.flags >> 1 & 1 ? SC_MEMORY_CACHED : 0) |
                    (q.flags >> 2 & 1 ? SC_MEMORY_CPU : 0);
  const int itemsize = 1 << (q.flags >> 3 & 3);
  int *mask = NULL;
  if (q.flags >> 5 & 1) {
    mask = malloc((size_t)(n_params + 1) * sizeof *mask);
    FZ_CHECK(mask);
    for (int64_t k = 0; k <= n_params; k++) mask[k] = q.mask >> (k % 32) & 1;
  }
  double work[SC_WORK_WORDS], mem[SC_MEMORY_WORDS];
  FZ_CHECK(sc_work_info(words, n, q.h, q.w, q.tile_h, q.tile_w, work, msg,
                        sizeof msg) == SC_OK);
  for (int k = 0; k < SC_WORK_WORDS; k++) FZ_CHECK(finite_nonneg(work[k]));
  const double tol = 1e-9;
  /* halo caching computes each element of [0, e_v) of every value once:
   * no more than the whole image. (Not compared with the cone tiles: the
   * whole image and halo caching also compute rows and columns no output
   * reads, e.g. the gaps between the taps of a dilated kernel, which cone
   * tiles skip; found by this fuzzer.) */
  FZ_CHECK(work[4] <= work[0] * (1 + tol));
  FZ_CHECK(work[5] <= work[2] * (1 + tol));
  FZ_CHECK(sc_memory_info(words, n, q.h, q.w, q.tile_h, q.tile_w, flags,
                          mask, itemsize, mem, msg, sizeof msg) == SC_OK);
  for (int k = 0; k < SC_MEMORY_WORDS; k++) FZ_CHECK(finite_nonneg(mem[k]));
  FZ_CHECK(mem[1] > 0.0);
  if (!(flags & SC_MEMORY_CACHED)) FZ_CHECK(mem[2] == 0.0);
  FZ_CHECK(mem[0] >= mem[1] * (1 - tol)); /* the recompute keeps more */
  /* bad arguments are refused, not misread */
  FZ_CHECK(sc_memory_info(words, n, q.h, q.w, q.tile_h, q.tile_w, 8, mask,
                          itemsize, mem, msg, sizeof msg) == SC_ERR);
  FZ_CHECK(sc_memory_info(words, n, q.h, q.w, q.tile_h, q.tile_w, flags,
                          mask, 3, mem, msg, sizeof msg) == SC_ERR);
  free(mask);
  free(words);
  return 0;
}
