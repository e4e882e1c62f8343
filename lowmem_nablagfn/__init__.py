"""lowmem_nablagfn: memory-optimised residual ∇-DB (Nabla-GFlowNet) reward finetuning of Stable Diffusion."""
import logging as _logging

#: Third-party log lines that every command would print and that say nothing about this project's run,
#: keyed by the logger that emits them; each is matched by its opening words only, so any other
#: warning of the same logger still reaches the terminal.  Both come from importing bitsandbytes
#: (diffusers and peft import it whenever it is installed; only the 8-bit optimiser here uses it): on
#: CPUs with AVX512-BF16 it looks up a 4-bit CPU kernel through the `kernels` package (transformers
#: >= 5.25 requires it), which warns when offline and then fails.  No 4-bit layer is used here.
KNOWN_NOISE = {
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _DropKnownNoise(_logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``; lets every other through."""

    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


for _name, _prefixes in KNOWN_NOISE.items():  # before any of them is imported: the filter waits on the logger
    _logging.getLogger(_name).addFilter(_DropKnownNoise(_prefixes))
