"""Print where pip-installed native dependencies live, for CMake.

Usage: python find_python_paths.py openblas|cublas|pybind11
Prints "include_dir;lib_dir" (or the CMake dir for pybind11), or nothing when not found.
"""
import os
import sys


def openblas():
    import scipy_openblas32 as s

    return f"{s.get_include_dir()};{s.get_lib_dir()}"


def cublas():
    for base in sys.path:
        root = os.path.join(base, "nvidia", "cu13")
        if os.path.isfile(os.path.join(root, "include", "cublas_v2.h")) and os.path.isfile(
            os.path.join(root, "lib", "libcublas.so.13")
        ):
            return f"{os.path.join(root, 'include')};{os.path.join(root, 'lib')}"
    return ""


def pybind11():
    import pybind11 as p

    return p.get_cmake_dir()


if __name__ == "__main__":
    try:
        print({"openblas": openblas, "cublas": cublas, "pybind11": pybind11}[sys.argv[1]](), end="")
    except ImportError:
        pass
