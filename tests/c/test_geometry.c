/* test_geometry.c — box arithmetic against hand-computed values. */
#include "streamcnn.h"
#include "testutil.h"

#include <stdlib.h>

static sc_program *decode(tprog *t) {
  sc_program *p = NULL;
  sc_error err = {0};
  tp_end(t);
  if (sc_program_decode(t->w, t->n, &p, &err)) {
    fprintf(stderr, "decode failed: %s\n", err.msg);
    g_failures++;
  }
  return p;
}

static void test_window_out(void) {
  /* conv: floor((n + 2p - d(k-1) - 1) / s) + 1 */
  sc_window c3 = {3, 1, 1, 1, 1, 0};
  CHECK_EQ(sc_window_out(&c3, 10), 10);
  sc_window c7 = {7, 2, 1, 3, 3, 0}; /* ResNet conv1 */
  CHECK_EQ(sc_window_out(&c7, 224), 112);
  CHECK_EQ(sc_window_out(&c7, 97), 49);
  sc_window cd = {3, 1, 2, 0, 0, 0}; /* dilated: effective extent 5 */
  CHECK_EQ(sc_window_out(&cd, 5), 1);
  CHECK_EQ(sc_window_out(&cd, 4), 0); /* too small */
  sc_window same = {4, 1, 1, 1, 2, 0}; /* 'same' with an even kernel */
  CHECK_EQ(sc_window_out(&same, 9), 9);
  /* max pool, ResNet: 112 -> 56 */
  sc_window mp = {3, 2, 1, 1, 1, 0};
  CHECK_EQ(sc_window_out(&mp, 112), 56);
  CHECK_EQ(sc_window_out(&mp, 7), 4);
  /* ceil_mode (values checked against torch.nn.functional) */
  sc_window ce = {3, 2, 1, 0, 0, 1};
  CHECK_EQ(sc_window_out(&ce, 6), 3); /* floor would give 2 */
  CHECK_EQ(sc_window_out(&ce, 5), 2);
  CHECK_EQ(sc_window_out(&ce, 2), 1); /* window larger than the input */
  sc_window cp = {3, 2, 1, 1, 1, 1};
  CHECK_EQ(sc_window_out(&cp, 6), 4);
  CHECK_EQ(sc_window_out(&cp, 5), 3); /* last window would start in padding */
}

static void test_receptive_field(void) {
  tprog t;
  /* conv3 -> conv3 s2 -> conv3: 3, then +2*1, then +2*2 = 9; stride 2 */
  tp_begin(&t, 3, 3);
  int64_t v = tp_conv(&t, 0, 0, 3, 4, 3, 1, 1, 1);
  v = tp_conv(&t, v, 1, 4, 4, 3, 2, 1, 1);
  tp_conv(&t, v, 2, 4, 4, 3, 1, 1, 1);
  sc_program *p = decode(&t);
  CHECK_EQ(sc_input_extent(p, 0, 1), 9);
  CHECK_EQ(sc_input_extent(p, 1, 1), 9);
  CHECK_EQ(p->stride[0], 2);
  CHECK_EQ(sc_input_extent(p, 0, 5), 9 + 4 * 2);
  /* largest output tile for a 20-px input tile: (20 - 9) / 2 + 1 = 6 */
  CHECK_EQ(sc_tile_out_extent(p, 0, 20), 6);
  CHECK_EQ(sc_input_extent(p, 0, 6), 19);
  CHECK_EQ(sc_tile_out_extent(p, 0, 9), 1);
  CHECK_EQ(sc_tile_out_extent(p, 0, 8), 0); /* below the receptive field */
  sc_program_free(p);

  /* ResNet stem: conv7 s2 p3 + maxpool3 s2 p1: 7 + 2 * 2 = 11, stride 4 */
  tp_begin(&t, 3, 1);
  v = tp_conv(&t, 0, 0, 3, 8, 7, 2, 3, 1);
  tp_maxpool(&t, v, 3, 2, 1, 0);
  p = decode(&t);
  CHECK_EQ(sc_input_extent(p, 0, 1), 11);
  CHECK_EQ(p->stride[1], 4);
  sc_program_free(p);

  /* dilation 3, kernel 3: extent 7 */
  tp_begin(&t, 1, 1);
  tp_conv(&t, 0, 0, 1, 1, 3, 1, 0, 3);
  p = decode(&t);
  CHECK_EQ(sc_input_extent(p, 1, 1), 7);
  sc_program_free(p);
}

