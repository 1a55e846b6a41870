"""The runtime around the model: the inference engine (scheduler, block manager, KV cache, model runner, sampler)
and the expert-parallel pieces (remote experts, the MoE worker, the expert exchange between them)."""
