# FindOpenSlide.cmake — OpenSlide (Debian: libopenslide-dev) via pkg-config,
# falling back to a plain header/library search.
# Output: OpenSlide_FOUND, OpenSlide_VERSION, imported target OpenSlide::OpenSlide.
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(PC_OpenSlide QUIET openslide)
endif()
find_path(OpenSlide_INCLUDE_DIR openslide.h
  HINTS ${PC_OpenSlide_INCLUDE_DIRS} PATH_SUFFIXES openslide)
find_library(OpenSlide_LIBRARY openslide HINTS ${PC_OpenSlide_LIBRARY_DIRS})
set(OpenSlide_VERSION "${PC_OpenSlide_VERSION}")
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(OpenSlide
  REQUIRED_VARS OpenSlide_LIBRARY OpenSlide_INCLUDE_DIR
  VERSION_VAR OpenSlide_VERSION)
if(OpenSlide_FOUND AND NOT TARGET OpenSlide::OpenSlide)
  add_library(OpenSlide::OpenSlide UNKNOWN IMPORTED)
  set_target_properties(OpenSlide::OpenSlide PROPERTIES
    IMPORTED_LOCATION "${OpenSlide_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${OpenSlide_INCLUDE_DIR}")
endif()