static void test_plan_conv(void) {
  tprog t;
  tp_begin(&t, 1, 1);
  tp_conv(&t, 0, 0, 1, 1, 3, 1, 1, 1); /* k3 p1: same size */
  sc_program *p = decode(&t);
  int64_t sizes[4];
  sc_error err = {0};
  CHECK_EQ(sc_value_sizes(p, 10, 7, sizes, &err), SC_OK);
  CHECK_EQ(sizes[2], 10);
  CHECK_EQ(sizes[3], 7);
  sc_axis_plan *plan = sc_axis_plan_new(p);
  /* output rows [0, 4): reads [-1, 5) (row -1 is padding), computes [0, 5) */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 0, 4, plan, &err), SC_OK);
  CHECK_EQ(plan->read[0], -1);
  CHECK_EQ(plan->read[1], 5);
  CHECK_EQ(plan->region[0], 0);
  CHECK_EQ(plan->region[1], 5);
  CHECK_EQ(plan->region[2], 0);
  CHECK_EQ(plan->region[3], 4);
  /* output rows [8, 10): reads [7, 11), the image has rows [7, 10) */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 8, 10, plan, &err), SC_OK);
  CHECK_EQ(plan->read[0], 7);
  CHECK_EQ(plan->read[1], 11);
  CHECK_EQ(plan->region[0], 7);
  CHECK_EQ(plan->region[1], 10);
  /* interior: [4, 6) reads [3, 7) */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 4, 6, plan, &err), SC_OK);
  CHECK_EQ(plan->region[0], 3);
  CHECK_EQ(plan->region[1], 7);
  /* outside the output: refused */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 8, 11, plan, &err), SC_ERR);
  sc_axis_plan_free(plan);
  sc_program_free(p);
}

/* v1 = relu(x); v2 = conv3 p1 (v1); v3 = v2 + v1; v4 = conv1 s2 (v3) */
static int64_t residual_words(tprog *t) {
  tp_begin(t, 2, 2);
  int64_t v1 = tp_relu(t, 0);
  int64_t v2 = tp_conv(t, v1, 0, 2, 2, 3, 1, 1, 1);
  int64_t v3 = tp_add(t, v2, v1);
  tp_conv(t, v3, 1, 2, 2, 1, 2, 0, 1);
  tp_end(t);
  return v1;
}

static sc_program *residual_program(int64_t *v1) {
  tprog t;
  *v1 = residual_words(&t);
  return decode(&t);
}

