# segk runtime image for GPU nodes: the dynamically linked binary on a distroless C runtime
# (glibc + libgcc, nothing else). The NVIDIA container toolkit mounts the driver's libcuda at
# run time; segk embeds its kernels and needs nothing from the CUDA toolkit.
#
#   cargo build --profile dist            # with nvcc on PATH, so the kernels are embedded
#   docker build -t segk .
#   docker run --rm --gpus all -v /data:/data segk train /data/Dataset001_X 0
#
# No --ipc=host or --shm-size: segk's augmentation workers are threads of one process and
# share batch memory directly, so /dev/shm is never used.
FROM gcr.io/distroless/cc-debian12
COPY target/dist/segk /usr/local/bin/segk
ENTRYPOINT ["/usr/local/bin/segk"]
CMD ["doctor"]
