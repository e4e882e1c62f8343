"""Shared helpers of the tests: small configurations of the tiny model."""
from lowmem_nablagfn.config import load_config

SMALL = ["sampling.batch_size=4", "training.batch_size=2", "training.gradient_accumulation_steps=1",
         "logging.sample_grid_seeds=0", "logging.tensorboard=false"]


def small_config(tmp_path, *overrides, name="run"):
    return load_config("tiny_cpu", SMALL + [f"logging.output_dir={tmp_path}", f"logging.run_name={name}",
                                            *overrides])
