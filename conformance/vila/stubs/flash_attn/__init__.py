"""STUB of flash_attn (CUDA kernels): imported by VILA's quantised-LLaMA and ring-attention modules only."""

from _gpu_only import unavailable

flash_attn_func = unavailable("flash_attn.flash_attn_func")
flash_attn_varlen_func = unavailable("flash_attn.flash_attn_varlen_func")
flash_attn_kvpacked_func = unavailable("flash_attn.flash_attn_kvpacked_func")
flash_attn_varlen_kvpacked_func = unavailable("flash_attn.flash_attn_varlen_kvpacked_func")
