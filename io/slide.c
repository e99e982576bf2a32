/*
 * slide.c — whole-slide reader on OpenSlide (see slide.h).
 *
 * Ownership: sc_slide owns its openslide_t, its path copy and its level
 * table; sc_slide_close frees all three. Reads allocate one chunk-sized
 * ARGB buffer per thread and free it before returning.
 */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int _sc_slide_fail(char *err, size_t errlen, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return SC_ERR;
}

#ifndef SC_WITH_OPENSLIDE /* ------------------------------------------------- */

static const char *k_missing =
    "streamcnn was built without OpenSlide (STREAMCNN_OPENSLIDE=OFF): install "
    "libopenslide-dev and libtiff-dev and rebuild to read slides";

int sc_slide_available(void) { return 0; }
sc_slide *sc_slide_open(const char *path, char *err, size_t errlen) {
  (void)path;
  _sc_slide_fail(err, errlen, "%s", k_missing);
  return NULL;
}
void sc_slide_close(sc_slide *s) { (void)s; }
int32_t sc_slide_level_count(const sc_slide *s) {
  (void)s;
  return -1;
}
int sc_slide_level(const sc_slide *s, int32_t level, int64_t *w, int64_t *h,
                   double *downsample) {
  (void)s, (void)level, (void)w, (void)h, (void)downsample;
  return SC_ERR;
}
int sc_slide_level_sheared(const sc_slide *s, int32_t level) {
  (void)s, (void)level;
  return -1;
}
const char *sc_slide_property(const sc_slide *s, const char *name) {
  (void)s, (void)name;
  return NULL;
}
const char *const *sc_slide_property_names(const sc_slide *s) {
  (void)s;
  return NULL;
}
void sc_slide_background(const sc_slide *s, uint8_t rgb[3]) {
  (void)s;
  rgb[0] = rgb[1] = rgb[2] = 255;
}
int sc_slide_read(sc_slide *s, int32_t level, int64_t x, int64_t y, int64_t w,
                  int64_t h, uint8_t *out, int hwc, int threads, char *err,
                  size_t errlen) {
  (void)s, (void)level, (void)x, (void)y, (void)w, (void)h, (void)out;
  (void)hwc, (void)threads;
  return _sc_slide_fail(err, errlen, "%s", k_missing);
}
int sc_slide_read_box(sc_slide *s, int32_t level, int64_t x, int64_t y,
                      int64_t w, int64_t h, int64_t bx, int64_t by, int64_t bw,
                      int64_t bh, uint8_t *out, int hwc, int threads, char *err,
                      size_t errlen) {
  (void)s, (void)level, (void)x, (void)y, (void)w, (void)h, (void)bx;
  (void)by, (void)bw, (void)bh, (void)out, (void)hwc, (void)threads;
  return _sc_slide_fail(err, errlen, "%s", k_missing);
}

#else /* SC_WITH_OPENSLIDE ------------------------------------------------------- */

#include <errno.h>
#include <math.h>
#include <openslide.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <tiffio.h>

#define CHUNK 512        /* chunk edge, level pixels */
#define MAX_THREADS 64
#define MAX_EDGE (1LL << 31)

struct sc_slide {
  openslide_t *osr;
  char *path;
  int32_t levels;
  int64_t *dims;      /* 2 per level: width, height */
  double *downsample; /* per level */
  int64_t *sheared;   /* 2 per level: the tile size of a level OpenSlide
                         reads wrong (see sheared_levels), else 0 0 */
  uint8_t bg[3];
};

int sc_slide_available(void) { return 1; }

/*
 * libtiff's messages from inside OpenSlide. libtiff prints them on stderr
 * (a stray "ZIPDecode: Decoding error at scanline 256." beside our error)
 * and OpenSlide's own error names only the call that failed ("TIFFRGBAImageGet
 * failed"). While this thread is in an OpenSlide call of ours, its first
 * libtiff error is kept to add to that error (warnings, e.g. unknown vendor
 * tags, are dropped); outside (other code in the process using libtiff),
 * the handlers installed before ours are called as they were. OpenSlide
 * decodes in the calling thread, hence a thread-local capture. The global
 * handlers are set once (pthread_once), never per call: the per-handle
 * handlers of tiffwrite.c are not available, OpenSlide opens the TIFFs.
 */