static void test_plan_residual_hull(void) {
  int64_t v1;
  sc_program *p = residual_program(&v1);
  CHECK_EQ(p->n_consumers[v1], 2);
  int64_t sizes[10];
  sc_error err = {0};
  CHECK_EQ(sc_value_sizes(p, 9, 9, sizes, &err), SC_OK);
  CHECK_EQ(sizes[8], 5); /* (9 - 1) / 2 + 1 */
  sc_axis_plan *plan = sc_axis_plan_new(p);
  /* output [2, 4) -> v3 reads [4, 7) -> v2 [4, 7), v1 hull of conv's
   * [3, 8) and add's [4, 7) = [3, 8) -> x [3, 8) */
  CHECK_EQ(sc_plan_axis(p, sizes, 1, 2, 4, plan, &err), SC_OK);
  CHECK_EQ(plan->region[2 * 3 + 0], 4);
  CHECK_EQ(plan->region[2 * 3 + 1], 7);
  CHECK_EQ(plan->region[2 * 2 + 0], 4);
  CHECK_EQ(plan->region[2 * 2 + 1], 7);
  CHECK_EQ(plan->region[2 * 1 + 0], 3);
  CHECK_EQ(plan->region[2 * 1 + 1], 8);
  CHECK_EQ(plan->region[0], 3);
  CHECK_EQ(plan->region[1], 8);
  /* read spans: conv (instr 1) reads v1 [3, 8); add (instr 2) both [4, 7) */
  CHECK_EQ(plan->read[4 * 1 + 0], 3);
  CHECK_EQ(plan->read[4 * 1 + 1], 8);
  CHECK_EQ(plan->read[4 * 2 + 2], 4);
  CHECK_EQ(plan->read[4 * 2 + 3], 7);
  /* planning toward value 3 (the add) instead of the output: [4, 7) of v3
   * gives the same cone as above, and value 4 / instruction 3 are empty */
  CHECK_EQ(sc_plan_axis_to(p, sizes, 1, 3, 4, 7, plan, &err), SC_OK);
  CHECK_EQ(plan->region[2 * 4 + 0], 0);
  CHECK_EQ(plan->region[2 * 4 + 1], 0);
  CHECK_EQ(plan->read[4 * 3 + 0], 0);
  CHECK_EQ(plan->read[4 * 3 + 1], 0);
  CHECK_EQ(plan->region[2 * 3 + 0], 4);
  CHECK_EQ(plan->region[2 * 3 + 1], 7);
  CHECK_EQ(plan->region[2 * 1 + 0], 3);
  CHECK_EQ(plan->region[2 * 1 + 1], 8);
  CHECK_EQ(plan->read[4 * 1 + 0], 3);
  CHECK_EQ(plan->read[4 * 1 + 1], 8);
  /* a span outside value 3 (9 columns) or target 0 are refused */
  CHECK_EQ(sc_plan_axis_to(p, sizes, 1, 3, 8, 10, plan, &err), SC_ERR);
  CHECK_EQ(sc_plan_axis_to(p, sizes, 1, 0, 0, 1, plan, &err), SC_ERR);
  /* per-value strides */
  CHECK_EQ(p->vstride[2 * 3 + 1], 1);
  CHECK_EQ(p->vstride[2 * 4 + 1], 2);
  /* last output row [4, 5) -> v3 [8, 9) -> v1 [7, 10) clipped to [7, 9) */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 4, 5, plan, &err), SC_OK);
  CHECK_EQ(plan->region[2 * 1 + 0], 7);
  CHECK_EQ(plan->region[2 * 1 + 1], 9);
  CHECK_EQ(plan->read[4 * 1 + 1], 10); /* one row of zero padding */
  sc_axis_plan_free(plan);
  sc_program_free(p);
}

/* own and region spans of the 5 values of a plan */
static void check_spans(const sc_axis_plan *plan, const int64_t *own,
                        const int64_t *reg) {
  for (int k = 0; k < 10; k++) {
    CHECK_EQ(plan->own[k], own[k]);
    CHECK_EQ(plan->region[k], reg[k]);
  }
}

