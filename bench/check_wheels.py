"""Check that a wheels folder plus the device machine's own packages cover everything localtag imports.

Two checks, no network, run here before a device run:

1. **Declared needs**: every ``Requires-Dist`` of every wheel (markers evaluated for CPython 3.12 on
   x86-64 Linux, no extras) is either another wheel in the folder or a package the device already has.
2. **Actual imports**: this interpreter imports every ``localtag`` module (subpackages included),
   builds every command's parser, and imports the test suite's and the benchmarks' third-party
   modules; the distribution of every module loaded must be a wheel in the folder or a device package.

    python bench/check_wheels.py wheels
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement

# The nvidia-h200 image's Python packages, as the device README (KINDS.md) lists them (read 2026-11-17).
DEVICE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
# Present here but never needed there: this venv's extras of tools the device run does not use.
NOT_NEEDED = {"localtag", "httpx2", "httpcore2", "truststore"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_names(folder: Path) -> dict[str, Path]:
    return {norm(p.name.split("-")[0]): p for p in sorted(folder.glob("*.whl"))}


def declared_missing(wheels: dict[str, Path], have: set[str]) -> list[str]:
    missing = []
    for name, path in wheels.items():
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for ln in lines:
            if not ln.startswith("Requires-Dist:"):
                continue
            req = Requirement(ln.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(ENV):
                continue
            if norm(req.name) not in have:
                missing.append(f"{name} needs {req}")
    return missing


def imported_distributions() -> set[str]:
    from importlib.metadata import packages_distributions

    import localtag
    import localtag.cli as cli

    for m in pkgutil.walk_packages(localtag.__path__, "localtag."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    cli.build_parser()  # every command's parser
    for extra in ("pytest", "httpx", "open_clip", "ftfy", "uvicorn.protocols.http.h11_impl", "uvicorn.loops.asyncio",
                  "uvicorn.lifespan.on", "PIL.Image", "torchvision.io"):
        importlib.import_module(extra)
    dists = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    out = set()
    for mod in list(sys.modules):
        top = mod.split(".")[0]
        if top in stdlib or top.startswith("_"):
            continue
        out.update(norm(d) for d in dists.get(top, []))
    return out


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "wheels")
    wheels = wheel_names(folder)
    device = {norm(n) for n in DEVICE_PACKAGES}
    have = device | set(wheels)
    problems = declared_missing(wheels, have)
    used = imported_distributions()
    problems += [f"imported here, neither a wheel nor a device package: {d}" for d in sorted(used - have - NOT_NEEDED)]
    print(f"{len(wheels)} wheels in {folder}: {', '.join(sorted(wheels))}")
    print(f"distributions imported here: {len(used)}; from wheels: {sorted(used & set(wheels))}")
    both = sorted(set(wheels) & device)
    if both:
        print(f"carried although the device has them (the carried version wins on PYTHONPATH): {both}")
    for p in problems:
        print("MISSING", p)
    print("import set complete" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