static TIFFErrorHandler prev_error, prev_warning;
static pthread_once_t handlers_once = PTHREAD_ONCE_INIT;
static _Thread_local int tiff_capturing;
static _Thread_local char tiff_message[200];

static void on_tiff_error(const char *module, const char *fmt, va_list ap) {
  if (!tiff_capturing) {
    if (prev_error) prev_error(module, fmt, ap);
    return;
  }
  if (tiff_message[0]) return; /* the first says what went wrong */
  int n = module && *module
              ? snprintf(tiff_message, sizeof tiff_message, "%s: ", module)
              : 0;
  if (n < 0 || (size_t)n >= sizeof tiff_message) n = 0;
  vsnprintf(tiff_message + n, sizeof tiff_message - (size_t)n, fmt, ap);
}

static void on_tiff_warning(const char *module, const char *fmt, va_list ap) {
  if (!tiff_capturing && prev_warning) prev_warning(module, fmt, ap);
}

static void install_handlers(void) {
  prev_error = TIFFSetErrorHandler(on_tiff_error);
  prev_warning = TIFFSetWarningHandler(on_tiff_warning);
}

/* Start keeping this thread's libtiff messages (until tiff_capture_end). */
static void tiff_capture_begin(void) {
  pthread_once(&handlers_once, install_handlers);
  tiff_message[0] = 0;
  tiff_capturing = 1;
}

/* Stop; OpenSlide's error ``oerr`` with libtiff's first message added,
 * when there was one, into buf. */
static const char *tiff_capture_end(const char *oerr, char *buf, size_t len) {
  tiff_capturing = 0;
  if (!oerr) return NULL;
  if (!tiff_message[0] || strstr(oerr, tiff_message)) return oerr;
  size_t m = strlen(tiff_message);
  while (m && (tiff_message[m - 1] == '.' || tiff_message[m - 1] == '\n'))
    tiff_message[--m] = 0; /* the sentence goes inside our parentheses */
  snprintf(buf, len, "%s (libtiff: %s)", oerr, tiff_message);
  return buf;
}

void sc_slide_close(sc_slide *s) {
  if (!s) return;
  if (s->osr) openslide_close(s->osr);
  free(s->path);
  free(s->dims);
  free(s->downsample);
  free(s->sheared);
  free(s);
}

/*
 * Levels OpenSlide 3.4 reads wrong, without an error: a TIFF level narrower
 * or shorter than its tiles whose tiles are not JPEG (Compression 7).
 * OpenSlide decodes those through libtiff's RGBA reader, which since
 * libtiff 4.5 clips a tile's raster to the image and so shears its rows
 * (pixels off by up to 255; seen with OpenSlide 3.4.1 and libtiff 4.5.0);
 * JPEG tiles OpenSlide decodes itself. Such levels are the coarsest of
 * many pyramids, and small tiled images. A level is the first tiled
 * directory of its size, as OpenSlide's TIFF drivers take them.
 */
static void sheared_levels(sc_slide *s, const sc_tiff_dir *dirs, int n_dirs) {
  for (int32_t l = 0; l < s->levels; l++) {
    const int64_t w = s->dims[2 * l], h = s->dims[2 * l + 1];
    for (int i = 0; i < n_dirs; i++) {
      const sc_tiff_dir *d = &dirs[i];
      if ((int64_t)d->w != w || (int64_t)d->h != h) continue;
      if (d->compression != 7 && ((int64_t)d->tw > w || (int64_t)d->th > h)) {
        s->sheared[2 * l] = (int64_t)d->tw;
        s->sheared[2 * l + 1] = (int64_t)d->th;
      }
      break;
    }
  }
}

