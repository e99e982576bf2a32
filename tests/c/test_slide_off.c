/* test_slide_off.c — slide.c and tiffwrite.c compiled without OpenSlide
 * (STREAMCNN_OPENSLIDE=OFF): every entry point fails cleanly and says why. */
#include "slide.h"
#include "testutil.h"

#include <string.h>

static void expect_msg(const char *err) {
  CHECK(strstr(err, "built without OpenSlide") != NULL);
}

int main(void) {
  char err[256] = "";
  CHECK_EQ(sc_slide_available(), 0);
  CHECK(sc_slide_open("/nonexistent.svs", err, sizeof err) == NULL);
  expect_msg(err);
  sc_slide_close(NULL);
  CHECK_EQ(sc_slide_level_count(NULL), -1);
  uint8_t rgb[3] = {0, 0, 0}, px[3];
  sc_slide_background(NULL, rgb);
  CHECK_EQ(rgb[0], 255);
  err[0] = 0;
  CHECK_EQ(sc_slide_read(NULL, 0, 0, 0, 1, 1, px, 0, 1, err, sizeof err), SC_ERR);
  expect_msg(err);
  err[0] = 0;
  CHECK_EQ(sc_slide_read_box(NULL, 0, 0, 0, 1, 1, 0, 0, 1, 1, px, 0, 1, err,
                             sizeof err),
           SC_ERR);
  expect_msg(err);
  err[0] = 0;
  const uint8_t *lv[1] = {px};
  int64_t w = 1, h = 1;
  CHECK_EQ(sc_tiff_write_pyramid("/tmp/x.tif", 1, lv, &w, &h, 16, 1, 90, NULL, err,
                                 sizeof err),
           SC_ERR);
  expect_msg(err);
  err[0] = 0;
  CHECK_EQ(sc_tiff_write_striped("/tmp/x.tif", px, 1, 1, err, sizeof err), SC_ERR);
  expect_msg(err);
  err[0] = 0;
  CHECK(sc_tiff_stream_open("/tmp/x.tif", 16, 16, 1, 16, 1, 0.5, NULL, err,
                            sizeof err) == NULL);
  expect_msg(err);
  err[0] = 0;
  CHECK_EQ(sc_tiff_stream_write(NULL, px, 1, err, sizeof err), SC_ERR);
  expect_msg(err);
  err[0] = 0;
  CHECK_EQ(sc_tiff_stream_close(NULL, err, sizeof err), SC_ERR);
  expect_msg(err);
  sc_tiff_stream_abort(NULL);
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("test_slide_off: all checks passed\n");
  return g_failures ? 1 : 0;
}
