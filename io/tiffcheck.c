/*
 * tiffcheck.c — structural check of a TIFF file before OpenSlide opens it.
 *
 * openslide_open parses every TIFF-like file itself (its "tifflike"
 * reader: every directory, every tag's values) before any vendor code
 * runs. On damaged files OpenSlide 3.4 (Debian 12) can take the process
 * down or allocate what the file says; tests/fuzz/fuzz_slide found two
 * such inputs (both kept in tests/fuzz/regress/slide/):
 *  - a tag whose value count claims gigabytes (an ASCII tag of 4.3e9
 *    bytes in a 11 KB file): OpenSlide mallocs that much at open (it
 *    survives a refused allocation: under a 3 GB address-space limit the
 *    file still opens), a transient of gigabytes per open from a damaged
 *    file, which libFuzzer's malloc limit reports;
 *  - an Aperio file whose second level is far larger than its first: a
 *    per-axis downsample rounds to 0 and OpenSlide divides by it (SIGFPE).
 *    Only Aperio files (directory 0's ImageDescription begins "Aperio", as
 *    OpenSlide's Aperio driver tells them) are held to shrinking levels:
 *    other vendors order their directories otherwise (Leica SCN puts the
 *    macro image first; OpenSlide's generic TIFF driver sorts the levels
 *    by size), and a small first tiled directory is valid there.
 * We cannot fix OpenSlide, and a slide reader must not crash its caller,
 * so sc_slide_open refuses such files here with a message. The walk reads
 * directory entries only (no pixels, no tag values): classic TIFF and
 * BigTIFF, either byte order. Not a TIFF (MIRAX, Hamamatsu .vms, ...):
 * OpenSlide decides. A TIFF damaged in ways that cannot hurt (a bad
 * offset, a loop of directories): OpenSlide reports it itself.
 * The walk also hands back every tiled directory's size, tile size and
 * compression, from which slide.c finds the levels OpenSlide reads wrong
 * (sheared_levels).
 * Thread-safe: no global state.
 */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#define MAX_DIRS 4096 /* more is no slide; OpenSlide's loop check does the rest */

typedef struct {
  FILE *f;
  uint64_t size;
  int big;     /* BigTIFF: 8-byte counts and offsets, 20-byte entries */
  int swap;    /* file byte order differs from ours */
} tiff_file;

static int read_at(tiff_file *t, uint64_t off, void *buf, size_t n) {
  if (off > t->size || n > t->size - off) return -1;
  if (fseeko(t->f, (off_t)off, SEEK_SET) != 0) return -1;
  return fread(buf, 1, n, t->f) == n ? 0 : -1;
}

/* An unsigned integer of n (2, 4, 8) bytes in the file's byte order. */
static uint64_t uint_of(const tiff_file *t, const uint8_t *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) {
    const int k = t->swap ? i : n - 1 - i; /* most significant first */
    v = (v << 8) | p[k];
  }
  return v;
}

static int host_little(void) {
  const uint16_t one = 1;
  return *(const uint8_t *)&one == 1;
}

/* Bytes per value of a TIFF field type; 0 for a type TIFF does not define
 * (OpenSlide refuses those itself, without allocating). */
static uint64_t type_size(uint64_t type) {
  switch (type) {
    case 1: case 2: case 6: case 7: return 1;  /* BYTE ASCII SBYTE UNDEFINED */
    case 3: case 8: return 2;                  /* SHORT SSHORT */
    case 4: case 9: case 11: case 13: return 4;  /* LONG SLONG FLOAT IFD */
    case 5: case 10: case 12: case 16: case 17: case 18: return 8;
    default: return 0;
  }
}

