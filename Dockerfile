# mtrain on NVIDIA GPUs: CUDA PyTorch, Transformer Engine (FP8), DeepEP built
# against NVSHMEM (expert-parallel all-to-all within and across nodes).
#
#   docker build -t mtrain .
#   docker run --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v $PWD/runs:/workspace/mtrain/runs mtrain \
#       torchrun --standalone --nproc-per-node 8 -m mtrain.cli.train cluster=h100_x8 parallel.backend=nccl
#
# --ipc=host: NCCL and DataLoader workers need a large shared memory.
# Across nodes add the InfiniBand devices (--device=/dev/infiniband --cap-add=IPC_LOCK)
# and see docs/launch.md for the NCCL / NVSHMEM variables.
# Build args: BASE_IMAGE, DEEPEP_REF (a DeepEP commit or tag), TORCH_CUDA_ARCH_LIST (9.0 = Hopper).

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

# mtrain's deepep dispatcher speaks DeepEP's v1 API (deep_ep.Buffer with get_dispatch_layout,
# dispatch, combine); DeepEP 2 replaced it with ElasticBuffer, so pin a v1 release.
ARG DEEPEP_REF=v1.2.1
ARG TORCH_CUDA_ARCH_LIST=9.0
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends git ninja-build libibverbs-dev rdma-core \
 && rm -rf /var/lib/apt/lists/*

# Transformer Engine: the NGC PyTorch image ships it; install it on other bases.
RUN python -c "import transformer_engine.pytorch" 2>/dev/null \
 || pip install --no-build-isolation "transformer-engine[pytorch]"

# NVSHMEM from its wheel; DeepEP builds against it (NVSHMEM_DIR) and loads its
# libraries at run time (LD_LIBRARY_PATH).
# The wheel ships only versioned libraries; the build links -lnvshmem_host.
RUN pip install nvidia-nvshmem-cu12 \
 && NVSHMEM_DIR=$(python -c "import nvidia.nvshmem; print(list(nvidia.nvshmem.__path__)[0])") \
 && test -d "$NVSHMEM_DIR/lib" \
 && ln -sfn "$NVSHMEM_DIR" /opt/nvshmem \
 && ln -sf "$(ls /opt/nvshmem/lib/libnvshmem_host.so.* | head -n1)" /opt/nvshmem/lib/libnvshmem_host.so
ENV NVSHMEM_DIR=/opt/nvshmem \
    LD_LIBRARY_PATH=/opt/nvshmem/lib:${LD_LIBRARY_PATH}

# DeepEP (deep_ep), compiled for TORCH_CUDA_ARCH_LIST against NVSHMEM_DIR.
RUN git clone https://github.com/deepseek-ai/DeepEP.git /opt/DeepEP \
 && cd /opt/DeepEP && git checkout "${DEEPEP_REF}" \
 && NVSHMEM_DIR=/opt/nvshmem pip install --no-build-isolation . \
 && cd / && python -c "import deep_ep"

# mtrain itself, with the Slurm launcher and the GPU extras.
WORKDIR /workspace/mtrain
COPY . .
RUN pip install --no-build-isolation -e ".[gpu,slurm]" \
 && python -c "import mtrain, mtrain.launch.requeue" \
 && mtrain-plan --help > /dev/null

CMD ["mtrain-train", "--help"]
