/* test_region_copy.c — sc_region_copy_plan (kernels/tile.h), the address
 * arithmetic of the host image prefetch: the 2-D copies it describes,
 * replayed here with memcpy as cudaMemcpy2DAsync performs them, must give
 * the region element for element in a tensor of the returned strides, on
 * random images (NCHW and NHWC, element sizes 1 / 2 / 4 / 8, any region);
 * other layouts are refused. */
#include "tile.h"
#include "testutil.h"

#include <stdlib.h>

static uint32_t g_state = 12345u;
static uint32_t next(void) {
  g_state ^= g_state << 13;
  g_state ^= g_state >> 17;
  g_state ^= g_state << 5;
  return g_state;
}
static int64_t pick(int64_t lo, int64_t hi) { return lo + next() % (hi - lo + 1); }

/* One random case; 0 when the copy gives the region exactly. */
static int one_case(void) {
  const int64_t sz[4] = {pick(1, 3), pick(1, 5), pick(1, 17), pick(1, 19)};
  const int nhwc = (int)(next() % 2);
  const int64_t es = (int64_t)1 << pick(0, 3);
  int64_t st[4];
  dense_strides(sz, nhwc, st);
  const int64_t r0 = pick(0, sz[2] - 1), c0 = pick(0, sz[3] - 1);
  const int64_t rows[2] = {r0, pick(r0 + 1, sz[2])};
  const int64_t cols[2] = {c0, pick(c0 + 1, sz[3])};
  const int64_t count = sz[0] * sz[1] * sz[2] * sz[3];
  unsigned char *img = malloc((size_t)(count * es));
  const int64_t nr = rows[1] - rows[0], nc = cols[1] - cols[0];
  const int64_t dcount = sz[0] * sz[1] * nr * nc;
  unsigned char *dst = malloc((size_t)(dcount * es));
  for (int64_t i = 0; i < count * es; i++) img[i] = (unsigned char)next();
  memset(dst, 0xEE, (size_t)(dcount * es));
  sc_region_copy rc = {0};
  const int kind = sc_region_copy_plan(sz, st, es, rows, cols, &rc);
  /* C = 1 (or H = W = 1): dense NCHW and NHWC at once, either will do */
  int bad = kind != (nhwc ? 2 : 1) && !(kind && (sz[1] == 1 || sz[2] * sz[3] == 1));
  /* the copies, as cudaMemcpy2DAsync makes them */
  for (int64_t i = 0; !bad && i < rc.planes; i++)
    for (int64_t y = 0; y < rc.rows; y++)
      memcpy(dst + (i * rc.rows + y) * rc.row_bytes,
             img + rc.offset + i * rc.src_plane + y * rc.src_pitch,
             (size_t)rc.row_bytes);
  CHECK_EQ(rc.planes * rc.rows * rc.row_bytes, dcount * es);
  for (int64_t n = 0; !bad && n < sz[0]; n++)
    for (int64_t c = 0; c < sz[1]; c++)
      for (int64_t y = 0; y < nr; y++)
        for (int64_t x = 0; x < nc; x++) {
          const int64_t s = n * st[0] + c * st[1] + (rows[0] + y) * st[2] +
                            (cols[0] + x) * st[3];
          const int64_t d = n * rc.dst_stride[0] + c * rc.dst_stride[1] +
                            y * rc.dst_stride[2] + x * rc.dst_stride[3];
          if (memcmp(img + s * es, dst + d * es, (size_t)es)) bad = 1;
        }
  if (bad)
    fprintf(stderr, "region copy differs: %lldx%lldx%lldx%lld %s, es %lld, rows "
            "[%lld, %lld) cols [%lld, %lld)\n", (long long)sz[0], (long long)sz[1],
            (long long)sz[2], (long long)sz[3], nhwc ? "NHWC" : "NCHW",
            (long long)es, (long long)rows[0], (long long)rows[1],
            (long long)cols[0], (long long)cols[1]);
  free(img);
  free(dst);
  return bad;
}

int main(void) {
  int bad = 0;
  for (int k = 0; k < 3000; k++) bad += one_case();
  CHECK_EQ(bad, 0);
  /* layouts no plain 2-D copy reads: refused */
  const int64_t sz[4] = {2, 3, 8, 9}, rows[2] = {1, 4}, cols[2] = {2, 7};
  sc_region_copy rc = {0};
  const int64_t padded[4] = {3 * 8 * 10, 8 * 10, 10, 1}; /* rows 10 apart */
  CHECK_EQ(sc_region_copy_plan(sz, padded, 1, rows, cols, &rc), 0);
  const int64_t cw[4] = {3 * 8 * 9, 1, 3, 8 * 3}; /* W before H */
  CHECK_EQ(sc_region_copy_plan(sz, cw, 1, rows, cols, &rc), 0);
  const int64_t bcast[4] = {0, 8 * 9, 9, 1}; /* expanded batch */
  CHECK_EQ(sc_region_copy_plan(sz, bcast, 1, rows, cols, &rc), 0);
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("test_region_copy: all checks passed\n");
  return g_failures ? 1 : 0;
}
