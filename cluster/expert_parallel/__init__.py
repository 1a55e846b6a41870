"""Expert parallelism: the MoE layers' experts on MoE worker processes, reached over torch.distributed.

`remote_experts` is the replica's side (the link to the workers, the Experts each layer is handed), `moe_worker`
and `worker_steps` the worker's, `exchange` the wire protocol between them, `step_watch` the deadline that turns a
lost worker into a failed step instead of a hang. `step_hooks` is how the engine's ModelRunner drives it: the
`ExpertStepHooks` it calls at fixed points of every step, `ExpertParallelStep` for experts on the workers (and
`ColocatedExpertStep`, which does nothing, for experts in the replica's process).
"""