static void test_plan_cached(void) {
  /* the residual program, rows 9 -> 5, tiled [0, 2), [2, 4), [4, 5) with
   * halo caching */
  int64_t v1;
  sc_program *p = residual_program(&v1);
  int64_t sizes[10];
  sc_error err = {0};
  CHECK_EQ(sc_value_sizes(p, 9, 9, sizes, &err), SC_OK);
  sc_axis_plan *plan = sc_axis_plan_new(p);
  /* first tile: the cone of [0, 2) (x, v1 [0, 4); v2, v3 [0, 3)), no halo */
  CHECK_EQ(sc_plan_axis_cached(p, sizes, 0, 0, 2, plan, &err), SC_OK);
  const int64_t own0[10] = {0, 4, 0, 4, 0, 3, 0, 3, 0, 2};
  check_spans(plan, own0, own0);
  /* [2, 4): cone of [0, 4) ends x, v1 8; v2, v3 7; minus the ends above;
   * the 3x3 conv reads v1 [2, 8) for its own [3, 7): v1's halo is [2, 4) */
  CHECK_EQ(sc_plan_axis_cached(p, sizes, 0, 2, 4, plan, &err), SC_OK);
  const int64_t own1[10] = {4, 8, 4, 8, 3, 7, 3, 7, 2, 4};
  const int64_t reg1[10] = {4, 8, 2, 8, 3, 7, 3, 7, 2, 4};
  check_spans(plan, own1, reg1);
  CHECK_EQ(plan->read[4 * 1 + 0], 2); /* conv of v1 */
  CHECK_EQ(plan->read[4 * 1 + 1], 8);
  CHECK_EQ(plan->read[4 * 3 + 0], 4); /* 1x1 stride 2 of v3 */
  CHECK_EQ(plan->read[4 * 3 + 1], 7);
  /* last tile [4, 5): own to the ends; the conv reads one padding row */
  CHECK_EQ(sc_plan_axis_cached(p, sizes, 0, 4, 5, plan, &err), SC_OK);
  const int64_t own2[10] = {8, 9, 8, 9, 7, 9, 7, 9, 4, 5};
  const int64_t reg2[10] = {8, 9, 6, 9, 7, 9, 7, 9, 4, 5};
  check_spans(plan, own2, reg2);
  CHECK_EQ(plan->read[4 * 1 + 1], 10);
  /* bad requests */
  CHECK_EQ(sc_plan_axis_cached(p, NULL, 0, 0, 2, plan, &err), SC_ERR);
  CHECK_EQ(sc_plan_axis_cached(p, sizes, 0, 3, 3, plan, &err), SC_ERR);
  /* an uncached plan owns its whole region */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 2, 4, plan, &err), SC_OK);
  for (int k = 0; k < 10; k++) CHECK_EQ(plan->own[k], plan->region[k]);
  sc_axis_plan_free(plan);
  sc_program_free(p);
}

static void test_plan_ceil_and_padding_only(void) {
  tprog t;
  /* maxpool k3 s2 ceil on 6 -> 3 outputs; the last reads [4, 7) of 6 */
  tp_begin(&t, 1, 0);
  tp_maxpool(&t, 0, 3, 2, 0, 1);
  sc_program *p = decode(&t);
  int64_t sizes[4];
  sc_error err = {0};
  CHECK_EQ(sc_value_sizes(p, 6, 6, sizes, &err), SC_OK);
  CHECK_EQ(sizes[2], 3);
  sc_axis_plan *plan = sc_axis_plan_new(p);
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 2, 3, plan, &err), SC_OK);
  CHECK_EQ(plan->read[0], 4);
  CHECK_EQ(plan->read[1], 7);
  CHECK_EQ(plan->region[0], 4);
  CHECK_EQ(plan->region[1], 6);
  sc_axis_plan_free(plan);
  sc_program_free(p);

  /* conv k1 p2: the first two output rows read only padding */
  tp_begin(&t, 1, 1);
  const int64_t f[16] = {0, 0, -1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 0, 0};
  tp_emit(&t, 1, 16, f);
  p = decode(&t);
  CHECK_EQ(sc_value_sizes(p, 5, 5, sizes, &err), SC_OK);
  CHECK_EQ(sizes[2], 9);
  plan = sc_axis_plan_new(p);
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 0, 2, plan, &err), SC_OK);
  CHECK_EQ(plan->read[0], -2);
  CHECK_EQ(plan->read[1], 0);
  CHECK(plan->region[1] <= plan->region[0]); /* image rows: none */
  CHECK_EQ(sc_plan_axis(p, sizes, 0, 7, 9, plan, &err), SC_OK);
  CHECK_EQ(plan->read[0], 5);
  CHECK_EQ(plan->read[1], 7);
  CHECK(plan->region[1] <= plan->region[0]);
  sc_axis_plan_free(plan);
  sc_program_free(p);
}

