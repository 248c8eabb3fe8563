from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="dask_kaas",
    version="0.1.0",
    description="Kernel-as-a-Service on Dask: serverless GPU kernel graphs on a shared pool",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dask_kaas", "dask_kaas.*"]),
    package_data={"dask_kaas": ["kaas.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "dask[distributed]>=2026.1.1,<2027",
        "numpy>=1.26",
        "bokeh>=3.1,<3.10",
        "prometheus_client>=0.17",
        "pyyaml>=6",
        "tqdm>=4.60",
        # const identity: a content hash taken at every submission (GB/s)
        "xxhash>=3.0",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.2",
            "hypothesis>=6.90",
            "playwright>=1.40",
            "matplotlib>=3.7",
            # the KServe v2 gateway is tested with the real Triton HTTP client
            "tritonclient[http]>=2.40",
            # NVRTC checks every shipped CUDA source without a GPU (tests/test_nvrtc.py);
            # the cuda12/cuda13 extras narrow these to one CUDA major version.
            "cuda-bindings>=12.8,<14",
            "nvidia-cuda-nvrtc>=13.0,<14",
            # ONNX import: conformance cases and models checked against onnxruntime
            "onnx>=1.16",
            "onnxruntime>=1.17",
            # a scikit-learn model converted to ONNX (tests/test_onnx_models.py)
            "scikit-learn>=1.3",
            "skl2onnx>=1.16",
        ],
        "bench": ["matplotlib>=3.7"],
        # KernelGraph.from_onnx / dask_kaas.onnx (the kernels themselves need only NumPy)
        "onnx": ["onnx>=1.16"],
        # Workers compile CUDA C with NVRTC into a cubin for their device, which
        # loads on any driver of the same CUDA major version (PTX would need a
        # driver at least as new as NVRTC): NVRTC's major version is pinned.
        "cuda12": ["cupy-cuda12x>=13.3", "rmm-cu12>=24.10", "cuda-bindings>=12.8,<13",
                   "nvidia-cuda-nvrtc-cu12>=12.8,<13"],
        "cuda13": ["cupy-cuda13x>=14.0", "rmm-cu13>=25.10", "cuda-bindings>=13.0.1,<14",
                   "nvidia-cuda-nvrtc>=13.0,<14"],
    },
    entry_points={"console_scripts": ["dask-kaas=dask_kaas.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Dask",
        "Topic :: System :: Distributed Computing",
    ],
)
