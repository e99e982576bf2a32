/*
 * streamcnn — public C API of the program decoder and the tiling geometry.
 *
 * This header has no torch dependency: the program format, its validation
 * and all box arithmetic are plain integers, testable from a C main() (see
 * tests/c/). The torch operators (op/register.c) are built on top of it.
 *
 * Conventions
 *   - Spans are half-open [lo, hi) in the coordinates of one value (one
 *     tensor of the stem), rows and columns handled separately: the
 *     geometry of a 2-D tile is the product of a row plan and a column plan.
 *   - Functions that can fail return SC_OK or SC_ERR and write the first
 *     error message into an sc_error; they never abort on bad input.
 *   - Ownership is stated per function. *_free(NULL) is a no-op.
 */
#ifndef STREAMCNN_H
#define STREAMCNN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SC_OK 0
#define SC_ERR 1

/* Exported from libstreamcnn (built with -fvisibility=hidden). */
#if defined(__GNUC__)
#define SC_API __attribute__((visibility("default")))
#else
#define SC_API
#endif

/* "SCNN" in ASCII: first word of every program. */
#define SC_PROGRAM_MAGIC 0x53434E4ELL
#define SC_PROGRAM_VERSION 1
/* Words before the first instruction: magic, version, in_channels,
 * n_instructions, n_params. */
#define SC_PROGRAM_HEADER 5

/* Upper bounds that keep every product of the geometry inside int64. */
#define SC_MAX_INSTRUCTIONS 65536
#define SC_MAX_CHANNELS (1LL << 24)
#define SC_MAX_WINDOW 4096   /* kernel, stride, dilation, padding */
#define SC_MAX_EXTENT (1LL << 31) /* image rows/cols, tile edges */
#define SC_MAX_TILES (1LL << 24)  /* tiles along one axis */

typedef enum sc_opcode {
  SC_OP_CONV = 1,      /* 2-D convolution, zero padding */
  SC_OP_MAXPOOL = 2,   /* 2-D max pooling (pads with -inf) */
  SC_OP_AVGPOOL = 3,   /* 2-D average pooling */
  SC_OP_BATCHNORM = 4, /* frozen batch norm: running stats (+ affine) */
  SC_OP_ACT = 5,       /* pointwise activation */
  SC_OP_ADD = 6,       /* elementwise sum of two values (residual) */
  SC_OP_LAYERNORM_C = 7, /* layer norm over the channels of each pixel */
  SC_OP_LINEAR_C = 8,    /* linear map of the channels of each pixel */
  SC_OP_SCALE_C = 9,     /* per-channel multiplication (layer scale) */
  SC_OP_CAT = 10,        /* channels of a, then b (DenseNet, Inception) */
  SC_OP_CHANNELS = 11    /* a selection of channels: chunk / split / slices
                            along the channels, ShuffleNet's channel shuffle */
} sc_opcode;

/* Number of fields (words after [opcode, n_fields]) of each opcode. */
#define SC_CONV_FIELDS 16
#define SC_MAXPOOL_FIELDS 10
#define SC_AVGPOOL_FIELDS 10
#define SC_BATCHNORM_FIELDS 6
#define SC_ACT_FIELDS 3
#define SC_ADD_FIELDS 2
#define SC_LAYERNORM_C_FIELDS 4
#define SC_LINEAR_C_FIELDS 5
#define SC_SCALE_C_FIELDS 2
#define SC_CAT_FIELDS 2
#define SC_CHANNELS_FIELDS 6

typedef enum sc_activation {
  SC_ACT_RELU = 1,
  SC_ACT_RELU6 = 2,
  SC_ACT_LEAKY_RELU = 3, /* arg: negative slope (double bits) */
  SC_ACT_SILU = 4,
  SC_ACT_GELU = 5,       /* arg: 0 = exact (erf), 1 = tanh approximation */
  SC_ACT_SIGMOID = 6,
  SC_ACT_TANH = 7,
  SC_ACT_HARDSWISH = 8
} sc_activation;

typedef struct sc_error {
  int set;        /* 1 once a message is stored; later failures keep it */
  char msg[768];
} sc_error;

/* One sliding window along one axis (conv or pool). */
typedef struct sc_window {
  int64_t k;      /* kernel extent, taps */
  int64_t s;      /* stride */
  int64_t d;      /* dilation */
  int64_t pad_lo; /* implicit padding before index 0 */
  int64_t pad_hi; /* implicit padding after the last index */
  int ceil_mode;  /* pools only: ATen ceil_mode output size */
} sc_window;

