/* test_program.c — the program decoder: valid programs decode to the
 * expected structure; every malformed field is rejected with a message
 * naming it; random and mutated programs never crash. */
#include "streamcnn.h"
#include "testutil.h"

#include <stdlib.h>

/* Decode t and expect failure with `needle` in the message. */
static void expect_error(tprog *t, const char *needle, int line) {
  sc_program *p = NULL;
  sc_error err = {0};
  int rc = sc_program_decode(t->w, t->n, &p, &err);
  if (rc != SC_ERR || p != NULL || !strstr(err.msg, needle)) {
    fprintf(stderr, "line %d: expected error containing '%s', got rc=%d '%s'\n",
            line, needle, rc, err.msg);
    g_failures++;
  }
  sc_program_free(p);
}
#define EXPECT_ERROR(t, needle) expect_error(t, needle, __LINE__)

/* A valid program: conv(+bias) -> bn -> relu -> maxpool -> avgpool ->
 * conv -> add(residual) -> leaky relu. */
static void build_valid(tprog *t) {
  tp_begin(t, 3, 8);
  const int64_t conv[16] = {0, 0, 1, 3, 8, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
  int64_t v = tp_emit(t, 1, 16, conv);
  double eps = 1e-5;
  int64_t eb;
  memcpy(&eb, &eps, 8);
  const int64_t bn[6] = {v, 2, 3, 4, 5, eb};
  v = tp_emit(t, 4, 6, bn);
  v = tp_relu(t, v);
  v = tp_maxpool(t, v, 3, 2, 1, 1);
  const int64_t avg[10] = {v, 3, 3, 1, 1, 1, 1, 0, 0, 0};
  int64_t a = tp_emit(t, 3, 10, avg);
  const int64_t conv2[16] = {a, 6, 7, 8, 8, 2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
  int64_t c = tp_emit(t, 1, 16, conv2);
  int64_t s = tp_add(t, c, a);
  double slope = 0.2;
  int64_t sb;
  memcpy(&sb, &slope, 8);
  const int64_t act[3] = {s, 3, sb};
  tp_emit(t, 5, 3, act);
  tp_end(t);
}

static void test_valid(void) {
  tprog t;
  build_valid(&t);
  sc_program *p = NULL;
  sc_error err = {0};
  CHECK_EQ(sc_program_decode(t.w, t.n, &p, &err), SC_OK);
  if (!p) {
    fprintf(stderr, "%s\n", err.msg);
    g_failures++;
    return;
  }
  CHECK_EQ(p->n_instr, 8);
  CHECK_EQ(p->n_params, 8);
  CHECK_EQ(p->channels[1], 8);
  CHECK_EQ(p->channels[8], 8);
  CHECK_EQ(p->instr[0].bias, 1);
  CHECK_EQ(p->instr[3].win[0].ceil_mode, 1);
  CHECK_EQ(p->instr[5].groups, 2);
  CHECK_EQ(p->instr[6].n_in, 2);
  CHECK(p->instr[7].act_arg == 0.2);
  CHECK(p->instr[1].eps == 1e-5);
  CHECK_EQ(p->n_consumers[5], 2); /* the avg pool feeds conv2 and the add */
  CHECK_EQ(p->stride[0], 2);
  int64_t info[SC_INFO_WORDS];
  char msg[64];
  CHECK_EQ(sc_program_info(t.w, t.n, info, msg, sizeof msg), SC_OK);
  CHECK_EQ(info[0], 3);
  CHECK_EQ(info[1], 8);
  /* conv3 (3) -> maxpool3 s2 (+2) -> avg3 (+2*2) -> conv3 (+2*2) = 13 */
  CHECK_EQ(info[2], 13);
  CHECK_EQ(info[4], 2);
  sc_program_free(p);
  sc_program_free(NULL); /* no-op */
}

/* Copy of the valid program with word `i` replaced. */
static void mutate(tprog *dst, const tprog *src, int64_t i, int64_t value) {
  *dst = *src;
  dst->w[i] = value;
}

static void test_header_errors(void) {
  tprog v, t;
  build_valid(&v);
  mutate(&t, &v, 0, 12345);
  EXPECT_ERROR(&t, "magic");
  mutate(&t, &v, 1, 2);
  EXPECT_ERROR(&t, "version 2");
  mutate(&t, &v, 2, 0);
  EXPECT_ERROR(&t, "in_channels");
  mutate(&t, &v, 3, 0);
  EXPECT_ERROR(&t, "n_instructions");
  mutate(&t, &v, 3, 9); /* more instructions than present */
  EXPECT_ERROR(&t, "program ends inside instruction 8");
  mutate(&t, &v, 3, 7); /* fewer: trailing words */
  EXPECT_ERROR(&t, "trailing words");
  mutate(&t, &v, 4, -1);
  EXPECT_ERROR(&t, "n_params");
  t = v;
  t.n = 3;
  EXPECT_ERROR(&t, "header words");
  t = v;
  t.n = v.n - 1; /* truncated inside the last instruction */
  EXPECT_ERROR(&t, "program ends inside instruction 7 (act)");
}

static void test_field_errors(void) {
  tprog v, t;
  build_valid(&v);
  /* instruction 0 (conv) fields start at word 7 */
  const int64_t c = 7;
  mutate(&t, &v, 5, 99);
  EXPECT_ERROR(&t, "unknown opcode 99");
  mutate(&t, &v, 6, 15);
  EXPECT_ERROR(&t, "instruction 0 (conv): n_fields = 15, expected 16");
  mutate(&t, &v, c + 0, 1); /* reads value 1: itself */
  EXPECT_ERROR(&t, "instruction 0 (conv): field 'input' = 1");
  mutate(&t, &v, c + 1, 8);
  EXPECT_ERROR(&t, "field 'weight' = 8 is not a valid index");
  mutate(&t, &v, c + 1, -1); /* weight is not optional */
  EXPECT_ERROR(&t, "field 'weight' = -1");
  mutate(&t, &v, c + 2, -2);
  EXPECT_ERROR(&t, "field 'bias' = -2");
  mutate(&t, &v, c + 3, 4);
  EXPECT_ERROR(&t, "'in_channels' = 4 but its input value 0 has 3 channels");
  mutate(&t, &v, c + 4, 0);
  EXPECT_ERROR(&t, "field 'out_channels' = 0");
  mutate(&t, &v, c + 5, 2);
  EXPECT_ERROR(&t, "field 'groups' = 2 must divide");
  mutate(&t, &v, c + 6, 0);
  EXPECT_ERROR(&t, "field 'kernel_h' = 0");
  mutate(&t, &v, c + 8, 1LL << 40);
  EXPECT_ERROR(&t, "field 'stride_h'");
  mutate(&t, &v, c + 11, -1);
  EXPECT_ERROR(&t, "field 'dilation_w'");
  mutate(&t, &v, c + 12, -3);
  EXPECT_ERROR(&t, "field 'pad_top'");
  /* bn (instruction 1) fields start at 7 + 16 + 2 = 25 */
  const int64_t b = 25;
  double nan = 0.0 / 0.0, neg = -1.0;
  int64_t bits;
  memcpy(&bits, &nan, 8);
  mutate(&t, &v, b + 5, bits);
  EXPECT_ERROR(&t, "instruction 1 (batchnorm): field 'eps'");
  memcpy(&bits, &neg, 8);
  mutate(&t, &v, b + 5, bits);
  EXPECT_ERROR(&t, "field 'eps'");
  mutate(&t, &v, b + 3, -1); /* running_mean is required */
  EXPECT_ERROR(&t, "field 'running_mean' = -1");
  /* relu (instruction 2) at 25 + 6 + 2 = 33 */
  mutate(&t, &v, 34, 9);
  EXPECT_ERROR(&t, "instruction 2 (act): field 'kind' = 9");
  mutate(&t, &v, 35, 1);
  EXPECT_ERROR(&t, "field 'arg' = 1");
  /* maxpool (instruction 3) at 33 + 3 + 2 = 38: pad 2 > 3 / 2 */
  mutate(&t, &v, 38 + 7, 2);
  EXPECT_ERROR(&t, "instruction 3 (maxpool): field 'pad_h' = 2");
  mutate(&t, &v, 38 + 9, 2);
  EXPECT_ERROR(&t, "field 'ceil_mode' = 2");
  /* avgpool (instruction 4) at 38 + 10 + 2 = 50 */
  mutate(&t, &v, 50 + 8, -1);
  EXPECT_ERROR(&t, "instruction 4 (avgpool): field 'count_include_pad'");
  mutate(&t, &v, 50 + 9, -5);
  EXPECT_ERROR(&t, "field 'divisor_override'");
  /* conv2 (instruction 5) at 50 + 10 + 2 = 62: groups 2, c_in 8 -> 3 fails */
  mutate(&t, &v, 62 + 5, 3);
  EXPECT_ERROR(&t, "instruction 5 (conv): field 'groups' = 3");
  /* add (instruction 6) at 62 + 16 + 2 = 80 */
  mutate(&t, &v, 80 + 1, 0); /* adds the 3-channel image to 8 channels */
  EXPECT_ERROR(&t, "instruction 6 (add): inputs 6 and 0 have 8 and 3 channels");
  mutate(&t, &v, 80 + 1, 7);
  EXPECT_ERROR(&t, "field 'b' = 7");
  /* leaky relu slope (instruction 7) at 80 + 2 + 2 = 84 */
  double inf = 1.0 / 0.0;
  memcpy(&bits, &inf, 8);
  mutate(&t, &v, 84 + 2, bits);
  EXPECT_ERROR(&t, "instruction 7 (act): field 'negative_slope'");
}

static void test_stride_mismatch(void) {
  tprog t;
  tp_begin(&t, 1, 2);
  int64_t a = tp_conv(&t, 0, 0, 1, 1, 1, 2, 0, 1);
  int64_t b = tp_conv(&t, 0, 1, 1, 1, 3, 1, 1, 1);
  tp_add(&t, a, b);
  tp_end(&t);
  EXPECT_ERROR(&t, "different total strides along rows (2 vs 1)");
}

/* conv -> layernorm_c -> linear_c (8 -> 16) -> scale_c: ConvNeXt's
 * channel ops. */
static void test_channel_ops(void) {
  tprog t;
  double eps = 1e-6;
  int64_t eb;
  memcpy(&eb, &eps, 8);
  tp_begin(&t, 3, 6);
  int64_t v = tp_conv(&t, 0, 0, 3, 8, 4, 4, 0, 1);
  const int64_t ln[4] = {v, 1, 2, eb};
  v = tp_emit(&t, 7, 4, ln);
  const int64_t lin[5] = {v, 3, 4, 8, 16};
  v = tp_emit(&t, 8, 5, lin);
  const int64_t sc[2] = {v, 5};
  tp_emit(&t, 9, 2, sc);
  tp_end(&t);
  sc_program *p = NULL;
  sc_error err = {0};
  CHECK_EQ(sc_program_decode(t.w, t.n, &p, &err), SC_OK);
  if (p) {
    CHECK_EQ(p->channels[2], 8);
    CHECK_EQ(p->channels[3], 16);
    CHECK_EQ(p->channels[4], 16);
    CHECK(p->instr[1].eps == 1e-6);
    CHECK_EQ(p->instr[2].weight, 3);
    CHECK_EQ(p->instr[3].weight, 5);
    /* channel ops are per pixel: no receptive field beyond the conv's */
    CHECK_EQ(sc_input_extent(p, 0, 1), 4);
    sc_program_free(p);
  }
  tprog m;
  /* words: header 5, conv 18 (5..22), layernorm_c 6 (23..28),
   * linear_c 7 (29..35), scale_c 4 (36..39) */
  mutate(&m, &t, 23 + 2 + 3, (int64_t)0x7FF8000000000000LL); /* eps NaN */
  EXPECT_ERROR(&m, "instruction 1 (layernorm_c): field 'eps'");
  mutate(&m, &t, 29 + 2 + 3, 7);
  EXPECT_ERROR(&m, "(linear_c): field 'in_channels' = 7 but its input value 2 has 8");
  mutate(&m, &t, 29 + 2 + 1, -1);
  EXPECT_ERROR(&m, "(linear_c): field 'weight' = -1");
  mutate(&m, &t, 36 + 2 + 1, 6);
  EXPECT_ERROR(&m, "instruction 3 (scale_c): field 'scale' = 6");
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void) { /* xorshift64* */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 2685821657736338717ULL;
}

/* Random words and random mutations of a valid program: the decoder either
 * accepts or refuses with a message, never crashes or reads out of bounds
 * (run under valgrind / ASan to check the latter). */
static void test_fuzz(void) {
  tprog v, t;
  build_valid(&v);
  int accepted = 0;
  for (int iter = 0; iter < 200000; iter++) {
    t = v;
    if (iter % 4 == 0) {
      t.n = (int64_t)(rnd() % 64);
      for (int64_t i = 0; i < t.n; i++) t.w[i] = (int64_t)(rnd() % 40) - 4;
      if (t.n > 0 && rnd() % 2) t.w[0] = 0x53434E4ELL;
      if (t.n > 1 && rnd() % 2) t.w[1] = 1;
    } else {
      int k = 1 + (int)(rnd() % 3);
      for (int j = 0; j < k; j++) {
        int64_t i = (int64_t)(rnd() % (uint64_t)v.n);
        switch (rnd() % 4) {
        case 0: t.w[i] = (int64_t)(rnd() % 20) - 5; break;
        case 1: t.w[i] += (rnd() % 2) ? 1 : -1; break;
        case 2: t.w[i] = (int64_t)rnd(); break;
        default: t.n = i; break;
        }
      }
    }
    sc_program *p = NULL;
    sc_error err = {0};
    int rc = sc_program_decode(t.w, t.n, &p, &err);
    if (rc == SC_OK) {
      accepted++;
      CHECK(p != NULL);
      /* accepted programs must also be safe to plan */
      int64_t *sizes = malloc(2 * (size_t)(p->n_instr + 1) * sizeof *sizes);
      sc_error e2 = {0};
      if (sizes && sc_value_sizes(p, 37, 29, sizes, &e2) == SC_OK) {
        int64_t tile[2];
        sc_error e3 = {0};
        sc_axis_plan *plan = sc_axis_plan_new(p);
        const int64_t oh = sizes[2 * p->n_instr];
        if (plan) CHECK_EQ(sc_plan_axis(p, sizes, 0, 0, oh, plan, &e3), SC_OK);
        sc_axis_plan_free(plan);
        (void)tile;
      }
      free(sizes);
    } else {
      CHECK(p == NULL);
      CHECK(err.set && strlen(err.msg) > 10);
    }
    sc_program_free(p);
  }
  CHECK(accepted > 0);
  printf("test_program: fuzz accepted %d of 200000 variants\n", accepted);
}

/* image (3) -> conv (5) -> cat(image, conv) (8) -> conv 3x3 -> cat of
 * the two convs: DenseNet's join. Channels add up, the receptive field is
 * the hull of both inputs', strides must agree. */
static void test_cat(void) {
  tprog t;
  tp_begin(&t, 3, 2);
  int64_t a = tp_conv(&t, 0, 0, 3, 5, 1, 1, 0, 1);
  const int64_t j1[2] = {0, a};
  int64_t c = tp_emit(&t, 10, 2, j1);
  int64_t b = tp_conv(&t, c, 1, 8, 4, 3, 1, 1, 1);
  const int64_t j2[2] = {b, a};
  tp_emit(&t, 10, 2, j2);
  tp_end(&t);
  sc_program *p = NULL;
  sc_error err = {0};
  CHECK_EQ(sc_program_decode(t.w, t.n, &p, &err), SC_OK);
  if (p) {
    CHECK_EQ(p->instr[1].n_in, 2);
    CHECK_EQ(p->channels[2], 8);
    CHECK_EQ(p->channels[4], 9);
    CHECK_EQ(p->n_consumers[1], 2);
    CHECK_EQ(sc_input_extent(p, 0, 1), 3);
    sc_program_free(p);
  }
  /* words: header 5, conv 18 (5..22), cat 4 (23..26), conv 18 (27..44),
   * cat 4 (45..48) */
  tprog m;
  mutate(&m, &t, 45 + 2 + 1, 5); /* b: value 5 is not earlier */
  EXPECT_ERROR(&m, "instruction 3 (cat): field 'b'");
  tprog s;
  tp_begin(&s, 1, 2);
  a = tp_conv(&s, 0, 0, 1, 1, 1, 2, 0, 1);
  const int64_t j3[2] = {a, 0};
  tp_emit(&s, 10, 2, j3);
  tp_end(&s);
  EXPECT_ERROR(&s, "instruction 1 (cat): inputs 1 and 0 have different total strides "
                   "along rows (2 vs 1)");
  /* 2^23 + 2^23 + 1 channels: over SC_MAX_CHANNELS */
  tprog w;
  tp_begin(&w, 1 << 23, 1);
  a = tp_conv(&w, 0, 0, 1 << 23, (1 << 23) + 1, 1, 1, 0, 1);
  const int64_t j4[2] = {0, a};
  tp_emit(&w, 10, 2, j4);
  tp_end(&w);
  EXPECT_ERROR(&w, "instruction 1 (cat): inputs 0 and 1 have 8388608 + 8388609 channels");
}

/* The channels instruction: a chunk's second half, a channel shuffle;
 * bad maps are refused naming what is wrong. */
static void test_channels(void) {
  tprog t;
  tp_begin(&t, 3, 2);
  int64_t a = tp_conv(&t, 0, 0, 3, 8, 1, 1, 0, 1);
  const int64_t half[6] = {a, 4, 4, 1, 0, 1};    /* channels 4 .. 7 */
  int64_t h = tp_emit(&t, 11, 6, half);
  const int64_t shuffle[6] = {a, 8, 0, 2, 4, 1}; /* 0 4 1 5 2 6 3 7 */
  tp_emit(&t, 11, 6, shuffle);
  (void)h;
  tp_end(&t);
  sc_program *p = NULL;
  sc_error err = {0};
  CHECK_EQ(sc_program_decode(t.w, t.n, &p, &err), SC_OK);
  if (p) {
    CHECK_EQ(p->channels[2], 4);
    CHECK_EQ(p->channels[3], 8);
    CHECK_EQ(p->instr[2].groups, 2);
    CHECK_EQ(p->instr[2].ch_a, 4);
    CHECK_EQ(sc_input_extent(p, 0, 1), 1); /* pointwise */
    sc_program_free(p);
  } else {
    fprintf(stderr, "%s\n", err.msg);
    g_failures++;
  }
  /* words: header 5, conv 18 (5..22), channels 8 (23..30), channels 8
   * (31..38); fields of the second from 33: in, c_out, start, groups, a, b */
  tprog m;
  mutate(&m, &t, 33 + 3, 3); /* 3 groups do not divide 8 */
  EXPECT_ERROR(&m, "instruction 2 (channels): field 'groups' = 3 does not divide");
  mutate(&m, &t, 33 + 2, 1); /* 1 + 4 + 3 = channel 8 of 8 */
  EXPECT_ERROR(&m, "instruction 2 (channels): it takes channel 8 of input value 1, which has 8");
  mutate(&m, &t, 33 + 4, 1); /* a 1, b 1: channel 1 twice */
  EXPECT_ERROR(&m, "instruction 2 (channels): it takes input channel 1 twice");
  mutate(&m, &t, 33 + 1, 0);
  EXPECT_ERROR(&m, "instruction 2 (channels): field 'out_channels' = 0");
  mutate(&m, &t, 33 + 5, -1);
  EXPECT_ERROR(&m, "instruction 2 (channels): field 'b' = -1");
  mutate(&m, &t, 25 + 0, 2); /* its input is a later value */
  EXPECT_ERROR(&m, "instruction 1 (channels): field 'input'");
}

int main(void) {
  test_valid();
  test_cat();
  test_channels();
  test_header_errors();
  test_field_errors();
  test_stride_mismatch();
  test_channel_ops();
  test_fuzz();
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("test_program: all checks passed\n");
  return g_failures ? 1 : 0;
}
