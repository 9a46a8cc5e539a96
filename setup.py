"""The C kernels, built when the package is installed (everything else is in pyproject.toml).

model_store/kernels.c with its bindings (kernels_module.c) becomes one extension module per
vector width: a portable baseline and, on x86-64, the x86-64-v3 (AVX2, FMA) and x86-64-v4
(AVX-512) levels; model_store/kernels.py imports the widest the CPU runs. The builds are
optional: where one fails (no C compiler, no OpenMP) the install goes on, and the cells run as
torch ops.
"""

import platform

from setuptools import Extension, setup

# -ffast-math lets gcc call glibc's vectorised expf/tanhf (libmvec); no peeling for alignment keeps
# each element's code path a function of its column alone (see kernels.c). The link goes without
# -ffast-math (it would link crtfastmath.o, which makes the whole process flush subnormal floats to
# zero) and without libgomp: the OpenMP calls resolve at import to the libgomp torch has loaded.
COMPILE = ["-O3", "-ffast-math", "--param", "vect-max-peeling-for-alignment=0", "-fopenmp"]
LEVELS = {"baseline": []}
if platform.machine() in ("x86_64", "AMD64"):
    LEVELS |= {"x86_64_v3": ["-march=x86-64-v3"], "x86_64_v4": ["-march=x86-64-v4"]}
LIBRARIES = ["mvec", "m"] if platform.system() == "Linux" and platform.machine() == "x86_64" else ["m"]

setup(ext_modules=[
    Extension(f"model_store._kernels_{level}", ["model_store/kernels_module.c"], depends=["model_store/kernels.c"],
              define_macros=[("MODULE_NAME", f"_kernels_{level}")], extra_compile_args=COMPILE + flags,
              libraries=LIBRARIES, optional=True)
    for level, flags in LEVELS.items()
])