/* A decoded, validated instruction. Values are numbered: 0 = the image,
 * i + 1 = the output of instruction i. */
typedef struct sc_instr {
  int op;             /* sc_opcode */
  int n_in;           /* 1, or 2 for SC_OP_ADD and SC_OP_CAT */
  int64_t in[2];      /* input value indices, each < this output's index */
  sc_window win[2];   /* [0] rows, [1] cols; conv and pools only */
  int64_t c_out;      /* channels of the output value */
  /* conv, linear_c (weight, bias, c_in), layernorm_c (weight, bias),
   * scale_c (weight = the scale) */
  int64_t c_in, groups;
  int64_t weight, bias;      /* indices into the params list; -1 = none */
  /* avg pool */
  int count_include_pad;
  int64_t divisor_override;  /* 0 = none */
  /* batch norm; weight/bias -1 = not affine */
  int64_t bn_weight, bn_bias, bn_mean, bn_var;
  double eps;                /* batch norm, layernorm_c */
  /* activation */
  int act;                   /* sc_activation */
  double act_arg;            /* leaky slope */
  int64_t act_iarg;          /* gelu approximation flag */
  /* channels: output channel k = q * groups + r (r < groups) is input
   * channel start + r * ch_a + q * ch_b (groups in `groups`) */
  int64_t ch_start, ch_a, ch_b;
} sc_instr;

typedef struct sc_program {
  int64_t in_channels;
  int64_t n_instr;
  int64_t n_params;     /* length of the params list the program indexes */
  sc_instr *instr;      /* n_instr entries */
  int64_t *channels;    /* per value, n_instr + 1 entries */
  int64_t *n_consumers; /* per value: how many instruction inputs read it */
  int64_t *vstride;     /* per value: total stride [rows, cols] w.r.t. the
                           image, 2 * (n_instr + 1) entries */
  int64_t stride[2];    /* total stride of the output value, rows/cols */
} sc_program;

/* Per-axis plan of one tile: for every value the span that is computed
 * (clipped to the value's extent), for every instruction input the span
 * the instruction reads (unclipped: the part outside the value is the
 * layer's padding). */
typedef struct sc_axis_plan {
  int64_t n_values;
  int64_t *region; /* 2 * n_values: [lo, hi) per value; hi <= lo = empty */
  int64_t *own;    /* 2 * n_values: the part of region the tile computes
                      (all of it, except in a cached plan) */
  int64_t *read;   /* 4 * n_instr: [lo, hi) per instruction input slot */
} sc_axis_plan;

/* Record a printf-style message in err unless one is already stored.
 * Always returns SC_ERR so callers can `return sc_fail(...)`. */
