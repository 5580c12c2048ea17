"""Builds the optional native decoder (native/, cffi API mode) with the package.

Optional means optional: if it does not compile (no C compiler, no headers), the
install still succeeds and monitor uses its pure-Python decoder.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as err:
            print(f"monitor: native decoder not built ({err}); the Python decoder will be used", file=sys.stderr)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as err:
            print(f"monitor: native decoder not built ({err}); the Python decoder will be used", file=sys.stderr)


def native_extensions() -> list:  # type: ignore[type-arg]
    builder = Path(__file__).parent / "native" / "build.py"
    try:
        spec = importlib.util.spec_from_file_location("monitor_native_build", builder)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return [module.ffibuilder.distutils_extension(tmpdir="build/native")]
    except Exception as err:
        print(f"monitor: native decoder skipped ({err})", file=sys.stderr)
        return []


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
