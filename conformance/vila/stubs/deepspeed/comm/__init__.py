"""STUB of deepspeed.comm: the harness runs one process, so no collective is ever reached."""

from _gpu_only import unavailable

all_to_all_single = unavailable("deepspeed.comm.all_to_all_single")
all_gather = unavailable("deepspeed.comm.all_gather")
get_rank = unavailable("deepspeed.comm.get_rank")
get_world_size = unavailable("deepspeed.comm.get_world_size")
new_group = unavailable("deepspeed.comm.new_group")
