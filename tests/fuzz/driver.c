/*
 * driver.c — a main() for the fuzz targets without libFuzzer (gcc, the
 * ctest build, valgrind): runs LLVMFuzzerTestOneInput once on every file
 * named, or in every directory named (not recursive). This is how the seed
 * corpora and the regression inputs (tests/fuzz/regress/<target>/, one file
 * per finding) run in every `make test`. Exit status 0 when all ran; a
 * broken invariant traps (FZ_CHECK).
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "driver: cannot open %s\n", path);
    return 1;
  }
  fseek(f, 0, SEEK_END);
  const long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *buf = malloc(n > 0 ? (size_t)n : 1);
  const int ok = buf && fread(buf, 1, (size_t)n, f) == (size_t)n;
  fclose(f);
  if (!ok) {
    free(buf);
    fprintf(stderr, "driver: cannot read %s\n", path);
    return 1;
  }
  LLVMFuzzerTestOneInput(buf, (size_t)n);
  free(buf);
  return 0;
}

int main(int argc, char **argv) {
  int bad = 0, ran = 0;
  for (int i = 1; i < argc; i++) {
    struct stat st;
    if (stat(argv[i], &st) != 0) continue; /* e.g. no regress/ dir yet */
    if (!S_ISDIR(st.st_mode)) {
      bad += run_file(argv[i]);
      ran++;
      continue;
    }
    DIR *d = opendir(argv[i]);
    if (!d) continue;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.') continue;
      char path[4096];
      snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
      bad += run_file(path);
      ran++;
    }
    closedir(d);
  }
  printf("driver: %d inputs\n", ran);
  return bad || !ran;
}
