"""Models: Stable Diffusion parts (:mod:`.parts`), loading them by ``pretrained.model``
(:mod:`.loading`: built-in random models in :mod:`.builtin`, single files in :mod:`.single_file`),
the offline CLIP tokenizer, the LoRA adapter and reference policy (:mod:`.lora`), attention
backends, activation checkpointing of every part (:mod:`.checkpointing`), the residual log-flow
model ``g_φ`` (:mod:`.flow`) and what finetuning adds to loaded parts (:mod:`.trainable`).  SD 3.x:
its parts and built-in models (:mod:`.sd3`), LoRA targets and file (:mod:`.sd3_lora`), the prompt-
embedding cache (:mod:`.prompt_cache`) and the family adapter the loop composes (:mod:`.family`)."""
from .attention import ATTENTION_BACKENDS, MathSDPAProcessor, check_attention_backend, set_attention_backend
from .builtin import BUILTIN_CONFIGS, NATIVE_RESOLUTION, build_random_sd, builtin_configs, instantiate
from .checkpointing import set_checkpointing
from .family import family_of, load_run_parts
from .flow import build_flow_model
from .loading import is_sd3, load_sd, unet_config_of
from .lora import add_lora, freeze, reference_policy, vae_encoder_modules
from .parts import SDParts, make_pipeline, pipeline_class, save_sd, vae_dtype
from .preview import LATENT_RGB, preview_decoder_
from .sd3 import SD3_BUILTIN_CONFIGS, SD3_NATIVE_RESOLUTION, SD3Parts, TextOptions, build_random_sd3
from .single_file import SINGLE_FILE_SUFFIXES, SingleFileError, identify
from ..tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer
from .trainable import Trainable, freeze_parts, prepare_for_training

__all__ = [
    "ATTENTION_BACKENDS", "BUILTIN_CONFIGS", "CLIP_VOCAB_SIZE", "LATENT_RGB", "MathSDPAProcessor",
    "NATIVE_RESOLUTION", "SD3_BUILTIN_CONFIGS", "SD3_NATIVE_RESOLUTION", "SD3Parts", "SDParts", "TextOptions",
    "build_random_sd3", "Trainable", "freeze_parts", "prepare_for_training", "SINGLE_FILE_SUFFIXES", "SingleFileError", "add_lora", "build_flow_model",
    "build_random_sd", "builtin_configs", "check_attention_backend", "clip_tokenizer", "family_of", "freeze",
    "identify", "instantiate", "is_sd3", "load_run_parts", "load_sd", "make_pipeline", "pipeline_class", "preview_decoder_", "reference_policy",
    "save_sd", "set_attention_backend", "set_checkpointing", "unet_config_of", "vae_dtype", "vae_encoder_modules",
]
