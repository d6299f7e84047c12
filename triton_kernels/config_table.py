"""Launch configs of the Triton kernels (``configs.py`` says how they are keyed and
used). Written by ``configs.render_table``; do not edit the rows by hand without
rerunning ``make triton-check``."""

#: The card whose timings chose the rows marked chosen_by='timed' (None: none).
CARD = None
#: How this table was made.
NOTE = "compile check only (no GPU): the first spill-free candidate per row of bench/triton_tune.py's preference order; not timed. Stage-2 rows: split_k=8 by rule (configs.split_k_slices), untimed; their n_regs/n_spills/shared are make triton-check's worst variant (unsplit, split pass 1)"

TABLE = {
    'conv_delta/elementwise/fp32/-/any': dict(block_m=64, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=191, n_spills=0, shared=0),
    'conv_delta/elementwise/half/-/any': dict(block_m=64, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=192, n_spills=0, shared=0),
    'conv_delta/softmax/fp32/-/any': dict(block_m=32, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=225, n_spills=0, shared=256),
    'conv_delta/softmax/half/-/any': dict(block_m=32, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=225, n_spills=0, shared=256),
    'delta/elementwise/fp32/bf16/any': dict(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=152, n_spills=0, shared=57344),
    'delta/elementwise/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, chosen_by='compile-check', n_regs=170, n_spills=0, shared=32768),
    'delta/elementwise/fp32/tf32/any': dict(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=162, n_spills=0, shared=73728),
    'delta/elementwise/half/bf16/any': dict(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=196, n_spills=0, shared=32768),
    'delta/elementwise/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, chosen_by='compile-check', n_regs=180, n_spills=0, shared=32768),
    'delta/elementwise/half/tf32/any': dict(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=204, n_spills=0, shared=32768),
    'delta/softmax/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=236, n_spills=0, shared=36864),
    'delta/softmax/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, chosen_by='compile-check', n_regs=254, n_spills=0, shared=32768),
    'delta/softmax/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=225, n_spills=0, shared=49152),
    'delta/softmax/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=255, n_spills=0, shared=16384),
    'delta/softmax/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, chosen_by='compile-check', n_regs=254, n_spills=0, shared=32768),
    'delta/softmax/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=249, n_spills=0, shared=16384),
    'grouped_delta/mixed/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=239, n_spills=0, shared=36864),
    'grouped_delta/mixed/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, chosen_by='compile-check', n_regs=254, n_spills=0, shared=32768),
    'grouped_delta/mixed/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=233, n_spills=0, shared=49152),
    'grouped_delta/mixed/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=255, n_spills=0, shared=16384),
    'grouped_delta/mixed/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, chosen_by='compile-check', n_regs=254, n_spills=0, shared=32768),
    'grouped_delta/mixed/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3, chosen_by='compile-check', n_regs=240, n_spills=0, shared=16384),
    'grouped_weight_grad/-/fp32/bf16/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=149, n_spills=0, shared=172032),
    'grouped_weight_grad/-/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=1, split_k=8, chosen_by='compile-check', n_regs=73, n_spills=0, shared=24576),
    'grouped_weight_grad/-/fp32/tf32/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=182, n_spills=0, shared=180224),
    'grouped_weight_grad/-/half/bf16/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=194, n_spills=0, shared=139264),
    'grouped_weight_grad/-/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, split_k=8, chosen_by='compile-check', n_regs=104, n_spills=0, shared=32768),
    'grouped_weight_grad/-/half/tf32/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=125, n_spills=0, shared=147456),
    'targets/elementwise/fp32/-/any': dict(block_m=64, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=192, n_spills=0, shared=0),
    'targets/elementwise/half/-/any': dict(block_m=64, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=183, n_spills=0, shared=0),
    'targets/softmax/fp32/-/any': dict(block_m=32, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=247, n_spills=0, shared=256),
    'targets/softmax/half/-/any': dict(block_m=32, block_n=64, block_k=16, num_warps=4, num_stages=1, chosen_by='compile-check', n_regs=247, n_spills=0, shared=256),
    'weight_grad/-/fp32/bf16/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=128, n_spills=0, shared=172032),
    'weight_grad/-/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, split_k=8, chosen_by='compile-check', n_regs=92, n_spills=0, shared=32768),
    'weight_grad/-/fp32/tf32/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=2, split_k=8, chosen_by='compile-check', n_regs=151, n_spills=0, shared=163840),
    'weight_grad/-/half/bf16/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=149, n_spills=0, shared=139264),
    'weight_grad/-/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=1, split_k=8, chosen_by='compile-check', n_regs=100, n_spills=0, shared=32768),
    'weight_grad/-/half/tf32/any': dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, split_k=8, chosen_by='compile-check', n_regs=184, n_spills=0, shared=212992),
}