static void test_sizes_errors(void) {
  tprog t;
  tp_begin(&t, 1, 1);
  tp_conv(&t, 0, 0, 1, 1, 5, 1, 0, 1);
  sc_program *p = decode(&t);
  int64_t sizes[4];
  sc_error err = {0};
  CHECK_EQ(sc_value_sizes(p, 4, 9, sizes, &err), SC_ERR);
  CHECK(strstr(err.msg, "too small") != NULL);
  sc_error err2 = {0};
  CHECK_EQ(sc_value_sizes(p, 0, 9, sizes, &err2), SC_ERR);
  sc_program_free(p);

  /* add of two branches that differ in extent for odd sizes */
  tp_begin(&t, 1, 2);
  int64_t a = tp_conv(&t, 0, 0, 1, 1, 1, 2, 0, 1);
  int64_t b = tp_conv(&t, 0, 1, 1, 1, 2, 2, 0, 1);
  tp_add(&t, a, b);
  p = decode(&t);
  sc_error err3 = {0};
  int64_t s6[8]; /* 3 instructions: 4 values (found by make sanitize) */
  CHECK_EQ(sc_value_sizes(p, 8, 8, s6, &err3), SC_OK);
  CHECK_EQ(sc_value_sizes(p, 9, 8, s6, &err3), SC_ERR);
  CHECK(strstr(err3.msg, "add") != NULL);
  sc_program_free(p);
}

/* ResNet's conv1 (7, stride 2, padding 3; 3 -> 8 channels), max pool
 * (3, 2, 1) */
static void conv1_pool_words(tprog *t) {
  tp_begin(t, 3, 1);
  int64_t v = tp_conv(t, 0, 0, 3, 8, 7, 2, 3, 1);
  tp_maxpool(t, v, 3, 2, 1, 0);
  tp_end(t);
}

static void test_tiling_info(void) {
  tprog t;
  conv1_pool_words(&t);
  int64_t plan[SC_PLAN_WORDS];
  char msg[256];
  /* 97 x 131 -> conv 49 x 66 -> pool 25 x 33; tile 27 -> (27-11)/4+1 = 5 */
  CHECK_EQ(sc_tiling_info(t.w, t.n, 97, 131, 27, 27, plan, msg, sizeof msg),
           SC_OK);
  CHECK_EQ(plan[0], 25);
  CHECK_EQ(plan[1], 33);
  CHECK_EQ(plan[2], 5);
  CHECK_EQ(plan[3], 5);
  CHECK_EQ(plan[4], 5);
  CHECK_EQ(plan[5], 7);
  CHECK_EQ(sc_tiling_info(t.w, t.n, 97, 131, 10, 27, plan, msg, sizeof msg),
           SC_ERR);
  CHECK(strstr(msg, "minimum tile_size for this stem is 11 x 11") != NULL);
  CHECK_EQ(sc_tiling_info(t.w, t.n, 97, 131, 0, 27, plan, msg, sizeof msg),
           SC_ERR);
  /* a tile larger than the image: one tile */
  CHECK_EQ(sc_tiling_info(t.w, t.n, 97, 131, 4096, 4096, plan, msg,
                          sizeof msg),
           SC_OK);
  CHECK_EQ(plan[4], 1);
  CHECK_EQ(plan[5], 1);
}

/* Tile bounds: cone tiles of the output tile edge; cached tiles with the
 * first shrunk to read about as much as the next. Six 3x3 convolutions
 * (receptive field 13, stride 1) on 40 x 40, tile 20: output tiles of 8,
 * 5 per axis. A cached first tile [0, t0) reads t0 + 6 input rows, a next
 * one of r rows r + 2 (its own r rows from t0 + 6 on, and the first
 * convolution reads 2 more before them: rows t0 + 4, t0 + 5 were computed
 * by the first tile); the smallest t0 with t0 + 6 >= r + 2, r =
 * ceil((40 - t0) / 4), is 5, and 4 reads no less at most. */
