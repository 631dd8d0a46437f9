"""The bottom floor: how a model chunk executes, importing only torch.

- :mod:`~mtrain.runtime.comm`: exchanges (:class:`CommOp`) that start now and
  finish later (:class:`Pending`), and their differentiable synchronous form.
- :mod:`~mtrain.runtime.context`: the per-micro-batch :class:`StepContext`
  (loss scale, weight-gradient sink, event log, auxiliary losses).
- :mod:`~mtrain.runtime.wgrad`: linear layers whose weight gradient can be
  deferred into the step context's sink (the W of zero-bubble schedules).
- :mod:`~mtrain.runtime.rebuild`: tensors dropped once their consumer has
  run and recomputed in place before its backward.
- :mod:`~mtrain.runtime.program`: typed carries and programs of compute and
  exchange steps, run plainly, step by step, or two at once overlapped.
- :mod:`~mtrain.runtime.runner`: one chunk's programs over many micro-batches.
"""
