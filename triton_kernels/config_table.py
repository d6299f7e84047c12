"""Launch configs of the Triton kernels (``configs.py`` says how they are keyed and
used). Written by ``configs.render_table``; do not edit the rows by hand without
rerunning ``make triton-check``."""

#: The card whose timings chose the rows marked chosen_by='timed' (None: none).
CARD = None
#: How this table was made.
NOTE = 'placeholder'

TABLE = {
    'conv_delta/elementwise/fp32/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'conv_delta/elementwise/half/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'conv_delta/softmax/fp32/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'conv_delta/softmax/half/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/elementwise/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/elementwise/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/elementwise/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/elementwise/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/elementwise/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/elementwise/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/softmax/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/softmax/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/softmax/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/softmax/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/softmax/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'delta/softmax/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_delta/mixed/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_delta/mixed/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_delta/mixed/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_delta/mixed/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_delta/mixed/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_delta/mixed/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_weight_grad/-/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_weight_grad/-/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_weight_grad/-/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_weight_grad/-/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_weight_grad/-/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'grouped_weight_grad/-/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'targets/elementwise/fp32/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'targets/elementwise/half/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'targets/softmax/fp32/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'targets/softmax/half/-/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'weight_grad/-/fp32/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'weight_grad/-/fp32/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'weight_grad/-/fp32/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'weight_grad/-/half/bf16/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'weight_grad/-/half/ieee/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
    'weight_grad/-/half/tf32/any': dict(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3, chosen_by='compile-check'),
}