static void test_tile_bounds(void) {
  tprog t;
  tp_begin(&t, 1, 6);
  int64_t v = 0;
  for (int k = 0; k < 6; k++) v = tp_conv(&t, v, k, 1, 1, 3, 1, 1, 1);
  tp_end(&t);
  int64_t rows[6], cols[6];
  char msg[256];
  CHECK_EQ(sc_tile_bounds(t.w, t.n, 40, 40, 20, 20, 0, rows, 6, cols, 6, msg,
                          sizeof msg),
           SC_OK);
  const int64_t cone[6] = {0, 8, 16, 24, 32, 40};
  for (int k = 0; k < 6; k++) CHECK_EQ(rows[k], cone[k]);
  CHECK_EQ(sc_tile_bounds(t.w, t.n, 40, 40, 20, 20, 1, rows, 6, cols, 6, msg,
                          sizeof msg),
           SC_OK);
  const int64_t cached[6] = {0, 5, 14, 23, 32, 40};
  for (int k = 0; k < 6; k++) {
    CHECK_EQ(rows[k], cached[k]);
    CHECK_EQ(cols[k], cached[k]);
  }
  /* arrays too short: an error naming the length, nothing written past */
  CHECK_EQ(sc_tile_bounds(t.w, t.n, 40, 40, 20, 20, 1, rows, 5, cols, 6, msg,
                          sizeof msg),
           SC_ERR);
  CHECK(strstr(msg, "needs 6 entries") != NULL);
  CHECK_EQ(sc_tile_bounds(t.w, t.n, 40, 40, 20, 20, 1, NULL, 6, cols, 6, msg,
                          sizeof msg),
           SC_ERR);
}

/* sc_band_info: the image rows a band of output rows reads (its cone,
 * clipped to the image), and for the whole output the work and strips
 * of the whole-image cached pass (sc_work_info) exactly. */
static void test_band_info(void) {
  tprog t;
  tp_begin(&t, 1, 6);
  int64_t v = 0;
  for (int k = 0; k < 6; k++) v = tp_conv(&t, v, k, 1, 1, 3, 1, 1, 1);
  tp_end(&t);
  double info[SC_BAND_WORDS], work[SC_WORK_WORDS];
  char msg[256];
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 10, 17, info, msg,
                        sizeof msg),
           SC_OK);
  CHECK_EQ(info[0], 4); /* 6 convolutions of 3: 6 rows of halo each side */
  CHECK_EQ(info[1], 23);
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 36, 40, info, msg,
                        sizeof msg),
           SC_OK);
  CHECK_EQ(info[0], 30);
  CHECK_EQ(info[1], 40); /* clipped at the bottom border */
  CHECK_EQ(sc_work_info(t.w, t.n, 40, 40, 20, 20, work, msg, sizeof msg),
           SC_OK);
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 0, 40, info, msg,
                        sizeof msg),
           SC_OK);
  CHECK_EQ(info[0], 0);
  CHECK_EQ(info[1], 40);
  CHECK_EQ(info[2], work[6]);
  CHECK_EQ(info[3], work[4]);
  /* two bands recompute the second band's cone above its first row: more
   * multiply-adds than one, and each band costs less than the whole */
  double a[SC_BAND_WORDS], b[SC_BAND_WORDS];
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 0, 20, a, msg, sizeof msg),
           SC_OK);
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 20, 40, b, msg, sizeof msg),
           SC_OK);
  CHECK(a[3] + b[3] > info[3]);
  CHECK(a[3] < info[3] && b[3] < info[3]);
  /* empty or out-of-range bands: a message, no crash */
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 5, 5, info, msg,
                        sizeof msg),
           SC_ERR);
  CHECK(strstr(msg, "not a non-empty range") != NULL);
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, 0, 41, info, msg,
                        sizeof msg),
           SC_ERR);
  CHECK_EQ(sc_band_info(t.w, t.n, 40, 40, 20, 20, -1, 3, info, msg,
                        sizeof msg),
           SC_ERR);
}

/* sc_cone_info: the unclipped cone of an output box, negative and beyond
 * any image included, independent of the image size. */