SC_API int sc_fail(sc_error *err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Decode and validate a program of n_words int64 words. Every field is
 * checked (kinds, counts, ranges, value and parameter indices, channels).
 * On success *out owns a new program (free with sc_program_free); on
 * failure *out is NULL and err names the instruction and field. */
SC_API int sc_program_decode(const int64_t *words, int64_t n_words,
                      sc_program **out, sc_error *err);
SC_API void sc_program_free(sc_program *p);

/* Output extent of one window along one axis for an input extent n; 0 when
 * the input is too small (ATen would raise). Pools follow ATen's
 * pooling_output_shape (ceil_mode drops a window that starts in the right
 * padding). */
SC_API int64_t sc_window_out(const sc_window *w, int64_t n);

/* Spatial extents of every value for an image of h x w. sizes has
 * 2 * (n_instr + 1) entries: [rows, cols] per value. Fails when a value
 * would be empty or the two inputs of an add differ in extent. */
SC_API int sc_value_sizes(const sc_program *p, int64_t h, int64_t w,
                   int64_t *sizes, sc_error *err);

/* Plan one axis (0 rows, 1 cols) for the output span [lo, hi). sizes from
 * sc_value_sizes, or NULL to plan without clipping (interior geometry).
 * plan must come from sc_axis_plan_new(p). */
SC_API int sc_plan_axis(const sc_program *p, const int64_t *sizes, int axis,
                 int64_t lo, int64_t hi, sc_axis_plan *plan, sc_error *err);
/* The same for the span [lo, hi) of value `target` (1 .. n_instr) instead
 * of the output: values after target and the instructions producing them
 * get empty spans. */
SC_API int sc_plan_axis_to(const sc_program *p, const int64_t *sizes, int axis,
                           int64_t target, int64_t lo, int64_t hi,
                           sc_axis_plan *plan, sc_error *err);
/* Cached plan (halo caching along one axis). Tiles along the axis are
 * visited in increasing order; the tile owns the output span [lo, hi), its
 * predecessors [0, lo). Every value is computed once: own[v] is the part of
 * v that the cone of [0, hi) needs and the cone of [0, lo) did not
 * (own = [e_v(lo), e_v(hi)) with e_v(x) the end of v's span in the cone of
 * [0, x)); read[] are the spans the instructions read to compute their own
 * spans; region[v] extends own[v] back to the first element read, so
 * region[v] \ own[v] (the halo) was computed by earlier tiles. sizes must
 * be given. */
SC_API int sc_plan_axis_cached(const sc_program *p, const int64_t *sizes,
                               int axis, int64_t lo, int64_t hi,
                               sc_axis_plan *plan, sc_error *err);
SC_API sc_axis_plan *sc_axis_plan_new(const sc_program *p); /* NULL on OOM */
SC_API void sc_axis_plan_free(sc_axis_plan *plan);

/* Input rows (axis 0) or cols (axis 1) that `t` output pixels of an
 * interior tile read, halo included: (t - 1) * stride + receptive field. */
SC_API int64_t sc_input_extent(const sc_program *p, int axis, int64_t t);

/* Largest output tile edge whose interior input extent is <= tile; 0 when
 * even one output pixel needs more than `tile` input pixels. */
SC_API int64_t sc_tile_out_extent(const sc_program *p, int axis, int64_t tile);

/* Summary for front ends (Python reads it through ctypes):
 * info[0] in_channels, [1] out_channels, [2..3] receptive field rows/cols,
 * [4..5] total stride rows/cols, [6] n_params, [7] n_instr. */
#define SC_INFO_WORDS 8
SC_API int sc_program_info(const int64_t *words, int64_t n_words, int64_t *info,
                    char *errbuf, size_t errlen);

/* Tiling summary for an h x w image and an input tile of tile_h x tile_w:
 * plan[0..1] output rows/cols, [2..3] output tile rows/cols, [4..5] tiles
 * along rows/cols. */
#define SC_PLAN_WORDS 6
SC_API int sc_tiling_info(const int64_t *words, int64_t n_words, int64_t h,
                   int64_t w, int64_t tile_h, int64_t tile_w, int64_t *plan,
                   char *errbuf, size_t errlen);

/* The output rows (axis 0) and columns (axis 1) at which the tiles of an
 * h x w image start and end: rows[0 .. n] for n tiles along the rows,
 * cols[0 .. m] (the caps give the arrays' lengths; n, m as sc_tiling_info
 * counts them). cached = 1: as halo caching tiles (the first tile along an
 * axis is smaller: it reads its whole cone, the others their own part and
 * a thin halo), else tiles of the sc_tiling_info edge. */
SC_API int sc_tile_bounds(const int64_t *words, int64_t n_words, int64_t h,
                          int64_t w, int64_t tile_h, int64_t tile_w,
                          int cached, int64_t *rows, int64_t rows_cap,
                          int64_t *cols, int64_t cols_cap, char *errbuf,
                          size_t errlen);

/* Work of one forward pass over an h x w image (per batch element) with an
 * input tile of tile_h x tile_w, whole-image vs tiled:
 * work[0] / work[1] multiply-adds of the convolutions and channel linears,
 * whole / summed over tiles with every tile computing its whole cone (halo
 * recomputed); work[2] / work[3] elements of all values computed, the
 * same; work[4] / work[5] multiply-adds / elements with halo caching
 * (each value computed once); work[6] elements of the halos (bands and
 * left strips) forward_cached keeps for the backward. work[1] / work[0] and work[4] / work[0] are the recompute
 * overheads of one streamed forward without and with halo caching. */
#define SC_WORK_WORDS 7
SC_API int sc_work_info(const int64_t *words, int64_t n_words, int64_t h,
                        int64_t w, int64_t tile_h, int64_t tile_w, double *work,
                        char *errbuf, size_t errlen);

/* One output row band [out_lo, out_hi) of the stem output of an h x w
 * image, as the *_rows ops (tile-parallel streaming) run it: info[0],
 * info[1] the image rows it reads (half-open: the cone of those output
 * rows, clipped to the image; [0, 0) for rows made of padding alone);
 * info[2] the elements (per batch element) of the strips
 * forward_cached_rows returns; info[3] its multiply-adds per batch element
 * with halo caching (the band's first tile row computes its whole cone:
 * the overhead of a band over the same rows of the whole pass). Fails
 * (errbuf) for an empty or out-of-range band. */
#define SC_BAND_WORDS 4
SC_API int sc_band_info(const int64_t *words, int64_t n_words, int64_t h,
                        int64_t w, int64_t tile_h, int64_t tile_w,
                        int64_t out_lo, int64_t out_hi, double *info,
                        char *errbuf, size_t errlen);

/* The cone of the stem output box [out_r0, out_r1) x [out_c0, out_c1):
 * the image box its values depend on, unclipped (padding counts as
 * input, so it may start before 0 or end beyond any image; independent of
 * the image size): box[0], box[1] its rows, box[2], box[3] its columns,
 * half-open. sc_band_info's rows lie within these clipped to the image
 * (its cone is clipped to every value's extent on the way: padding read
 * at any value reads no input, and rows of padding alone read none). The
 * output box may lie anywhere in [-SC_MAX_EXTENT, SC_MAX_EXTENT]; fails
 * (errbuf) for an empty box or one outside that range. */
#define SC_CONE_WORDS 4
SC_API int sc_cone_info(const int64_t *words, int64_t n_words, int64_t out_r0,
                        int64_t out_r1, int64_t out_c0, int64_t out_c1,
                        int64_t *box, char *errbuf, size_t errlen);

/* Memory model of a streamed pass over an h x w image, in bytes per batch
 * element of a compute dtype of itemsize bytes (the stem output and its
 * gradient are not included), from a simulation of the replay's
 * allocations and frees for every distinct tile shape: mem[0] the largest
 * tile's backward (its recompute keeping the values its backward ops read,
 * then the backward with its gradients and transients), mem[1] the
 * largest tile's forward without gradient, both with two rows of halo
 * bands (when cached); mem[2] the strips halo caching keeps from the
 * forward to the backward (when cached; 0 otherwise). flags:
 * SC_MEMORY_CACHED for halo caching (1, as the earlier int cached),
 * SC_MEMORY_CPU when the convolutions run on the CPU (ATen's im2col
 * convolution, for float64 and small inputs, holds its columns; without
 * it, a convolution holds a copy of its input and output, as cuDNN may).
 * mask is the backward's output_mask, 1 + n_params ints: mask[0] the
 * image's gradient (one image-sized tensor in mem[0]), mask[1 + k]
 * params[k]'s (NULL: all of them); a frozen layer keeps less. mem[0]
 * includes the parameter gradients the backward accumulates and the
 * folded weights (batch norms folded into their convolutions, float32 /
 * float64). The peak of a training step is about mem[0] + mem[2], of a
 * forward without gradient mem[1] (cached: the forward op always caches
 * halos). Not modelled: cuDNN's workspace. */
#define SC_MEMORY_WORDS 3
#define SC_MEMORY_CACHED 1
#define SC_MEMORY_CPU 2
SC_API int sc_memory_info(const int64_t *words, int64_t n_words, int64_t h,
                          int64_t w, int64_t tile_h, int64_t tile_w,
                          int flags, const int *mask, int itemsize,
                          double *mem, char *errbuf, size_t errlen);

/* Multiply-adds the convolutions and channel linears of the operators
 * executed so far, on any thread (autograd runs a CUDA backward on a
 * thread of its own): out[0] forward (recomputes included), out[1] input
 * gradients, out[2] weight gradients; reset sets them to 0 (read and
 * zeroed at once, when out is given). */
SC_API void sc_macs(double out[3], int reset);

/* Backward tiles since the last reset, process-wide (op/sparse.c): out[0]
 * run whole, out[1] run as boxes of their non-zero output gradient, out[2]
 * skipped (no non-zero gradient), out[3] the boxes the boxed ones ran,
 * out[4] restricted (halo caching: run over the cone of their non-zero
 * output and pending gradients only); reset as for sc_macs. */
SC_API void sc_backward_tiles(double out[5], int reset);

/* Progress over tiles: while set on a thread, the operators called on that
 * thread report after each tile: phase 0 forward, 1 backward; done of
 * total tiles. Pass NULL to stop. Thread-local: calls on other threads are
 * not reported. The callback must not call the operators. */
typedef void (*sc_progress_fn)(void *user, int phase, int64_t done,
                               int64_t total);
SC_API void sc_set_progress(sc_progress_fn fn, void *user);

#ifdef __cplusplus
}
#endif

#endif /* STREAMCNN_H */
