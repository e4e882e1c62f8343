"""Models: Stable Diffusion parts (:mod:`.parts`), loading them by ``pretrained.model``
(:mod:`.loading`: built-in random models in :mod:`.builtin`, single files in :mod:`.single_file`),
the offline CLIP tokenizer, the LoRA adapter and reference policy (:mod:`.lora`), attention
backends, activation checkpointing of every part (:mod:`.checkpointing`), the residual log-flow
model ``g_φ`` (:mod:`.flow`) and what finetuning adds to loaded parts (:mod:`.trainable`)."""
from .attention import ATTENTION_BACKENDS, MathSDPAProcessor, check_attention_backend, set_attention_backend
from .builtin import BUILTIN_CONFIGS, NATIVE_RESOLUTION, build_random_sd, builtin_configs, instantiate
from .checkpointing import set_checkpointing
from .flow import build_flow_model
from .loading import load_sd, unet_config_of
from .lora import add_lora, freeze, reference_policy, vae_encoder_modules
from .parts import SDParts, make_pipeline, pipeline_class, save_sd, vae_dtype
from .preview import LATENT_RGB, preview_decoder_
from .single_file import SINGLE_FILE_SUFFIXES, SingleFileError, identify
from ..tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer
from .trainable import Trainable, prepare_for_training

__all__ = [
    "ATTENTION_BACKENDS", "BUILTIN_CONFIGS", "CLIP_VOCAB_SIZE", "LATENT_RGB", "MathSDPAProcessor",
    "NATIVE_RESOLUTION", "SDParts", "Trainable", "prepare_for_training", "SINGLE_FILE_SUFFIXES", "SingleFileError", "add_lora", "build_flow_model",
    "build_random_sd", "builtin_configs", "check_attention_backend", "clip_tokenizer", "freeze", "identify",
    "instantiate", "load_sd", "make_pipeline", "pipeline_class", "preview_decoder_", "reference_policy",
    "save_sd", "set_attention_backend", "set_checkpointing", "unet_config_of", "vae_dtype", "vae_encoder_modules",
]
