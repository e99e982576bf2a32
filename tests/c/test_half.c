/* test_half.c — kernels/half.h against an independent reference: every
 * float16 / bfloat16 value round-trips, and float32 -> float16 / bfloat16
 * rounds to the nearest representable value, ties to even, on all midpoints
 * (and their neighbours) and on many random floats. */
#include "half.h"
#include "testutil.h"

#include <math.h>
#include <stdlib.h>

static int is_nan16(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu); }

/* Nearest float16 to v by search over the finite non-negative values
 * (sorted by bit pattern), ties to the even pattern; inf beyond 65520. */
static float g_vals[0x7c01];
static uint16_t ref_f16(float v) {
  const uint16_t sign = signbit(v) ? 0x8000u : 0;
  const double a = fabs((double)v);
  if (isnan(v)) return 0x7e00u;
  if (a >= 65520.0) return (uint16_t)(sign | 0x7c00u);
  int lo = 0, hi = 0x7bff; /* g_vals[lo] <= a < g_vals[hi] */
  if (a >= g_vals[hi]) return (uint16_t)(sign | 0x7bffu);
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (g_vals[mid] <= a) lo = mid; else hi = mid;
  }
  const double dl = a - g_vals[lo], dh = g_vals[hi] - a;
  const int pick = dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi);
  return (uint16_t)(sign | pick);
}

static uint16_t ref_bf16(float v) {
  if (isnan(v)) return 0;
  if (isinf(v)) return (uint16_t)(sc_f32_bits(v) >> 16);
  const uint32_t u = sc_f32_bits(v);
  const uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
  const double a = fabs((double)v), al = fabs((double)sc_bits_f32(lo));
  /* past the largest finite value the next step is 2^128 (overflow rounds
   * to infinity from max + half an ulp on) */
  const double ah = (hi & 0x7fffffffu) == 0x7f800000u ? ldexp(1.0, 128)
                                                      : fabs((double)sc_bits_f32(hi));
  const double dl = a - al, dh = ah - a;
  const uint32_t pick = dl < dh ? lo : dh < dl ? hi : ((lo >> 16) % 2 == 0 ? lo : hi);
  return (uint16_t)(pick >> 16);
}

static uint32_t rng = 12345u;
static uint32_t next(void) {
  rng ^= rng << 13;
  rng ^= rng >> 17;
  rng ^= rng << 5;
  return rng;
}

int main(void) {
  for (int i = 0; i <= 0x7c00; i++) g_vals[i] = sc_f16_to_f32((uint16_t)i);
  CHECK(g_vals[0x3c00] == 1.0f);
  CHECK(g_vals[0x7bff] == 65504.0f);
  CHECK(g_vals[0x0001] == ldexpf(1.0f, -24));
  CHECK(isinf(g_vals[0x7c00]));
  /* round trips */
  int bad = 0;
  for (uint32_t h = 0; h <= 0xffffu; h++) {
    const float f = sc_f16_to_f32((uint16_t)h);
    const uint16_t back = sc_f32_to_f16(f);
    if (is_nan16((uint16_t)h) ? !is_nan16(back) : back != h) bad++;
    const float b = sc_bf16_to_f32((uint16_t)h);
    const uint16_t bb = sc_f32_to_bf16(b);
    if (isnan(b) ? !isnan(sc_bf16_to_f32(bb)) : bb != h) bad++;
  }
  CHECK_EQ(bad, 0);
  /* every midpoint between neighbouring float16 values, and one float ulp
   * either side of it */
  bad = 0;
  for (int i = 0; i < 0x7bff; i++) {
    const float mid = (float)(((double)g_vals[i] + (double)g_vals[i + 1]) / 2);
    const float near[3] = {nextafterf(mid, 0.0f), mid, nextafterf(mid, INFINITY)};
    for (int k = 0; k < 3; k++) {
      if (sc_f32_to_f16(near[k]) != ref_f16(near[k])) bad++;
      if (sc_f32_to_f16(-near[k]) != ref_f16(-near[k])) bad++;
    }
  }
  CHECK_EQ(bad, 0);
  CHECK_EQ(sc_f32_to_f16(65519.0f), 0x7bff);
  CHECK_EQ(sc_f32_to_f16(65520.0f), 0x7c00);
  CHECK_EQ(sc_f32_to_f16(ldexpf(1.0f, -25)), 0x0000); /* tie to even: 0 */
  CHECK_EQ(sc_f32_to_f16(ldexpf(3.0f, -25)), 0x0002); /* tie to even: 2 */
  CHECK(is_nan16(sc_f32_to_f16(NAN)));
  /* random floats of all magnitudes */
  bad = 0;
  for (int i = 0; i < 2000000; i++) {
    const float f = sc_bits_f32(next());
    if (isnan(f)) continue;
    if (sc_f32_to_f16(f) != ref_f16(f)) bad++;
    if (sc_f32_to_bf16(f) != ref_bf16(f)) bad++;
  }
  CHECK_EQ(bad, 0);
  /* bfloat16 ties */
  CHECK_EQ(sc_f32_to_bf16(sc_bits_f32(0x3f808000u)), 0x3f80); /* tie, even */
  CHECK_EQ(sc_f32_to_bf16(sc_bits_f32(0x3f818000u)), 0x3f82); /* tie, odd up */
  CHECK(isnan(sc_bf16_to_f32(sc_f32_to_bf16(NAN))));
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("test_half: all checks passed\n");
  return g_failures ? 1 : 0;
}
