/*
 * fuzz_program.c — libFuzzer target: sc_program_decode on arbitrary int64
 * words. A program that decodes must be internally consistent (value and
 * parameter indices in range, channels and strides positive and bounded);
 * one that does not must leave *out NULL and a message. Then the torch-free
 * queries that take raw words (sc_program_info) must agree with the decoded
 * program.
 */
#include "fuzz_common.h"
#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  int64_t n;
  int64_t *words = fz_words(data, size, &n);
  if (!words) return 0;
  sc_program *p = (sc_program *)1;
  sc_error err = {0};
  const int rc = sc_program_decode(words, n, &p, &err);
  int64_t info[SC_INFO_WORDS];
  char msg[256] = {0};
  const int rc_info = sc_program_info(words, n, info, msg, sizeof msg);
  if (rc) {
    FZ_CHECK(rc == SC_ERR && p == NULL && err.set && err.msg[0]);
    FZ_CHECK(rc_info == SC_ERR && msg[0]);
    free(words);
    return 0;
  }
  FZ_CHECK(p && !err.set);
  FZ_CHECK(p->n_instr >= 1 && p->n_instr <= SC_MAX_INSTRUCTIONS);
  FZ_CHECK(p->channels[0] == p->in_channels);
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    FZ_CHECK(in->n_in ==
             (in->op == SC_OP_ADD || in->op == SC_OP_CAT ? 2 : 1));
    if (in->op == SC_OP_CAT)
      FZ_CHECK(p->channels[i + 1] ==
               p->channels[in->in[0]] + p->channels[in->in[1]]);
    for (int j = 0; j < in->n_in; j++)
      FZ_CHECK(in->in[j] >= 0 && in->in[j] <= i);
    const int64_t pk[] = {in->weight, in->bias, in->bn_weight, in->bn_bias,
                          in->bn_mean, in->bn_var};
    for (int k = 0; k < 6; k++)
      FZ_CHECK(pk[k] >= -1 && pk[k] < p->n_params);
    FZ_CHECK(p->channels[i + 1] >= 1 &&
             p->channels[i + 1] <= SC_MAX_CHANNELS);
    if (_sc_is_window(in->op))
      for (int a = 0; a < 2; a++) {
        const sc_window *w = &in->win[a];
        FZ_CHECK(w->k >= 1 && w->s >= 1 && w->d >= 1 && w->pad_lo >= 0 &&
                 w->pad_hi >= 0);
      }
    for (int a = 0; a < 2; a++)
      FZ_CHECK(p->vstride[2 * (i + 1) + a] >= 1 &&
               p->vstride[2 * (i + 1) + a] <= SC_MAX_EXTENT);
  }
  FZ_CHECK(rc_info == SC_OK);
  FZ_CHECK(info[0] == p->in_channels && info[1] == p->channels[p->n_instr]);
  FZ_CHECK(info[4] == p->stride[0] && info[5] == p->stride[1]);
  FZ_CHECK(info[6] == p->n_params && info[7] == p->n_instr);
  FZ_CHECK(info[2] >= 1 && info[3] >= 1); /* receptive field */
  FZ_CHECK(info[2] <= SC_MAX_EXTENT && info[3] <= SC_MAX_EXTENT);
  sc_program_free(p);
  free(words);
  return 0;
}
