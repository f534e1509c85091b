"""vitkern: fused CUDA/Triton kernels for Vision Transformers.

The Triton kernels are JIT-compiled at first use. The compiled CUDA backend
``vitkern._C`` is built from ``csrc/`` (plain CUDA C++ + pybind11: no PyTorch
headers, so it does not depend on the installed torch's ABI) when ``nvcc`` is found:

  VITKERN_BUILD_CUDA   auto (default): build when nvcc is found; on a build error, warn and
                       install the pure-Python package. 1: build, and fail if it cannot.
                       0: never build.
  VITKERN_CUDA_ARCHS   ";"-separated SM targets, default "80;90a" (A100; H100/H200 with wgmma).
  CUDA_HOME            where nvcc lives, if it is not on PATH.

Object files compile in parallel with ninja (the ``ninja`` package) when it is
available, one by one otherwise.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
CUDA_SOURCES = ["patch_embed.cu"]
CXX_SOURCES = ["bindings.cpp"]


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc):
    real = os.path.realpath(nvcc)
    if open(real, "rb").read(2) == b"#!":  # a wrapper script (e.g. /usr/local/bin/nvcc): look for the toolkit
        for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if candidate and os.path.isdir(os.path.join(candidate, "include")):
                return candidate
    return os.path.dirname(os.path.dirname(real))


def _gencode_flags():
    archs = [a.strip() for a in os.environ.get("VITKERN_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    # -gencode keeps sm_90a's wgmma/setmaxnreg (the -arch=sm_90a shorthand also runs a plain sm_90 pass).
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


class BuildCudaExtension(build_ext):
    """Builds vitkern._C with nvcc (kernels) and the host C++ compiler (pybind11 bindings)."""

    def build_extension(self, ext):
        try:
            self._build(ext)
        except Exception as exc:  # noqa: BLE001 - reported, then fatal or not by VITKERN_BUILD_CUDA
            if os.environ.get("VITKERN_BUILD_CUDA", "auto") == "1":
                raise
            warnings.warn(f"vitkern: building the CUDA backend failed ({exc}); installing without vitkern._C "
                          f"(set VITKERN_BUILD_CUDA=1 to make this an error)")

    def _build(self, ext):
        import pybind11

        nvcc = _find_nvcc()
        cuda = _cuda_home(nvcc)
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        tmp = os.path.abspath(os.path.join(self.build_temp, "vitkern_C"))
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{os.path.join(cuda, 'include')}", f"-I{os.path.abspath(CSRC)}"]
        cxx = os.environ.get("CXX", "g++")
        nvcc_cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *_gencode_flags(), *includes]
        cxx_cmd = [cxx, "-O2", "-std=c++17", "-fPIC", *includes]
        objects, jobs = [], []
        for src in CUDA_SOURCES + CXX_SOURCES:
            obj = os.path.join(tmp, os.path.splitext(src)[0] + ".o")
            cmd = (nvcc_cmd if src.endswith(".cu") else cxx_cmd) + ["-c", os.path.abspath(os.path.join(CSRC, src)),
                                                                    "-o", obj]
            objects.append(obj)
            jobs.append(cmd)
        link = [cxx, "-shared", *objects, f"-L{os.path.join(cuda, 'lib64')}", "-lcudart_static", "-ldl", "-lrt",
                "-lpthread", "-o", out]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError:
                ninja = None
        if ninja:
            self._run_ninja(ninja, tmp, jobs, objects, link, out)
        else:
            for cmd in jobs:
                subprocess.check_call(cmd)
            subprocess.check_call(link)

    @staticmethod
    def _run_ninja(ninja, tmp, jobs, objects, link, out):
        def quote(cmd):
            return " ".join(c.replace(" ", "$ ") for c in cmd)

        lines = ["rule run", "  command = $cmd", ""]
        for cmd, obj in zip(jobs, objects):
            source = cmd[cmd.index("-c") + 1]
            lines += [f"build {obj}: run {source}", f"  cmd = {quote(cmd)}", ""]
        lines += [f"build {out}: run {' '.join(objects)}", f"  cmd = {quote(link)}", ""]
        path = os.path.join(tmp, "build.ninja")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        subprocess.check_call([ninja, "-f", path], cwd=tmp)  # ninja's own log stays in the build folder


def _extensions():
    mode = os.environ.get("VITKERN_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"VITKERN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return []
    if _find_nvcc() is None:
        if mode == "1":
            sys.exit("VITKERN_BUILD_CUDA=1 but nvcc was not found (put it on PATH or set CUDA_HOME)")
        return []
    return [Extension("vitkern._C", sources=[])]


setup(
    name="vitkern",
    version="0.1.0",
    description="Fused CUDA/Triton kernels for Vision Transformers (ViT, Swin, PVT)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vitkern", "vitkern.*"]),
    package_data={"vitkern.configs": ["*.json"]},  # tuned launch configs per GPU (vitkern.tools.tune)
    install_requires=[
        "torch>=2.4",
        "numpy",
        # Triton ships with Linux CUDA builds of torch; CPU builds need it for
        # the interpreter (TRITON_INTERPRET=1), the only way to run kernels on CPU.
        "triton>=3.1; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "timm>=1.0.15", "matplotlib"],
        "bench": ["pytest>=8", "pytest-benchmark>=4"],
        # `vitkern profile`: the plot (matplotlib) and the default models (timm's ViT, Swin, PVT v2).
        "profile": ["matplotlib", "timm>=1.0.15"],
    },
    entry_points={"console_scripts": ["vitkern = vitkern.cli:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildCudaExtension},
)
