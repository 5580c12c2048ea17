"""Build monitor._cnproc_native (cffi, API mode) in place: python native/build.py"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cffi import FFI, VerificationError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "native" / "cnproc.c"
BUILD_DIR = ROOT / "native" / "_build"
PACKAGE_DIR = ROOT / "monitor"
MODULE = "monitor._cnproc_native"

# What Python may call; must agree with native/cnproc.c (cffi checks it when compiling).
CDEF = """
struct cn_record {
    uint32_t seq;
    uint32_t what;
    uint32_t cpu;
    uint64_t timestamp_ns;
    int32_t d[6];
};
struct cn_state;

struct cn_state *cn_new(int all_events);
void cn_free(struct cn_state *st);
int cn_watch(struct cn_state *st, int32_t tgid, int tree);
void cn_unwatch(struct cn_state *st, int32_t tgid);
int cn_drain(struct cn_state *st, int fd, struct cn_record *out, int max, int *overrun);
uint64_t cn_received(struct cn_state *st);
int cn_decode(const uint8_t *buf, size_t len, struct cn_record *out, int max);
int pidfd_exit_status(int pidfd, int *status);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    MODULE,
    SOURCE.read_text(),
    extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
)


def build_inplace() -> Path:
    """Compile into native/_build and install the .so next to monitor/__init__.py."""
    BUILD_DIR.mkdir(exist_ok=True)
    built = Path(ffibuilder.compile(tmpdir=str(BUILD_DIR), verbose=False))
    for stale in PACKAGE_DIR.glob("_cnproc_native*.so"):
        stale.unlink()
    target = PACKAGE_DIR / built.name
    shutil.copy2(built, target)
    return target


def main() -> int:
    try:
        target = build_inplace()
    except (VerificationError, OSError) as err:  # a compile or link error, a missing compiler
        print(f"native/build.py: building {MODULE} failed: {err}", file=sys.stderr)
        return 1
    print(f"built {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