static void test_cone_info(void) {
  tprog t;
  conv1_pool_words(&t);
  int64_t box[SC_CONE_WORDS];
  char msg[256];
  /* output 0: pool reads conv [-1, 2), conv reads [-5, 6) */
  CHECK_EQ(sc_cone_info(t.w, t.n, 0, 1, 0, 1, box, msg, sizeof msg), SC_OK);
  CHECK_EQ(box[0], -5);
  CHECK_EQ(box[1], 6);
  CHECK_EQ(box[2], -5);
  CHECK_EQ(box[3], 6);
  /* rows [-2, 3): conv [-5, 6), image [-13, 14); columns [10, 12): conv
   * [19, 24), image [35, 50) */
  CHECK_EQ(sc_cone_info(t.w, t.n, -2, 3, 10, 12, box, msg, sizeof msg), SC_OK);
  CHECK_EQ(box[0], -13);
  CHECK_EQ(box[1], 14);
  CHECK_EQ(box[2], 35);
  CHECK_EQ(box[3], 50);
  /* a residual add reads the hull of its inputs' cones: output [-1, 1) ->
   * add [-2, 1) -> conv3 reads [-3, 2), relu [-2, 1): image [-3, 2);
   * [10, 12) -> add [20, 23) -> image [19, 24) */
  tprog r;
  residual_words(&r);
  CHECK_EQ(sc_cone_info(r.w, r.n, -1, 1, 10, 12, box, msg, sizeof msg), SC_OK);
  CHECK_EQ(box[0], -3);
  CHECK_EQ(box[1], 2);
  CHECK_EQ(box[2], 19);
  CHECK_EQ(box[3], 24);
  /* the clipped rows of sc_band_info are these clipped to the image */
  double info[SC_BAND_WORDS];
  CHECK_EQ(sc_band_info(r.w, r.n, 9, 9, 9, 9, 0, 2, info, msg, sizeof msg),
           SC_OK);
  CHECK_EQ(sc_cone_info(r.w, r.n, 0, 2, 0, 1, box, msg, sizeof msg), SC_OK);
  CHECK_EQ(info[0], box[0] < 0 ? 0 : box[0]);
  CHECK_EQ(info[1], box[1]);
  /* empty or out-of-range boxes, bad programs: a message, no crash */
  CHECK_EQ(sc_cone_info(t.w, t.n, 3, 3, 0, 1, box, msg, sizeof msg), SC_ERR);
  CHECK(strstr(msg, "output rows [3, 3) is not a non-empty range") != NULL);
  CHECK_EQ(sc_cone_info(t.w, t.n, 0, 1, 2, 1, box, msg, sizeof msg), SC_ERR);
  CHECK(strstr(msg, "output columns [2, 1)") != NULL);
  CHECK_EQ(sc_cone_info(t.w, t.n, -SC_MAX_EXTENT - 1, 1, 0, 1, box, msg,
                        sizeof msg),
           SC_ERR);
  CHECK_EQ(sc_cone_info(t.w, t.n, 0, SC_MAX_EXTENT + 1, 0, 1, box, msg,
                        sizeof msg),
           SC_ERR);
  CHECK_EQ(sc_cone_info(t.w, 3, 0, 1, 0, 1, box, msg, sizeof msg), SC_ERR);
  CHECK(strstr(msg, "header words") != NULL);
  /* the extremes of the range do not overflow: -2^31 * 4 - 5 */
  CHECK_EQ(sc_cone_info(t.w, t.n, -SC_MAX_EXTENT, SC_MAX_EXTENT, 0, 1, box,
                        msg, sizeof msg),
           SC_OK);
  CHECK_EQ(box[0], -4 * SC_MAX_EXTENT - 5);
  CHECK_EQ(box[1], 4 * (SC_MAX_EXTENT - 1) + 6);
}

int main(void) {
  test_window_out();
  test_receptive_field();
  test_plan_conv();
  test_plan_residual_hull();
  test_plan_cached();
  test_plan_ceil_and_padding_only();
  test_sizes_errors();
  test_tiling_info();
  test_tile_bounds();
  test_band_info();
  test_cone_info();
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("test_geometry: all checks passed\n");
  return g_failures ? 1 : 0;
}