int sc_slide_level_sheared(const sc_slide *s, int32_t level) {
  if (!s || level < 0 || level >= s->levels) return -1;
  return s->sheared[2 * level] != 0;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

sc_slide *sc_slide_open(const char *path, char *err, size_t errlen) {
  struct stat st;
  if (!path || !*path) {
    _sc_slide_fail(err, errlen, "streamcnn: empty slide path");
    return NULL;
  }
  if (stat(path, &st) != 0) {
    char why[256] = "unknown error"; /* strerror is not thread-safe */
    (void)strerror_r(errno, why, sizeof why);
    _sc_slide_fail(err, errlen, "streamcnn: cannot open slide '%s': %s", path,
                   why);
    return NULL;
  }
  if (!S_ISREG(st.st_mode)) {
    _sc_slide_fail(err, errlen,
               "streamcnn: cannot open slide '%s': not a regular file%s", path,
               S_ISDIR(st.st_mode) ? " (a directory)" : "");
    return NULL;
  }
  sc_tiff_dir *dirs = NULL;
  int n_dirs = 0;
  if (_sc_tiff_precheck(path, &dirs, &n_dirs, err, errlen) != SC_OK)
    return NULL;
  char detail[512];
  tiff_capture_begin();
  openslide_t *osr = openslide_open(path);
  const char *oerr = tiff_capture_end(osr ? openslide_get_error(osr) : NULL,
                                      detail, sizeof detail);
  if (!osr) {
    free(dirs);
    _sc_slide_fail(err, errlen,
               "streamcnn: '%s' is not a slide OpenSlide can read: not a "
               "slide format (Aperio .svs, Hamamatsu, MIRAX, ..., tiled "
               "pyramidal TIFF; a striped TIFF is not a slide), or a damaged "
               "or truncated file",
               path);
    return NULL;
  }
  if (oerr) {
    free(dirs);
    _sc_slide_fail(err, errlen, "streamcnn: OpenSlide cannot read '%s': %s", path,
               oerr);
    openslide_close(osr);
    return NULL;
  }
  sc_slide *s = calloc(1, sizeof *s);
  int32_t n = openslide_get_level_count(osr);
  if (!s || n < 1) {
    _sc_slide_fail(err, errlen,
               s ? "streamcnn: '%s' has no levels (OpenSlide: %s)"
                 : "streamcnn: out of memory opening '%s'%s",
               path, s ? (openslide_get_error(osr) ? openslide_get_error(osr)
                                                   : "no error given")
                       : "");
    openslide_close(osr);
    free(s);
    free(dirs);
    return NULL;
  }
  s->osr = osr;
  s->levels = n;
  s->path = strdup(path);
  s->dims = calloc(2 * (size_t)n, sizeof *s->dims);
  s->downsample = calloc((size_t)n, sizeof *s->downsample);
  s->sheared = calloc(2 * (size_t)n, sizeof *s->sheared);
  if (!s->path || !s->dims || !s->downsample || !s->sheared) {
    free(dirs);
    _sc_slide_fail(err, errlen, "streamcnn: out of memory opening '%s'", path);
    sc_slide_close(s);
    return NULL;
  }
  for (int32_t l = 0; l < n; l++) {
    openslide_get_level_dimensions(osr, l, &s->dims[2 * l],
                                   &s->dims[2 * l + 1]);
    s->downsample[l] = openslide_get_level_downsample(osr, l);
  }
  sheared_levels(s, dirs, n_dirs);
  free(dirs);
  if ((oerr = openslide_get_error(osr)) != NULL) {
    _sc_slide_fail(err, errlen, "streamcnn: OpenSlide cannot read '%s': %s", path,
               oerr);
    sc_slide_close(s);
    return NULL;
  }
  s->bg[0] = s->bg[1] = s->bg[2] = 255;
  const char *bg =
      openslide_get_property_value(osr, OPENSLIDE_PROPERTY_NAME_BACKGROUND_COLOR);
  if (bg && strlen(bg) == 6) {
    int ok = 1, v[6];
    for (int i = 0; i < 6; i++) ok &= (v[i] = hexval(bg[i])) >= 0;
    if (ok)
      for (int i = 0; i < 3; i++) s->bg[i] = (uint8_t)(16 * v[2 * i] + v[2 * i + 1]);
  }
  return s;
}

int32_t sc_slide_level_count(const sc_slide *s) { return s ? s->levels : -1; }

int sc_slide_level(const sc_slide *s, int32_t level, int64_t *w, int64_t *h,
                   double *downsample) {
  if (!s || level < 0 || level >= s->levels) return SC_ERR;
  *w = s->dims[2 * level];
  *h = s->dims[2 * level + 1];
  *downsample = s->downsample[level];
  return SC_OK;
}

const char *sc_slide_property(const sc_slide *s, const char *name) {
  return s && name ? openslide_get_property_value(s->osr, name) : NULL;
}

const char *const *sc_slide_property_names(const sc_slide *s) {
  return s ? openslide_get_property_names(s->osr) : NULL;
}

void sc_slide_background(const sc_slide *s, uint8_t rgb[3]) {
  for (int i = 0; i < 3; i++) rgb[i] = s ? s->bg[i] : 255;
}

/* ---- reading ------------------------------------------------------------- */

typedef struct read_job {
  sc_slide *s;
  int32_t level;
  int64_t x, y;       /* level-0 coordinates of the region's top-left */
  int64_t w, h;       /* region extent, level pixels */
  int64_t px, py;     /* the part read: offset in the region ... */
  int64_t pw, ph;     /* ... and extent, level pixels (out is pw x ph) */
  int64_t kx0, ky0;   /* the first chunk column / row meeting the part */
  int64_t cols;       /* chunks per row meeting the part */
  int64_t n_chunks;   /* chunks meeting the part */
  int64_t *bx, *by;   /* starts of the chunks from kx0 / ky0 (and the end
                         of the last), level pixels: cols+1 / rows+1 */
  int64_t *x0, *y0;   /* their level-0 coordinates */
  uint8_t *out;
  int hwc;
  atomic_llong next;  /* next chunk to take */
  atomic_int failed;  /* set by the first failing thread */
  pthread_mutex_t err_lock;
  char err[1024];
} read_job;

static void job_fail(read_job *j, const char *fmt, const char *detail) {
  pthread_mutex_lock(&j->err_lock);
  if (!atomic_load(&j->failed)) {
    snprintf(j->err, sizeof j->err, fmt, j->s->path, detail);
    atomic_store(&j->failed, 1);
  }
  pthread_mutex_unlock(&j->err_lock);
}

/* Premultiplied ARGB over the background: c + (255 - a) * bg / 255. */
static inline uint8_t over(uint32_t c, uint32_t a, uint32_t bg) {
  return (uint8_t)(c + ((255 - a) * bg + 127) / 255);
}


/*
 * Chunk grid along one axis: CHUNK-pixel pieces of the level, each read at
 * the level-0 coordinate origin + round(start * downsample). OpenSlide maps
 * a level-0 origin to the level as origin / downsample and paints at that
 * sub-pixel offset (bilinear, in cairo) when it is not an integer. At levels
 * whose downsample is an integer the grid is therefore exact: the result is
 * what one openslide_read_region call gives, pixel for pixel. At other levels
 * (downsample e.g. 1.9994 when the level-0 extent is odd) a chunk's offset
 * differs from the region's by less than 0.5 / downsample of a pixel. The
 * grid depends only on the region, never on the thread count.
 */
static void cuts(int64_t origin, int64_t extent, double ds, int64_t k0,
                 int64_t k1, int64_t *b, int64_t *l0) {
  /* chunks k0 .. k1 - 1 of the grid and the end of the last: b[k - k0] */
  for (int64_t k = k0; k <= k1; k++) {
    const int64_t at = k * CHUNK < extent ? k * CHUNK : extent;
    b[k - k0] = at;
    l0[k - k0] = origin + llround((double)at * ds);
  }
}

static void *read_worker(void *arg) {
  read_job *j = arg;
  uint32_t *buf = malloc((size_t)CHUNK * CHUNK * sizeof *buf);
  if (!buf) {
    job_fail(j, "streamcnn: out of memory reading '%s'%s", "");
    return NULL;
  }
  const uint32_t bg[3] = {j->s->bg[0], j->s->bg[1], j->s->bg[2]};
  for (;;) {
    const long long k = atomic_fetch_add(&j->next, 1);
    if (k >= j->n_chunks || atomic_load(&j->failed)) break;
    const int64_t kx = k % j->cols, ky = k / j->cols; /* from kx0, ky0 */
    const int64_t cx = j->bx[kx], cy = j->by[ky];
    const int64_t cw = j->bx[kx + 1] - cx, ch = j->by[ky + 1] - cy;
    char detail[512];
    tiff_capture_begin();
    openslide_read_region(j->s->osr, buf, j->x0[kx], j->y0[ky], j->level, cw,
                          ch);
    const char *oerr = tiff_capture_end(openslide_get_error(j->s->osr), detail,
                                        sizeof detail);
    if (oerr) {
      job_fail(j, "streamcnn: OpenSlide failed reading '%s' (the handle is "
                  "now unusable: reopen the slide): %s",
               oerr);
      break;
    }
    /* the chunk's pixels inside the part: columns [c0, c1), rows [r0, r1)
     * of the region */
    const int64_t c0 = cx > j->px ? cx : j->px;
    const int64_t c1 = cx + cw < j->px + j->pw ? cx + cw : j->px + j->pw;
    const int64_t r0 = cy > j->py ? cy : j->py;
    const int64_t r1 = cy + ch < j->py + j->ph ? cy + ch : j->py + j->ph;
    const int64_t n = c1 - c0;
    for (int64_t row = r0; row < r1; row++) {
      const uint32_t *src = buf + (row - cy) * cw + (c0 - cx);
      const int64_t orow = row - j->py, ocol = c0 - j->px;
      if (j->hwc) {
        uint8_t *dst = j->out + (orow * j->pw + ocol) * 3;
        for (int64_t c = 0; c < n; c++) {
          const uint32_t p = src[c], a = p >> 24;
          dst[3 * c] = over((p >> 16) & 255, a, bg[0]);
          dst[3 * c + 1] = over((p >> 8) & 255, a, bg[1]);
          dst[3 * c + 2] = over(p & 255, a, bg[2]);
        }
      } else {
        const int64_t plane = j->pw * j->ph, off = orow * j->pw + ocol;
        uint8_t *d0 = j->out + off, *d1 = d0 + plane, *d2 = d1 + plane;
        for (int64_t c = 0; c < n; c++) {
          const uint32_t p = src[c], a = p >> 24;
          d0[c] = over((p >> 16) & 255, a, bg[0]);
          d1[c] = over((p >> 8) & 255, a, bg[1]);
          d2[c] = over(p & 255, a, bg[2]);
        }
      }
    }
  }
  free(buf);
  return NULL;
}

int sc_slide_read(sc_slide *s, int32_t level, int64_t x, int64_t y, int64_t w,
                  int64_t h, uint8_t *out, int hwc, int threads, char *err,
                  size_t errlen) {
  return sc_slide_read_box(s, level, x, y, w, h, 0, 0, w, h, out, hwc, threads,
                           err, errlen);
}

int sc_slide_read_box(sc_slide *s, int32_t level, int64_t x, int64_t y,
                      int64_t w, int64_t h, int64_t bx, int64_t by, int64_t bw,
                      int64_t bh, uint8_t *out, int hwc, int threads, char *err,
                      size_t errlen) {
  if (!s) return _sc_slide_fail(err, errlen, "streamcnn: the slide is closed");
  if (level < 0 || level >= s->levels)
    return _sc_slide_fail(err, errlen,
                      "streamcnn: level %d is out of range for '%s' (it has "
                      "%d levels, 0 .. %d)",
                      (int)level, s->path, (int)s->levels, (int)s->levels - 1);
  if (s->sheared[2 * level])
    return _sc_slide_fail(
        err, errlen,
        "streamcnn: level %d of '%s' (%lld x %lld) is smaller than its "
        "%lld x %lld tiles and not JPEG-compressed, which OpenSlide 3.4 with "
        "libtiff 4.5 reads wrong (sheared rows, no error): read a finer level "
        "and resample it (sc_resample_u8)%s",
        (int)level, s->path, (long long)s->dims[2 * level],
        (long long)s->dims[2 * level + 1], (long long)s->sheared[2 * level],
        (long long)s->sheared[2 * level + 1],
        level == 0 ? "; at level 0, decode the TIFF with another reader" : "");
  if (w < 1 || h < 1 || w > MAX_EDGE || h > MAX_EDGE)
    return _sc_slide_fail(err, errlen,
                      "streamcnn: region size %lld x %lld is out of range "
                      "[1, %lld]",
                      (long long)w, (long long)h, (long long)MAX_EDGE);
  if (x < -MAX_EDGE * 64 || y < -MAX_EDGE * 64 || x > MAX_EDGE * 64 ||
      y > MAX_EDGE * 64)
    return _sc_slide_fail(err, errlen,
                      "streamcnn: region origin (%lld, %lld) is out of range",
                      (long long)x, (long long)y);
  if (bw < 1 || bh < 1 || bx < 0 || by < 0 || bw > w - bx || bh > h - by)
    return _sc_slide_fail(err, errlen,
                      "streamcnn: part (%lld, %lld) + %lld x %lld is not "
                      "inside the %lld x %lld region",
                      (long long)bx, (long long)by, (long long)bw,
                      (long long)bh, (long long)w, (long long)h);
  if (!out) return _sc_slide_fail(err, errlen, "streamcnn: no output buffer");
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  read_job j;
  memset(&j, 0, sizeof j);
  j.s = s;
  j.level = level;
  j.x = x;
  j.y = y;
  j.w = w;
  j.h = h;
  j.px = bx;
  j.py = by;
  j.pw = bw;
  j.ph = bh;
  const double ds = s->downsample[level];
  /* level-0 offsets of up to MAX_EDGE level pixels must stay far inside
   * int64 (llround of a larger value is undefined) */
  if (!(ds >= 1e-6 && ds <= (double)(1LL << 24)))
    return _sc_slide_fail(err, errlen,
                      "streamcnn: level %d of '%s' has a downsample (%g) out "
                      "of range",
                      (int)level, s->path, ds);
  /* the chunks of the region's grid (as a read of the whole region) that
   * meet the part: columns [kx0, kx1), rows [ky0, ky1) */
  j.kx0 = bx / CHUNK;
  j.ky0 = by / CHUNK;
  const int64_t kx1 = (bx + bw - 1) / CHUNK + 1, ky1 = (by + bh - 1) / CHUNK + 1;
  j.cols = kx1 - j.kx0;
  j.n_chunks = j.cols * (ky1 - j.ky0);
  const int64_t ncx = j.cols + 1, ncy = ky1 - j.ky0 + 1;
  j.bx = malloc(2 * (size_t)(ncx + ncy) * sizeof *j.bx);
  if (!j.bx)
    return _sc_slide_fail(err, errlen, "streamcnn: out of memory reading '%s'",
                      s->path);
  j.x0 = j.bx + ncx;
  j.by = j.x0 + ncx;
  j.y0 = j.by + ncy;
  cuts(x, w, ds, j.kx0, kx1, j.bx, j.x0);
  cuts(y, h, ds, j.ky0, ky1, j.by, j.y0);
  j.out = out;
  j.hwc = !!hwc;
  atomic_init(&j.next, 0);
  atomic_init(&j.failed, 0);
  pthread_mutex_init(&j.err_lock, NULL);
  if (threads > j.n_chunks) threads = (int)j.n_chunks;
  pthread_t tid[MAX_THREADS];
  int started = 0;
  for (int t = 1; t < threads; t++)
    if (pthread_create(&tid[started], NULL, read_worker, &j) == 0) started++;
  read_worker(&j); /* this thread works too */
  for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
  pthread_mutex_destroy(&j.err_lock);
  free(j.bx);
  if (atomic_load(&j.failed))
    return _sc_slide_fail(err, errlen, "%s", j.err);
  return SC_OK;
}

#endif /* SC_WITH_OPENSLIDE */
