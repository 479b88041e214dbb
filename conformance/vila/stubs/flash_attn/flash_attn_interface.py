"""STUB of flash_attn.flash_attn_interface."""

from _gpu_only import unavailable

flash_attn_varlen_qkvpacked_func = unavailable("flash_attn.flash_attn_interface.flash_attn_varlen_qkvpacked_func")
flash_attn_func = unavailable("flash_attn.flash_attn_interface.flash_attn_func")
flash_attn_varlen_func = unavailable("flash_attn.flash_attn_interface.flash_attn_varlen_func")
_flash_attn_forward = unavailable("flash_attn.flash_attn_interface._flash_attn_forward")
_flash_attn_backward = unavailable("flash_attn.flash_attn_interface._flash_attn_backward")
_flash_attn_varlen_forward = unavailable("flash_attn.flash_attn_interface._flash_attn_varlen_forward")
_flash_attn_varlen_backward = unavailable("flash_attn.flash_attn_interface._flash_attn_varlen_backward")
