/* testutil.h — a minimal test harness (no framework): CHECK records the
 * failing expression and line, main() returns the failure count. */
#ifndef SC_TESTUTIL_H
#define SC_TESTUTIL_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int g_failures = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,       \
              #cond);                                                        \
      g_failures++;                                                          \
    }                                                                        \
  } while (0)

#define CHECK_EQ(a, b)                                                       \
  do {                                                                       \
    long long a_ = (long long)(a), b_ = (long long)(b);                      \
    if (a_ != b_) {                                                          \
      fprintf(stderr, "%s:%d: CHECK_EQ failed: %s = %lld, %s = %lld\n",      \
              __FILE__, __LINE__, #a, a_, #b, b_);                           \
      g_failures++;                                                          \
    }                                                                        \
  } while (0)

/* Strides (elements) of a dense N x C x H x W tensor, NCHW or NHWC. */
static inline void dense_strides(const int64_t size[4], int nhwc, int64_t st[4]) {
  if (nhwc) {
    st[1] = 1;
    st[3] = size[1];
    st[2] = size[1] * size[3];
    st[0] = st[2] * size[2];
  } else {
    st[3] = 1;
    st[2] = size[3];
    st[1] = size[2] * size[3];
    st[0] = st[1] * size[1];
  }
}

/* Program builder for tests: words in a fixed buffer. */
typedef struct tprog {
  int64_t w[4096];
  int64_t n;
  int64_t n_instr;
} tprog;

static inline void tp_begin(tprog *p, int64_t in_channels, int64_t n_params) {
  memset(p, 0, sizeof *p);
  p->w[0] = 0x53434E4ELL;
  p->w[1] = 1;
  p->w[2] = in_channels;
  p->w[3] = 0; /* n_instr, patched by tp_end */
  p->w[4] = n_params;
  p->n = 5;
}

static inline int64_t tp_emit(tprog *p, int64_t op, int nf, const int64_t *f) {
  p->w[p->n++] = op;
  p->w[p->n++] = nf;
  for (int i = 0; i < nf; i++) p->w[p->n++] = f[i];
  return ++p->n_instr;
}

static inline void tp_end(tprog *p) { p->w[3] = p->n_instr; }

/* conv: square kernel k, stride s, symmetric padding pd, dilation d */
static inline int64_t tp_conv(tprog *p, int64_t in, int64_t wparam, int64_t cin,
                       int64_t cout, int64_t k, int64_t s, int64_t pd,
                       int64_t d) {
  const int64_t f[16] = {in, wparam, -1, cin, cout, 1, k, k, s, s,
                         d,  d,      pd, pd, pd,  pd};
  return tp_emit(p, 1, 16, f);
}

static inline int64_t tp_maxpool(tprog *p, int64_t in, int64_t k, int64_t s,
                          int64_t pd, int ceil) {
  const int64_t f[10] = {in, k, k, s, s, 1, 1, pd, pd, ceil};
  return tp_emit(p, 2, 10, f);
}

static inline int64_t tp_relu(tprog *p, int64_t in) {
  const int64_t f[3] = {in, 1, 0};
  return tp_emit(p, 5, 3, f);
}

static inline int64_t tp_add(tprog *p, int64_t a, int64_t b) {
  const int64_t f[2] = {a, b};
  return tp_emit(p, 6, 2, f);
}

#endif
