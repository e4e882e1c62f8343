"""lowmem_nablagfn: memory-optimised residual ∇-DB (Nabla-GFlowNet) reward finetuning of Stable Diffusion."""
import logging as _logging

# diffusers and peft import bitsandbytes whenever it is installed (only an 8-bit optimiser here uses it);
# on CPUs with AVX512-BF16 its import warns that the optional `kernels` package for 4-bit layers is
# missing.  No 4-bit layer is used here: keep that line off every command's terminal.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