int _sc_tiff_precheck(const char *path, sc_tiff_dir **dirs, int *n_dirs,
                      char *err, size_t errlen) {
  tiff_file t = {0};
  uint8_t hdr[16];
  sc_tiff_dir *found = NULL;
  int n_found = 0;
  if (dirs) *dirs = NULL, *n_dirs = 0;
  t.f = fopen(path, "rb");
  if (!t.f) return SC_OK; /* sc_slide_open's stat passed: OpenSlide says why */
  int rc = SC_OK;
  if (fseeko(t.f, 0, SEEK_END) != 0) goto done;
  const off_t end = ftello(t.f);
  if (end < 8) goto done;
  t.size = (uint64_t)end;
  if (read_at(&t, 0, hdr, t.size >= 16 ? 16 : 8)) goto done;
  if (hdr[0] == 'I' && hdr[1] == 'I') t.swap = !host_little();
  else if (hdr[0] == 'M' && hdr[1] == 'M') t.swap = host_little();
  else goto done; /* not a TIFF */
  const uint64_t version = uint_of(&t, hdr + 2, 2);
  uint64_t next;
  if (version == 42) {
    next = uint_of(&t, hdr + 4, 4);
  } else if (version == 43 && t.size >= 16 && uint_of(&t, hdr + 4, 2) == 8) {
    t.big = 1;
    next = uint_of(&t, hdr + 8, 8);
  } else {
    goto done; /* not a TIFF OpenSlide parses */
  }
  const int cnt_n = t.big ? 8 : 2, val_n = t.big ? 8 : 4;
  const uint64_t entry = t.big ? 20 : 12;
  uint64_t w0 = 0, h0 = 0; /* the first tiled directory: level 0 */
  int aperio = 0;          /* OpenSlide's Aperio driver takes the file */
  for (int dir = 0; next && dir < MAX_DIRS; dir++) {
    uint8_t buf[20];
    if (read_at(&t, next, buf, (size_t)cnt_n)) break; /* OpenSlide says so */
    const uint64_t n = uint_of(&t, buf, cnt_n);
    if (n > (t.size - next) / entry) {
      rc = _sc_slide_fail(err, errlen,
                          "streamcnn: '%s' is a damaged TIFF: directory %d "
                          "claims %llu entries, past the end of the file "
                          "(refused before OpenSlide, which would allocate "
                          "them)",
                          path, dir, (unsigned long long)n);
      break;
    }
    uint64_t w = 0, h = 0, tw = 0, th = 0, compression = 1;
    int tiled = 0;
    for (uint64_t i = 0; i < n && rc == SC_OK; i++) {
      if (read_at(&t, next + (uint64_t)cnt_n + i * entry, buf, (size_t)entry))
        goto done;
      const uint64_t tag = uint_of(&t, buf, 2), type = uint_of(&t, buf + 2, 2);
      const uint64_t count = uint_of(&t, buf + 4, val_n);
      const uint8_t *value = buf + 4 + val_n;
      const uint64_t size = type_size(type);
      if (!size) continue;
      if (count > t.size / size) { /* more bytes than the whole file */
        rc = _sc_slide_fail(err, errlen,
                            "streamcnn: '%s' is a damaged TIFF: tag %llu of "
                            "directory %d claims %llu values of %llu bytes, "
                            "more than the file holds (refused before "
                            "OpenSlide, which would allocate them)",
                            path, (unsigned long long)tag, dir,
                            (unsigned long long)count,
                            (unsigned long long)size);
        break;
      }
      if (dir == 0 && tag == 270 && type == 2 && count >= 6) {
        uint8_t d[6]; /* the description's start: inline, or at its offset */
        const uint8_t *start = value;
        if (count > (uint64_t)val_n)
          start = read_at(&t, uint_of(&t, value, val_n), d, 6) ? NULL : d;
        aperio = start && !memcmp(start, "Aperio", 6);
      }
      if (count != 1 || (type != 3 && type != 4 && type != 16)) continue;
      const uint64_t v = uint_of(&t, value, type == 3 ? 2 : type == 4 ? 4 : 8);
      if (tag == 256) w = v;
      else if (tag == 257) h = v;
      else if (tag == 322) tw = v, tiled |= 1;
      else if (tag == 323) th = v, tiled |= 2;
      else if (tag == 259) compression = v;
    }
    if (rc != SC_OK) break;
    if (tiled == 3) {
      if (!w || !h || !tw || !th) {
        rc = _sc_slide_fail(err, errlen,
                            "streamcnn: '%s' is a damaged TIFF: directory %d "
                            "is %llux%llu, tiled %llux%llu",
                            path, dir, (unsigned long long)w,
                            (unsigned long long)h, (unsigned long long)tw,
                            (unsigned long long)th);
        break;
      }
      if (!w0) {
        w0 = w, h0 = h;
      } else if (aperio && (w / 2 > w0 || h / 2 > h0)) { /* w > 2 w0 */
        rc = _sc_slide_fail(
            err, errlen,
            "streamcnn: '%s' is a damaged Aperio slide: tiled directory %d "
            "(%llux%llu) is over twice the size of the first one "
            "(%llux%llu), an Aperio pyramid's levels shrink (refused "
            "before OpenSlide, which can crash on it)",
            path, dir, (unsigned long long)w, (unsigned long long)h,
            (unsigned long long)w0, (unsigned long long)h0);
        break;
      }
      if (dirs) {
        if ((n_found & (n_found - 1)) == 0) { /* 0, 1, 2, 4, ...: grow */
          sc_tiff_dir *more =
              realloc(found, (size_t)(n_found ? 2 * n_found : 1) * sizeof *found);
          if (!more) {
            rc = _sc_slide_fail(err, errlen,
                                "streamcnn: out of memory opening '%s'", path);
            break;
          }
          found = more;
        }
        found[n_found++] = (sc_tiff_dir){w, h, tw, th, compression};
      }
    }
    if (read_at(&t, next + (uint64_t)cnt_n + n * entry, buf, (size_t)val_n))
      break;
    next = uint_of(&t, buf, val_n);
  }
done:
  fclose(t.f);
  if (rc == SC_OK && dirs) {
    *dirs = found;
    *n_dirs = n_found;
  } else {
    free(found);
  }
  return rc;
}
