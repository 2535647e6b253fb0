"""``python -m dsa_ops``: which backends this machine has, and why the others are missing."""
import torch

import dsa_ops
from dsa_ops import extension


def main() -> None:
    print(f"dsa_ops {dsa_ops.__version__}  torch {torch.__version__}  "
          f"CUDA build {torch.version.cuda}  GPU {torch.cuda.is_available()}")
    print(f"extension: {extension.loaded_path() or extension.load_error()}")
    from dsa_ops.ops.masked_attention import cpu

    if cpu.compiled_kernels():
        threads, wanted = cpu.compiled_kernel_threads(), torch.get_num_threads()
        shortfall = ("" if threads == wanted else
                     " (built without OpenMP: rebuild with g++, `make rebuild`)")
        print(f"cpu backend, float32: compiled kernels of dsa_ops._C on {threads} of {wanted} "
              f"threads{shortfall}")
    else:
        print("cpu backend, float32: the torch loop (no compiled CPU kernels: "
              f"{extension.load_error() or 'dsa_ops._C lacks them'})")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name in dsa_ops.BACKENDS:
            reason = dsa_ops.backend_unavailable_reason(name, device)
            print(f"  {device:4s} {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")


if __name__ == "__main__":
    main()
